"""Shared helpers: an independent oracle reader and crafted-file writers.

The oracle side never calls gradience_lite: tensors are decoded here with a
separate implementation (bit fields for bf16) and spectra come from a dense
float64 SVD of the formed ΔW.
"""
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=300)
settings.register_profile("thorough", max_examples=5000)
settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PEFT_FIXTURES = FIXTURES / "peft"
sys.path.insert(0, str(ROOT))


def oracle_decode_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 from its sign / exponent / mantissa fields (no bit reinterpretation)."""
    bits = bits.astype(np.int64)
    sign = np.where(bits >> 15, -1.0, 1.0)
    exponent = (bits >> 7) & 0xFF
    mantissa = (bits & 0x7F) / 128.0
    normal = sign * (1.0 + mantissa) * np.exp2(exponent.astype(np.float64) - 127)
    subnormal = sign * mantissa * np.exp2(-126.0)
    special = np.where(mantissa == 0, sign * np.inf, np.nan)
    return np.where(exponent == 0xFF, special, np.where(exponent == 0, subnormal, normal))


def oracle_load(path) -> dict:
    """All tensors of a safetensors file as float64, decoded independently."""
    raw = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    data = raw[8 + size:]
    out = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        chunk = data[start:end]
        if entry["dtype"] == "BF16":
            values = oracle_decode_bf16(np.frombuffer(chunk, dtype="<u2"))
        else:
            values = np.frombuffer(chunk, dtype={"F32": "<f4", "F16": "<f2", "F64": "<f8"}[entry["dtype"]])
        out[name] = values.astype(np.float64).reshape(entry["shape"])
    return out


def dense_delta(a: np.ndarray, b: np.ndarray, scale: float, kind: str) -> np.ndarray:
    """ΔW formed the way PEFT's get_delta_weight forms it."""
    if a.ndim > 2:  # conv: B(out, r, 1, ...) ∘ A(r, in, *kernel)
        return scale * (b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], -1))
    delta = scale * (b @ a)
    return delta.T if kind == "embedding" else delta


def run_cli(*args, preamble: str = "", timeout: float = 120):
    """Run ``python -m gradience_lite ARGS`` as a user would (or, with ``preamble``, the same
    entry point after some setup code, e.g. blocking imports); returns the CompletedProcess."""
    if preamble:
        command = [sys.executable, "-c", preamble + "import sys, gradience_lite; sys.exit(gradience_lite.main(sys.argv[1:]))"]
    else:
        command = [sys.executable, "-m", "gradience_lite"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def fixture_deltas(case: Path) -> dict:
    """name → (ΔW formed densely as PEFT forms it, PEFT's own record of r/alpha/scaling, A, B)
    for every module of a PEFT fixture folder."""
    expected = json.loads((case / "expected.json").read_text())["modules"]
    tensors = oracle_load(case / "adapter_model.safetensors")
    out = {}
    for name, peft in expected.items():
        prefix = f"base_model.model.{name}."
        if prefix + "lora_A.weight" in tensors:
            a, b, kind = tensors[prefix + "lora_A.weight"], tensors[prefix + "lora_B.weight"], "linear"
        else:
            a, b, kind = tensors[prefix + "lora_embedding_A"], tensors[prefix + "lora_embedding_B"], "embedding"
        out[name] = (dense_delta(a, b, peft["scaling"], kind), peft, a, b)
    return out


def write_safetensors(path, tensors: dict, metadata=None, *, header_override=None, dtype_override=None) -> Path:
    """Write a safetensors file from NumPy arrays (bf16 given as uint16 bits via dtype_override)."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype = (dtype_override or {}).get(name) or {"float64": "F64", "float32": "F32", "float16": "F16",
                                                     "int64": "I64", "int32": "I32", "uint8": "U8"}[array.dtype.name]
        blob = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        chunks.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    if header_override:
        header_override(header)
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    path = Path(path)
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(chunks))
    return path


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 → bf16 bit patterns."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def peft_cases():
    """Every adapter the fixture script saved with PEFT (root adapters and named subfolders)."""
    cases = []
    for expected in sorted(PEFT_FIXTURES.glob("**/expected.json")):
        cases.append(expected.parent)
    return cases


@pytest.fixture
def tmp_adapter(tmp_path):
    """Write a PEFT-style adapter directory from arrays + config; returns its path."""
    def make(tensors, config=None, name="adapter", **kwargs):
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / "adapter_model.safetensors", tensors, **kwargs)
        if config is not None:
            (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return folder
    return make


SESSION_STARTED = time.time()


def pytest_terminal_summary(terminalreporter):
    """Point a reviewer at the screenshots the browser tests took in this run."""
    shots = ROOT / "test-artifacts" / "html"
    fresh = [p for p in shots.glob("*.png") if p.stat().st_mtime >= SESSION_STARTED] if shots.is_dir() else []
    if fresh:
        terminalreporter.write_line(f"{len(fresh)} screenshots of HTML reports for review in {shots}")
