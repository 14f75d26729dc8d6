"""base_norms: spectral and Frobenius norms of a base model's weights, without torch.

One job: for named 2-D (or conv, or fused-expert) weights of a base checkpoint,
compute ‖W‖₂ (σ_max) and ‖W‖_F, or read them back from a norms file.  It knows
nothing about LoRA; the auditor matches adapter modules to parameter names.

    1. locating a checkpoint  (directory, sharded index, single file, GGUF, offline HF cache)
    2. GGUF container         (our own reader; one table of block types, one decoder per type)
    3. quantized weights      (one table: method → tensors, detector, dequantizer)
    4. logical weights        (what a checkpoint holds, however stored: list_parameters)
    5. σ_max                  (Golub–Kahan–Lanczos over float32 mat-vecs, matrix or operator)
    6. norms of one weight    (dequantize once, ‖W‖_F in float64, σ_max)
    7. norms files            (our format, upstream gradience's two formats; atomic writes)
    8. CLI                    (python -m base_norms BASE --out norms.json)

Weights are read one at a time with positional reads and dequantized to
float32 exactly as the library that wrote them would (bitsandbytes, FP8 block
scales, compressed-tensors, gpt-oss MXFP4, GGUF), so peak memory is about one
weight in float32 plus a few vectors.  No torch, no gguf package.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from gradience_lite import (DTYPES, AdapterFormatError, PICKLE_SUFFIXES, SafetensorsFile, _read_exact, decode,
                            json_safe, open_safetensors, raw_view, release_pages)

__all__ = ["BaseCheckpoint", "compute_base_norms", "list_parameters", "load_norms", "resolve_base", "save_norms",
           "spectral_norm"]

# /2: records carry "storage" and logical shapes, and quantized bases are dequantized.
# /1 files were written before the BF16 decode fix for NumPy 1.x (which read every
# BF16 weight as zeros there): they are never trusted.
NORMS_FORMAT = "gradience_lite.base_norms/2"
STALE_FORMATS = {"gradience_lite.base_norms/1": "written before the BF16 decoding fix for NumPy 1.x "
                                                "(its BF16 norms may be zeros)"}
METHOD = "golub-kahan-lanczos/float32"
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITER = 200
DEFAULT_SEED = 0


# ══ 1. locating a checkpoint ═════════════════════════════════════════════════

class BaseCheckpoint(NamedTuple):
    source: str  # what the user passed
    root: str  # the directory (or file) actually read
    files: Tuple[str, ...]  # safetensors files, absolute paths


def hub_cache_dir() -> Path:
    """Where the Hugging Face hub cache lives, by its own precedence rules."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _snapshot_for_hub_id(model_id: str) -> Tuple[Optional[Path], Path]:
    """The cached snapshot of ``org/name`` (offline), and the folder looked in."""
    repo = hub_cache_dir() / ("models--" + model_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot, repo
    snapshots = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
    return (snapshots[0] if len(snapshots) == 1 else None), repo


def _files_in_directory(root: Path) -> List[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            raise AdapterFormatError(f"{index}: not a valid safetensors index ({type(error).__name__})") from None
        # A shard is a file in this directory: an absolute path or ".." would
        # make the index a pointer to any file on the machine.
        outside = [str(name) for name in names
                   if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts
                   or "\\" in name or ":" in name]
        if outside:
            raise AdapterFormatError(f"{index}: weight_map names file(s) outside the base directory "
                                     f"({', '.join(outside[:3])}); refused")
        missing = [name for name in names if not (root / name).is_file()]
        if missing:
            raise AdapterFormatError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return [root / name for name in names]
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    safetensors = sorted(root.glob("*.safetensors"))
    ggufs = sorted(root.glob("*.gguf"))
    if not safetensors and len(ggufs) > 1:  # several quantizations of one model: which one is the base?
        raise AdapterFormatError(f"{root}: {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs[:4])}); "
                                 "pass the one the adapter was trained on")
    return safetensors or ggufs


def resolve_base(base: str | os.PathLike) -> BaseCheckpoint:
    """Find the safetensors files of a base model: a directory (single or sharded),
    one file, or a hub id resolved offline in the Hugging Face cache.  Never downloads.

    >>> resolve_base("mistralai/Mistral-7B-v0.1").files               # doctest: +SKIP
    ('/root/.cache/huggingface/hub/models--mistralai--Mistral-7B-v0.1/snapshots/…/model-00001-of-00002.safetensors', …)
    """
    if isinstance(base, BaseCheckpoint):
        return base
    source = str(base)
    path = Path(source).expanduser()
    looked = [str(path)]
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        snapshot, repo = _snapshot_for_hub_id(source)
        looked.append(str(repo))
        if snapshot is not None:
            path = snapshot
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterFormatError(f"{path}: is a pickle checkpoint; base_norms never unpickles. "
                                     "Use the model's .safetensors weights or a norms file (--base-norms).")
        return BaseCheckpoint(source, str(path), (str(path.resolve()),))
    if path.is_dir():
        files = _files_in_directory(path)
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            detail = f" (only pickle weights: {', '.join(pickles)}; never unpickled)" if pickles else ""
            # A diffusers pipeline keeps its weights one level down (gradience_lite.base_components reads those).
            folders = sorted(p.name + "/" for p in path.iterdir() if p.is_dir() and any(p.glob("*.safetensors")))
            detail += f" (its folders {', '.join(folders)} have some: pass one of them)" if folders else ""
            raise AdapterFormatError(f"{path}: no .safetensors or .gguf weights found{detail}")
        return BaseCheckpoint(source, str(path), tuple(str(f.resolve()) for f in files))
    raise AdapterFormatError(
        f"base model {source!r} not found; looked in: {'; '.join(looked)}. Nothing is downloaded: pass a local "
        "directory or .safetensors file, or download the model into the Hugging Face cache first")


def fingerprint(sf: SafetensorsFile) -> Dict[str, Any]:
    """Identifies a checkpoint file cheaply: its size and a hash of its header."""
    return {"size": sf.file_size, "header_sha256": sf.header_sha256}


# ══ 2. GGUF container ════════════════════════════════════════════════════════
# llama.cpp's single-file format: "GGUF", version, tensor count, key/value count,
# the key/values (typed, arrays nested), tensor infos (name, dims, type, offset),
# then the data section at the next multiple of general.alignment.  Dims are
# listed fastest-first (ne[0] is the contiguous axis), so a linear weight stored
# with ne = [in, out] is the row-major (out, in) matrix HF uses.  Every count and
# length is checked against the bytes present before anything is allocated.

GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class GGUFTensor(NamedTuple):
    name: str
    shape: Tuple[int, ...]  # numpy order: reversed ne, so (out, in) for a linear weight
    type_name: str  # "Q4_K", "F16", … or "type 99" for a code we do not know
    start: int  # absolute file offsets of the tensor's bytes
    end: int


class GGUFFile(NamedTuple):
    path: str
    metadata: Dict[str, Any]  # scalar and string values; arrays are kept only when short
    tensors: Dict[str, GGUFTensor]
    header_sha256: str
    file_size: int
    reader: "_PositionalBytes"


class _PositionalBytes:
    """A file's bytes by slice, each read with a positional read.

    Not a memory map: a file truncated by another process while it is mapped
    kills the reader with SIGBUS; read this way it is an error naming the file.
    """

    def __init__(self, path: str, handle: Any) -> None:
        self.path, self.handle = path, handle

    def __getitem__(self, span: slice) -> bytes:
        start = span.start or 0
        return _read_exact(self.handle, self.path, start, span.stop - start)


class _Cursor:
    """Reads little-endian fields from a file, never past its end."""

    def __init__(self, path: str, reader: _PositionalBytes, size: int) -> None:
        self.path, self.reader, self.size, self.at = path, reader, size, 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.at + count > self.size:
            raise AdapterFormatError(f"{self.path}: GGUF header runs past the end of the {self.size}-byte file "
                                     f"(at byte {self.at}, {count} more wanted)")
        chunk = self.reader[self.at:self.at + count]
        self.at += count
        return chunk

    def scalar(self, code: int) -> Any:
        dtype = np.dtype(_GGUF_SCALARS[code])
        value = np.frombuffer(self.take(dtype.itemsize), dtype=dtype)[0]
        return bool(value) if code == 7 else value.item()

    def string(self) -> str:
        length = self.scalar(10)
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise AdapterFormatError(f"{self.path}: GGUF string at byte {self.at - length} is not UTF-8") from None

    def value(self, code: int, depth: int = 0) -> Any:
        if code == _GGUF_STRING:
            return self.string()
        if code in _GGUF_SCALARS:
            return self.scalar(code)
        if code == _GGUF_ARRAY and depth < 2:
            item_code, count = self.scalar(4), self.scalar(10)
            if item_code in _GGUF_SCALARS:  # skip numeric arrays (token scores…) without decoding them
                self.take(count * np.dtype(_GGUF_SCALARS[item_code]).itemsize)
                return f"<array of {count}>"
            if count > self.size - self.at:  # every item takes at least one byte
                raise AdapterFormatError(f"{self.path}: GGUF array of {count} items cannot fit in the file")
            items = [self.value(item_code, depth + 1) for _ in range(count)]
            return items if count <= 16 else f"<array of {count}>"
        raise AdapterFormatError(f"{self.path}: unknown GGUF value type {code} at byte {self.at}")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF header; tensors are read (positionally) and decoded on demand.

    >>> gguf = open_gguf("model.Q4_K_M.gguf")                          # doctest: +SKIP
    >>> gguf.tensors["blk.0.attn_q.weight"].type_name                   # doctest: +SKIP
    'Q4_K'
    """
    path = str(path)
    try:
        handle = open(path, "rb", buffering=0)
        size = os.fstat(handle.fileno()).st_size
    except OSError as error:
        raise AdapterFormatError(f"{path}: cannot read ({error.strerror or error})") from None
    if size < 24:
        handle.close()
        raise AdapterFormatError(f"{path}: {size} bytes is too short for a GGUF file")
    reader = _PositionalBytes(path, handle)
    cursor = _Cursor(path, reader, size)
    if cursor.take(4) != GGUF_MAGIC:
        raise AdapterFormatError(f"{path}: not a GGUF file (bad magic)")
    version = cursor.scalar(4)
    if version not in (2, 3):
        raise AdapterFormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_values = cursor.scalar(10), cursor.scalar(10)
    if n_tensors > size // 24 or n_values > size // 12:  # each entry needs at least that many bytes
        raise AdapterFormatError(f"{path}: GGUF header claims {n_tensors} tensors and {n_values} values, "
                                 f"more than a {size}-byte file can hold")
    metadata: Dict[str, Any] = {}
    for _ in range(n_values):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar(4))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.scalar(4)
        if n_dims > 8:
            raise AdapterFormatError(f"{path}: GGUF tensor {name!r} claims {n_dims} dimensions")
        dims = tuple(cursor.scalar(10) for _ in range(n_dims))
        infos.append((name, dims, cursor.scalar(4), cursor.scalar(10)))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise AdapterFormatError(f"{path}: GGUF general.alignment {alignment!r} is not a power of two")
    data_start = -(-cursor.at // alignment) * alignment
    header_sha256 = hashlib.sha256(reader[0:cursor.at]).hexdigest()
    tensors: Dict[str, GGUFTensor] = {}
    for name, dims, code, offset in infos:
        if name in tensors:
            raise AdapterFormatError(f"{path}: GGUF tensor {name!r} appears twice")
        type_name = GGUF_TYPE_NAMES.get(code, f"type {code}")
        count = math.prod(dims)
        block, type_size = GGUF_BLOCKS.get(type_name, (1, 0))
        if type_size and count % block:
            raise AdapterFormatError(f"{path}: GGUF tensor {name!r} has {count} values, not a multiple of "
                                     f"{type_name}'s block of {block}")
        start = data_start + offset
        end = start + count // block * type_size
        if type_size and end > size:
            raise AdapterFormatError(f"{path}: GGUF tensor {name!r} ends at byte {end} of a {size}-byte file "
                                     "(the file is truncated or its header lies)")
        tensors[name] = GGUFTensor(name, tuple(reversed(dims)), type_name, start, end if type_size else start)
    return GGUFFile(path, metadata, tensors, header_sha256, size, reader)


# ── GGUF types: one table, one small decoder per type ──────────────────────────
# Each decoder maps an (n_blocks, type_size) uint8 array to (n_blocks, block)
# float32 values.  They follow ggml's dequantize_row_* (ggml-quants.c) and were
# checked against gguf-py's gguf.quants.dequantize on files gguf-py wrote.

QK_K = 256


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes → (n, 32) values: the 16 low nibbles, then the 16 high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _gguf_q8_0(blocks):
    return _f16(blocks[:, :2]) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _gguf_q4_0(blocks):
    return _f16(blocks[:, :2]) * (_nibbles(blocks[:, 2:]).astype(np.float32) - 8)


def _gguf_q4_1(blocks):
    return _f16(blocks[:, :2]) * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16(blocks[:, 2:4])


def _high_bits(raw: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32 fifth bits: bit j of a little-endian uint32 belongs to value j."""
    return np.unpackbits(np.ascontiguousarray(raw), axis=1, bitorder="little")


def _gguf_q5_0(blocks):
    values = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
    return _f16(blocks[:, :2]) * (values.astype(np.float32) - 16)


def _gguf_q5_1(blocks):
    values = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
    return _f16(blocks[:, :2]) * values.astype(np.float32) + _f16(blocks[:, 2:4])


def _k_scales(packed: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes."""
    d, m, m_d = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _gguf_q4_k(blocks):
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    d = _f16(blocks[:, 0:2]) * scales  # (n, 8): one scale per 32 values
    dm = _f16(blocks[:, 2:4]) * mins
    qs = blocks[:, 16:].reshape(n, 4, 32)  # 4 chunks of 32 bytes: 64 values each, low nibbles first
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    return (d[:, :, None] * q - dm[:, :, None]).reshape(n, QK_K)


def _gguf_q5_k(blocks):
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks[:, 4:16])
    d = _f16(blocks[:, 0:2]) * scales
    dm = _f16(blocks[:, 2:4]) * mins
    qh = blocks[:, 16:48]  # bit j of qh[l] is the fifth bit of value 32·j + l
    qs = blocks[:, 48:].reshape(n, 4, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (low | (high << 4)).astype(np.float32)
    return (d[:, :, None] * q - dm[:, :, None]).reshape(n, QK_K)


def _gguf_q6_k(blocks):
    n = blocks.shape[0]
    ql, qh = blocks[:, :128].reshape(n, 2, 64), blocks[:, 128:192].reshape(n, 2, 1, 32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(blocks[:, 208:210]) * scales  # (n, 16): one scale per 16 values
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.int8).astype(np.float32) - 32
    return (d.reshape(n, 16, 1) * q.reshape(n, 16, 16)).reshape(n, QK_K)


def _gguf_q2_k(blocks):
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80].reshape(n, 2, 1, 32)
    dl = _f16(blocks[:, 80:82]) * (scales & 0x0F).astype(np.float32)
    ml = _f16(blocks[:, 82:84]) * (scales >> 4).astype(np.float32)
    q = ((qs >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3).reshape(n, 16, 16)
    return (dl.reshape(n, 16, 1) * q.astype(np.float32) - ml.reshape(n, 16, 1)).reshape(n, QK_K)


def _gguf_q3_k(blocks):
    n = blocks.shape[0]
    hmask, qs, packed = blocks[:, :32], blocks[:, 32:96].reshape(n, 2, 1, 32), blocks[:, 96:108]
    low = (packed[:, None, :8] >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(n, 16) & 0x0F
    high = (packed[:, None, 8:] >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).reshape(n, 16) & 3
    scales = (low | (high << 4)).astype(np.float32) - 32
    dl = _f16(blocks[:, 108:110]) * scales
    ql = ((qs >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3).reshape(n, 16, 16)
    bit = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).reshape(n, 16, 16) & 1
    q = ql.astype(np.float32) - 4 * (1 - bit.astype(np.float32))  # the high bit set means no offset
    return (dl.reshape(n, 16, 1) * q).reshape(n, QK_K)


# e2m1 values, doubled: ggml stores the E8M0 exponent as "half" the scale.
_MXFP4_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def _gguf_mxfp4(blocks):
    # ggml_e8m0_to_fp32_half: 2^(e − 128) for every e (subnormal bit patterns below e = 2)
    half_scale = np.ldexp(np.float32(1.0), blocks[:, 0].astype(np.int32) - 128).astype(np.float32)
    return half_scale[:, None] * _MXFP4_DOUBLED[_nibbles(blocks[:, 1:])]


def _gguf_plain(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    if dtype == "BF16":
        return lambda blocks: np.left_shift(np.ascontiguousarray(blocks).view("<u2").astype(np.uint32), 16,
                                            dtype=np.uint32).view(np.float32)
    return lambda blocks: np.ascontiguousarray(blocks).view(dtype).astype(np.float32)


class GGUFType(NamedTuple):
    block: int  # values per block
    type_size: int  # bytes per block
    decode: Optional[Callable[[np.ndarray], np.ndarray]]  # None: known layout, no decoder here (refused)


GGUF_TYPES: Dict[str, GGUFType] = {
    "F32": GGUFType(1, 4, _gguf_plain("<f4")), "F16": GGUFType(1, 2, _gguf_plain("<f2")),
    "BF16": GGUFType(1, 2, _gguf_plain("BF16")), "F64": GGUFType(1, 8, _gguf_plain("<f8")),
    "Q8_0": GGUFType(32, 34, _gguf_q8_0), "Q4_0": GGUFType(32, 18, _gguf_q4_0), "Q4_1": GGUFType(32, 20, _gguf_q4_1),
    "Q5_0": GGUFType(32, 22, _gguf_q5_0), "Q5_1": GGUFType(32, 24, _gguf_q5_1),
    "Q2_K": GGUFType(256, 84, _gguf_q2_k), "Q3_K": GGUFType(256, 110, _gguf_q3_k),
    "Q4_K": GGUFType(256, 144, _gguf_q4_k), "Q5_K": GGUFType(256, 176, _gguf_q5_k),
    "Q6_K": GGUFType(256, 210, _gguf_q6_k), "MXFP4": GGUFType(32, 17, _gguf_mxfp4),
    # Known layouts without a decoder here: refused by name.
    "Q8_1": GGUFType(32, 36, None), "Q8_K": GGUFType(256, 292, None), "IQ2_XXS": GGUFType(256, 66, None),
    "IQ2_XS": GGUFType(256, 74, None), "IQ3_XXS": GGUFType(256, 98, None), "IQ1_S": GGUFType(256, 50, None),
    "IQ4_NL": GGUFType(32, 18, None), "IQ3_S": GGUFType(256, 110, None), "IQ2_S": GGUFType(256, 82, None),
    "IQ4_XS": GGUFType(256, 136, None), "I8": GGUFType(1, 1, None), "I16": GGUFType(1, 2, None),
    "I32": GGUFType(1, 4, None), "I64": GGUFType(1, 8, None), "IQ1_M": GGUFType(256, 56, None),
    "TQ1_0": GGUFType(256, 54, None), "TQ2_0": GGUFType(256, 66, None), "NVFP4": GGUFType(64, 36, None),
}
GGUF_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
                   10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
                   17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
                   24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
                   35: "TQ2_0", 39: "MXFP4", 40: "NVFP4"}
GGUF_BLOCKS = {name: (spec.block, spec.type_size) for name, spec in GGUF_TYPES.items()}


def gguf_matrix(gguf: GGUFFile, tensor: GGUFTensor, rows_per_chunk: int = 4096) -> np.ndarray:
    """One GGUF tensor dequantized to float32 in its numpy shape, decoded in row chunks
    so the decoders' temporaries stay small."""
    spec = GGUF_TYPES.get(tensor.type_name)
    if spec is None or spec.decode is None:
        raise AdapterFormatError(f"{gguf.path}: GGUF tensor {tensor.name!r} is {tensor.type_name}; "
                                 f"no decoder for it here (supported: {', '.join(SUPPORTED_GGUF_TYPES)})")
    columns = tensor.shape[-1] if tensor.shape else 1
    rows = math.prod(tensor.shape) // max(columns, 1)
    out = np.empty((rows, columns), dtype=np.float32)
    bytes_per_row = columns // spec.block * spec.type_size
    for start in range(0, rows, rows_per_chunk):
        count = min(rows_per_chunk, rows - start)
        offset = tensor.start + start * bytes_per_row
        chunk = np.frombuffer(gguf.reader[offset:offset + count * bytes_per_row], dtype=np.uint8)
        chunk = chunk.reshape(count, bytes_per_row)
        blocks = chunk.reshape(-1, spec.type_size)
        out[start:start + chunk.shape[0]] = spec.decode(blocks).reshape(chunk.shape[0], columns)
    return out.reshape(tensor.shape)


SUPPORTED_GGUF_TYPES = tuple(name for name, spec in GGUF_TYPES.items() if spec.decode is not None)


# llama.cpp's tensor names → Hugging Face parameter names, for the architectures
# whose HF modules are Llama-shaped.  llama.cpp's converter permutes the rows of
# attn_q / attn_k (its RoPE layout); σ_max and ‖W‖_F are invariant under row
# permutations, so those weights need no un-permuting for norms.
GGUF_LLAMA_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                    "ffn_norm": "post_attention_layernorm", "attn_q_norm": "self_attn.q_norm",
                    "attn_k_norm": "self_attn.k_norm"}
GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}
GGUF_HF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def gguf_hf_name(name: str, architecture: str) -> str:
    """``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight`` for Llama-shaped
    architectures; other architectures keep llama.cpp's names."""
    if architecture not in GGUF_HF_ARCHITECTURES:
        return name
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_LLAMA_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_LLAMA_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[parts[0]]}.{parts[1]}"
    return name


# ══ 3. quantized weights: one table, one small dequantizer per method ═════════
# A quantized checkpoint stores a weight as several tensors (packed codes,
# scales, zero points, a JSON quant state…).  Each method below is a row of
# QUANTIZATIONS: the tensors it needs (by role), a detector that finds its
# weights among the tensor names (plus config.json's quantization_config), and
# a pure function from those tensors to the float32 matrix the library itself
# would dequantize to — including the library's rounding to its output dtype,
# so σ_max matches the library's own dequantization to float precision.  Every
# dequantizer was checked against the owning library on fixtures it wrote
# (tools/make_base_fixtures.py); "source" names the function it reproduces.

class Stored(NamedTuple):
    values: np.ndarray  # float dtypes decoded to float32; integer dtypes as stored (a view)
    dtype: str  # the safetensors dtype name


class StoredWeight(NamedTuple):
    """One logical weight of a base checkpoint, however it is stored."""

    name: str  # the parameter name the model's state_dict uses after loading
    file: str  # the file holding its main tensor
    shape: Tuple[int, ...]  # logical shape after dequantization, as the framework stores it
    storage: str  # "BF16", "bitsandbytes-nf4", "fp8-e4m3-block128", "gguf-Q4_K", …
    method: Optional[str]  # row of QUANTIZATIONS, "gguf", or None for a plain float tensor
    tensors: Dict[str, str]  # role → stored tensor name
    params: Dict[str, Any]  # what the dequantizer needs besides the tensors
    problem: Optional[str] = None  # set when it cannot be dequantized here: no norms, this error


_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values (in place) to the dtype a library hands its result back in,
    in runs of 2^20 values so the temporaries stay small."""
    if dtype not in ("BF16", "F16"):
        return values
    values = np.ascontiguousarray(values)  # so the flat view below writes into it
    flat = values.reshape(-1)
    for start in range(0, flat.size, 1 << 20):
        run = flat[start:start + (1 << 20)]
        if dtype == "BF16":  # round to nearest even on the top 16 bits, as torch's .to(bfloat16)
            bits = run.view(np.uint32)
            bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            bits &= np.uint32(0xFFFF0000)
        else:
            run[...] = run.astype(np.float16)
    return values


def _scale_values(stored: Stored) -> np.ndarray:
    """Scales as float32: E8M0 exponents (U8) are 2^(e − 127); float scales are already decoded."""
    if stored.dtype == "U8":
        return np.ldexp(np.float32(1.0), stored.values.astype(np.int32) - 127).astype(np.float32)
    return np.asarray(stored.values, dtype=np.float32)


def _blockwise_scale(values: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """values (flat, in place) × one scale per run of ``block`` values; the last run may be short."""
    full = values.size // block * block
    values[:full].reshape(-1, block)[...] *= scales[:full // block, None]
    if full < values.size:
        values[full:] *= scales[full // block]
    return values


def _apply_block_scales(values: np.ndarray, scales: np.ndarray, block_rows: int, block_cols: int) -> np.ndarray:
    """values (…, rows, cols), in place, × scales (…, ⌈rows/br⌉, ⌈cols/bc⌉): tile (i, j) covers rows
    br·i … br·i+br−1 and columns bc·j …, truncated at the edges (partial edge blocks)."""
    rows, cols = values.shape[-2:]
    matrices = values.reshape(-1, rows, cols)
    grids = scales.reshape(matrices.shape[0], scales.shape[-2], scales.shape[-1])
    for matrix, grid in zip(matrices, grids):
        for i in range(grid.shape[0]):
            matrix[i * block_rows:(i + 1) * block_rows] *= np.repeat(grid[i], block_cols)[:cols]
    return values


# ── bitsandbytes ──────────────────────────────────────────────────────────────
# bitsandbytes dequantizes 4-bit codes with its built-in tables (get_4bit_type);
# the saved quant_map holds the same 16 numbers and is not read.
BNB_4BIT_CODES = {
    "nf4": np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                     0.7229568362236023, 1.0], dtype=np.float32),
    "fp4": np.array([0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
                     0.1666666716337204, 0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
                     -0.3333333432674408, -0.5, -0.1666666716337204, -0.25], dtype=np.float32),
}
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what dequantize_4bit accepts
BNB_INT8_SCALE = np.float32(7.874015718698502e-3)  # bitsandbytes' 1/127, as a float32


def _decode_byte_pairs(table: np.ndarray, packed: np.ndarray, high_first: bool) -> np.ndarray:
    """Two 4-bit codes per byte → float32 values in storage order (twice as many).  Each
    byte's pair of values is one 8-byte entry of a 256-entry table: one gather per byte."""
    codes = np.arange(256)
    pairs = np.stack([table[codes >> 4], table[codes & 0x0F]] if high_first else
                     [table[codes & 0x0F], table[codes >> 4]], axis=1).astype(np.float32)
    wide = np.take(np.ascontiguousarray(pairs).view(np.uint64).reshape(256), np.ascontiguousarray(packed))
    return wide.view(np.float32).reshape(packed.shape[:-1] + (2 * packed.shape[-1],))


def _bnb_absmax(stored: Dict[str, Stored], params: Dict[str, Any]) -> np.ndarray:
    """Per-block absmax; with double quantization it is itself 8-bit blockwise-quantized
    (codes × nested absmax per block of nested_blocksize, plus the nested offset)."""
    if "nested_absmax" not in stored:
        return _scale_values(stored["absmax"]).ravel()
    codes = stored["absmax"].values.ravel()
    values = _scale_values(stored["nested_quant_map"]).ravel()[codes]
    _blockwise_scale(values, _scale_values(stored["nested_absmax"]).ravel(), params["nested_blocksize"])
    return values + np.float32(params["nested_offset"])


def dequantize_bnb_4bit(stored: Dict[str, Stored], params: Dict[str, Any]) -> np.ndarray:
    """NF4 / FP4: two codes per byte, high nibble first, × the absmax of each block of ``blocksize``
    flattened values, computed in float32 and returned in the quant state's dtype."""
    count, block = math.prod(params["shape"]), params["blocksize"]
    packed = stored["weight"].values.reshape(-1)
    table = BNB_4BIT_CODES[params["quant_type"]]
    absmax = _bnb_absmax(stored, params)
    out = np.empty(count, dtype=np.float32)
    # In runs of 2^21 values (a multiple of every blocksize bitsandbytes allows), so the
    # lookup temporaries stay a few MB however large the weight.
    for start in range(0, count, 1 << 21):
        chunk = out[start:start + (1 << 21)]
        codes = packed[start // 2:(start + chunk.size + 1) // 2]
        chunk[...] = _decode_byte_pairs(table, codes, high_first=True)[:chunk.size]
        _blockwise_scale(chunk, absmax[start // block:], block)
    return _round_to(out, params["dtype"]).reshape(params["shape"])


def dequantize_bnb_int8(stored: Dict[str, Stored], params: Dict[str, Any]) -> np.ndarray:
    """LLM.int8(): int8 rows × SCB (each row's absmax) × 1/127, in float32."""
    out = stored["weight"].values.astype(np.float32)
    out *= _scale_values(stored["SCB"]).reshape(-1, 1)
    out *= BNB_INT8_SCALE
    return out


# ── FP8 with block scales (DeepSeek-V3 / Qwen3-FP8 "fp8" checkpoints) ──────────

def dequantize_fp8_block(stored: Dict[str, Stored], params: Dict[str, Any]) -> np.ndarray:
    """float8 weight × weight_scale_inv per (block_rows × block_cols) tile, in float32."""
    values = stored["weight"].values  # already a fresh float32 decode
    scales = _scale_values(stored["weight_scale_inv"])
    if "block" not in params:  # one scale for the whole tensor
        values *= scales.ravel()[0]
        return values
    return _apply_block_scales(values, scales, *params["block"])


# ── compressed-tensors (llm-compressor exports) ───────────────────────────────
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                 dtype=np.float32)


def _unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """Two e2m1 codes per byte, low nibble first → float32, twice as many columns."""
    return _decode_byte_pairs(_E2M1, packed, high_first=False)


def _unpack_dense(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """compressed-tensors' dense int32 packing: along each row, value i sits at bit i·bits of
    the little-endian word stream (no padding bits).  Returns the signed values."""
    raw = np.ascontiguousarray(words).astype("<i4", copy=False).view(np.uint8).reshape(words.shape[0], -1)
    if bits == 8:
        values = raw
    elif bits == 4:
        values = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(raw.shape[0], -1)
    else:
        stream = np.unpackbits(raw, axis=1, bitorder="little")[:, :count * bits].reshape(raw.shape[0], count, bits)
        values = (stream.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(axis=-1)
    return values[:, :count].astype(np.int32) - (1 << (bits - 1))


def _expand_strategy(scales: np.ndarray, params: Dict[str, Any], shape: Tuple[int, ...]) -> Callable:
    """How one per-tensor / channel / group / block array lines up with the weight."""
    strategy = params["strategy"]
    rows, cols = shape

    def apply(values: np.ndarray, operation: Callable[[np.ndarray, np.ndarray], None]) -> None:
        if strategy == "tensor":
            operation(values, scales.reshape(-1)[:1].reshape(1, 1))
        elif strategy == "channel":
            operation(values, scales.reshape(rows, 1))
        elif strategy in ("group", "tensor_group"):
            size = params["group_size"]
            operation(values.reshape(rows, cols // size, size), scales.reshape(rows, cols // size, 1))
        else:  # block
            block_rows, block_cols = params["block"]
            grid = scales.reshape(-(-rows // block_rows), -(-cols // block_cols))
            for i in range(grid.shape[0]):
                operation(values[i * block_rows:(i + 1) * block_rows], np.repeat(grid[i], block_cols)[None, :cols])
    return apply


def dequantize_compressed_tensors(stored: Dict[str, Stored], params: Dict[str, Any]) -> np.ndarray:
    """(q − zero_point) × scale by the scheme's strategy, then cast to the scale's dtype — the
    order of compressed_tensors.quantization.lifecycle.forward.dequantize."""
    shape, fmt = params["shape"], params["format"]
    out_dtype = stored["weight_scale"].dtype
    scales = _scale_values(stored["weight_scale"])
    if fmt == "pack-quantized":
        values = _unpack_dense(stored["weight_packed"].values, params["num_bits"], shape[1]).astype(np.float32)
    elif fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        values = _unpack_fp4(stored["weight_packed"].values)
        out_dtype = "BF16"  # unpack_fp4_from_uint8 returns bfloat16 and the result keeps it
        if "weight_global_scale" in stored:  # NVFP4: scale / global scale, in float32
            scales = scales / np.float32(_scale_values(stored["weight_global_scale"]).ravel()[0])
    else:  # float-quantized, naive-quantized, int-quantized: one stored value per weight
        values = stored["weight"].values.astype(np.float32)
    apply = _expand_strategy(scales, params, shape)
    if "weight_zero_point" in stored:
        zero_points = stored["weight_zero_point"]
        if fmt == "pack-quantized":  # packed along the output axis
            groups = scales.reshape(shape[0], -1).shape[1]
            zero = _unpack_dense(zero_points.values.T, params["num_bits"], shape[0]).T.reshape(shape[0], groups)
        else:
            zero = zero_points.values
        _expand_strategy(np.asarray(zero, dtype=np.float32), params, shape)(
            values, lambda v, z: np.subtract(v, z, out=v))
    apply(values, lambda v, s: np.multiply(v, s, out=v))
    return _round_to(values, out_dtype)


# ── gpt-oss MXFP4 experts (*_blocks / *_scales) ────────────────────────────────

def dequantize_gpt_oss_mxfp4(stored: Dict[str, Stored], params: Dict[str, Any]) -> np.ndarray:
    """blocks (…, out, G, 16) e2m1 pairs (low nibble first) × 2^(scale − 127) per 32 values,
    returned as GptOssExperts stores the parameter: (…, in, out), in bfloat16."""
    blocks = stored["blocks"].values
    values = _unpack_fp4(blocks)  # (…, out, G, 32)
    values *= np.ldexp(np.float32(1.0), stored["scales"].values.astype(np.int32) - 127).astype(np.float32)[..., None]
    values = _round_to(values, "BF16").reshape(blocks.shape[:-2] + (-1,))
    return np.swapaxes(values, -1, -2)


# ── detectors ─────────────────────────────────────────────────────────────────
# A detector sees the whole tensor index (name → TensorInfo, across shards) and
# the quantization_config, and returns the weights its method stores.

Index = Dict[str, Tuple[str, Any]]  # tensor name → (file, TensorInfo)


def _small_tensor(index: Index, name: str, sources: Dict[str, Any], limit: int = 1 << 16) -> np.ndarray:
    file, info = index[name]
    if info.problem is not None or info.end - info.start > limit:
        raise AdapterFormatError(f"{file}: tensor {name!r} cannot be read as a small parameter tensor")
    return raw_view(sources[file], info)


def _weight(name, file, shape, storage, method, tensors, params, problem=None) -> StoredWeight:
    return StoredWeight(name, file, tuple(int(d) for d in shape), storage, method, tensors, params, problem)


def _detect_bnb_4bit(index: Index, config: Dict[str, Any], sources: Dict[str, Any]) -> List[StoredWeight]:
    found = []
    for state_name in [n for n in index if re.search(r"\.quant_state\.bitsandbytes__(nf4|fp4)$", n)]:
        name = state_name[:state_name.index(".quant_state.")]
        quant_type = state_name.rsplit("__", 1)[1]
        roles = {"weight": name, "quant_state": state_name}
        for role in ("absmax", "nested_absmax", "nested_quant_map", "quant_map"):
            if f"{name}.{role}" in index:
                roles[role] = f"{name}.{role}"
        storage, problem, params = f"bitsandbytes-{quant_type}", None, {}
        try:
            state = json.loads(bytes(_small_tensor(index, state_name, sources)).decode("utf-8"))
            params = {"quant_type": state["quant_type"], "blocksize": int(state["blocksize"]),
                      "dtype": _DTYPE_NAMES[state["dtype"]], "shape": tuple(int(d) for d in state["shape"])}
            if "nested_absmax" in roles:
                params.update(nested_blocksize=int(state["nested_blocksize"]),
                              nested_offset=float(state["nested_offset"]))
        except (AdapterFormatError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            problem = f"bitsandbytes quant state {state_name!r} is unreadable ({type(error).__name__}: {error})"
        if problem is None:
            count = math.prod(params["shape"])
            blocks = -(-count // params["blocksize"])
            sizes = {role: math.prod(index[tensor][1].shape) for role, tensor in roles.items() if tensor in index}
            # bnb_4bit_quant_storage may be any dtype: the codes are its bytes, never its values
            params["bytes_roles"] = ("weight",)
            itemsize = DTYPES[index[name][1].dtype].storage.itemsize if name in index else 0
            if name not in index or sizes["weight"] * itemsize * 2 < count:
                problem = f"bitsandbytes 4-bit weight {name!r} does not hold the {count} codes its quant state says"
            elif "absmax" in roles and sizes["absmax"] != blocks:  # a missing one: see Quantization.needs
                problem = f"bitsandbytes absmax of {name!r} has {sizes.get('absmax')} values, {blocks} expected"
            elif params["quant_type"] != quant_type or params["blocksize"] not in BNB_BLOCKSIZES:
                problem = f"bitsandbytes quant state of {name!r} is inconsistent ({state_name})"
        file = index[name][0] if name in index else index[state_name][0]
        found.append(_weight(name, file, params.get("shape", ()), storage, "bitsandbytes-4bit", roles, params,
                             problem))
    return found


def _detect_bnb_int8(index: Index, config: Dict[str, Any], sources: Dict[str, Any]) -> List[StoredWeight]:
    found = []
    for scb in [n for n in index if n.endswith(".SCB")]:
        module = scb[:-len(".SCB")]
        name = f"{module}.weight"
        roles = {"weight": name, "SCB": scb}
        if f"{module}.weight_format" in index:
            roles["weight_format"] = f"{module}.weight_format"
        info = index[name][1] if name in index else None
        problem = None
        if info is None or info.dtype != "I8" or len(info.shape) != 2:
            problem = f"bitsandbytes int8: {name!r} is not a 2-D I8 tensor next to {scb!r}"
        elif math.prod(index[scb][1].shape) != info.shape[0]:
            problem = f"bitsandbytes int8: {scb!r} has {math.prod(index[scb][1].shape)} row scales for {info.shape[0]} rows"
        found.append(_weight(name, index[scb][0], info.shape if info else (), "bitsandbytes-int8", "bitsandbytes-int8",
                             roles, {}, problem))
    return found


def _fp8_name(dtype: str) -> str:
    return {"F8_E4M3": "e4m3", "F8_E5M2": "e5m2"}.get(dtype, dtype)


def _detect_fp8_block(index: Index, config: Dict[str, Any], sources: Dict[str, Any]) -> List[StoredWeight]:
    found = []
    block = config.get("weight_block_size")
    for scale in [n for n in index if n.endswith(".weight_scale_inv")]:
        name = scale[:-len("_scale_inv")]
        info = index[name][1] if name in index else None
        scale_shape = index[scale][1].shape
        roles = {"weight": name, "weight_scale_inv": scale}
        problem, params, storage = None, {}, "fp8"
        if info is None or info.dtype not in ("F8_E4M3", "F8_E5M2") or len(info.shape) < 2:
            problem = f"FP8: {name!r} is not a float8 matrix next to {scale!r}"
        elif math.prod(scale_shape) == 1 and block is None:
            storage = f"fp8-{_fp8_name(info.dtype)}-tensor"
        elif not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            problem = (f"FP8: {scale!r} has block scales {list(scale_shape)} but config.json's "
                       "quantization_config has no weight_block_size")
        else:
            grid = tuple(-(-d // b) for d, b in zip(info.shape[-2:], block))
            if tuple(scale_shape[-2:]) != grid or tuple(scale_shape[:-2]) != tuple(info.shape[:-2]):
                problem = (f"FP8: {scale!r} is {list(scale_shape)}; a {list(info.shape)} weight in "
                           f"{block[0]}×{block[1]} blocks needs {list(info.shape[:-2]) + list(grid)}")
            params = {"block": tuple(block)}
            square = block[0] == block[1]
            storage = f"fp8-{_fp8_name(info.dtype)}-block{block[0] if square else f'{block[0]}x{block[1]}'}"
        found.append(_weight(name, index[scale][0], info.shape if info else (), storage, "fp8-block", roles, params,
                             problem))
    return found


_CT_ROLES = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale", "weight_shape")
_CT_FORMATS = ("float-quantized", "naive-quantized", "int-quantized", "pack-quantized", "nvfp4-pack-quantized",
               "mxfp4-pack-quantized")


def _ct_scheme(module: str, config: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The config group that quantized ``module``: targets are class names (matching any
    linear layer), ``re:`` regular expressions, or module names."""
    groups = config.get("config_groups") or {}
    matching = []
    for group_name, group in groups.items():
        targets = group.get("targets") or []
        for target in targets:
            if (target.startswith("re:") and re.match(target[3:], module)) or target == module or \
                    (not target.startswith("re:") and "." not in target and target[:1].isupper()):
                matching.append((group_name, group))
                break
    specific = [pair for pair in matching if any(t.startswith("re:") or t == module for t in pair[1]["targets"])]
    chosen = specific or matching
    if len(chosen) != 1:
        return None, (f"compressed-tensors: {len(chosen)} config groups match {module!r} "
                      f"({', '.join(name for name, _ in chosen) or 'none'})")
    return chosen[0][1], None


def _detect_compressed_tensors(index: Index, config: Dict[str, Any], sources: Dict[str, Any]) -> List[StoredWeight]:
    if config.get("quant_method") != "compressed-tensors":
        return []
    found = []
    for scale in [n for n in index if n.endswith(".weight_scale")]:
        module = scale[:-len(".weight_scale")]
        roles = {role: f"{module}.{role}" for role in _CT_ROLES if f"{module}.{role}" in index}
        main = roles.get("weight_packed") or roles.get("weight")
        if main is None:
            continue
        group, problem = _ct_scheme(module, config)
        args = (group or {}).get("weights") or {}
        fmt = (group or {}).get("format") or config.get("format")
        info = index[main][1]
        shape: Tuple[int, ...] = tuple(info.shape)
        params: Dict[str, Any] = {"format": fmt, "strategy": args.get("strategy"), "num_bits": args.get("num_bits"),
                                  "group_size": args.get("group_size"),
                                  "block": tuple(args.get("block_structure") or ()) or None}
        if problem is None and fmt not in _CT_FORMATS:
            problem = f"compressed-tensors format {fmt!r} is not supported (supported: {', '.join(_CT_FORMATS)})"
        if problem is None and params["strategy"] not in ("tensor", "channel", "group", "tensor_group", "block"):
            problem = f"compressed-tensors strategy {params['strategy']!r} is not supported"
        if problem is None and fmt == "pack-quantized":
            try:
                shape = tuple(int(d) for d in _small_tensor(index, roles["weight_shape"], sources))
            except (KeyError, AdapterFormatError):
                problem = f"compressed-tensors: {module}.weight_shape is missing or unreadable"
            if problem is None and not (isinstance(params["num_bits"], int) and 1 <= params["num_bits"] <= 8):
                problem = f"compressed-tensors: num_bits {params['num_bits']!r} cannot be unpacked"
        elif fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
            shape = tuple(info.shape[:-1]) + (2 * info.shape[-1],)
        if problem is None and (len(shape) != 2 or (params["strategy"] in ("group", "tensor_group") and (
                not isinstance(params["group_size"], int) or params["group_size"] <= 0
                or shape[1] % params["group_size"]))):
            problem = f"compressed-tensors: weight {list(shape)} does not fit {params['strategy']} / {params['group_size']}"
        found.append(_weight(f"{module}.weight", index[main][0], shape, f"compressed-tensors-{fmt}",
                             "compressed-tensors", roles, dict(params, shape=shape), problem))
    return found


def _detect_gpt_oss_mxfp4(index: Index, config: Dict[str, Any], sources: Dict[str, Any]) -> List[StoredWeight]:
    found = []
    for blocks in [n for n in index if n.endswith("_blocks") and n[:-len("_blocks")] + "_scales" in index]:
        name = blocks[:-len("_blocks")]
        scales = name + "_scales"
        info, scale_info = index[blocks][1], index[scales][1]
        problem = None
        if info.dtype != "U8" or scale_info.dtype != "U8" or len(info.shape) < 3 or info.shape[-1] != 16 \
                or tuple(info.shape[:-1]) != tuple(scale_info.shape):
            problem = (f"MXFP4: {blocks!r} {info.dtype} {list(info.shape)} and {scales!r} {scale_info.dtype} "
                       f"{list(scale_info.shape)} are not the gpt-oss layout (U8 […, out, G, 16] and […, out, G])")
            shape: Tuple[int, ...] = ()
        else:
            shape = tuple(info.shape[:-3]) + (info.shape[-2] * 32, info.shape[-3])
        found.append(_weight(name, index[blocks][0], shape, "mxfp4-gpt-oss", "mxfp4-gpt-oss",
                             {"blocks": blocks, "scales": scales}, {}, problem))
    return found


def _detect_gptq_awq(index: Index, config: Dict[str, Any], sources: Dict[str, Any]) -> List[StoredWeight]:
    """GPTQ / AWQ int4 (qweight, qzeros, scales, g_idx): no library installable here writes or
    dequantizes them on CPU to check a decoder against, so they are refused by name."""
    found = []
    method = str(config.get("quant_method") or "gptq/awq")
    for qweight in [n for n in index if n.endswith(".qweight")]:
        module = qweight[:-len(".qweight")]
        seen = sorted(n for n in index if n.startswith(module + ".") and n != f"{module}.bias")
        found.append(_weight(f"{module}.weight", index[qweight][0], (), method, None,
                             {n.rsplit(".", 1)[1]: n for n in seen}, {},
                             f"quantized with {method} (tensors seen: {', '.join(n.rsplit('.', 1)[1] for n in seen)}); "
                             "no dequantizer for it here"))
    return found


class Quantization(NamedTuple):
    needs: Tuple[str, ...]  # tensor roles it must have (others optional)
    detect: Callable[[Index, Dict[str, Any], Dict[str, Any]], List[StoredWeight]]
    dequantize: Optional[Callable[[Dict[str, Stored], Dict[str, Any]], np.ndarray]]
    slices_experts: bool  # True: a fused expert slice dequantizes from its own slice of every tensor
    source: str  # the library function this dequantizer reproduces (and was tested against)


QUANTIZATIONS: Dict[str, Quantization] = {
    "bitsandbytes-4bit": Quantization(("weight", "absmax", "quant_state"), _detect_bnb_4bit, dequantize_bnb_4bit,
                                      False, "bitsandbytes 0.50 functional.dequantize_4bit"),
    "bitsandbytes-int8": Quantization(("weight", "SCB"), _detect_bnb_int8, dequantize_bnb_int8, False,
                                      "bitsandbytes 0.50 functional.int8_vectorwise_dequant"),
    "fp8-block": Quantization(("weight", "weight_scale_inv"), _detect_fp8_block, dequantize_fp8_block, True,
                              "transformers 5.24 finegrained_fp8._dequantize_fp8_weight"),
    "compressed-tensors": Quantization(("weight_scale",), _detect_compressed_tensors, dequantize_compressed_tensors,
                                       False, "compressed-tensors 0.20 ModelCompressor.decompress_model"),
    "mxfp4-gpt-oss": Quantization(("blocks", "scales"), _detect_gpt_oss_mxfp4, dequantize_gpt_oss_mxfp4, True,
                                  "transformers 5.24 mxfp4.convert_moe_packed_tensors"),
    "gptq/awq": Quantization(("qweight",), _detect_gptq_awq, None, False, "refused: nothing here to check against"),
}

# Tensor names that only ever accompany a quantized weight: a float tensor next to
# one of these that no detector claimed is not trusted as a plain weight.
_COMPANION = re.compile(r"(\.|_)(SCB|absmax|quant_map|quant_state\..*|weight_scale(_inv)?|weight_zero_point|"
                        r"weight_global_scale|weight_shape|weight_packed|qzeros|scales|g_idx|weight_format)$")


# ══ 4. logical weights of a checkpoint ═══════════════════════════════════════

class Parameter(NamedTuple):
    """What :func:`list_parameters` reports for one logical weight."""

    file: str
    shape: Tuple[int, ...]  # logical shape (after dequantization)
    storage: str  # "BF16", "bitsandbytes-nf4", "gguf-Q4_K", …


class Catalog(NamedTuple):
    sources: Dict[str, Any]  # file → SafetensorsFile or GGUFFile
    index: Index  # safetensors tensor name → (file, TensorInfo)
    weights: Dict[str, StoredWeight]  # logical name → how it is stored


MAX_CONFIG_BYTES = 10 * 1000 * 1000


def quantization_config(checkpoint: BaseCheckpoint) -> Dict[str, Any]:
    """config.json's ``quantization_config`` next to the weights ({} when absent or unreadable)."""
    root = Path(checkpoint.root)
    path = (root if root.is_dir() else root.parent) / "config.json"
    try:
        if path.is_file() and path.stat().st_size <= MAX_CONFIG_BYTES:
            config = json.loads(path.read_text(encoding="utf-8")).get("quantization_config")
            return config if isinstance(config, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        pass
    return {}


def _is_gguf(file: str) -> bool:
    return file.lower().endswith(".gguf")


def _gguf_weights(gguf: GGUFFile) -> List[StoredWeight]:
    architecture = str(gguf.metadata.get("general.architecture", ""))
    found = []
    for tensor in gguf.tensors.values():
        spec = GGUF_TYPES.get(tensor.type_name)
        problem = None
        if spec is None or spec.decode is None:
            problem = (f"GGUF tensor {tensor.name!r} is {tensor.type_name}; no decoder for it here "
                       f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)})")
        found.append(_weight(gguf_hf_name(tensor.name, architecture), gguf.path, tensor.shape,
                             f"gguf-{tensor.type_name}", "gguf", {"weight": tensor.name}, {}, problem))
    return found


def _unclaimed_weights(index: Index, claimed: set, config: Dict[str, Any]) -> List[StoredWeight]:
    """Tensors no quantization claimed: float tensors are plain weights, unless they sit next to
    quantization companions nobody recognised; integer / bool tensors named like weights are
    listed only to be refused (never read as floats)."""
    method = config.get("quant_method")
    modules: Dict[str, List[str]] = {}
    for name in index:
        if name not in claimed:
            modules.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    found = []
    for name, (file, info) in index.items():
        if name in claimed or _COMPANION.search(name):
            continue
        siblings = [n for n in modules.get(name.rsplit(".", 1)[0] if "." in name else "", []) if n != name]
        strays = [n.rsplit(".", 1)[-1] for n in siblings if _COMPANION.search(n)]
        if info.problem is not None:
            found.append(_weight(name, file, info.shape, info.dtype, None, {"weight": name}, {}, info.problem))
        elif DTYPES[info.dtype].is_float and not (strays and name.endswith(".weight")):
            found.append(_weight(name, file, info.shape, info.dtype, None, {"weight": name}, {}))
        elif name.endswith(".weight") or len(info.shape) >= 2:
            seen = ", ".join([name.rsplit(".", 1)[-1]] + strays)
            how = f"quantized with {method}" if method else f"stored as {info.dtype}"
            found.append(_weight(name, file, info.shape, info.dtype, None, {"weight": name}, {},
                                 f"{how} in a layout not recognised here (tensors seen: {seen}); not read as a "
                                 "float weight"))
    return found


def catalog(checkpoint: BaseCheckpoint) -> Catalog:
    """Every logical weight of a checkpoint, from the headers alone (plus small quant-state tensors)."""
    checkpoint = resolve_base(checkpoint)
    config = quantization_config(checkpoint)
    sources: Dict[str, Any] = {}
    index: Index = {}
    weights: Dict[str, StoredWeight] = {}
    for file in checkpoint.files:
        if _is_gguf(file):
            sources[file] = open_gguf(file)
            weights.update((w.name, w) for w in _gguf_weights(sources[file]))
            continue
        sources[file] = open_safetensors(file)
        index.update((name, (file, info)) for name, info in sources[file].tensors.items())
    claimed: set = set()
    for quantization in QUANTIZATIONS.values():
        for weight in quantization.detect(index, config, sources):
            missing = [role for role in quantization.needs if weight.tensors.get(role) not in index]
            if missing and weight.problem is None:
                weight = weight._replace(problem=f"{weight.storage} weight without its {', '.join(missing)} tensor(s)")
            weights[weight.name] = weight
            claimed.update(weight.tensors.values())
    for weight in _unclaimed_weights(index, claimed, config):
        weights.setdefault(weight.name, weight)
    return Catalog(sources, index, weights)


def list_parameters(checkpoint: BaseCheckpoint) -> Dict[str, Parameter]:
    """Logical weight name → Parameter(file, shape, storage), from the headers alone.

    A quantized weight appears once, under the name the model uses for it
    (``model.layers.0.self_attn.q_proj.weight``), with its dequantized shape;
    its companion tensors (absmax, SCB, scales, zero points, quant state…) are
    not listed.  GGUF tensors appear under their Hugging Face names for
    Llama-shaped architectures.

    >>> list_parameters(resolve_base("tests/fixtures/quantized/bnb_nf4"))["model.layers.0.mlp.up_proj.weight"]
    Parameter(file='…/model.safetensors', shape=(192, 128), storage='bitsandbytes-nf4')   # doctest: +SKIP
    """
    return {name: Parameter(w.file, w.shape, w.storage) for name, w in catalog(checkpoint).weights.items()}


def _read_role(found: Catalog, tensor: str, expert: Optional[int], as_bytes: bool = False) -> Stored:
    file, info = found.index[tensor]
    sf = found.sources[file]
    raw = raw_view(sf, info, index=expert)  # one expert's slab only
    if as_bytes:  # packed codes stored under another dtype's name
        values = np.array(raw).reshape(-1).view(np.uint8)
    elif DTYPES[info.dtype].is_float:
        # Decoded in runs: float8's table lookup would otherwise build an int64 index
        # array eight times the weight's size.
        values = np.empty(raw.shape, dtype=np.float32)
        flat, source = values.reshape(-1), np.ascontiguousarray(raw).reshape(-1)
        for start in range(0, flat.size, 1 << 20):
            flat[start:start + (1 << 20)] = decode(source[start:start + (1 << 20)], info.dtype, np.float32)
    else:
        values = np.array(raw)
    release_pages(sf, info)
    return Stored(values, info.dtype)


def load_weight(found: Catalog, weight: StoredWeight, expert: Optional[int] = None) -> np.ndarray:
    """One logical weight (or one expert's slice of a fused 3-D weight) as float32,
    dequantized exactly as the library that wrote it does."""
    if weight.problem is not None:
        raise AdapterFormatError(f"{weight.file}: {weight.name}: {weight.problem}")
    if expert is not None and (len(weight.shape) < 3 or not 0 <= expert < weight.shape[0]):
        raise AdapterFormatError(f"{weight.file}: {weight.name} has shape {list(weight.shape)}; "
                                 f"no expert slice [{expert}] along axis 0")
    if weight.method == "gguf":
        gguf = found.sources[weight.file]
        values = gguf_matrix(gguf, gguf.tensors[weight.tensors["weight"]])
        return values if expert is None else values[expert]
    quantization = QUANTIZATIONS.get(weight.method) if weight.method else None
    sliced = expert is not None and (quantization is None or quantization.slices_experts)
    as_bytes = weight.params.get("bytes_roles", ())
    stored = {role: _read_role(found, tensor, expert if sliced else None, role in as_bytes)
              for role, tensor in weight.tensors.items() if role != "quant_state"}
    if quantization is None:
        values = stored["weight"].values
    else:
        try:
            values = quantization.dequantize(stored, weight.params)
        except (ValueError, IndexError) as error:  # companions whose sizes disagree with each other
            raise AdapterFormatError(f"{weight.file}: {weight.name}: its {weight.storage} tensors do not fit "
                                     f"together ({error})") from None
    return values if expert is None or sliced else values[expert]


_EXPERT = re.compile(r"^(.*)\[(\d+)\]$")


def split_expert(name: str) -> Tuple[str, Optional[int]]:
    """``…experts.gate_up_proj[3]`` → (``…experts.gate_up_proj``, 3); other names → (name, None)."""
    match = _EXPERT.match(name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


# ══ 5. σ_max by Golub–Kahan–Lanczos bidiagonalisation ════════════════════════
# Power iteration converges like (σ₂/σ₁)^k, hopeless when σ₁ ≈ σ₂ (20 steps
# were 2.2 % low on a Gaussian matrix).  Lanczos bidiagonalisation builds the
# same Krylov space but extracts the best estimate from all of it, converging
# like a Chebyshev polynomial in the gap: a few tens of mat-vec pairs suffice.
# Full reorthogonalisation (vectors kept in float64, k × (m+n) numbers) keeps
# it stable; the mat-vecs themselves run in float32 over the weight.


class SpectralNorm(NamedTuple):
    sigma_max: float
    iterations: int  # mat-vec pairs (one A·v and one Aᵀ·u each)
    converged: bool


def _orthogonalise(vector: np.ndarray, basis: np.ndarray) -> np.ndarray:
    # Classical Gram–Schmidt twice ("twice is enough") against the kept basis.
    for _ in range(2):
        vector = vector - basis.T @ (basis @ vector)
    return vector


def _converged(residual: float, ritz_values: np.ndarray, tol: float) -> bool:
    """Is the top Ritz value within tol (relative) of σ_max?

    A residual ρ puts a singular value within ρ of θ; near convergence the
    error is in fact about ρ²/gap (the gap to the next singular value, here
    estimated by the next Ritz value).  Requiring ρ²/gap ≤ tol·θ and, as a
    guard while the gap estimate is still rough, ρ ≤ √tol·θ stops 15–30 %
    sooner than ρ ≤ tol·θ; on every test spectrum the error at the stop was
    ≤ 6e-8 (relative) for tol = 1e-6.
    """
    theta = float(ritz_values[0])
    if residual <= tol * theta:
        return True
    if ritz_values.size < 2 or residual > math.sqrt(tol) * theta:
        return False
    gap = theta - float(ritz_values[1])
    return gap > 0 and residual * residual / gap <= tol * theta


def spectral_norm(matrix: Any, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                  seed: int = DEFAULT_SEED) -> SpectralNorm:
    """Largest singular value of a 2-D array, or of an operator: any object with
    ``.shape`` (rows, cols), ``.matvec(x)`` (A·x) and ``.rmatvec(y)`` (Aᵀ·y) — e.g. an
    update that is never formed densely (DoRA's effective ΔW).

    Converged means the top Ritz value θ is within ``tol`` (relative) of σ_max
    by its residual (see :func:`_converged`).  A test on successive estimates
    alone stops on the plateaus Lanczos shows when σ₁ ≈ σ₂ (7.7e-5 low in our
    tests).  Deterministic for a given ``seed``.

    >>> m = np.diag([3.0, 2.0, 1.0]).astype(np.float32)
    >>> round(spectral_norm(m).sigma_max, 6)
    3.0
    """
    rows, cols = matrix.shape
    if rows == 0 or cols == 0:
        return SpectralNorm(0.0, 0, True)
    steps = min(max_iter, rows, cols)
    right = np.zeros((steps + 1, cols))
    left = np.zeros((steps + 1, rows))
    alphas: List[float] = []
    betas: List[float] = []
    if hasattr(matrix, "matvec") and hasattr(matrix, "rmatvec"):
        def times(vector):  # the operator's own precision, float64 result
            return np.asarray(matrix.matvec(vector), dtype=np.float64).reshape(rows)

        def times_transposed(vector):
            return np.asarray(matrix.rmatvec(vector), dtype=np.float64).reshape(cols)
    else:
        operator = matrix if matrix.dtype == np.float32 else matrix.astype(np.float32)

        def times(vector):  # float32 mat-vec, float64 result
            return (operator @ vector.astype(np.float32)).astype(np.float64)

        def times_transposed(vector):
            return (operator.T @ vector.astype(np.float32)).astype(np.float64)

    start = np.random.default_rng(seed).standard_normal(cols)
    right[0] = start / np.linalg.norm(start)
    u = times(right[0])
    alphas.append(float(np.linalg.norm(u)))
    if alphas[0] == 0.0:
        return SpectralNorm(0.0, 1, True)  # a random vector in the null space: the matrix is zero
    left[0] = u / alphas[0]
    estimate = alphas[0]
    for k in range(steps):
        # After step k: A·V_{k+1} = U_{k+1}·C_k + α_{k+1}·u_{k+1}·e_{k+1}ᵀ, where C_k is the
        # (k+1)×(k+2) upper bidiagonal of α's and β's; its σ_max is the Ritz estimate.
        w = _orthogonalise(times_transposed(left[k]) - alphas[k] * right[k], right[:k + 1])
        beta = float(np.linalg.norm(w))
        if beta <= 1e-13 * estimate:  # Aᵀ·U_k ⊂ span(V_k): the square bidiagonal is exact
            estimate = float(np.linalg.svd(np.diag(alphas) + np.diag(betas, 1), compute_uv=False)[0])
            return SpectralNorm(estimate, k + 1, True)
        betas.append(beta)
        right[k + 1] = w / beta
        u = _orthogonalise(times(right[k + 1]) - beta * left[k], left[:k + 1])
        alpha = float(np.linalg.norm(u))
        bidiagonal = np.zeros((k + 1, k + 2))
        bidiagonal[np.arange(k + 1), np.arange(k + 1)] = alphas
        bidiagonal[np.arange(k + 1), np.arange(1, k + 2)] = betas
        _, sigma, right_vectors = np.linalg.svd(bidiagonal)
        estimate = float(sigma[0])
        residual = alpha * abs(right_vectors[0, -1])  # ‖A·v − θ·u‖ for the top Ritz triplet
        if alpha <= 1e-13 * estimate or _converged(residual, sigma, tol):
            return SpectralNorm(estimate, k + 1, True)
        alphas.append(alpha)
        left[k + 1] = u / alpha
    # With steps = min(m, n) the whole space was spanned: the estimate is exact.
    return SpectralNorm(estimate, steps, steps == min(rows, cols))


def frobenius_norm(matrix: np.ndarray, block_rows: Optional[int] = None) -> float:
    """‖W‖_F accumulated in float64, in row blocks of about 64K elements: no
    full-size float64 copy, and each block's float64 copy stays in cache."""
    total = 0.0
    block_rows = block_rows or max(1, 65536 // max(matrix.shape[1], 1))
    for start in range(0, matrix.shape[0], block_rows):
        block = matrix[start:start + block_rows].astype(np.float64).ravel()
        total += float(np.dot(block, block))
    return math.sqrt(total)


# ══ 6. norms of one weight ═══════════════════════════════════════════════════

def as_matrix(values: np.ndarray) -> Optional[np.ndarray]:
    """Conv kernels flatten to (out, in·∏k); 1-D tensors (biases, norms) have no σ_max."""
    if values.ndim < 2:
        return None
    return values.reshape(values.shape[0], -1)


def matrix_norms(values: np.ndarray, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                 seed: int = DEFAULT_SEED) -> Dict[str, Any]:
    """σ_max and ‖W‖_F of one dequantized weight (raises AdapterFormatError for 1-D or NaN/Inf)."""
    matrix = as_matrix(values)
    if matrix is None:
        raise AdapterFormatError(f"is {values.ndim}-D; no spectral norm")
    fro_norm = frobenius_norm(matrix)
    if not math.isfinite(fro_norm):  # float32 squares cannot overflow float64: a NaN/Inf is present
        raise AdapterFormatError("contains NaN/Inf")
    result = spectral_norm(matrix, tol=tol, max_iter=max_iter, seed=seed)
    return {"sigma_max": result.sigma_max, "fro_norm": fro_norm, "iterations": result.iterations,
            "converged": result.converged}


def weight_norms(found: Catalog, name: str, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                 seed: int = DEFAULT_SEED) -> Dict[str, Any]:
    """The norms record of one logical weight, or of ``name[e]``: expert e of a fused 3-D weight.

    The record carries ``shape`` (the logical shape as the framework stores it after
    dequantization; for ``name[e]`` the slice's) and ``storage``.
    """
    logical, expert = split_expert(name)
    weight = found.weights[logical]
    values = load_weight(found, weight, expert)
    try:
        record = matrix_norms(values, tol=tol, max_iter=max_iter, seed=seed)
    except AdapterFormatError as error:
        raise AdapterFormatError(f"{weight.file}: {name} {error}") from None
    if weight.method == "gguf":
        dtype = found.sources[weight.file].tensors[weight.tensors["weight"]].type_name
    else:
        main = found.index.get(weight.tensors.get("weight") or next(iter(weight.tensors.values()), ""))
        dtype = main[1].dtype if main else weight.storage
    return dict(record, shape=list(values.shape), storage=weight.storage, dtype=dtype,
                file=os.path.basename(weight.file))


def tensor_norms(sf: SafetensorsFile, name: str, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                 seed: int = DEFAULT_SEED) -> Dict[str, Any]:
    """The norms record of one plain tensor of an open safetensors file."""
    info = sf.tensors[name]
    values = decode(raw_view(sf, info), info.dtype, np.float32)
    release_pages(sf, info)
    try:
        record = matrix_norms(values, tol=tol, max_iter=max_iter, seed=seed)
    except AdapterFormatError as error:
        raise AdapterFormatError(f"{sf.path}: tensor {name!r} {error}") from None
    return dict(record, shape=list(info.shape), storage=info.dtype, dtype=info.dtype)


def _stored_bytes(found: Catalog, weight: StoredWeight) -> int:
    if weight.method == "gguf":
        tensor = found.sources[weight.file].tensors[weight.tensors["weight"]]
        return tensor.end - tensor.start
    return sum(found.index[t][1].end - found.index[t][1].start for t in weight.tensors.values() if t in found.index)


def compute_base_norms(base: str | os.PathLike, names: Optional[Iterable[str]] = None, *,
                       only: Optional[str] = None, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                       seed: int = DEFAULT_SEED, existing: Optional[Dict[str, Any]] = None,
                       progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Norms of a base checkpoint's weights, as a norms document (see :func:`save_norms`).

    ``names`` limits the work to those logical weights (e.g. the ones an adapter
    touches); ``name[e]`` asks for expert e of a fused 3-D weight (its slice along
    axis 0).  ``only`` is a regular expression over names.  Quantized weights are
    dequantized as their library does; a weight that cannot be (unsupported
    method, damaged layout) gets an entry under ``errors`` naming the method and
    the tensors seen.  Records in ``existing`` (a loaded norms document for the
    same base) are reused while the fingerprint of their source file is unchanged.

    >>> doc = compute_base_norms("tests/fixtures/quantized/bnb_nf4", ["model.layers.0.mlp.up_proj.weight"])  # doctest: +SKIP
    >>> doc["norms"]["model.layers.0.mlp.up_proj.weight"]["storage"]                                       # doctest: +SKIP
    'bitsandbytes-nf4'
    """
    checkpoint = resolve_base(base)
    found = catalog(checkpoint)
    pattern = re.compile(only) if only else None
    previous = (existing or {}).get("norms", {})
    previous_files = (existing or {}).get("files", {})
    files: Dict[str, Dict[str, Any]] = {}
    for file, source in found.sources.items():
        files[os.path.basename(file)] = fingerprint(source)
    stale = sorted(key for key in files if key in previous_files and previous_files[key] != files[key])
    if names is None:
        wanted = sorted(name for name, weight in found.weights.items()
                        if len(weight.shape) >= 2 or weight.problem is not None)
    else:
        wanted = sorted(set(names))
    norms: Dict[str, Dict[str, Any]] = {}
    errors: Dict[str, str] = {}
    plan: List[Tuple[str, StoredWeight]] = []
    for name in wanted:
        if pattern and not pattern.search(name):
            continue
        weight = found.weights.get(split_expert(name)[0])
        if weight is None:
            errors[name] = "not found in the base checkpoint"
            continue
        key = os.path.basename(weight.file)
        record = previous.get(name)
        if record is not None and key in previous_files and previous_files[key] == files[key] \
                and record.get("file") == key:
            norms[name] = record
        elif weight.problem is not None:
            errors[name] = f"{weight.problem} [{weight.storage}]"
        else:
            plan.append((name, weight))
    total_bytes = sum(_stored_bytes(found, weight) for _, weight in plan)
    done_bytes, started, last_report = 0, time.perf_counter(), time.perf_counter()
    for index, (name, weight) in enumerate(plan, 1):
        try:
            norms[name] = weight_norms(found, name, tol=tol, max_iter=max_iter, seed=seed)
        except AdapterFormatError as error:
            errors[name] = str(error)
        done_bytes += _stored_bytes(found, weight)
        now = time.perf_counter()
        # Report about once a second: long runs show progress, short ones stay quiet.
        if progress is not None and (now - last_report >= 1.0 or (index == len(plan) and now - started >= 1.0)):
            last_report = now
            elapsed = now - started
            eta = elapsed / done_bytes * (total_bytes - done_bytes) if done_bytes else 0.0
            progress(f"base norms: tensor {index}/{len(plan)} {name} "
                     f"({done_bytes / 2**20:.0f}/{total_bytes / 2**20:.0f} MiB, ETA {eta:.0f}s)")
    return {"format": NORMS_FORMAT, "base": checkpoint.source, "base_path": checkpoint.root, "files": files,
            "method": METHOD, "tol": tol, "max_iter": max_iter, "seed": seed, "norms": norms, "errors": errors,
            "stale_files": stale}


# ══ 7. norms files ═══════════════════════════════════════════════════════════

class NormsFileError(AdapterFormatError):
    """A norms file that cannot be trusted (corrupted, unknown layout)."""


class StaleNormsError(NormsFileError):
    """A norms file in a format whose numbers are known to be unreliable: recompute it."""


def _normalise_upstream(document: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Upstream gradience writes ``{module: {sigma_max, fro_norm}}`` or
    ``{model_id, base_norms: {module: {base_sigma_max, base_fro_norm}}}``."""
    if isinstance(document.get("base_norms"), dict):
        entries = {name: {"sigma_max": row.get("base_sigma_max"), "fro_norm": row.get("base_fro_norm")}
                   for name, row in document["base_norms"].items() if isinstance(row, dict)}
        base = document.get("model_id")
    else:
        entries = {name: {"sigma_max": row.get("sigma_max"), "fro_norm": row.get("fro_norm")}
                   for name, row in document.items() if isinstance(row, dict)}
        base = None
    if not entries:
        raise NormsFileError(f"{path}: not a norms file (no norms entries found)")
    return {"format": "upstream", "base": base, "files": {}, "norms": entries, "errors": {}}


def _valid_record(record: Any) -> bool:
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return isinstance(record, dict) and number(record.get("sigma_max")) and number(record.get("fro_norm"))


def load_norms(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a norms file (ours or upstream gradience's), validating every record.

    Raises :class:`NormsFileError` for a file that is not valid JSON or has no
    usable records; records with missing or non-finite numbers are dropped and
    listed under ``errors``.
    """
    path = str(path)
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise NormsFileError(f"{path}: cannot read norms file ({error.strerror or error})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise NormsFileError(f"{path}: norms file is corrupted ({type(error).__name__}: {error})") from None
    if not isinstance(document, dict):
        raise NormsFileError(f"{path}: norms file is not a JSON object")
    if document.get("format") in STALE_FORMATS:
        raise StaleNormsError(f"{path}: norms file format {document['format']!r} is stale: "
                              f"{STALE_FORMATS[document['format']]}; not used (recomputed when a base is given)")
    if document.get("format") != NORMS_FORMAT:
        document = _normalise_upstream(document, path)
    norms = document.get("norms")
    if not isinstance(norms, dict) or not isinstance(document.get("files", {}), dict):
        raise NormsFileError(f"{path}: norms file has no valid 'norms' object")
    # A hostile or damaged file may hold any JSON here ("errors": "ab" would
    # make dict() raise): only a mapping is read.
    errors = document.get("errors")
    errors = {str(k): str(v) for k, v in errors.items()} if isinstance(errors, dict) else {}
    document["norms"] = {}
    for name, record in norms.items():
        if _valid_record(record):
            document["norms"][name] = record
        else:
            errors[name] = f"invalid record in {path}"
    document["errors"] = errors
    return document


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def save_norms(path: str | os.PathLike, document: Dict[str, Any]) -> None:
    """Write a norms document atomically (temp file in the same folder + rename),
    so concurrent writers and crashes never leave a torn file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        # mkstemp creates 0600; a norms file is ordinary output, so give it the
        # permissions open() would have (0666 less the process umask).
        os.chmod(temp, 0o666 & ~_umask())
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(json_safe(document), stream, indent=1, sort_keys=True, allow_nan=False)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def merge_norms(older: Optional[Dict[str, Any]], newer: Dict[str, Any]) -> Dict[str, Any]:
    """``newer`` extended with the records of ``older`` that are still valid: same base
    and an unchanged fingerprint of the file each record came from."""
    merged = dict(newer, norms=dict(newer["norms"]))
    merged.pop("stale_files", None)
    if not older or older.get("format") != NORMS_FORMAT:
        return merged
    for name, record in older["norms"].items():
        source = record.get("file")
        if name not in merged["norms"] and source in merged["files"] and \
                older.get("files", {}).get(source) == merged["files"][source]:
            merged["norms"][name] = record
    return merged


def update_cache(path: str | os.PathLike, computed: Dict[str, Any]) -> None:
    """Extend a norms cache in place with freshly computed records.

    The file is re-read just before the atomic replace, so concurrent audits
    sharing one cache lose at most each other's very latest records, never the
    file's integrity.  A corrupted cache is simply replaced.
    """
    try:
        current = load_norms(path) if Path(path).exists() else None
    except NormsFileError:
        current = None
    save_norms(path, merge_norms(current, computed))


# ══ 8. CLI ═══════════════════════════════════════════════════════════════════

def main(argv: Optional[Sequence[str]] = None, prog: str = "base_norms") -> int:
    """``python -m base_norms BASE --out norms.json [--only REGEX] [--tol 1e-6] [--quiet]``

    ``prog`` names the command in usage and error lines (``gradience-lite norms`` when run from there)."""
    parser = argparse.ArgumentParser(prog=prog, description="σ_max and ‖W‖_F of a base model's weights.")
    parser.add_argument("base", help="model directory, .safetensors file, or hub id (resolved offline)")
    parser.add_argument("--out", required=True, help="norms file to write (extended in place if it exists)")
    parser.add_argument("--only", help="regular expression: only parameters whose name matches")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="relative tolerance on σ_max (default 1e-6)")
    parser.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER, help="iteration cap per tensor")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.tol) and args.tol > 0):
        parser.error(f"--tol must be a positive number, not {args.tol}")
    if args.max_iter < 1:
        parser.error(f"--max-iter must be >= 1, not {args.max_iter}")
    if not Path(args.out).resolve().parent.is_dir():  # as gradience-lite refuses a --base-norms-cache there
        parser.error(f"--out {args.out}: its directory {Path(args.out).resolve().parent} does not exist")
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr))
    try:
        if args.only:
            re.compile(args.only)
        existing = None
        if Path(args.out).exists():
            try:
                existing = load_norms(args.out)
            except NormsFileError as error:
                print(f"{prog}: {error}; recomputing", file=sys.stderr)
        document = compute_base_norms(args.base, only=args.only, tol=args.tol, max_iter=args.max_iter,
                                      existing=existing, progress=log)
        document = merge_norms(existing, document)
        save_norms(args.out, document)
    except (AdapterFormatError, re.error) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    unconverged = [name for name, record in document["norms"].items() if not record.get("converged", True)]
    print(f"wrote {len(document['norms'])} norms to {args.out}"
          + (f"; {len(unconverged)} did not converge" if unconverged else "")
          + (f"; {len(document['errors'])} errors" if document["errors"] else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
