"""Base-norms benchmark: σ_max and ‖W‖_F of every linear weight of a synthetic
Llama-7B-shaped bf16 base, whole process, next to one plain read-and-decode pass.

    python benchmarks/bench_base_norms.py             # 2 decoder layers (872 MB), spiked spectra
    python benchmarks/bench_base_norms.py --layers 1  # smaller
    python benchmarks/bench_base_norms.py --gaussian  # also 1 layer of pure-noise weights (σ₁ ≈ σ₂: the hard case)

"passes-equivalent" = time of tensor_norms() (decode, ‖W‖_F, σ_max) / time of a
plain read_tensor() decode, summed over all tensors in one process (so Python's
start-up does not blur the ratio).  Per-matrix times and iterations come from
the same in-process run.

    python benchmarks/bench_base_norms.py --quantized  # 1 layer in bf16, NF4 and FP8 (block 128), whole process

--quantized: one Llama-7B-shaped decoder layer with GQA (q, o 4096×4096; k, v
1024×4096 as in Mistral-7B / Llama-3-8B; gate, up 14336×4096; down 4096×14336)
written three ways from the same spiked bf16 weights: bf16; bitsandbytes NF4
(blocksize 64, absmax F32, quant state JSON, exactly the layout bitsandbytes
saves); FP8 E4M3 with 128×128 weight_scale_inv (the DeepSeek-V3 layout).  The
quantized layouts are produced here with NumPy (nearest code per block), which
is fine for timing: the decoder reads the same bytes either way.
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

from bench_audit import run_child  # the one child runner: wall time and peak RSS from wait4

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

DECODE_PASS = (
    "import sys, numpy as np, gradience_lite as g\n"
    "sf = g.open_safetensors(sys.argv[1])\n"
    "for name, info in sf.tensors.items():\n"
    "    g.read_tensor(sf, name, np.float32); g.release_pages(sf, info)\n")


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


def derive_quantized(source: Path, target: Path, kind: str) -> None:
    """Rewrite a bf16 checkpoint as NF4 (bitsandbytes layout) or FP8 block-128 (DeepSeek layout)."""
    import base_norms
    import gradience_lite
    from synthetic import write_streaming

    target.mkdir(parents=True, exist_ok=True)
    if (target / "model.safetensors").exists():
        return
    sf = gradience_lite.open_safetensors(source / "model.safetensors")
    entries = []
    for name, info in sf.tensors.items():
        rows, cols = info.shape

        def values(name=name):
            return gradience_lite.read_tensor(sf, name, np.float32)

        if kind == "nf4":
            table = base_norms.BNB_4BIT_CODES["nf4"]
            midpoints = (table[1:] + table[:-1]) / 2
            count = rows * cols

            def quantize(values=values):
                flat = values().reshape(-1, 64)
                absmax = np.abs(flat).max(axis=1)
                codes = np.searchsorted(midpoints, flat / absmax[:, None]).astype(np.uint8).reshape(-1)
                return (codes[0::2] << 4) | codes[1::2], absmax.astype("<f4")

            cache = {}

            def packed(quantize=quantize, cache=cache):
                cache["codes"], cache["absmax"] = quantize()
                return cache["codes"].tobytes()

            def absmax(cache=cache):
                return cache.pop("absmax").tobytes()

            state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16",
                                "shape": [rows, cols]}).encode()
            entries += [(name, (count // 2, 1), "U8", packed), (name + ".absmax", (count // 64,), "F32", absmax),
                        (name + ".quant_map", (16,), "F32", lambda: table.astype("<f4").tobytes()),
                        (name + ".quant_state.bitsandbytes__nf4", (len(state),), "U8", lambda state=state: state)]
        else:
            positive = gradience_lite._float8_table(4, 3, True)[:127]  # codes 0x00…0x7E, ascending
            grid = (-(-rows // 128), -(-cols // 128))
            cache = {}

            def fp8(values=values, cache=cache, grid=grid):
                weight = values()
                scales = np.empty(grid, dtype="<f4")
                codes = np.empty(weight.shape, dtype=np.uint8)
                for i in range(grid[0]):
                    for j in range(grid[1]):
                        tile = weight[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                        scales[i, j] = np.abs(tile).max() / 448.0
                        scaled = np.abs(tile) / scales[i, j]
                        index = np.clip(np.searchsorted(positive, scaled), 1, 126)
                        nearer = np.where(scaled - positive[index - 1] < positive[index] - scaled, index - 1, index)
                        codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = nearer | ((tile < 0) << 7)
                cache["scales"] = scales
                return codes.tobytes()

            entries += [(name, (rows, cols), "F8_E4M3", fp8),
                        (name + "_scale_inv", grid, "F32", lambda cache=cache: cache.pop("scales").tobytes())]
    write_streaming(target / "model.safetensors", entries, {"format": "pt"})
    config = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                      "bnb_4bit_quant_type": "nf4"} if kind == "nf4" else
              {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    (target / "config.json").write_text(json.dumps(config))


def bench_quantized(data: Path, runs: int) -> None:
    source = data / "base_7b_1layers"
    subprocess.run([sys.executable, str(HERE / "synthetic.py"), "base", str(source), "7b", "1"], check=True)
    folders = [("bf16", source)]
    for kind in ("nf4", "fp8"):
        target = data / f"base_7b_1layer_{kind}"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--derive", kind, str(source), str(target)],
                       check=True)
        folders.append((kind, target))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, median of {runs} runs; "
          "one Llama-7B-shaped layer (GQA k/v 1024×4096), 7 matrices, whole process `python -m base_norms`")
    print(f"{'storage':<8} {'file MB':>8} {'time s':>8} {'peak RSS MiB':>13}  σ_max of down_proj")
    # Rounds interleave the three storages, so a busy machine slows each about equally.
    with tempfile.TemporaryDirectory() as scratch:
        outputs = {kind: Path(scratch) / f"{kind}.json" for kind, _ in folders}
        commands = {kind: [sys.executable, "-m", "base_norms", str(folder), "--out", str(outputs[kind]), "--quiet"]
                    for kind, folder in folders}
        for command in commands.values():
            run_child(command)  # warm the page cache
        timings: dict = {kind: [] for kind in commands}
        for _ in range(runs):
            for kind, command in commands.items():
                outputs[kind].unlink(missing_ok=True)  # never reuse: every run computes everything
                timings[kind].append(run_child(command))
        documents = {kind: json.loads(path.read_text()) for kind, path in outputs.items()}
    reference = documents["bf16"]["norms"]["model.layers.0.mlp.down_proj.weight"]["sigma_max"]
    for kind, folder in folders:
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
        sigma = documents[kind]["norms"]["model.layers.0.mlp.down_proj.weight"]["sigma_max"]
        print(f"{kind:<8} {size:>8.0f} {statistics.median(t for t, _ in timings[kind]):>8.2f} "
              f"{max(r for _, r in timings[kind]):>13.0f}  {sigma:.5f} ({(sigma / reference - 1) * 100:+.2f} % vs bf16)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gaussian", action="store_true", help="also a 1-layer pure-noise base")
    parser.add_argument("--data", default=str(HERE / "_data"))
    parser.add_argument("--quantized", action="store_true", help="1 layer in bf16, NF4 and FP8 block-128")
    parser.add_argument("--derive", nargs=3, metavar=("KIND", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.derive:
        sys.path.insert(0, str(HERE))
        return derive_quantized(Path(args.derive[1]), Path(args.derive[2]), args.derive[0])
    if args.quantized:
        return bench_quantized(Path(args.data), args.runs)
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
