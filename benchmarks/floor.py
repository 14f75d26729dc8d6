"""The NumPy floor: the least work any r×r-route auditor must do.

Reads the header, then for every lora_A / lora_B tensor decodes bf16 to
float64, builds its r×r Gram matrix and runs one r×r eigh.  No validation, no
report, no JSON beyond a count.  Run: python benchmarks/floor.py ADAPTER_DIR
"""
import json
import mmap
import struct
import sys

import numpy as np

path = sys.argv[1] + "/adapter_model.safetensors"
with open(path, "rb") as handle:
    (size,) = struct.unpack("<Q", handle.read(8))
    header = json.loads(handle.read(size))
    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
header.pop("__metadata__", None)
count = 0
for name, entry in header.items():
    start, end = entry["data_offsets"]
    raw = np.frombuffer(mapped, dtype="<u2", count=(end - start) // 2, offset=8 + size + start)
    values = (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64).reshape(entry["shape"])
    gram = values @ values.T if ".lora_A." in name else values.T @ values
    np.linalg.eigh(gram)
    count += 1
print(count)
