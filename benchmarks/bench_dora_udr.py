"""What the effective DoRA UDR costs: whole-process wall time and peak RSS.

    python benchmarks/bench_dora_udr.py [--size 4096] [--rank 16] [--runs 3]

One Llama-7B-shaped layer (q_proj, 4096×4096 bf16 base) with a PEFT DoRA
adapter, audited with ``--base-model`` as `python -m gradience_lite audit DIR
--base-model BASE --json`; next to it the same adapter without its magnitude
vector (plain LoRA: base norms + UDR only).  The difference is the DoRA step:
one more read of W₀ (float32), one blocked float64 pass for the row norms,
and Lanczos over mat-vecs through W₀.  Data is generated once into
benchmarks/_data/ (NumPy only).  Peak RSS comes from wait4()'s rusage.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_audit import run_child  # noqa: E402  (same measurement as the audit benchmark)
from synthetic import to_bf16_bytes, write_streaming  # noqa: E402

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj."


def generate(size: int, rank: int) -> Path:
    root = HERE / "_data" / f"dora_{size}_r{rank}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    (root / "base").mkdir(parents=True, exist_ok=True)
    weight = rng.standard_normal((size, size), dtype=np.float32) * 0.02
    write_streaming(root / "base" / "model.safetensors",
                    [("model.layers.0.self_attn.q_proj.weight", (size, size), "BF16", lambda: to_bf16_bytes(weight))])
    magnitude = np.linalg.norm(weight.astype(np.float64), axis=1) * (1 + 0.05 * rng.standard_normal(size))
    lora_a = rng.standard_normal((rank, size), dtype=np.float32) * 0.01
    lora_b = rng.standard_normal((size, rank), dtype=np.float32) * 0.01
    factors = [(PREFIX + "lora_A.weight", lora_a.shape, "F32", lora_a.tobytes),
               (PREFIX + "lora_B.weight", lora_b.shape, "F32", lora_b.tobytes)]
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}
    dora = [(PREFIX + "lora_magnitude_vector", (size,), "F32", magnitude.astype(np.float32).tobytes)]
    for name, extra in (("dora", dora), ("plain", [])):
        (root / name).mkdir(exist_ok=True)
        write_streaming(root / name / "adapter_model.safetensors", factors + extra)
        (root / name / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=bool(extra))))
    (root / "done").write_text("")
    return root


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_only:
        generate(args.size, args.rank)
        return
    # Generated in a child: a forked child's peak RSS would otherwise start from this process's arrays.
    import subprocess
    subprocess.run([sys.executable, __file__, "--generate-only", "--size", str(args.size), "--rank", str(args.rank)],
                   check=True)
    root = generate(args.size, args.rank)
    print(f"{args.size}×{args.size} bf16 base, r={args.rank}; median of {args.runs} runs after a warm-up")
    for name in ("plain", "dora"):
        command = [sys.executable, "-m", "gradience_lite", "audit", str(root / name), "--base-model",
                   str(root / "base"), "--json"]
        run_child(command)  # warm-up: page cache, bytecode
        runs = [run_child(command) for _ in range(args.runs)]
        print(f"  {name:<6} wall {statistics.median(w for w, _ in runs):6.2f} s   "
              f"peak RSS {max(r for _, r in runs):7.1f} MiB")


if __name__ == "__main__":
    main()
