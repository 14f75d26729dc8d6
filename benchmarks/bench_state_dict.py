"""In-process cost of one training-loop audit: audit_lora_state_dict + append_metrics_event.

    python benchmarks/bench_state_dict.py              # 7B-shaped r=16 (224 modules), 7 calls per case
    python benchmarks/bench_state_dict.py --rank 64 --calls 5

What a training callback pays every N steps, on a Mistral-7B-shaped all-linear
adapter held in memory (no file is read):

- ``numpy-f32``: float32 NumPy arrays (what a NumPy / JAX user hands over);
- ``bf16-duck``: bf16 tensors standing in for torch's (bit patterns in uint16,
  widened to float32 through ``.float()`` as torch does) — NumPy only;
- ``torch-bf16``: real torch bf16 parameters with ``requires_grad=True``, as
  ``get_peft_model_state_dict`` returns them mid-training (only when torch is
  importable, e.g. ``/work/venv-tools/bin/python``);
- ``file-bf16``: for reference, the same shapes audited from a bf16 safetensors
  file (``audit_lora_state_dict(path)``; the file is generated once into
  benchmarks/_data/ and is in the page cache), in the same process and under
  the same machine load.

Reported: median wall time per call (audit + JSONL append), median CPU time
per call (process time, all threads: what the call costs a busy machine,
and far less sensitive than wall time to other processes' load), and the
growth of peak RSS over the state dict itself (the audit's own working memory).
"""
import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from synthetic import linear_shapes, make_adapter  # noqa: E402

import gradience_lite as gl  # noqa: E402


class Bf16Tensor:
    """bf16 held as its bit patterns, with the slice of torch's API the audit uses."""

    def __init__(self, bits):
        self.bits, self.shape, self.dtype = bits, bits.shape, "torch.bfloat16"

    def detach(self):
        return self

    def to(self, device):
        return self

    def float(self):
        return Float32Tensor((self.bits.astype(np.uint32) << np.uint32(16)).view(np.float32))

    def numpy(self):
        raise TypeError("Got unsupported ScalarType BFloat16")


class Float32Tensor(Bf16Tensor):
    def float(self):
        return self

    def numpy(self):
        return self.bits


def float32_factors(rank, seed=0):
    """name → float32 factor of a trained-looking 7B-shaped adapter (σᵢ ∝ 0.8^i)."""
    rng = np.random.default_rng(seed)
    decay = (0.8 ** np.arange(rank)).astype(np.float32)
    for module, out_features, in_features in linear_shapes("7b"):
        prefix = f"base_model.model.{module}"
        yield f"{prefix}.lora_A.weight", rng.standard_normal((rank, in_features), dtype=np.float32) / np.float32(np.sqrt(in_features))
        yield f"{prefix}.lora_B.weight", rng.standard_normal((out_features, rank), dtype=np.float32) * (np.float32(0.01) * decay)


def to_bf16_bits(values):
    bits = values.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def state_dict(kind, rank):
    if kind == "file-bf16":
        return str(make_adapter(HERE / "_data" / f"7b_r{rank}", "7b", rank) / "adapter_model.safetensors")
    if kind == "numpy-f32":
        return dict(float32_factors(rank))
    if kind == "bf16-duck":
        return {name: Bf16Tensor(to_bf16_bits(values)) for name, values in float32_factors(rank)}
    import torch

    return {name: torch.from_numpy(values).to(torch.bfloat16).requires_grad_(True)
            for name, values in float32_factors(rank)}


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(kind, rank, calls):
    tensors = state_dict(kind, rank)
    config = {"r": rank, "lora_alpha": 2 * rank}
    before = peak_rss_mib()
    wall, cpu = [], []
    with tempfile.TemporaryDirectory() as folder:
        run_file = str(Path(folder) / "run.jsonl")
        for step in range(calls + 1):  # the first call is a warm-up (imports, first-touch of buffers)
            started, started_cpu = time.perf_counter(), time.process_time()
            result = gl.audit_lora_state_dict(tensors, config)
            gl.append_metrics_event(result, run_file, run_id="bench", step=step)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        assert result.to_summary_dict()["n_layers"] == 224 and not result.issues, result.issues
    return statistics.median(wall[1:]), min(wall[1:]), statistics.median(cpu[1:]), peak_rss_mib() - before


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calls", type=int, default=7)
    args = parser.parse_args()
    kinds = ["file-bf16", "numpy-f32", "bf16-duck"]
    try:
        import torch  # noqa: F401

        kinds.append("torch-bf16")
    except ImportError:
        print("(torch not importable: torch-bf16 case skipped)", file=sys.stderr)
    print(f"7B-shaped all-linear adapter, r={args.rank}, 224 modules; median of {args.calls} calls after a warm-up")
    print(f"{'state dict':<12} {'wall/call':>10} {'fastest':>10} {'CPU/call':>10} {'peak RSS growth':>16}")
    for kind in kinds:
        median, fastest, cpu, growth = measure(kind, args.rank, args.calls)
        print(f"{kind:<12} {median:>9.3f}s {fastest:>9.3f}s {cpu:>9.3f}s {growth:>13.0f} MiB")


if __name__ == "__main__":
    main()
