"""Integration of the base side (base_norms: GGUF, dequantizers) with the auditor's UDR: norms provenance
for GGUF bases, VeRA's in_features from a quantized/GGUF base, PEFT target_parameters experts against
their base, DoRA's effective UDR over a quantized W₀.

Oracles: the truths recorded by tools/ from the live libraries (tests/fixtures/quantized/expected.json:
gguf-py / bitsandbytes dequantization + float64 SVD; tests/fixtures/variants/*/expected.json: PEFT's own
ΔW), and dense float64 SVDs of base tensors as the libraries saved them.  No torch here.
"""
import json

import numpy as np
import pytest

import base_norms as bn
import gradience_lite as gl
from conftest import FIXTURES, oracle_load

QUANTIZED = FIXTURES / "quantized"
VARIANTS = FIXTURES / "variants"
QUANTIZED_TRUTH = json.loads((QUANTIZED / "expected.json").read_text())
GGUF = QUANTIZED / "gguf_llama" / "model.gguf"
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _q_proj_adapter(tmp_adapter, shape):
    rng = np.random.default_rng(5)
    return tmp_adapter({f"base_model.model.{Q_PROJ}.lora_A.weight": rng.standard_normal((2, shape[1])).astype(np.float32),
                        f"base_model.model.{Q_PROJ}.lora_B.weight": rng.standard_normal((shape[0], 2)).astype(np.float32)},
                       {"r": 2, "lora_alpha": 2, "peft_type": "LORA"})


# ── 1. norms provenance for a GGUF base ─────────────────────────────────────

def _norms_with_sentinel(base, path):
    document = bn.compute_base_norms(base, [Q_PROJ + ".weight"])
    document["norms"][Q_PROJ + ".weight"]["sigma_max"] = 1000.0  # a value only this file holds
    bn.save_norms(path, document)
    return path


def test_a_norms_file_of_the_same_gguf_base_is_trusted(tmp_path, tmp_adapter):
    truth = QUANTIZED_TRUTH["gguf_llama"]["weights"][Q_PROJ + ".weight"]
    norms = _norms_with_sentinel(GGUF, tmp_path / "own.json")
    result = gl.audit_lora_peft_dir(_q_proj_adapter(tmp_adapter, truth["shape"]), base_model=str(GGUF),
                                    base_norms=str(norms))
    assert [layer.base_sigma_max for layer in result.layers] == [1000.0]
    assert not [issue for issue in result.issues if issue.startswith("udr")]
    assert result.to_summary_dict()["base_norms_verified"] is True


def test_a_norms_file_of_another_gguf_is_refused_and_recomputed(tmp_path, tmp_adapter):
    # Another GGUF of the same size and tensors: one metadata key differs, so its header (and fingerprint) does.
    other = tmp_path / "other" / "model.gguf"
    other.parent.mkdir()
    raw = GGUF.read_bytes()
    assert raw.count(b"llama.context_length") == 1
    other.write_bytes(raw.replace(b"llama.context_length", b"llama.context_lengtX"))
    norms = _norms_with_sentinel(other, tmp_path / "foreign.json")
    truth = QUANTIZED_TRUTH["gguf_llama"]["weights"][Q_PROJ + ".weight"]
    result = gl.audit_lora_peft_dir(_q_proj_adapter(tmp_adapter, truth["shape"]), base_model=str(GGUF),
                                    base_norms=str(norms))
    (issue,) = [issue for issue in result.issues if "--base-norms" in issue]
    assert "was not computed from --base-model" in issue and "fingerprints differ for model.gguf" in issue
    # recomputed from the base: gguf-py's dequantization + float64 SVD
    assert [layer.base_sigma_max for layer in result.layers] == [pytest.approx(truth["sigma_max"], rel=1e-5)]


# ── 2. VeRA's in_features from a quantized (GGUF) base ─────────────────────

VERA_GGUF = VARIANTS / "peft_vera" / "base_gguf"


@pytest.mark.parametrize("how", ["base_model", "base_norms"])
def test_vera_reads_in_features_from_a_gguf_base_logical_shape(tmp_path, how):
    from test_variants_tuners import assert_matches_truth

    base_truth = json.loads((VERA_GGUF / "expected.json").read_text())  # gguf-py dequantization + float64 SVD
    if how == "base_norms":
        norms = tmp_path / "norms.json"
        assert bn.main([str(VERA_GGUF / "model.gguf"), "--out", str(norms), "--quiet"]) == 0
        options = {"base_norms": str(norms)}
    else:
        options = {"base_model": str(VERA_GGUF / "model.gguf")}
    truth = json.loads((VARIANTS / "peft_vera" / "expected.json").read_text())["modules"]  # PEFT's forward ΔW
    result = gl.audit_lora_peft_dir(VARIANTS / "peft_vera", include_top_singular_values=10_000, **options)
    assert {layer.name for layer in result.layers} == set(truth)
    assert not [issue for issue in result.issues if issue.startswith("vera")]
    storages = set()
    for layer in result.layers:
        assert_matches_truth(layer, truth[layer.name])
        base = base_truth[layer.name + ".weight"]
        storages.add(base["storage"])
        assert layer.base_sigma_max == pytest.approx(base["sigma_max"], rel=1e-5)
        assert layer.udr == pytest.approx(truth[layer.name]["sigma_max"] / base["sigma_max"], rel=1e-5)
    assert storages == {"gguf-Q8_0", "gguf-F16"}  # storage names, not safetensors float dtypes


# ── 3. PEFT target_parameters experts against their base ───────────────────

GPT_OSS = VARIANTS / "field_moe_gptoss"


def test_target_parameters_experts_get_the_sigma_of_their_own_slice_of_the_base():
    truth = json.loads((GPT_OSS / "expected.json").read_text())["modules"]  # PEFT's parametrized parameter − stored
    saved = oracle_load(GPT_OSS / "base" / "model.safetensors")  # as transformers saved it: (E, in, out)
    result = gl.audit_lora_peft_dir(GPT_OSS, base_model=str(GPT_OSS / "base"))
    assert not [issue for issue in result.issues if issue.startswith("udr")]
    experts = [layer for layer in result.layers if layer.name.endswith("]")]
    assert {layer.name for layer in experts} == {name for name in truth if name.endswith("]")}
    assert len(experts) == 8
    for layer in experts:
        parameter, index = layer.name[:-1].split("[")
        expert_slice = saved[parameter][int(index)].astype(np.float64)
        base_sigma = np.linalg.svd(expert_slice, compute_uv=False)[0]
        assert layer.base_sigma_max == pytest.approx(base_sigma, rel=1e-6)
        assert layer.base_fro_norm == pytest.approx(np.linalg.norm(expert_slice), rel=1e-6)
        assert layer.delta_sigma_max == pytest.approx(truth[layer.name]["sigma_max"], rel=1e-6)
        assert layer.udr == pytest.approx(truth[layer.name]["sigma_max"] / base_sigma, rel=1e-6)
    # the experts differ: a slice mix-up would show
    sigmas = [layer.base_sigma_max for layer in experts]
    assert len({round(s, 6) for s in sigmas}) == len(sigmas)


# ── 4. DoRA's effective UDR over a quantized W₀ ─────────────────────────────

DORA_BNB = FIXTURES / "udr" / "dora_bnb_fp4"


def test_dora_effective_udr_over_a_bitsandbytes_4bit_base_matches_peft():
    """PEFT DoRA trained on the bnb FP4 base: W₀ is bitsandbytes' dequantize_4bit, as PEFT's DoRA uses it."""
    document = json.loads((DORA_BNB / "expected.json").read_text())
    truths = document["modules"]
    result = gl.audit_lora_peft_dir(DORA_BNB / "adapter", base_model=str(FIXTURES / document["base"].split("fixtures/")[1]))
    assert not [issue for issue in result.issues if issue.startswith("udr")]
    assert {layer.name for layer in result.layers} == set(truths)
    for layer in result.layers:
        truth = truths[layer.name]
        assert layer.base_sigma_max == pytest.approx(truth["base_sigma_max"], rel=1e-6)
        assert layer.delta_sigma_max == pytest.approx(truth["plain_sigma_max"], rel=1e-6)
        assert layer.dora_effective_sigma_max == pytest.approx(truth["dora_effective_sigma_max"], rel=1e-6)
        assert layer.udr_dora_effective == pytest.approx(truth["udr_dora_effective"], rel=1e-6)
        # bitsandbytes' own (CPU, rounded) forward of the same DoRA layer: within its recorded rounding
        assert layer.dora_effective_sigma_max == pytest.approx(truth["bnb_cpu_forward_sigma_max"], rel=5e-3)
        for key in ("mean", "min", "max", "std"):
            assert layer.dora_magnitude_change[key] == pytest.approx(truth["magnitude_change"][key], rel=1e-6, abs=1e-9)


def test_dora_effective_udr_over_a_gguf_base_reads_the_dequantized_w0(tmp_adapter):
    # PEFT cannot train on a GGUF file, so there is no library run to record; what is checked is that W₀ is
    # gguf-py's dequantization (its σ is the recorded truth) and that the effective update is PEFT's DoRA
    # formula over it (the formula itself is checked against PEFT's forward in test_udr_bases).
    truth = QUANTIZED_TRUTH["gguf_llama"]["weights"][Q_PROJ + ".weight"]
    rows, columns = truth["shape"]
    found = bn.catalog(bn.resolve_base(GGUF))
    w0 = bn.load_weight(found, found.weights[Q_PROJ + ".weight"]).astype(np.float64)
    assert np.linalg.svd(w0, compute_uv=False)[0] == pytest.approx(truth["sigma_max"], rel=1e-6)  # = gguf-py's
    rng = np.random.default_rng(9)
    a = (rng.standard_normal((2, columns)) * 0.1).astype(np.float32)
    b = (rng.standard_normal((rows, 2)) * 0.01).astype(np.float32)
    plain = b.astype(np.float64) @ a.astype(np.float64)
    magnitude = (np.linalg.norm(w0 + plain, axis=1) * (1 + 0.2 * rng.standard_normal(rows))).astype(np.float32)
    adapter = tmp_adapter({f"base_model.model.{Q_PROJ}.lora_A.weight": a, f"base_model.model.{Q_PROJ}.lora_B.weight": b,
                           f"base_model.model.{Q_PROJ}.lora_magnitude_vector": magnitude},
                          {"r": 2, "lora_alpha": 2, "peft_type": "LORA", "use_dora": True})
    (layer,) = gl.audit_lora_peft_dir(adapter, base_model=str(GGUF)).layers
    effective = magnitude[:, None].astype(np.float64) * (w0 + plain) / np.linalg.norm(w0 + plain, axis=1)[:, None] - w0
    assert layer.dora_effective_sigma_max == pytest.approx(np.linalg.svd(effective, compute_uv=False)[0], rel=1e-5)
