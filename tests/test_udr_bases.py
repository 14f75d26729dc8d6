"""UDR against the bases people have: diffusion layouts, bases of the wrong size, DoRA, MoE experts, and
norms files from another base.

Truths come from tests/fixtures/udr/expected.json, written by tools/make_udr_fixtures.py from the live
libraries (LyCORIS's own ΔW and module mapping, PEFT's DoRA merge, transformers' saved bases) with dense
float64 SVDs; the PEFT LoRA oracle is conftest's dense ΔW.  No torch here.
"""
import json
import math

import numpy as np
import pytest

import base_norms as bn
import gradience_lite as gl
from conftest import FIXTURES, PEFT_FIXTURES, fixture_deltas, oracle_load, peft_cases, write_safetensors

UDR = FIXTURES / "udr"
EXPECTED = json.loads((UDR / "expected.json").read_text())
DIFFUSION = EXPECTED["diffusion"]
REL = 1e-6


def udr_issues(result):
    return [issue for issue in result.issues if issue.startswith("udr")]


def assert_matches_truth(layer, truth):
    """UDR, base σ and ‖W‖_F equal the library's ΔW and the very base weight it adapts."""
    assert layer.delta_shape == tuple(truth["delta_shape"])
    assert layer.base_sigma_max == pytest.approx(truth["base_sigma_max"], rel=REL)
    assert layer.base_fro_norm == pytest.approx(truth["base_fro_norm"], rel=1e-9)  # tells same-shape weights apart
    assert layer.udr == pytest.approx(truth["delta_sigma_max"] / truth["base_sigma_max"], rel=REL)


# ── diffusion names ─────────────────────────────────────────────────────────

@pytest.mark.parametrize("adapter", ["kohya_sd15", "kohya_sdxl"])
def test_kohya_names_match_the_diffusers_pipeline_folders(adapter):
    result = gl.audit_lora_peft_dir(UDR / adapter, base_model=str(UDR / "sd_pipeline"))
    assert udr_issues(result) == []
    truths = DIFFUSION[adapter]
    assert {layer.name for layer in result.layers} == set(truths)
    for layer in result.layers:
        assert_matches_truth(layer, truths[layer.name])
    assert result.to_summary_dict()["base_norms_verified"] is True


def test_lora_te1_and_lora_te2_go_to_their_own_encoders_even_with_equal_shapes():
    result = gl.audit_lora_peft_dir(UDR / "kohya_sdxl", base_model=str(UDR / "sd_pipeline"))
    by_name = {layer.name: layer for layer in result.layers}
    te1 = by_name["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    te2 = by_name["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    assert te1.delta_shape == te2.delta_shape
    assert DIFFUSION["kohya_sdxl"][te1.name]["component"] == "text_encoder"
    assert DIFFUSION["kohya_sdxl"][te2.name]["component"] == "text_encoder_2"
    assert te1.base_fro_norm != pytest.approx(te2.base_fro_norm, rel=1e-3)
    assert_matches_truth(te1, DIFFUSION["kohya_sdxl"][te1.name])
    assert_matches_truth(te2, DIFFUSION["kohya_sdxl"][te2.name])


def test_sd15_kohya_against_an_ldm_single_file_matches_the_text_encoder_and_refuses_the_unet():
    result = gl.audit_lora_peft_dir(UDR / "kohya_sd15", base_model=str(UDR / "sd_single_file" / "sd15_like.safetensors"))
    truths = DIFFUSION["kohya_sd15"]
    issues = udr_issues(result)
    for layer in result.layers:
        if truths[layer.name]["component"] == "text_encoder":  # cond_stage_model.transformer.text_model.…
            assert_matches_truth(layer, truths[layer.name])
        else:
            assert layer.udr is None
            mine = [issue for issue in issues if issue.startswith(f"udr: {layer.name}:")]
            assert len(mine) == 1 and "no base weight named like it" in mine[0], mine
    hint = [issue for issue in issues if "original-layout single file" in issue]
    unet_modules = sum(truth["component"] == "unet" for truth in truths.values())
    assert len(hint) == 1 and hint[0].startswith(f"udr: {unet_modules} kohya unet modules use diffusers names")


def test_sdxl_kohya_with_original_layout_names_matches_the_single_file():
    # sd-scripts' SDXL UNet is the original architecture: lora_unet_input_blocks_1_1_proj_in.
    result = gl.audit_lora_peft_dir(UDR / "kohya_sdxl_ldm", base_model=str(UDR / "sd_single_file" / "sdxl_like.safetensors"))
    truths = DIFFUSION["kohya_sdxl_ldm"]
    assert any(name.startswith("lora_unet_input_blocks_") for name in truths)
    for layer in result.layers:
        if truths[layer.name]["component"] == "text_encoder_2":  # CLIP-G is not in this single file
            assert layer.udr is None
            assert len([i for i in udr_issues(result) if i.startswith(f"udr: {layer.name}:")]) == 1
        else:
            assert_matches_truth(layer, truths[layer.name])


def test_original_layout_names_are_refused_against_the_diffusers_unet():
    result = gl.audit_lora_peft_dir(UDR / "kohya_sdxl_ldm", base_model=str(UDR / "sd_pipeline"))
    for layer in result.layers:
        if layer.name.startswith("lora_unet_"):
            assert layer.udr is None
        else:
            assert_matches_truth(layer, DIFFUSION["kohya_sdxl_ldm"][layer.name])


def test_lycoris_names_on_an_arbitrary_model_match_under_a_wrapper_prefix():
    result = gl.audit_lora_peft_dir(UDR / "lycoris_convnet", base_model=str(UDR / "lycoris_convnet_base"))
    truths = EXPECTED["lycoris_convnet"]
    assert udr_issues(result) == [] and {layer.name for layer in result.layers} == set(truths)
    for layer in result.layers:  # includes a conv kernel flattened to (out, in·k·k)
        assert_matches_truth(layer, truths[layer.name])


def test_underscore_ambiguity_is_reported_never_guessed():
    matches, issues = gl.match_base_parameters(
        ["lycoris_a_b_c", "lora_unet_mid_block_proj", "lora_unet_up_proj"],
        ["a_b.c.weight", "a.b_c.weight", "unet.mid_block.proj.weight", "transformer.mid_block.proj.weight",
         "unet.up.proj.weight"])
    assert matches == {"lora_unet_up_proj": "unet.up.proj.weight"}
    assert any("lycoris_a_b_c: ambiguous base weight (a.b_c.weight, a_b.c.weight)" in issue for issue in issues)
    assert any("lora_unet_mid_block_proj: ambiguous" in issue for issue in issues)


def test_diffusers_adapter_names_match_the_pipeline_components(tmp_path):
    # A diffusers LoRA names modules "<component>.<path>": the pipeline's parameters are named the same way.
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 16)), rng.standard_normal((16, 2))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_safetensors(adapter / "pytorch_lora_weights.safetensors", {
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": a,
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": b},
        metadata={"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 2})})
    result = gl.audit_lora_peft_dir(adapter, base_model=str(UDR / "sd_pipeline"))
    (layer,) = result.layers
    base = oracle_load(UDR / "sd_pipeline" / "text_encoder_2" / "model.safetensors")[
        "text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert layer.base_sigma_max == pytest.approx(np.linalg.svd(base, compute_uv=False)[0], rel=REL)
    assert layer.udr == pytest.approx(np.linalg.norm(b @ a, 2) / np.linalg.norm(base, 2), rel=REL)


def test_pipeline_norms_cache_is_reused_per_component(tmp_path):
    cache = tmp_path / "cache.json"
    base = str(UDR / "sd_pipeline")
    first = gl.audit_lora_peft_dir(UDR / "kohya_sdxl", base_model=base, base_norms_cache=str(cache))
    document = json.loads(cache.read_text())
    assert "text_encoder_2/model.safetensors" in document["files"]
    name = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight"
    document["norms"][name]["sigma_max"] = 1000.0  # sentinel: only a reused record can carry it
    cache.write_text(json.dumps(document))
    second = gl.audit_lora_peft_dir(UDR / "kohya_sdxl", base_model=base, base_norms_cache=str(cache))
    by_name = {layer.name: layer.base_sigma_max for layer in second.layers}
    assert by_name["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"] == 1000.0
    assert by_name["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == pytest.approx(
        {layer.name: layer.base_sigma_max for layer in first.layers}["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"])


# ── the shape and storage guard ─────────────────────────────────────────────

def test_a_gqa_base_with_other_kv_heads_is_caught_and_the_rest_still_computed():
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=str(UDR / "llama_gqa_1kv"))
    truths = EXPECTED["mismatched_bases"]["llama_gqa_1kv"]
    deltas = fixture_deltas(PEFT_FIXTURES / "llama_fp32_qv")
    for layer in result.layers:
        mine = [issue for issue in result.issues if issue.startswith(f"udr: {layer.name}:")]
        if layer.name.endswith("v_proj"):  # 1 KV head × 8 = 8 rows, the adapter's base had 16
            assert layer.udr is None and len(mine) == 1
            assert "has shape [8, 32] but the update ΔW is [16, 32]" in mine[0]
        else:
            assert mine == []
            truth = truths[layer.name]
            assert layer.udr == pytest.approx(np.linalg.norm(deltas[layer.name][0], 2) / truth["sigma_max"], rel=REL)


def test_a_base_of_another_hidden_size_is_refused_for_every_module():
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=str(UDR / "llama_wide"))
    assert all(layer.udr is None for layer in result.layers)
    for layer in result.layers:
        (issue,) = [issue for issue in result.issues if issue.startswith(f"udr: {layer.name}:")]
        base_shape = EXPECTED["mismatched_bases"]["llama_wide"][layer.name]["shape"]
        assert f"has shape {base_shape} but the update ΔW is {list(layer.delta_shape)}" in issue
    assert result.to_summary_dict()["n_layers_with_udr"] == 0


def _llama_base_copy(tmp_path, replace):
    """tests/fixtures/base/llama_fp32 with some tensors replaced (name → (array, safetensors dtype) or None: removed)."""
    tensors = oracle_load(FIXTURES / "base" / "llama_fp32" / "model.safetensors")
    tensors = {name: value.astype(np.float32) for name, value in tensors.items()}
    overrides = {}
    for name, stored in replace.items():
        if stored is None:
            del tensors[name]
            continue
        tensors[name], overrides[name] = stored
    folder = tmp_path / "base"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", tensors, dtype_override=overrides)
    return folder


def test_integer_storage_is_never_read_as_a_weight(tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    base = _llama_base_copy(tmp_path, {name: (np.ones((32, 32), np.int8), "I8")})
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=str(base))
    layer = {layer.name: layer for layer in result.layers}["model.layers.0.self_attn.q_proj"]
    assert layer.udr is None
    (issue,) = [i for i in result.issues if i.startswith("udr: model.layers.0.self_attn.q_proj:")]
    assert "stored as I8" in issue


V_PROJ = "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize("stored,named,dequantized_sigma", [
    # FP8 with 128×128 block scales (DeepSeek-V3 layout): W = E4M3 value (0x38 = 1.0) × scale_inv (4).
    ({V_PROJ + ".weight": (np.full((16, 32), 0x38, np.uint8), "F8_E4M3"),
      V_PROJ + ".weight_scale_inv": (np.full((1, 1), 4.0, np.float32), "F32")}, "weight_scale_inv",
     4.0 * math.sqrt(16 * 32)),
    # compressed-tensors pack-quantized without its config: no plain weight, only packed int32 words and scales.
    ({V_PROJ + ".weight": None, V_PROJ + ".weight_packed": (np.zeros((16, 4), np.int32), "I32"),
      V_PROJ + ".weight_scale": (np.ones((16, 1), np.float32), "F32")}, "weight_packed", None),
])
def test_a_quantized_weight_is_never_read_raw(tmp_path, stored, named, dequantized_sigma):
    """Refused (naming the companions when the base side lists them), or — where the base side decodes
    the format — its dequantized σ; never the raw stored numbers."""
    base = _llama_base_copy(tmp_path, stored)
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=str(base))
    layer = {layer.name: layer for layer in result.layers}[V_PROJ]
    mine = [i for i in result.issues if i.startswith(f"udr: {V_PROJ}:") or f"{V_PROJ}.weight" in i]
    if layer.udr is None:
        assert len(mine) == 1, mine
        if any(name.endswith("." + named) for name in bn.list_parameters(bn.resolve_base(base))):
            assert "quantized" in mine[0] and named in mine[0], mine
    else:
        assert dequantized_sigma is not None and mine == []
        assert layer.base_sigma_max == pytest.approx(dequantized_sigma, rel=REL)


@pytest.mark.parametrize("case", peft_cases(), ids=lambda case: case.relative_to(PEFT_FIXTURES).as_posix())
def test_delta_shape_is_the_shape_of_the_update_peft_forms(case):
    result = gl.audit_lora_peft_dir(case.parent, adapter=case.name) if case.parent != PEFT_FIXTURES else \
        gl.audit_lora_peft_dir(case)
    deltas = fixture_deltas(case)
    assert {layer.name: layer.delta_shape for layer in result.layers} == \
        {name: deltas[name][0].shape for name in deltas}


# peft_vera_no_projection is refused as a whole (its shared projections were not saved): no ΔW to shape.
VARIANTS = sorted(path.parent for path in (FIXTURES / "variants").glob("*/expected.json")
                  if path.parent.name != "peft_vera_no_projection"
                  and any("shape" in row for row in json.loads(path.read_text()).get("modules", {}).values()))


@pytest.mark.parametrize("case", VARIANTS, ids=lambda case: case.name)
def test_delta_shape_is_the_shape_of_peft_tuners_own_delta_weight(case):
    # expected.json records the shape of ΔW as the tuner's get_delta_weight formed it (LoHa, LoKr, AdaLoRA…).
    modules = json.loads((case / "expected.json").read_text())["modules"]
    base = case / "base"  # VeRA reads in_features from its base
    result = gl.audit_lora_peft_dir(case, base_model=str(base) if base.is_dir() else None)
    shapes = {layer.name: layer.delta_shape for layer in result.layers}
    assert shapes and {name: shapes[name] for name in modules if name in shapes} == \
        {name: tuple(row["shape"]) for name, row in modules.items() if name in shapes}


def test_transposed_storage_is_accepted_only_when_the_config_says_so():
    shape = (24, 72)  # GPT-2 c_attn stores (in, out); ΔW is (out, in) = (72, 24)
    weight = gl.BaseWeight(shape, "F32")
    assert gl.base_weight_problem("c_attn", "c_attn.weight", (72, 24), weight, transposed_storage=True) is None
    problem = gl.base_weight_problem("c_attn", "c_attn.weight", (72, 24), weight, transposed_storage=False)
    assert "has shape [24, 72] but the update ΔW is [72, 24]" in problem


# ── DoRA ────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("case", ["dora_llama", "dora_gpt2", "dora_conv"])
def test_dora_effective_udr_matches_peft_merge(case):
    result = gl.audit_lora_peft_dir(UDR / case / "adapter", base_model=str(UDR / case / "base"))
    truths = EXPECTED["dora"][case]
    assert udr_issues(result) == [] and {layer.name for layer in result.layers} == set(truths)
    for layer in result.layers:
        truth = truths[layer.name]
        assert layer.udr == pytest.approx(truth["udr"], rel=REL)  # the plain s·B·A
        assert layer.dora_effective_sigma_max == pytest.approx(truth["dora_effective_sigma_max"], rel=REL)
        assert layer.udr_dora_effective == pytest.approx(truth["udr_dora_effective"], rel=REL)
        for key in ("mean", "min", "max", "std"):
            assert layer.dora_magnitude_change[key] == pytest.approx(truth["magnitude_change"][key], rel=1e-9, abs=1e-12)
    row = result.to_summary_dict(include_layers=True)["layers"][0]
    assert {"udr_dora_effective", "dora_effective_sigma_max", "dora_magnitude_change", "delta_shape"} <= set(row)


@pytest.mark.parametrize("case", ["lycoris_dora_out", "lycoris_dora_in"])
def test_lycoris_dora_per_output_row_or_input_column_matches_lycoris_merge(case):
    result = gl.audit_lora_peft_dir(UDR / case, base_model=str(UDR / case / "base"))
    truths = EXPECTED["lycoris_dora"][case]
    assert {layer.name for layer in result.layers} == set(truths)
    for layer in result.layers:
        truth = truths[layer.name]
        mine = [issue for issue in udr_issues(result) if issue.startswith(f"udr: {layer.name}:")]
        assert layer.base_sigma_max == pytest.approx(truth["base_sigma_max"], rel=REL)
        if truth["dora_scale_shape"] == [1, 3, 1, 1]:  # a conv normalised per input channel: several columns
            assert layer.udr_dora_effective is None and len(mine) == 1 and "fits neither" in mine[0]
        else:
            assert mine == []
            assert layer.udr_dora_effective == pytest.approx(truth["udr_dora_effective"], rel=REL)


def test_dora_effective_udr_needs_the_base_weights_not_just_norms(tmp_path):
    norms = tmp_path / "norms.json"
    bn.save_norms(norms, bn.compute_base_norms(UDR / "dora_llama" / "base"))
    result = gl.audit_lora_peft_dir(UDR / "dora_llama" / "adapter", base_norms=str(norms))
    assert all(layer.udr is not None and layer.udr_dora_effective is None for layer in result.layers)
    assert len([i for i in result.issues if "effective DoRA update needs W₀" in i]) == len(result.layers)


def test_dora_effective_udr_reads_w0_from_a_pipeline_component(tmp_path):
    # The pipeline names the weight "text_encoder_2.<parameter>"; W₀ is read from text_encoder_2/model.safetensors.
    module = "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"
    w0 = oracle_load(UDR / "sd_pipeline" / "text_encoder_2" / "model.safetensors")["text_model.encoder.layers.0.mlp.fc1.weight"]
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, w0.shape[1])) * 0.3, rng.standard_normal((w0.shape[0], 2)) * 0.3
    magnitude = np.linalg.norm(w0, axis=1) * (1 + 0.1 * rng.standard_normal(w0.shape[0]))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_safetensors(adapter / "pytorch_lora_weights.safetensors", {
        module + ".lora_A.weight": a, module + ".lora_B.weight": b, module + ".lora_magnitude_vector.weight": magnitude},
        metadata={"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 4, "use_dora": True})})
    (layer,) = gl.audit_lora_peft_dir(adapter, base_model=str(UDR / "sd_pipeline")).layers
    adapted = w0 + 2.0 * b @ a
    effective = (magnitude / np.linalg.norm(adapted, axis=1))[:, None] * adapted - w0  # DoRA, as PEFT merges it
    assert layer.udr_dora_effective == pytest.approx(np.linalg.norm(effective, 2) / np.linalg.norm(w0, 2), rel=REL)


def test_dora_operator_never_forms_the_update_yet_equals_it():
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((20, 12)).astype(np.float32)
    a, b, scale = rng.standard_normal((3, 12)), rng.standard_normal((20, 3)), 0.7
    magnitude = np.linalg.norm(w0, axis=1) * (1 + 0.1 * rng.standard_normal(20))
    adapted = w0.astype(np.float64) + scale * b @ a
    columns = np.linalg.norm(w0, axis=0) * (1 + 0.1 * rng.standard_normal(12))
    for operator, dense in (
            (gl.DoraUpdate(w0, a, b, scale, magnitude),
             (magnitude / np.linalg.norm(adapted, axis=1))[:, None] * adapted - w0),
            (gl.DoraUpdate(w0, a, b, scale, columns, per="column", epsilon=1e-3),
             adapted * (columns / (np.linalg.norm(adapted, axis=0) + 1e-3))[None, :] - w0)):
        vector, other = rng.standard_normal(12), rng.standard_normal(20)
        assert np.allclose(operator.matvec(vector), dense @ vector, rtol=1e-6, atol=1e-6)
        assert np.allclose(operator.rmatvec(other), dense.T @ other, rtol=1e-6, atol=1e-6)
        assert bn.spectral_norm(operator).sigma_max == pytest.approx(np.linalg.norm(dense, 2), rel=REL)


# ── MoE experts ─────────────────────────────────────────────────────────────

@pytest.mark.parametrize("base", ["mlx_fused_base", "mlx_per_expert_base"])
def test_mlx_switch_experts_take_their_own_base_expert(base):
    result = gl.audit_lora_peft_dir(FIXTURES / "formats" / "mlx_lm", base_model=str(UDR / base))
    truth = EXPECTED["moe"]["mlx_gate_proj"]
    experts = [layer for layer in result.layers if "[" in layer.name]
    assert len(experts) == 3 and udr_issues(result) == []
    for layer in experts:
        index = int(layer.name[-2])
        assert layer.base_sigma_max == pytest.approx(truth["sigma_max"][index], rel=REL)
        assert layer.base_fro_norm == pytest.approx(truth["fro_norm"][index], rel=1e-9)
        assert layer.udr == pytest.approx(layer.delta_sigma_max / truth["sigma_max"][index], rel=REL)


def test_gpt_oss_fused_experts_stored_in_by_out_are_sliced_per_expert():
    parameter = "model.layers.0.mlp.experts.gate_up_proj"
    truth = EXPECTED["moe"]["gpt_oss"][parameter]
    assert truth["shape"] == [4, 32, 48]  # (E, in, out): gpt-oss's storage
    modules = [f"{parameter}[{e}]" for e in range(4)]
    lookup = gl.collect_base_norms(modules, base_model=str(UDR / "gpt_oss_base"),
                                   delta_shapes={module: (48, 32) for module in modules})
    assert lookup.issues == []
    for e, module in enumerate(modules):
        assert lookup.norms[module][0] == pytest.approx(truth["sigma_max"][e], rel=REL)
        assert lookup.norms[module][1] == pytest.approx(truth["fro_norm"][e], rel=1e-9)


def test_an_expert_of_the_wrong_size_is_refused_naming_both_shapes():
    module = "model.layers.0.mlp.experts.down_proj[2]"
    lookup = gl.collect_base_norms([module], base_model=str(UDR / "gpt_oss_base"), delta_shapes={module: (32, 40)})
    assert lookup.norms == {}
    (issue,) = lookup.issues
    assert "model.layers.0.mlp.experts.down_proj[2] has shape [24, 32] but the update ΔW is [32, 40]" in issue


def test_per_expert_weights_are_found_for_an_expert_index():
    modules = [f"model.layers.0.block_sparse_moe.experts.w1[{e}]" for e in range(4)]
    lookup = gl.collect_base_norms(modules, base_model=str(UDR / "mixtral_base"),
                                   delta_shapes={module: (24, 32) for module in modules})
    assert lookup.issues == []
    for e, module in enumerate(modules):
        truth = EXPECTED["moe"]["mixtral"][f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"]
        assert lookup.norms[module][0] == pytest.approx(truth["sigma_max"][0], rel=REL)


# ── norms provenance ────────────────────────────────────────────────────────

def _base_oracle(base, module):
    weights = oracle_load(FIXTURES / "base" / base / "model.safetensors")
    return np.linalg.svd(weights[module + ".weight"], compute_uv=False)[0]


def test_a_norms_file_from_another_base_is_not_used_with_base_model(tmp_path):
    foreign = tmp_path / "foreign.json"
    bn.save_norms(foreign, bn.compute_base_norms(UDR / "llama_gqa_1kv"))
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=str(FIXTURES / "base" / "llama_fp32"),
                                    base_norms=str(foreign))
    (issue,) = [i for i in result.issues if "--base-norms" in i]
    assert "was not computed from --base-model" in issue and "fingerprints differ" in issue
    for layer in result.layers:
        assert layer.base_sigma_max == pytest.approx(_base_oracle("llama_fp32", layer.name), rel=REL)
    assert result.to_summary_dict()["base_norms_verified"] is True


def test_a_norms_file_of_the_same_base_is_used(tmp_path):
    own = tmp_path / "own.json"
    document = bn.compute_base_norms(FIXTURES / "base" / "llama_fp32")
    document["norms"]["model.layers.0.self_attn.q_proj.weight"]["sigma_max"] = 1000.0  # sentinel
    bn.save_norms(own, document)
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=str(FIXTURES / "base" / "llama_fp32"),
                                    base_norms=str(own))
    assert {layer.name: layer.base_sigma_max for layer in result.layers}["model.layers.0.self_attn.q_proj"] == 1000.0
    assert udr_issues(result) == []


def test_an_upstream_norms_file_without_fingerprints_is_not_used_with_base_model(tmp_path):
    upstream = tmp_path / "upstream.json"
    upstream.write_text(json.dumps({"model.layers.0.self_attn.q_proj.weight": {"sigma_max": 1000.0, "fro_norm": 1.0}}))
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=str(FIXTURES / "base" / "llama_fp32"),
                                    base_norms=str(upstream))
    assert any("carries no file fingerprints" in issue for issue in result.issues)
    assert all(layer.base_sigma_max != 1000.0 for layer in result.layers)


def test_without_a_base_the_summary_says_the_norms_were_not_verified(tmp_path):
    norms = tmp_path / "norms.json"
    bn.save_norms(norms, bn.compute_base_norms(FIXTURES / "base" / "llama_fp32"))
    unverified = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_norms=str(norms))
    assert unverified.to_summary_dict()["base_norms_verified"] is False
    assert unverified.to_summary_dict()["n_layers_with_udr"] == 4
    assert gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv").to_summary_dict()["base_norms_verified"] is None
    json.dumps(unverified.to_summary_dict(include_layers=True), allow_nan=False)


def test_expert_norms_cached_from_the_base_serve_a_later_audit_without_it(tmp_path):
    cache = tmp_path / "cache.json"
    modules = [f"model.layers.0.mlp.experts.gate_up_proj[{e}]" for e in range(4)]
    shapes = {module: (48, 32) for module in modules}
    gl.collect_base_norms(modules, base_model=str(UDR / "gpt_oss_base"), cache_file=str(cache), delta_shapes=shapes)
    lookup = gl.collect_base_norms(modules, norms_file=str(cache), delta_shapes=shapes)
    truth = EXPECTED["moe"]["gpt_oss"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert lookup.issues == [] and lookup.verified is False
    assert [lookup.norms[module][0] for module in modules] == pytest.approx(truth["sigma_max"], rel=REL)


def test_norms_records_without_shapes_are_reported_once(tmp_path):
    upstream = tmp_path / "upstream.json"
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    upstream.write_text(json.dumps({name + ".weight": {"sigma_max": 2.0, "fro_norm": 3.0} for name in names}))
    lookup = gl.collect_base_norms(names, norms_file=str(upstream), delta_shapes={name: (32, 32) for name in names})
    assert set(lookup.norms) == set(names)
    (issue,) = lookup.issues
    assert issue.startswith("udr: 2 base norms records carry no shape")


def test_an_expert_of_packed_mxfp4_experts_is_never_read_raw(tmp_path):
    # gpt-oss's released checkpoints keep experts as MXFP4 *_blocks (U8) + *_scales (U8), no plain tensor.
    # Every nibble 0x2 is FP4 E2M1 1.0 and scale byte 127 is 2⁰: each expert is a 48×32 matrix of ones.
    tensors = oracle_load(UDR / "gpt_oss_base" / "model.safetensors")
    tensors = {name: value.astype(np.float32) for name, value in tensors.items()
               if name != "model.layers.0.mlp.experts.gate_up_proj"}
    tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] = np.full((4, 48, 1, 16), 0x22, np.uint8)
    tensors["model.layers.0.mlp.experts.gate_up_proj_scales"] = np.full((4, 48, 1), 127, np.uint8)
    (tmp_path / "base").mkdir()
    write_safetensors(tmp_path / "base" / "model.safetensors", tensors)
    module = "model.layers.0.mlp.experts.gate_up_proj[1]"
    lookup = gl.collect_base_norms([module], base_model=str(tmp_path / "base"), delta_shapes={module: (48, 32)})
    if lookup.norms:  # the base side decodes MXFP4: the dequantized σ
        assert lookup.issues == []
        assert lookup.norms[module][0] == pytest.approx(math.sqrt(48 * 32), rel=REL)
    else:  # it lists the packed tensors as they are: refused by their storage
        (issue,) = lookup.issues
        assert issue.startswith(f"udr: {module}: base weight {module} is quantized") and "gate_up_proj_blocks" in issue


def test_the_text_report_tells_dora_effective_udr_and_unverified_norms_apart(tmp_path):
    dora = gl.audit_lora_peft_dir(UDR / "dora_llama" / "adapter", base_model=str(UDR / "dora_llama" / "base"))
    effective = [row["udr_dora_effective"] for row in EXPECTED["dora"]["dora_llama"].values()]
    text = gl.render_text_report(dora)
    assert f"has UDR median {gl._fmt(float(np.median(effective)))}, max {gl._fmt(max(effective))} over 6 modules" in text
    assert "not verified" not in text
    norms = tmp_path / "norms.json"
    bn.save_norms(norms, bn.compute_base_norms(FIXTURES / "base" / "llama_fp32"))
    unverified = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_norms=str(norms))
    assert "(not verified)" in gl.render_text_report(unverified)


def test_each_replicated_layer_gets_its_own_refusal():
    # layer_replication [[0, 2], [0, 1]]: layer 2 is a copy of layer 0 and shares its base weight.
    modules = ["model.layers.0.self_attn.v_proj", "model.layers.2.self_attn.v_proj", "model.layers.2.self_attn.q_proj"]
    lookup = gl.collect_base_norms(modules, base_model=str(UDR / "llama_gqa_1kv"), layer_replication=[[0, 2], [0, 1]],
                                   delta_shapes={modules[0]: (16, 32), modules[1]: (16, 32), modules[2]: (32, 32)})
    assert set(lookup.norms) == {modules[2]}
    for module in modules[:2]:
        (issue,) = [issue for issue in lookup.issues if issue.startswith(f"udr: {module}:")]
        assert "model.layers.0.self_attn.v_proj.weight has shape [8, 32] but the update ΔW is [16, 32]" in issue
