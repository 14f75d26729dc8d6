"""Whole-process resize benchmark, next to the audit of the same file.

    python benchmarks/bench_resize.py [--runs 7] [--policy energy@0.9]

The 7B-shaped r=64 bf16 adapter (224 A/B pairs, 336 MB; benchmarks/synthetic.py)
is resized with `python -m gradience_lite resize DIR OUT --policy energy@0.9
--force` and audited with `python -m gradience_lite audit DIR --json`, the two
alternating so that drift in the machine's speed hits both alike; the first run
of each is a discarded warm-up.  Reported: median wall time, median CPU time
(user + sys, from wait4()'s rusage of that very child: less sensitive than wall
time to other processes sharing the cores) and peak RSS.  Target: resize ≤ 1.5×
the audit's time, peak RSS < 200 MB.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_audit import measure_child as run_child  # noqa: E402  (wall, CPU, peak RSS)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--policy", default="energy@0.9")
    parser.add_argument("--data", default=str(HERE / "_data"))
    args = parser.parse_args()
    folder = Path(args.data) / "7b_r64"
    subprocess.run([sys.executable, str(HERE / "synthetic.py"), "adapter", str(folder), "7b", "64"], check=True)
    with tempfile.TemporaryDirectory(dir=args.data) as scratch:
        out = Path(scratch) / "resized"
        commands = {"audit": [sys.executable, "-m", "gradience_lite", "audit", str(folder), "--json"],
                    "resize": [sys.executable, "-m", "gradience_lite", "resize", str(folder), str(out),
                               "--policy", args.policy, "--force"]}
        for command in commands.values():
            run_child(command)  # warm-up
        rows = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                rows[name].append(run_child(command))
        size_after = (out / "adapter_model.safetensors").stat().st_size
    size = (folder / "adapter_model.safetensors").stat().st_size
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"{args.runs} runs (median wall, median CPU, max peak RSS)")
    print(f"7B r=64 bf16: {size / 1e6:.0f} MB → resized ({args.policy}) {size_after / 1e6:.0f} MB")
    medians = {}
    for name, samples in rows.items():
        medians[name] = (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples),
                         max(s[2] for s in samples))
        print(f"  {name:<7} wall {medians[name][0]:6.2f} s   CPU {medians[name][1]:6.2f} s   peak RSS {medians[name][2]:5.0f} MiB")
    print(f"  resize / audit: wall {medians['resize'][0] / medians['audit'][0]:.2f}x, "
          f"CPU {medians['resize'][1] / medians['audit'][1]:.2f}x")


if __name__ == "__main__":
    main()
