"""Base-norms benchmark: σ_max and ‖W‖_F of every linear weight of a synthetic
Llama-7B-shaped bf16 base, whole process, next to one plain read-and-decode pass.

    python benchmarks/bench_base_norms.py             # 2 decoder layers (872 MB), spiked spectra
    python benchmarks/bench_base_norms.py --layers 1  # smaller
    python benchmarks/bench_base_norms.py --gaussian  # also 1 layer of pure-noise weights (σ₁ ≈ σ₂: the hard case)

"passes-equivalent" = time of tensor_norms() (decode, ‖W‖_F, σ_max) / time of a
plain read_tensor() decode, summed over all tensors in one process (so Python's
start-up does not blur the ratio).  Per-matrix times and iterations come from
the same in-process run.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

DECODE_PASS = (
    "import sys, numpy as np, gradience_lite as g\n"
    "sf = g.open_safetensors(sys.argv[1])\n"
    "for name, info in sf.tensors.items():\n"
    "    g.read_tensor(sf, name, np.float32); g.release_pages(sf, info)\n")


def run_child(command):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command} failed: {process.stderr.read().decode()}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024.0


def bench(folder, runs):
    import base_norms
    import gradience_lite

    weights = folder / "model.safetensors"
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "norms.json"
        norms_cmd = [sys.executable, "-m", "base_norms", str(folder), "--out", str(out), "--quiet"]
        decode_cmd = [sys.executable, "-c", DECODE_PASS, str(weights)]
        run_child(decode_cmd)  # warm the page cache
        norms, decode = [], []
        for _ in range(runs):
            out.unlink(missing_ok=True)  # never reuse: every run computes everything
            norms.append(run_child(norms_cmd))
            decode.append(run_child(decode_cmd))
        document = json.loads(out.read_text())
    sf = gradience_lite.open_safetensors(weights)
    per_shape, decode_total, norms_total = {}, 0.0, 0.0
    for name in sf.tensors:
        started = time.perf_counter()
        gradience_lite.read_tensor(sf, name, np.float32)
        gradience_lite.release_pages(sf, sf.tensors[name])
        decoded = time.perf_counter()
        record = base_norms.tensor_norms(sf, name)
        finished = time.perf_counter()
        decode_total += decoded - started
        norms_total += finished - decoded
        per_shape.setdefault(tuple(record["shape"]), []).append((finished - decoded, record["iterations"]))
    iterations = [record["iterations"] for record in document["norms"].values()]
    return (statistics.median(w for w, _ in norms), max(r for _, r in norms),
            statistics.median(w for w, _ in decode), per_shape, iterations, document, norms_total / decode_total)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gaussian", action="store_true", help="also a 1-layer pure-noise base")
    parser.add_argument("--data", default=str(HERE / "_data"))
    args = parser.parse_args()
    cases = [(f"spiked, {args.layers} layers", Path(args.data) / f"base_7b_{args.layers}layers", [str(args.layers)])]
    if args.gaussian:
        cases.append(("gaussian, 1 layer", Path(args.data) / "base_7b_gaussian", ["1", "gaussian"]))
    for _, folder, extra in cases:
        subprocess.run([sys.executable, str(HERE / "synthetic.py"), "base", str(folder), "7b", *extra], check=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, median of {args.runs} runs")
    for label, folder, _ in cases:
        size = (folder / "model.safetensors").stat().st_size / 1e6
        wall, rss, decode, per_shape, iterations, document, passes = bench(folder, args.runs)
        print(f"\n{label}: {len(document['norms'])} matrices, {size:.0f} MB bf16")
        print(f"  norms (whole process): {wall:.2f} s, peak RSS {rss:.0f} MiB; "
              f"a decode-only process: {decode:.2f} s")
        print(f"  in-process: norms cost {passes:.1f} read-and-decode passes-equivalent (σ_max + ‖W‖_F, decode included)")
        print(f"  iterations: mean {np.mean(iterations):.1f}, max {max(iterations)}; all converged: "
              f"{all(r['converged'] for r in document['norms'].values())}")
        for shape, rows in sorted(per_shape.items()):
            print(f"  {str(shape):<14} {len(rows):>3} × {statistics.median(t for t, _ in rows):.3f} s "
                  f"(iterations {statistics.median(i for _, i in rows):.0f})")


if __name__ == "__main__":
    main()
