"""Synthetic LoRA adapters and base checkpoints for the benchmarks (NumPy only).

Tensors are written as raw safetensors bytes (bf16 from float32 bits, rounded
to nearest even), one tensor at a time, so a 1.7 GB adapter is generated in
bounded memory.  Spectra decay like trained adapters' (σ_i ∝ 0.8^i).
"""
import json
import os
import struct
from pathlib import Path

import numpy as np

SHAPES = {
    # name: (hidden, intermediate, kv_out, layers)
    "7b": (4096, 14336, 1024, 32),
    "70b": (8192, 28672, 1024, 80),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(model: str):
    """(module name, out, in) of every linear weight in a Llama/Mistral-shaped decoder."""
    hidden, intermediate, kv, layers = SHAPES[model]
    dims = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
    for layer in range(layers):
        for proj in PROJECTIONS:
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            yield f"model.layers.{layer}.{block}.{proj}", dims[proj][0], dims[proj][1]


def to_bf16_bytes(values: np.ndarray) -> bytes:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()


def write_streaming(path: Path, entries, metadata=None):
    """entries: list of (name, shape, dtype, producer) with producer() -> bytes, written in order."""
    header, offset = {}, 0
    itemsize = {"BF16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1}
    for name, shape, dtype, _ in entries:
        size = int(np.prod(shape)) * itemsize[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype, producer in entries:
            data = producer()
            assert len(data) == header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            out.write(data)
    os.replace(tmp, path)


def make_adapter(folder: Path, model: str = "7b", rank: int = 16, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "adapter_model.safetensors"
    if target.exists():
        return folder
    rng = np.random.default_rng(seed)
    decay = 0.8 ** np.arange(rank)
    entries = []
    for module, out_features, in_features in linear_shapes(model):
        prefix = f"base_model.model.{module}"

        def lora_a(i=in_features):
            return to_bf16_bytes(rng.standard_normal((rank, i), dtype=np.float32) / np.sqrt(i))

        def lora_b(o=out_features):
            return to_bf16_bytes(rng.standard_normal((o, rank), dtype=np.float32) * (0.01 * decay).astype(np.float32))

        entries.append((f"{prefix}.lora_A.weight", (rank, in_features), "BF16", lora_a))
        entries.append((f"{prefix}.lora_B.weight", (out_features, rank), "BF16", lora_b))
    write_streaming(target, entries, {"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": False,
        "target_modules": list(PROJECTIONS), "base_model_name_or_path": f"synthetic-{model}"}, indent=1))
    return folder


def make_base(folder: Path, model: str = "7b", layers: int = 2, seed: int = 1, spikes: bool = True) -> Path:
    """A few decoder layers of a Llama-shaped bf16 base.  With ``spikes`` the
    weights are noise plus a few decaying rank-one directions (σ₁/σ₂ ≈ 1.4, as
    trained weights have); without, pure Gaussian noise, whose top singular
    values crowd together (the hard case for any Krylov method)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.safetensors"
    if target.exists():
        return folder
    rng = np.random.default_rng(seed)
    entries = []
    for module, out_features, in_features in linear_shapes(model):
        if int(module.split(".")[2]) >= layers:
            break

        def weight(o=out_features, i=in_features):
            dense = rng.standard_normal((o, i), dtype=np.float32) * np.float32(0.02)
            if spikes:
                count = 8
                u = rng.standard_normal((o, count), dtype=np.float32)
                v = rng.standard_normal((count, i), dtype=np.float32)
                dense += (u * np.float32(0.002) * (0.7 ** np.arange(count)).astype(np.float32)) @ v
            return to_bf16_bytes(dense)

        entries.append((f"{module}.weight", (out_features, in_features), "BF16", weight))
    write_streaming(target, entries, {"format": "pt"})
    return folder


if __name__ == "__main__":
    # python benchmarks/synthetic.py adapter DIR MODEL RANK | base DIR MODEL LAYERS [gaussian]
    # (the benchmarks generate data in a child process, so their own RSS stays small and
    # does not leak into the children they measure)
    import sys

    kind, folder, model, number = sys.argv[1:5]
    if kind == "adapter":
        make_adapter(Path(folder), model, int(number))
    else:
        make_base(Path(folder), model, int(number), spikes="gaussian" not in sys.argv[5:])
