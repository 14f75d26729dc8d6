"""Real JAX and MLX arrays (bf16 and float32) audit to the file route's numbers.

Each test is skipped, with its reason shown by ``pytest -ra``, where its
framework is not installed (the main CI venvs have neither); torch is covered
by tests/test_training_loop.py.  Oracle: the same adapter audited from its
safetensors file, itself checked against dense SVD in test_core.
"""
import json

import numpy as np
import pytest

import gradience_lite as gl
from conftest import PEFT_FIXTURES, oracle_load

CASE = PEFT_FIXTURES / "llama_bf16_all_linear"
WEIGHTS = CASE / "adapter_model.safetensors"
CONFIG = json.loads((CASE / "adapter_config.json").read_text())


def document(result):
    summary = result.to_summary_dict(include_layers=True)
    summary.pop("weights_path")
    return json.dumps(summary, sort_keys=True)


def float32_values():
    """The file's bf16 values, exactly, as float32 (bf16 → float32 is exact)."""
    return {name: values.astype(np.float32) for name, values in oracle_load(WEIGHTS).items()}


def audited(tensors):
    return gl.audit_lora_state_dict(tensors, CONFIG, include_top_singular_values=8)


def test_jax_bf16_and_float32_arrays_audit_to_the_files_numbers():
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed")
    expected = document(audited(WEIGHTS))
    bf16 = {name: jnp.asarray(values).astype(jnp.bfloat16) for name, values in float32_values().items()}
    assert str(next(iter(bf16.values())).dtype) == "bfloat16"
    assert document(audited(bf16)) == expected
    float32 = audited({name: jnp.asarray(values) for name, values in float32_values().items()})
    assert {layer.dtype for layer in float32.layers} == {"F32"}
    assert document(float32) == expected.replace('"dtype": "BF16"', '"dtype": "F32"')


def test_mlx_bf16_arrays_audit_to_the_files_numbers():
    mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
    bf16 = {name: mx.array(values).astype(mx.bfloat16) for name, values in float32_values().items()}
    with pytest.raises(Exception):
        np.asarray(next(iter(bf16.values())))  # NumPy cannot read MLX bf16: MLX's own astype is needed
    assert document(audited(bf16)) == document(audited(WEIGHTS))
