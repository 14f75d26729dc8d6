"""Audit time for a PEFT ``target_parameters`` MoE adapter (fused expert factors).

    python benchmarks/bench_experts.py [--layers 8] [--experts 128] [--runs 3]

A Qwen3-MoE-shaped adapter (hidden 2048, expert intermediate 768, r = 16, bf16)
targets ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``: per layer
two nested ParamWrappers whose lora_A is (r·E, in) expert-major and lora_B
(out, r·E) rank-major, i.e. every expert's B is a strided slice.  Written with
NumPy into benchmarks/_data/; each run is a whole `python -m gradience_lite
audit DIR --json` process (median wall time and peak RSS).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from synthetic import to_bf16_bytes, write_streaming  # noqa: E402


def make_adapter(folder: Path, layers: int, experts: int, rank: int, hidden=2048, intermediate=768):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = []
    for layer in range(layers):
        prefix = f"base_model.model.model.layers.{layer}.mlp.experts."
        # inner wrapper: gate_up_proj (out 2·I, in H); outer: down_proj (out H, in I)
        shapes += [(prefix + "base_layer.lora_A.weight", (rank * experts, hidden)),
                   (prefix + "base_layer.lora_B.weight", (2 * intermediate, rank * experts)),
                   (prefix + "lora_A.weight", (rank * experts, intermediate)),
                   (prefix + "lora_B.weight", (hidden, rank * experts))]
    write_streaming(folder / "adapter_model.safetensors",
                    [(name, shape, "BF16", lambda shape=shape: to_bf16_bytes(rng.standard_normal(shape,
                                                                                 dtype=np.float32) * 0.02))
                     for name, shape in shapes], {"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [],
              "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def run(folder):
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "gradience_lite", "audit", str(folder), "--json"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    document = json.loads(process.stdout.read())
    return wall, usage.ru_maxrss / 1024.0, document["n_layers"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = HERE / "_data" / f"experts_{args.layers}x{args.experts}_r{args.rank}"
    if not (folder / "adapter_model.safetensors").exists():
        make_adapter(folder, args.layers, args.experts, args.rank)
    size = (folder / "adapter_model.safetensors").stat().st_size / 1e6
    run(folder)  # warm-up: page cache, bytecode
    results = [run(folder) for _ in range(args.runs)]
    wall = statistics.median(r[0] for r in results)
    print(f"{args.layers} layers × 2 params × {args.experts} experts, r={args.rank}, bf16, {size:.0f} MB: "
          f"{results[0][2]} modules, {wall:.2f} s (median of {args.runs}), peak RSS {max(r[1] for r in results):.0f} MiB")


if __name__ == "__main__":
    main()
