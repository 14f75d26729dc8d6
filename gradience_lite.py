"""gradience_lite: a pure-NumPy auditor for LoRA adapters.

Reads a PEFT adapter (``adapter_model.safetensors`` + ``adapter_config.json``)
straight from its bytes and reports, per adapted module, the spectrum of the
update ΔW = s·B·A without ever forming ΔW: every number comes from r×r problems
in float64.  No torch, no transformers, nothing is unpickled.

The module reads top to bottom in the order data flows:

    1. safetensors bytes  → tensor records and decoded float arrays
    2. adapter files      → which weights / config / named adapter to read
    3. config             → r, alpha, rsLoRA, rank/alpha patterns; kohya and MLX scale rules;
                            every LoraConfig field and what it does to ΔW;
                            PEFT's tuners (LoHa, LoKr, AdaLoRA, VeRA) and the PEFT types refused
    4. keys               → module records for PEFT, diffusers, kohya, LyCORIS, MLX-LM; the LoraConfig
                            fields that change how factors combine (KaSA, BD-LoRA, MoE experts)
    5. low-rank spectra   → singular values of B·A from r×r problems
    6. audit              → tensors from any framework; per-module records (LoRA, LoHa, LoKr, AdaLoRA, VeRA),
                            summaries, UDR
   6b. rank advice        → per-module rank policies (energy@P, knee, erank, oht, stable), suggested config
    7. reports            → JSON contract, text report, HTML report
    8. compare            → two adapters side by side; drift over checkpoints
   8b. resize             → the exact rank-k truncation of every module, written as a new adapter
    9. CLI                → ``python -m gradience_lite audit|compare|resize …``

Quick use::

    >>> from gradience_lite import audit_lora_peft_dir
    >>> result = audit_lora_peft_dir("examples/tiny_adapter")      # doctest: +SKIP
    >>> result.to_summary_dict()["utilization_mean"]                 # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import gc
import hashlib
import html
import json
import io
import itertools
import math
import os
import re
import signal
import shlex
import stat
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "AdapterFormatError",
    "AuditResult",
    "ModuleAudit",
    "append_metrics_event",
    "attach_udr",
    "audit_lora_peft_dir",
    "audit_lora_state_dict",
    "batch_audit_line",
    "compare_adapters",
    "fail_on_reasons",
    "lowrank_singular_values",
    "main",
    "open_safetensors",
    "read_tensor",
    "render_html_report",
    "render_text_report",
    "spectrum_metrics",
    "training_drift",
]

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it (dynamic)
SCHEMA_VERSION = "gradience_lite.audit/1"
TELEMETRY_SCHEMA = "gradience.vnext.telemetry/v1"
UDR_EPS = 1e-12


class AdapterFormatError(ValueError):
    """The adapter (or a file it needs) cannot be read at all.

    The message is one line that names the file and the problem; the CLI prints
    it and exits with code 2.  Damage confined to one module is not an
    exception: it becomes an entry in the audit's ``issues``.
    """


# ══ 1. safetensors: bytes → tensors ══════════════════════════════════════════
# Format: 8-byte little-endian header length N, N bytes of JSON header, then the
# data section.  Each header entry is {"dtype", "shape", "data_offsets": [a, b]}
# with offsets relative to the start of the data section.

MAX_HEADER_BYTES = 100 * 1000 * 1000  # the reference implementation's own bound
# A dimension beyond 2**40 cannot describe a real tensor; refusing it up front
# keeps every later product of dimensions a sane Python int.
MAX_DIMENSION = 1 << 40
MAX_EMPTY_EXTENT = 1 << 24  # widest empty tensor: more than any layer's width (see _parse_shape)
# Real tensors have at most 5 axes (conv3d kernels); NumPy refuses more than 32.
MAX_NDIM = 8
# Entries per header.  The largest real files stay far below (a 70B all-linear
# adapter has 1,120 tensors, a LyCORIS full SDXL file ~10k, a base shard a few
# thousand); each entry costs ~1 KB of Python objects, so the cap keeps a
# header's records under ~100 MB however the header is crafted.
MAX_HEADER_ENTRIES = 100_000


def _decode_bf16(raw: np.ndarray, out: np.ndarray) -> None:
    # bfloat16 is the top half of an IEEE float32: shift the bits into place,
    # widening straight into the float32 output (no uint32 temporary).  The loop
    # dtype is named: NumPy 1.x's value-based casting would otherwise demote the
    # scalar 16 to uint16 and shift every value out of its 16 bits (all zeros).
    np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)


@functools.lru_cache(maxsize=None)
def _float8_table(exponent_bits: int, mantissa_bits: int, finite_only: bool) -> np.ndarray:
    """All 256 values of an 8-bit float format, as float32.

    ``finite_only`` is the "fn" variant (E4M3FN): no infinities, and only the
    all-ones pattern S.1111.111 is NaN.  Otherwise IEEE rules (E5M2).
    """
    bias = (1 << (exponent_bits - 1)) - 1
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exponent = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = codes & ((1 << mantissa_bits) - 1)
    fraction = mantissa / float(1 << mantissa_bits)
    normal = sign * (1.0 + fraction) * np.exp2(exponent - bias)
    subnormal = sign * fraction * np.exp2(1 - bias)
    values = np.where(exponent == 0, subnormal, normal)
    max_exponent = (1 << exponent_bits) - 1
    if finite_only:
        values[(exponent == max_exponent) & (mantissa == (1 << mantissa_bits) - 1)] = np.nan
    else:
        top = exponent == max_exponent
        values[top & (mantissa == 0)] = sign[top & (mantissa == 0)] * np.inf
        values[top & (mantissa != 0)] = np.nan
    return values.astype(np.float32)


def _decode_f8_e4m3(raw: np.ndarray, out: np.ndarray) -> None:
    np.take(_float8_table(4, 3, True), raw, out=out)


def _decode_f8_e5m2(raw: np.ndarray, out: np.ndarray) -> None:
    np.take(_float8_table(5, 2, False), raw, out=out)


class DType(NamedTuple):
    storage: np.dtype  # how the bytes are laid out (little-endian)
    is_float: bool
    decode: Optional[Callable[[np.ndarray, np.ndarray], None]]  # storage → float32 out, for non-NumPy floats


# The one table of on-disk dtypes.  Formats NumPy lacks are stored as unsigned
# integers of the same width and decoded in one place.
DTYPES: Dict[str, DType] = {
    "F64": DType(np.dtype("<f8"), True, None),
    "F32": DType(np.dtype("<f4"), True, None),
    "F16": DType(np.dtype("<f2"), True, None),
    "BF16": DType(np.dtype("<u2"), True, _decode_bf16),
    "F8_E4M3": DType(np.dtype("u1"), True, _decode_f8_e4m3),
    "F8_E5M2": DType(np.dtype("u1"), True, _decode_f8_e5m2),
    "I64": DType(np.dtype("<i8"), False, None),
    "I32": DType(np.dtype("<i4"), False, None),
    "I16": DType(np.dtype("<i2"), False, None),
    "I8": DType(np.dtype("i1"), False, None),
    "U64": DType(np.dtype("<u8"), False, None),
    "U32": DType(np.dtype("<u4"), False, None),
    "U16": DType(np.dtype("<u2"), False, None),
    "U8": DType(np.dtype("u1"), False, None),
    "BOOL": DType(np.dtype("?"), False, None),
}


class TensorInfo(NamedTuple):
    """One header entry.  ``start``/``end`` are absolute file offsets.

    ``problem`` is set when the entry is damaged in a way confined to this
    tensor (unknown dtype, impossible shape, bytes shared with another tensor):
    the file stays readable, this tensor does not.
    """

    name: str
    dtype: str
    shape: Tuple[int, ...]
    start: int
    end: int
    problem: Optional[str] = None


class SafetensorsFile(NamedTuple):
    """An open safetensors file: header records plus a handle for positional reads.

    Tensors are read with ``pread`` rather than a memory mapping: a file that
    another process truncates while we read it then gives a short read (a
    clean error naming the file) instead of SIGBUS killing the process.
    """

    path: str
    tensors: Dict[str, TensorInfo]
    metadata: Dict[str, str]
    header_sha256: str
    file_size: int
    handle: Optional[io.FileIO]  # None for a file with an empty data section


def _reject_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    seen: Dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in header")
        seen[key] = value
    return seen


def _parse_shape(raw_shape: Any) -> Tuple[Optional[Tuple[int, ...]], Optional[str]]:
    if not isinstance(raw_shape, list) or not all(type(d) is int for d in raw_shape):
        return None, f"shape {raw_shape!r} is not a list of integers"
    if any(d < 0 for d in raw_shape):
        return None, f"shape {raw_shape} has a negative dimension"
    if any(d > MAX_DIMENSION for d in raw_shape):
        return None, f"shape {raw_shape} is absurd (a dimension above 2**40)"
    if len(raw_shape) > MAX_NDIM:
        return None, f"shape has {len(raw_shape)} axes, over the MAX_NDIM cap ({MAX_NDIM})"
    # A zero axis makes a tensor empty, but NumPy still refuses to shape an
    # empty array whose other axes multiply past its index range.
    extent = math.prod(max(d, 1) for d in raw_shape)
    if extent > MAX_DIMENSION:
        return None, f"shape {raw_shape} is absurd (its non-zero axes multiply past 2**40)"
    # NumPy 1.x allocates an empty array's storage as if its zero axes were 1
    # (np.empty((2**31, 0)) asks for 8 GiB), and no real empty factor is that
    # wide: a rank-0 LoRA factor spans one layer's width.
    if 0 in raw_shape and extent > MAX_EMPTY_EXTENT:
        return None, (f"shape {raw_shape} is absurd: an empty tensor whose other axes span over "
                      f"{MAX_EMPTY_EXTENT} (the MAX_EMPTY_EXTENT cap)")
    return tuple(raw_shape), None


def _parse_header(path: str, header: Dict[str, Any], data_start: int, data_size: int) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Validate every entry; file-level damage raises, tensor-level damage is recorded."""
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterFormatError(f"{path}: __metadata__ is not an object")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}

    if len(header) > MAX_HEADER_ENTRIES:
        raise AdapterFormatError(f"{path}: header has {len(header)} entries, over the MAX_HEADER_ENTRIES cap "
                                 f"({MAX_HEADER_ENTRIES})")
    tensors: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or "data_offsets" not in entry:
            raise AdapterFormatError(f"{path}: header entry {name!r} is not a tensor description")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or offsets[0] < 0 or offsets[1] < offsets[0]):
            raise AdapterFormatError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        if offsets[1] > data_size:
            raise AdapterFormatError(
                f"{path}: tensor {name!r} ends at byte {offsets[1]} of a {data_size}-byte data section "
                "(the file is truncated or its header lies)")
        start, end = data_start + offsets[0], data_start + offsets[1]
        dtype_name = entry.get("dtype")
        shape, problem = _parse_shape(entry.get("shape"))
        if problem is None and (not isinstance(dtype_name, str) or dtype_name not in DTYPES):
            problem = f"unknown dtype {dtype_name!r}"
        if problem is None:
            expected = math.prod(shape) * DTYPES[dtype_name].storage.itemsize
            if expected > data_size:
                problem = f"shape {list(shape)} needs {expected} bytes, more than the whole data section ({data_size})"
            elif expected != end - start:
                raise AdapterFormatError(
                    f"{path}: tensor {name!r} has {end - start} bytes but shape {list(shape)} x {dtype_name} needs {expected}")
        tensors[name] = TensorInfo(name, str(dtype_name), shape or (), start, end, problem)
    return _flag_overlaps(tensors), metadata


def _flag_overlaps(tensors: Dict[str, TensorInfo]) -> Dict[str, TensorInfo]:
    # Two tensors sharing bytes means at least one of them is not what the
    # header says; neither is trusted.
    ordered = sorted((t for t in tensors.values() if t.end > t.start), key=lambda t: (t.start, t.end))
    flagged = dict(tensors)
    furthest: Optional[TensorInfo] = None
    for info in ordered:
        if furthest is not None and info.start < furthest.end:
            for victim, other in ((info, furthest), (furthest, info)):
                if flagged[victim.name].problem is None:
                    flagged[victim.name] = victim._replace(problem=f"its bytes overlap tensor {other.name!r}")
        if furthest is None or info.end > furthest.end:
            furthest = info
    return flagged


def _header_json(path: str, header_bytes: bytes) -> Dict[str, Any]:
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except UnicodeDecodeError:
        raise AdapterFormatError(f"{path}: header is not UTF-8 text") from None
    except RecursionError:
        raise AdapterFormatError(f"{path}: header JSON is nested too deeply") from None
    except ValueError as error:  # json.JSONDecodeError and duplicate keys
        raise AdapterFormatError(f"{path}: header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    return header


def open_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    """Validate a safetensors header and keep the file open for positional reads.

    Nothing but the header is read; tensors are decoded on demand with
    :func:`read_tensor`.  Raises :class:`AdapterFormatError` with a one-line
    message naming the file and the problem when the file cannot be read.

    >>> sf = open_safetensors("adapter_model.safetensors")          # doctest: +SKIP
    >>> sorted(sf.tensors)[:1]                                       # doctest: +SKIP
    ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight']
    """
    path = str(path)
    handle = None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise AdapterFormatError(f"{path}: not a regular file")
        handle = open(path, "rb", buffering=0)
        file_size = os.fstat(handle.fileno()).st_size
        if file_size < 8:
            raise AdapterFormatError(f"{path}: file is {'empty' if file_size == 0 else 'too short'} "
                                     f"({file_size} bytes), not a safetensors file")
        header_size = int.from_bytes(_read_exact(handle, path, 0, 8), "little")
        # The length is the file's first 8 bytes: never print it, whatever file
        # this is (a symlink or a config may point us at a secret).
        if header_size > MAX_HEADER_BYTES or 8 + header_size > file_size:
            raise AdapterFormatError(f"{path}: not a safetensors file (its first 8 bytes are not a header length "
                                     f"that fits this {file_size}-byte file; truncated or another format)")
        header_bytes = _read_exact(handle, path, 8, header_size)
        data_start = 8 + header_size
        data_size = file_size - data_start
        if data_size == 0:  # nothing will ever be read
            handle.close()
            handle = None
        tensors, metadata = _parse_header(path, _header_json(path, header_bytes), data_start, data_size)
    except (OSError, AdapterFormatError) as error:
        if handle is not None:  # closed on every refusal, a damaged header included
            handle.close()
        if isinstance(error, AdapterFormatError):
            raise
        raise AdapterFormatError(f"{path}: cannot read ({error.strerror or error})") from None
    return SafetensorsFile(path, tensors, metadata, hashlib.sha256(header_bytes).hexdigest(), file_size, handle)


def _read_exact(handle: io.FileIO, path: str, offset: int, count: int, into: Optional[memoryview] = None) -> Any:
    """``count`` bytes at ``offset`` (into ``into`` when given); a short read is
    an error naming the file: it shrank after its header was read."""
    target = into if into is not None else memoryview(bytearray(count))
    done = 0
    while done < count:
        if hasattr(os, "preadv"):
            got = os.preadv(handle.fileno(), [target[done:count]], offset + done)
        else:  # no positional reads (Windows): seek + read on our own handle
            handle.seek(offset + done)
            got = handle.readinto(target[done:count])
        if not got:
            raise AdapterFormatError(f"{path}: file changed while being read (byte {offset + done} is gone; "
                                     "truncated by another process?)")
        done += got
    return target if into is not None else bytes(target)


def raw_view(sf: SafetensorsFile, info: TensorInfo, workspace: Optional["Workspace"] = None,
             index: Optional[int] = None) -> np.ndarray:
    """The tensor's stored values as an array, read with one positional read
    (only slab ``index`` along the first axis when given: one expert).

    With ``workspace`` the bytes land in its reused buffer (valid until the
    next raw read into it); without, in a new array.
    """
    if info.problem is not None:
        raise AdapterFormatError(f"{sf.path}: tensor {info.name!r}: {info.problem}")
    storage = DTYPES[info.dtype].storage
    shape, start = info.shape, info.start
    if index is not None:
        shape = info.shape[1:]
        start += index * math.prod(shape) * storage.itemsize
    count = math.prod(shape)
    if count == 0:  # reshaped, not allocated: see MAX_EMPTY_EXTENT
        return np.empty(0, dtype=storage).reshape(shape)
    nbytes = count * storage.itemsize
    buffer = workspace.take(nbytes, _RAW_BYTES) if workspace is not None else np.empty(nbytes, np.uint8)
    _read_exact(sf.handle, sf.path, start, nbytes, memoryview(buffer).cast("B"))
    return buffer.view(storage).reshape(shape)


class Workspace:
    """Reusable decode buffers, grown to the largest tensor seen.

    Decoding into fresh arrays costs a page fault per 4 KiB (more than the
    decoding itself); reusing two buffers makes a streamed audit touch the
    same few megabytes over and over.  Arrays handed out are views that the
    next read overwrites.  It also remembers the last few results computed
    for a whole fused tensor (see ``remember``).
    """

    def __init__(self) -> None:
        self._buffers: Dict[Any, np.ndarray] = {}
        self._recent: Dict[Any, Any] = {}  # see remember()

    def remember(self, key: Any, compute: Callable[[], Any], keep: int = 2) -> Any:
        """``compute()`` once per ``key`` among the last ``keep`` keys asked for
        (consecutive expert modules share one pass over their fused A and B)."""
        if key not in self._recent:
            if len(self._recent) >= keep:
                del self._recent[next(iter(self._recent))]
            self._recent[key] = compute()
        return self._recent[key]

    def take(self, count: int, dtype: Any) -> np.ndarray:
        key = dtype if dtype is _RAW_BYTES else np.dtype(dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < count:
            buffer = self._buffers[key] = np.empty(count, dtype=np.uint8 if key is _RAW_BYTES else key)
        return buffer[:count]


_RAW_BYTES = "raw bytes"  # the Workspace slot for stored bytes, apart from any decoded dtype


def decode(raw: np.ndarray, dtype_name: str, dtype: Any = np.float64,
           workspace: Optional[Workspace] = None) -> np.ndarray:
    """Decode raw stored values (any shape or strides) to ``dtype``.

    ``dtype_name`` is the safetensors dtype (``"BF16"``…); NumPy-native values
    (including in-memory arrays, and a bf16 tensor a framework already widened
    to float32) are simply cast.  With ``workspace`` the result is a view into
    its buffer, valid until the workspace's next use.
    """
    spec = DTYPES.get(dtype_name)
    dtype = np.dtype(dtype)
    count = raw.size
    target = (workspace.take(count, dtype) if workspace is not None else np.empty(count, dtype)).reshape(raw.shape)
    if spec is None or spec.decode is None or raw.dtype != spec.storage:
        np.copyto(target, raw, casting="unsafe")
    elif dtype == np.float32:
        spec.decode(raw, target)
    else:
        staging = (workspace.take(count, np.float32) if workspace is not None
                   else np.empty(count, np.float32)).reshape(raw.shape)
        spec.decode(raw, staging)
        np.copyto(target, staging)
    return target


def read_tensor(sf: SafetensorsFile, name: str, dtype: Any = np.float64,
                workspace: Optional[Workspace] = None) -> np.ndarray:
    """Decode one tensor to ``dtype`` (float64 by default), whatever its on-disk format.

    Without ``workspace`` the result is a new array; with one, it is a view into
    the workspace's buffer, valid until the next read into the same workspace.

    >>> sf = open_safetensors("adapter_model.safetensors")          # doctest: +SKIP
    >>> read_tensor(sf, sorted(sf.tensors)[0]).dtype                 # doctest: +SKIP
    dtype('float64')
    """
    info = sf.tensors[name]
    return decode(raw_view(sf, info, workspace), info.dtype, dtype, workspace)


def release_pages(sf: SafetensorsFile, info: TensorInfo) -> None:
    """Nothing to release: tensors are read into the caller's buffers, never
    mapped, so no file pages count toward this process's resident set.  Kept
    so callers written for the mapped reader (base_norms) need no change."""


# ══ 2. adapter files ═════════════════════════════════════════════════════════

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class AdapterFiles(NamedTuple):
    weights_path: str
    config_path: Optional[str]
    adapter_name: str
    other_adapters: Tuple[str, ...]  # named adapters saved in subfolders


def _pickle_refusal(path: Path) -> AdapterFormatError:
    return AdapterFormatError(
        f"{path}: is a pickle file; gradience_lite never unpickles (loading a pickle can run arbitrary code). "
        "Convert it to safetensors once, in a trusted environment, e.g. "
        "python -c \"import torch, safetensors.torch as st; "
        f"st.save_file(torch.load('{path.name}', weights_only=True), '{WEIGHTS_NAME}')\"")


def list_named_adapters(directory: str | os.PathLike) -> Tuple[str, ...]:
    """Names of the extra adapters PEFT saved in subfolders of ``directory``."""
    root = Path(directory)
    if not root.is_dir():
        return ()
    return tuple(sorted(child.name for child in root.iterdir()
                        if child.is_dir() and (child / CONFIG_NAME).is_file()
                        and any((child / name).exists() for name in (WEIGHTS_NAME, "adapter_model.bin"))))


# Weight file names by format, in the order they are looked for in a directory.
KNOWN_WEIGHT_NAMES = (WEIGHTS_NAME, "adapters.safetensors", "pytorch_lora_weights.safetensors")


def _weights_in_directory(root: Path, others: Sequence[str]) -> Path:
    """PEFT's name, MLX-LM's, diffusers', or else the directory's only .safetensors file."""
    for name in KNOWN_WEIGHT_NAMES:
        if (root / name).exists():
            return root / name
    candidates = sorted(root.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    pickles = [root / f"{stem}{suffix}" for stem in ("adapter_model", "adapters", "pytorch_lora_weights")
               for suffix in PICKLE_SUFFIXES]
    pickle_path = next((p for p in pickles if p.exists()), None)
    if pickle_path is not None:
        raise _pickle_refusal(pickle_path)
    if len(candidates) > 1:
        raise AdapterFormatError(f"{root}: several .safetensors files and none named {WEIGHTS_NAME}; "
                                 "pass the one to audit with --weights")
    hint = f" (named adapters in subfolders: {', '.join(others)}; pick one with --adapter)" if others else ""
    raise AdapterFormatError(f"{root}: no {WEIGHTS_NAME} found{hint}")


def _is_plain_name(name: str) -> bool:
    """A single path component: ``--adapter ../x`` must not audit outside the adapter folder."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and not Path(name).is_absolute())


def find_adapter_files(path: str | os.PathLike, *, adapter: Optional[str] = None,
                       weights: Optional[str] = None, config: Optional[str] = None) -> AdapterFiles:
    """Locate the weights and config to audit.

    ``path`` is a PEFT save directory (the root adapter, or ``adapter`` in its
    subfolder) or a weights file.  ``weights`` / ``config`` override discovery.
    """
    root = Path(path)
    if weights is None and not root.exists():
        raise AdapterFormatError(f"{root}: no such file or directory")
    others = list_named_adapters(root) if root.is_dir() else ()
    adapter_name = "default"
    if adapter not in (None, "default"):
        if not _is_plain_name(adapter):
            raise AdapterFormatError(f"adapter name {adapter!r} is not a plain subfolder name "
                                     "(no '/', '\\', '..' or absolute path)")
        if not root.is_dir() or not (root / adapter).is_dir():
            listed = ", ".join(others) or "none"
            raise AdapterFormatError(f"{root}: no adapter named {adapter!r} (named adapters here: {listed})")
        root, adapter_name = root / adapter, adapter
    if weights is not None:
        weights_path = Path(weights)
    elif root.is_file():
        weights_path = root
    else:
        weights_path = _weights_in_directory(root, others)
    if weights_path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(weights_path)
    if not weights_path.is_file():
        problem = "not a regular file" if weights_path.exists() else "weights file not found"
        raise AdapterFormatError(f"{weights_path}: {problem}")
    if config is not None:
        config_path: Optional[Path] = Path(config)
        if not config_path.is_file():
            raise AdapterFormatError(f"{config_path}: adapter config not found")
    else:
        candidate = (root if root.is_dir() else weights_path.parent) / CONFIG_NAME
        config_path = candidate if candidate.is_file() else None
    return AdapterFiles(str(weights_path), str(config_path) if config_path else None, adapter_name,
                        tuple(o for o in others if o != adapter_name))


# ══ 3. config ════════════════════════════════════════════════════════════════

# Pattern keys are user-written regular expressions, and Python's re has no
# time limit.  A key is compiled only when a small parser finds it inside a
# safe subset — what PEFT's docs and EVA's generated configs use: literals,
# escapes of punctuation and \d \w \s (and capitals), ".", character classes,
# "*" "+" "?" on a single atom, unquantified non-nested groups "(…)" / "(?:…)"
# of alternatives, and anchors "^" "$".  Anything else (quantified or nested
# groups, counted repeats, back-references, look-arounds) is matched
# literally, with an issue.  Within the subset, backtracking is polynomial of
# degree (unbounded quantifiers + 1) in the name's length, so both are capped,
# and the whole audit's matching runs under a time budget.
MAX_PATTERN_LENGTH = 1000  # characters in one key
MAX_UNBOUNDED_PER_KEY = 2  # "*" / "+" in one key: ".*layers\.\d+" needs two
MAX_CHOICES_PER_KEY = 8  # "?" and "|": each may double the paths tried
# Names this long are never matched against patterns (the longest real module
# names, diffusers UNet paths with the PEFT wrapper, are ~100 characters).
MAX_NAME_LENGTH = 256
MAX_PATTERN_KEYS = 500_000  # per field; EVA writes one key per module (a 256-expert MoE: ~50k)
MAX_PATTERN_CHARS = 8_000_000  # all keys of one field together (the config itself is capped at 10 MB)
# Keys with regex syntax are tried one by one against every name; literal keys
# are looked up in a dict.  Past this many keys in a field, literal keys take
# the dict route (where "." matches only "."), with an issue.
MAX_REGEX_KEYS = 64
MAX_PATTERN_SECONDS = 3.0  # regex matching time for one audit; past it, modules are refused with an issue
_REGEX_SYNTAX = re.compile(r"[\\^$*+?{}\[\]|()]")


def _uses_regex_syntax(keys: Sequence[str]) -> List[bool]:
    """For each key, whether it has regex syntax beyond "." and the anchors
    "^…" / "…$": one scan over all keys joined (10⁵ keys in a few ms)."""
    flags = [False] * len(keys)
    starts = [0, *itertools.accumulate(len(key) + 1 for key in keys)]
    for match in _REGEX_SYNTAX.finditer("\n".join(keys)):
        index = bisect.bisect_right(starts, match.start()) - 1
        position, key = match.start() - starts[index], keys[index]
        if not ((match.group() == "^" and position == 0) or (match.group() == "$" and position == len(key) - 1)):
            flags[index] = True
    return flags


class PatternKey(NamedTuple):
    key: str  # as written in the config
    value: Any
    regex: "Optional[re.Pattern[str]]"  # None: a literal key looked up in a dict (see PatternKeys)


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``LoraConfig`` the audit needs."""

    present: bool = False
    r: Optional[int] = None
    lora_alpha: Optional[float] = None
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Tuple[PatternKey, ...] = ()
    alpha_pattern: Tuple[PatternKey, ...] = ()
    peft_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    target_modules: Any = None
    modules_to_save: Any = None
    layer_replication: Any = None
    # AdaLoRA: module name → the boolean rank mask PEFT saved in rank_pattern (True = rank kept)
    rank_masks: Tuple[Tuple[str, Tuple[bool, ...]], ...] = ()
    lora_bias: bool = False
    kasa: bool = False  # kasa_config set: ΔW = s·B·diag(lora_diag)·A
    bd_lora: Optional["BdLora"] = None  # use_bdlora: which factor is block-diagonal, in how many blocks
    target_parameters: Tuple[str, ...] = ()  # nn.Parameters wrapped by PEFT's ParamWrapper (MoE experts)
    refusals: Tuple[str, ...] = ()  # fields that change ΔW in a way the audit cannot compute: no module is audited


class BdLora(NamedTuple):
    """PEFT's BdLoraConfig: modules whose name contains an ``a_patterns`` entry
    have a block-diagonal lora_A, ``b_patterns`` a block-diagonal lora_B."""

    a_patterns: Tuple[str, ...]
    b_patterns: Tuple[str, ...]
    nblocks: int


class FieldRule(NamedTuple):
    """What one LoraConfig field does to ΔW, and what the audit does about it."""

    effect: str  # "none": ΔW unchanged;  "read": the audit implements it;  "note": audited, with an issue;  "refuse"
    harmless: Tuple[Any, ...] = (None, False, {}, [])  # values with no effect (the default among them)
    text: str = ""  # the issue, for "note" and "refuse"


# Every field of PEFT 0.21.2's LoraConfig (peft/tuners/lora/config.py, with PeftConfig's
# own fields), field by field: does it change the ΔW a module applies?  A key not in
# this table is reported (PEFT 0.21.2 drops unknown keys with a warning, so a newer
# PEFT's field may change ΔW in ways these numbers do not include).
_BASE_CHANGING_INITS = "the base weight was modified at init (W − s·B₀·A₀ or a quantized residual)"
LORA_CONFIG_FIELDS: Dict[str, FieldRule] = {
    # PeftConfig metadata
    "task_type": FieldRule("none"), "peft_type": FieldRule("read"), "auto_mapping": FieldRule("none"),
    "peft_version": FieldRule("none"), "base_model_name_or_path": FieldRule("read"), "revision": FieldRule("none"),
    "inference_mode": FieldRule("none"),
    # scale and rank
    "r": FieldRule("read"), "lora_alpha": FieldRule("read"), "use_rslora": FieldRule("read"),
    "rank_pattern": FieldRule("read"), "alpha_pattern": FieldRule("read"),
    # which modules are adapted (the saved tensors say it again)
    "target_modules": FieldRule("none"), "exclude_modules": FieldRule("none"),
    "layers_to_transform": FieldRule("none"), "layers_pattern": FieldRule("none"),
    "modules_to_save": FieldRule("none"),  # whole modules saved: listed under non_lora_tensors
    # training-time only: the eval forward and the merge are s·B·A
    "lora_dropout": FieldRule("none"), "velora_config": FieldRule("none"), "monteclora_config": FieldRule("none"),
    "runtime_config": FieldRule("none"), "megatron_config": FieldRule("none"), "megatron_core": FieldRule("none"),
    "ensure_weight_tying": FieldRule("none"),  # tied copies store the same factors, ΔW = s·B·A each
    "eva_config": FieldRule("none"), "loftq_config": FieldRule("none"), "corda_config": FieldRule("none"),
    "lora_ga_config": FieldRule("none"),  # their effect is read from init_lora_weights
    # ΔW transposed (fan_in_fan_out) or mapped to other base layers (layer_replication): same spectrum
    "fan_in_fan_out": FieldRule("read"), "layer_replication": FieldRule("read"),
    # variants the audit implements
    "kasa_config": FieldRule("read"), "use_bdlora": FieldRule("read"), "target_parameters": FieldRule("read"),
    "lora_bias": FieldRule("read"), "trainable_token_indices": FieldRule("read"),
    "use_dora": FieldRule("note", text="use_dora: DoRA rescales each output row of the merged weight by the magnitude "
                          "vector (needs the base weight); the numbers are of the low-rank part s·B·A"),
    "init_lora_weights": FieldRule("note", (True, False, "gaussian", "orthogonal", "eva", "mica"),
                                   f"init_lora_weights: {_BASE_CHANGING_INITS}; ΔW is the adapter's s·B·A on that "
                                   "modified base, not the change from the original base (save with "
                                   "path_initial_model_for_weight_conversion for that)"),
    "bias": FieldRule("note", ("none", None), "bias: the adapter also trains base biases (full tensors, listed "
                      "under non_lora_tensors); they are not part of ΔW"),
    "alora_invocation_tokens": FieldRule("note", text="alora_invocation_tokens: aLoRA applies ΔW only to tokens "
                                         "from the invocation sequence on"),
    "use_qalora": FieldRule("refuse", text="use_qalora: on GPTQ layers QALoRA pools the input in groups "
                            "(qalora_group_size) before lora_A, on other layers it does nothing, and the adapter "
                            "does not say which the base is"),
    "qalora_group_size": FieldRule("none"),  # read with use_qalora
    "arrow_config": FieldRule("refuse", text="arrow_config: Arrow routes each token through a mixture of task "
                              "adapters; there is no single ΔW"),
}


def _unsafe_regex(key: str) -> Optional[str]:
    """Why ``key`` is outside the safe regex subset (None when it is inside)."""
    position, depth, unbounded, choices, after_atom = 0, 0, 0, 0, False
    while position < len(key):
        char = key[position]
        if char == "\\":
            escaped = key[position + 1:position + 2]
            if not escaped or (escaped.isalnum() and escaped not in "dwsDWS"):
                return f"escape \\{escaped}"
            position, after_atom = position + 2, True
        elif char == "[":
            end = position + 1 + (key[position + 1:position + 2] == "^")
            end += key[end:end + 1] == "]"
            while end < len(key) and key[end] != "]":
                end += 2 if key[end] == "\\" else 1
            if end >= len(key):
                return "an unclosed ["
            position, after_atom = end + 1, True
        elif char in "*+?":
            if not after_atom:
                return f"{char!r} after a group or another quantifier"
            unbounded += char != "?"
            choices += char == "?"
            position, after_atom = position + 1, False
        elif char == "(":
            if depth:
                return "a nested group"
            if key.startswith("(?", position) and not key.startswith("(?:", position):
                return "a group extension (?…)"
            position, depth, after_atom = position + (3 if key.startswith("(?:", position) else 1), 1, False
        elif char == ")":
            if not depth:
                return "an unbalanced )"
            position, depth, after_atom = position + 1, 0, False  # so a quantified group is refused
        elif char == "{":
            return "a counted repeat {…}"
        else:
            choices += char == "|"
            position, after_atom = position + 1, char not in "|^$"
    if depth:
        return "an unclosed ("
    if unbounded > MAX_UNBOUNDED_PER_KEY:
        return f"{unbounded} unbounded quantifiers (the cap MAX_UNBOUNDED_PER_KEY is {MAX_UNBOUNDED_PER_KEY})"
    if choices > MAX_CHOICES_PER_KEY:
        return f"{choices} optional parts (the cap MAX_CHOICES_PER_KEY is {MAX_CHOICES_PER_KEY})"
    return None


def _pattern_regex(key: str) -> "re.Pattern[str]":
    """PEFT's pattern rule for ``key`` taken literally (every character itself)."""
    return re.compile(r"(.*\.)?(" + re.escape(key) + r")$")


def _compile_pattern_key(key: str) -> Tuple["re.Pattern[str]", Optional[str]]:
    # PEFT (peft.utils.other.get_pattern_key): re.match(rf"(.*\.)?({key})$", name),
    # i.e. the key must match a dot-aligned tail of the module name through its end.
    if len(key) > MAX_PATTERN_LENGTH:
        return _pattern_regex(key), f"pattern key is over {MAX_PATTERN_LENGTH} characters; matched literally"
    unsafe = _unsafe_regex(key)
    if unsafe:
        return (_pattern_regex(key),
                f"pattern key {key!r} uses {unsafe}, outside the safe regex subset "
                "(could backtrack catastrophically); matched literally")
    try:
        return re.compile(r"(.*\.)?(" + key + r")$"), None
    except re.error as error:
        return _pattern_regex(key), f"pattern key {key!r} is not a valid regular expression ({error}); matched literally"


class _PatternBudget:
    """Seconds of regex matching left for one audit (shared by its pattern fields)."""

    def __init__(self, seconds: float = MAX_PATTERN_SECONDS) -> None:
        self.left = seconds

    def spend(self, since: float) -> None:
        self.left -= time.perf_counter() - since
        if self.left < 0:
            raise ResourceCapExceeded(f"pattern matching ran past the MAX_PATTERN_SECONDS budget "
                                      f"({MAX_PATTERN_SECONDS} s)")


class PatternKeys(tuple):
    """A field's pattern keys in config order (a tuple of :class:`PatternKey`),
    indexed for matching: literal keys in dicts, regex keys in order."""

    literal: Dict[str, int]  # a dot-aligned tail → index of the first such key
    anchored: Dict[str, int]  # "^name" keys: the whole name → index
    regexes: List[Tuple[int, PatternKey]]
    matched: set  # indices of keys that matched some name so far
    budget: _PatternBudget

    @classmethod
    def build(cls, keys: Sequence[PatternKey], budget: Optional[_PatternBudget] = None) -> "PatternKeys":
        """Keys whose ``regex`` is None go to the dicts; the rest are tried in order."""
        table = cls(keys)
        table.literal, table.anchored, table.regexes, table.matched = {}, {}, [], set()
        table.budget = budget or _PatternBudget()
        for index, pattern in enumerate(keys):
            if pattern.regex is None:
                text = pattern.key[:-1] if pattern.key.endswith("$") else pattern.key
                target, text = (table.anchored, text[1:]) if text.startswith("^") else (table.literal, text)
                target.setdefault(text, index)
            else:
                table.regexes.append((index, pattern))
        return table

    def first_match(self, name: str) -> Optional[PatternKey]:
        best = self.anchored.get(name)
        if self.literal:
            for tail in _dot_tails(name):
                index = self.literal.get(tail)
                if index is not None:
                    self.matched.add(index)
                    best = index if best is None else min(best, index)
        for index, pattern in self.regexes:
            if best is not None and index > best:
                break
            started = time.perf_counter()
            hit = pattern.regex.match(name)
            self.budget.spend(started)
            if hit:
                best = index
                break
        if best is not None:
            self.matched.add(best)
        return self[best] if best is not None else None


def _dot_tails(name: str) -> Iterable[str]:
    # PEFT's "(.*\.)?" prefix: a key must match the name, or its part after some ".".
    yield name
    position = name.find(".")
    while position >= 0:
        yield name[position + 1:]
        position = name.find(".", position + 1)


@contextlib.contextmanager
def _gc_paused() -> Iterable[None]:
    # Building 10⁵ small records creates no reference cycles, but the cyclic
    # collector would rescan all of them again and again (a third of the time).
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse_patterns(raw: Any, field_name: str, cast: Callable[[Any], Any], issues: List[str],
                    budget: Optional[_PatternBudget] = None) -> Tuple[PatternKey, ...]:
    with _gc_paused():
        return _parse_pattern_keys(raw, field_name, cast, issues, budget)


def _parse_pattern_keys(raw: Any, field_name: str, cast: Callable[[Any], Any], issues: List[str],
                        budget: Optional[_PatternBudget]) -> Tuple[PatternKey, ...]:
    if raw in (None, {}):
        return ()
    if not isinstance(raw, dict):
        issues.append(f"config: {field_name} is not an object; ignored")
        return ()
    items = list(raw.items())
    if len(items) > MAX_PATTERN_KEYS:
        issues.append(f"config: {field_name} has {len(items)} keys, over the MAX_PATTERN_KEYS cap "
                      f"({MAX_PATTERN_KEYS}); the keys after that are ignored")
        items = items[:MAX_PATTERN_KEYS]
    names = [str(key) for key, _ in items]
    total = list(itertools.accumulate(len(name) for name in names))
    if total and total[-1] > MAX_PATTERN_CHARS:
        count = bisect.bisect_right(total, MAX_PATTERN_CHARS)
        issues.append(f"config: {field_name} keys total over the MAX_PATTERN_CHARS cap ({MAX_PATTERN_CHARS} "
                      f"characters); the {len(items) - count} keys after that are ignored")
        items, names = items[:count], names[:count]
    literal_by_dict = len(items) > MAX_REGEX_KEYS
    regex_syntax = _uses_regex_syntax(names) if literal_by_dict else [True] * len(names)
    keys, regex_keys = [], 0
    for key, (_, value), has_syntax in zip(names, items, regex_syntax):  # JSON order is PEFT's (first match wins)
        try:
            value = cast(value)
        except (TypeError, ValueError):
            issues.append(f"config: {field_name}[{key!r}] = {value!r} is not a number; ignored")
            continue
        if not has_syntax:  # looked up in a dict, never compiled (tuple.__new__: 3× faster than PatternKey(…))
            keys.append(tuple.__new__(PatternKey, (key, value, None)))
            continue
        regex_keys += 1
        if regex_keys > MAX_REGEX_KEYS:
            regex, problem = _pattern_regex(key), None
            if regex_keys == MAX_REGEX_KEYS + 1:
                problem = (f"more than MAX_REGEX_KEYS ({MAX_REGEX_KEYS}) keys use regex syntax; "
                           f"from {key!r} on they are matched literally")
        else:
            regex, problem = _compile_pattern_key(key)
        if problem:
            issues.append(f"config: {field_name}: {problem}")
        keys.append(PatternKey(key, value, regex))
    if literal_by_dict:
        issues.append(f"config: {field_name} has {len(keys)} keys; those without regex syntax are looked up as "
                      "exact module names or dot-aligned tails (a '.' in them matches only '.')")
    return PatternKeys.build(keys, budget)


def _positive_int(value: Any) -> int:
    if type(value) is int:  # the common case, first: EVA configs hold 10⁵ of them (and -10**400 is no float)
        if value > 0:
            return value
        raise ValueError(value)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or value <= 0):
        raise ValueError(value)
    return int(value)


def _finite_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    try:
        number = float(value)  # an int of 400 digits overflows here
    except OverflowError:
        raise ValueError(value) from None
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def parse_adapter_config(raw: Optional[Mapping[str, Any]]) -> Tuple[AdapterConfig, List[str]]:
    """Turn a PEFT ``adapter_config.json`` dict into an :class:`AdapterConfig`.

    Never raises: damaged fields become entries in the returned issue list and
    the audit goes on from the weights.
    """
    issues: List[str] = []
    if raw is None:
        return AdapterConfig(), issues
    if not isinstance(raw, Mapping):
        issues.append("config: adapter config is not a JSON object; auditing from the weights alone")
        return AdapterConfig(), issues
    peft_type = raw.get("peft_type")
    known = isinstance(peft_type, str) and peft_type in PEFT_VARIANTS
    if peft_type is not None and not known:  # the entry points refuse such adapters before parsing
        issues.append(f"config: peft_type is {peft_type!r}, not a type gradience_lite audits; read as LORA")
    variant = PEFT_VARIANTS[peft_type] if known else PEFT_VARIANTS["LORA"]
    values: Dict[str, Any] = {}
    # Each tuner names its rank and alpha fields its own way (LoHa/LoKr "alpha", AdaLoRA "init_r").
    for name, field_name, cast in (("r", variant.rank_field, _positive_int), ("lora_alpha", variant.alpha_field, _finite_number)):
        if field_name is None:
            continue
        if field_name not in raw:
            issues.append(f"config: {field_name} is missing")
            continue
        try:
            values[name] = cast(raw[field_name])
        except (TypeError, ValueError):
            issues.append(f"config: {field_name} = {raw[field_name]!r} is not a valid value; ignored")
    flags = {}
    for name in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        value = raw.get(name, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            issues.append(f"config: {name} = {value!r} is not true/false; taken as false")
            value = False
        flags[name] = value
    budget = _PatternBudget()
    masks = variant.family == "adalora"  # AdaLoRA's rank_pattern holds boolean masks, not ranks
    return AdapterConfig(
        present=True,
        r=values.get("r"),
        lora_alpha=values.get("lora_alpha"),
        rank_pattern=() if masks else _parse_patterns(raw.get("rank_pattern"), "rank_pattern", _positive_int, issues,
                                                      budget),
        rank_masks=_parse_rank_masks(raw.get("rank_pattern"), issues) if masks else (),
        alpha_pattern=_parse_patterns(raw.get("alpha_pattern"), "alpha_pattern", _finite_number, issues, budget),
        peft_type=peft_type if isinstance(peft_type, str) else None,
        base_model_name_or_path=raw.get("base_model_name_or_path") if isinstance(raw.get("base_model_name_or_path"), str) else None,
        target_modules=raw.get("target_modules"),
        modules_to_save=raw.get("modules_to_save"),
        layer_replication=raw.get("layer_replication"),
        kasa=raw.get("kasa_config") is not None,
        bd_lora=_parse_bd_lora(raw.get("use_bdlora"), issues),
        target_parameters=_parse_target_parameters(raw.get("target_parameters"), issues),
        refusals=_check_fields(raw, issues) if peft_type in (None, "LORA") else (),
        **flags,
    ), issues


def _check_fields(raw: Mapping[str, Any], issues: List[str]) -> Tuple[str, ...]:
    """Hold every key against LORA_CONFIG_FIELDS: unknown keys and noted fields
    become issues; the texts of refusing fields are returned."""
    refusals = []
    unknown = sorted(str(key) for key in raw if key not in LORA_CONFIG_FIELDS)
    if unknown:
        issues.append(f"config: {_short_repr(', '.join(unknown))[1:-1]}: not LoraConfig field(s) of PEFT 0.21.2 "
                      "(written by another version?); PEFT 0.21.2 ignores them on load and so does this audit — if "
                      "they change ΔW in the version that wrote them, the numbers do not include it")
    for name, rule in LORA_CONFIG_FIELDS.items():
        value = raw.get(name)
        # null or missing is the default; others are compared with their types (1 is not True).
        if rule.effect not in ("note", "refuse") or value is None \
                or any(type(value) is type(h) and value == h for h in rule.harmless):
            continue
        if rule.effect == "note":
            issues.append(f"config: {rule.text} (value {_short_repr(value)})")
        else:
            refusals.append(f"{rule.text} (value {_short_repr(value)}); not audited")
    return tuple(refusals)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _parse_bd_lora(raw: Any, issues: List[str]) -> Optional[BdLora]:
    if raw is None:
        return None
    patterns = {}
    if isinstance(raw, Mapping):
        for side in ("target_modules_bd_a", "target_modules_bd_b"):
            value = raw.get(side) or []
            names = isinstance(value, list) and all(isinstance(v, str) for v in value)
            patterns[side] = tuple(value) if names else None
        nblocks = raw.get("nblocks", 1)
    if not isinstance(raw, Mapping) or None in patterns.values() or isinstance(nblocks, bool) \
            or not isinstance(nblocks, int) or nblocks < 1:
        issues.append(f"config: use_bdlora = {_short_repr(raw)} is not a BdLoraConfig; block-diagonal modules "
                      "cannot be told apart, no module is audited")
        return BdLora((), (), 0)  # nblocks 0: refuse every module
    return BdLora(patterns["target_modules_bd_a"], patterns["target_modules_bd_b"], nblocks)


def _parse_target_parameters(raw: Any, issues: List[str]) -> Tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        issues.append(f"config: target_parameters = {_short_repr(raw)} is not a list of names; ignored")
        return ()
    return tuple(raw)


def _parse_rank_masks(raw: Any, issues: List[str]) -> Tuple[Tuple[str, Tuple[bool, ...]], ...]:
    # PEFT AdaLoRA (adalora/model.py _get_adapter_state_dict) saves rank_pattern as
    # {"<module path>.lora_E": [bool per initial rank]} and drops the masked ranks from the weights.
    if raw in (None, {}):
        return ()
    if not isinstance(raw, dict):
        issues.append("config: rank_pattern is not an object; AdaLoRA masks ignored")
        return ()
    masks = []
    for key, mask in raw.items():
        if not isinstance(mask, list) or not all(isinstance(bit, bool) for bit in mask):
            issues.append(f"config: rank_pattern[{key!r}] is not a list of true/false; ignored")
            continue
        module = key[:-len(".lora_E")] if key.endswith(".lora_E") else key
        masks.append((module_name_from_prefix(module), tuple(mask)))
    return tuple(masks)


MAX_CONFIG_BYTES = 10 * 1000 * 1000


def load_adapter_config(path: Optional[str]) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """Read ``adapter_config.json``; a damaged file is an issue, not an exception."""
    if path is None:
        return None, ["config: no adapter_config.json found; r inferred from shapes, scale taken as 1.0"]
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            return None, [f"config: {path} is over {MAX_CONFIG_BYTES} bytes, not a PEFT config; "
                          "r inferred from shapes, scale taken as 1.0"]
        text = Path(path).read_text(encoding="utf-8")
        return json.loads(text), []
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        return None, [f"config: {path} could not be read ({type(error).__name__}: {error}); "
                      "r inferred from shapes, scale taken as 1.0"]


def pattern_name(module_name: str) -> str:
    """The name PEFT matched patterns against: an expert module "<path>.<param>[e]" shares its parameter's."""
    return re.sub(r"\[[0-9]{1,9}\]$", "", module_name)


def match_pattern(patterns: Sequence[PatternKey], module_name: str) -> Optional[PatternKey]:
    """PEFT's rule: the first key (in config order) matching a dot-aligned tail wins.

    Raises :class:`ResourceCapExceeded` once the audit's matching time budget is spent.
    """
    if not patterns or len(module_name) > MAX_NAME_LENGTH:
        return None
    table = patterns if isinstance(patterns, PatternKeys) else PatternKeys.build(patterns)
    return table.first_match(module_name)


def unmatched_pattern_keys(patterns: Sequence[PatternKey], names: Sequence[str]) -> List[PatternKey]:
    """Keys that match none of ``names`` (literal hits were recorded while matching)."""
    if not patterns:
        return []
    table = patterns if isinstance(patterns, PatternKeys) else PatternKeys.build(patterns)
    names = [name for name in names if len(name) <= MAX_NAME_LENGTH]
    unmatched = []
    for index, pattern in enumerate(table):
        if index in table.matched:
            continue
        if pattern.regex is None:
            unmatched.append(pattern)  # a dict key: every name was already looked up
            continue
        try:
            for name in names:
                started = time.perf_counter()
                hit = pattern.regex.match(name)
                table.budget.spend(started)
                if hit:
                    table.matched.add(index)
                    break
            else:
                unmatched.append(pattern)
        except ResourceCapExceeded:
            break  # already reported on the modules it stopped
    return unmatched


class ModuleScale(NamedTuple):
    config_r: Optional[int]
    alpha: Optional[float]
    scale: float
    scale_rule: str  # "alpha/r", "alpha/sqrt(r)", or "implicit 1"
    rank_pattern_key: Optional[str]
    alpha_pattern_key: Optional[str]
    problem: Optional[str] = None  # the config and the stored factors cannot be reconciled: not audited


def module_scale(config: AdapterConfig, module_name: str, stored_r: int) -> ModuleScale:
    """r, alpha and scale of one module as PEFT computes them.

    PEFT looks r and alpha up independently.  The scale divides by the rank the
    weights actually have: where it disagrees with the config (reported as an
    issue) the stored factors are what the model runs with.
    """
    rank_key = match_pattern(config.rank_pattern, module_name)
    alpha_key = match_pattern(config.alpha_pattern, module_name)
    config_r = rank_key.value if rank_key else config.r
    alpha = alpha_key.value if alpha_key else config.lora_alpha
    if alpha is None or stored_r <= 0:
        return ModuleScale(config_r, alpha, 1.0, "implicit 1", None, None)
    if config.use_rslora:
        scale, rule = alpha / math.sqrt(stored_r), "alpha/sqrt(r)"
    else:
        scale, rule = alpha / stored_r, "alpha/r"
    return ModuleScale(config_r, alpha, scale, rule,
                       rank_key.key if rank_key else None, alpha_key.key if alpha_key else None)


# (module, stored rank, the module's stored alpha if its format keeps one) → its scale
ScaleRule = Callable[["LoraModule", int, Optional[float]], ModuleScale]


def kohya_scale(module: "LoraModule", rank: int, alpha: Optional[float]) -> ModuleScale:
    """kohya / LyCORIS: scale = alpha / r from the module's stored ``alpha``; a
    missing alpha (or 0) means alpha = r, i.e. scale 1.  LyCORIS LoKr with both
    Kronecker halves stored as full matrices uses scale 1 whatever alpha says."""
    if module.family == "lokr" and module.part("lokr_w1") and module.part("lokr_w2"):
        return ModuleScale(None, alpha, 1.0, "1 (LoKr, both halves full)", None, None)
    if alpha is None or alpha == 0 or rank <= 0:
        return ModuleScale(None, alpha, 1.0, "implicit 1 (no alpha)", None, None)
    return ModuleScale(None, alpha, alpha / rank, "alpha/r", None, None)


def absolute_scale(scale: Optional[float]) -> Callable[["LoraModule", int, Optional[float]], ModuleScale]:
    """MLX-LM: ``lora_parameters.scale`` is the multiplier itself, not an alpha."""
    def rule(module: "LoraModule", rank: int, alpha: Optional[float]) -> ModuleScale:
        if scale is None:
            return ModuleScale(None, None, 1.0, "implicit 1", None, None)
        return ModuleScale(None, None, scale, "absolute", None, None)
    return rule


def lora_scale(config: AdapterConfig) -> ScaleRule:
    """PEFT LoRA: :func:`module_scale` for every module (an expert: by its parameter's name)."""
    return lambda module, rank, alpha: module_scale(config, pattern_name(module.name), rank)


def _unloadable(stored: int, config_r: Optional[int]) -> Optional[str]:
    # PEFT builds each layer from the config's r and then loads the weights: another stored rank fails to load.
    if config_r is None or stored == config_r:
        return None
    return f"stored rank {stored} disagrees with the config's r = {config_r}; PEFT cannot load this module"


def lycoris_peft_scale(config: AdapterConfig) -> ScaleRule:
    """PEFT LoHa / LoKr (tuners/loha|lokr/model.py ``_create_and_replace``, layer.py
    ``update_layer``): scaling = alpha / r, r and alpha looked up in rank_pattern /
    alpha_pattern.  r is the config's, not a stored shape: LoKr with both halves
    full stores no rank at all, and PEFT still divides by r (LyCORIS would use 1).
    LoHaConfig / LoKrConfig have no rsLoRA option."""
    def rule(module: LoraModule, rank: int, alpha: Optional[float]) -> ModuleScale:
        looked_up = module_scale(config, module.name, rank)
        stores_rank = not (module.part("lokr_w1") and module.part("lokr_w2"))
        problem = _unloadable(rank, looked_up.config_r) if stores_rank else None
        if problem or looked_up.alpha is None or not looked_up.config_r:
            return looked_up._replace(problem=problem)
        return looked_up._replace(scale=looked_up.alpha / looked_up.config_r, scale_rule="alpha/r")
    return rule


ADALORA_RANKNUM_EPS = np.float32(1e-5)


def adalora_scale(config: AdapterConfig) -> ScaleRule:
    """PEFT AdaLoRA (tuners/adalora/layer.py ``SVDLinear.forward``): ΔW = B·(A ⊙ E)·scaling / (ranknum + 1e-5).

    On load (adalora/model.py ``resize_modules_by_rank_pattern``) a module with a
    mask is rebuilt with r = the kept ranks, so scaling = lora_alpha, or that r
    when lora_alpha ≤ 0; ranknum is restored to init_r (it is not saved).  The
    saved weights hold only the kept ranks; a mask that does not match them is
    an adapter PEFT itself cannot load, so the module is refused.
    """
    masks = dict(config.rank_masks)

    def rule(module: LoraModule, rank: int, alpha: Optional[float]) -> ModuleScale:
        init_r, lora_alpha, mask = config.r, config.lora_alpha, masks.get(module.name)
        if init_r is None or lora_alpha is None:
            return ModuleScale(init_r, lora_alpha, 1.0, "implicit 1", None, None)
        loaded_r, ranknum = init_r, init_r
        if mask is None and rank != init_r:
            return ModuleScale(init_r, lora_alpha, 1.0, "alpha/(ranknum+1e-5)", None, None,
                               f"lora_A stores {rank} ranks, init_r is {init_r} and rank_pattern has no mask for it "
                               "(PEFT cannot load this module)")
        if mask is not None:
            loaded_r = sum(mask)
            ranknum = init_r if loaded_r > 0 else 0  # update_layer(r=0) sets ranknum 0 and nothing restores it
            problem = (f"rank_pattern mask has {len(mask)} entries but init_r is {init_r}" if len(mask) != init_r else
                       f"rank_pattern mask keeps {loaded_r} ranks but lora_A stores {rank}" if loaded_r != rank else None)
            if problem:
                return ModuleScale(loaded_r, lora_alpha, 1.0, "alpha/(ranknum+1e-5)", None, None,
                                   problem + " (PEFT cannot load this module)")
        scaling, rule_name = (lora_alpha, "alpha/(ranknum+1e-5)") if lora_alpha > 0 else (loaded_r, "r/(ranknum+1e-5)")
        # ranknum is a float32 parameter: the 1e-5 is added in float32, as PEFT's forward does.
        return ModuleScale(loaded_r, lora_alpha, scaling / float(np.float32(ranknum) + ADALORA_RANKNUM_EPS),
                           rule_name, None, None)
    return rule


def vera_scale(config: AdapterConfig) -> ScaleRule:
    """PEFT VeRA has no scalar scale: λ_b and λ_d carry it (tuners/vera/layer.py)."""
    return lambda module, rank, alpha: ModuleScale(config.r, None, 1.0, "1 (vera: λ_b, λ_d)", None, None,
                                                   _unloadable(rank, config.r))


class PeftVariant(NamedTuple):
    """One of PEFT's additive low-rank tuners: how its config and its saved keys name things."""

    family: str  # the per-module ``family``
    rank_field: str  # the config field with the default rank
    alpha_field: Optional[str]  # the config field with alpha (None: the tuner has no scalar scale)
    scale: Callable[[AdapterConfig], ScaleRule]
    roles: Tuple[str, ...] = ()  # per-module tensors: the layer class's adapter_layer_names
    shared_roles: Tuple[str, ...] = ()  # tensors saved once on the tuner and used by every module


# PeftType (PEFT 0.21.2 peft/utils/peft_types.py) → the tuners audited exactly.
PEFT_VARIANTS: Dict[str, PeftVariant] = {
    "LORA": PeftVariant("lora", "r", "lora_alpha", lora_scale),
    "LOHA": PeftVariant("loha", "r", "alpha", lycoris_peft_scale,
                        ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")),
    "LOKR": PeftVariant("lokr", "r", "alpha", lycoris_peft_scale,
                        ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")),
    "ADALORA": PeftVariant("adalora", "init_r", "lora_alpha", adalora_scale, ("lora_A", "lora_B", "lora_E")),
    "VERA": PeftVariant("vera", "r", None, vera_scale, ("vera_lambda_b", "vera_lambda_d"), ("vera_A", "vera_B")),
}

# Every other PeftType, with what it learns: none is an update ΔW = B·A the
# adapter file alone determines (prompts, rotations, scalings, sparse or
# full-rank updates, updates built from the base weight, input-routed mixtures).
NOT_LOW_RANK_ADDITIVE: Dict[str, str] = {
    "PROMPT_TUNING": "learned virtual prompt tokens",
    "MULTITASK_PROMPT_TUNING": "learned virtual prompt tokens",
    "P_TUNING": "a prompt encoder producing virtual tokens",
    "PREFIX_TUNING": "learned key/value prefixes",
    "ADAPTION_PROMPT": "gated adaption prompts",
    "CPT": "context-aware prompt tuning",
    "CARTRIDGE": "a learned KV-cache prefix",
    "IA3": "learned per-channel scaling vectors",
    "OFT": "an orthogonal rotation of the weight",
    "BOFT": "a butterfly-factorised orthogonal rotation of the weight",
    "HRA": "Householder reflections multiplying the weight",
    "ROAD": "2-D rotations of the outputs",
    "OSF": "fine-tuning inside the weight's own SVD subspaces",
    "GLORA": "W0 + W0·A + B, an update proportional to the base weight",
    "HIRA": "a Hadamard product with the base weight",
    "MISS": "shard-shared updates that depend on the base weight",
    "BONE": "block-affine updates that depend on the base weight",
    "DEFT": "a residual projection of the base weight",
    "PEANUT": "a non-linear function of the base weight",
    "DELORA": "a low-rank direction scaled by the base weight's column norms",
    "TINYLORA": "projections through the base weight's SVD",
    "ADAMSS": "updates inside subspaces of the base weight's SVD",
    "FROD": "a re-parameterisation of the whole weight",
    "FOURIERFT": "sparse Fourier coefficients, a full-rank update",
    "WAVEFT": "sparse wavelet coefficients, a full-rank update",
    "SHIRA": "a sparse high-rank update",
    "SUPERTUNING": "a sparse update of selected weight entries",
    "C3A": "circular convolutions, a full-rank update",
    "RANDLORA": "a full-rank combination of random low-rank bases",
    "LN_TUNING": "fine-tuned LayerNorm parameters",
    "TRAINABLE_TOKENS": "replaced embedding rows",
    "BEFT": "bias fine-tuning",
    "SHADOW": "a parallel shadow network",
    "POLY": "an input-routed mixture of LoRA modules",
    "XLORA": "an input-routed mixture of LoRA adapters",
}
# Additive low-rank updates whose exact ΔW is not implemented: refused by name
# rather than audited with LoRA's formula.
LOW_RANK_NOT_IMPLEMENTED: Dict[str, str] = {
    "GRALORA": "block-wise (granular) low-rank updates",
    "VBLORA": "low-rank factors assembled from a shared vector bank",
    "UNILORA": "low-rank factors drawn from one shared parameter vector",
    "LILY": "low-rank updates with shared projectors",
    "PVERA": "probabilistic VeRA",
    "PSOFT": "B·(R − I)·A with an orthogonal core",
}


def peft_type_refusal(raw_config: Any) -> Optional[str]:
    """Why the adapter a PEFT config describes cannot be audited, or None.

    One line for the CLI's exit 2: the type named, and why.
    """
    if not isinstance(raw_config, Mapping):
        return None
    peft_type = raw_config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type in PEFT_VARIANTS:
        if peft_type == "VERA" and raw_config.get("save_projection") is False:
            return ("peft_type VERA with save_projection false: the shared projections vera_A / vera_B are not in the "
                    "file (PEFT regenerates them from projection_prng_key with torch's random generator), so ΔW "
                    "cannot be computed; gradience_lite does not invent them")
        return None
    if peft_type in NOT_LOW_RANK_ADDITIVE:
        return (f"peft_type {peft_type} ({NOT_LOW_RANK_ADDITIVE[peft_type]}) is not a low-rank additive update "
                "ΔW = B·A; gradience_lite audits only LoRA, LoHa, LoKr, AdaLoRA and VeRA")
    if peft_type in LOW_RANK_NOT_IMPLEMENTED:
        return (f"peft_type {peft_type} ({LOW_RANK_NOT_IMPLEMENTED[peft_type]}) is a low-rank additive update whose "
                "exact ΔW gradience_lite does not implement; refused rather than audited with LoRA's formula")
    return f"peft_type {peft_type!r} is not a PEFT type gradience_lite knows; refused rather than audited as LoRA"


# ══ 4. keys → LoRA modules ═══════════════════════════════════════════════════

PEFT_WRAPPER = "base_model.model."
# An in-memory (unsaved) state dict still carries the adapter name: lora_A.default.weight.
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:"
    r"(?P<factor>lora_A|lora_B)(?:\.[^.]+)?\.weight"
    r"|(?P<embedding>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?"
    r"|lora_B(?:\.[^.]+)?\.(?P<bias>bias)"
    r"|(?P<magnitude>lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?"
    r"|(?P<diag>lora_diag)(?:\.[^.]+)?"
    r")$")


class LoraModule(NamedTuple):
    name: str  # the base model's own module path (PEFT wrapper removed), or the format's module name
    kind: str  # "linear" | "embedding"; conv is decided from the factors' shapes
    a_key: Optional[str]  # PEFT lora_A / kohya lora_down / MLX lora_a
    b_key: Optional[str]  # PEFT lora_B / kohya lora_up / MLX lora_b
    bias_key: Optional[str] = None
    magnitude_key: Optional[str] = None  # PEFT lora_magnitude_vector, kohya/LyCORIS dora_scale, MLX .m
    duplicate_keys: Tuple[str, ...] = ()  # a second key for a role already filled
    family: str = "lora"  # "lora" | "loha" | "lokr" | "adalora" | "vera"
    layout: str = "peft"  # "peft": A r×in, B out×r;  "mlx": A in×r, B r×out (SwitchLinear: per expert, PEFT-like)
    expert: Optional[int] = None  # index along a leading experts axis (MLX SwitchLinear)
    parts: Tuple[Tuple[str, str], ...] = ()  # further tensors by role: "alpha", "mid", "hada_w1_a", "lora_diag", …
    component: Optional[str] = None  # diffusers pipeline component ("unet", "text_encoder", …)
    experts: Optional[int] = None  # PEFT ParamWrapper: experts fused along the rank axis (layout "peft_experts")
    blocks: Optional[Tuple[str, int]] = None  # BD-LoRA: ("lora_A" | "lora_B", number of diagonal blocks)
    in_features: Optional[int] = None  # the base layer's input width where the format stores none (VeRA)

    def part(self, role: str) -> Optional[str]:
        return dict(self.parts).get(role)


def module_name_from_prefix(prefix: str) -> str:
    return prefix[len(PEFT_WRAPPER):] if prefix.startswith(PEFT_WRAPPER) else prefix


def group_lora_keys(keys: Iterable[str]) -> Tuple[List[LoraModule], List[str]]:
    """Group state-dict keys into LoRA modules; return (modules, non-LoRA keys).

    Non-LoRA keys are full tensors saved alongside (``modules_to_save``,
    resized embeddings): listed in the report, not audited as LoRA.
    """
    parts: Dict[str, Dict[str, Any]] = {}
    others: List[str] = []
    for key in keys:
        match = _LORA_KEY.match(key)
        if match is None:
            others.append(key)
            continue
        module = module_name_from_prefix(match["module"])
        slot = parts.setdefault(module, {"kind": "linear"})
        if match["factor"]:
            role = "a_key" if match["factor"] == "lora_A" else "b_key"
        elif match["embedding"]:
            slot["kind"] = "embedding"
            role = "a_key" if match["embedding"].endswith("A") else "b_key"
        elif match["diag"]:
            role = "lora_diag"
        else:
            role = "bias_key" if match["bias"] else "magnitude_key"
        if role in slot:  # e.g. lora_A.weight and lora_A.default.weight: which one is real is unknowable
            slot.setdefault("duplicates", []).append(key)
            continue
        slot[role] = key
    modules = [LoraModule(name, slot["kind"], slot.get("a_key"), slot.get("b_key"),
                          slot.get("bias_key"), slot.get("magnitude_key"), tuple(slot.get("duplicates", ())),
                          parts=(("lora_diag", slot["lora_diag"]),) if "lora_diag" in slot else ())
               for name, slot in sorted(parts.items(), key=lambda item: _natural_key(item[0]))]
    return modules, others


# Numbers in names are read with [0-9]{1,9} only: str.isdigit() accepts "²" and
# int() refuses it, and a 5,000-digit index is over int()'s own limit.
_INDEX_DIGITS = re.compile(r"[0-9]{1,9}")


def _natural_key(name: str) -> List[Any]:
    # "layers.10" after "layers.9": order modules the way a reader expects.
    return [(0, int(part), "") if _INDEX_DIGITS.fullmatch(part) else (1, 0, part) for part in name.split(".")]


# ── other formats: kohya / LyCORIS / diffusers / MLX ────────────────────────
# The format is recognised from the keys (and metadata), never from shapes.
# kohya-ss/sd-scripts networks/lora.py and LyCORIS lycoris/modules/*.py store
# "<flattened_module_name>.<role>"; MLX-LM stores "<module>.lora_a" (in×r) and
# ".lora_b" (r×out), transposed relative to PEFT; diffusers stores PEFT keys
# under a pipeline component prefix, or (older) "...lora.down.weight".

_KOHYA_ROLES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
                "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_KOHYA_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>" + "|".join(re.escape(r) for r in _KOHYA_ROLES) + r")$")
_OLD_DIFFUSERS_KEY = re.compile(r"^(?P<module>.+?)[._]lora\.(?P<role>down|up)\.weight$")
_MLX_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>lora_a|lora_b|m)$")
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")
KOHYA_METADATA = ("ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_base_model_version",
                  "ss_network_args", "ss_output_name")


def detect_format(keys: Sequence[str], metadata: Mapping[str, str], config: Optional[Mapping[str, Any]]) -> str:
    """"peft", "diffusers", "kohya", "lycoris", "diffusers-old" or "mlx", from keys and metadata.

    LyCORIS files may mix LoCon keys (lora_down/lora_up) with LoHa/LoKr keys:
    any hada_/lokr_ key makes the file "lycoris".
    PEFT's own LoHa / LoKr / AdaLoRA / VeRA are "peft": their config says so.
    """
    peft_type = config.get("peft_type") if isinstance(config, Mapping) else None
    if isinstance(peft_type, str) and peft_type in PEFT_VARIANTS and PEFT_VARIANTS[peft_type].roles:
        return "peft"  # PEFT's LoHa / LoKr keys look like LyCORIS's; the config says whose they are
    if any(".hada_w1_a" in key or ".lokr_w1" in key or ".lokr_w2" in key for key in keys):
        return "lycoris"
    if any(key.endswith((".lora_down.weight", ".lora_up.weight")) for key in keys):
        return "kohya"
    if any(_OLD_DIFFUSERS_KEY.match(key) for key in keys):
        return "diffusers-old"
    if any(key.endswith((".lora_a", ".lora_b")) for key in keys) or (
            isinstance(config, Mapping) and isinstance(config.get("lora_parameters"), Mapping)):
        return "mlx"
    if "lora_adapter_metadata" in metadata or any(key.split(".", 1)[0] in DIFFUSERS_COMPONENTS and ".lora_" in key
                                                  for key in keys):
        return "diffusers"
    return "peft"


def _group_kohya_keys(keys: Iterable[str]) -> Tuple[List[LoraModule], List[str]]:
    parts: Dict[str, Dict[str, str]] = {}
    others: List[str] = []
    for key in keys:
        match = _KOHYA_KEY.match(key) or _OLD_DIFFUSERS_KEY.match(key)
        if match is None:
            others.append(key)
            continue
        role = {"down": "lora_down.weight", "up": "lora_up.weight"}.get(match["role"], match["role"])
        parts.setdefault(match["module"], {})[role] = key
    modules = []
    for name, roles in sorted(parts.items(), key=lambda item: _natural_key(item[0])):
        family = "loha" if "hada_w1_a" in roles else "lokr" if any(r.startswith("lokr_") for r in roles) else "lora"
        extra = tuple((role, key) for role, key in sorted(roles.items())
                      if role not in ("lora_down.weight", "lora_up.weight", "dora_scale"))
        modules.append(LoraModule(name, "linear", roles.get("lora_down.weight"), roles.get("lora_up.weight"),
                                  magnitude_key=roles.get("dora_scale"), family=family, parts=extra))
    return modules, others


def _group_peft_tuner_keys(keys: Iterable[str], variant: PeftVariant) -> Tuple[List[LoraModule], List[str]]:
    """PEFT LoHa / LoKr / AdaLoRA / VeRA save ``<prefix><module>.<role>`` with the
    roles of the tuner's layer class; VeRA's shared ``base_model.vera_A`` /
    ``vera_B`` join every module."""
    parts: Dict[str, Dict[str, str]] = {}
    shared: Dict[str, str] = {}
    others: List[str] = []
    for key in keys:
        prefix, _, role = key.rpartition(".")
        if role in variant.shared_roles and prefix == "base_model":
            shared[role] = key
        elif role in variant.roles and prefix:
            parts.setdefault(module_name_from_prefix(prefix), {})[role] = key
        else:
            others.append(key)
    modules = [LoraModule(name, "linear", None, None, family=variant.family,
                          parts=tuple(sorted({**shared, **roles}.items())))
               for name, roles in sorted(parts.items(), key=lambda item: _natural_key(item[0]))]
    return modules, others


# MLX SwitchLinear stores experts along a leading axis, one module each.  Real
# MoE models have at most 256 routed experts (DeepSeek-V3); a header claiming
# 10**7 (with zero bytes behind them) would otherwise create 10**7 modules.
MAX_EXPERTS = 4096


def _group_mlx_keys(keys: Iterable[str], shape_of: Callable[[str], Tuple[int, ...]]
                    ) -> Tuple[List[LoraModule], List[str]]:
    parts: Dict[str, Dict[str, str]] = {}
    others: List[str] = []
    for key in keys:
        match = _MLX_KEY.match(key)
        if match is None or (match["role"] == "m" and not (key[:-2] + ".lora_a" in keys or key[:-2] + ".lora_b" in keys)):
            others.append(key)
            continue
        parts.setdefault(match["module"], {})[match["role"]] = key
    modules = []
    for name, roles in sorted(parts.items(), key=lambda item: _natural_key(item[0])):
        a_key, b_key, m_key = roles.get("lora_a"), roles.get("lora_b"), roles.get("m")
        a_shape = shape_of(a_key) if a_key else ()
        if len(a_shape) == 3 and a_shape[0] <= MAX_EXPERTS:  # LoRASwitchLinear: (E, r, in) / (E, out, r), one update per expert
            modules.extend(LoraModule(f"{name}[{expert}]", "linear", a_key, b_key, layout="mlx", expert=expert)
                           for expert in range(a_shape[0]))
        else:
            modules.append(LoraModule(name, "linear", a_key, b_key, magnitude_key=m_key, layout="mlx"))
    return modules, others


def group_modules(adapter_format: str, keys: Sequence[str], shape_of: Callable[[str], Tuple[int, ...]],
                  peft_type: Optional[str] = None) -> Tuple[List[LoraModule], List[str]]:
    """Group a file's keys into modules by its format (and PEFT tuner); return (modules, non-LoRA keys)."""
    variant = PEFT_VARIANTS.get(peft_type) if adapter_format == "peft" and isinstance(peft_type, str) else None
    if variant is not None and variant.roles:
        return _group_peft_tuner_keys(keys, variant)
    if adapter_format in ("kohya", "lycoris", "diffusers-old"):
        return _group_kohya_keys(keys)
    if adapter_format == "mlx":
        return _group_mlx_keys(set(keys), shape_of)
    modules, others = group_lora_keys(keys)
    if adapter_format == "diffusers":
        modules = [module._replace(component=module.name.split(".", 1)[0])
                   if module.name.split(".", 1)[0] in DIFFUSERS_COMPONENTS else module for module in modules]
    return modules, others


# ── LoraConfig fields that change how a PEFT module's factors combine ───────
# PEFT 0.21.2, peft/tuners/lora/:
#   KaSA (variants.py, KasaLinearVariant.forward): ΔW = s·B·diag(lora_diag)·A.
#   BD-LoRA (variants.py, BlockDiagonalLinear / BdLoraLinearVariant): lora_A or
#     lora_B is block-diagonal, its .weight holding the diagonal blocks stacked by rows.
#   target_parameters (layer.py, ParamWrapper): E experts fused into one pair,
#     lora_A (r·E, in) expert-major and lora_B (out, r·E) rank-major;
#     ΔW_e = s·B[:, e::E]·A[e·r:(e+1)·r] (stored transposed when the experts are (E, in, out)).

# PEFT wraps each targeted nn.Parameter of a module in its own ParamWrapper,
# nested in the module's parameter-registration order (the first registered is
# innermost); the saved keys only show the depth, one ".base_layer" per level.
# transformers' expert modules register their input projection before down_proj.
EXPERT_PARAMETER_ORDER = ("gate_up_proj", "up_proj", "down_proj")
_WRAPPER_LEVEL = ".base_layer"


def _targeted_parameters(path: str, by_module: Mapping[str, Dict[str, None]]) -> Tuple[str, ...]:
    # PEFT (tuners_utils._inject_parameters): "<module>.<param>" is targeted when it equals
    # a listed name or ends with "." + that name, i.e. when the listed name's module part
    # is a dot-aligned tail of the module path (or empty).
    parts = path.split(".")
    found: Dict[str, None] = {}  # an ordered set
    for head in [".".join(parts[i:]) for i in range(len(parts))] + [""]:
        found.update(by_module.get(head, {}))
    return tuple(found)


def _parameter_wrappers(modules: Sequence[LoraModule], target_parameters: Sequence[str]
                        ) -> Tuple[Dict[str, Tuple[str, str]], Dict[str, str]]:
    """Saved module name → (module path, parameter name) for PEFT ParamWrappers,
    and module name → why the parameter cannot be told."""
    by_module: Dict[str, Dict[str, None]] = {}
    for target in target_parameters:
        head, _, parameter = target.rpartition(".")
        by_module.setdefault(head, {})[parameter] = None
    levels: Dict[str, Dict[int, str]] = {}
    for module in modules if by_module else ():
        path, depth = module.name, 0
        while path.endswith(_WRAPPER_LEVEL):
            path, depth = path[:-len(_WRAPPER_LEVEL)], depth + 1
        if _targeted_parameters(path, by_module):
            levels.setdefault(path, {})[depth] = module.name
    owners, problems = {}, {}
    for path, by_depth in levels.items():
        targeted = _targeted_parameters(path, by_module)
        if len(targeted) == 1 and set(by_depth) == {0}:
            owners[by_depth[0]] = (path, targeted[0])
        elif set(by_depth) == set(range(len(targeted))) and all(p in EXPERT_PARAMETER_ORDER for p in targeted):
            innermost_first = sorted(targeted, key=EXPERT_PARAMETER_ORDER.index)
            for depth, name in by_depth.items():
                owners[name] = (path, innermost_first[len(targeted) - 1 - depth])
        else:
            for name in by_depth.values():
                problems[name] = (f"{name}: target_parameters: {len(by_depth)} nested ParamWrapper(s) on {path} "
                                  f"for parameters {_short_repr(list(targeted))}; which is which follows the "
                                  "module's parameter registration order, unknown here; not audited")
    return owners, problems


def _expert_modules(module: LoraModule, path: str, parameter: str, config: AdapterConfig,
                    shape_of: Callable[[str], Tuple[int, ...]]) -> Tuple[List[LoraModule], Optional[str]]:
    """One module per expert, named "<module path>.<parameter name>[e]" (one, without [e], for a 2-D parameter)."""
    key = f"{path}.{parameter}"  # PEFT matches rank_pattern / alpha_pattern against this name
    if module.a_key is None or module.b_key is None:
        return [module._replace(name=key)], None
    try:
        rank_key = match_pattern(config.rank_pattern, key)
    except ResourceCapExceeded as error:
        return [], f"{key}: {error}; not audited"
    rank = rank_key.value if rank_key else config.r
    a_shape, b_shape = shape_of(module.a_key), shape_of(module.b_key)
    if rank is None:
        return [], f"{key}: target_parameters: the config has no r to split the fused experts' factors by; not audited"
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] % rank or b_shape[1] != a_shape[0]:
        return [], (f"{key}: target_parameters: factors A{list(a_shape)} / B{list(b_shape)} are not "
                    f"(r·E, in) / (out, r·E) with r = {rank}; not audited")
    experts = a_shape[0] // rank
    if experts > MAX_EXPERTS:  # a header can claim 10⁷ experts with zero bytes behind them
        return [], f"{key}: target_parameters: {experts} experts, over the MAX_EXPERTS cap ({MAX_EXPERTS}); not audited"
    if experts == 1:
        return [module._replace(name=key)], None
    return [module._replace(name=f"{key}[{expert}]", family="lora_expert", layout="peft_experts", expert=expert,
                            experts=experts) for expert in range(experts)], None


def _bd_lora_module(module: LoraModule, bd_lora: BdLora) -> Tuple[Optional[LoraModule], Optional[str]]:
    # PEFT (BdLoraLinearVariant.init): "pattern in target_name", a plain substring test.
    side_a = any(pattern in module.name for pattern in bd_lora.a_patterns)
    side_b = any(pattern in module.name for pattern in bd_lora.b_patterns)
    if bd_lora.nblocks < 1 or (side_a and side_b):
        return None, f"{module.name}: use_bdlora: cannot tell which factor is block-diagonal; not audited"
    if not (side_a or side_b):
        return module, None  # match_strict=False: a plain LoRA module
    return module._replace(family="bd_lora", blocks=("lora_A" if side_a else "lora_B", bd_lora.nblocks)), None


def resolve_lora_fields(modules: Sequence[LoraModule], non_lora: Sequence[str], config: AdapterConfig,
                        shape_of: Callable[[str], Tuple[int, ...]]) -> Tuple[List[LoraModule], List[str], List[str]]:
    """Apply the LoraConfig fields that change how a PEFT module's factors combine
    (KaSA, BD-LoRA, target_parameters) and the refusals.

    Returns (modules to audit, one issue per refused module, config issues).
    """
    notes: List[str] = []
    refused = [f"{module_name_from_prefix(key.rsplit('.token_adapter', 1)[0])}: trainable_token_indices: PEFT "
               "replaces these embedding rows by the stored values (W[idx] := delta), a change that is not low-rank "
               "and needs the base weight; not audited" for key in non_lora if key.endswith("trainable_tokens_delta")]
    if config.refusals:
        return [], refused + [f"{module.name}: {'; '.join(config.refusals)}" for module in modules], notes
    stray_bias = [module.name for module in modules if module.bias_key and config.present and not config.lora_bias]
    if stray_bias:
        notes.append(f"config: lora_bias is false but {len(stray_bias)} module(s) saved lora_B.bias (e.g. "
                     f"{stray_bias[0]}); PEFT does not load it, so delta_bias_norm is a shift PEFT would not apply")
    if config.kasa:
        notes.append("config: kasa_config: when the adapter loads, PEFT also truncates each adapted base weight to "
                     "its top min(out, in) − r singular components; ΔW is the adapter's s·B·diag(d)·A on that "
                     "truncated weight, and base norms are of the stored base (same σ_max)")
    owners, problems = _parameter_wrappers(modules, config.target_parameters)
    resolved = []
    for module in modules:
        problem = problems.get(module.name)  # already "<module>: …"
        if module.name in owners:
            experts, problem = _expert_modules(module, *owners[module.name], config, shape_of)
            resolved.extend(experts)
        elif module.part("lora_diag"):
            if config.present and not config.kasa:
                problem = (f"{module.name}: lora_diag is saved but the config has no kasa_config (PEFT would drop it "
                           "on load); the adapter contradicts itself; not audited")
            else:
                resolved.append(module._replace(family="kasa"))
        elif config.kasa and module.a_key:
            problem = (f"{module.name}: kasa_config is set but no lora_diag is saved (PEFT would draw it at random "
                       "on load); not audited")
        elif config.bd_lora is not None and problem is None:
            module, problem = _bd_lora_module(module, config.bd_lora)
            resolved.extend([module] if module else [])
        elif problem is None:
            resolved.append(module)
        if problem:
            refused.append(problem)
    return resolved, refused, notes


_ATTN_TOKENS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "attn", "self_attn",
                "attention", "c_attn", "out_proj", "wqkv", "wq", "wk", "wv", "wo", "to_q", "to_k", "to_v",
                "to_out", "q_lin", "k_lin", "v_lin", "out_lin", "query_key_value", "cross_attn", "attn1", "attn2"}
_MLP_TOKENS = {"mlp", "ffn", "feed_forward", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc",
               "intermediate", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3", "experts", "gate_up_proj",
               "ff", "lin1", "lin2"}


_FLAT_ATTN = ("_attn", "attention", "_to_q_", "_to_k_", "_to_v_", "_to_out", "_q_proj_", "_k_proj_", "_v_proj_",
              "_o_proj_", "_out_proj_", "_qkv", "_query_", "_key_", "_value_", "_c_attn_")
_FLAT_MLP = ("_mlp_", "_ff_", "_fc1_", "_fc2_", "_gate_proj_", "_up_proj_", "_down_proj_", "feed_forward", "_c_fc_")


def module_type(name: str) -> str:
    """attn / mlp / other, from whole path components (never substrings).

    The marker nearest the leaf wins ("attentions.0.….ff.net" is an MLP inside
    an attention block).  kohya names flatten the path with underscores
    ("…_self_attn_q_proj"), so for them underscore-delimited markers are used.
    """
    name = pattern_name(name).lower()  # an expert index
    if "." not in name and "_" in name:
        flat = f"_{name}_"
        attn = max((flat.rfind(marker) for marker in _FLAT_ATTN), default=-1)
        mlp = max((flat.rfind(marker) for marker in _FLAT_MLP), default=-1)
    else:
        tokens = name.split(".")
        attn = max((i for i, token in enumerate(tokens) if token in _ATTN_TOKENS), default=-1)
        mlp = max((i for i, token in enumerate(tokens) if token in _MLP_TOKENS), default=-1)
        # BERT-style "layer.N.output.dense" is the feed-forward output projection.
        if mlp < 0 and attn < 0 and tokens[-2:] == ["output", "dense"]:
            return "mlp"
    if attn < 0 and mlp < 0:
        return "other"
    return "attn" if attn > mlp else "mlp"


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoder_layers|decoder_layers)\.([0-9]{1,9})(?:\.|$)")


_FLAT_LAYER_INDEX = re.compile(r"(?:^|_)(?:layers|layer|h|blocks|block)_([0-9]{1,9})(?:_|$)")


def layer_index(name: str) -> Optional[int]:
    match = _LAYER_INDEX.search(name) or ("." not in name and _FLAT_LAYER_INDEX.search(name))
    return int(match.group(1)) if match else None


# ── format + config → how to read one file ──────────────────────────────────

class AuditSetup(NamedTuple):
    """How to read one file: its format, config, scale rule, and what to report about them."""

    adapter_format: str
    config: AdapterConfig
    scale_rule: ScaleRule
    issues: List[str]
    format_metadata: Dict[str, str]
    in_features: Optional[Dict[str, int]] = None  # module → base input width, for formats that store none (VeRA)


def _diffusers_configs(metadata: Mapping[str, str], issues: List[str]) -> Dict[Optional[str], AdapterConfig]:
    """diffusers writes the LoraConfig into the safetensors metadata
    ``lora_adapter_metadata``; a pipeline save prefixes each field with its
    component ("unet.r", "text_encoder.lora_alpha")."""
    try:
        document = json.loads(metadata["lora_adapter_metadata"])
    except (ValueError, RecursionError) as error:
        issues.append(f"config: lora_adapter_metadata is not valid JSON ({error})")
        return {}
    if not isinstance(document, dict):
        issues.append("config: lora_adapter_metadata is not a JSON object")
        return {}
    grouped: Dict[Optional[str], Dict[str, Any]] = {}
    for key, value in document.items():
        component, _, field_name = key.partition(".")
        if field_name and component in DIFFUSERS_COMPONENTS:
            grouped.setdefault(component, {})[field_name] = value
        else:
            grouped.setdefault(None, {})[key] = value
    configs = {}
    for component, fields in grouped.items():
        config, config_issues = parse_adapter_config(fields)
        label = f"config ({component})" if component else "config"
        issues.extend(issue.replace("config:", f"{label}:", 1) for issue in config_issues)
        configs[component] = config
    return configs


def configure(adapter_format: str, raw_config: Any, load_issues: List[str],
              metadata: Mapping[str, str]) -> AuditSetup:
    """Pick the config and scale rule a format uses; never raises."""
    format_metadata = {key: metadata[key] for key in KOHYA_METADATA if key in metadata}
    if adapter_format in ("kohya", "lycoris", "diffusers-old"):
        # These formats keep alpha per module in the weights; adapter_config.json is not theirs.
        return AuditSetup(adapter_format, AdapterConfig(), kohya_scale, [], format_metadata)
    if adapter_format == "mlx":
        parameters = raw_config.get("lora_parameters") if isinstance(raw_config, Mapping) else None
        raw_scale = parameters.get("scale") if isinstance(parameters, Mapping) else None
        issues = [issue for issue in load_issues if "no adapter_config.json" not in issue]
        try:
            scale = _finite_number(raw_scale) if raw_scale is not None else None
        except ValueError:  # not a number, not finite, or an int past float range
            scale = None
        if scale is None:
            issues.append(f"config: no usable MLX lora_parameters.scale ({raw_scale!r}); scale taken as 1.0")
        return AuditSetup("mlx", AdapterConfig(present=raw_config is not None), absolute_scale(scale), issues,
                          format_metadata)
    issues = list(load_issues)
    if adapter_format == "diffusers" and raw_config is None and "lora_adapter_metadata" in metadata:
        issues = [issue for issue in issues if "no adapter_config.json" not in issue]
        configs = _diffusers_configs(metadata, issues)
        default = configs.get(None, AdapterConfig())

        def rule(module: LoraModule, rank: int, alpha: Optional[float]) -> ModuleScale:
            config = configs.get(module.component, default)
            # Patterns were written against the component's own module names.
            name = module.name[len(module.component) + 1:] if module.component else module.name
            return module_scale(config, name, rank)

        return AuditSetup(adapter_format, default if None in configs else next(iter(configs.values()), default),
                          rule, issues, format_metadata)
    config, config_issues = parse_adapter_config(raw_config)
    issues.extend(config_issues)
    if not config.present and not load_issues:  # a load issue already says why there is no config: not twice
        issues.append("config: no usable adapter config; r taken from the weights, scale = 1.0 for every module")
    variant = PEFT_VARIANTS.get(config.peft_type or "LORA", PEFT_VARIANTS["LORA"])
    return AuditSetup(adapter_format, config, variant.scale(config), issues, format_metadata)


# ══ 5. low-rank spectra ══════════════════════════════════════════════════════
# The singular values of B·A (B: m×r, A: r×n) are those of the r×r core
# R_B·R_Aᵀ, where B = Q_B·R_B and Aᵀ = Q_A·R_A are thin QR factorisations:
# B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ and Q_B, Q_A have orthonormal columns.
#
# Householder QR of a tall factor is ~15× slower than its Gram matrix, so R
# comes from the Gram matrix instead: with XᵀX = D·Ĝ·D (D = column norms, Ĝ
# unit-diagonal) and Ĝ = V·Λ·Vᵀ, R = Λ^½·Vᵀ·D satisfies RᵀR = XᵀX.  Scaling by
# the column norms first makes the error depend on κ of the *scaled* factor
# (Demmel–Veselić), so the graded columns trained LoRA factors have (B grows
# from zero, some directions barely move) cost no accuracy.  Only when the
# scaled factor itself is ill-conditioned (κ > 1e5) does Householder QR run.
# Zero columns (dead rank directions) are dropped: they add nothing to B·A.

CONDITION_LIMIT_SQ = 1e10  # κ(scaled X)² above which the Gram route is not accurate enough

# ── the resource budget ──
# Sizes come from headers and configs an attacker writes, so every allocation
# and every superlinear step is checked against a cap *before* it happens.
# Exceeding a cap is a module issue (or exit 2 for a whole file) naming it.
#
# The r×r route costs r³: ~1 s at r = 1024 on one core, ~8 s at 2048.  The
# largest ranks in published adapters (PiSSA / rsLoRA sweeps) are 1024.
MAX_RANK = 1024
# Elements of any matrix rebuilt from small factors (Tucker lora_mid, LoHa /
# LoKr halves, a dense ΔW): 2**24 float64 = 128 MiB, about the largest conv
# kernel of an SDXL UNet (1280 × 1280·3·3 = 14.7M).
MAX_DENSE_ELEMENTS = 1 << 24
# A dense SVD of an m×n matrix costs ~m·n·min(m, n) flops; 2**32 is a
# 1600×1600 SVD, a few seconds.  Larger dense spectra are refused.
MAX_DENSE_WORK = 1 << 32


class ResourceCapExceeded(ValueError):
    """A size from the file or config asks for more work or memory than a named cap allows."""


def check_dense(shape: Sequence[int], what: str, svd: bool = False) -> None:
    """Refuse (before allocating) a dense matrix over MAX_DENSE_ELEMENTS, or its
    SVD over MAX_DENSE_WORK."""
    elements = math.prod(shape)
    if elements > MAX_DENSE_ELEMENTS:
        raise ResourceCapExceeded(f"{what} would have {elements} elements, over the MAX_DENSE_ELEMENTS cap "
                                  f"({MAX_DENSE_ELEMENTS})")
    if svd and len(shape) == 2 and elements * min(shape) > MAX_DENSE_WORK:
        raise ResourceCapExceeded(f"the SVD of {what} ({shape[0]}×{shape[1]}) is over the MAX_DENSE_WORK cap "
                                  f"({MAX_DENSE_WORK} flops)")


def product_singular_values(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Singular values of B·A formed densely (for r > min(m, n), where ΔW is no
    larger than its factors).  Each factor is scaled to max |entry| 1 first, so
    the product cannot overflow and LAPACK never sees Inf; the scales multiply
    back at the end (Inf only where σ itself exceeds float64)."""
    check_dense((b.shape[0], a.shape[1]), "ΔW", svd=True)
    if b.shape[0] == 0 or a.shape[1] == 0:
        return np.zeros(0)
    scale_b, scale_a = float(np.max(np.abs(b), initial=0.0)), float(np.max(np.abs(a), initial=0.0))
    if scale_b == 0.0 or scale_a == 0.0:
        return np.zeros(min(b.shape[0], a.shape[1]))
    sigma = np.linalg.svd((b / scale_b) @ (a / scale_a), compute_uv=False)
    with np.errstate(over="ignore"):
        return sigma * scale_b * scale_a
# A column whose squared norm is below this may have lost digits to underflow
# in the Gram (values ~1e-150); such factors take the Householder route too.
GRAM_SAFE_MIN = 1e-280


def _pad_rows(factor: np.ndarray, rank: int) -> np.ndarray:
    # Zero rows change nothing in RᵀR; padding keeps every factor r×r, so
    # modules of equal rank stack into one batched problem.
    if factor.shape[0] == rank:
        return factor
    padded = np.zeros((rank, factor.shape[1]))
    padded[:factor.shape[0]] = factor[:rank]
    return padded


def gram_factor(x: np.ndarray, gram: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """An r×r matrix R with RᵀR = XᵀX for a float64 X (n×r); None if X holds NaN/Inf.

    ``gram`` (XᵀX) may be passed when already computed.
    """
    rank = x.shape[1]
    if gram is None:
        with np.errstate(over="ignore", invalid="ignore"):
            gram = x.T @ x
    if not np.isfinite(gram).all():  # checking the r×r Gram is far cheaper than checking X
        # Finite entries can still overflow when squared; Householder QR cannot.
        return _pad_rows(np.linalg.qr(x, mode="r"), rank) if np.isfinite(x).all() else None
    live = np.any(x != 0, axis=0)  # from X itself: a tiny column's square may underflow to 0
    factor = np.zeros((rank, rank))
    if not live.any():  # X is exactly zero
        return factor
    live_factors, ok = batched_gram_factors(gram[np.ix_(live, live)][None])
    live_factor = live_factors[0] if ok[0] else np.linalg.qr(x[:, live], mode="r")
    factor[:live_factor.shape[0], live] = live_factor[:rank]
    return factor


def batched_gram_factors(grams: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Factors for a stack of k Gram matrices (k×r×r) in one batched eigh.

    Returns (factors k×r×r, ok mask).  Where ``ok`` is False (a zero or tiny
    column, a non-finite Gram, or an ill-conditioned scaled factor) the
    caller must use :func:`gram_factor` with the factor itself.
    """
    squared_norms = np.diagonal(grams, axis1=1, axis2=2)
    ok = np.isfinite(grams).all(axis=(1, 2)) & (squared_norms >= GRAM_SAFE_MIN).all(axis=1)
    # Items that are not ok get a harmless stand-in, so one batched call serves all.
    safe_norms = np.sqrt(np.where(ok[:, None], squared_norms, 1.0))
    scaled = np.where(ok[:, None, None], grams, np.eye(grams.shape[1])) / (safe_norms[:, :, None] * safe_norms[:, None, :])
    eigenvalues, eigenvectors = np.linalg.eigh(scaled)
    ok &= eigenvalues[:, 0] > eigenvalues[:, -1] / CONDITION_LIMIT_SQ
    factors = np.sqrt(np.maximum(eigenvalues, 0.0))[:, :, None] * np.swapaxes(eigenvectors, 1, 2) * safe_norms[:, None, :]
    return factors, ok


def core_singular_values(factors_b: np.ndarray, factors_a: np.ndarray) -> np.ndarray:
    """Singular values (descending) of B·A from stacks of R_B and R_A: svd of R_B·R_Aᵀ.

    Each R is scaled to max |entry| 1 first: R_B·R_Aᵀ of factors near 1e300
    would overflow, and LAPACK given Inf prints to stdout and returns NaN.  The
    scales multiply back afterwards (Inf only where σ itself exceeds float64;
    the caller reports that module).
    """
    def unit(factors):
        scale = np.max(np.abs(factors), axis=(-2, -1), initial=0.0)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        return factors / scale[..., None, None], scale

    (scaled_b, scale_b), (scaled_a, scale_a) = unit(factors_b), unit(factors_a)
    core = scaled_b @ np.swapaxes(scaled_a, -1, -2)
    finite = np.isfinite(core).all(axis=(-2, -1))
    core = np.where(finite[..., None, None], core, 0.0)  # NaN factors: the caller has already refused them
    with np.errstate(over="ignore", invalid="ignore"):
        sigma = np.linalg.svd(core, compute_uv=False) * (scale_b * scale_a)[..., None]
    return np.where(finite[..., None], sigma, np.nan)


def lowrank_singular_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Singular values of B·A (descending, length r) without forming B·A.

    ``a`` is r×n and ``b`` is m×r, any float dtype; work is float64.  Raises
    ``ValueError`` if either factor holds NaN or Inf or B·A is empty.

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(4, 30)), rng.normal(size=(20, 4))
    >>> bool(np.allclose(lowrank_singular_values(a, b), np.linalg.svd(b @ a, compute_uv=False)[:4]))
    True
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("lowrank_singular_values: factors contain NaN or Inf")
    if min(a.shape[1], b.shape[0]) == 0:  # a header can claim any r for an empty factor: nothing to pad to r
        raise ValueError(f"lowrank_singular_values: B·A is empty (A {list(a.shape)}, B {list(b.shape)})")
    if a.shape[0] > min(a.shape[1], b.shape[0]):  # the r×r route would be larger than B·A itself
        sigma = np.zeros(a.shape[0])  # r ≤ the entries of A, which exist
        dense = product_singular_values(b, a)
        sigma[:dense.size] = dense
        return sigma
    if a.shape[0] > MAX_RANK:
        raise ResourceCapExceeded(f"rank {a.shape[0]} is over the MAX_RANK cap ({MAX_RANK})")
    return core_singular_values(gram_factor(b), gram_factor(a.T))


class Spectrum(NamedTuple):
    sigma_max: float
    frob_sq: float
    stable_rank: float
    effective_rank: float
    utilization: float
    energy_rank_90: int
    energy_rank_95: int
    energy_rank_99: int


ENERGY_THRESHOLDS = (0.90, 0.95, 0.99)


def batched_spectrum_metrics(sigma: np.ndarray, ranks: np.ndarray) -> List[Spectrum]:
    """Rank metrics for a stack of spectra (k×r, each row descending) with stored ranks ``ranks``.

    stable rank = Σσ²/σ₁²; effective rank = exp(entropy of σ/Σσ over σ > 1e-12);
    energy rank k@t = smallest k with Σ_{i≤k} σᵢ² ≥ t·Σσ².  A zero spectrum
    gives zeros everywhere.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    sigma_max = sigma[:, 0] if sigma.shape[1] else np.zeros(sigma.shape[0])
    nonzero = sigma_max > 0
    safe_max = np.where(nonzero, sigma_max, 1.0)
    # Every metric but σ_max and ‖ΔW‖²_F is scale-free: compute them from σ/σ₁,
    # whose squares cannot overflow (σ ~ 1e200 is finite; σ² is not).
    unit = sigma / safe_max[:, None]
    energy = np.cumsum(np.square(unit), axis=1) if sigma.shape[1] else np.zeros((sigma.shape[0], 1))
    with np.errstate(over="ignore"):
        frob_sq = energy[:, -1] * safe_max ** 2 * nonzero
    stable = np.where(nonzero, energy[:, -1], 0.0)
    positive = np.where(sigma > 1e-12, unit, 0.0)
    p = positive / np.where(nonzero, positive.sum(axis=1), 1.0)[:, None]
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    effective = np.where(nonzero, np.exp(entropy), 0.0)
    # Count the prefix sums still below the threshold: k = that count + 1.
    energy_ranks = [np.where(nonzero, (energy < t * energy[:, -1:]).sum(axis=1) + 1, 0) for t in ENERGY_THRESHOLDS]
    utilization = np.where(ranks > 0, stable / np.maximum(ranks, 1), 0.0)
    return [Spectrum(float(sigma_max[i]), float(frob_sq[i]), float(stable[i]), float(effective[i]),
                     float(utilization[i]), int(energy_ranks[0][i]), int(energy_ranks[1][i]), int(energy_ranks[2][i]))
            for i in range(sigma.shape[0])]


def spectrum_metrics(sigma: np.ndarray, rank: int) -> Spectrum:
    """The per-module rank metrics from the singular values of B·A (any order)."""
    ordered = np.sort(np.asarray(sigma, dtype=np.float64))[::-1]
    if ordered.size == 0:
        return Spectrum(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0)
    return batched_spectrum_metrics(ordered[None, :], np.array([rank]))[0]


# ══ 6. audit ═════════════════════════════════════════════════════════════════

@dataclass(frozen=True)
class ModuleAudit:
    """Everything the audit knows about one LoRA module.  Field names are the JSON contract."""

    name: str
    module_type: str
    layer_index: Optional[int]
    kind: str  # "linear" | "embedding" | "conv"
    r: int
    config_r: Optional[int]
    alpha: Optional[float]
    scale: float
    scale_rule: str
    rank_pattern_key: Optional[str]
    alpha_pattern_key: Optional[str]
    params: int
    a_shape: Tuple[int, ...]
    b_shape: Tuple[int, ...]
    dtype: str
    lora_a_key: str
    lora_b_key: str
    stable_rank: float
    effective_rank: float
    utilization: float
    sigma_max: float
    frob_sq: float
    energy_rank_90: int
    energy_rank_95: int
    energy_rank_99: int
    delta_sigma_max: float
    delta_fro_norm: float
    top_singular_values: Optional[Tuple[float, ...]] = None
    lora_bias_key: Optional[str] = None
    lora_bias_norm: Optional[float] = None
    delta_bias_norm: Optional[float] = None  # |s|·‖lora_B.bias‖: the shift PEFT adds to the output bias
    dora_magnitude: Optional[Dict[str, float]] = None
    base_sigma_max: Optional[float] = None
    base_fro_norm: Optional[float] = None
    udr: Optional[float] = None
    udr_f: Optional[float] = None
    sdi: Optional[float] = None
    family: str = "lora"  # "lora" | "loha" | "lokr" | "adalora" | "vera"
    max_rank: Optional[int] = None  # upper bound on rank(ΔW) given the factorisation
    lora_e: Optional[Tuple[float, ...]] = None  # AdaLoRA: the stored singular-value-like weights E, as saved
    issues: Tuple[str, ...] = ()
    # ΔW as the matrix it is added to: (out, in·∏kernel); an embedding's (num_embeddings, dim).
    delta_shape: Optional[Tuple[int, int]] = None
    dora_effective_sigma_max: Optional[float] = None  # ‖m ⊙ V/‖V‖_row − W₀‖₂, V = W₀ + s·B·A
    udr_dora_effective: Optional[float] = None
    dora_magnitude_change: Optional[Dict[str, float]] = None  # m / ‖W₀‖_row − 1 across output rows
    rank_suggestions: Dict[str, int] = field(default_factory=dict)  # policy → k (see "rank advice")
    # The whole spectrum of B·A, kept so advice can be recomputed for other
    # policies without re-reading the file; not part of the JSON row.
    singular_values: Tuple[float, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        row = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "singular_values"}
        row["rank_suggestions"] = dict(self.rank_suggestions)
        row["a_shape"], row["b_shape"] = list(self.a_shape), list(self.b_shape)
        row["delta_shape"] = list(self.delta_shape) if self.delta_shape is not None else None
        row["top_singular_values"] = list(self.top_singular_values) if self.top_singular_values is not None else None
        row["lora_e"] = list(self.lora_e) if self.lora_e is not None else None
        row["issues"] = list(self.issues)
        return row


# ── in-memory tensors from any framework ────────────────────────────────────
# A training loop hands over torch tensors (bf16, perhaps on a GPU, perhaps
# requiring grad), JAX or MLX arrays.  None of those frameworks is imported
# here: shapes and dtypes are read from attributes, and each tensor is asked,
# through its own methods, for a NumPy array of a dtype NumPy has — only when
# the audit reaches it, and only one at a time.

# A framework's dtype name (``str(t.dtype)`` after its last dot: "torch.bfloat16",
# "mlx.core.bfloat16", NumPy/JAX "bfloat16") → the safetensors name a file of
# the same tensors reports, so both routes give the same JSON.
FRAMEWORK_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
# Floats NumPy has no dtype for.  torch hands over their bits through an integer
# view of the same width (no copy; decoded here exactly as a file's bytes are);
# frameworks without one widen them to float32 themselves (exact for bf16 and fp8).
BIT_VIEWS = {"BF16": ("int16", np.uint16), "F8_E4M3": ("uint8", np.uint8), "F8_E5M2": ("uint8", np.uint8)}


def _describe_tensor(tensor: Any) -> Tuple[str, Tuple[int, ...], Optional[str]]:
    """(safetensors dtype name, shape, problem) of any array-like, without converting it."""
    if not (hasattr(tensor, "dtype") and hasattr(tensor, "shape")):
        tensor = np.asarray(tensor)  # lists, objects with only __array__
    framework_name = tensor.dtype.name if isinstance(tensor, np.ndarray) else str(tensor.dtype).rsplit(".", 1)[-1]
    shape = tuple(int(d) for d in tensor.shape)
    dtype = FRAMEWORK_DTYPES.get(framework_name)
    return (dtype, shape, None) if dtype else (framework_name, shape, f"unsupported dtype {framework_name}")


def _framework_dtype(value: Any, name: str) -> Any:
    """A dtype object of the framework that defines ``value``'s type (``torch.int16``,
    ``mlx.core.float32``), from the already imported module; None if it has none."""
    return getattr(sys.modules.get(type(value).__module__), name, None)


def _as_numpy(tensor: Any, dtype: str) -> np.ndarray:
    """The tensor's values as a NumPy array that :func:`decode` reads, converted by
    the tensor's own methods.

    torch: ``t.detach().to("cpu").numpy()`` — bf16 / fp8 through
    ``.view(torch.int16 / torch.uint8)`` (their bits, no copy), else ``.float()``;
    MLX: ``a.astype(mlx.core.float32)``; JAX, NumPy (ml_dtypes) and
    ``__array__`` objects: ``numpy.asarray``, widened by NumPy.
    """
    narrow = dtype in BIT_VIEWS
    value = tensor.detach() if callable(getattr(tensor, "detach", None)) else tensor
    if callable(getattr(value, "numpy", None)) and callable(getattr(value, "float", None)):  # torch's API
        value = value.to("cpu") if callable(getattr(value, "to", None)) else value
        if not narrow:
            return value.numpy()
        integer_name, bits = BIT_VIEWS[dtype]
        integer = _framework_dtype(value, integer_name)
        return value.view(integer).numpy().view(bits) if integer is not None else value.float().numpy()
    if narrow and not isinstance(value, np.ndarray) and callable(getattr(value, "astype", None)):
        value = value.astype(_framework_dtype(value, "float32") or np.float32)
    array = np.asarray(value)
    return array.astype(np.float32) if narrow and array.dtype.kind != "f" else array


class _TensorSource:
    """Uniform access to tensors in a safetensors file or an in-memory dict.

    ``describe(key)`` → (dtype name, shape, problem); ``raw(key, index=None)``
    → the stored values (slab ``index`` of the first axis when given) as an
    array (decode with :func:`decode`); ``release(key)`` drops a tensor once
    it has been reduced (a framework tensor's NumPy copy).
    """

    def __init__(self, describe: Callable[[str], Tuple[str, Tuple[int, ...], Optional[str]]],
                 raw: Callable[..., np.ndarray], release: Callable[[str], None] = lambda key: None):
        self.describe, self.raw, self.release = describe, raw, release
        self._shared: Dict[str, np.ndarray] = {}

    def load(self, key: str) -> np.ndarray:
        """The whole tensor as a new float64 array."""
        return decode(self.raw(key), self.describe(key)[0])

    def load_shared(self, key: str) -> np.ndarray:
        """A tensor every module uses (VeRA's projections): decoded once and kept; never modify it."""
        if key not in self._shared:
            self._shared[key] = self.load(key)
            self.release(key)
        return self._shared[key]

    @classmethod
    def from_file(cls, sf: SafetensorsFile) -> "_TensorSource":
        def describe(key):
            info = sf.tensors[key]
            return info.dtype, info.shape, info.problem
        stored = Workspace()  # one reused buffer for stored bytes: each raw() overwrites the last
        return cls(describe, lambda key, index=None: raw_view(sf, sf.tensors[key], stored, index))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any]) -> "_TensorSource":
        """Any mapping of array-likes.  At most one tensor is held converted at a
        time (the audit reads a factor, reduces it and releases it), so a state
        dict of GPU tensors costs one host copy of its largest factor."""
        described = functools.lru_cache(maxsize=None)(lambda key: _describe_tensor(tensors[key]))
        held: Dict[str, np.ndarray] = {}

        def raw(key, index=None):
            if key not in held:
                held.clear()
                try:
                    held[key] = _as_numpy(tensors[key], described(key)[0])
                except Exception as error:  # noqa: BLE001 — whatever the framework raises, name the tensor
                    raise AdapterFormatError(f"tensor {key!r} ({type(tensors[key]).__name__}) could not be "
                                             f"converted to NumPy: {type(error).__name__}: {error}") from None
            return held[key] if index is None else held[key][index]

        return cls(described, raw, lambda key: held.pop(key, None))


def _is_float(dtype: str) -> bool:
    spec = DTYPES.get(dtype)
    return spec.is_float if spec is not None else dtype.startswith("FLOAT")


class FactorRef(NamedTuple):
    """Where one factor is stored and how to read it as a matrix."""

    key: str
    shape: Tuple[int, int]  # the stored tensor (or expert slice) viewed as a matrix
    rank_axis: int  # 0: stored as r×n (PEFT A, MLX B); 1: stored as n×r (PEFT B, MLX A)
    expert: Optional[int] = None
    stacked: Optional[Tuple[int, ...]] = None  # view the tensor with this shape before taking the expert
    expert_axis: int = 0  # the axis of the (stacked) tensor that indexes experts
    blocks: int = 1  # BD-LoRA: the matrix is block-diagonal; these are its blocks, stacked by rows


class _Factors(NamedTuple):
    kind: str  # "linear" | "embedding" | "conv"
    rank: int  # the size of the r×r problem
    a: Optional[FactorRef] = None  # plays PEFT's A (r×in); None for factors computed in memory
    b: Optional[FactorRef] = None  # plays PEFT's B (out×r)


def _factor_layout(module: LoraModule, a_shape: Tuple[int, ...], b_shape: Tuple[int, ...]) -> Tuple[Optional[_Factors], Optional[str]]:
    """Decide how A and B combine, from the format's convention first and shapes second.

    Shapes only confirm what the format says; they never choose an
    orientation (a square layer makes a transposed factor look valid).
    """
    if module.layout == "mlx" and module.expert is not None:
        if len(a_shape) != 3 or len(b_shape) != 3 or a_shape[0] != b_shape[0]:
            return None, f"MLX switch factors A{list(a_shape)} / B{list(b_shape)} are not (E, r, in) / (E, out, r)"
        a_shape, b_shape = a_shape[1:], b_shape[1:]  # per expert: PEFT orientation
    elif module.layout == "mlx":
        if len(a_shape) == 3 and a_shape[0] > MAX_EXPERTS:
            return None, f"MLX switch factors claim {a_shape[0]} experts, over the MAX_EXPERTS cap ({MAX_EXPERTS})"
        if len(a_shape) != 2 or len(b_shape) != 2:
            return None, f"MLX factors lora_a{list(a_shape)} / lora_b{list(b_shape)} are not 2-D"
        if a_shape[1] != b_shape[0]:
            return None, f"rank mismatch: lora_a has {a_shape[1]} columns, lora_b has {b_shape[0]} rows"
        rank = a_shape[1]
        return _Factors(module.kind, rank, FactorRef(module.a_key, (a_shape[0], rank), 1),
                        FactorRef(module.b_key, (rank, b_shape[1]), 0)), None
    if module.layout == "peft_experts":
        # PEFT ParamWrapper (layer.py get_delta_factors): A (r·E, in) viewed as (E, r, in),
        # B (out, r·E) viewed as (out, r, E); expert e is A[e] and B[:, :, e].
        experts = module.experts or 1
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] % experts or b_shape[1] != a_shape[0]:
            return None, f"fused expert factors A{list(a_shape)} / B{list(b_shape)} are not (r·E, in) / (out, r·E)"
        rank = a_shape[0] // experts
        return _Factors(module.kind, rank,
                        FactorRef(module.a_key, (rank, a_shape[1]), 0, module.expert, (experts, rank, a_shape[1]), 0),
                        FactorRef(module.b_key, (b_shape[0], rank), 1, module.expert, (b_shape[0], rank, experts),
                                  2)), None
    if module.blocks is not None:
        # BD-LoRA (variants.py BlockDiagonalLinear): the block-diagonal factor's weight is
        # (rows, columns / nblocks), block i being its i-th chunk of rows.
        side, nblocks = module.blocks
        rank = a_shape[0] if a_shape else 0
        if len(a_shape) != 2 or len(b_shape) != 2:
            fits = False
        elif side == "lora_A":  # A (r, in/nb), B (out, r)
            fits = b_shape[1] == rank and rank % nblocks == 0
        else:  # A (r, in), B (out, r/nb)
            fits = b_shape[1] * nblocks == rank and b_shape[0] % nblocks == 0
        if not fits:
            return None, (f"BD-LoRA factors A{list(a_shape)} / B{list(b_shape)} do not fit {nblocks} diagonal "
                          f"blocks of {side}")
        a_blocks, b_blocks = (nblocks, 1) if side == "lora_A" else (1, nblocks)
        return _Factors(module.kind, rank, FactorRef(module.a_key, (rank, a_shape[1]), 0, blocks=a_blocks),
                        FactorRef(module.b_key, (b_shape[0], b_shape[1]), 1, blocks=b_blocks)), None
    expert = module.expert
    if len(a_shape) == 2 and len(b_shape) == 2:
        if a_shape[0] != b_shape[1]:
            return None, f"rank mismatch: lora_A has {a_shape[0]} rows, lora_B has {b_shape[1]} columns"
        rank = a_shape[0]
        return _Factors(module.kind, rank, FactorRef(module.a_key, (rank, a_shape[1]), 0, expert),
                        FactorRef(module.b_key, (b_shape[0], rank), 1, expert)), None
    if module.kind == "linear" and len(a_shape) >= 3 and len(b_shape) == len(a_shape) and all(d == 1 for d in b_shape[2:]):
        # Conv LoRA (PEFT, kohya): A is (r, in, *kernel), B is (out, r, 1, ...); ΔW as a matrix is B(out×r)·A(r×in·∏kernel).
        if a_shape[0] != b_shape[1]:
            return None, f"rank mismatch: conv lora_A has {a_shape[0]} output channels, lora_B has {b_shape[1]} input channels"
        rank = a_shape[0]
        return _Factors("conv", rank, FactorRef(module.a_key, (rank, math.prod(a_shape[1:])), 0),
                        FactorRef(module.b_key, (b_shape[0], rank), 1)), None
    return None, f"factor shapes A{list(a_shape)} / B{list(b_shape)} are not a known LoRA layout"


def _delta_shape(layout: _Factors) -> Tuple[int, int]:
    """ΔW's matrix shape from the factor refs: in is A's long side, out is B's."""
    columns = layout.a.shape[1 - layout.a.rank_axis]
    rows = layout.b.shape[1 - layout.b.rank_axis]
    # PEFT's embedding update is (B·A)ᵀ: (num_embeddings, dim), the embedding weight's own shape.
    return (columns, rows) if layout.kind == "embedding" else (rows, columns)


def _dora_stats(values: np.ndarray) -> Dict[str, float]:
    return {"size": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())} if values.size else {"size": 0}


class _PreparedModule(NamedTuple):
    """A module after the streaming pass: everything but the r×r work."""

    module: LoraModule
    layout: _Factors
    a_shape: Tuple[int, ...]
    b_shape: Tuple[int, ...]
    dtype: str
    params: int
    scale: "ModuleScale"
    r: int  # the stored dimension reported as r
    max_rank: int  # an upper bound on rank(ΔW): r for LoRA, r² for LoHa, a product for LoKr
    gram_a: Optional[np.ndarray]  # A·Aᵀ (r×r); dropped once the spectrum is known
    gram_b: Optional[np.ndarray]  # Bᵀ·B (r×r)
    bias_norm: Optional[float]
    magnitude: Optional[Dict[str, float]]
    delta_shape: Optional[Tuple[int, int]] = None  # computed families; stored factors: from the layout
    tall: Optional[Tuple[np.ndarray, np.ndarray]] = None  # computed factors (Aᵀ, B), for the QR fallback
    sigma: Optional[np.ndarray] = None  # a spectrum computed directly (LoKr, dense fallback)
    lora_e: Optional[Tuple[float, ...]] = None
    diag: Optional[np.ndarray] = None  # KaSA: ΔW = s·B·diag(d)·A, folded into A's r×r factor


CHUNK_ELEMENTS = 1 << 18  # 2 MiB of float64: bounded memory, and large enough that per-chunk overhead is noise


def _stored_matrix(source: _TensorSource, ref: FactorRef) -> np.ndarray:
    if ref.expert is not None and ref.expert_axis == 0 and not ref.stacked:
        # Experts on the leading axis: read only this expert's slab (E reads of
        # one slab each, not E reads of the whole tensor).
        return source.raw(ref.key, ref.expert).reshape(ref.shape)
    raw = source.raw(ref.key)
    if ref.expert is not None:  # a view, never a copy: the expert's slice is read chunk by chunk later
        stacked = raw.reshape(ref.stacked) if ref.stacked else raw
        raw = stacked[ref.expert] if ref.expert_axis == 0 else np.moveaxis(stacked, ref.expert_axis, 0)[ref.expert]
    return raw.reshape(ref.shape)


def _block_diagonal(blocks: Sequence[np.ndarray]) -> np.ndarray:
    out = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)))
    row = column = 0
    for block in blocks:
        out[row:row + block.shape[0], column:column + block.shape[1]] = block
        row, column = row + block.shape[0], column + block.shape[1]
    return out


def _streamed_gram(source: _TensorSource, ref: FactorRef, workspace: Optional[Workspace]) -> np.ndarray:
    """The r×r Gram of a factor (A·Aᵀ for A, Bᵀ·B for B), decoded chunk by chunk along its long axis.

    Peak memory is one chunk, whatever the tensor's size.  A block-diagonal
    factor's Gram is block-diagonal: one Gram per stored block.
    """
    if ref.expert is not None and ref.stacked is not None:
        def every_expert() -> np.ndarray:
            return _fused_expert_grams(source, ref, workspace)
        key = (ref.key, ref.stacked, ref.expert_axis)
        return (workspace.remember(key, every_expert) if workspace is not None else every_expert())[ref.expert]
    dtype_name = source.describe(ref.key)[0]
    grams = []
    stored = _stored_matrix(source, ref)
    for raw in np.split(stored, ref.blocks, axis=0) if ref.blocks > 1 else (stored,):
        rank, length = raw.shape[ref.rank_axis], raw.shape[1 - ref.rank_axis]
        step = max(1, CHUNK_ELEMENTS // max(rank, 1))
        gram = np.zeros((rank, rank))
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite Gram is handled by the caller
            for start in range(0, length, step):
                if ref.rank_axis == 0:
                    chunk = decode(raw[:, start:start + step], dtype_name, workspace=workspace)
                    gram += chunk @ chunk.T
                else:
                    chunk = decode(raw[start:start + step], dtype_name, workspace=workspace)
                    gram += chunk.T @ chunk
        grams.append(gram)
    return grams[0] if ref.blocks == 1 else _block_diagonal(grams)


def _fused_expert_grams(source: _TensorSource, ref: FactorRef, workspace: Optional[Workspace]) -> np.ndarray:
    """The Gram of every expert (E×r×r) of a PEFT fused factor — A viewed (E, r, in),
    B viewed (out, r, E) — in one pass over the tensor.  B's experts interleave, so
    one expert's slice is strided: read one expert at a time, the whole tensor
    would pass through memory once per expert."""
    dtype_name = source.describe(ref.key)[0]
    # experts first, rank last: A → (E, in, r), B → (E, out, r); the rank axis is 1 in both layouts
    view = np.moveaxis(source.raw(ref.key).reshape(ref.stacked), (ref.expert_axis, 1), (0, 2))
    experts, length, rank = view.shape
    step = max(1, CHUNK_ELEMENTS // max(rank * experts, 1))
    grams = np.zeros((experts, rank, rank))
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite Gram is handled by the caller
        for start in range(0, length, step):
            # decoded into a contiguous (E, rows, r): a batched product over strided operands is twice as slow
            chunk = decode(view[:, start:start + step], dtype_name, workspace=workspace)
            grams += np.swapaxes(chunk, 1, 2) @ chunk
    return grams


def _tall_factor(source: _TensorSource, ref: FactorRef) -> np.ndarray:
    """The whole factor as a tall float64 matrix (n×r), for the rare Householder-QR path."""
    values = decode(_stored_matrix(source, ref), source.describe(ref.key)[0])
    talls = [block.T if ref.rank_axis == 0 else block for block in np.split(values, ref.blocks, axis=0)]
    return talls[0] if ref.blocks == 1 else _block_diagonal(talls)


def _check_tensors(module: LoraModule, source: _TensorSource, keys: Sequence[str]) -> Optional[str]:
    for key in keys:
        dtype, _, problem = source.describe(key)
        if problem:
            return f"{module.name}: tensor {key!r}: {problem}; not audited"
        if not _is_float(dtype):
            return f"{module.name}: tensor {key!r} has non-floating dtype {dtype}; not audited"
    return None


def _load_finite(module: LoraModule, source: _TensorSource, key: str, shared: bool = False
                 ) -> Tuple[Optional[np.ndarray], Optional[str]]:
    if shared:
        values = source.load_shared(key)
    else:
        values = source.load(key)
        source.release(key)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        return None, f"{module.name}: {key.rsplit('.', 1)[-1] if '.' in key else key} contains {bad} NaN/Inf values; not audited"
    return values, None


def _extras(module: LoraModule, source: _TensorSource) -> Tuple[Optional[float], Optional[Dict[str, float]]]:
    bias_norm = magnitude = None
    if module.bias_key is not None:
        bias_norm = float(np.linalg.norm(source.load(module.bias_key)))
        source.release(module.bias_key)
    if module.magnitude_key is not None:
        magnitude = _dora_stats(source.load(module.magnitude_key))
        source.release(module.magnitude_key)
    return bias_norm, magnitude


# Families whose ΔW is s·B·A with stored factors (seen through a view: an expert's
# slice, a block-diagonal layout, KaSA's diagonal on the r×r factor): streamed.
STREAMED_FAMILIES = ("lora", "kasa", "bd_lora", "lora_expert")


def _prepare_module(module: LoraModule, source: _TensorSource, workspace: Optional[Workspace],
                    scale_rule: ScaleRule) -> Tuple[Optional[_PreparedModule], List[str]]:
    """Validate one module and reduce its factors to r×r Gram matrices.

    Damage confined to the module becomes issues, never an exception.  Each
    factor is decoded into the reused workspace, reduced, and its pages
    released before the next is read.
    """
    name = module.name
    if module.duplicate_keys:
        return None, [f"{name}: more than one tensor for the same factor ({', '.join(module.duplicate_keys)}); not audited"]
    if module.family not in STREAMED_FAMILIES or module.part("lora_mid.weight"):
        return _prepare_computed(module, source, scale_rule)
    if module.a_key is None or module.b_key is None:
        if module.a_key is None and module.b_key is None:
            return None, [f"{name}: has no LoRA factors (only a bias, magnitude or alpha); not audited"]
        missing, present = ("lora_B", "lora_A") if module.b_key is None else ("lora_A", "lora_B")
        return None, [f"{name}: has {present} but no {missing}; not audited"]
    problem = _check_tensors(module, source, (module.a_key, module.b_key))
    if problem:
        return None, [problem]
    (a_dtype, a_shape, _), (b_dtype, b_shape, _) = source.describe(module.a_key), source.describe(module.b_key)
    layout, problem = _factor_layout(module, a_shape, b_shape)
    if problem:
        return None, [f"{name}: {problem}; not audited"]
    if layout.rank == 0:
        return None, [f"{name}: rank r = 0 (empty factors); not audited"]
    length_a, length_b = layout.a.shape[1 - layout.a.rank_axis], layout.b.shape[1 - layout.b.rank_axis]
    if min(length_a, length_b) == 0:
        return None, [f"{name}: ΔW is empty (A{list(a_shape)} / B{list(b_shape)}); not audited"]
    if layout.rank > min(length_a, length_b):
        # An r×r Gram would be larger than ΔW itself (and than the bytes in the
        # file: A [30000, 1] / B [1, 30000] claims a 30000² Gram); form ΔW instead.
        return _prepare_wide(module, source, layout, a_shape, b_shape, a_dtype, b_dtype, scale_rule)
    if layout.rank > MAX_RANK:
        return None, [f"{name}: rank r = {layout.rank} is over the MAX_RANK cap ({MAX_RANK}); not audited"]
    grams = []
    for label, ref in (("lora_A", layout.a), ("lora_B", layout.b)):
        gram = _streamed_gram(source, ref, workspace)
        if not np.isfinite(gram).all():  # NaN/Inf in the factor, or finite values too large to square
            values = _tall_factor(source, ref)
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                source.release(ref.key)
                return None, [f"{name}: {label} contains {bad} NaN/Inf values; not audited"]
        source.release(ref.key)
        grams.append(gram)
    alpha, problem = _alpha_value(module, source)
    if problem:
        return None, [problem]
    diag, problem = _kasa_diag(module, source, layout.rank)
    if problem:
        return None, [problem]
    bias_norm, magnitude = _extras(module, source)
    dtype = a_dtype if a_dtype == b_dtype else f"{a_dtype}/{b_dtype}"
    a_matrix, b_matrix = (layout.a.shape, layout.b.shape) if module.expert is not None else (a_shape, b_shape)
    params = math.prod(a_matrix) + math.prod(b_matrix) + (diag.size if diag is not None else 0)
    return _PreparedModule(module, layout, tuple(a_matrix), tuple(b_matrix), dtype, params,
                           scale_rule(module, layout.rank, alpha), layout.rank, layout.rank, grams[0], grams[1],
                           bias_norm, magnitude, diag=diag), []


def _prepare_wide(module: LoraModule, source: _TensorSource, layout: _Factors, a_shape: Tuple[int, ...],
                  b_shape: Tuple[int, ...], a_dtype: str, b_dtype: str, scale_rule: ScaleRule
                  ) -> Tuple[Optional[_PreparedModule], List[str]]:
    """r > min(m, n): the spectrum of ΔW = B·A formed densely, padded to r."""
    name = module.name
    factors = []
    for label, ref in (("lora_A", layout.a), ("lora_B", layout.b)):
        values = _tall_factor(source, ref)
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            return None, [f"{name}: {label} contains {bad} NaN/Inf values; not audited"]
        factors.append(values)
    diag, problem = _kasa_diag(module, source, layout.rank)
    if problem:
        return None, [problem]
    tall_a = factors[0] if diag is None else factors[0] * diag[None, :]  # KaSA: ΔW = B·diag(d)·A
    try:
        sigma = product_singular_values(factors[1], tall_a.T)
    except ResourceCapExceeded as error:
        return None, [f"{name}: {error}; not audited"]
    padded = np.zeros(layout.rank)
    padded[:sigma.size] = sigma
    alpha, problem = _alpha_value(module, source)
    if problem:
        return None, [problem]
    bias_norm, magnitude = _extras(module, source)
    a_matrix, b_matrix = (layout.a.shape, layout.b.shape) if module.expert is not None else (a_shape, b_shape)
    params = math.prod(a_matrix) + math.prod(b_matrix) + (diag.size if diag is not None else 0)
    return _PreparedModule(module, layout, tuple(a_matrix), tuple(b_matrix),
                           a_dtype if a_dtype == b_dtype else f"{a_dtype}/{b_dtype}", params,
                           scale_rule(module, layout.rank, alpha), layout.rank, layout.rank, None, None,
                           bias_norm, magnitude, sigma=padded), []


def _kasa_diag(module: LoraModule, source: _TensorSource, rank: int) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """KaSA's lora_diag (r values), or None for other families."""
    key = module.part("lora_diag")
    if module.family != "kasa" or key is None:
        return None, None
    problem = _check_tensors(module, source, (key,))
    if problem:
        return None, problem
    values, problem = _load_finite(module, source, key)
    if problem:
        return None, problem
    if values.shape != (rank,):
        return None, f"{module.name}: lora_diag has shape {list(values.shape)}, not [{rank}] (the rank); not audited"
    return values, None


def _is_number(dtype: str) -> bool:
    return dtype != "BOOL" if dtype in DTYPES else dtype.startswith(("FLOAT", "INT", "UINT"))


def _alpha_value(module: LoraModule, source: _TensorSource) -> Tuple[Optional[float], Optional[str]]:
    """The scalar ``alpha`` tensor kohya / LyCORIS store per module: any numeric
    dtype (diffusers' ``convert_state_dict_to_kohya`` writes an int64 0-d tensor), 0-d or one element."""
    key = module.part("alpha")
    if key is None:
        return None, None
    dtype, _, problem = source.describe(key)
    if problem:
        return None, f"{module.name}: tensor {key!r}: {problem}; not audited"
    if not _is_number(dtype):
        return None, f"{module.name}: alpha tensor {key!r} has non-numeric dtype {dtype}; not audited"
    values = source.load(key)
    if values.size != 1 or not np.isfinite(values).all():
        return None, f"{module.name}: alpha tensor {key!r} is not one finite number; not audited"
    return float(values.reshape(-1)[0]), None


def _dense_sigma(delta: np.ndarray) -> np.ndarray:
    """Singular values of a rebuilt matrix (its size was checked before it was built)."""
    check_dense(delta.shape, "a rebuilt matrix", svd=True)
    if delta.size == 0:
        return np.zeros(0)
    if not np.isfinite(delta).all():  # LAPACK must never see Inf; finite factors can overflow when combined
        raise ResourceCapExceeded("the rebuilt matrix overflows float64")
    return np.linalg.svd(delta, compute_uv=False)


def _prepare_computed(module: LoraModule, source: _TensorSource, scale_rule: ScaleRule
                      ) -> Tuple[Optional[_PreparedModule], List[str]]:
    """Tucker LoRA (lora_mid), LyCORIS LoHa and LoKr: factors are small, so
    they are loaded whole and combined in NumPy — still without forming ΔW
    except where the low-rank route would be larger than ΔW itself."""
    name = module.name
    roles = dict(module.parts)
    if module.a_key:
        roles["lora_down.weight"] = module.a_key
    if module.b_key:
        roles["lora_up.weight"] = module.b_key
    factor_roles = {role: key for role, key in roles.items() if role != "alpha"}
    problem = _check_tensors(module, source, list(factor_roles.values()))
    if problem:
        return None, [problem]
    values: Dict[str, np.ndarray] = {}
    for role, key in factor_roles.items():
        loaded, problem = _load_finite(module, source, key, shared=role in SHARED_ROLES)
        if problem:
            return None, [problem]
        values[role] = loaded
    alpha, problem = _alpha_value(module, source)
    if problem:
        return None, [problem]
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            built = FAMILY_BUILDERS[module.family](values, module).with_shape()
    except (FactorsUnavailable, ResourceCapExceeded) as error:
        return None, [f"{name}: {error}; not audited"]
    except (KeyError, ValueError, IndexError) as error:
        return None, [f"{name}: {module.family} factors do not fit together ({error}); not audited"]
    scale = scale_rule(module, built.rank if built.rank is not None else built.max_rank, alpha)
    if scale.problem:
        return None, [f"{name}: {scale.problem}; not audited"]
    bias_norm, magnitude = _extras(module, source)
    dtypes = sorted({source.describe(key)[0] for key in factor_roles.values()})
    shapes = {role: tuple(v.shape) for role, v in values.items()}
    params = sum(v.size for role, v in values.items() if role not in SHARED_ROLES)  # VeRA's frozen projections are not trained
    # The batched stage groups by the size of the r×r problem: r² for LoHa's Khatri–Rao route.
    inner = built.a.shape[0] if built.a is not None else built.rank
    layout = _Factors(built.kind, inner)
    a_shape = next((shapes[role] for role in A_SHAPE_ROLES if role in shapes), ())
    b_shape = next((shapes[role] for role in B_SHAPE_ROLES if role in shapes), ())
    # LoKr with both halves full stores no rank: r is the config's (what PEFT divides alpha by), else the capacity.
    rank = built.rank if built.rank is not None else (scale.config_r or built.max_rank)
    common = dict(module=module, layout=layout, a_shape=a_shape, b_shape=b_shape, dtype="/".join(dtypes),
                  params=params, scale=scale, r=rank, max_rank=built.max_rank, bias_norm=bias_norm,
                  magnitude=magnitude, lora_e=built.lora_e, delta_shape=built.shape)
    if built.sigma is not None:
        return _PreparedModule(gram_a=None, gram_b=None, sigma=built.sigma, **common), []
    if inner > min(built.a.shape[1], built.b.shape[0]) or inner > MAX_RANK:
        # As for plain LoRA: no r×r Gram larger than ΔW itself, none over MAX_RANK; ΔW is formed when it is small.
        if not (np.isfinite(built.a).all() and np.isfinite(built.b).all()):
            return None, [f"{name}: the combined factors overflow float64; not audited"]
        try:
            sigma = product_singular_values(built.b, built.a)
        except ResourceCapExceeded as error:
            return None, [f"{name}: {error}; not audited"]
        return _PreparedModule(gram_a=None, gram_b=None, sigma=sigma, **common), []
    tall_a, tall_b = built.a.T, built.b
    with np.errstate(over="ignore", invalid="ignore"):
        grams = (tall_a.T @ tall_a, tall_b.T @ tall_b)
    return _PreparedModule(gram_a=grams[0], gram_b=grams[1], tall=(tall_a, tall_b), **common), []


class _Built(NamedTuple):
    kind: str
    rank: Optional[int]  # the stored dimension r; None when the factors store none (LoKr with both halves full)
    max_rank: int  # an upper bound on rank(ΔW); the low-rank route's inner size when a/b are given
    a: Optional[np.ndarray] = None  # r×n
    b: Optional[np.ndarray] = None  # m×r
    sigma: Optional[np.ndarray] = None
    lora_e: Optional[Tuple[float, ...]] = None  # AdaLoRA's E, reported as stored
    shape: Optional[Tuple[int, int]] = None  # ΔW as a matrix

    def with_shape(self) -> "_Built":
        if self.shape is None and self.a is not None:
            return self._replace(shape=(self.b.shape[0], self.a.shape[1]))
        return self


class FactorsUnavailable(ValueError):
    """The stored factors are fine, but something ΔW needs is not in the adapter."""


# Which stored tensor is reported as a_shape / b_shape, by family (first present wins).
A_SHAPE_ROLES = ("lora_down.weight", "hada_w1_b", "lokr_w1", "lokr_w1_a", "lora_A", "vera_A")
B_SHAPE_ROLES = ("lora_up.weight", "hada_w1_a", "lokr_w2", "lokr_w2_a", "lora_B", "vera_B")


def _matrix(values: np.ndarray) -> np.ndarray:
    return values.reshape(values.shape[0], -1)


def _tucker_lora(values: Dict[str, np.ndarray], module: LoraModule) -> _Built:
    # LoCon with Tucker: ΔW[o, i, h, w] = Σ_{a,b} up[o, a]·mid[a, b, h, w]·down[b, i]
    # (forward: down 1×1, then mid k×k, then up 1×1), i.e. B = up, A = mid ∘ down.
    up, down, mid = _matrix(values["lora_up.weight"]), _matrix(values["lora_down.weight"]), values["lora_mid.weight"]
    if mid.ndim < 3 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]:
        raise ValueError(f"lora_mid {list(mid.shape)} does not join up {list(up.shape)} and down {list(down.shape)}")
    check_dense((mid.shape[0], down.shape[1], *mid.shape[2:]), "the Tucker factor mid·down")
    if mid.shape[0] > MAX_RANK:
        raise ResourceCapExceeded(f"rank {mid.shape[0]} is over the MAX_RANK cap ({MAX_RANK})")
    a = np.einsum("ab...,bi->ai...", mid, down).reshape(mid.shape[0], -1)
    return _Built("conv", up.shape[1], min(up.shape[1], up.shape[0], a.shape[1]), a=a, b=up)


def _loha(values: Dict[str, np.ndarray], module: LoraModule) -> _Built:
    # ΔW = (w1a·w1b) ⊙ (w2a·w2b).  The Hadamard product of two rank-r products is
    # P·Q with P the row-wise Kronecker product of w1a and w2a (out×r₁r₂) and Q the
    # column-wise one of w1b and w2b (r₁r₂×in): the low-rank route with r² for r.
    w1a, w1b, w2a, w2b = (values[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    kind = "conv" if values["hada_w1_b"].ndim > 2 else "linear"
    if "hada_t1" in values or "hada_t2" in values:  # Tucker LoHa (LyCORIS rebuild_tucker), each half still low-rank
        rank = w1b.shape[0]
        (w1a, w1b), (w2a, w2b) = (_tucker_product(values["hada_t1"], w1a, w1b),
                                  _tucker_product(values["hada_t2"], w2a, w2b))
        kind = "conv" if values["hada_t1"].ndim > 2 else "linear"
    else:
        rank = w1a.shape[1]
    w1b, w2b = _matrix(w1b), _matrix(w2b)
    if w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1] or w1a.shape[1] != w1b.shape[0] \
            or w2a.shape[1] != w2b.shape[0]:
        raise ValueError(f"hada shapes {list(w1a.shape)}·{list(w1b.shape)} ⊙ {list(w2a.shape)}·{list(w2b.shape)}")
    inner = w1a.shape[1] * w2a.shape[1]
    max_rank = min(inner, w1a.shape[0], w1b.shape[1])
    if inner >= min(w1a.shape[0], w1b.shape[1]) or inner > MAX_RANK:  # the r² route would be larger than ΔW
        check_dense((w1a.shape[0], w1b.shape[1]), "LoHa's dense ΔW", svd=True)
        return _Built(kind, rank, max_rank, sigma=_dense_sigma((w1a @ w1b) * (w2a @ w2b)),
                      shape=(w1a.shape[0], w1b.shape[1]))
    check_dense((w1a.shape[0] + w1b.shape[1], inner), "LoHa's Khatri–Rao factors")
    p = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], inner)
    q = (w1b[:, None, :] * w2b[None, :, :]).reshape(inner, w1b.shape[1])
    return _Built(kind, rank, max_rank, a=q, b=p)


def _tucker_product(core: np.ndarray, w_a: np.ndarray, w_b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """LyCORIS rebuild_tucker, einsum("ij...,jr,ip->pr...", core, w_b, w_a), as
    the product P·Q of an out×R and an R×(in·∏kernel) factor, never the full
    rebuilt half: P = w_aᵀ, Q = core ×₂ w_b."""
    if core.ndim < 2 or core.shape[0] != w_a.shape[0] or core.shape[1] != w_b.shape[0] or w_a.ndim != 2 \
            or w_b.ndim != 2:
        raise ValueError(f"Tucker core {list(core.shape)} does not join {list(w_a.shape)} and {list(w_b.shape)}")
    check_dense((core.shape[0], w_b.shape[1], *core.shape[2:]), "a Tucker half's factor")
    q = np.einsum("ij...,jr->ir...", core, w_b)
    return w_a.T, q.reshape(core.shape[0], -1)


def _lokr(values: Dict[str, np.ndarray], module: LoraModule) -> _Built:
    # ΔW = kron(W1, W2): its singular values are all products σᵢ(W1)·σⱼ(W2), with
    # W2 viewed as (c, d·∏kernel) — the same column order torch.kron gives a conv.
    if "lokr_w1" in values:
        sigma1, cap1 = _dense_sigma(_matrix(values["lokr_w1"])), min(values["lokr_w1"].shape[:2])
        rank, shape1 = None, _matrix(values["lokr_w1"]).shape
    else:
        w1a, w1b = values["lokr_w1_a"], values["lokr_w1_b"]
        sigma1, cap1 = lowrank_singular_values(w1b, w1a), min(w1a.shape[0], w1b.shape[1], w1a.shape[1])
        rank, shape1 = w1a.shape[1], (w1a.shape[0], w1b.shape[1])
    kernel = ()
    if "lokr_w2" in values:
        w2 = values["lokr_w2"]
        kernel, shape2 = w2.shape[2:], _matrix(w2).shape
        sigma2, cap2 = _dense_sigma(_matrix(w2)), min(w2.shape[0], math.prod(w2.shape[1:]))
    elif "lokr_t2" in values:  # Tucker: W2 = t2 ×₁ w2_a ×₂ w2_b (LyCORIS rebuild_tucker), as a low-rank product
        t2 = values["lokr_t2"]
        p, q = _tucker_product(t2, values["lokr_w2_a"], values["lokr_w2_b"])
        kernel, shape2 = t2.shape[2:], (p.shape[0], q.shape[1])
        sigma2, cap2 = lowrank_singular_values(q, p), min(p.shape[0], q.shape[1], p.shape[1])
        rank = values["lokr_w2_a"].shape[0]
    else:
        w2a, w2b = values["lokr_w2_a"], _matrix(values["lokr_w2_b"])
        sigma2, cap2 = lowrank_singular_values(w2b, w2a), min(w2a.shape[0], w2b.shape[1], w2a.shape[1])
        rank = w2a.shape[1]
        kernel, shape2 = values["lokr_w2_b"].shape[2:], (w2a.shape[0], w2b.shape[1])
    check_dense((sigma1.size, sigma2.size), "LoKr's Kronecker spectrum")
    sigma = np.sort(np.outer(sigma1, sigma2).ravel())[::-1]
    return _Built("conv" if kernel else "linear", rank, cap1 * cap2, sigma=sigma,
                  shape=(shape1[0] * shape2[0], shape1[1] * shape2[1]))


def _adalora(values: Dict[str, np.ndarray], module: LoraModule) -> _Built:
    # PEFT AdaLoRA: ΔW ∝ B·(A ⊙ E) with E (r×1) weighting A's rows, i.e. B·diag(E)·A —
    # the LoRA route with A' = E ⊙ A.  r = 0 (every rank masked away) is a zero update.
    a, b, e = values["lora_A"], values["lora_B"], values["lora_E"]
    if a.ndim != 2 or b.ndim != 2 or e.size != a.shape[0] or b.shape[1] != a.shape[0]:
        raise ValueError(f"lora_A {list(a.shape)}, lora_E {list(e.shape)}, lora_B {list(b.shape)} are not r×in, r×1, out×r")
    weights = tuple(float(v) for v in e.reshape(-1))
    if a.shape[0] == 0:
        return _Built("linear", 0, 0, sigma=np.zeros(1), lora_e=weights, shape=(b.shape[0], a.shape[1]))
    return _Built("linear", a.shape[0], a.shape[0], a=e.reshape(-1, 1) * a, b=b, lora_e=weights)


def _vera(values: Dict[str, np.ndarray], module: LoraModule) -> _Built:
    # PEFT VeRA (tuners/vera/layer.py Linear.forward): ΔW = diag(λ_b)·B[:out, :]·diag(λ_d)·A[:, :in],
    # the shared projections sliced to this layer; out = len(λ_b), in is not stored.
    if "vera_A" not in values or "vera_B" not in values:
        raise FactorsUnavailable("the shared projections vera_A / vera_B are not in the file (saved with "
                                 "save_projection false?); they are never invented")
    a, b, lambda_b, lambda_d = (values[k] for k in ("vera_A", "vera_B", "vera_lambda_b", "vera_lambda_d"))
    if module.in_features is None:
        raise FactorsUnavailable(f"a VeRA adapter does not store in_features (vera_A has {a.shape[-1]} columns, the "
                                 "widest targeted layer's); pass --base-model (or a --base-norms file) to read it "
                                 "from the base weight's shape")
    out_features, rank = lambda_b.size, lambda_d.size
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(f"vera_A {list(a.shape)} / vera_B {list(b.shape)} do not have r = len(λ_d) = {rank}")
    if module.in_features > a.shape[1] or out_features > b.shape[0]:
        raise ValueError(f"layer {out_features}×{module.in_features} is larger than vera_B rows × vera_A columns")
    sliced_a = lambda_d.reshape(-1, 1) * a[:, :module.in_features]
    sliced_b = lambda_b.reshape(-1, 1) * b[:out_features]
    return _Built("linear", rank, min(rank, out_features, module.in_features), a=sliced_a, b=sliced_b)


# family → how its ΔW factors are built from the module's stored tensors
FAMILY_BUILDERS: Dict[str, Callable[[Dict[str, np.ndarray], LoraModule], _Built]] = {
    "lora": _tucker_lora, "loha": _loha, "lokr": _lokr, "adalora": _adalora, "vera": _vera,
}
SHARED_ROLES = frozenset(role for variant in PEFT_VARIANTS.values() for role in variant.shared_roles)


BATCH_MODULES = 32


def _module_spectra(prepared: Sequence[_PreparedModule], source: _TensorSource) -> List[np.ndarray]:
    """Singular values of every module's update: one batched eigh and one
    batched svd per rank; the rare factor that needs Householder QR is re-read
    (or taken from the computed factors), and directly computed spectra pass through."""
    spectra: List[Optional[np.ndarray]] = [item.sigma for item in prepared]
    for indices, factors in _module_core_factors(prepared, source):
        sigma = core_singular_values(factors[len(indices):], factors[:len(indices)])
        for row, index in enumerate(indices):
            spectra[index] = sigma[row]
    return spectra


def _module_core_factors(prepared: Sequence[_PreparedModule], source: _TensorSource
                         ) -> Iterable[Tuple[List[int], np.ndarray]]:
    """For batches of modules of equal rank: (their indices, the stacked r×r
    factors R_A of every module followed by R_B of every module), RᵀR = the Gram."""
    by_rank: Dict[int, List[int]] = {}
    for index, item in enumerate(prepared):
        if item.sigma is None:
            by_rank.setdefault(item.layout.rank, []).append(index)
    # Batches of BATCH_MODULES keep the stacked r×r temporaries small (a few MB at r = 64).
    batches = [(rank, indices[start:start + BATCH_MODULES]) for rank, indices in by_rank.items()
               for start in range(0, len(indices), BATCH_MODULES)]
    for rank, indices in batches:
        grams = np.stack([prepared[i].gram_a for i in indices] + [prepared[i].gram_b for i in indices])
        factors, ok = batched_gram_factors(grams)
        for slot in np.flatnonzero(~ok):
            item = prepared[indices[slot % len(indices)]]
            side = 0 if slot < len(indices) else 1
            if item.tall is not None:
                tall = item.tall[side]
            else:
                ref = item.layout.a if side == 0 else item.layout.b
                tall = _tall_factor(source, ref)
                source.release(ref.key)
            factors[slot] = gram_factor(tall, item.gram_a if side == 0 else item.gram_b)
        for slot, index in enumerate(indices):
            if prepared[index].diag is not None:  # R_AᵀR_A = A·Aᵀ ⇒ (R_A·D)ᵀ(R_A·D) = (D·A)(D·A)ᵀ
                factors[slot] = factors[slot] * prepared[index].diag[None, :]
        yield indices, factors


def _prepared_delta_shape(item: _PreparedModule) -> Optional[Tuple[int, int]]:
    """ΔW's matrix shape: set by the computed families, derived from the factors otherwise."""
    return item.delta_shape if item.delta_shape is not None or item.layout.a is None else _delta_shape(item.layout)


def _module_record(item: _PreparedModule, sigma: np.ndarray, spectrum: Spectrum, config: AdapterConfig,
                   top_k: int) -> ModuleAudit:
    name, rank, scale = item.module.name, item.r, item.scale
    issues: List[str] = []
    if config.present and scale.config_r is not None and scale.config_r != rank:
        source_of_r = f"rank_pattern[{scale.rank_pattern_key!r}]" if scale.rank_pattern_key else "r"
        issues.append(f"{name}: stored rank {rank} disagrees with config {source_of_r} = {scale.config_r}; "
                      f"the stored rank is used for the scale")
    if spectrum.sigma_max == 0.0:
        why = "rank 0: AdaLoRA masked every rank" if rank == 0 else "B·A = 0, e.g. a freshly initialised adapter"
        issues.append(f"{name}: the update is zero ({why})")
    if len(name) > MAX_NAME_LENGTH and (config.rank_pattern or config.alpha_pattern):
        issues.append(f"{name[:60]}…: name is over MAX_NAME_LENGTH ({MAX_NAME_LENGTH}) characters; "
                      "rank_pattern / alpha_pattern not applied to it")
    abs_scale = abs(scale.scale)
    if not all(math.isfinite(v) for v in (spectrum.frob_sq, abs_scale * spectrum.sigma_max,
                                          abs_scale * math.sqrt(spectrum.frob_sq))):
        issues.append(f"{name}: a metric overflows float64 (scale {scale.scale!r}); reported as null")
    # LoHa / LoKr: the rank budget is max_rank, not the stored dimension.
    utilization = spectrum.utilization if item.module.family == "lora" else \
        (spectrum.stable_rank / item.max_rank if item.max_rank else 0.0)
    return ModuleAudit(
        name=name, module_type=module_type(name), layer_index=layer_index(name), kind=item.layout.kind,
        r=rank, config_r=scale.config_r, alpha=scale.alpha, scale=scale.scale, scale_rule=scale.scale_rule,
        rank_pattern_key=scale.rank_pattern_key, alpha_pattern_key=scale.alpha_pattern_key,
        params=item.params, a_shape=item.a_shape, b_shape=item.b_shape,
        delta_shape=_prepared_delta_shape(item),
        dtype=item.dtype, lora_a_key=item.module.a_key, lora_b_key=item.module.b_key,
        stable_rank=spectrum.stable_rank, effective_rank=spectrum.effective_rank, utilization=utilization,
        sigma_max=spectrum.sigma_max, frob_sq=spectrum.frob_sq,
        energy_rank_90=spectrum.energy_rank_90, energy_rank_95=spectrum.energy_rank_95,
        energy_rank_99=spectrum.energy_rank_99,
        delta_sigma_max=abs_scale * spectrum.sigma_max, delta_fro_norm=abs_scale * math.sqrt(spectrum.frob_sq),
        top_singular_values=tuple(float(s) for s in sigma[:top_k]) if top_k > 0 else None,
        lora_bias_key=item.module.bias_key, lora_bias_norm=item.bias_norm, dora_magnitude=item.magnitude,
        delta_bias_norm=abs_scale * item.bias_norm if item.bias_norm is not None else None,
        family=item.module.family, max_rank=item.max_rank, lora_e=item.lora_e, issues=tuple(issues),
        rank_suggestions=suggest_module_ranks(sigma, DEFAULT_RANK_POLICIES),
        singular_values=tuple(float(s) for s in sigma))


# How a percentile is read between modules: "linear" interpolates (numpy.percentile's
# default, the documented contract); "nearest" takes the element at round((n−1)·q)
# with Python's round (halves to even) — upstream gradience 0.11.0's rule for its
# UDR / SDI statistics, offered so a migrating user's dashboards stay continuous.
PERCENTILE_RULES = ("linear", "nearest")


def _percentile(values: Sequence[float], q: float, rule: str = "linear") -> Optional[float]:
    """The q-th percentile by ``rule`` (see PERCENTILE_RULES), without
    numpy.percentile's first-call import cost."""
    if not len(values):
        return None
    ordered = sorted(float(v) for v in values)
    position = (len(ordered) - 1) * q / 100.0
    if rule == "nearest":
        return ordered[int(round(position))]
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def _median(values: Sequence[float]) -> Optional[float]:
    return _percentile(values, 50)


def suggest_rank(k: Optional[float]) -> Optional[int]:
    """Round an energy rank up to a power of two (the ranks people train with)."""
    if k is None:
        return None
    return 1 << max(0, math.ceil(math.log2(max(k, 1.0))))


def _by_type(layers: Sequence[ModuleAudit], udr_rule: str = "linear") -> Dict[str, Dict[str, Any]]:
    table = {}
    for kind in ("attn", "mlp", "other"):
        group = [layer for layer in layers if layer.module_type == kind]
        if not group:
            continue
        ranks90 = [layer.energy_rank_90 for layer in group]
        udr = [layer.udr for layer in group if layer.udr is not None]
        table[kind] = {
            "n_layers": len(group),
            "params": sum(layer.params for layer in group),
            "stable_rank_mean": _mean([layer.stable_rank for layer in group]),
            "utilization_mean": _mean([layer.utilization for layer in group]),
            "energy_rank_90_p50": _percentile(ranks90, 50),
            "energy_rank_90_p90": _percentile(ranks90, 90),
            "n_layers_with_udr": len(udr),
            "udr_median": _percentile(udr, 50, udr_rule),
            "udr_p90": _percentile(udr, 90, udr_rule),
            "udr_max": max(udr) if udr else None,
            "sdi_median": math.log10(_percentile(udr, 50, udr_rule) + UDR_EPS) if udr else None,
        }
    return table


@dataclass(frozen=True)
class AuditResult:
    """The result of one audit: per-module records plus summaries.

    ``to_summary_dict()`` is the JSON contract documented in the README.
    """

    layers: Tuple[ModuleAudit, ...]
    issues: Tuple[str, ...]
    adapter_name: str = "default"
    weights_path: Optional[str] = None
    config_path: Optional[str] = None
    other_adapters: Tuple[str, ...] = ()
    non_lora_tensors: Tuple[str, ...] = ()
    n_modules_skipped: int = 0
    adapter_format: str = "peft"
    config: AdapterConfig = field(default_factory=AdapterConfig)
    format_metadata: Dict[str, str] = field(default_factory=dict)  # kohya ss_* training metadata
    udr_requested: bool = False
    base_norms_verified: Optional[bool] = None  # see attach_udr: True checked against the base, False on trust
    rank_policies: Tuple[str, ...] = ()  # () = DEFAULT_RANK_POLICIES; see with_rank_policies()

    def summary(self, percentile: str = "linear") -> Dict[str, Any]:
        """The summary statistics; ``percentile`` is the rule for UDR / SDI
        percentiles (rank percentiles are linear in both this tool and upstream)."""
        if percentile not in PERCENTILE_RULES:
            raise ValueError(f"percentile must be one of {', '.join(PERCENTILE_RULES)}, not {percentile!r}")
        layers = self.layers
        ranks90 = [layer.energy_rank_90 for layer in layers]
        params = np.array([layer.params for layer in layers], dtype=np.float64)
        stable = [layer.stable_rank for layer in layers]
        p50, p90 = _percentile(ranks90, 50), _percentile(ranks90, 90)
        udr = [layer.udr for layer in layers if layer.udr is not None]
        sdi = [layer.sdi for layer in layers if layer.sdi is not None]
        return {
            "total_lora_params": int(params.sum()),
            "n_layers": len(layers),
            "n_modules_skipped": self.n_modules_skipped,
            "stable_rank_mean": _mean(stable),
            "stable_rank_median": _median(stable),
            "stable_rank_weighted_mean": float(np.dot(params, stable) / params.sum()) if params.sum() > 0 else None,
            "effective_rank_mean": _mean([layer.effective_rank for layer in layers]),
            "utilization_mean": _mean([layer.utilization for layer in layers]),
            "energy_rank_90_p50": p50,
            "energy_rank_90_p90": p90,
            "suggested_r_global_median": suggest_rank(p50),
            "suggested_r_global_90": suggest_rank(p90),
            "by_type": _by_type(layers, percentile),
            "n_layers_with_udr": len(udr),
            "udr_mean": _mean(udr),
            "udr_median": _percentile(udr, 50, percentile),
            "udr_p90": _percentile(udr, 90, percentile),
            "udr_max": max(udr) if udr else None,
            "sdi_mean": _mean(sdi),
            "sdi_median": _percentile(sdi, 50, percentile),
            "sdi_p90": _percentile(sdi, 90, percentile),
            "fraction_udr_gt_0_1": sum(u > 0.1 for u in udr) / len(udr) if udr else None,
            "fraction_udr_gt_0_3": sum(u > 0.3 for u in udr) / len(udr) if udr else None,
            "base_norms_verified": self.base_norms_verified,
            **policy_summary(layers, self.rank_policies or DEFAULT_RANK_POLICIES),
        }

    def to_summary_dict(self, include_layers: bool = False, topk_layers: Optional[int] = None, *,
                        percentile: str = "linear", suggest_per_layer: bool = False) -> Dict[str, Any]:
        """JSON-ready summary; ``include_layers`` adds per-module rows under ``layers``
        (``topk_layers`` keeps the N lowest-utilisation modules).  ``percentile="nearest"``
        reads UDR / SDI percentiles as upstream gradience 0.11.0 did (see PERCENTILE_RULES).
        ``suggest_per_layer`` adds ``suggested_config`` and ``policy_disagreement`` (see "rank advice")."""
        out: Dict[str, Any] = {"schema": SCHEMA_VERSION, "format": self.adapter_format,
                               "format_metadata": dict(self.format_metadata),
                               "adapter_name": self.adapter_name, "weights_path": self.weights_path,
                               "config_path": self.config_path, "other_adapters": list(self.other_adapters)}
        out.update(self.summary(percentile))
        out["non_lora_tensors"] = list(self.non_lora_tensors)
        out["issues"] = list(self.issues)
        if suggest_per_layer:
            out.update(per_layer_advice(self.layers, self.rank_policies or DEFAULT_RANK_POLICIES, self.config))
        if include_layers:
            layers = self.layers
            if topk_layers is not None:
                layers = sorted(layers, key=lambda layer: layer.utilization)[:topk_layers]
            out["layers"] = [layer.to_dict() for layer in layers]
        return json_safe(out)

    def to_metrics_event(self, run_id: str, step: Optional[int] = None, *, ts: Optional[float] = None,
                         include_layers: bool = False, topk_layers: Optional[int] = None,
                         percentile: str = "linear") -> Dict[str, Any]:
        """The summary wrapped as a gradience telemetry ``metrics`` event; the
        keywords after ``ts`` go to :meth:`to_summary_dict` (``include_layers`` and
        ``topk_layers`` are also upstream gradience's names there)."""
        metrics = self.to_summary_dict(include_layers, topk_layers, percentile=percentile)
        return {"schema": TELEMETRY_SCHEMA, "ts": time.time() if ts is None else ts, "run_id": run_id,
                "event": "metrics", "kind": "lora_audit", "step": step, "metrics": metrics}


def json_safe(value: Any) -> Any:
    """Plain JSON types only; NaN/Inf become null (the audit records why in ``issues``)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _audit(source: _TensorSource, keys: Sequence[str], setup: AuditSetup, issues: List[str],
           top_k: int, origin: str = "the state dict") -> Tuple[List[ModuleAudit], List[str], int]:
    """Stream the modules in blocks: each block's factors are reduced to r×r
    Grams one tensor at a time, then one batched r×r pass finishes the block,
    so only one block's Grams are ever held.  (Worker threads were measured
    and dropped: OpenBLAS serialises concurrent small BLAS calls, so they
    bought nothing on 2 cores.)"""
    shape_of = lambda key: source.describe(key)[1]  # noqa: E731
    modules, non_lora = group_modules(setup.adapter_format, keys, shape_of, setup.config.peft_type)
    if setup.in_features:
        modules = [module._replace(in_features=setup.in_features.get(module.name)) for module in modules]
    if not modules:  # nothing to audit is an error, not an empty report that exits 0 (README: AdapterFormatError)
        raise AdapterFormatError(f"no LoRA factors found in {origin} (no lora_A/lora_B, lora_down/lora_up, hada_, "
                                 "lokr_ or lora_a/lora_b keys)")
    config = setup.config
    refused: List[str] = []
    if setup.adapter_format in ("peft", "diffusers"):
        modules, refused, notes = resolve_lora_fields(modules, non_lora, config, shape_of)
        issues.extend(notes + refused)
    workspace = Workspace()
    prepared: List[_PreparedModule] = []
    spectra: List[np.ndarray] = []
    for start in range(0, len(modules), BATCH_MODULES):
        block_prepared = []
        for module in modules[start:start + BATCH_MODULES]:
            try:
                item, module_issues = _prepare_module(module, source, workspace, setup.scale_rule)
            except ResourceCapExceeded as error:  # e.g. the pattern-matching budget, spent inside the scale rule
                item, module_issues = None, [f"{module.name}: {error}; not audited"]
            issues.extend(module_issues)
            if item is not None:
                block_prepared.append(item)
        spectra.extend(_module_spectra(block_prepared, source))
        prepared.extend(item._replace(gram_a=None, gram_b=None, tall=None) for item in block_prepared)
    finite = [bool(np.isfinite(sigma).all()) for sigma in spectra]
    for item, ok in zip(prepared, finite):
        if not ok:
            issues.append(f"{item.module.name}: the update's singular values overflow float64 "
                          "(σ_max over 1.8e308); not audited")
    prepared = [item for item, ok in zip(prepared, finite) if ok]
    spectra = [sigma for sigma, ok in zip(spectra, finite) if ok]
    metrics = _grouped_metrics(spectra, [item.r for item in prepared])
    layers = []
    for item, sigma, spectrum in zip(prepared, spectra, metrics):
        record = _module_record(item, sigma, spectrum, config, top_k)
        issues.extend(record.issues)
        layers.append(record)
    names = {pattern_name(layer.name) for layer in layers}
    for patterns, label in ((config.rank_pattern, "rank_pattern"), (config.alpha_pattern, "alpha_pattern")):
        unmatched = unmatched_pattern_keys(patterns, names)
        for pattern in unmatched[:20]:
            issues.append(f"config: {label} key {pattern.key!r} matches no audited module")
        if len(unmatched) > 20:
            issues.append(f"config: {len(unmatched) - 20} more {label} keys match no audited module")
    return layers, non_lora, len(modules) + len(refused) - len(prepared)


def _grouped_metrics(spectra: Sequence[np.ndarray], ranks: Sequence[int]) -> List[Spectrum]:
    """Metrics of every spectrum, batched by length: trailing zeros would change
    no metric, but padding one LoKr spectrum of 10⁶ values to every row would
    multiply memory by the module count."""
    by_length: Dict[int, List[int]] = {}
    for index, sigma in enumerate(spectra):
        by_length.setdefault(sigma.size, []).append(index)
    metrics: List[Optional[Spectrum]] = [None] * len(spectra)
    for indices in by_length.values():
        rows = batched_spectrum_metrics(np.stack([spectra[i] for i in indices]),
                                        np.array([ranks[i] for i in indices], dtype=np.int64))
        for index, row in zip(indices, rows):
            metrics[index] = row
    return metrics


def _config_document(config: Any) -> Any:
    """A config as the dict ``adapter_config.json`` would hold: a mapping as it is, a
    PEFT ``LoraConfig`` through its ``to_dict()``, upstream gradience's
    ``LoRAAdapterConfig`` through its ``raw`` dict."""
    if config is None or isinstance(config, Mapping):
        return config
    if callable(getattr(config, "to_dict", None)):
        return config.to_dict()
    raw = getattr(config, "raw", None)
    return raw if isinstance(raw, Mapping) else config  # anything else: parse_adapter_config says why it is unusable


def _alias(ours: Any, theirs: Any, our_name: str, their_name: str) -> Any:
    """One argument under its gradience_lite name or upstream gradience's (an alias, same behaviour)."""
    if theirs is None:
        return ours
    if ours is not None and ours != theirs:
        raise TypeError(f"{our_name}= and its alias {their_name}= were both given, with different values")
    return theirs


def _tensor_source(tensors: Any) -> Tuple[_TensorSource, List[str], Dict[str, str], Optional[str]]:
    """(source, keys, header metadata, weights path) for a mapping of tensors, an
    :func:`open_safetensors` result, or a path to a ``.safetensors`` file."""
    if isinstance(tensors, (str, os.PathLike)):
        path = Path(tensors)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _pickle_refusal(path)
        if path.is_dir():
            raise AdapterFormatError(f"{path}: is a directory; audit_lora_peft_dir(path) reads a directory "
                                     "with its adapter_config.json, audit_lora_state_dict takes a weights file")
        tensors = open_safetensors(path)
    if isinstance(tensors, SafetensorsFile):
        return _TensorSource.from_file(tensors), list(tensors.tensors), dict(tensors.metadata), tensors.path
    if not isinstance(tensors, Mapping):
        raise AdapterFormatError(f"audit_lora_state_dict takes a mapping of tensors, an open_safetensors() result "
                                 f"or a .safetensors path, not {type(tensors).__name__}")
    return _TensorSource.from_tensors(tensors), list(tensors), {}, None


def audit_lora_state_dict(tensors: Any, config: Any = None, *, include_top_singular_values: int = 0,
                          adapter_config: Any = None) -> AuditResult:
    """Audit LoRA factors keyed as PEFT saves them, wherever they live.

    ``tensors`` is a mapping of name → array-like — NumPy arrays, objects with
    ``__array__``, or torch / JAX / MLX tensors in any dtype and on any device,
    converted through their own methods (no framework is imported here; see
    :func:`_as_numpy`) — or what :func:`open_safetensors` returns, or a path to
    a ``.safetensors`` file.  Every route gives the same numbers, and tensors are
    converted one at a time as the audit reaches them.  ``config`` is the
    ``adapter_config.json`` dict, a PEFT ``LoraConfig`` (e.g.
    ``model.peft_config["default"]``), or ``None`` (scale 1, with an issue);
    ``adapter_config=`` is upstream gradience's name for it (an alias).

    A pure function of its inputs: suitable as a map task over many adapters.

    >>> rng = np.random.default_rng(0)
    >>> sd = {"base_model.model.q_proj.lora_A.weight": rng.normal(size=(4, 16)),
    ...       "base_model.model.q_proj.lora_B.weight": rng.normal(size=(8, 4))}
    >>> result = audit_lora_state_dict(sd, {"r": 4, "lora_alpha": 8})
    >>> result.layers[0].name, result.layers[0].scale
    ('q_proj', 2.0)
    """
    config = _config_document(_alias(config, adapter_config, "config", "adapter_config"))
    refusal = peft_type_refusal(config)
    if refusal:
        raise AdapterFormatError(f"adapter config: {refusal}")
    source, keys, metadata, weights_path = _tensor_source(tensors)
    setup = configure(detect_format(keys, metadata, config), config, [], metadata)
    issues = list(setup.issues)
    layers, non_lora, skipped = _audit(source, keys, setup, issues, include_top_singular_values)
    return AuditResult(tuple(layers), tuple(issues), weights_path=weights_path, non_lora_tensors=tuple(non_lora),
                       n_modules_skipped=skipped, adapter_format=setup.adapter_format, config=setup.config,
                       format_metadata=setup.format_metadata)


def audit_lora_peft_dir(path: str | os.PathLike, *, include_top_singular_values: int = 0,
                        adapter: Optional[str] = None, weights: Optional[str] = None,
                        adapter_config: Optional[str] = None, base_model: Optional[str] = None,
                        base_norms: Optional[str] = None, base_norms_cache: Optional[str] = None,
                        progress: Optional[Callable[[str], None]] = None, base_model_id: Optional[str] = None,
                        adapter_config_path: Optional[str] = None,
                        adapter_weights_path: Optional[str] = None) -> AuditResult:
    """Audit a PEFT adapter directory (or a weights file).

    Raises :class:`AdapterFormatError` when nothing can be audited (no weights,
    a pickle file, a damaged safetensors header); everything else is recorded
    in the result's ``issues``.  With ``base_model`` (a path or an offline hub
    id; ``"auto"`` reads the config's ``base_model_name_or_path``) or
    ``base_norms`` / ``base_norms_cache`` the UDR fields are filled.
    Upstream gradience's names are aliases: ``base_model_id`` = ``base_model``,
    ``adapter_config_path`` = ``adapter_config``, ``adapter_weights_path`` = ``weights``.

    >>> result = audit_lora_peft_dir("tests/fixtures/peft/llama_fp32_qv")   # doctest: +SKIP
    >>> result.to_summary_dict()["n_layers"]                                  # doctest: +SKIP
    4
    """
    base_model = _alias(base_model, base_model_id, "base_model", "base_model_id")
    adapter_config = _alias(adapter_config, adapter_config_path, "adapter_config", "adapter_config_path")
    weights = _alias(weights, adapter_weights_path, "weights", "adapter_weights_path")
    files = find_adapter_files(path, adapter=adapter, weights=weights, config=adapter_config)
    sf = open_safetensors(files.weights_path)
    raw_config, load_issues = load_adapter_config(files.config_path)
    refusal = peft_type_refusal(raw_config)
    if refusal:
        raise AdapterFormatError(f"{files.config_path}: {refusal}")
    keys = list(sf.tensors)
    setup = configure(detect_format(keys, sf.metadata, raw_config), raw_config, load_issues, sf.metadata)
    if setup.config.peft_type == "VERA":
        setup = _with_base_in_features(setup, keys, base_model, (base_norms, base_norms_cache))
    issues = list(setup.issues)
    layers, non_lora, skipped = _audit(_TensorSource.from_file(sf), keys, setup, issues, include_top_singular_values,
                                       origin=str(files.weights_path))
    result = AuditResult(tuple(layers), tuple(issues), adapter_name=files.adapter_name,
                         weights_path=files.weights_path, config_path=files.config_path,
                         other_adapters=files.other_adapters, non_lora_tensors=tuple(non_lora),
                         n_modules_skipped=skipped, adapter_format=setup.adapter_format, config=setup.config,
                         format_metadata=setup.format_metadata)
    if base_model is not None or base_norms is not None or base_norms_cache is not None:
        result = attach_udr(result, base_model=base_model, base_norms=base_norms,
                            base_norms_cache=base_norms_cache, progress=progress)
    return result


def _base_shapes(base_model: Optional[str], norms_files: Sequence[Optional[str]]
                 ) -> Tuple[Dict[str, Tuple[Tuple[int, ...], str]], Optional[str]]:
    """Base parameter name → (logical shape, storage): from the checkpoint's headers, else
    from the records of a norms file or cache (which keep each weight's shape)."""
    import base_norms

    try:
        if base_model:
            parameters = base_norms.list_parameters(base_norms.resolve_base(base_model))
            return {name: (shape, storage) for name, (_, shape, storage) in parameters.items()}, None
        shapes: Dict[str, Tuple[Tuple[int, ...], str]] = {}
        for path in norms_files:
            if path and Path(path).exists():
                for name, record in base_norms.load_norms(path)["norms"].items():
                    shape = record.get("shape")
                    if isinstance(shape, list) and all(type(d) is int for d in shape):
                        shapes[name] = (tuple(shape), str(record.get("storage") or record.get("dtype", "F32")))
        return shapes, None
    except AdapterFormatError as error:  # base_norms.NormsFileError included
        return {}, str(error)


def _with_base_in_features(setup: AuditSetup, keys: Sequence[str], base_model: Optional[str],
                           norms_files: Sequence[Optional[str]]) -> AuditSetup:
    """VeRA stores no layer's input width: read it from the base weight's shape
    (``(out, in)``; ``(in, out)`` with fan_in_fan_out, GPT-2's Conv1D)."""
    if base_model == "auto":
        base_model = setup.config.base_model_name_or_path
    if not base_model and not any(norms_files):
        return setup
    issues = list(setup.issues)
    shapes, problem = _base_shapes(base_model, norms_files)
    if problem:
        return setup._replace(issues=issues + [f"vera: in_features not read from the base: {problem}"])
    names = [module.name for module in _group_peft_tuner_keys(keys, PEFT_VARIANTS["VERA"])[0]]
    matches, match_issues = match_base_parameters(names, shapes)
    issues.extend(issue.replace("udr:", "vera:", 1).replace("UDR not computed", "in_features unknown")
                  for issue in match_issues)
    in_features = {}
    for name, parameter in matches.items():
        shape, storage = shapes[parameter]
        # base_norms lists a quantized or GGUF weight under its logical (dequantized) shape; only an
        # integer tensor it did not decode keeps a stored shape, which may be packed.
        packed = storage in DTYPES and not DTYPES[storage].is_float
        if len(shape) == 2 and not packed:
            in_features[name] = shape[0] if setup.config.fan_in_fan_out else shape[1]
        else:
            issues.append(f"vera: {name}: base weight {parameter} is {storage} {list(shape)}, not a float matrix; "
                          "in_features unknown")
    return setup._replace(issues=issues, in_features=in_features)


# ── UDR: base norms matched to modules ──────────────────────────────────────

# PEFT's layer_replication stacks copies of base layers; the largest models
# have ~130 layers, so 4096 replicated layers is far beyond any real stack.
MAX_REPLICATED_LAYERS = 4096


def _layer_replication_problem(layer_replication: Any) -> Optional[str]:
    """Why a layer_replication is refused before it is expanded (None if fine)."""
    if not isinstance(layer_replication, list):
        return None
    spans = [span for span in layer_replication if isinstance(span, (list, tuple)) and len(span) == 2
             and all(isinstance(v, int) and not isinstance(v, bool) for v in span)]
    total = sum(max(0, end - start) for start, end in spans)
    if total > MAX_REPLICATED_LAYERS:
        return (f"config: layer_replication spans {total} layers, over the MAX_REPLICATED_LAYERS cap "
                f"({MAX_REPLICATED_LAYERS}); replicated layers are not mapped to their source")
    return None


def _layer_replication_map(layer_replication: Any) -> Dict[int, int]:
    """New layer index → source layer index for PEFT's ``layer_replication``.

    PEFT stacks the listed [start, end) ranges of the base model's layers in
    order; the copies share the source layer's base weight.
    """
    mapping: Dict[int, int] = {}
    if not isinstance(layer_replication, list) or _layer_replication_problem(layer_replication):
        return mapping
    for span in layer_replication:
        if (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            for source in range(span[0], span[1]):
                mapping[len(mapping)] = source
    return mapping


def base_module_name(module_name: str, replication: Mapping[int, int]) -> str:
    """The base model's module a LoRA module adapts (replicated layers map to their source)."""
    if not replication:
        return module_name
    match = _LAYER_INDEX.search(module_name)
    if match is None or int(match.group(1)) not in replication:
        return module_name
    return module_name[:match.start(1)] + str(replication[int(match.group(1))]) + module_name[match.end(1):]


# The base side names one expert of a fused experts tensor "<parameter>[e]"
# (slice e along axis 0); the audit names one expert's update "<module>[e]"
# (MLX SwitchLinear, PEFT target_parameters).
_EXPERT_SUFFIX = re.compile(r"^(?P<path>.+)\[(?P<index>\d+)\]$")

# mlx-lm stacks a Hugging Face checkpoint's experts.<e>.<proj> into
# switch_mlp.<proj> (its models' sanitize()); against a per-expert base, an MLX
# expert update looks for the weight under the Hugging Face name.
_EXPERT_CONTAINERS = {"switch_mlp": "experts"}

# kohya-ss/sd-scripts and LyCORIS flatten a module path with underscores under
# a prefix that names the sub-model.  The base keeps each sub-model under a
# container: a diffusers pipeline folder, or a prefix of a single-file
# checkpoint, possibly followed by the model's own wrapper (…transformer.text_model);
# "" is a base that is that sub-model alone (a unet/ folder, a Flux
# transformer file).  sd-scripts: lora_te1/te2 = CLIP-L / CLIP-G (SDXL, SD3),
# lora_te3 = T5 (SD3; Flux, whose diffusers pipeline keeps T5 in text_encoder_2).
# None: LyCORIS on an arbitrary model, any container.
_KOHYA_CONTAINERS: Tuple[Tuple[str, Optional[Tuple[str, ...]]], ...] = (
    ("lora_unet_", ("unet", "transformer", "model.diffusion_model", "")),
    ("lora_te1_", ("text_encoder", "conditioner.embedders.0.transformer", "text_encoders.clip_l.transformer")),
    ("lora_te2_", ("text_encoder_2", "conditioner.embedders.1.model", "text_encoders.clip_g.transformer")),
    ("lora_te3_", ("text_encoder_3", "text_encoder_2", "text_encoders.t5xxl.transformer")),
    ("lora_te_", ("text_encoder", "cond_stage_model.transformer", "")),
    ("lycoris_", None),
)


def _parameter_path(parameter: str) -> str:
    """``a.b.weight`` → ``a.b``; ``a.b.weight[3]`` → ``a.b[3]`` (an expert slice keeps its index)."""
    expert = _EXPERT_SUFFIX.match(parameter)
    path, suffix = (expert["path"], f"[{expert['index']}]") if expert else (parameter, "")
    return (path[:-len(".weight")] if path.endswith(".weight") else path) + suffix


def _dotted_candidates(module: str, by_last: Mapping[str, List[Tuple[str, str]]]) -> List[str]:
    """``<module>.weight`` exactly, else the candidates sharing the longest dot-aligned tail with it."""
    candidates = [(path, parameter) for path, parameter in by_last.get(module.rsplit(".", 1)[-1], [])
                  if path == module or path.endswith("." + module) or module.endswith("." + path)]
    exact = [parameter for path, parameter in candidates if path == module]
    if exact or not candidates:
        return exact[:1]
    longest = max(min(len(path), len(module)) for path, _ in candidates)
    return [parameter for path, parameter in candidates if min(len(path), len(module)) == longest]


def _per_expert_name(path: str, index: str) -> str:
    """``….experts.w1`` + 3 → ``….experts.3.w1`` (Mixtral-style per-expert weights)."""
    head, _, leaf = path.rpartition(".")
    parent, _, container = head.rpartition(".")
    return ".".join(part for part in (parent, _EXPERT_CONTAINERS.get(container, container), index, leaf) if part)


def _flat_index(paths: Iterable[Tuple[str, str]]) -> Dict[str, List[Tuple[str, str]]]:
    """underscore-joined dot-aligned tail → [(container before it, parameter)]."""
    index: Dict[str, List[Tuple[str, str]]] = {}
    for path, parameter in paths:
        if _EXPERT_SUFFIX.match(path):
            continue
        parts = path.split(".")
        for cut in range(len(parts)):
            index.setdefault("_".join(parts[cut:]), []).append((".".join(parts[:cut]), parameter))
    return index


def _flat_candidates(module: str, prefix: str, containers: Optional[Tuple[str, ...]],
                     flat: Mapping[str, List[Tuple[str, str]]]) -> List[str]:
    hits = flat.get(module[len(prefix):], [])
    if containers is not None:
        return [parameter for container, parameter in hits
                if any(container == allowed or (allowed and container.startswith(allowed + "."))
                       for allowed in containers)]
    top_level = [parameter for container, parameter in hits if not container]
    return top_level or [parameter for _, parameter in hits]


def match_base_parameters(module_names: Iterable[str], parameter_names: Iterable[str]
                          ) -> Tuple[Dict[str, str], List[str]]:
    """Map each module to its base weight's parameter name.

    A module matches ``<module>.weight`` (or a norms-file key ``<module>``)
    exactly, or else the candidates whose names share a dot-aligned tail with
    it (one name is the other plus wrapper prefixes such as ``model.``,
    ``transformer.``, ``bert.``); the longest shared tail must be unique.
    An expert ``<module>[e]`` matches ``<parameter>[e]`` (a slice of a fused
    experts tensor) or else the per-expert weight ``….experts.<e>.<leaf>``.
    kohya / LyCORIS names (``lora_unet_down_blocks_0_…``) are compared in
    underscore space with every dot-aligned tail of every parameter path, under
    the containers their prefix allows (see ``_KOHYA_CONTAINERS``); ambiguity
    is reported, never guessed.
    """
    by_last: Dict[str, List[Tuple[str, str]]] = {}
    paths: List[Tuple[str, str]] = []
    for parameter in parameter_names:
        if parameter.endswith(".bias"):
            continue
        path = _parameter_path(parameter)
        paths.append((path, parameter))
        by_last.setdefault(path.rsplit(".", 1)[-1], []).append((path, parameter))
    flat: Optional[Dict[str, List[Tuple[str, str]]]] = None  # built for the first kohya name only
    matches: Dict[str, str] = {}
    issues: List[str] = []
    ldm_unet_refused = 0
    for module in module_names:
        kohya = next(((prefix, containers) for prefix, containers in _KOHYA_CONTAINERS
                      if "." not in module and module.startswith(prefix)), None)
        where = ""
        if kohya is not None:
            flat = _flat_index(paths) if flat is None else flat
            best = _flat_candidates(module, kohya[0], kohya[1], flat)
            if not best:
                within = "any container" if kohya[1] is None else \
                    ", ".join(container or "<top level>" for container in kohya[1])
                where = f" ({module[len(kohya[0]):]!r} looked for under {within})"
                ldm_unet_refused += kohya[0] == "lora_unet_" and module[len(kohya[0]):].startswith(
                    ("down_blocks_", "up_blocks_", "mid_block_"))
        else:
            best = _dotted_candidates(module, by_last)
            expert = _EXPERT_SUFFIX.match(module)
            if not best and expert:
                best = _dotted_candidates(_per_expert_name(expert["path"], expert["index"]), by_last)
        if len(best) == 1:
            matches[module] = best[0]
        elif not best:
            issues.append(f"udr: {module}: no base weight named like it{where}; UDR not computed")
        else:
            issues.append(f"udr: {module}: ambiguous base weight ({', '.join(sorted(best)[:4])}); UDR not computed")
    if ldm_unet_refused and any(path.startswith("model.diffusion_model.input_blocks.") for path, _ in paths):
        issues.append(f"udr: {ldm_unet_refused} kohya unet modules use diffusers names (down_blocks_…) while the "
                      "base is an original-layout single file (model.diffusion_model.input_blocks…); sd-scripts "
                      "names SD 1.x/2.x LoRAs after the diffusers UNet: pass the diffusers unet folder as the base")
    return matches, issues


# ── UDR: the shape and storage guard ────────────────────────────────────────
# A base weight of another model size, a GQA base with another number of KV
# heads, or quantized bytes read as numbers would all give a UDR that looks
# plausible.  A base weight is used only when it is stored as floating-point
# numbers (or by a quantization base_norms decodes) and its matrix shape equals
# ΔW's.

# Tensors that travel with a quantized weight (bitsandbytes, FP8 block scales,
# compressed-tensors, GPTQ/AWQ, gpt-oss MXFP4).  While the base side lists them,
# it does not decode the weight: the listed bytes are not the weight's values.
_QUANTIZATION_COMPANIONS = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map",
                            ".weight.quant_state.bitsandbytes__nf4", ".weight.quant_state.bitsandbytes__fp4", ".SCB",
                            ".weight_format", ".weight_scale", ".weight_scale_inv", ".weight_scale_2",
                            ".weight_zero_point", ".weight_global_scale", ".weight_packed", ".weight_shape",
                            ".qweight", ".qzeros", ".scales", ".g_idx", "_blocks", "_scales")


class BaseWeight(NamedTuple):
    """A base weight as the base's headers (or a norms record) describe it."""

    shape: Optional[Tuple[int, ...]]  # the logical shape; for "<parameter>[e]" the expert's slice
    storage: Optional[str]  # safetensors dtype, or the quantization the base side decodes
    file: Optional[str] = None
    expert: Optional[int] = None
    stored_name: Optional[str] = None  # the tensor's name in ``file`` (without a pipeline component prefix)


def _listed_weight(value: Any) -> Tuple[str, Tuple[int, ...], str]:
    """(file, shape, storage) from a ``base_norms.list_parameters`` value: a (file, shape, dtype)
    tuple, or a record with ``file`` / ``shape`` / ``storage`` attributes."""
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return value[0], tuple(value[1]), value[2]
    storage = getattr(value, "storage", None) or getattr(value, "dtype", None)
    return getattr(value, "file", None), tuple(getattr(value, "shape")), storage


def _expert_slices(catalogue: Dict[str, BaseWeight]) -> Dict[str, BaseWeight]:
    """``<parameter>[e]`` for every 3-D parameter: one expert of a fused experts tensor."""
    slices = {}
    for name, weight in catalogue.items():
        if weight.shape is not None and len(weight.shape) == 3 and weight.expert is None:
            for index in range(weight.shape[0]):
                slices[f"{name}[{index}]"] = weight._replace(shape=weight.shape[1:], expert=index)
    return slices


def _is_plain_float(storage: Optional[str]) -> bool:
    return storage is not None and storage in DTYPES and DTYPES[storage].is_float


def storage_problem(module: str, parameter: str, weight: BaseWeight, companions: Sequence[str] = ()) -> Optional[str]:
    """Why the stored values of this base weight are not its values, or None."""
    if companions:
        return (f"udr: {module}: base weight {parameter} is quantized ({', '.join(sorted(companions)[:4])} "
                f"present) and is not decoded here; UDR not computed")
    if weight.storage is not None and weight.storage in DTYPES and not DTYPES[weight.storage].is_float:
        return (f"udr: {module}: base weight {parameter} is stored as {weight.storage} (integer / packed, "
                f"not the weight's values); UDR not computed")
    return None


def base_weight_problem(module: str, parameter: str, delta_shape: Optional[Sequence[int]], weight: BaseWeight,
                        *, transposed_storage: bool, companions: Sequence[str] = ()) -> Optional[str]:
    """Why this base weight cannot be the one ΔW is added to, or None.

    ``transposed_storage``: the base keeps the weight as (in, out) — PEFT's
    ``fan_in_fan_out`` (GPT-2 Conv1D) — or, for one expert of a fused experts
    tensor, in either orientation (gpt-oss stores (E, in, out), others
    (E, out, in); PEFT's ParamWrapper follows the storage).  σ is the same
    for W and Wᵀ, so only the sizes are at stake.
    """
    problem = storage_problem(module, parameter, weight, companions)
    if problem:
        return problem
    if delta_shape is None:
        return f"udr: {module}: the update's matrix shape is unknown, so the base weight cannot be checked; UDR not computed"
    if weight.shape is None:
        return None  # a norms record without a shape: counted and reported once by the caller
    if len(weight.shape) < 2:
        return f"udr: {module}: base weight {parameter} is {list(weight.shape)}, not a matrix; UDR not computed"
    matrix = (weight.shape[0], math.prod(weight.shape[1:]))
    delta = tuple(delta_shape)
    if matrix == delta or (transposed_storage and matrix == delta[::-1]):
        return None
    shown = list(weight.shape) if len(weight.shape) == 2 else f"{list(weight.shape)} (as a matrix {list(matrix)})"
    return (f"udr: {module}: base weight {parameter} has shape {shown} but the update ΔW is {list(delta)}; "
            "UDR not computed (a base of another size or layout?)")


def quantization_companions(names: Iterable[str]) -> Dict[str, List[str]]:
    """module path → the quantization companions listed for its weight."""
    owners: Dict[str, List[str]] = {}
    for name in names:
        suffix = next((suffix for suffix in _QUANTIZATION_COMPANIONS if name.endswith(suffix)), None)
        if suffix is not None and len(name) > len(suffix):
            owners.setdefault(name[:-len(suffix)], []).append(name)
    return owners


def _owner_path(parameter: str) -> str:
    path = _EXPERT_SUFFIX.sub(r"\g<path>", parameter)
    return path[:-len(".weight")] if path.endswith(".weight") else path


# ── UDR: the base checkpoint, its components and its norms ──────────────────

class BaseNorms(NamedTuple):
    norms: Dict[str, Tuple[float, float]]  # module name → (σ_max, ‖W‖_F)
    issues: List[str]
    verified: Optional[bool] = None  # norms computed from / checked against the base; False: taken on trust
    sources: Optional[Dict[str, BaseWeight]] = None  # module → the base weight its norms came from


# A norms file holds two numbers per base weight: a 405B model's is a few MB.
MAX_NORMS_FILE_BYTES = 256 << 20


def _load_norms_file(path: str, role: str, issues: List[str]) -> Optional[Dict[str, Any]]:
    import base_norms

    try:
        info = os.stat(path)
    except OSError as error:
        issues.append(f"udr: {role} {path}: cannot read norms file ({error.strerror or error})")
        return None
    if not stat.S_ISREG(info.st_mode):  # /dev/zero would never end, a FIFO would block
        issues.append(f"udr: {role} {path}: not a regular file")
        return None
    if info.st_size > MAX_NORMS_FILE_BYTES:
        issues.append(f"udr: {role} {path}: {info.st_size} bytes, over the MAX_NORMS_FILE_BYTES cap "
                      f"({MAX_NORMS_FILE_BYTES})")
        return None
    try:
        return base_norms.load_norms(path)
    except base_norms.NormsFileError as error:
        issues.append(f"udr: {role} {error}")
        return None
    except (TypeError, ValueError, AttributeError) as error:  # base_norms trusts some fields' types
        issues.append(f"udr: {role} {path}: not a valid norms file ({type(error).__name__}: {error})")
        return None


def _weight_map_escape(root: str) -> Optional[str]:
    """Why a sharded base's index is refused: a weight_map entry naming a file
    outside the base directory (absolute, or with ".."); None when it is fine.
    base_norms reports a damaged index itself."""
    index = Path(root) / "model.safetensors.index.json"
    try:
        if not index.is_file() or index.stat().st_size > MAX_CONFIG_BYTES:
            return None
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    if not isinstance(weight_map, dict):
        return None
    for shard in weight_map.values():
        parts = str(shard).replace("\\", "/").split("/")
        if not isinstance(shard, str) or shard.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] \
                or "\0" in shard:
            return f"{index}: weight_map names {shard!r}, outside the base directory; base refused"
    return None


def base_components(base_model: str) -> List[Tuple[str, Any]]:
    """(component, checkpoint) pairs: one unnamed checkpoint, or the component
    folders of a diffusers pipeline (``unet/``, ``text_encoder/``…), whose
    parameters are then named ``<component>.<parameter>`` — the names a
    diffusers LoRA gives its modules."""
    import base_norms

    try:
        return [("", base_norms.resolve_base(base_model))]
    except AdapterFormatError:
        root = Path(base_model).expanduser()
        folders = [name for name in DIFFUSERS_COMPONENTS if (root / name).is_dir()] if root.is_dir() else []
        components = []
        for name in folders:
            try:
                components.append((name, base_norms.resolve_base(root / name)))
            except AdapterFormatError:
                continue  # a component without safetensors weights (e.g. only pickles): nothing to match
        if not components:
            raise
        return components


def _named(component: str, name: str) -> str:
    return f"{component}.{name}" if component else name


def _component_view(document: Optional[Dict[str, Any]], component: str) -> Optional[Dict[str, Any]]:
    """A combined norms document seen from one component (names without its prefix)."""
    if document is None or not component:
        return document
    head = component + "/"
    files = {key[len(head):]: value for key, value in document.get("files", {}).items() if key.startswith(head)}
    norms = {name[len(component) + 1:]: dict(record, file=str(record.get("file", ""))[len(head):])
             for name, record in document.get("norms", {}).items()
             if name.startswith(component + ".") and str(record.get("file", "")).startswith(head)}
    return dict(document, files=files, norms=norms)


def _fingerprints(components: Sequence[Tuple[str, Any]]) -> Dict[str, Optional[Dict[str, Any]]]:
    """file key → its fingerprint, as compute_base_norms records it (None for a file that cannot be
    read: then nothing matches it)."""
    import base_norms

    def fingerprint(file: str) -> Optional[Dict[str, Any]]:
        try:  # a GGUF file has the same size + header-hash fingerprint as a safetensors one
            opened = base_norms.open_gguf(file) if file.lower().endswith(".gguf") else open_safetensors(file)
            return base_norms.fingerprint(opened)
        except AdapterFormatError:
            return None

    return {(f"{component}/" if component else "") + os.path.basename(file): fingerprint(file)
            for component, checkpoint in components for file in checkpoint.files}


def _expert_slice_norms(file: str, parameter: str, index: int) -> Dict[str, Any]:
    """σ_max and ‖W‖_F of one expert of a fused experts tensor: only that slice is decoded."""
    import base_norms

    sf = open_safetensors(file)
    info = sf.tensors[parameter]
    if info.problem is not None:
        raise AdapterFormatError(f"{file}: tensor {parameter!r}: {info.problem}")
    values = decode(raw_view(sf, info, index=index), info.dtype, np.float32)
    release_pages(sf, info)
    matrix = base_norms.as_matrix(values)
    fro_norm = base_norms.frobenius_norm(matrix)
    if not math.isfinite(fro_norm):
        raise AdapterFormatError(f"{file}: tensor {parameter!r} expert {index} contains NaN/Inf")
    result = base_norms.spectral_norm(matrix)
    return {"sigma_max": result.sigma_max, "fro_norm": fro_norm, "shape": list(values.shape), "dtype": info.dtype,
            "iterations": result.iterations, "converged": result.converged, "file": os.path.basename(file)}


def _compute_component(component: str, checkpoint: Any, names: Sequence[str], catalogue: Mapping[str, BaseWeight],
                       cache: Optional[Dict[str, Any]], progress: Optional[Callable[[str], None]]) -> Dict[str, Any]:
    """base_norms.compute_base_norms over one component, names and files namespaced by it.

    Expert slices the base side does not compute itself (it names them
    ``<parameter>[e]`` too) are computed here from the slice alone.
    """
    import base_norms

    local = [name[len(component) + 1:] if component else name for name in names]
    document = base_norms.compute_base_norms(checkpoint, local, existing=_component_view(cache, component),
                                             progress=progress)
    for name in list(document["errors"]):
        expert = _EXPERT_SUFFIX.match(name)
        weight = catalogue.get(_named(component, name))
        if expert and weight is not None and weight.file is not None and "not found" in document["errors"][name]:
            try:
                document["norms"][name] = _expert_slice_norms(weight.file, expert["path"], int(expert["index"]))
                del document["errors"][name]
            except AdapterFormatError as error:
                document["errors"][name] = str(error)
    if not component:
        return document
    head = component + "/"
    return dict(document,
                files={head + key: value for key, value in document["files"].items()},
                norms={_named(component, name): dict(record, file=head + str(record.get("file", "")))
                       for name, record in document["norms"].items()},
                errors={_named(component, name): error for name, error in document["errors"].items()},
                stale_files=[head + key for key in document.get("stale_files", [])])


def _merged_documents(documents: Sequence[Dict[str, Any]], base: str) -> Dict[str, Any]:
    if len(documents) == 1:
        return documents[0]
    merged = dict(documents[0], base=base, files={}, norms={}, errors={}, stale_files=[])
    for document in documents:
        for key in ("files", "norms", "errors"):
            merged[key].update(document[key])
        merged["stale_files"].extend(document.get("stale_files", []))
    return merged


def _trusted_norms_file(document: Dict[str, Any], current: Mapping[str, Any], path: str, base_model: str,
                        issues: List[str]) -> bool:
    """A norms file is used with a base only when it was computed from that base's very files."""
    listed = document.get("files") or {}
    differing = sorted(key for key, value in listed.items() if current.get(key) is None or current[key] != value)
    if listed and not differing:
        return True
    reason = f"its fingerprints differ for {', '.join(differing[:4])}" if listed else "it carries no file fingerprints"
    issues.append(f"udr: --base-norms {path} was not computed from --base-model {base_model} ({reason}); "
                  "not used, the norms were recomputed from the base")
    return False


def collect_base_norms(module_names: Sequence[str], *, base_model: Optional[str] = None,
                       norms_file: Optional[str] = None, cache_file: Optional[str] = None,
                       layer_replication: Any = None, progress: Optional[Callable[[str], None]] = None,
                       delta_shapes: Optional[Mapping[str, Optional[Sequence[int]]]] = None,
                       fan_in_fan_out: bool = False) -> BaseNorms:
    """Base σ_max and ‖W‖_F for each module, from a norms file, a cache, or the checkpoint.

    Only the base tensors of adapted modules are read.  With ``delta_shapes``
    (module → ΔW's matrix shape) every match passes the shape and storage guard
    (:func:`base_weight_problem`).  A norms file is used next to a base only if
    its fingerprints are that base's; without a base its norms are used
    unverified (``verified`` False).  Never raises for a missing/damaged base
    or cache: those become issues and null UDR fields.
    """
    import base_norms  # only audits that ask for UDR pay for it

    issues: List[str] = []
    replication_problem = _layer_replication_problem(layer_replication)
    if replication_problem:
        issues.append(f"udr: {replication_problem}")
    replication = _layer_replication_map(layer_replication)
    wanted = {module: base_module_name(module, replication) for module in module_names}
    records: Dict[str, Dict[str, Any]] = {}
    components: List[Tuple[str, Any]] = []
    catalogue: Dict[str, BaseWeight] = {}
    if base_model:
        try:
            components = base_components(base_model)
            for component, checkpoint in components:
                escape = _weight_map_escape(checkpoint.root) if Path(checkpoint.root).is_dir() else None
                if escape:
                    raise AdapterFormatError(escape)
                for name, value in base_norms.list_parameters(checkpoint).items():
                    file, shape, storage = _listed_weight(value)
                    catalogue[_named(component, name)] = BaseWeight(shape, storage, file, stored_name=name)
        except AdapterFormatError as error:
            issues.append(f"udr: {error}")
            components, catalogue = [], {}
    if norms_file:
        document = _load_norms_file(norms_file, "--base-norms", issues)
        if document is not None and (not components or _trusted_norms_file(
                document, _fingerprints(components), norms_file, base_model, issues)):
            records.update(document["norms"])
    cache = None
    if cache_file and Path(cache_file).exists():
        cache = _load_norms_file(cache_file, "--base-norms-cache", issues)
        if cache is not None and not components:
            records.update(cache["norms"])
    if not components and cache_file and not base_model and cache is None:
        issues.append(f"udr: --base-norms-cache {cache_file} does not exist and no --base-model to compute it from")
    companions = quantization_companions(catalogue)
    if components:
        if any(_EXPERT_SUFFIX.match(name) for name in wanted.values()):
            catalogue.update(_expert_slices(catalogue))
        # A weight stored only as packed blocks (weight_packed, qweight, gpt-oss *_blocks) is still named
        # after its module: matched, then refused by its storage instead of "no base weight named like it".
        packed = {owner: BaseWeight(None, "quantized") for owner in companions
                  if owner not in catalogue and owner + ".weight" not in catalogue}
        # … and so is one expert of packed fused experts (gpt-oss MXFP4 gate_up_proj_blocks / _scales).
        packed.update({target: BaseWeight(None, "quantized") for target in wanted.values()
                       if _EXPERT_SUFFIX.match(target) and _owner_path(target) in packed})
        candidates = {**catalogue, **packed}
    else:
        candidates = {name: BaseWeight(tuple(record["shape"]) if isinstance(record.get("shape"), list) else None,
                                       record.get("storage") or record.get("dtype")) for name, record in records.items()}
    matches, match_issues = match_base_parameters(sorted(set(wanted.values())), candidates)
    issues.extend(match_issues)

    refused: set = set()
    unchecked: List[str] = []
    for module, base_name in sorted(wanted.items()):
        parameter = matches.get(base_name)
        if parameter is None:
            continue
        weight = candidates[parameter]
        listed = companions.get(_owner_path(parameter), ())
        if delta_shapes is None:  # the API called with names only: the storage is still checked
            problem = storage_problem(module, parameter, weight, listed)
        else:
            problem = base_weight_problem(module, parameter, delta_shapes.get(module), weight, companions=listed,
                                          transposed_storage=fan_in_fan_out or _EXPERT_SUFFIX.match(parameter) is not None)
        if problem:
            issues.append(problem)
            refused.add(module)
        elif weight.shape is None and delta_shapes is not None:
            unchecked.append(module)
    if unchecked:
        issues.append(f"udr: {len(unchecked)} base norms records carry no shape (e.g. for {unchecked[0]}); "
                      "their shapes could not be checked against ΔW")

    if components:
        by_component: Dict[str, List[str]] = {}
        used = {matches[base_name] for module, base_name in wanted.items() if base_name in matches and module not in refused}
        for parameter in sorted(used - set(records)):
            component = next((c for c, _ in components if c and parameter.startswith(c + ".")), "")
            by_component.setdefault(component, []).append(parameter)
        computed = _merged_documents([_compute_component(component, checkpoint, by_component.get(component, []),
                                                         catalogue, cache, progress)
                                      for component, checkpoint in components], base_model)
        if computed["stale_files"] or (cache is not None and cache["norms"] and not cache.get("files")):
            issues.append(f"udr: --base-norms-cache {cache_file} does not match this base's files "
                          f"({', '.join(computed['stale_files']) or 'no fingerprints'}); its norms were recomputed")
        records.update(computed["norms"])
        for name, error in computed["errors"].items():
            issues.append(f"udr: base weight {name}: {error}")
        if cache_file:
            try:
                if Path(cache_file).exists() and not Path(cache_file).is_file():
                    raise IsADirectoryError(0, "not a regular file")
                base_norms.update_cache(cache_file, computed)
            except OSError as error:
                issues.append(f"udr: --base-norms-cache {cache_file}: cannot write ({error.strerror or error})")

    norms: Dict[str, Tuple[float, float]] = {}
    sources: Dict[str, BaseWeight] = {}
    for module, base_name in wanted.items():
        record = records.get(matches.get(base_name, ""))
        if record is None or module in refused:
            continue
        if not record.get("converged", True):
            issues.append(f"udr: {module}: base σ_max did not converge in {record.get('iterations')} iterations; "
                          "UDR not computed")
            continue
        norms[module] = (float(record["sigma_max"]), float(record["fro_norm"]))
        weight = catalogue.get(matches[base_name])
        if weight is not None and weight.file is not None:
            sources[module] = weight
    if not base_model and not norms_file and not cache_file:
        issues.append("udr: no base model or norms file given")
    # With a base, every norm used was computed from it or fingerprint-checked against it.
    return BaseNorms(norms, issues, bool(components) if norms else None, sources)


# ── UDR: DoRA's effective update ────────────────────────────────────────────
# DoRA (PEFT tuners/lora/dora.py, MLX DoRALinear, LyCORIS weight_decompose)
# adds to W₀'s output
#   ΔW_eff = diag(c)·(W₀ + s·B·A) − W₀,   c = m / (‖W₀ + s·B·A‖_row + ε),
# the norm over the input axis for each output row (PEFT calls it "column-wise"
# of the (in, out) view: torch.linalg.norm(weight, dim=1) on the (out, in)
# weight).  LyCORIS adds ε = float32 eps to the norm, and with wd_on_output
# false normalises each input column instead: ΔW_eff = (W₀ + s·B·A)·diag(c) − W₀.
# σ_max(ΔW_eff) comes from Lanczos over mat-vecs through W₀ and the factors;
# ΔW_eff is never formed.  W₀ is read once per module, in float32.


class DoraUpdate:
    """ΔW_eff as an operator (``shape``, ``matvec``, ``rmatvec``, and ``@`` / ``.T``
    so a matrix-only ``spectral_norm`` takes it too); ``per`` is "row" or "column".

    Written as diag(c − 1)·W₀ + diag(c)·s·B·A (row; the mirror image for
    columns): c ≈ 1, so the two W₀ terms of the definition would cancel in
    float32; c − 1 is formed in float64 and multiplies W₀'s float32 mat-vec,
    whose rounding then stays relative to ΔW_eff.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, base: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, magnitude: np.ndarray,
                 per: str = "row", epsilon: float = 0.0):
        self.base, self.a, self.b, self.scale, self.per = base, a, b, scale, per
        rows = per == "row"
        base_sq = np.zeros(base.shape[0] if rows else base.shape[1])
        cross = np.zeros((base_sq.size, a.shape[0]))  # W₀·Aᵀ (row) or W₀ᵀ·B (column), in float64
        step = max(1, CHUNK_ELEMENTS // max(base.shape[1], 1))
        for start in range(0, base.shape[0], step):  # float64 row blocks: no full-size float64 copy of W₀
            block = base[start:start + step].astype(np.float64)
            if rows:
                base_sq[start:start + step] = np.einsum("ij,ij->i", block, block)
                cross[start:start + step] = block @ a.T
            else:
                base_sq += np.einsum("ij,ij->j", block, block)
                cross += block.T @ b[start:start + step]
        # ‖W₀ᵢ + s·Bᵢ·A‖² = ‖W₀ᵢ‖² + 2s·Bᵢ·(A·W₀ᵢᵀ) + s²·Bᵢ·(A·Aᵀ)·Bᵢᵀ, and for column j
        # ‖W₀ⱼ + s·B·Aⱼ‖² = ‖W₀ⱼ‖² + 2s·(W₀ᵀ·B)ⱼ·Aⱼ + s²·Aⱼᵀ·(Bᵀ·B)·Aⱼ.
        if rows:
            adapted_sq = base_sq + 2 * scale * np.einsum("ir,ir->i", b, cross) \
                + scale * scale * np.einsum("ir,rs,is->i", b, a @ a.T, b)
        else:
            adapted_sq = base_sq + 2 * scale * np.einsum("jr,rj->j", cross, a) \
                + scale * scale * np.einsum("rj,rs,sj->j", a, b.T @ b, a)
        self.base_norms = np.sqrt(base_sq)
        norms = np.sqrt(np.maximum(adapted_sq, 0.0)) + epsilon
        with np.errstate(divide="ignore", invalid="ignore"):
            self.gain = magnitude / norms
            self.gain_minus_one = (magnitude - norms) / norms
        self.shape = base.shape

    def _through_base(self, matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
        return (matrix @ vector.astype(np.float32)).astype(np.float64)

    def matvec(self, vector: np.ndarray) -> np.ndarray:
        vector = np.asarray(vector, dtype=np.float64)
        if self.per == "row":
            return self.gain_minus_one * self._through_base(self.base, vector) \
                + self.gain * (self.scale * (self.b @ (self.a @ vector)))
        return self._through_base(self.base, self.gain_minus_one * vector) \
            + self.scale * (self.b @ (self.a @ (self.gain * vector)))

    def rmatvec(self, vector: np.ndarray) -> np.ndarray:
        vector = np.asarray(vector, dtype=np.float64)
        if self.per == "row":
            return self._through_base(self.base.T, self.gain_minus_one * vector) \
                + self.scale * (self.a.T @ (self.b.T @ (self.gain * vector)))
        return self.gain_minus_one * self._through_base(self.base.T, vector) \
            + self.gain * (self.scale * (self.a.T @ (self.b.T @ vector)))

    def __matmul__(self, vector: np.ndarray) -> np.ndarray:
        return self.matvec(vector)

    @property
    def T(self) -> "_Transposed":
        return _Transposed(self)


class _Transposed(NamedTuple):
    operator: DoraUpdate

    @property
    def shape(self) -> Tuple[int, int]:
        return self.operator.shape[::-1]

    def __matmul__(self, vector: np.ndarray) -> np.ndarray:
        return self.operator.rmatvec(vector)


def _dora_factors(result: AuditResult) -> Dict[str, Tuple[LoraModule, _Factors, _TensorSource]]:
    """name → (module, factor layout, tensor source) for the DoRA modules of a file audit."""
    if result.weights_path is None or not any(layer.dora_magnitude is not None for layer in result.layers):
        return {}
    sf = open_safetensors(result.weights_path)
    source = _TensorSource.from_file(sf)
    modules, _ = group_modules(result.adapter_format, list(sf.tensors), lambda key: source.describe(key)[1])
    found = {}
    for module in modules:
        if module.magnitude_key is None or module.a_key is None or module.b_key is None or module.family != "lora":
            continue
        layout, problem = _factor_layout(module, source.describe(module.a_key)[1], source.describe(module.b_key)[1])
        if layout is not None:
            found[module.name] = (module, layout, source)
    return found


def _dora_convention(magnitude_shape: Tuple[int, ...], layer: ModuleAudit, kind: str,
                     module: LoraModule) -> Tuple[Optional[str], float]:
    """("row" | "column" | None, ε) from the magnitude's stored shape.

    PEFT's lora_magnitude_vector ((out,); a conv's (1, out, 1, 1)) and MLX's m:
    per output row, no ε.
    LyCORIS's dora_scale (out, 1[, 1, 1]) per output row, (1, in) per input
    column (wd_on_output false), both with ε = float32 eps added to the norm
    (lycoris/functional/general.py _weight_decompose).  A conv normalised per
    input channel, (1, in, 1, 1), spans several columns of the flattened ΔW.
    """
    rows, columns = layer.delta_shape
    size = math.prod(magnitude_shape)
    if not module.magnitude_key.endswith(".dora_scale"):  # PEFT (out,) or conv (1, out, 1, 1); MLX (out,)
        return ("row" if size == rows else None), 0.0
    epsilon = float(np.finfo(np.float32).eps)
    if size == rows and magnitude_shape[0] == rows:
        return "row", epsilon
    if kind == "linear" and tuple(magnitude_shape) == (1, columns):
        return "column", epsilon
    return None, epsilon


def _oriented(source: _TensorSource, ref: FactorRef, rank_first: bool) -> np.ndarray:
    values = decode(_stored_matrix(source, ref), source.describe(ref.key)[0])
    return values if (ref.rank_axis == 0) == rank_first else values.T


def _read_w0(base: BaseWeight, catalogs: Dict[str, Any]) -> np.ndarray:
    """W₀ in float32: a plain float tensor as stored; a quantized or GGUF one dequantized by
    base_norms exactly as its library does (the W₀ PEFT's DoRA dequantizes too).  The
    catalogue is of W₀'s own file (config.json beside it), kept in ``catalogs`` per file."""
    import base_norms

    if _is_plain_float(base.storage) and base.file.endswith(".safetensors"):
        sf = open_safetensors(base.file)
        w0 = read_tensor(sf, base.stored_name, np.float32)
        release_pages(sf, sf.tensors[base.stored_name])
        return w0
    if base.file not in catalogs:
        catalogs[base.file] = base_norms.catalog(base_norms.resolve_base(base.file))
    found = catalogs[base.file]
    if base.stored_name not in found.weights:
        raise AdapterFormatError(f"{base.file}: {base.stored_name} is not a weight of this file")
    return base_norms.load_weight(found, found.weights[base.stored_name])


def dora_effective(layer: ModuleAudit, module: LoraModule, layout: _Factors, source: _TensorSource,
                   base: BaseWeight, catalogs: Optional[Dict[str, Any]] = None
                   ) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """σ_max of DoRA's effective update and the magnitude change m / ‖W₀‖_row − 1, or an issue.

    ``catalogs``: base_norms catalogues of quantized / GGUF base files, shared across modules."""
    import base_norms

    if layout.kind not in ("linear", "conv") or layer.delta_shape is None:
        return None, (f"udr: {layer.name}: the effective DoRA update is computed for linear and conv layers; "
                      f"{layout.kind} reports the plain s·B·A UDR only")
    if base.expert is not None or base.file is None:
        return None, (f"udr: {layer.name}: the effective DoRA update needs W₀ as one weight of the base "
                      f"({base.stored_name} is an expert slice or was not read from a file); "
                      "the plain s·B·A UDR is reported")
    per, epsilon = _dora_convention(source.describe(module.magnitude_key)[1], layer, layout.kind, module)
    if per is None:
        return None, (f"udr: {layer.name}: DoRA magnitude of shape {list(source.describe(module.magnitude_key)[1])} "
                      f"fits neither a norm per output row nor per input column of ΔW {list(layer.delta_shape)}; "
                      "the plain s·B·A UDR is reported")
    magnitude = source.load(module.magnitude_key).reshape(-1)
    rows, columns = layer.delta_shape
    try:
        w0 = _read_w0(base, {} if catalogs is None else catalogs)
    except AdapterFormatError as error:
        return None, f"udr: {layer.name}: W₀ cannot be read ({error}); the plain s·B·A UDR is reported"
    w0 = w0.reshape(w0.shape[0], -1)
    if w0.shape != (rows, columns):
        w0 = np.ascontiguousarray(w0.T)  # fan_in_fan_out storage (the shape guard allowed only this)
    a, b = _oriented(source, layout.a, True), _oriented(source, layout.b, False)
    operator = DoraUpdate(w0, a, b, layer.scale, magnitude, per, epsilon)
    if not (np.isfinite(operator.gain).all() and np.isfinite(w0).all()):
        return None, f"udr: {layer.name}: a row of W₀ + s·B·A has zero norm or W₀ is not finite; effective DoRA UDR not computed"
    sigma = base_norms.spectral_norm(operator)
    change = magnitude / operator.base_norms - 1.0
    return {"dora_effective_sigma_max": sigma.sigma_max, "dora_magnitude_change": _dora_stats(change),
            "converged": sigma.converged}, None


def attach_udr(result: AuditResult, *, base_model: Optional[str] = None, base_norms: Optional[str] = None,
               base_norms_cache: Optional[str] = None, progress: Optional[Callable[[str], None]] = None,
               base_model_id: Optional[str] = None) -> AuditResult:
    """Fill ``base_sigma_max``, ``base_fro_norm``, ``udr``, ``udr_f``, ``sdi`` per module,
    and for DoRA modules the effective update's ``dora_effective_sigma_max`` /
    ``udr_dora_effective`` / ``dora_magnitude_change``.

    The audit always completes: a missing base, an unmatched module, a base
    weight of another shape or a failed convergence leaves that module's UDR
    fields null with a specific issue.
    Works on any result, e.g. one from :func:`audit_lora_state_dict` in a
    training loop (the base's norms are cached with ``base_norms_cache``).
    ``base_model_id`` is upstream gradience's name for ``base_model`` (an alias).
    """
    base_model = _alias(base_model, base_model_id, "base_model", "base_model_id")
    issues = list(result.issues)
    if base_model == "auto":
        base_model = result.config.base_model_name_or_path
        if not base_model:
            issues.append("udr: --base-model auto, but the adapter config has no base_model_name_or_path")
    lookup = collect_base_norms([layer.name for layer in result.layers], base_model=base_model,
                                norms_file=base_norms, cache_file=base_norms_cache,
                                layer_replication=result.config.layer_replication, progress=progress,
                                delta_shapes={layer.name: layer.delta_shape for layer in result.layers},
                                fan_in_fan_out=result.config.fan_in_fan_out)
    issues.extend(lookup.issues)
    dora = _dora_factors(result) if lookup.norms else {}
    catalogs: Dict[str, Any] = {}  # quantized / GGUF base files, catalogued once for all DoRA modules
    layers = []
    for layer in result.layers:
        if layer.name not in lookup.norms:
            layers.append(layer)
            continue
        sigma, fro = lookup.norms[layer.name]
        udr = layer.delta_sigma_max / (sigma + UDR_EPS)
        layer = replace(layer, base_sigma_max=sigma, base_fro_norm=fro, udr=udr,
                        udr_f=layer.delta_fro_norm / (fro + UDR_EPS), sdi=math.log10(udr + UDR_EPS))
        if layer.dora_magnitude is not None:
            effective, problem = None, None
            if layer.name not in dora:
                problem = f"udr: {layer.name}: DoRA factors could not be re-read; the plain s·B·A UDR is reported"
            elif layer.name not in (lookup.sources or {}):
                problem = (f"udr: {layer.name}: the effective DoRA update needs W₀ from --base-model "
                           "(norms alone are not enough); the plain s·B·A UDR is reported")
            else:
                effective, problem = dora_effective(layer, *dora[layer.name], lookup.sources[layer.name], catalogs)
            if problem:
                issues.append(problem)
            elif not effective["converged"]:
                issues.append(f"udr: {layer.name}: the effective DoRA σ_max did not converge; not reported")
            else:
                sigma_eff = effective["dora_effective_sigma_max"]
                layer = replace(layer, dora_effective_sigma_max=sigma_eff, udr_dora_effective=sigma_eff / (sigma + UDR_EPS),
                                dora_magnitude_change=effective["dora_magnitude_change"])
        layers.append(layer)
    return replace(result, layers=tuple(layers), issues=tuple(issues), udr_requested=True,
                   base_norms_verified=lookup.verified)


# ══ 6b. rank advice ══════════════════════════════════════════════════════════
# Each policy turns one module's singular values σ₁ ≥ … ≥ σᵣ (of the unscaled
# B·A) into a rank k; all are pure functions of σ, so advice for another
# policy never re-reads the file.  A zero update gets k = 0 from every policy;
# otherwise 1 ≤ k ≤ r.  The formulas (and where they differ from upstream
# gradience's rank_policies.py) are in the README, "Rank advice".

DEFAULT_RANK_POLICIES = ("energy@0.90", "knee", "erank")
# Gavish & Donoho (2014), "The optimal hard threshold for singular values is
# 4/√3": with unknown noise level, τ = ω(β)·median(σ); ω(1) = λ*(1)/√μ₁ =
# (4/√3)/√0.652776 = 2.858362, μ₁ the median of the Marchenko–Pastur law at β = 1.
# The r nonzero singular values of B·A are those of the r×r core R_B·R_Aᵀ, so
# the matrix thresholded is that square core: β = 1, and median(σ) over its r values.
OHT_OMEGA_SQUARE = 2.858362
# exp(log k) and Σσ²/σ₁² can land a few ulps above an integer; a ceiling must not
# turn 3.0000000000000004 into 4.
CEIL_SLACK = 1e-9
# A linear scree lies on its chord up to round-off; only a point this far below it is a knee.
KNEE_MIN_DISTANCE = 1e-12


def _ceil_rank(value: float, rank: int) -> int:
    return min(max(1, math.ceil(value - CEIL_SLACK)), rank)


def _energy_rank(sigma: np.ndarray, fraction: float) -> int:
    # Smallest k with Σ_{i≤k} σᵢ² ≥ P·Σσ² (the audit's energy_rank_90 at P = 0.9).
    energy = np.cumsum(np.square(sigma))
    return min(int(np.count_nonzero(energy < fraction * energy[-1])) + 1, sigma.size)


def _knee_rank(sigma: np.ndarray) -> int:
    # Kneedle (Satopää et al. 2011) on the scree curve σᵢ against i, both axes
    # min–max normalised: xᵢ = (i−1)/(r−1), yᵢ = (σᵢ − σᵣ)/(σ₁ − σᵣ).  The knee
    # is the point furthest below the chord from (0, 1) to (1, 0), i.e. argmax of
    # dᵢ = (1 − xᵢ) − yᵢ (first on ties), and the components before it are kept:
    # k = i* − 1.  No point more than 1e-12 below the chord (a flat, linear or
    # concave scree; r < 3): no knee, k = r.
    count = sigma.size
    if count < 3 or sigma[0] == sigma[-1]:
        return count
    x = np.arange(count) / (count - 1)
    y = (sigma - sigma[-1]) / (sigma[0] - sigma[-1])
    distance = (1.0 - x) - y
    knee = int(np.argmax(distance))  # 0-based index of the knee point = components before it
    return knee if distance[knee] > KNEE_MIN_DISTANCE and knee > 0 else count


def _erank_rank(sigma: np.ndarray) -> int:
    # ⌈exp(H)⌉, H the entropy of pᵢ = σᵢ/Σσⱼ over σ > 1e-12 (the audit's effective_rank).
    positive = sigma[sigma > 1e-12]
    if positive.size == 0:
        return 1
    p = positive / positive.sum()
    return _ceil_rank(math.exp(-float(np.sum(p * np.log(p)))), sigma.size)


def _oht_rank(sigma: np.ndarray) -> int:
    # Number of σᵢ strictly above τ = ω(1)·median(σ), at least 1.
    threshold = OHT_OMEGA_SQUARE * float(np.median(sigma))
    return min(max(1, int(np.count_nonzero(sigma > threshold))), sigma.size)


def _stable_ceil_rank(sigma: np.ndarray) -> int:
    return _ceil_rank(float(np.sum(np.square(sigma)) / sigma[0] ** 2), sigma.size)


RANK_POLICIES: Dict[str, Callable[[np.ndarray], int]] = {
    "knee": _knee_rank, "erank": _erank_rank, "oht": _oht_rank, "stable": _stable_ceil_rank}
# upstream gradience's internal policy names, accepted so its scripts run unchanged
# (its energy_threshold defaults to 0.90)
UPSTREAM_POLICY_NAMES = {"energy_threshold": "energy@0.90", "knee_elbow": "knee", "entropy_effective": "erank",
                         "optimal_hard_threshold": "oht", "stable_rank_ceil": "stable"}


def parse_rank_policies(text: str) -> Tuple[str, ...]:
    """``"energy@0.90,knee,erank"`` → a tuple of policy names; ValueError names a bad one."""
    policies: List[str] = []
    for name in (part.strip().lower() for part in text.replace(" ", ",").split(",")):
        name = UPSTREAM_POLICY_NAMES.get(name, name)
        if not name or name in policies:
            continue
        if name.startswith("energy@"):
            try:
                fraction = float(name[len("energy@"):])
            except ValueError:
                fraction = math.nan
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"rank policy {name!r}: energy@P needs 0 < P <= 1 (e.g. energy@0.90)")
        elif name not in RANK_POLICIES:
            raise ValueError(f"unknown rank policy {name!r} (known: energy@P, {', '.join(RANK_POLICIES)})")
        policies.append(name)
    if not policies:
        raise ValueError("no rank policy given")
    return tuple(policies)


def policy_rank(policy: str, sigma: Sequence[float]) -> int:
    """The rank ``policy`` suggests for a module with singular values ``sigma`` (any order).

    >>> policy_rank("energy@0.90", [3.0, 1.0, 0.1])
    1
    >>> policy_rank("stable", [1.0, 1.0, 0.5])
    3
    """
    ordered = np.sort(np.asarray(sigma, dtype=np.float64))[::-1]
    if ordered.size == 0 or not ordered[0] > 0:
        return 0
    # Every policy but erank (whose σ > 1e-12 cutoff is absolute) is scale-free:
    # give them σ/σ₁, as batched_spectrum_metrics does, so σ near 1e200 cannot
    # overflow when squared.
    unit = ordered / ordered[0]
    if policy.startswith("energy@"):
        return _energy_rank(unit, float(policy[len("energy@"):]))
    return RANK_POLICIES[policy](ordered if policy == "erank" else unit)


def suggest_module_ranks(sigma: Sequence[float], policies: Sequence[str]) -> Dict[str, int]:
    return {policy: policy_rank(policy, sigma) for policy in policies}


def with_rank_policies(result: "AuditResult", policies: Sequence[str]) -> "AuditResult":
    """The same audit with every module's ``rank_suggestions`` under ``policies``."""
    layers = tuple(replace(layer, rank_suggestions=suggest_module_ranks(layer.singular_values, policies))
                   for layer in result.layers)
    return replace(result, layers=layers, rank_policies=tuple(policies))


def _params_at_rank(layer: "ModuleAudit", k: int) -> int:
    # A LoRA module holds r·(out + in) parameters, so rank k holds k/r of them.
    return layer.params // layer.r * min(k, layer.r) if layer.r else layer.params


def policy_summary(layers: Sequence["ModuleAudit"], policies: Sequence[str]) -> Dict[str, Any]:
    """``policies`` and ``policy_global_suggestions``: per policy the median / p90 /
    max of the modules' k and the LoRA parameters the advice keeps and saves."""
    table = {}
    for policy in policies:
        ks = [layer.rank_suggestions[policy] for layer in layers if policy in layer.rank_suggestions]
        lora = [layer for layer in layers if layer.family == "lora" and policy in layer.rank_suggestions]
        before = sum(layer.params for layer in lora)
        after = sum(_params_at_rank(layer, layer.rank_suggestions[policy]) for layer in lora)
        table[policy] = {"median": _median(ks), "p90": _percentile(ks, 90), "max": max(ks) if ks else None,
                         "params_after": after, "params_saved": before - after}
    return {"policies": list(policies), "policy_global_suggestions": table}


def peft_pattern_key(module_name: str) -> str:
    """A rank_pattern / alpha_pattern key that PEFT matches to exactly this module.

    PEFT matches ``re.match(rf"(.*\\.)?({key})$", name)``: the escaped name makes
    every character literal, and ``^`` (which can only match at position 0) stops
    the optional ``(.*\\.)?`` prefix from letting it match a longer name ending in it.
    """
    return "^" + re.escape(module_name)


def _mode(values: Sequence[Any]) -> Any:
    counts: Dict[Any, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return max(counts, key=lambda value: (counts[value], value))  # ties: the larger value


def _plain_number(value: float) -> Any:
    return int(value) if float(value).is_integer() else float(value)


def lora_config_for_ranks(ranks: Mapping[str, int], scales: Mapping[str, float], use_rslora: bool) -> Dict[str, Any]:
    """``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` giving each module
    its rank and keeping its scale: alpha = s·k (rsLoRA: s·√k).  The most common
    rank and alpha are the defaults; every other module gets an anchored key."""
    alphas = {name: scales[name] * (math.sqrt(k) if use_rslora else k) for name, k in ranks.items()}
    default_r = _mode(list(ranks.values()))
    default_alpha = _mode(list(alphas.values()))
    return {"r": default_r, "lora_alpha": _plain_number(default_alpha), "use_rslora": use_rslora,
            "rank_pattern": {peft_pattern_key(name): k for name, k in ranks.items() if k != default_r},
            "alpha_pattern": {peft_pattern_key(name): _plain_number(alpha)
                              for name, alpha in alphas.items() if alpha != default_alpha}}


def per_layer_advice(layers: Sequence["ModuleAudit"], policies: Sequence[str], config: AdapterConfig) -> Dict[str, Any]:
    """``suggested_config`` (a paste-able LoRA config for the first policy) and
    ``policy_disagreement`` (modules whose policies' ks differ by 2× or more)."""
    first = policies[0]
    ranks = {layer.name: max(1, layer.rank_suggestions[first]) for layer in layers if first in layer.rank_suggestions}
    scales = {layer.name: layer.scale for layer in layers}
    suggested = {"policy": first, **lora_config_for_ranks(ranks, scales, config.use_rslora)} if ranks else None
    disagreement = []
    for layer in layers:
        ks = {policy: k for policy, k in layer.rank_suggestions.items() if policy in policies}
        if len(ks) < 2:
            continue
        low, high = min(ks, key=ks.get), max(ks, key=ks.get)
        if ks[low] >= 1 and ks[high] >= 2 * ks[low]:
            disagreement.append({"name": layer.name, "low_policy": low, "low_k": ks[low],
                                 "high_policy": high, "high_k": ks[high]})
    return {"suggested_config": suggested, "policy_disagreement": disagreement}


def _short_module_name(name: str) -> str:
    return re.split(r"[._]", name)[-1] if "." not in name else name.rsplit(".", 1)[-1]


def rank_advice_lines(result: "AuditResult", per_layer: bool = False) -> List[str]:
    """The text report's advice: one row per policy, one per module type, and
    (``per_layer``) one line per layer index listing each module's k."""
    policies = result.rank_policies or DEFAULT_RANK_POLICIES
    layers = result.layers
    if not layers:
        return []
    table = policy_summary(layers, policies)["policy_global_suggestions"]
    lines = ["", f"  rank advice (per-module k by policy; README \"Rank advice\"):",
             f"    {'policy':<14} {'median':>7} {'p90':>6} {'max':>5} {'params kept':>12} {'saved':>12}"]
    for policy, row in table.items():
        lines.append(f"    {policy:<14} {_fmt(row['median']):>7} {_fmt(row['p90']):>6} {_fmt(row['max']):>5} "
                     f"{row['params_after']:>12,} {row['params_saved']:>12,}")
    types = [kind for kind in ("attn", "mlp", "other") if any(layer.module_type == kind for layer in layers)]
    lines.append(f"    {'median k by type':<16} " + "  ".join(f"{policy}" for policy in policies))
    for kind in types:
        group = [layer for layer in layers if layer.module_type == kind]
        lines.append(f"      {kind:<14} " + "  ".join(
            f"{_fmt(_median([layer.rank_suggestions.get(policy, 0) for layer in group])):>{len(policy)}}"
            for policy in policies))
    if per_layer:
        first = policies[0]
        lines.append(f"    per layer, k by {first} (module: k of r):")
        rows: Dict[Any, List[str]] = {}
        for layer in layers:
            rows.setdefault(layer.layer_index, []).append(
                f"{_short_module_name(layer.name)} {layer.rank_suggestions.get(first, '-')}/{layer.r}")
        for index, cells in rows.items():
            label = f"layer {index}" if index is not None else "other"
            lines.append(f"      {label:<10} " + ", ".join(cells))
        advice = per_layer_advice(layers, policies, result.config)
        for item in advice["policy_disagreement"][:5]:
            lines.append(f"    disagreement ≥2×: {item['name']}: {item['low_policy']} {item['low_k']} "
                         f"vs {item['high_policy']} {item['high_k']}")
        if len(advice["policy_disagreement"]) > 5:
            lines.append(f"    … {len(advice['policy_disagreement']) - 5} more modules where policies differ ≥2× (--json)")
    return lines


# ══ 7. reports ═══════════════════════════════════════════════════════════════

CHEAT_SHEET = (
    "How to read UDR (= ||ΔW||_2 / ||W_base||_2) and SDI (= log10 UDR); instrumentation, not a gate:",
    "  UDR < 0.1  (SDI < -1)   small perturbation of the base weight",
    "  UDR ~ 1    (SDI ~ 0)    the update is as strong as the base weight",
    "  UDR > 3    (SDI > 0.5)  the update dominates the base weight",
)
UTILIZATION_NOTE = (
    "Utilization = stable rank / r: low values mean most of the rank budget is unused;",
    "  suggested_r_* round the 90%-energy rank up to a power of two.",
)
UDR_HINT = ("UDR not computed: add --base-model PATH_OR_ID (or --base-norms FILE) to see how large each update "
            "is next to the weight it modifies.")


# Text goes to terminals: names and messages from a file must not carry
# escape sequences (ANSI/OSC), line breaks that forge report lines, or bidi
# overrides.  C0/C1 controls (but tab) and those code points print escaped.
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """``text`` with control characters shown as escapes (``\x1b``, ``\n``, ``\u202e``)."""
    return _TERMINAL_UNSAFE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _aligned(rows: Sequence[Sequence[str]], align: str, indent: str = "  ") -> List[str]:
    """Rows of cells as text columns, each as wide as its widest cell (long module
    names included), aligned per column: '<' left, '>' right."""
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(len(align))]
    return [indent + " ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)).rstrip() for row in rows]


def _headline(result: AuditResult, summary: Mapping[str, Any]) -> str:
    zero = sum(layer.sigma_max == 0 for layer in result.layers)
    if result.layers and zero == len(result.layers):
        return ("  the update is ZERO in every module (B·A = 0: a freshly initialised adapter, or training never "
                "updated it); rank figures do not apply")
    line = (f"  energy rank k@90%: p50 {_fmt(summary['energy_rank_90_p50'])}, p90 {_fmt(summary['energy_rank_90_p90'])}"
            f"  → suggested r: {_fmt(summary['suggested_r_global_median'])} (median), "
            f"{_fmt(summary['suggested_r_global_90'])} (p90)")
    return line + (f"   ({zero} of {len(result.layers)} modules have a zero update)" if zero else "")


def render_text_report(result: AuditResult, *, show_layers: bool = False, top_wasteful: int = 5,
                       singular_values: Optional[int] = None, suggest_per_layer: bool = False) -> str:
    """A human-readable report: summary, by-type table, suggestions, issues, cheat sheet;
    the first ``singular_values`` σ of each module (None: as many as the audit kept)."""
    summary = result.to_summary_dict()
    lines = [f"LoRA audit: {result.weights_path or '(in-memory state dict)'} [format {result.adapter_format}, "
             f"adapter {result.adapter_name!r}]"]
    if result.format_metadata:
        lines.append("  training metadata: " + ", ".join(f"{k}={v}" for k, v in result.format_metadata.items()))
    if result.other_adapters:
        lines.append(f"  other adapters saved here: {', '.join(result.other_adapters)} (use --adapter NAME)")
    lines += [
        f"  modules audited: {summary['n_layers']}   skipped: {summary['n_modules_skipped']}   "
        f"LoRA params: {summary['total_lora_params']:,}",
        f"  stable rank: mean {_fmt(summary['stable_rank_mean'])}, median {_fmt(summary['stable_rank_median'])}, "
        f"param-weighted {_fmt(summary['stable_rank_weighted_mean'])}",
        f"  effective rank mean {_fmt(summary['effective_rank_mean'])}   utilization mean {_fmt(summary['utilization_mean'])}",
        _headline(result, summary),
        "",
        f"  {'type':<6} {'modules':>7} {'params':>12} {'stable_rank':>11} {'utilization':>11} {'k90 p50':>8} {'k90 p90':>8}",
    ]
    for kind, row in summary["by_type"].items():
        lines.append(f"  {kind:<6} {row['n_layers']:>7} {row['params']:>12,} {_fmt(row['stable_rank_mean']):>11} "
                     f"{_fmt(row['utilization_mean']):>11} {_fmt(row['energy_rank_90_p50']):>8} {_fmt(row['energy_rank_90_p90']):>8}")
    lines += rank_advice_lines(result, per_layer=suggest_per_layer)
    if result.udr_requested:
        lines += ["", f"  UDR over {summary['n_layers_with_udr']} modules: mean {_fmt(summary['udr_mean'])}, "
                      f"median {_fmt(summary['udr_median'])}, p90 {_fmt(summary['udr_p90'])}, max {_fmt(summary['udr_max'])}; "
                      f"share > 0.1: {_fmt(summary['fraction_udr_gt_0_1'])}, > 0.3: {_fmt(summary['fraction_udr_gt_0_3'])}"]
        for kind, row in summary["by_type"].items():
            if row["n_layers_with_udr"]:
                lines.append(f"    {kind:<6} UDR p50 {_fmt(row['udr_median'])}  p90 {_fmt(row['udr_p90'])}  "
                             f"max {_fmt(row['udr_max'])}  (SDI p50 {_fmt(row['sdi_median'])})")
        lines += _udr_notes(result)
    nonzero = [layer for layer in result.layers if layer.sigma_max > 0]
    if top_wasteful > 0 and nonzero:
        lines += ["", f"  most wasteful modules (lowest utilization, top {top_wasteful}):"]
        lines += _aligned([(layer.name, f"r={layer.r}", f"util={_fmt(layer.utilization)}",
                            f"stable_rank={_fmt(layer.stable_rank)}", f"k90={layer.energy_rank_90}")
                           for layer in sorted(nonzero, key=lambda layer: layer.utilization)[:top_wasteful]],
                          "<<<<<", indent="    ")
    if show_layers and result.layers:
        header = ("module", "type", "r", "scale", "σ_max(ΔW)", "stable", "util", "k90", "UDR")
        lines += [""] + _aligned([header] + [
            (layer.name, layer.module_type, str(layer.r), _fmt(layer.scale), _fmt(layer.delta_sigma_max),
             _fmt(layer.stable_rank), _fmt(layer.utilization), str(layer.energy_rank_90), _fmt(layer.udr))
            for layer in result.layers], "<<>>>>>>>")
    with_values = [(layer.name, layer.top_singular_values[:singular_values]) for layer in result.layers
                   if layer.top_singular_values and singular_values != 0]
    if with_values:
        count = max(len(values) for _, values in with_values)
        lines += ["", f"  top {count} singular values of B·A (unscaled; ‖ΔW‖₂ = |scale|·σ₁):"]
        lines += _aligned([(name, *(_fmt(value) for value in values), *[""] * (count - len(values)))
                           for name, values in with_values], "<" + ">" * count, indent="    ")
    if result.non_lora_tensors:
        lines += ["", f"  non-LoRA tensors saved with the adapter ({len(result.non_lora_tensors)}): "
                      + ", ".join(module_name_from_prefix(k) for k in result.non_lora_tensors[:8])
                      + (" …" if len(result.non_lora_tensors) > 8 else "")]
    if result.issues:
        lines += ["", f"  issues ({len(result.issues)}):"] + [f"    - {issue}" for issue in result.issues]
    lines += [""] + ["  " + line for line in UTILIZATION_NOTE]
    if any(layer.udr is not None for layer in result.layers):
        lines += ["  " + line for line in CHEAT_SHEET]
    elif not result.udr_requested:
        lines.append("  " + UDR_HINT)
    return "\n".join(terminal_safe(line) for line in lines)


def _udr_notes(result: AuditResult) -> List[str]:
    """What the UDR lines above do not say: DoRA's effective update, and norms taken on trust."""
    notes = []
    dora = [layer.udr_dora_effective for layer in result.layers if layer.udr_dora_effective is not None]
    if dora:
        notes.append(f"    DoRA: the update DoRA applies, m ⊙ (W₀ + s·B·A)/‖W₀ + s·B·A‖ − W₀, has UDR median "
                     f"{_fmt(_median(dora))}, max {_fmt(max(dora))} over {len(dora)} modules "
                     "(the UDR above is the plain s·B·A; per module: udr_dora_effective)")
    if result.base_norms_verified is False:
        notes.append("    base norms taken from a norms file without a base to check them against (not verified)")
    return notes


# ── HTML report ──────────────────────────────────────────────────────────────
# One self-contained file: inline CSS and SVG, no fonts or network, and a few
# lines of JavaScript that only sort the module table (the page is complete
# without them).  Charts are drawn for a 660-px column, so the page fits a
# 700-px window.  Every colour has a colour bar whose range comes from the
# data.  SVG text is 10-px monospace so label widths can be computed; a label
# that does not fit is abbreviated from the middle, lengthened until no two
# labels read the same, and the full name is in its hover title and in the
# module table.

CHART_WIDTH = 660
CHAR_WIDTH = 6.2  # px per character of 10-px monospace (DejaVu Sans Mono is 0.602 em), with a margin
UDR_BANDS = ((0.1, "0.1"), (1.0, "1"), (3.0, "3"))  # the specification's reading bands (cheat sheet)
SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
MISSING_COLOUR = "#d9d9d9"
NO_LAYER = "(no layer)"

_PALETTE = ((0.267, 0.005, 0.329), (0.283, 0.141, 0.458), (0.254, 0.265, 0.530), (0.207, 0.372, 0.553),
            (0.164, 0.471, 0.558), (0.128, 0.567, 0.551), (0.135, 0.659, 0.518), (0.267, 0.749, 0.441),
            (0.478, 0.821, 0.318), (0.741, 0.873, 0.150), (0.993, 0.906, 0.144))  # viridis


def _colour(fraction: Optional[float]) -> str:
    if fraction is None or not math.isfinite(fraction):
        return MISSING_COLOUR
    position = min(max(fraction, 0.0), 1.0) * (len(_PALETTE) - 1)
    low = int(position)
    high = min(low + 1, len(_PALETTE) - 1)
    mix = [(1 - (position - low)) * a + (position - low) * b for a, b in zip(_PALETTE[low], _PALETTE[high])]
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in mix)


def _nice_ticks(low: float, high: float, count: int = 6) -> List[float]:
    """Round-numbered ticks (steps of 1, 2, 2.5 or 5 × 10^k) inside [low, high]."""
    if not high > low:
        return [low]
    raw = (high - low) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9)
    return [round(i * step, 12) for i in range(first, int(math.floor(high / step + 1e-9)) + 1)]


def _log_ticks(low: float, high: float) -> List[float]:
    """Decades inside [low, high] (thinned to at most 7); 1-2-5 steps when fewer than two decades fit."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    decades = [10.0 ** e for e in range(first, last + 1) if low <= 10.0 ** e <= high * (1 + 1e-12)]
    if len(decades) >= 2:
        return decades[::max(1, math.ceil(len(decades) / 7))]
    steps = sorted(m * 10.0 ** e for e in range(first, last + 1) for m in (1, 2, 5))
    return [value for value in steps if low <= value <= high]


def _tick_label(value: float) -> str:
    return f"{value:.3g}"


class ValueScale(NamedTuple):
    """A data range mapped onto [0, 1], linear or logarithmic."""

    low: float
    high: float
    log: bool = False

    def fraction(self, value: float) -> float:
        low, high = self.low, self.high
        if self.log:
            value, low, high = math.log10(max(value, low)), math.log10(low), math.log10(high)
        return min(max((value - low) / (high - low), 0.0), 1.0) if high > low else 0.5

    def ticks(self) -> List[float]:
        return _log_ticks(self.low, self.high) if self.log else _nice_ticks(self.low, self.high)


def _round_outward(value: float, down: bool) -> float:
    """To 3 significant digits, away from the data: the labelled ends then contain it."""
    if value == 0 or not math.isfinite(value):
        return value
    unit = 10.0 ** (math.floor(math.log10(abs(value))) - 2)
    steps = math.floor(value / unit + 1e-9) if down else math.ceil(value / unit - 1e-9)
    return float(f"{steps * unit:.3g}")


def value_scale(values: Iterable[Optional[float]], *, log: bool = False, from_zero: bool = False) -> Optional[ValueScale]:
    """The range of the finite values (positive ones on a log scale), its ends rounded
    outward to 3 significant digits; None if there are none.  A single value is
    widened so it sits inside a readable range."""
    finite = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
    if not finite:
        return None
    low, high = (0.0 if from_zero else _round_outward(min(finite), down=True)), _round_outward(max(finite), down=False)
    if high <= low:
        low, high = (low / 2, high * 2) if log else (low, low + 1.0)
    return ValueScale(low, high, log)


def _abbreviate(text: str, limit: int) -> str:
    """Cut from the middle (the start names the block, the end the index and module)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 5
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def distinct_labels(names: Sequence[str], limit: int) -> Dict[str, str]:
    """Labels of at most ``limit`` characters, abbreviated from the middle — longer
    where two would otherwise read the same, up to the full names."""
    longest = max((len(name) for name in names), default=0)
    for width in range(min(limit, longest), longest + 1):
        labels = {name: _abbreviate(name, width) for name in names}
        if len(set(labels.values())) == len(labels):
            return labels
    return {name: name for name in names}


def _shared_prefix(names: Sequence[str]) -> str:
    """The prefix all names share, cut after a path separator ('.' or '_')."""
    if len(names) < 2:
        return ""
    shared = os.path.commonprefix(list(names))
    cut = max(shared.rfind("."), shared.rfind("_"))
    return shared[:cut + 1]


def _human_key(text: str) -> List[Any]:
    # "blocks_10" after "blocks_9", in dotted and in kohya's flattened names alike.  Only
    # ASCII digits, at most 9 at a time: int() of a hostile 5,000-digit run would raise.
    return [(0, int(part), "") if index % 2 else (1, 0, part)
            for index, part in enumerate(re.split(r"([0-9]{1,9})", text))]


def _heatmap_coordinates(name: str) -> Tuple[str, str]:
    """(row, column) of a module in the layer × module grid: the name through its
    layer index (``layers.N``), or else through its last numbered block — a number
    after a plural container (``transformer_blocks.0`` in a UNet or Flux,
    ``layers_3`` in kohya's flattened names), not a Sequential index such as
    ``ff.net.0.proj`` — with more path after it; the column is the rest."""
    match = _LAYER_INDEX.search(name)
    if match and match.end(1) < len(name):
        return name[:match.end(1)], name[match.end(1) + 1:]
    separator = "." if "." in name else "_"
    parts = name.split(separator)
    numbered = [i for i in range(1, len(parts) - 1) if parts[i].isdigit()]
    blocks = [i for i in numbered if parts[i - 1].endswith("s")] or numbered
    if blocks:
        return separator.join(parts[:blocks[-1] + 1]), separator.join(parts[blocks[-1] + 1:])
    return NO_LAYER, name


def _text(x: float, y: float, content: str, css_class: str, *, anchor: str = "start", title: str = "",
          extra: str = "") -> str:
    hover = f"<title>{html.escape(title)}</title>" if title else ""
    return (f'<text class="{css_class}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>'
            f'{html.escape(content)}{hover}</text>')


def _svg_colour_bar(scale: ValueScale, x: float, y: float, width: float, title: str,
                    marks: Sequence[Tuple[float, str]] = (), missing: bool = False) -> Tuple[str, float]:
    """A horizontal colour bar: the data's own minimum and maximum labelled at
    its ends, round ticks between, optional marks above; returns (svg, height)."""
    top = y + (14 if marks else 0)
    steps = 64
    parts = [f'<g class="colour-bar" data-low="{scale.low!r}" data-high="{scale.high!r}" '
             f'data-log="{int(scale.log)}">']
    parts += [f'<rect x="{x + width * i / steps:.2f}" y="{top:.1f}" width="{width / steps + 0.4:.2f}" height="12" '
              f'fill="{_colour((i + 0.5) / steps)}"/>' for i in range(steps)]
    parts.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="{width:.1f}" height="12" class="frame"/>')
    placed: List[Tuple[float, float]] = []
    candidates = [(scale.low, "start"), (scale.high, "end")] + [(t, "middle") for t in scale.ticks()]
    for value, anchor in candidates:
        label = _tick_label(value)
        px = x + width * scale.fraction(value)
        span = len(label) * CHAR_WIDTH
        box = {"start": (px, px + span), "end": (px - span, px), "middle": (px - span / 2, px + span / 2)}[anchor]
        if any(box[0] < right + 6 and left < box[1] + 6 for left, right in placed):
            continue  # a round tick that would overlap a label already placed (the data's ends come first)
        placed.append(box)
        parts.append(f'<line x1="{px:.1f}" y1="{top + 12:.1f}" x2="{px:.1f}" y2="{top + 16:.1f}" class="tickmark"/>')
        parts.append(_text(px, top + 26, label, "cbar-tick", anchor=anchor))
    for value, label in marks:
        if scale.low <= value <= scale.high:
            px = x + width * scale.fraction(value)
            parts.append(f'<line x1="{px:.1f}" y1="{top - 3:.1f}" x2="{px:.1f}" y2="{top + 12:.1f}" class="band"/>')
            parts.append(_text(px, top - 5, label, "band-label", anchor="middle"))
    caption = title + ("   (grey: no value)" if missing else "")
    parts.append(_text(x, top + 40, caption, "axis-title"))
    parts.append("</g>")
    return "".join(parts), top - y + 46


def _svg_heatmap(layers: Sequence[ModuleAudit], value: Callable[[ModuleAudit], Optional[float]],
                 scale: ValueScale, label: str, caption: str, marks: Sequence[Tuple[float, str]] = ()) -> str:
    """Layer × module grid coloured by ``value``, with its colour bar underneath."""
    cells = {_heatmap_coordinates(layer.name): layer for layer in layers}
    rows = sorted({row for row, _ in cells}, key=lambda row: (row == NO_LAYER, _human_key(row)))
    columns = sorted({column for _, column in cells}, key=_human_key)
    layered = [row for row in rows if row != NO_LAYER]
    row_prefix, column_prefix = _shared_prefix(layered), _shared_prefix(columns)
    row_text = {row: row[len(row_prefix):] if row != NO_LAYER else row for row in rows}
    column_text = {column: column[len(column_prefix):] or column for column in columns}
    row_labels, column_labels = distinct_labels(list(row_text.values()), 40), distinct_labels(list(column_text.values()), 28)
    numbered = all(text.isdigit() for text in row_text.values() if text != NO_LAYER)
    left = 10 + CHAR_WIDTH * max(len(text) for text in row_labels.values()) + 6
    top = (24 if row_prefix else 10) + CHAR_WIDTH * max(len(text) for text in column_labels.values()) + 6
    cell_w = max(12, min(48, int((CHART_WIDTH - left - 10) // len(columns))))
    cell_h = max(8 if numbered else 12, min(22, 520 // len(rows)))
    every = 1 if cell_h >= 11 else math.ceil(11 / cell_h)  # numbered rows only: label every k-th
    grid_w, grid_h = cell_w * len(columns), cell_h * len(rows)
    width = max(CHART_WIDTH, left + grid_w + 10)
    missing = any(value(layer) is None for layer in layers)
    bar, bar_height = _svg_colour_bar(scale, 16, top + grid_h + 16, min(400, width - 32), label, marks, missing)
    height = top + grid_h + 16 + bar_height + 4
    parts = [f'<svg class="heatmap{" wide" if width > CHART_WIDTH else ""}" role="img" '
             f'aria-label="{html.escape(caption)}" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" xmlns="http://www.w3.org/2000/svg">']
    if row_prefix:
        parts.append(_text(10, 14, f"rows: {row_prefix}{'N' if numbered else '…'}", "axis-title"))
    for j, column in enumerate(columns):
        x = left + j * cell_w + cell_w / 2 + 3.5
        parts.append(f'<text class="col" x="{x:.1f}" y="{top - 6:.1f}" transform="rotate(-90 {x:.1f} {top - 6:.1f})">'
                     f'{html.escape(column_labels[column_text[column]])}<title>{html.escape(column)}</title></text>')
    for i, row in enumerate(rows):
        if numbered and row != NO_LAYER and i % every:
            continue
        parts.append(_text(left - 6, top + i * cell_h + cell_h / 2 + 3.5, row_labels[row_text[row]], "row",
                           anchor="end", title=row))
    for (row, column), layer in cells.items():
        i, j = rows.index(row), columns.index(column)
        raw = value(layer)
        parts.append(f'<rect class="cell" x="{left + j * cell_w}" y="{top + i * cell_h}" width="{cell_w - 1}" '
                     f'height="{cell_h - 1}" fill="{_colour(scale.fraction(raw) if raw is not None else None)}">'
                     f'<title>{html.escape(layer.name)}: {label} {_fmt(raw)}</title></rect>')
    parts.append(bar)
    parts.append("</svg>")
    return "".join(parts)


class _Frame(NamedTuple):
    """A plot area in SVG coordinates and the scales of its two axes."""

    left: float
    top: float
    width: float
    height: float
    x: ValueScale
    y: ValueScale

    def px(self, value: float) -> float:
        return self.left + self.width * self.x.fraction(value)

    def py(self, value: float) -> float:
        return self.top + self.height * (1 - self.y.fraction(value))


def _svg_axes(frame: _Frame, x_ticks: Sequence[float], y_ticks: Sequence[float], x_label: str, y_label: str) -> List[str]:
    """Light gridlines at every tick, tick labels, both axes and their titles."""
    parts = []
    bottom, right = frame.top + frame.height, frame.left + frame.width
    for tick in y_ticks:
        y = frame.py(tick)
        parts.append(f'<line x1="{frame.left:.1f}" y1="{y:.1f}" x2="{right:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(_text(frame.left - 5, y + 3.5, _tick_label(tick), "tick", anchor="end"))
    for tick in x_ticks:
        x = frame.px(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{frame.top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" class="grid"/>')
        parts.append(_text(x, bottom + 14, _tick_label(tick), "tick", anchor="middle"))
    parts.append(f'<polyline points="{frame.left:.1f},{frame.top:.1f} {frame.left:.1f},{bottom:.1f} '
                 f'{right:.1f},{bottom:.1f}" class="axis"/>')
    parts.append(_text(frame.left + frame.width / 2, bottom + 30, x_label, "axis-title", anchor="middle"))
    middle = frame.top + frame.height / 2
    parts.append(f'<text class="axis-title" x="12" y="{middle:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {middle:.1f})">{html.escape(y_label)}</text>')
    return parts


def _svg_lines(series: Sequence[Tuple[str, Sequence[Tuple[float, float]]]], x_label: str, y_label: str,
               caption: str) -> str:
    """Line chart with a legend underneath, each entry written in its line's colour."""
    points = [point for _, line in series for point in line]
    if not points:
        return '<p class="muted">(no data)</p>'
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_scale = ValueScale(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
    y_ticks = _nice_ticks(0.0, max(max(ys), 1e-12) * 1.05)
    frame = _Frame(58, 10, CHART_WIDTH - 58 - 28, 190, x_scale, ValueScale(0.0, max(y_ticks[-1], max(ys))))
    x_ticks = [t for t in _nice_ticks(x_scale.low, x_scale.high, 8) if t == int(t)] or [x_scale.low]
    columns, column_width = 2, (CHART_WIDTH - 32) / 2
    legend_top = frame.top + frame.height + 46
    height = legend_top + 16 * math.ceil(len(series) / columns) + 6
    parts = [f'<svg class="chart" role="img" aria-label="{html.escape(caption)}" width="{CHART_WIDTH}" '
             f'height="{height:.0f}" viewBox="0 0 {CHART_WIDTH} {height:.0f}" xmlns="http://www.w3.org/2000/svg">']
    parts += _svg_axes(frame, x_ticks, y_ticks, x_label, y_label)
    limit = int((column_width - 34) // CHAR_WIDTH)
    labels = distinct_labels([name for name, _ in series], limit)
    for index, (name, line) in enumerate(series):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        coords = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in line)
        parts.append(f'<polyline class="series" data-series="{index}" fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{coords}"><title>{html.escape(name)}</title></polyline>')
        if len(line) <= 64:
            parts += [f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in line]
        lx, ly = 16 + column_width * (index % columns), legend_top + 16 * (index // columns)
        parts.append(f'<line x1="{lx:.1f}" y1="{ly - 4:.1f}" x2="{lx + 22:.1f}" y2="{ly - 4:.1f}" stroke="{colour}" '
                     'stroke-width="3"/>')
        parts.append(_text(lx + 28, ly, labels[name], "legend", title=name,
                           extra=f' data-series="{index}" fill="{colour}" style="fill:{colour}"'))
    parts.append("</svg>")
    return "".join(parts)


def _svg_udr_histogram(values: Sequence[float], scale: ValueScale) -> str:
    """How many modules have each UDR: log-spaced bins over the data's range,
    bars in the heatmap's colours, the 0.1 / 1 / 3 reading bands marked."""
    positive = [v for v in values if v > 0]
    low, high = math.log10(scale.low), math.log10(scale.high)
    bins = max(6, min(40, math.ceil(2 * math.sqrt(len(positive)))))
    counts, edges = np.histogram(np.log10(positive), bins=bins, range=(low, high))
    y_ticks = [t for t in _nice_ticks(0.0, float(counts.max()), 4) if t == int(t)]
    frame = _Frame(58, 22, CHART_WIDTH - 58 - 28, 170, scale, ValueScale(0.0, max(float(counts.max()), y_ticks[-1])))
    height = frame.top + frame.height + 40
    parts = [f'<svg class="chart histogram" role="img" aria-label="UDR distribution" width="{CHART_WIDTH}" '
             f'height="{height:.0f}" viewBox="0 0 {CHART_WIDTH} {height:.0f}" xmlns="http://www.w3.org/2000/svg">']
    parts += _svg_axes(frame, scale.ticks(), y_ticks, "UDR = ‖ΔW‖₂ / ‖W‖₂ (log scale)", "modules")
    for count, start, end in zip(counts, edges[:-1], edges[1:]):
        if count:
            x0, x1 = frame.px(10 ** start), frame.px(10 ** end)
            parts.append(f'<rect class="bar" x="{x0 + 0.5:.1f}" y="{frame.py(count):.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                         f'height="{frame.py(0) - frame.py(count):.1f}" fill="{_colour(scale.fraction(10 ** ((start + end) / 2)))}">'
                         f'<title>{int(count)} modules with UDR {_tick_label(10 ** start)}–{_tick_label(10 ** end)}</title></rect>')
    for band, label in UDR_BANDS:
        if scale.low <= band <= scale.high:
            x = frame.px(band)
            parts.append(f'<line x1="{x:.1f}" y1="{frame.top - 4:.1f}" x2="{x:.1f}" y2="{frame.top + frame.height:.1f}" '
                         'class="band"/>')
            half = len(f"UDR {label}") * CHAR_WIDTH / 2  # keep the label inside the chart at either end
            anchor = "end" if x + half > CHART_WIDTH - 2 else "start" if x - half < 2 else "middle"
            parts.append(_text(x, frame.top - 7, f"UDR {label}", "band-label", anchor=anchor))
    parts.append("</svg>")
    return "".join(parts)


MODULE_TABLE_COLUMNS = (
    # (header, hover text, numeric?)
    ("module", "module path in the base model", False),
    ("type", "attn / mlp / other", False),
    ("r", "stored rank", True),
    ("utilization", "stable rank / r: the share of the rank budget used", True),
    ("stable rank", "‖ΔW‖_F² / ‖ΔW‖₂²", True),
    ("k@90", "smallest k holding 90 % of the update's energy", True),
    ("suggested r", "k@90 rounded up to a power of two (or the rank advice, when present)", True),
    ("σ_max(ΔW)", "‖ΔW‖₂ = |scale|·σ₁(B·A)", True),
    ("UDR", "‖ΔW‖₂ / ‖W_base‖₂", True),
)


def _suggested_rank(layer: ModuleAudit) -> Tuple[Optional[float], str, str]:
    """(sort value, text, hover) of a module's suggested r: the first policy of the
    rank advice when the audit carries one (``rank_suggestions``: policy → k, all
    of them on hover), else k@90 rounded up to a power of two."""
    advice = getattr(layer, "rank_suggestions", None)
    if layer.sigma_max == 0:
        return None, "zero update", "B·A = 0"
    if isinstance(advice, Mapping) and advice:
        ranks = [(str(policy), v) for policy, v in advice.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if ranks:
            return float(ranks[0][1]), _fmt(ranks[0][1]), ", ".join(f"{policy}: {_fmt(v)}" for policy, v in ranks)
    suggested = suggest_rank(layer.energy_rank_90)
    return float(suggested), str(suggested), "k@90 rounded up to a power of two"


def _name_html(name: str) -> str:
    """A module path that wraps only after its separators ('.', or '_' in kohya's flattened names)."""
    return re.sub(r"(\.)" if "." in name else r"(_)", r"\1<wbr>", html.escape(name))


def _cell(value: Optional[float], text: Optional[str] = None, hover: str = "") -> str:
    shown = _fmt(value) if text is None else text
    sort_value = "" if value is None or not math.isfinite(value) else repr(float(value))
    title = f' title="{html.escape(hover)}"' if hover else ""
    return f'<td data-v="{sort_value}"{title}>{html.escape(shown)}</td>'


def _module_table(layers: Sequence[ModuleAudit]) -> str:
    head = "".join(f'<th data-type="{"number" if numeric else "text"}" title="{html.escape(hover)}">'
                   f'<button type="button">{html.escape(header)}</button></th>'
                   for header, hover, numeric in MODULE_TABLE_COLUMNS)
    body = []
    for layer in layers:
        suggested, suggested_text, suggested_hover = _suggested_rank(layer)
        body.append("<tr>" + f'<td class="name" data-v="{html.escape(layer.name)}">{_name_html(layer.name)}</td>'
                    f'<td data-v="{layer.module_type}">{layer.module_type}</td>'
                    + _cell(layer.r) + _cell(layer.utilization) + _cell(layer.stable_rank) + _cell(layer.energy_rank_90)
                    + _cell(suggested, suggested_text, suggested_hover) + _cell(layer.delta_sigma_max) + _cell(layer.udr) + "</tr>")
    return (f'<div class="scroll"><table class="sortable modules"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


_SORT_SCRIPT = """
document.querySelectorAll("table.sortable th button").forEach(function (button) {
  button.addEventListener("click", function () {
    var th = button.parentNode, table = th.closest("table"), body = table.tBodies[0];
    var column = Array.prototype.indexOf.call(th.parentNode.children, th);
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var numeric = th.getAttribute("data-type") === "number";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column].getAttribute("data-v"), y = b.cells[column].getAttribute("data-v");
      if (x === "" || y === "") { return (x === "") - (y === ""); }  // blanks last, either way
      var order = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def issue_groups(issues: Sequence[str], module_names: Iterable[str]) -> List[Tuple[str, List[str]]]:
    """Issues grouped by what they say — module names and numbers taken out — the
    group that covers the most issues first; each group is titled by its first
    issue with the module name replaced by ``<module>``."""
    names = set(module_names)
    groups: Dict[str, Tuple[str, List[str]]] = {}
    for issue in issues:
        title = ": ".join("<module>" if part in names else part for part in issue.split(": "))
        key = re.sub(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", "N", title)
        groups.setdefault(key, (title, []))[1].append(issue)
    return sorted(groups.values(), key=lambda group: (-len(group[1]), group[0]))


_HTML_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px auto;padding:0 16px;color:#222;
max-width:1100px}
h1{font-size:20px;margin:0 0 4px;overflow-wrap:anywhere}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:16px 0 6px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 6px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.muted{color:#666}.note{background:#fff4d6;padding:8px 12px;border-radius:4px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:8px 0;font-size:13px}
dl.meta dt{color:#666}dl.meta dd{margin:0;overflow-wrap:anywhere}code{font-size:12px}
.figures{display:flex;flex-wrap:wrap;gap:8px}.figure{border:1px solid #ddd;border-radius:4px;padding:6px 10px;min-width:120px}
.figure b{display:block;font-size:18px}.figure span{color:#666;font-size:12px}
.scroll{overflow-x:auto;max-width:100%}td.name{text-align:left;font-family:monospace;font-size:12px}
td{white-space:nowrap}td.name{white-space:normal;min-width:12em}table.modules{width:100%}
table.modules td{width:1%}table.modules td.name{width:auto}table.modules th{vertical-align:bottom}table.modules th button{font:inherit;font-weight:bold;border:0;background:none;
cursor:pointer;padding:0;white-space:normal;text-align:inherit}
th[aria-sort=ascending] button::after{content:" ▲"}th[aria-sort=descending] button::after{content:" ▼"}
.issues li{font-family:monospace;font-size:12px;overflow-wrap:anywhere}pre{white-space:pre-wrap}details summary{cursor:pointer}
svg{display:block;max-width:100%;height:auto}svg.wide{max-width:none}
svg text{font:10px monospace;fill:#333}svg text.axis-title{font:11px sans-serif;fill:#444}
svg text.band-label{fill:#000;font-weight:bold}svg .grid{stroke:#e6e6e6}svg .axis{stroke:#888;fill:none}
svg .tickmark{stroke:#666}svg .band{stroke:#000;stroke-dasharray:3 2}svg .frame{fill:none;stroke:#888}
"""


def _figure(value: str, label: str, hover: str = "") -> str:
    return f'<div class="figure" title="{html.escape(hover)}"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def _small_table(layers: Sequence[ModuleAudit], columns: Sequence[Tuple[str, Callable[[ModuleAudit], Any]]]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    rows = "".join("<tr>" + "".join(f'<td class="name">{_name_html(_fmt(get(layer)))}</td>' if index == 0 else
                                    f"<td>{html.escape(_fmt(get(layer)))}</td>" for index, (_, get) in enumerate(columns))
                   + "</tr>" for layer in layers)
    return f'<div class="scroll"><table><tr>{head}</tr>{rows}</table></div>'


def _generic_table(mapping: Mapping[str, Any]) -> str:
    """A record whose shape this report does not fix (the rank advice): one row per
    key; when every value is itself a record, one column per field."""
    def shown(value):
        return _fmt(value) if not isinstance(value, (dict, list)) else json.dumps(json_safe(value))
    if all(isinstance(value, Mapping) for value in mapping.values()):
        fields = list(dict.fromkeys(field for value in mapping.values() for field in value))
        head = "<tr><th></th>" + "".join(f"<th>{html.escape(str(f))}</th>" for f in fields) + "</tr>"
        rows = "".join(f"<tr><td>{html.escape(str(key))}</td>"
                       + "".join(f"<td>{html.escape(shown(value.get(f)))}</td>" for f in fields) + "</tr>"
                       for key, value in mapping.items())
        return f'<div class="scroll"><table>{head}{rows}</table></div>'
    rows = "".join(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(shown(value))}</td></tr>"
                   for key, value in mapping.items())
    return f'<div class="scroll"><table>{rows}</table></div>'


def render_html_report(result: AuditResult, *, command: Optional[str] = None, generated: Optional[str] = None) -> str:
    """A self-contained HTML page that reads top to bottom: what was audited and
    how, the key figures, the modules that waste their rank and the updates that
    dominate their base, layer × module heatmaps with colour bars, the UDR
    distribution, spectra, energy over depth, a sortable table of every module,
    and the issues grouped by cause."""
    summary = result.to_summary_dict()
    layers = list(result.layers)
    nonzero = [layer for layer in layers if layer.sigma_max > 0]
    with_udr = [layer for layer in layers if layer.udr is not None]
    name = Path(result.weights_path).name if result.weights_path else "in-memory state dict"
    meta = [("file", str(result.weights_path or "(in-memory state dict)")),
            ("format", f"{result.adapter_format}, adapter {result.adapter_name!r}"),
            ("tool", f"gradience-lite {__version__}"),
            ("date", generated or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))]
    if command:
        meta.append(("command", command))
    if result.format_metadata:
        meta.append(("training metadata", ", ".join(f"{k}={v}" for k, v in result.format_metadata.items())))
    sections = [f"<h1>LoRA audit: {html.escape(name)}</h1><dl class=\"meta\">"
                + "".join(f"<dt>{html.escape(k)}</dt><dd>{'<code>' + html.escape(v) + '</code>' if k == 'command' else html.escape(v)}</dd>"
                          for k, v in meta) + "</dl>"]
    if layers and not nonzero:
        sections.append('<p class="note"><b>The update is zero</b>: B·A = 0 in every module (a freshly initialised '
                        'adapter, or training never updated it). Rank and UDR figures do not apply.</p>')
    elif len(nonzero) < len(layers):
        sections.append(f'<p class="note">{len(layers) - len(nonzero)} of {len(layers)} modules have a zero update '
                        "(B·A = 0); they are left out of the rank advice below.</p>")
    figures = [_figure(f"{summary['n_layers']}", "modules audited"),
               _figure(f"{summary['n_modules_skipped']}", "modules skipped", "LoRA modules that could not be audited (see issues)"),
               _figure(f"{summary['total_lora_params']:,}", "LoRA parameters"),
               _figure(_fmt(summary["utilization_mean"]), "utilization, mean", "stable rank / r, averaged over modules"),
               _figure(_fmt(summary["stable_rank_median"]), "stable rank, median"),
               _figure(f"{_fmt(summary['energy_rank_90_p50'])} / {_fmt(summary['energy_rank_90_p90'])}", "k@90 %, p50 / p90",
                       "smallest k holding 90 % of the energy")]
    if nonzero:
        figures.append(_figure(f"{_fmt(summary['suggested_r_global_median'])} / {_fmt(summary['suggested_r_global_90'])}",
                               "suggested r (p50 / p90)", "k@90 rounded up to a power of two"))
    if with_udr:
        figures.append(_figure(f"{_fmt(summary['udr_median'])} / {_fmt(summary['udr_max'])}", "UDR, median / max",
                               "‖ΔW‖₂ / ‖W_base‖₂"))
    figures.append(_figure(f"{len(result.issues)}", "issues"))
    sections.append('<h2>Key figures</h2><div class="figures">' + "".join(figures) + "</div>")

    by_type_head = "<tr><th>type</th><th>modules</th><th>params</th><th>stable rank</th><th>utilization</th>" \
                   "<th>k@90 p50</th><th>k@90 p90</th>" + ("<th>UDR p50</th><th>UDR p90</th><th>UDR max</th>" if with_udr else "") + "</tr>"
    by_type = "".join(f"<tr><td>{kind}</td><td>{row['n_layers']}</td><td>{row['params']:,}</td>"
                      f"<td>{_fmt(row['stable_rank_mean'])}</td><td>{_fmt(row['utilization_mean'])}</td>"
                      f"<td>{_fmt(row['energy_rank_90_p50'])}</td><td>{_fmt(row['energy_rank_90_p90'])}</td>"
                      + (f"<td>{_fmt(row.get('udr_median'))}</td><td>{_fmt(row.get('udr_p90'))}</td>"
                         f"<td>{_fmt(row.get('udr_max'))}</td>" if with_udr else "") + "</tr>"
                      for kind, row in summary["by_type"].items())
    sections.append(f'<h2>By module type</h2><div class="scroll"><table>{by_type_head}{by_type}</table></div>')

    if nonzero:
        wasteful = sorted(nonzero, key=lambda layer: layer.utilization)[:8]
        sections.append("<h2>Modules that waste their rank</h2><p class=\"muted\">lowest utilization (stable rank / r); "
                        "a rank near k@90 would keep 90 % of the update's energy.</p>"
                        + _small_table(wasteful, [("module", lambda l: l.name), ("r", lambda l: l.r),
                                                  ("utilization", lambda l: l.utilization),
                                                  ("k@90", lambda l: l.energy_rank_90),
                                                  ("suggested r", lambda l: _suggested_rank(l)[1])]))
    advice = summary.get("policy_global_suggestions")
    if isinstance(advice, Mapping) and advice:
        sections.append("<h2>Rank advice</h2><p class=\"muted\">per policy, over modules (the module table's "
                        "suggested r is the first policy; hover it for all).</p>" + _generic_table(advice))
    if with_udr:
        dominant = sorted(with_udr, key=lambda layer: layer.udr, reverse=True)[:8]
        sections.append("<h2>Updates that dominate their base</h2><p class=\"muted\">highest UDR = ‖ΔW‖₂ / ‖W_base‖₂ "
                        "(&gt; 3: the update dominates; ~1: as strong as the base; &lt; 0.1: a small perturbation).</p>"
                        + _small_table(dominant, [("module", lambda l: l.name), ("UDR", lambda l: l.udr),
                                                  ("σ_max(ΔW)", lambda l: l.delta_sigma_max),
                                                  ("σ_max(W)", lambda l: l.base_sigma_max)]))

    utilization = value_scale([layer.utilization for layer in layers], from_zero=True)
    if utilization is not None:
        sections.append("<h2>Utilization by layer and module</h2><p class=\"muted\">stable rank / r, coloured from 0 "
                        "to the highest value in this adapter; hover a cell for its module.</p><div class=\"scroll\">"
                        + _svg_heatmap(layers, lambda layer: layer.utilization, utilization,
                                       "utilization = stable rank / r", "utilization heatmap") + "</div>")
    udr_scale = value_scale([layer.udr for layer in layers], log=True)
    if udr_scale is not None:
        sections.append(
            "<h2>Update dominance (UDR) by layer and module</h2><p class=\"muted\">UDR on a log scale over this "
            "adapter's range; dashed marks at the reading bands 0.1, 1 and 3 where they fall inside it; grey: no "
            "base norm.</p><div class=\"scroll\">"
            + _svg_heatmap(layers, lambda layer: layer.udr, udr_scale, "UDR (log scale)", "UDR heatmap", UDR_BANDS)
            + "</div>")
        udr_values = [layer.udr for layer in with_udr]
        sections.append(
            f"<h2>UDR distribution over modules</h2><p class=\"muted\">{len(udr_values)} modules; median "
            f"{_fmt(summary['udr_median'])}, p90 {_fmt(summary['udr_p90'])}, max {_fmt(summary['udr_max'])}; share "
            f"&gt; 0.1: {_fmt(summary['fraction_udr_gt_0_1'])}, &gt; 0.3: {_fmt(summary['fraction_udr_gt_0_3'])}.</p>"
            + _svg_udr_histogram(udr_values, udr_scale))
    elif result.udr_requested:
        sections.append("<h2>Update dominance (UDR)</h2><p class=\"muted\">no module could be matched to a base "
                        "norm; see the issues.</p>")
    else:
        sections.append("<h2>Update dominance (UDR)</h2><p class=\"muted\">not computed: add <code>--base-model "
                        "PATH_OR_ID</code> (or <code>--base-norms FILE</code>) to see how large each update is next "
                        "to the weight it modifies.</p>")

    strongest = sorted((layer for layer in nonzero if layer.top_singular_values),
                       key=lambda layer: layer.delta_sigma_max, reverse=True)[:6]
    spectra = [(layer.name, [(i + 1.0, s / layer.sigma_max) for i, s in enumerate(layer.top_singular_values)])
               for layer in strongest]
    sections.append("<h2>Singular-value spectra of the strongest updates</h2><p class=\"muted\">σᵢ/σ₁ of the six "
                    "modules with the largest ‖ΔW‖₂; a fast drop means a few directions carry the update.</p>"
                    + _svg_lines(spectra, "singular value index i", "σᵢ / σ₁", "spectra"))
    depth: Dict[int, List[ModuleAudit]] = {}
    for layer in nonzero:
        if layer.layer_index is not None:
            depth.setdefault(layer.layer_index, []).append(layer)
    concentration = [("share of energy in σ₁ (1 / stable rank)",
                      [(float(index), float(np.mean([1.0 / layer.stable_rank for layer in group])))
                       for index, group in sorted(depth.items())]),
                     ("k@90 % / r", [(float(index), float(np.mean([layer.energy_rank_90 / max(layer.r, 1)
                                                                   for layer in group])))
                                     for index, group in sorted(depth.items())])]
    sections.append("<h2>Energy concentration over depth</h2><p class=\"muted\">means over the modules of each "
                    "layer.</p>" + _svg_lines(concentration if depth else [], "layer index", "fraction",
                                              "energy over depth"))
    sections.append(f"<h2>Every module</h2><p class=\"muted\">{len(layers)} modules; click a column header to "
                    "sort.</p>" + _module_table(layers))
    groups = issue_groups(result.issues, (layer.name for layer in layers))
    issue_html = "".join(
        f"<li><details><summary>{len(items)} × {html.escape(template)}</summary><ul>"
        + "".join(f"<li>{html.escape(issue)}</li>" for issue in items) + "</ul></details></li>"
        if len(items) > 1 else f"<li>{html.escape(items[0])}</li>" for template, items in groups)
    sections.append(f"<h2>Issues ({len(result.issues)})</h2><ul class=\"issues\">{issue_html or '<li>none</li>'}</ul>")
    if with_udr:
        sections.append("<h2>Reading UDR</h2><pre>" + html.escape("\n".join(CHEAT_SHEET + UTILIZATION_NOTE)) + "</pre>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>LoRA audit: {html.escape(name)}</title><style>{_HTML_STYLE}</style></head><body>"
            + "".join(sections) + f"<script>{_SORT_SCRIPT}</script></body></html>\n")


# ══ 8. compare runs ══════════════════════════════════════════════════════════
# Two updates ΔW₁ = s₁B₁A₁ and ΔW₂ = s₂B₂A₂ of the same weight are compared
# through r×r cross products only: ⟨ΔW₁, ΔW₂⟩_F = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)), and
# the principal angles between their singular subspaces come from B₁ᵀB₂ and
# A₁A₂ᵀ once each update's own r×r factorisation is known.

COMPARE_SCHEMA = "gradience_lite.compare/1"
DRIFT_SCHEMA = "gradience_lite.drift/1"
SUMMARY_FIELDS = ("total_lora_params", "n_layers", "stable_rank_mean", "stable_rank_median", "effective_rank_mean",
                  "utilization_mean", "energy_rank_90_p50", "energy_rank_90_p90", "udr_median", "udr_p90", "udr_max",
                  "sdi_median")
MODULE_FIELDS = ("r", "scale", "stable_rank", "utilization", "energy_rank_90", "delta_sigma_max", "delta_fro_norm",
                 "udr", "sdi")


class _UpdateBasis(NamedTuple):
    """One update's r×r view: ΔW = s·Q_B·U·diag(σ)·Vᵀ·Q_Aᵀ, with the maps from the
    factors' coordinates to its orthonormal singular bases (never m- or n-sized)."""

    a: np.ndarray  # A (r×n), float64
    b: np.ndarray  # B (m×r), float64
    scale: float
    to_left: np.ndarray  # r×k: B·to_left has orthonormal columns spanning range(ΔW)
    to_right: np.ndarray  # r×k: Aᵀ·to_right spans range(ΔWᵀ)
    frob_sq: float  # ‖ΔW‖_F²


def _whitening(gram: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(R, W) with RᵀR = gram and X·W orthonormal for X with XᵀX = gram (numerical rank only)."""
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    keep = eigenvalues > max(eigenvalues[-1], 0.0) * 1e-12
    eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[:, keep]
    return np.sqrt(eigenvalues)[:, None] * eigenvectors.T, eigenvectors / np.sqrt(eigenvalues)[None, :]


def update_basis(a: np.ndarray, b: np.ndarray, scale: float) -> _UpdateBasis:
    with np.errstate(over="ignore", invalid="ignore"):
        gram_b, gram_a = b.T @ b, a @ a.T
    if not (np.isfinite(gram_b).all() and np.isfinite(gram_a).all() and math.isfinite(scale)):
        raise ResourceCapExceeded("factors too large to compare in float64 (their Gram matrices overflow)")
    r_b, w_b = _whitening(gram_b)
    r_a, w_a = _whitening(gram_a)
    if r_b.size == 0 or r_a.size == 0:
        empty = np.zeros((a.shape[0], 0))
        return _UpdateBasis(a, b, scale, empty, empty, 0.0)
    left, sigma, right_t = np.linalg.svd(r_b @ r_a.T)
    keep = sigma > sigma[0] * 1e-12 if sigma.size else sigma > 0
    return _UpdateBasis(a, b, scale, w_b @ left[:, keep], w_a @ right_t.T[:, keep],
                        float(scale * scale * np.sum(sigma ** 2)))


class UpdateOverlap(NamedTuple):
    update_cosine: Optional[float]  # ⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F‖ΔW₂‖_F)
    relative_difference: Optional[float]  # ‖ΔW₂ − ΔW₁‖_F / ‖ΔW₁‖_F
    output_overlap: Optional[float]  # mean cos² of the principal angles between column spaces
    input_overlap: Optional[float]  # … between row spaces
    principal_cosines_out: Tuple[float, ...]
    principal_cosines_in: Tuple[float, ...]


def update_overlap(first: _UpdateBasis, second: _UpdateBasis, top: int = 8) -> UpdateOverlap:
    """How two low-rank updates of the same weight relate, from r×r cross products.

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(4, 30)), rng.normal(size=(20, 4))
    >>> round(update_overlap(update_basis(a, b, 1.0), update_basis(a, b, 2.0)).update_cosine, 12)
    1.0
    """
    cross_b = first.b.T @ second.b  # r₁×r₂
    cross_a = first.a @ second.a.T  # r₁×r₂
    inner = first.scale * second.scale * float(np.sum(cross_b * cross_a))
    norms = math.sqrt(first.frob_sq) * math.sqrt(second.frob_sq)
    cosine = inner / norms if norms > 0 else None
    difference = math.sqrt(max(first.frob_sq + second.frob_sq - 2.0 * inner, 0.0)) / math.sqrt(first.frob_sq) \
        if first.frob_sq > 0 else None

    def principal(cross, left, right):
        if left.shape[1] == 0 or right.shape[1] == 0:
            return None, ()
        cosines = np.clip(np.linalg.svd(left.T @ cross @ right, compute_uv=False), 0.0, 1.0)
        return float(np.sum(cosines ** 2) / min(left.shape[1], right.shape[1])), tuple(float(c) for c in cosines[:top])

    out_overlap, out_cosines = principal(cross_b, first.to_left, second.to_left)
    in_overlap, in_cosines = principal(cross_a, first.to_right, second.to_right)
    return UpdateOverlap(cosine, difference, out_overlap, in_overlap, out_cosines, in_cosines)


def _factor_loaders(path: str) -> Dict[str, Callable[[], Tuple[np.ndarray, np.ndarray]]]:
    """For each plain LoRA module of an adapter: a function returning (A r×n, B m×r) in float64."""
    files = find_adapter_files(path)
    sf = open_safetensors(files.weights_path)
    raw_config, _ = load_adapter_config(files.config_path)
    keys = list(sf.tensors)
    source = _TensorSource.from_file(sf)
    shape_of = lambda key: source.describe(key)[1]  # noqa: E731
    adapter_format = detect_format(keys, sf.metadata, raw_config)
    config = parse_adapter_config(raw_config)[0]
    # grouped by the PEFT tuner too: AdaLoRA's lora_A / lora_B are not a plain pair (lora_E sits between)
    modules, non_lora = group_modules(adapter_format, keys, shape_of, config.peft_type)
    if adapter_format in ("peft", "diffusers"):
        modules = resolve_lora_fields(modules, non_lora, config, shape_of)[0]
    loaders = {}
    for module in modules:
        if module.family not in STREAMED_FAMILIES or module.part("lora_mid.weight") or not module.a_key \
                or not module.b_key or module.duplicate_keys \
                or _check_tensors(module, source, (module.a_key, module.b_key)):
            continue
        layout, problem = _factor_layout(module, shape_of(module.a_key), shape_of(module.b_key))
        diag, diag_problem = _kasa_diag(module, source, layout.rank) if problem is None else (None, None)
        if problem is None and diag_problem is None and layout.rank > 0:
            loaders[module.name] = (lambda layout=layout, diag=diag: (
                _tall_factor(source, layout.a).T * (diag[:, None] if diag is not None else 1.0),
                _tall_factor(source, layout.b)))
    return loaders


MAX_AUDIT_JSON_BYTES = 1 << 30  # a saved audit of a 70B adapter with layers is ~2 MB


def _number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _clean_audit_document(document: Mapping[str, Any]) -> Dict[str, Any]:
    """A saved audit JSON as compare reads it: only the fields it uses, each of
    the right type (others null), rows without a string name dropped — a
    damaged or hand-edited document cannot crash the comparison."""
    rows = []
    for row in document["layers"]:
        if isinstance(row, dict) and isinstance(row.get("name"), str):
            rows.append({"name": row["name"],
                         "module_type": row.get("module_type") if isinstance(row.get("module_type"), str) else None,
                         **{metric: _number(row.get(metric)) for metric in MODULE_FIELDS}})
    by_type = document.get("by_type") if isinstance(document.get("by_type"), dict) else {}
    return {"format": document.get("format") if isinstance(document.get("format"), str) else None,
            **{metric: _number(document.get(metric)) for metric in SUMMARY_FIELDS},
            "by_type": {kind: {key: _number(value) for key, value in row.items()}
                        for kind, row in by_type.items() if isinstance(kind, str) and isinstance(row, dict)},
            "layers": rows}


def _audit_document(path: str, **udr: Optional[str]) -> Tuple[Dict[str, Any], bool]:
    """(audit document with layers, is it an adapter we can read factors from);
    ``udr`` (base_model, base_norms, base_norms_cache) applies to adapters only."""
    candidate = Path(path)
    if candidate.is_file() and candidate.suffix.lower() == ".json":
        try:
            if candidate.stat().st_size > MAX_AUDIT_JSON_BYTES:
                raise AdapterFormatError(f"{candidate}: over the MAX_AUDIT_JSON_BYTES cap ({MAX_AUDIT_JSON_BYTES})")
            document = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            raise AdapterFormatError(f"{candidate}: not a readable audit JSON ({error})") from None
        if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
            raise AdapterFormatError(f"{candidate}: not an audit document with per-module rows "
                                     "(save one with `audit --json --layers`)")
        return _clean_audit_document(document), False
    return audit_lora_peft_dir(path, **udr).to_summary_dict(include_layers=True), True


def _subtract(later: Any, earlier: Any) -> Optional[float]:
    numbers = (int, float)
    if isinstance(later, numbers) and isinstance(earlier, numbers) and not isinstance(later, bool):
        if isinstance(later, int) and isinstance(earlier, int):
            return later - earlier  # counts stay integers (printed as 13700, not 1.370e+04)
        return float(later) - float(earlier)
    return None


def compare_adapters(path_a: str, path_b: str, *, overlaps: bool = True, base_model: Optional[str] = None,
                     base_norms: Optional[str] = None, base_norms_cache: Optional[str] = None) -> Dict[str, Any]:
    """Compare two adapters (directories or saved ``audit --json --layers`` documents).

    Returns one JSON-ready document: both summaries side by side, per-module
    deltas for modules present in both, modules only in one, and — when both
    are adapters over the same base shapes — how their updates overlap.  With a
    base (``base_model`` / ``base_norms`` / ``base_norms_cache``, as for an
    audit), both adapters get UDR; a saved document keeps the UDR it was saved with.
    """
    udr = {"base_model": base_model, "base_norms": base_norms, "base_norms_cache": base_norms_cache}
    (doc_a, adapter_a), (doc_b, adapter_b) = _audit_document(path_a, **udr), _audit_document(path_b, **udr)
    rows_a = {row["name"]: row for row in doc_a["layers"] if isinstance(row, dict) and "name" in row}
    rows_b = {row["name"]: row for row in doc_b["layers"] if isinstance(row, dict) and "name" in row}
    common = [name for name in rows_a if name in rows_b]
    issues: List[str] = []
    loaders_a = _factor_loaders(path_a) if overlaps and adapter_a and adapter_b else {}
    loaders_b = _factor_loaders(path_b) if loaders_a else {}
    if overlaps and not (adapter_a and adapter_b):
        issues.append("update overlaps need both sides to be adapters (a saved audit JSON has no factors)")
    modules = []
    for name in common:
        row_a, row_b = rows_a[name], rows_b[name]
        entry = {"name": name, "module_type": row_a.get("module_type"),
                 "a": {metric: row_a.get(metric) for metric in MODULE_FIELDS},
                 "b": {metric: row_b.get(metric) for metric in MODULE_FIELDS},
                 "delta": {metric: _subtract(row_b.get(metric), row_a.get(metric)) for metric in MODULE_FIELDS},
                 "overlap": None}
        if name in loaders_a and name in loaders_b:
            a1, b1 = loaders_a[name]()
            a2, b2 = loaders_b[name]()
            if (b1.shape[0], a1.shape[1]) != (b2.shape[0], a2.shape[1]):
                issues.append(f"{name}: ΔW shapes differ ({b1.shape[0]}×{a1.shape[1]} vs {b2.shape[0]}×{a2.shape[1]}); "
                              "no overlap")
            else:
                try:
                    overlap = update_overlap(update_basis(a1, b1, float(row_a.get("scale") or 1.0)),
                                             update_basis(a2, b2, float(row_b.get("scale") or 1.0)))
                    entry["overlap"] = overlap._asdict()
                except ResourceCapExceeded as error:
                    issues.append(f"{name}: {error}; no overlap")
        modules.append(entry)
    overlapping = [m["overlap"] for m in modules if m["overlap"] is not None]

    def stat(metric, reducer):
        values = [o[metric] for o in overlapping if o[metric] is not None]
        return reducer(values) if values else None

    document = {
        "schema": COMPARE_SCHEMA,
        "a": {"path": str(path_a), "format": doc_a.get("format"),
              "summary": {metric: doc_a.get(metric) for metric in SUMMARY_FIELDS}},
        "b": {"path": str(path_b), "format": doc_b.get("format"),
              "summary": {metric: doc_b.get(metric) for metric in SUMMARY_FIELDS}},
        "summary_delta": {metric: _subtract(doc_b.get(metric), doc_a.get(metric)) for metric in SUMMARY_FIELDS},
        "by_type": {"a": doc_a.get("by_type") or {}, "b": doc_b.get("by_type") or {}},
        "n_common": len(common),
        "only_in_a": [name for name in rows_a if name not in rows_b],
        "only_in_b": [name for name in rows_b if name not in rows_a],
        "overlap_summary": {"n_modules": len(overlapping),
                            "update_cosine_mean": stat("update_cosine", _mean),
                            "update_cosine_min": stat("update_cosine", min),
                            "relative_difference_mean": stat("relative_difference", _mean),
                            "output_overlap_mean": stat("output_overlap", _mean),
                            "input_overlap_mean": stat("input_overlap", _mean)},
        "modules": modules,
        "issues": issues,
    }
    return json_safe(document)


_CHECKPOINT = re.compile(r"checkpoint-([0-9]{1,9})$")


def checkpoint_series(paths: Sequence[str]) -> List[str]:
    """Expand a training output folder into its ``checkpoint-N`` folders, ordered by N."""
    if len(paths) != 1 or not Path(paths[0]).is_dir():
        return list(paths)
    found = [(int(match.group(1)), str(child)) for child in Path(paths[0]).iterdir()
             if child.is_dir() and (match := _CHECKPOINT.search(child.name))]
    return [path for _, path in sorted(found)] if found else list(paths)


def _why_no_overlap(comparison: Mapping[str, Any], overlaps: bool) -> List[str]:
    """Why a drift row has no update cosine, so its "-" is explained in its issues."""
    if comparison["overlap_summary"]["update_cosine_mean"] is not None:
        return []
    if not overlaps:
        return ["overlap: not computed (--no-overlap)"]
    if not comparison["n_common"]:
        return ["overlap: the two checkpoints have no module in common"]
    return ["overlap: no module has an update cosine (an update is zero, or the factors are unavailable)"]


def training_drift(paths: Sequence[str], overlaps: bool = True, **udr: Optional[str]) -> Dict[str, Any]:
    """How the update moves between consecutive checkpoints: one row per pair."""
    rows = []
    for earlier, later in zip(paths, paths[1:]):
        comparison = compare_adapters(earlier, later, overlaps=overlaps, **udr)
        summary = comparison["overlap_summary"]
        match_a, match_b = _CHECKPOINT.search(Path(earlier).name), _CHECKPOINT.search(Path(later).name)
        rows.append({"from": earlier, "to": later,
                     "step_from": int(match_a.group(1)) if match_a else None,
                     "step_to": int(match_b.group(1)) if match_b else None,
                     "update_cosine_mean": summary["update_cosine_mean"],
                     "update_cosine_min": summary["update_cosine_min"],
                     "relative_change_mean": summary["relative_difference_mean"],
                     "utilization_mean_from": comparison["a"]["summary"]["utilization_mean"],
                     "utilization_mean_to": comparison["b"]["summary"]["utilization_mean"],
                     "n_modules": summary["n_modules"],
                     "issues": comparison["issues"] + _why_no_overlap(comparison, overlaps)})
    return json_safe({"schema": DRIFT_SCHEMA, "checkpoints": list(paths), "pairs": rows})


def render_comparison(document: Mapping[str, Any], top: int = 10) -> str:
    a, b = document["a"], document["b"]
    lines = [f"A: {a['path']} [{a['format']}]", f"B: {b['path']} [{b['format']}]", "",
             f"  {'metric':<26} {'A':>12} {'B':>12} {'B − A':>12}"]
    for metric in SUMMARY_FIELDS:
        lines.append(f"  {metric:<26} {_fmt(a['summary'][metric]):>12} {_fmt(b['summary'][metric]):>12} "
                     f"{_fmt(document['summary_delta'][metric]):>12}")
    lines += ["", f"  {'type':<6} {'util A':>8} {'util B':>8} {'UDR p50 A':>10} {'UDR p50 B':>10}"]
    for kind in ("attn", "mlp", "other"):
        row_a, row_b = document["by_type"]["a"].get(kind), document["by_type"]["b"].get(kind)
        if row_a or row_b:
            lines.append(f"  {kind:<6} {_fmt((row_a or {}).get('utilization_mean')):>8} "
                         f"{_fmt((row_b or {}).get('utilization_mean')):>8} {_fmt((row_a or {}).get('udr_median')):>10} "
                         f"{_fmt((row_b or {}).get('udr_median')):>10}")
    summary = document["overlap_summary"]
    lines += ["", f"  modules in both: {document['n_common']}; only in A: {len(document['only_in_a'])}; "
                  f"only in B: {len(document['only_in_b'])}"]
    if summary["n_modules"]:
        lines.append(f"  update overlap over {summary['n_modules']} modules: cosine mean {_fmt(summary['update_cosine_mean'])}"
                     f" (min {_fmt(summary['update_cosine_min'])}), ‖ΔW_B − ΔW_A‖/‖ΔW_A‖ mean "
                     f"{_fmt(summary['relative_difference_mean'])}, subspace overlap out {_fmt(summary['output_overlap_mean'])}"
                     f" / in {_fmt(summary['input_overlap_mean'])}")
        moved = sorted((m for m in document["modules"] if m["overlap"] and m["overlap"]["update_cosine"] is not None),
                       key=lambda m: m["overlap"]["update_cosine"])[:top]
        if moved:
            lines += ["", f"  modules whose updates differ most (lowest cosine, top {top}):"]
        lines += _aligned([(m["name"], f"cos={_fmt(m['overlap']['update_cosine'])}",
                            f"Δutil={_fmt(m['delta']['utilization'])}", f"ΔUDR={_fmt(m['delta']['udr'])}")
                           for m in moved], "<<<<", indent="    ")
    elif top and document["modules"]:
        # Saved audit documents have no factors, so no overlaps: rank by the metrics that moved.
        def moved_by(m):
            return (abs(m["delta"].get("udr") or 0.0), abs(m["delta"].get("utilization") or 0.0))
        moved = sorted(document["modules"], key=moved_by, reverse=True)[:top]
        lines += ["", f"  modules that changed most (largest |ΔUDR|, then |Δutilization|; top {top}):"]
        lines += _aligned([(m["name"], f"util {_fmt(m['a']['utilization'])} → {_fmt(m['b']['utilization'])}",
                            f"Δutil={_fmt(m['delta']['utilization'])}", f"ΔUDR={_fmt(m['delta']['udr'])}")
                           for m in moved], "<<<<", indent="    ")
    for label, names in (("only in A", document["only_in_a"]), ("only in B", document["only_in_b"])):
        if names:
            lines.append(f"  {label}: " + ", ".join(names[:8]) + (" …" if len(names) > 8 else ""))
    if document["issues"]:
        lines += ["", "  issues:"] + [f"    - {issue}" for issue in document["issues"]]
    return "\n".join(terminal_safe(line) for line in lines)


def render_drift(document: Mapping[str, Any]) -> str:
    lines = [f"training drift over {len(document['checkpoints'])} checkpoints", "",
             f"  {'from → to':<28} {'cos mean':>9} {'cos min':>9} {'rel change':>11} {'util':>14}"]
    for row in document["pairs"]:
        label = f"{row['step_from']} → {row['step_to']}" if row["step_from"] is not None else \
            f"{Path(row['from']).name} → {Path(row['to']).name}"
        lines.append(f"  {label:<28} {_fmt(row['update_cosine_mean']):>9} {_fmt(row['update_cosine_min']):>9} "
                     f"{_fmt(row['relative_change_mean']):>11} "
                     f"{_fmt(row['utilization_mean_from']):>6} → {_fmt(row['utilization_mean_to']):<6}")
    return "\n".join(terminal_safe(line) for line in lines)


# ══ 8b. resize ═══════════════════════════════════════════════════════════════
# ΔW = B·A = Q_B·C·Q_Aᵀ with C = R_B·R_Aᵀ (section 5), so its SVD is
# Q_B·U·Σ·Vᵀ·Q_Aᵀ and the best rank-k approximation (Eckart–Young) is
# ΔW_k = (Q_B·U_k·Σ_k^½)(Σ_k^½·V_kᵀ·Q_Aᵀ).  Q_B and Q_A are never formed:
#   B' = Q_B·U_k·Σ_k^½ = B·(R_Aᵀ·V_k·Σ_k^-½)     since B·R_Aᵀ·V_k = Q_B·C·V_k = Q_B·U_k·Σ_k
#   A' = Σ_k^½·V_kᵀ·Q_Aᵀ = (Σ_k^-½·U_kᵀ·R_B)·A   since U_kᵀ·R_B·A = U_kᵀ·C·Q_Aᵀ = Σ_k·V_kᵀ·Q_Aᵀ
# so each new factor is the old one times an r×k matrix: two streamed passes
# (Grams, then products), no inverse of R, no dense ΔW.  The scale is kept by
# writing alpha = s·k (rsLoRA: s·√k) per module, so the loader's own rule
# (alpha / k) gives back s and s·B'·A' = s·(B·A)_k.

RESIZE_SCHEMA = "gradience_lite.resize/1"
RESIZE_FORMATS = ("peft", "kohya")
RESIZE_REPORT_NAME = "resize_report.json"
OUTPUT_DTYPES = {"same": None, "fp32": "F32", "bf16": "BF16", "fp16": "F16"}
# σᵢ at or below this fraction of σ₁ are round-off: the component is written as
# zeros (ΔW_k is unchanged; dividing by √σᵢ would only amplify noise).
NULL_SINGULAR_VALUE = 1e-13
COPY_BYTES = 16 << 20  # tensors carried over are copied in slices of this size
PRODUCT_CHUNK_ELEMENTS = 1 << 22  # pass 2: a 7B factor in one product (16 MiB of float32); fewer, larger BLAS calls


def _encode_bf16(values: np.ndarray) -> np.ndarray:
    # Round to nearest even on the float32 bits: add 0x7FFF plus the lowest kept
    # bit, keep the top half.  uint32 throughout (NumPy 1.x value-based casting).
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    one, sixteen = np.uint32(1), np.uint32(16)
    return ((bits + (np.uint32(0x7FFF) + ((bits >> sixteen) & one))) >> sixteen).astype("<u2")


# Output dtype → (dtype the products are computed in, encoder, largest finite value).
# Half-precision outputs are computed in float32: its round-off is 2¹⁶× below bf16's.
ENCODERS: Dict[str, Tuple[Any, Callable[[np.ndarray], np.ndarray], float]] = {
    "F64": (np.float64, lambda values: np.ascontiguousarray(values, dtype="<f8"), float(np.finfo(np.float64).max)),
    "F32": (np.float64, lambda values: np.ascontiguousarray(values, dtype="<f4"), float(np.finfo(np.float32).max)),
    "F16": (np.float32, lambda values: np.ascontiguousarray(values, dtype="<f2"), float(np.finfo(np.float16).max)),
    "BF16": (np.float32, _encode_bf16, float(np.float32(3.3895314e38))),
}


def encode(values: np.ndarray, dtype_name: str) -> np.ndarray:
    """Float values → the stored array of safetensors dtype ``dtype_name``.

    ValueError when a value is not finite or beyond the dtype's largest finite
    value (rather than writing an Inf the input never had)."""
    _, encoder, largest = ENCODERS[dtype_name]
    values = np.asarray(values)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if not peak <= largest:  # also catches NaN
        raise ValueError(f"values overflow {dtype_name} (largest magnitude {peak:g})")
    return encoder(values)


class OutTensor(NamedTuple):
    """One tensor to write: its bytes come from ``produce()`` when its turn comes."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    produce: Callable[[], Any]  # → an array or buffer, or an iterator of them: shape × itemsize bytes in all


def write_safetensors(path: str | os.PathLike, tensors: Sequence[OutTensor],
                      metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write a safetensors file, one tensor in memory at a time; returns its size.

    Data is laid out contiguously in the given order (what the format's
    validator requires); the header is padded with spaces to 8 bytes.

    >>> write_safetensors("x.safetensors", [OutTensor("w", "F32", (2,), lambda: np.ones(2, "<f4"))])  # doctest: +SKIP
    """
    header: Dict[str, Any] = {}
    offset = 0
    for tensor in tensors:
        size = math.prod(tensor.shape) * DTYPES[tensor.dtype].storage.itemsize
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(len(blob).to_bytes(8, "little") + blob)
        for tensor in tensors:
            produced = tensor.produce()
            pieces = (produced,) if isinstance(produced, (np.ndarray, bytes, memoryview)) else produced
            written = sum(out.write(memoryview(piece).cast("B")) for piece in pieces)
            start, end = header[tensor.name]["data_offsets"]
            if written != end - start:
                raise ValueError(f"{tensor.name}: produced {written} bytes, header says {end - start}")
    return 8 + len(blob) + offset


def truncation_maps(factor_a: np.ndarray, factor_b: np.ndarray, k: int,
                    core_svd: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(σ of B·A, M_B r×k, N_A k×r) from R_A, R_B (RᵀR = the Grams), so that
    (B·M_B)·(N_A·A) is the best rank-k approximation of B·A.  ``core_svd`` is
    the SVD (U, σ, Vᵀ) of R_B·R_Aᵀ when already computed."""
    left, sigma, right_t = core_svd if core_svd is not None else np.linalg.svd(factor_b @ factor_a.T)
    kept = sigma[:k]
    live = kept > sigma[0] * NULL_SINGULAR_VALUE if sigma.size and sigma[0] > 0 else np.zeros(kept.size, bool)
    inverse_root = np.where(live, 1.0 / np.sqrt(np.where(live, kept, 1.0)), 0.0)
    map_b = (factor_a.T @ right_t[:k].T) * inverse_root[None, :]
    map_a = inverse_root[:, None] * (left[:, :k].T @ factor_b)
    return sigma, map_b, map_a


def truncate_lora(a: np.ndarray, b: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(A' k×n, B' m×k) with B'·A' the best rank-k approximation of B·A, from r×r work.

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(6, 40)), rng.normal(size=(30, 6))
    >>> a2, b2 = truncate_lora(a, b, 2)
    >>> u, s, vt = np.linalg.svd(b @ a)
    >>> bool(np.allclose(b2 @ a2, (u[:, :2] * s[:2]) @ vt[:2]))
    True
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    factor_a, factor_b = gram_factor(a.T), gram_factor(b)
    if factor_a is None or factor_b is None:
        raise ValueError("truncate_lora: factors contain NaN or Inf")
    _, map_b, map_a = truncation_maps(factor_a, factor_b, k)
    return map_a @ a, b @ map_b


class ResizedModule(NamedTuple):
    """One module's plan and cost.  ``k == r``: written back unchanged."""

    name: str
    module_type: str
    kind: str
    r: int
    k: int
    scale: float
    sigma: np.ndarray  # singular values of the unscaled B·A
    prepared: _PreparedModule
    map_a: Optional[np.ndarray]  # k×r, or None when unchanged
    map_b: Optional[np.ndarray]  # r×k (the alpha correction folded in)
    alpha: Optional[float]  # the alpha written for this module (kohya tensor / PEFT pattern)

    def cost(self) -> Dict[str, Any]:
        energy = np.square(self.sigma)
        total = float(energy.sum())
        zero = total == 0.0
        return {"name": self.name, "module_type": self.module_type, "kind": self.kind, "r": self.r, "k": self.k,
                "kept_energy": None if zero else float(energy[:self.k].sum()) / total,
                # from the discarded σ directly: 1 − kept would cancel digits
                "relative_error": None if zero else math.sqrt(float(energy[self.k:].sum()) / total),
                "sigma_max": float(self.sigma[0]) if self.sigma.size else 0.0,
                "delta_sigma_max": abs(self.scale) * (float(self.sigma[0]) if self.sigma.size else 0.0),
                "params_before": self.prepared.params, "params_after": self.prepared.params // self.r * self.k}


def _resize_refusal(module: LoraModule, config: AdapterConfig) -> Optional[str]:
    if module.family != "lora":
        return f"{module.name}: {module.family} (ΔW is not one product B·A in the file's layout); resize writes LoRA only"
    if module.part("lora_mid.weight"):
        return f"{module.name}: Tucker LoCon (lora_mid) is not resized"
    if module.magnitude_key is not None or config.use_dora:
        return (f"{module.name}: DoRA: its magnitude renormalises W₀ + ΔW column by column, so truncating ΔW "
                "is not the best rank-k approximation of what the adapter applies; not resized")
    return None


def _target_rank(sigma: np.ndarray, r: int, rank: Optional[int], policy: Optional[str],
                 min_rank: int, max_rank: Optional[int]) -> int:
    k = rank if rank is not None else policy_rank(policy, sigma)
    k = max(k, min_rank)
    if max_rank is not None:
        k = min(k, max_rank)
    return min(k, r)


def alpha_tensor(value: float, dtype_name: str, shape: Tuple[int, ...]) -> Tuple[str, np.ndarray, float]:
    """A kohya ``alpha`` tensor holding ``value``: (dtype written, stored array, the value it holds).

    Float alphas keep their dtype (the value rounds to it); an integer alpha
    (some converters write I64) stays integer when ``value`` is a whole number,
    else becomes F32 — every kohya loader reads alpha with ``.item()``."""
    spec = DTYPES.get(dtype_name)
    if spec is not None and not spec.is_float and float(value).is_integer():
        stored = np.full(shape, int(value), dtype=spec.storage)
        return dtype_name, stored, float(value)
    dtype_name = dtype_name if dtype_name in ENCODERS else "F32"
    stored = encode(np.full(shape, value, dtype=np.float64), dtype_name)
    held = float(decode(stored, dtype_name).reshape(-1)[0])
    if held == 0.0 and value != 0.0 and dtype_name != "F32":  # underflowed: 0 would mean "no alpha" (scale 1)
        return alpha_tensor(value, "F32", shape)
    return dtype_name, stored, held


def plan_resize(source: _TensorSource, modules: Sequence[LoraModule], setup: AuditSetup, *,
                rank: Optional[int], policy: Optional[str], min_rank: int = 1,
                max_rank: Optional[int] = None) -> List[ResizedModule]:
    """Pass 1: every module's Grams, r×r factors, SVD, chosen k and the two r×k maps.

    Raises AdapterFormatError when a module cannot be resized exactly (nothing is written)."""
    workspace = Workspace()
    prepared: List[_PreparedModule] = []
    for module in modules:
        refusal = _resize_refusal(module, setup.config)
        item, issues = (None, [refusal]) if refusal else _prepare_module(module, source, workspace, setup.scale_rule)
        if item is None:
            raise AdapterFormatError(f"cannot resize: {issues[0]}; nothing written")
        prepared.append(item._replace(tall=None))
    plans: List[Optional[ResizedModule]] = [None] * len(prepared)
    for indices, factors in _module_core_factors(prepared, source):
        factors_a, factors_b = factors[:len(indices)], factors[len(indices):]
        lefts, sigmas, rights_t = np.linalg.svd(factors_b @ np.swapaxes(factors_a, 1, 2))  # one batched SVD
        for row, index in enumerate(indices):
            item, sigma = prepared[index], sigmas[row]
            k = _target_rank(sigma, item.r, rank, policy, min_rank, max_rank)
            plans[index] = _module_plan(item, factors_a[row], factors_b[row], (lefts[row], sigma, rights_t[row]), k, source)
    return [plan for plan in plans if plan is not None]


def _module_plan(item: _PreparedModule, factor_a: np.ndarray, factor_b: np.ndarray,
                 core_svd: Tuple[np.ndarray, np.ndarray, np.ndarray], k: int, source: _TensorSource) -> ResizedModule:
    scale, sigma = item.scale.scale, core_svd[1]
    common = dict(name=item.module.name, module_type=module_type(item.module.name), kind=item.layout.kind,
                  r=item.r, scale=scale, sigma=sigma, prepared=item._replace(gram_a=None, gram_b=None))
    if k >= item.r:
        return ResizedModule(k=item.r, map_a=None, map_b=None, alpha=item.scale.alpha, **common)
    _, map_b, map_a = truncation_maps(factor_a, factor_b, k, core_svd)
    alpha = None
    if item.scale.scale_rule in ("alpha/r", "alpha/sqrt(r)"):
        alpha = scale * (math.sqrt(k) if item.scale.scale_rule == "alpha/sqrt(r)" else k)
        alpha_key = item.module.part("alpha")
        if alpha_key is not None:  # kohya: alpha is a tensor; fold its rounding into B'
            _, _, stored = alpha_tensor(alpha, *source.describe(alpha_key)[:2])
            map_b = map_b * (alpha / stored)
            alpha = stored
    return ResizedModule(k=k, map_a=map_a, map_b=map_b, alpha=alpha, **common)


def _product_tensor(source: _TensorSource, ref: FactorRef, linear_map: np.ndarray, out_dtype: str,
                    out_shape: Tuple[int, ...], workspace: Workspace) -> np.ndarray:
    """Pass 2 for one factor: B·M_B or N_A·A, decoded and multiplied chunk by chunk
    along the long axis (cache-sized pieces of the reused workspace), then encoded."""
    compute = ENCODERS[out_dtype][0]
    dtype_name = source.describe(ref.key)[0]
    raw = _stored_matrix(source, ref)
    linear_map = linear_map.astype(compute)
    rank, length = ref.shape[ref.rank_axis], ref.shape[1 - ref.rank_axis]
    step = max(1, PRODUCT_CHUNK_ELEMENTS // max(rank, 1))
    if ref.rank_axis == 1:  # B (m×r): rows of B' are rows of B times M_B
        product = np.empty((length, linear_map.shape[1]), dtype=compute)
        for first in range(0, length, step):
            product[first:first + step] = decode(raw[first:first + step], dtype_name, compute, workspace) @ linear_map
    else:  # A (r×n): columns of A' are N_A times columns of A
        product = np.empty((linear_map.shape[0], length), dtype=compute)
        for first in range(0, length, step):
            product[:, first:first + step] = linear_map @ decode(raw[:, first:first + step], dtype_name, compute, workspace)
    source.release(ref.key)
    return encode(product.reshape(out_shape), out_dtype)


def _recoded_tensor(source: _TensorSource, key: str, out_dtype: str) -> np.ndarray:
    values = decode(source.raw(key), source.describe(key)[0], ENCODERS[out_dtype][0])
    source.release(key)
    return encode(values, out_dtype)


def _output_tensors(sf: SafetensorsFile, plans: Sequence[ResizedModule], dtype: Optional[str]) -> List[OutTensor]:
    """Every input tensor in file order: resized factors and alphas replaced, the rest copied byte for byte."""
    source = _TensorSource.from_file(sf)
    workspace = Workspace()
    replaced: Dict[str, OutTensor] = {}
    for plan in plans:
        layout, module = plan.prepared.layout, plan.prepared.module
        for ref, stored_shape in ((layout.a, plan.prepared.a_shape), (layout.b, plan.prepared.b_shape)):
            info = sf.tensors[ref.key]
            out_dtype = dtype or info.dtype
            if out_dtype not in ENCODERS:
                raise AdapterFormatError(f"cannot resize: {ref.key} is stored as {info.dtype}; choose --dtype fp32/bf16/fp16")
            if plan.map_a is None:
                if out_dtype != info.dtype:
                    replaced[ref.key] = OutTensor(ref.key, out_dtype, info.shape,
                                                  functools.partial(_recoded_tensor, source, ref.key, out_dtype))
                continue
            is_a = ref is layout.a
            shape = (plan.k,) + tuple(info.shape[1:]) if is_a else (info.shape[0], plan.k) + tuple(info.shape[2:])
            replaced[ref.key] = OutTensor(ref.key, out_dtype, shape, functools.partial(
                _product_tensor, source, ref, plan.map_a if is_a else plan.map_b, out_dtype, shape, workspace))
        alpha_key = module.part("alpha")
        if alpha_key is not None and plan.map_a is not None and plan.alpha is not None:
            info = sf.tensors[alpha_key]
            dtype_name, stored, _ = alpha_tensor(plan.alpha, info.dtype, info.shape)
            replaced[alpha_key] = OutTensor(alpha_key, dtype_name, info.shape, functools.partial(np.asarray, stored))

    def copied(info: TensorInfo) -> Iterable[memoryview]:
        # Read in chunks with pread as they go: a large saved embedding never sits in memory whole,
        # and a file cut short meanwhile is an error naming it, not SIGBUS.
        for first in range(info.start, info.end, COPY_BYTES):
            yield memoryview(_read_exact(sf.handle, sf.path, first, min(COPY_BYTES, info.end - first)))

    return [replaced.get(info.name) or OutTensor(info.name, info.dtype, info.shape, functools.partial(copied, info))
            for info in sorted(sf.tensors.values(), key=lambda info: info.start)]


def _resized_config(raw_config: Mapping[str, Any], plans: Sequence[ResizedModule], config: AdapterConfig) -> Dict[str, Any]:
    """The input's adapter_config.json with r / lora_alpha / rank_pattern / alpha_pattern
    rewritten so that PEFT's rules give every module its new rank and its old scale."""
    document = dict(raw_config)
    settings = lora_config_for_ranks({plan.name: plan.k for plan in plans},
                                     {plan.name: plan.scale for plan in plans}, config.use_rslora)
    document.update({key: settings[key] for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")})
    return document


def _publish(temporary: Path, target: Path) -> None:
    """Move the finished temporary directory into place; a replaced OUT is removed only afterwards."""
    import shutil  # only resize needs it

    if not target.exists():
        os.replace(temporary, target)
        return
    backup = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    os.replace(target, backup)
    os.replace(temporary, target)
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup)
    else:
        backup.unlink()


def resize_adapter(path: str | os.PathLike, out: str | os.PathLike, *, rank: Optional[int] = None,
                   policy: Optional[str] = None, adapter: Optional[str] = None, dtype: str = "same",
                   min_rank: int = 1, max_rank: Optional[int] = None, force: bool = False,
                   base_model: Optional[str] = None, base_norms: Optional[str] = None,
                   base_norms_cache: Optional[str] = None) -> Dict[str, Any]:
    """Write OUT holding, per module, exactly the best rank-k approximation of ΔW.

    ``rank`` (a fixed k) or ``policy`` (a rank policy per module) chooses k,
    clamped to [min_rank, max_rank] and never above the module's r (such
    modules are copied unchanged).  Returns the report also saved as
    ``OUT/resize_report.json``.  Raises AdapterFormatError (nothing written)
    when the input cannot be resized exactly.

    >>> report = resize_adapter("adapter", "adapter-r4", rank=4)          # doctest: +SKIP
    >>> report["totals"]["params_after"]                                   # doctest: +SKIP
    """
    import shutil  # only resize needs it

    if (rank is None) == (policy is None):
        raise ValueError("give exactly one of rank or policy")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}")
    target = Path(out)
    files = find_adapter_files(path, adapter=adapter)
    weights = Path(files.weights_path).resolve()
    if target.exists() and not force:
        raise AdapterFormatError(f"{target}: already exists (use --force to replace it)")
    if target.resolve() in weights.parents:
        raise AdapterFormatError(f"{target}: would replace the adapter being resized; choose another OUT")
    sf = open_safetensors(files.weights_path)
    raw_config, load_issues = load_adapter_config(files.config_path)
    keys = list(sf.tensors)
    setup = configure(detect_format(keys, sf.metadata, raw_config), raw_config, load_issues, sf.metadata)
    if setup.adapter_format not in RESIZE_FORMATS:
        raise AdapterFormatError(f"{files.weights_path}: format {setup.adapter_format!r}; resize writes PEFT and kohya LoRA only")
    if setup.config.peft_type not in (None, "LORA"):
        raise AdapterFormatError(f"{files.weights_path}: peft_type {setup.config.peft_type}; resize writes LoRA only")
    source = _TensorSource.from_file(sf)
    shape_of = lambda key: source.describe(key)[1]  # noqa: E731
    modules, non_lora = group_modules(setup.adapter_format, keys, shape_of, setup.config.peft_type)
    if setup.adapter_format == "peft":  # KaSA, BD-LoRA, fused experts become their own families (refused below)
        modules, refused, _ = resolve_lora_fields(modules, non_lora, setup.config, shape_of)
        if refused:
            raise AdapterFormatError(f"cannot resize: {refused[0]}; nothing written")
    if not modules:
        raise AdapterFormatError(f"{files.weights_path}: no LoRA modules to resize")
    plans = plan_resize(source, modules, setup, rank=rank, policy=policy, min_rank=min_rank, max_rank=max_rank)
    tensors = _output_tensors(sf, plans, OUTPUT_DTYPES[dtype])

    temporary = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        size_after = write_safetensors(temporary / Path(files.weights_path).name, tensors, sf.metadata)
        if setup.adapter_format == "peft" and isinstance(raw_config, Mapping):
            (temporary / CONFIG_NAME).write_text(json.dumps(_resized_config(raw_config, plans, setup.config), indent=2),
                                                 encoding="utf-8")
        report = _resize_report(files, target, setup, plans, non_lora, rank, policy, dtype, min_rank, max_rank,
                                sf.file_size, size_after, base_model, base_norms, base_norms_cache)
        (temporary / RESIZE_REPORT_NAME).write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
        _publish(temporary, target)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    return report


def _resize_report(files: AdapterFiles, target: Path, setup: AuditSetup, plans: Sequence[ResizedModule],
                   non_lora: Sequence[str], rank: Optional[int], policy: Optional[str], dtype: str, min_rank: int,
                   max_rank: Optional[int], size_before: int, size_after: int, base_model: Optional[str],
                   base_norms: Optional[str], base_norms_cache: Optional[str]) -> Dict[str, Any]:
    rows = [plan.cost() for plan in plans]
    issues = [f"{row['name']}: the update is zero; kept energy and error undefined" for row in rows
              if row["kept_energy"] is None]
    if base_model or base_norms or base_norms_cache:
        # The same shape/storage guard as the audit's UDR: a base weight of another
        # shape is refused, never divided by.
        lookup = collect_base_norms([row["name"] for row in rows], base_model=base_model, norms_file=base_norms,
                                    cache_file=base_norms_cache, layer_replication=setup.config.layer_replication,
                                    delta_shapes={plan.name: _prepared_delta_shape(plan.prepared) for plan in plans},
                                    fan_in_fan_out=setup.config.fan_in_fan_out)
        issues.extend(lookup.issues)
        for row in rows:
            base_sigma = lookup.norms.get(row["name"], (None, None))[0]
            # Truncation keeps σ₁, so ‖ΔW_k‖₂ = ‖ΔW‖₂ and UDR is unchanged (up to the output dtype's rounding).
            row["base_sigma_max"] = base_sigma
            row["udr"] = row["delta_sigma_max"] / (base_sigma + UDR_EPS) if base_sigma is not None else None
    errors = [row["relative_error"] for row in rows if row["relative_error"] is not None]
    totals = {"modules": len(rows), "modules_resized": sum(row["k"] < row["r"] for row in rows),
              "params_before": sum(row["params_before"] for row in rows),
              "params_after": sum(row["params_after"] for row in rows),
              "file_size_before": size_before, "file_size_after": size_after,
              "relative_error_max": max(errors) if errors else None,
              "kept_energy_min": min((row["kept_energy"] for row in rows if row["kept_energy"] is not None), default=None)}
    return json_safe({"schema": RESIZE_SCHEMA, "input": files.weights_path, "output": str(target),
                      "format": setup.adapter_format, "rank": rank, "policy": policy, "dtype": dtype,
                      "min_rank": min_rank, "max_rank": max_rank, "non_lora_tensors": list(non_lora),
                      "totals": totals, "modules": rows, "issues": issues})


def render_resize_report(report: Mapping[str, Any], top: int = 10) -> str:
    """The printed cost of a resize: totals, then every module (or the ``top``
    with the largest error when there are more than 40)."""
    totals = report["totals"]
    choice = f"rank {report['rank']}" if report["rank"] is not None else f"policy {report['policy']}"
    lines = [f"resized {report['input']} → {report['output']} ({choice}, dtype {report['dtype']})",
             f"  modules: {totals['modules']} ({totals['modules_resized']} truncated)   "
             f"LoRA params: {totals['params_before']:,} → {totals['params_after']:,}   "
             f"file: {totals['file_size_before']:,} → {totals['file_size_after']:,} bytes",
             f"  worst relative error ‖ΔW − ΔW_k‖_F/‖ΔW‖_F: {_fmt(totals['relative_error_max'])}   "
             f"least kept energy: {_fmt(totals['kept_energy_min'])}", ""]
    rows = list(report["modules"])
    if len(rows) > 40:
        rows = sorted(rows, key=lambda row: -(row["relative_error"] or 0.0))[:top]
        lines.append(f"  the {len(rows)} modules with the largest error (all {totals['modules']} in {RESIZE_REPORT_NAME}):")
    with_udr = any("udr" in row for row in rows)
    lines.append(f"  {'module':<50} {'r→k':>9} {'kept energy':>11} {'rel. error':>10} {'σ_max(ΔW_k)':>11}"
                 + (f" {'UDR':>8}" if with_udr else ""))
    for row in rows:
        lines.append(f"  {row['name']:<50} {str(row['r']) + '→' + str(row['k']):>9} {_fmt(row['kept_energy']):>11} "
                     f"{_fmt(row['relative_error']):>10} {_fmt(row['delta_sigma_max']):>11}"
                     + (f" {_fmt(row.get('udr')):>8}" if with_udr else ""))
    if report["issues"]:
        lines += ["", f"  issues ({len(report['issues'])}):"] + [f"    - {issue}" for issue in report["issues"]]
    return "\n".join(terminal_safe(line) for line in lines)


# ══ 9. CLI ═══════════════════════════════════════════════════════════════════

class UsageError(Exception):
    """Bad command-line use: exit code 2 with a one-line message."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; keep one line
        raise UsageError(message)


def _issues_saying(*phrases: str) -> Callable[[Mapping[str, Any]], List[str]]:
    return lambda document: [issue for issue in document.get("issues") or () if any(p in issue for p in phrases)]


# --fail-on: integrity conditions a CI job can fail on, each read from the audit
# document (so a batch line can be checked the same way).  UDR is deliberately
# absent: it is instrumentation, not a gate.
FAIL_CONDITIONS: Dict[str, Callable[[Mapping[str, Any]], List[str]]] = {
    "issues": lambda document: list(document.get("issues") or ()),
    "skipped": lambda document: ([f"{document['n_modules_skipped']} LoRA module(s) could not be audited"]
                                 if document.get("n_modules_skipped") else []),
    "nonfinite": _issues_saying("NaN/Inf", "overflows float64"),
    "zero": _issues_saying("the update is zero"),
    "unmatched-pattern": _issues_saying("matches no audited module"),
    "rank-mismatch": _issues_saying("rank mismatch", "disagrees with config"),
}


def fail_on_reasons(document: Mapping[str, Any], conditions: Sequence[str]) -> List[str]:
    """The reasons each condition holds for an audit document (empty: none holds).

    >>> fail_on_reasons({"issues": [], "n_modules_skipped": 2}, ["issues", "skipped"])
    ['skipped: 2 LoRA module(s) could not be audited']
    """
    return [f"{condition}: {reason}" for condition in conditions for reason in FAIL_CONDITIONS[condition](document)]


def _report_failures(document: Mapping[str, Any], conditions: Sequence[str]) -> int:
    """Print why --fail-on conditions hold (at most 5 reasons per condition) → exit code 1, else 0."""
    failed = 0
    for condition in conditions:
        reasons = fail_on_reasons(document, [condition])
        failed += bool(reasons)
        for reason in reasons[:5]:
            print(f"gradience-lite: fail-on {reason}", file=sys.stderr)
        if len(reasons) > 5:
            print(f"gradience-lite: fail-on {condition}: … and {len(reasons) - 5} more", file=sys.stderr)
    return 1 if failed else 0


def check_base_paths(args: argparse.Namespace) -> None:
    """Base-side paths that cannot be used are usage errors (exit 2), named in one
    line — not one vague issue plus a misleading "no base weight" per module."""
    if getattr(args, "no_udr", False):
        return
    if args.base_norms and not Path(args.base_norms).is_file():
        problem = "not a regular file" if Path(args.base_norms).exists() else "no such file"  # /dev/zero never ends
        raise UsageError(f"--base-norms {args.base_norms}: {problem}")
    if args.base_model and args.base_model != "auto":
        try:  # as the audit resolves it: a checkpoint, or a diffusers pipeline's component folders
            base_components(args.base_model)
        except AdapterFormatError as error:  # its message names where it looked (offline: the HF cache)
            raise UsageError(f"--base-model (resolved offline): {error}; "
                             "or pass precomputed norms with --base-norms FILE") from None
    cache = args.base_norms_cache
    if cache and Path(cache).exists() and not Path(cache).is_file():
        raise UsageError(f"--base-norms-cache {cache}: not a regular file")
    if cache and not Path(cache).exists():
        if not args.base_model:
            raise UsageError(f"--base-norms-cache {cache}: no such file, and no --base-model to compute it from")
        if not Path(cache).resolve().parent.is_dir():
            raise UsageError(f"--base-norms-cache {cache}: its directory does not exist")


def resolve_auto_base(args: argparse.Namespace, path: str) -> None:
    """``--base-model auto`` for one adapter: the config's ``base_model_name_or_path``,
    so check_base_paths can refuse it up front like a typed path."""
    if args.base_model != "auto" or args.no_udr:
        return
    files = find_adapter_files(path, adapter=args.adapter, weights=args.weights, config=args.adapter_config)
    if files.config_path is None:
        return  # no adapter_config.json (kohya, diffusers metadata …): the audit reports what it finds
    raw, _ = load_adapter_config(files.config_path)
    base = raw.get("base_model_name_or_path") if isinstance(raw, dict) else None
    if not isinstance(base, str) or not base:
        raise UsageError(f"--base-model auto: {files.config_path or 'the adapter'} names no base_model_name_or_path; "
                         "pass --base-model PATH_OR_ID")
    args.base_model = base


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs keep their layout; an option's default is shown when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not ==: a default of 0 (--top-singular-values) is shown, a store_true's False is not
        if (action.option_strings and not any(action.default is absent for absent in (None, False, argparse.SUPPRESS))
                and action.default != () and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


EXIT_CODE_0 = """exit codes:
  0    the command ran (per-module problems are listed under issues, not fatal)
"""
EXIT_CODE_1 = """  1    a --fail-on condition held (reasons on stderr; stdout still carries the report),
       or, in a batch, some adapters failed (each has its error line)
"""
EXIT_CODES_2_ON = """  2    usage error, unreadable adapter, or a --base-model / --base-norms / --base-norms-cache
       path that does not exist (one line on stderr, never a traceback)
  3    internal error (a bug in gradience-lite: please report it with the command line)
  130  interrupted"""
EXIT_CODES = EXIT_CODE_0 + EXIT_CODE_1 + EXIT_CODES_2_ON
EXIT_CODES_WITHOUT_1 = EXIT_CODE_0 + EXIT_CODES_2_ON  # compare has no --fail-on and no batch

MAIN_EPILOG = f"""examples:
  gradience-lite audit --help                 each command has its own help
  gradience-lite audit ./my-adapter
  gradience-lite audit ./my-adapter --base-model auto --html report.html
  gradience-lite compare output_dir/

{EXIT_CODES}"""

FAIL_ON_HELP = """--fail-on conditions (comma-separated), for CI:
  issues             any entry in issues
  skipped            a LoRA module that could not be audited
  nonfinite          NaN/Inf in a factor, or a metric that overflows float64
  zero               a module whose update is zero (B·A = 0)
  unmatched-pattern  a rank_pattern / alpha_pattern key that matches no module
  rank-mismatch      factor ranks that disagree, or a stored rank that disagrees with the config
UDR is instrumentation, not a gate: no condition looks at its value."""

AUDIT_EPILOG = f"""examples:
  gradience-lite audit ./my-adapter                          text report
  gradience-lite audit ./my-adapter --json --layers > a.json one JSON document with per-module rows
  gradience-lite audit ./my-adapter --base-model auto        UDR against the config's base (offline HF cache)
  gradience-lite audit ./my-adapter --base-model ./base --html report.html
  gradience-lite audit ./my-adapter --json --fail-on skipped,nonfinite,rank-mismatch   CI gate
  gradience-lite audit run1/ run2/ run3/ --jsonl out.jsonl --jobs 4               batch

{FAIL_ON_HELP}

{EXIT_CODES}"""

COMPARE_EPILOG = f"""examples:
  gradience-lite compare adapter-a/ adapter-b/
  gradience-lite compare a.json b.json --top 5       saved `audit --json --layers` documents
  gradience-lite compare output_dir/                 its checkpoint-N folders, in step order
  gradience-lite compare a/ b/ --base-model ./base   UDR on both sides

{EXIT_CODES_WITHOUT_1}"""


def fail_on_conditions(value: str) -> Tuple[str, ...]:
    """Parse ``--fail-on LIST``; an unknown name is a usage error."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in FAIL_CONDITIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown condition(s) {', '.join(unknown) or repr(value)}; "
                                         f"choose from {', '.join(FAIL_CONDITIONS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="gradience-lite", description="Audit LoRA adapters with NumPy only.",
                             formatter_class=_HelpFormatter, epilog=MAIN_EPILOG)
    parser.add_argument("--version", action="version", version=f"gradience-lite {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    audit = commands.add_parser("audit", help="audit adapter directories or weights files", formatter_class=_HelpFormatter,
                                description="Audit a LoRA adapter: spectra, rank use and, with a base, UDR.",
                                epilog=AUDIT_EPILOG)
    audit.add_argument("paths", nargs="*", metavar="PATH",
                       help="adapter directory or .safetensors file; several (or --jsonl) make a batch")
    audit.add_argument("--peft-dir", help="adapter directory (same as a positional PATH)")
    audit.add_argument("--adapter", help="named adapter saved in a subfolder (default: the root adapter)")
    audit.add_argument("--adapter-config", help="explicit adapter_config.json")
    audit.add_argument("--weights", help="explicit adapter weights (.safetensors)")
    audit.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    audit.add_argument("--layers", action="store_true", help="include per-module rows")
    audit.add_argument("--top-wasteful", type=int, default=5, metavar="N", help="show the N lowest-utilization modules")
    audit.add_argument("--top-singular-values", type=int, default=0, metavar="K", help="report the first K singular values")
    audit.add_argument("--append", metavar="RUN.jsonl", help="append a metrics event to a telemetry JSONL file")
    audit.add_argument("--html", metavar="REPORT.html", help="also write a self-contained HTML report")
    audit.add_argument("--base-model", metavar="PATH_OR_ID", help="base model dir/file, offline hub id, or 'auto'")
    audit.add_argument("--base-norms", metavar="FILE", help="precomputed base norms (read-only)")
    audit.add_argument("--base-norms-cache", metavar="FILE", help="base norms cache: read, compute what is missing, write back")
    audit.add_argument("--no-udr", action="store_true", help="skip UDR even if a base is given")
    audit.add_argument("--rank-policies", metavar="LIST", default=",".join(DEFAULT_RANK_POLICIES),
                       help="rank policies, comma-separated: energy@P, knee, erank, oht, stable "
                            f"(default {','.join(DEFAULT_RANK_POLICIES)})")
    audit.add_argument("--suggest-per-layer", action="store_true",
                       help="per-module rank advice: a paste-able rank_pattern/alpha_pattern and policy disagreements")
    audit.add_argument("--jsonl", metavar="OUT.jsonl", help="batch: write one JSON line per adapter")
    audit.add_argument("--jobs", type=int, default=1, metavar="N", help="batch: audit N adapters in parallel processes")
    audit.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="give up on an adapter after this long (batch: that adapter's line fails, the rest go on)")
    audit.add_argument("--fail-on", type=fail_on_conditions, default=(), metavar="LIST",
                       help="exit 1 when one of these integrity conditions holds (see below); stdout is unchanged")
    compare = commands.add_parser("compare", help="compare two adapters (or saved audit JSON), or a run's checkpoints",
                                  formatter_class=_HelpFormatter, epilog=COMPARE_EPILOG,
                                  description="Compare two adapters side by side, or follow a run's checkpoints.")
    compare.add_argument("paths", nargs="+", metavar="PATH",
                         help="A B (adapters or audit JSON); or checkpoints in order; or one folder of checkpoint-N")
    compare.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    compare.add_argument("--top", type=int, default=10, metavar="N", help="list the N modules that changed most")
    compare.add_argument("--no-overlap", action="store_true", help="skip the update overlaps (metrics only)")
    compare.add_argument("--base-model", metavar="PATH_OR_ID", help="UDR on both sides: base dir/file, offline hub id, or 'auto'")
    compare.add_argument("--base-norms", metavar="FILE", help="precomputed base norms (read-only)")
    compare.add_argument("--base-norms-cache", metavar="FILE", help="base norms cache: read, compute what is missing, write back")
    commands.add_parser("norms", help="base-model norms: the same as `python -m base_norms` (norms --help)", add_help=False)
    resize = commands.add_parser("resize", help="write the exact best rank-k truncation of an adapter")
    resize.add_argument("input", metavar="IN", help="adapter directory or .safetensors file (PEFT or kohya LoRA)")
    resize.add_argument("output", metavar="OUT", help="directory to write (must not exist unless --force)")
    choice = resize.add_mutually_exclusive_group(required=True)
    choice.add_argument("--rank", type=int, metavar="K", help="the same k for every module (at most its r)")
    choice.add_argument("--policy", metavar="P", help="k per module from a rank policy: energy@P, knee, erank, oht, stable")
    resize.add_argument("--adapter", help="named adapter saved in a subfolder (default: the root adapter)")
    resize.add_argument("--dtype", choices=list(OUTPUT_DTYPES), default="same", help="dtype of the new factors")
    resize.add_argument("--min-rank", type=int, default=1, metavar="K", help="never below K (default 1)")
    resize.add_argument("--max-rank", type=int, metavar="R", help="never above R")
    resize.add_argument("--force", action="store_true", help="replace OUT if it exists")
    resize.add_argument("--json", action="store_true", help="print the report as JSON")
    resize.add_argument("--base-model", metavar="PATH_OR_ID", help="base model, for the UDR of each truncated update")
    resize.add_argument("--base-norms", metavar="FILE", help="precomputed base norms (read-only)")
    resize.add_argument("--base-norms-cache", metavar="FILE", help="base norms cache: read, compute what is missing, write back")
    return parser


def _command_names(parser: argparse.ArgumentParser) -> List[str]:
    """The subcommands the parser knows, so messages that list them stay right as commands are added."""
    return [name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices]


# --append grows a file we do not own: only a regular file (never /dev/full, a
# FIFO or a directory), and not one already past 1 GiB.  Its run_id and last
# step are read from the last MiB only, so the work does not grow with it.
MAX_APPEND_FILE_BYTES = 1 << 30
RUN_CONTEXT_BYTES = 1 << 20


def _check_output_file(path: str, flag: str, max_bytes: Optional[int] = None) -> None:
    """Refuse (exit 2, before any work) an output path that cannot be a regular file we may write."""
    target = Path(path)
    try:
        if target.exists():
            info = target.stat()
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(f"{flag} {path}: not a regular file")
            if max_bytes is not None and info.st_size > max_bytes:
                raise UsageError(f"{flag} {path}: {info.st_size} bytes, over the MAX_APPEND_FILE_BYTES cap ({max_bytes})")
            if not os.access(path, os.W_OK):
                raise UsageError(f"{flag} {path}: not writable")
        elif not target.parent.is_dir():
            raise UsageError(f"{flag} {path}: folder {target.parent} does not exist")
    except OSError as error:
        raise UsageError(f"{flag} {path}: {error.strerror or error}") from None


def _read_run_context(path: Path) -> Tuple[Optional[str], Optional[int], bool]:
    """run_id and the last step already in a telemetry file (None if absent),
    and whether the file ends in a newline (an empty or absent file does)."""
    run_id, step = None, None
    if not path.exists():
        return run_id, step, True
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - RUN_CONTEXT_BYTES))
        tail = handle.read(RUN_CONTEXT_BYTES)
    lines = tail.split(b"\n")
    if size > RUN_CONTEXT_BYTES:
        lines = lines[1:]  # the first line of the tail is cut
    for line in lines:
        try:
            event = json.loads(line.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            continue
        if isinstance(event, dict):
            run_id = event.get("run_id") if isinstance(event.get("run_id"), str) else run_id
            step = event.get("step") if isinstance(event.get("step"), int) else step
    return run_id, step, size == 0 or tail.endswith(b"\n")


def append_metrics_event(result: AuditResult, path: str, *, run_id: Optional[str] = None,
                         step: Optional[int] = None) -> Dict[str, Any]:
    """Append the audit as a metrics event to a JSONL telemetry file.

    ``run_id`` / ``step`` default to the file's own run_id and last step (what
    ``--append`` does); a training loop passes its global step.  A file whose
    last line lacks its newline gets one first, so the event never glues onto
    it.  Raises :class:`AdapterFormatError` when the file cannot be appended to
    (not a regular file, too large, not writable).
    """
    try:
        _check_output_file(path, "--append", MAX_APPEND_FILE_BYTES)
        target = Path(path)
        file_run_id, file_step, ends_in_newline = _read_run_context(target)
        run_id = run_id or file_run_id or f"gradience-lite-{int(time.time())}"
        event = result.to_metrics_event(run_id, file_step if step is None else step)
        with target.open("a", encoding="utf-8") as handle:
            handle.write(("" if ends_in_newline else "\n") + json.dumps(event, allow_nan=False) + "\n")
    except UsageError as error:
        raise AdapterFormatError(str(error)) from None
    except OSError as error:
        raise AdapterFormatError(f"--append {path}: cannot append ({error.strerror or error})") from None
    return event


def _udr_options(args: argparse.Namespace) -> Dict[str, Optional[str]]:
    wants_udr = not getattr(args, "no_udr", False) and (args.base_model or args.base_norms or args.base_norms_cache)
    return {"base_model": args.base_model if wants_udr else None, "base_norms": args.base_norms if wants_udr else None,
            "base_norms_cache": args.base_norms_cache if wants_udr else None}


@contextlib.contextmanager
def _stdout_fd_guarded() -> Iterable[None]:
    """Point fd 1 at stderr while numerical work runs: LAPACK's error handler
    (xerbla: "** On entry to DLASCL …") writes straight to fd 1 and would
    corrupt the JSON a pipeline reads from stdout."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 or 2 (a closed stream): nothing to protect
        yield
        return
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class AuditTimeout(BaseException):
    """--timeout ran out.  A BaseException, like KeyboardInterrupt, so no broad
    ``except Exception`` on the way (a framework tensor's conversion) swallows it."""


@contextlib.contextmanager
def _time_limit(seconds: Optional[float], what: str) -> Iterable[None]:
    """Raise AuditTimeout after ``seconds`` (Unix interval timer; checked between Python steps)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise AuditTimeout(f"{what}: timed out after {seconds:g} s (--timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _progress(message: str) -> None:
    print(terminal_safe(message), file=sys.stderr)


def _run_audit(args: argparse.Namespace) -> int:
    paths = list(args.paths) + ([args.peft_dir] if args.peft_dir else [])
    if not paths and args.weights is None:
        raise UsageError("audit needs an adapter directory (PATH or --peft-dir) or --weights")
    for name in ("top_wasteful", "top_singular_values", "jobs"):
        if getattr(args, name) < (1 if name == "jobs" else 0):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {1 if name == 'jobs' else 0}")
    if args.timeout is not None and not (0 < args.timeout <= MAX_TIMEOUT_SECONDS):
        raise UsageError(f"--timeout must be > 0 and <= {MAX_TIMEOUT_SECONDS} seconds")
    if args.timeout is not None and not hasattr(signal, "setitimer"):
        raise UsageError("--timeout needs Unix interval timers (not available on this system)")
    try:
        policies = parse_rank_policies(args.rank_policies)
    except ValueError as error:
        raise UsageError(f"--rank-policies: {error}") from None
    if len(paths) <= 1 and not args.jsonl:
        resolve_auto_base(args, paths[0] if paths else args.weights)
    check_base_paths(args)
    if len(paths) > 1 or args.jsonl:
        if args.fail_on:  # refused rather than dropped; fail_on_reasons() reads a batch line just as well
            raise UsageError("--fail-on is for single audits; in a batch, each JSON line has the issues to gate on")
        return _run_batch(args, paths)
    # Outputs are checked before the audit: a bad path must not surface after the JSON was printed.
    if args.html:
        _check_output_file(args.html, "--html")
    if args.append:
        _check_output_file(args.append, "--append", MAX_APPEND_FILE_BYTES)
    # The HTML report plots spectra, so it asks for them when the user did not — for the HTML only:
    # the JSON and text keep top_singular_values as --top-singular-values asked (null without it).
    top_k = max(args.top_singular_values, 64 if args.html else 0)
    target = paths[0] if paths else args.weights
    with _stdout_fd_guarded(), _time_limit(args.timeout, str(target)):
        full = audit_lora_peft_dir(
            target, include_top_singular_values=top_k,
            adapter=args.adapter, weights=args.weights, adapter_config=args.adapter_config, **_udr_options(args),
            progress=_progress)
        full = with_rank_policies(full, policies)
        result = _spectra_cut(full, args.top_singular_values)
        html_report = render_html_report(full, command=getattr(args, "command_line", None)) if args.html else None
    if args.json:
        document = result.to_summary_dict(include_layers=args.layers, suggest_per_layer=args.suggest_per_layer)
        print(json.dumps(document, indent=2, allow_nan=False))
    else:
        print(render_text_report(result, show_layers=args.layers, top_wasteful=args.top_wasteful,
                                 singular_values=args.top_singular_values, suggest_per_layer=args.suggest_per_layer))
    if args.html:
        try:
            Path(args.html).write_text(html_report, encoding="utf-8", errors="backslashreplace")
        except OSError as error:
            raise AdapterFormatError(f"--html {args.html}: cannot write ({error.strerror or error})") from None
        print(f"wrote HTML report to {terminal_safe(args.html)}", file=sys.stderr)
    if args.append:
        append_metrics_event(result, args.append)
        print(f"appended metrics event to {terminal_safe(args.append)}", file=sys.stderr)
    return _report_failures(result.to_summary_dict(), args.fail_on)


def _spectra_cut(result: AuditResult, top_k: int) -> AuditResult:
    """The result with each module's top singular values cut to the first top_k (None when 0)."""
    def cut(values: Optional[Tuple[float, ...]]) -> Optional[Tuple[float, ...]]:
        return values[:top_k] if values is not None and top_k > 0 else None
    return replace(result, layers=tuple(replace(layer, top_singular_values=cut(layer.top_singular_values))
                                        for layer in result.layers))
# What batch_audit_line understands; anything else is a caller's mistake.
BATCH_OPTIONS = ("layers", "top_singular_values", "adapter", "base_model", "base_norms", "base_norms_cache",
                 "rank_policies")
# Batch workers: one process per adapter, at most this many at once (beyond
# it they only compete for cores and memory); per-adapter --timeout up to a day.
MAX_JOBS = 64
MAX_TIMEOUT_SECONDS = 86400.0


def batch_audit_line(path: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """One batch result: the summary (flattened) with ``path`` and ``ok``, or the error.

    ``options`` may hold the keys in :data:`BATCH_OPTIONS` (others raise
    ``ValueError``).  Never raises for a bad adapter, so a batch continues past failures.
    """
    unknown = sorted(set(options) - set(BATCH_OPTIONS))
    if unknown:
        raise ValueError(f"batch_audit_line: unknown options {unknown}; known: {', '.join(BATCH_OPTIONS)}")
    policies = options.get("rank_policies")
    if isinstance(policies, str):
        policies = parse_rank_policies(policies)  # a ValueError here is the caller's mistake, like an unknown key
    started = time.perf_counter()
    try:
        result = audit_lora_peft_dir(path, include_top_singular_values=options.get("top_singular_values", 0),
                                     adapter=options.get("adapter"), base_model=options.get("base_model"),
                                     base_norms=options.get("base_norms"),
                                     base_norms_cache=options.get("base_norms_cache"))
        if policies:
            result = with_rank_policies(result, policies)
        line = {"path": path, "ok": True, **result.to_summary_dict(include_layers=options.get("layers", False))}
    except AdapterFormatError as error:
        line = {"path": path, "ok": False, "error": str(error)}
    except OSError as error:  # a path the file system refuses (too long, a loop, no permission)
        line = {"path": path, "ok": False, "error": _os_error_text(error)}
    except Exception as error:  # noqa: BLE001 — one adapter's bug must not end a batch of thousands
        line = {"path": path, "ok": False, "error": f"internal error: {type(error).__name__}: {error}"}
    line["seconds"] = round(time.perf_counter() - started, 4)
    return line


def _os_error_text(error: OSError) -> str:
    name = error.filename if error.filename is not None else "a path"
    return f"{name}: {error.strerror or error}"


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when the batch's parent process dies (killed or crashed)."""
    try:  # Linux: the kernel sends SIGKILL when the parent exits
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # elsewhere: watch the parent from a thread
        import threading

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the guard was set
        os._exit(1)


def _batch_worker(connection: Any, path: str, options: Mapping[str, Any], parent_pid: int) -> None:
    """One adapter in its own process: its crash or hang costs only its own line."""
    _die_with_parent(parent_pid)
    try:
        os.dup2(2, 1)  # LAPACK messages must not reach the parent's JSONL stdout
    except OSError:
        pass
    connection.send(batch_audit_line(path, options))
    connection.close()


class _Running(NamedTuple):
    index: int
    path: str
    process: Any
    connection: Any
    started: float


def _worker_failure(running: _Running, reason: str) -> Dict[str, Any]:
    return {"path": running.path, "ok": False, "error": reason,
            "seconds": round(time.perf_counter() - running.started, 4)}


def _finished_line(running: _Running, timeout: Optional[float]) -> Optional[Dict[str, Any]]:
    """The worker's line if it has one, a failure line if it died or ran out of time, else None."""
    try:
        if running.connection.poll():
            line = running.connection.recv()
            running.process.join()
            return line
    except (EOFError, OSError):
        pass  # the worker died while sending: treated as a crash below
    if not running.process.is_alive():
        running.process.join()
        code = running.process.exitcode
        if code is not None and code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = f"signal {-code}"
            return _worker_failure(running, f"worker crashed ({signame}) while auditing this adapter")
        return _worker_failure(running, f"worker exited with code {code} without a result")
    if timeout is not None and time.perf_counter() - running.started > timeout:
        running.process.kill()
        running.process.join()
        return _worker_failure(running, f"timed out after {timeout:g} s (--timeout); worker stopped")
    return None


def _audit_in_workers(paths: Sequence[str], options: Mapping[str, Any], jobs: int, timeout: Optional[float],
                      emit: Callable[[int, Dict[str, Any]], None]) -> None:
    """Each adapter in a fresh worker process (forked where the platform allows),
    at most ``jobs`` at a time: a worker that crashes (SIGBUS, OOM kill) or
    runs past ``timeout`` becomes a failure line for its own input, and every
    other input still gets its line."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pending = list(enumerate(paths))[::-1]
    running: List[_Running] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                index, path = pending.pop()
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_batch_worker, args=(sender, path, options, os.getpid()),
                                          daemon=True)
                process.start()
                sender.close()
                running.append(_Running(index, path, process, receiver, time.perf_counter()))
            wait([r.connection for r in running] + [r.process.sentinel for r in running],
                 timeout=0.5 if timeout is not None else None)
            still = []
            for item in running:
                line = _finished_line(item, timeout)
                if line is None:
                    still.append(item)
                else:
                    item.connection.close()
                    emit(item.index, line)
            running = still
    finally:
        for item in running:  # interrupted: leave no worker behind
            item.process.kill()
            item.process.join()


def _refuse_in_batch(args: argparse.Namespace) -> None:
    """Flags that apply to one adapter are refused in batch mode, never dropped."""
    single = (("--weights", args.weights is not None), ("--adapter-config", args.adapter_config is not None),
              ("--html", args.html is not None), ("--append", args.append is not None),
              ("--top-wasteful", args.top_wasteful != 5))
    refused = [flag for flag, given in single if given]
    if refused:
        raise UsageError(f"{', '.join(refused)} {'applies' if len(refused) == 1 else 'apply'} to one adapter "
                         "and cannot be honoured in batch mode "
                         "(several PATHs or --jsonl); audit that adapter on its own")


def _run_batch(args: argparse.Namespace, paths: Sequence[str]) -> int:
    """Audit many adapters, one JSON line each (in the order they finish, with
    ``index`` = input position), continuing past failures; exit 1 if any failed."""
    _refuse_in_batch(args)
    if not paths:
        raise UsageError("batch mode needs at least one PATH")
    options = {"layers": args.layers, "top_singular_values": args.top_singular_values, "adapter": args.adapter,
               "rank_policies": parse_rank_policies(args.rank_policies), **_udr_options(args)}
    jobs = min(args.jobs, len(paths), MAX_JOBS)
    if args.jsonl:
        _check_output_file(args.jsonl, "--jsonl")
        try:
            output = open(args.jsonl, "w", encoding="utf-8")
        except OSError as error:
            raise UsageError(f"--jsonl {args.jsonl}: {error.strerror or error}") from None
    else:
        output = sys.stdout
    failures, done, started = 0, 0, time.perf_counter()

    def emit(index: int, line: Dict[str, Any]) -> None:
        nonlocal failures, done
        failures += not line["ok"]
        done += 1
        try:
            output.write(json.dumps({"index": index, **line}, allow_nan=False) + "\n")
            output.flush()
        except OSError as error:
            raise AdapterFormatError(f"{args.jsonl or 'stdout'}: cannot write ({error.strerror or error})") from None
        status = "ok" if line["ok"] else f"FAILED: {line['error']}"
        _progress(f"[{done}/{len(paths)}] {line['path']}: {status} ({line['seconds']:.2f} s; "
                  f"{time.perf_counter() - started:.1f} s elapsed)")

    try:
        _audit_in_workers(paths, options, jobs, args.timeout, emit)
    finally:
        if output is not sys.stdout:
            output.close()
    _progress(f"audited {len(paths) - failures}/{len(paths)} adapters" + (f" into {args.jsonl}" if args.jsonl else ""))
    return 1 if failures else 0


def _run_compare(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise UsageError("--top must be >= 0")
    paths = checkpoint_series(args.paths)
    if len(paths) < 2:
        raise UsageError("compare needs two paths, or a folder of checkpoint-N folders")
    check_base_paths(args)
    udr = _udr_options(args)
    with _stdout_fd_guarded():
        if len(paths) == 2:
            document = compare_adapters(paths[0], paths[1], overlaps=not args.no_overlap, **udr)
            render = functools.partial(render_comparison, top=args.top)
        else:
            document = training_drift(paths, overlaps=not args.no_overlap, **udr)
            render = render_drift
    # The text is rendered only when asked for: --json output never depends on the text renderer.
    print(json.dumps(document, indent=2, allow_nan=False) if args.json else render(document))
    return 0


def _run_resize(args: argparse.Namespace) -> int:
    if args.rank is not None and args.rank < 1:
        raise UsageError("--rank must be >= 1")
    if args.min_rank < 1 or (args.max_rank is not None and args.max_rank < args.min_rank):
        raise UsageError("need 1 <= --min-rank <= --max-rank")
    policy = None
    if args.policy is not None:
        try:
            policies = parse_rank_policies(args.policy)
        except ValueError as error:
            raise UsageError(f"--policy: {error}") from None
        if len(policies) != 1:
            raise UsageError("--policy takes one policy")
        policy = policies[0]
    report = resize_adapter(args.input, args.output, rank=args.rank, policy=policy, adapter=args.adapter,
                            dtype=args.dtype, min_rank=args.min_rank, max_rank=args.max_rank, force=args.force,
                            base_model=args.base_model, base_norms=args.base_norms,
                            base_norms_cache=args.base_norms_cache)
    print(json.dumps(report, indent=2, allow_nan=False) if args.json else render_resize_report(report))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``gradience-lite`` / ``python -m gradience_lite``; returns the exit code."""
    for stream in (sys.stdout, sys.stderr):  # a lone surrogate in a name must not end the report
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # not a TextIOWrapper (e.g. captured by a test harness)
            pass
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["norms"]:  # one console entry for pipx / uv tool installs: `norms` is base_norms' CLI
            import base_norms

            return base_norms.main(argv[1:], prog="gradience-lite norms")
        parser = build_parser()
        args = parser.parse_args(argv)
        args.command_line = "gradience-lite " + shlex.join(argv)  # recorded in the HTML report's header
        if args.command == "audit":
            return _run_audit(args)
        if args.command == "compare":
            return _run_compare(args)
        if args.command == "resize":
            return _run_resize(args)
        raise UsageError(f"a command is required: {', '.join(_command_names(parser))}")
    except (UsageError, AdapterFormatError, AuditTimeout) as error:
        print(f"gradience-lite: error: {terminal_safe(str(error))}", file=sys.stderr)
        return 2
    except SystemExit as exit_request:  # --help, --version, and base_norms' own argparse errors
        return exit_request.code if isinstance(exit_request.code, int) else int(exit_request.code is not None)
    except BrokenPipeError:  # `... | head` closed the pipe: not an error of ours
        return 0
    except OSError as error:  # the file system refused a path we were given (too long, a loop, no permission)
        print(f"gradience-lite: error: {terminal_safe(_os_error_text(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradience-lite: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 — the CLI promises one line, never a traceback
        print(f"gradience-lite: internal error: {type(error).__name__}: {terminal_safe(str(error))} "
              "(a bug in gradience-lite; please report it with the command line)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    # Run through the importable module, so there is one copy of its classes
    # (exceptions raised by base_norms are then the ones main() catches).
    from gradience_lite import main as _main

    sys.exit(_main())
