"""Beyond PEFT: kohya, LyCORIS (LoCon/Tucker, LoHa, LoKr), diffusers and MLX-LM
files, each recognised from its keys and checked against ΔW formed densely
with NumPy by the format's documented convention."""
import json

import numpy as np
import pytest

import gradience_lite as gl
from conftest import FIXTURES, oracle_load, write_safetensors

FORMATS = FIXTURES / "formats"


def weights_file(case):
    return next(p for p in (FORMATS / case).iterdir() if p.suffix == ".safetensors")


def matrix(values):
    return values.reshape(values.shape[0], -1)


def lycoris_delta(tensors, prefix):
    """ΔW/scale of one kohya/LyCORIS module, written independently of the auditor."""
    get = lambda role: tensors.get(f"{prefix}.{role}")
    if get("hada_w1_a") is not None:
        if get("hada_t1") is not None:
            half1 = np.einsum("ijhw,jr,ip->prhw", get("hada_t1"), get("hada_w1_b"), get("hada_w1_a"))
            half2 = np.einsum("ijhw,jr,ip->prhw", get("hada_t2"), get("hada_w2_b"), get("hada_w2_a"))
            return matrix(half1 * half2)
        return (get("hada_w1_a") @ matrix(get("hada_w1_b"))) * (get("hada_w2_a") @ matrix(get("hada_w2_b")))
    if get("lokr_w1") is not None or get("lokr_w1_a") is not None:
        w1 = get("lokr_w1") if get("lokr_w1") is not None else get("lokr_w1_a") @ get("lokr_w1_b")
        if get("lokr_w2") is not None:
            w2 = get("lokr_w2")
        else:
            w2b = get("lokr_w2_b")
            w2 = (get("lokr_w2_a") @ matrix(w2b)).reshape(-1, *w2b.shape[1:]) if w2b.ndim > 2 else get("lokr_w2_a") @ w2b
        while w1.ndim < w2.ndim:  # torch.kron of a matrix with a conv kernel, as LyCORIS does it
            w1 = w1[..., None]
        return matrix(np.kron(w1, w2))
    up, down = get("lora_up.weight"), get("lora_down.weight")
    if get("lora_mid.weight") is not None:
        return matrix(np.einsum("oa,abhw,bi->oihw", matrix(up), get("lora_mid.weight"), matrix(down)))
    return matrix(up) @ matrix(down)


def check_module(layer, delta, scale):
    sigma = np.linalg.svd(delta, compute_uv=False)
    tol = 1e-9 * max(sigma[0], 1e-300)
    got = np.array(layer.top_singular_values)
    count = min(got.size, sigma.size)
    np.testing.assert_allclose(got[:count], sigma[:count], rtol=0, atol=tol)
    assert layer.sigma_max == pytest.approx(sigma[0], rel=1e-9)
    assert layer.frob_sq == pytest.approx(np.sum(sigma ** 2), rel=1e-9)
    assert layer.stable_rank == pytest.approx(np.sum(sigma ** 2) / sigma[0] ** 2, rel=1e-9)
    energy = np.cumsum(sigma ** 2) / np.sum(sigma ** 2)
    assert layer.energy_rank_90 == int(np.argmax(energy >= 0.9)) + 1
    assert layer.scale == pytest.approx(scale, rel=1e-12)
    assert layer.delta_sigma_max == pytest.approx(abs(scale) * sigma[0], rel=1e-9)
    assert layer.delta_fro_norm == pytest.approx(abs(scale) * np.linalg.norm(delta), rel=1e-9)


@pytest.mark.parametrize("case,expected_format", [
    ("lycoris_loha", "lycoris"), ("lycoris_lokr", "lycoris"), ("lycoris_lokr_full", "lycoris"),
    ("lycoris_loha_tucker", "lycoris"), ("lycoris_locon_tucker", "kohya"), ("kohya_sdxl", "kohya")])
def test_kohya_and_lycoris_match_dense_delta_and_the_library_scale(case, expected_format):
    result = gl.audit_lora_peft_dir(FORMATS / case, include_top_singular_values=10 ** 6)
    assert result.adapter_format == expected_format
    expected = json.loads((FORMATS / case / "expected.json").read_text())["modules"]
    tensors = oracle_load(weights_file(case))
    assert {layer.name for layer in result.layers} == set(expected)
    assert result.n_modules_skipped == 0 and not result.issues, result.issues
    for layer in result.layers:
        check_module(layer, lycoris_delta(tensors, layer.name), expected[layer.name]["scale"])


def test_loha_uses_the_khatri_rao_route_and_reports_its_rank_budget():
    result = gl.audit_lora_peft_dir(FORMATS / "lycoris_loha")
    fc1 = {layer.name: layer for layer in result.layers}["lycoris_fc1"]
    assert (fc1.family, fc1.r, fc1.max_rank) == ("loha", 4, 16)
    assert fc1.utilization == pytest.approx(fc1.stable_rank / 16)


def test_loha_dense_fallback_when_r_squared_exceeds_the_matrix():
    rng = np.random.default_rng(0)
    tensors = {"m.hada_w1_a": rng.normal(size=(12, 8)), "m.hada_w1_b": rng.normal(size=(8, 20)),
               "m.hada_w2_a": rng.normal(size=(12, 8)), "m.hada_w2_b": rng.normal(size=(8, 20)),
               "m.alpha": np.array(4.0)}
    result = gl.audit_lora_state_dict(tensors, include_top_singular_values=100)
    layer = result.layers[0]
    assert layer.max_rank == 12
    check_module(layer, lycoris_delta(tensors, "m"), 0.5)


def test_lokr_scale_rules():
    by_name = {layer.name: layer for layer in gl.audit_lora_peft_dir(FORMATS / "lycoris_lokr").layers}
    assert by_name["lycoris_fc1"].scale_rule == "alpha/r" and by_name["lycoris_fc1"].r == 4
    assert by_name["lycoris_conv"].scale_rule == "1 (LoKr, both halves full)"
    full = gl.audit_lora_peft_dir(FORMATS / "lycoris_lokr_full").layers
    assert {layer.scale for layer in full} == {1.0}


def test_kohya_alpha_rules_metadata_types_and_dora():
    result = gl.audit_lora_peft_dir(weights_file("kohya_sdxl"))  # a single file, not a directory
    by_name = {layer.name: layer for layer in result.layers}
    q = by_name["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    assert (q.alpha, q.scale, q.scale_rule, q.module_type) == (8.0, 2.0, "alpha/r", "attn")
    assert q.dora_magnitude["size"] == 32
    assert by_name["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].scale_rule == "implicit 1 (no alpha)"
    ff = by_name["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"]
    assert (ff.scale, ff.scale_rule, ff.module_type) == (1.0, "implicit 1 (no alpha)", "mlp")
    conv = by_name["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert (conv.kind, conv.module_type, conv.scale) == ("conv", "other", 0.25)
    summary = result.to_summary_dict()
    assert summary["format"] == "kohya"
    assert summary["format_metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"
    assert summary["format_metadata"]["ss_network_dim"] == "4"


def test_mlx_orientation_experts_and_absolute_scale():
    result = gl.audit_lora_peft_dir(FORMATS / "mlx_lm", include_top_singular_values=8)
    assert result.adapter_format == "mlx" and not result.issues
    tensors = oracle_load(FORMATS / "mlx_lm" / "adapters.safetensors")
    by_name = {layer.name: layer for layer in result.layers}
    assert set(by_name) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                            "model.layers.0.mlp.switch_mlp.gate_proj[0]", "model.layers.0.mlp.switch_mlp.gate_proj[1]",
                            "model.layers.0.mlp.switch_mlp.gate_proj[2]"}
    # The square layer is the trap: read as PEFT (A = r×in) lora_a (48×4) would pass for r = 48.
    square = by_name["model.layers.0.self_attn.q_proj"]
    assert square.r == 4 and square.scale_rule == "absolute"
    for name in ("q_proj", "k_proj"):
        a, b = (tensors[f"model.layers.0.self_attn.{name}.lora_{x}"] for x in "ab")
        check_module(by_name[f"model.layers.0.self_attn.{name}"], (a @ b).T, 20.0)
    a, b = tensors["model.layers.0.mlp.switch_mlp.gate_proj.lora_a"], tensors["model.layers.0.mlp.switch_mlp.gate_proj.lora_b"]
    for expert in range(3):
        layer = by_name[f"model.layers.0.mlp.switch_mlp.gate_proj[{expert}]"]
        check_module(layer, b[expert] @ a[expert], 20.0)
        assert layer.a_shape == (4, 48) and layer.b_shape == (64, 4)
    assert by_name["model.layers.0.self_attn.k_proj"].dora_magnitude["size"] == 16


def test_mlx_without_scale_says_so(tmp_path):
    tensors = oracle_load(FORMATS / "mlx_lm" / "adapters.safetensors")
    write_safetensors(tmp_path / "adapters.safetensors", {k: v.astype(np.float32) for k, v in tensors.items()})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 4}}))
    result = gl.audit_lora_peft_dir(tmp_path)
    assert {layer.scale for layer in result.layers} == {1.0}
    assert any("lora_parameters.scale" in issue for issue in result.issues)


def test_diffusers_component_prefix_and_metadata_config():
    result = gl.audit_lora_peft_dir(FORMATS / "diffusers_unet", include_top_singular_values=8)
    assert result.adapter_format == "diffusers" and not result.issues, result.issues
    expected = json.loads((FORMATS / "diffusers_unet" / "expected.json").read_text())["modules"]
    tensors = oracle_load(weights_file("diffusers_unet"))
    assert {layer.name for layer in result.layers} == set(expected)
    for layer in result.layers:
        assert layer.r == expected[layer.name]["r"]
        a, b = tensors[f"{layer.name}.lora_A.weight"], tensors[f"{layer.name}.lora_B.weight"]
        check_module(layer, b @ a, expected[layer.name]["scale"])
    keys = {layer.rank_pattern_key for layer in result.layers} | {layer.alpha_pattern_key for layer in result.layers}
    assert keys == {None, "to_k", "to_v"}


def test_old_diffusers_attention_processor_keys():
    result = gl.audit_lora_peft_dir(FORMATS / "diffusers_old", include_top_singular_values=8)
    assert result.adapter_format == "diffusers-old" and len(result.layers) == 4
    tensors = oracle_load(weights_file("diffusers_old"))
    for layer in result.layers:
        down, up = tensors[f"{layer.name}_lora.down.weight"], tensors[f"{layer.name}_lora.up.weight"]
        check_module(layer, up @ down, 1.0)
        assert layer.scale_rule == "implicit 1 (no alpha)"


def test_damaged_lycoris_modules_are_issues(tmp_path):
    tensors = oracle_load(weights_file("lycoris_loha"))
    tensors["lycoris_fc1.hada_w2_b"][0, 0] = np.nan
    tensors["lycoris_fc2.alpha"] = np.ones(3)
    del tensors["lycoris_square.hada_w2_a"]
    write_safetensors(tmp_path / "x.safetensors", {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})
    result = gl.audit_lora_peft_dir(tmp_path)
    assert [layer.name for layer in result.layers] == ["lycoris_conv"]
    text = " | ".join(result.issues)
    assert "lycoris_fc1: hada_w2_b contains 1 NaN/Inf" in text
    assert "lycoris_fc2: alpha tensor" in text
    assert "lycoris_square: loha factors do not fit together" in text
