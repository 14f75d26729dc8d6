"""Whole-process audit benchmark: median wall time and peak RSS, next to the NumPy floor.

    python benchmarks/bench_audit.py            # 7B-shaped r=16 and r=64 (bf16)
    python benchmarks/bench_audit.py --70b      # also the 70B-shaped r=64 adapter (~1.7 GB on disk)
    python benchmarks/bench_audit.py --quick    # r=16 only, 3 runs (CI smoke)

Adapters are generated once into benchmarks/_data/ (NumPy only).  Each case
runs `python -m gradience_lite audit DIR --json` and `benchmarks/floor.py DIR`
(decode + float64 Gram + r×r eigh per factor, nothing else) alternately, so
drift in the machine's speed hits both alike.  Peak RSS comes from wait4()'s
rusage of that very child.  The first run of each is a discarded warm-up (it
fills the page cache and writes bytecode caches, as an installed package has).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = {"7B r=16": ("7b", 16), "7B r=64": ("7b", 64), "70B r=64": ("70b", 64)}


def measure_child(command):
    """(wall seconds, CPU seconds (user + sys), peak RSS MiB) of one child process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed: {process.stderr.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def run_child(command):
    """(wall seconds, peak RSS MiB) of one child process."""
    wall, _, rss = measure_child(command)
    return wall, rss


def measure(folder, runs):
    audit = [sys.executable, "-m", "gradience_lite", "audit", str(folder), "--json"]
    floor = [sys.executable, str(HERE / "floor.py"), str(folder)]
    run_child(audit), run_child(floor)  # warm-up
    results = {"audit": [], "floor": []}
    for _ in range(runs):
        results["audit"].append(run_child(audit))
        results["floor"].append(run_child(floor))
    return {name: (statistics.median(w for w, _ in rows), max(r for _, r in rows)) for name, rows in results.items()}


def import_time(runs):
    code = "import time; t = time.perf_counter(); import gradience_lite; print(time.perf_counter() - t)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    samples = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                                    text=True, check=True).stdout) for _ in range(runs + 1)][1:]
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="r=16 only, 3 runs")
    parser.add_argument("--70b", dest="big", action="store_true", help="include the 70B-shaped r=64 adapter")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--data", default=str(HERE / "_data"))
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    names = ["7B r=16"] if args.quick else ["7B r=16", "7B r=64"] + (["70B r=64"] if args.big else [])
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {runs} runs per case (median wall, max peak RSS)")
    print(f"{'case':<10} {'file MB':>8} {'audit s':>8} {'audit MiB':>10} {'floor s':>8} {'floor MiB':>10} {'audit/floor':>12}")
    for name in names:
        model, rank = CASES[name]
        folder = Path(args.data) / f"{model}_r{rank}"
        subprocess.run([sys.executable, str(HERE / "synthetic.py"), "adapter", str(folder), model, str(rank)], check=True)
        size = (folder / "adapter_model.safetensors").stat().st_size / 1e6
        result = measure(folder, runs)
        (audit_s, audit_mb), (floor_s, floor_mb) = result["audit"], result["floor"]
        print(f"{name:<10} {size:>8.0f} {audit_s:>8.2f} {audit_mb:>10.0f} {floor_s:>8.2f} {floor_mb:>10.0f} "
              f"{audit_s / floor_s:>11.2f}x")
    print(f"import gradience_lite (in-process, median): {import_time(runs) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
