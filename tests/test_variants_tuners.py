"""PEFT's own tuners (LoHa, LoKr, AdaLoRA, VeRA), the PEFT types that are refused,
and kohya ``.alpha`` of any numeric dtype.

The oracle is ``expected.json`` next to each fixture: the dense ΔW the live
library applied (its layer's forward pass, checked against ``merge_and_unload``),
recorded by ``tools/make_tuner_fixtures.py`` with float64 SVDs.  No torch here.
"""
import json

import numpy as np
import pytest

import gradience_lite as gl
from conftest import FIXTURES, run_cli, to_bf16_bits, write_safetensors

VARIANTS = FIXTURES / "variants"
REL = 1e-6


def expected(case):
    return json.loads((VARIANTS / case / "expected.json").read_text())


def audit(case, **kwargs):
    return gl.audit_lora_peft_dir(VARIANTS / case, include_top_singular_values=10_000, **kwargs)


def assert_matches_truth(layer, truth):
    """σ list, σ_max, Frobenius norm and stable rank of the scaled ΔW against the library's own ΔW."""
    sigma_true = np.array(truth["sigma"])
    sigma_got = abs(layer.scale) * np.array(layer.top_singular_values)
    width = max(sigma_true.size, sigma_got.size)
    pad = lambda values: np.concatenate([values, np.zeros(width - values.size)])
    # Beyond the update's rank the truth holds float64 round-off (~1e-16·σ_max), the audit exact zeros.
    np.testing.assert_allclose(pad(sigma_got), pad(sigma_true), rtol=REL, atol=REL * max(sigma_true[0], 1e-300))
    assert layer.delta_sigma_max == pytest.approx(truth["sigma_max"], rel=REL, abs=1e-300)
    assert layer.delta_fro_norm == pytest.approx(truth["fro_norm"], rel=REL, abs=1e-300)
    assert layer.stable_rank == pytest.approx(truth["stable_rank"], rel=REL, abs=1e-300)


AUDITED = [
    ("peft_loha_conv", "loha", {}),
    ("peft_loha_flat_conv", "loha", {}),
    ("peft_lokr_full", "lokr", {}),
    ("peft_lokr_decompose_both", "lokr", {}),
    ("peft_adalora", "adalora", {}),
    ("peft_vera", "vera", {"base_model": str(VARIANTS / "peft_vera" / "base")}),
]


@pytest.mark.parametrize("case,family,options", AUDITED, ids=[case for case, _, _ in AUDITED])
def test_peft_tuner_matches_the_library_forward_pass(case, family, options):
    truth = expected(case)["modules"]
    result = audit(case, **options)
    assert result.adapter_format == "peft"
    assert {layer.name for layer in result.layers} == set(truth)
    assert result.n_modules_skipped == 0
    for layer in result.layers:
        assert layer.family == family
        assert_matches_truth(layer, truth[layer.name])


@pytest.mark.parametrize("case", ["peft_loha_conv", "peft_loha_flat_conv", "peft_lokr_full", "peft_lokr_decompose_both"])
def test_loha_lokr_scale_is_peft_alpha_over_config_r_with_patterns(case):
    truth = expected(case)["modules"]
    for layer in audit(case).layers:
        assert layer.scale_rule == "alpha/r"
        assert layer.scale == pytest.approx(truth[layer.name]["scaling"], rel=1e-12)
        assert layer.config_r == truth[layer.name]["r"]
        assert not layer.issues


def test_patterns_name_the_key_that_set_r_and_alpha():
    layers = {layer.name: layer for layer in audit("peft_loha_conv").layers}
    assert (layers["head"].rank_pattern_key, layers["head"].r, layers["head"].scale) == ("head", 2, 3.0)
    assert (layers["conv2"].alpha_pattern_key, layers["conv2"].alpha, layers["conv2"].scale) == ("conv2", 3.0, 0.75)
    assert layers["conv1"].kind == "conv"  # the Tucker (use_effective_conv2d) factors keep the kernel


def test_lokr_with_both_halves_full_is_not_given_lycoris_scale_one():
    # PEFT divides by the config's r even though no stored tensor has a rank axis.
    layers = {layer.name: layer for layer in audit("peft_lokr_full").layers}
    q_proj = layers["model.layers.0.self_attn.q_proj"]
    assert (q_proj.r, q_proj.alpha, q_proj.scale) == (8, 4.0, 0.5)
    assert layers["model.layers.0.self_attn.o_proj"].scale == 1.5  # alpha_pattern o_proj = 12


def test_adalora_reports_kept_ranks_masks_and_stored_e():
    case = VARIANTS / "peft_adalora"
    config = json.loads((case / "adapter_config.json").read_text())
    truth = expected("peft_adalora")
    layers = {layer.name: layer for layer in audit("peft_adalora").layers}
    for key, mask in config["rank_pattern"].items():
        name = key[:-len(".lora_E")]
        layer = layers[name]
        assert layer.r == sum(mask) == truth["kept_ranks"][key + ".default"]
        # The live model held every initial rank, the masked ones zeroed; the file keeps the others.
        live_e = truth["modules"][name]["lora_E"]
        assert list(layer.lora_e) == pytest.approx([e for e, kept in zip(live_e, mask) if kept], rel=1e-7)
        assert layer.scale_rule == "alpha/(ranknum+1e-5)"
        if layer.r:  # ranknum stays init_r = 6 on load
            assert layer.scale == pytest.approx(16 / (6 + 1e-5), rel=1e-6)
        else:  # every rank masked: PEFT rebuilds the layer with r = 0 (ranknum 0); ΔW is empty
            assert layer.delta_sigma_max == 0.0 and layer.lora_e == ()
    assert any(0 < layer.r < 6 for layer in layers.values())
    row = audit("peft_adalora").to_summary_dict(include_layers=True)["layers"][0]
    assert isinstance(row["lora_e"], list) and row["family"] == "adalora"


def test_adalora_mask_that_does_not_match_the_weights_is_refused(tmp_path):
    source = VARIANTS / "peft_adalora"
    target = tmp_path / "adalora"
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    config = json.loads((source / "adapter_config.json").read_text())
    key = "model.layers.0.self_attn.v_proj.lora_E"
    config["rank_pattern"][key] = [True, False, True, True, True, True]  # keeps 5; the file stores 6
    (target / "adapter_config.json").write_text(json.dumps(config))
    result = gl.audit_lora_peft_dir(target)
    assert "model.layers.0.self_attn.v_proj" not in {layer.name for layer in result.layers}
    assert any("v_proj: rank_pattern mask keeps 5 ranks but lora_A stores 6" in issue and "cannot load" in issue
               for issue in result.issues)


def test_vera_without_a_base_refuses_each_module_naming_in_features():
    result = audit("peft_vera")
    assert not result.layers and result.n_modules_skipped == 3
    assert all("in_features" in issue and "--base-model" in issue for issue in result.issues)


def test_vera_reads_in_features_from_a_norms_file_as_well(tmp_path):
    import base_norms

    base = VARIANTS / "peft_vera" / "base"
    norms = tmp_path / "norms.json"
    assert base_norms.main([str(base), "--out", str(norms), "--quiet"]) == 0
    truth = expected("peft_vera")["modules"]
    result = audit("peft_vera", base_norms=str(norms))
    assert {layer.name for layer in result.layers} == set(truth)
    for layer in result.layers:
        assert_matches_truth(layer, truth[layer.name])


def test_vera_counts_only_the_trained_vectors_as_params():
    layers = {layer.name: layer for layer in audit("peft_vera", base_model=str(VARIANTS / "peft_vera" / "base")).layers}
    assert layers["model.layers.0.self_attn.k_proj"].params == 16 + 4  # λ_b (out) + λ_d (r)
    assert layers["model.layers.0.mlp.down_proj"].scale_rule == "1 (vera: λ_b, λ_d)"


def test_vera_saved_without_projections_exits_2_naming_the_field():
    run = run_cli("audit", VARIANTS / "peft_vera_no_projection", "--base-model", VARIANTS / "peft_vera" / "base")
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1
    assert "save_projection" in run.stderr and "vera_A" in run.stderr and "Traceback" not in run.stderr


def test_vera_with_projections_missing_from_the_file_is_a_module_issue(tmp_path):
    from conftest import oracle_load

    tensors = {k: v.astype(np.float32) for k, v in oracle_load(VARIANTS / "peft_vera" / "adapter_model.safetensors").items()
               if not k.endswith("vera_B")}
    folder = tmp_path / "vera"
    folder.mkdir()
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text((VARIANTS / "peft_vera" / "adapter_config.json").read_text())
    result = gl.audit_lora_peft_dir(folder, base_model=str(VARIANTS / "peft_vera" / "base"))
    assert not result.layers
    assert all("vera_A / vera_B are not in the file" in issue for issue in result.issues)


@pytest.mark.parametrize("case,peft_type", [("peft_ia3", "IA3"), ("peft_oft", "OFT")])
def test_non_additive_peft_types_exit_2_with_one_line_naming_the_type(case, peft_type):
    run = run_cli("audit", VARIANTS / case)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"peft_type {peft_type}" in lines[0] and "not a low-rank additive update" in lines[0]
    assert "no LoRA factors" not in run.stderr


def test_additive_low_rank_types_not_implemented_are_refused_by_name(tmp_adapter):
    folder = tmp_adapter({"base_model.model.q.lora_A.weight": np.ones((2, 4), np.float32),
                          "base_model.model.q.lora_B.weight": np.ones((4, 2), np.float32)},
                         {"peft_type": "GRALORA", "r": 2})
    with pytest.raises(gl.AdapterFormatError, match="GRALORA .* is a low-rank additive update whose exact ΔW"):
        gl.audit_lora_peft_dir(folder)
    with pytest.raises(gl.AdapterFormatError, match="'SOMETHING_NEW' is not a PEFT type"):
        gl.audit_lora_state_dict({"q.lora_A.weight": np.ones((2, 4))}, {"peft_type": "SOMETHING_NEW"})


# PeftType of PEFT 0.21.2 (peft/utils/peft_types.py), copied: every member must be audited or refused by name.
PEFT_0_21_2_TYPES = (
    "PROMPT_TUNING MULTITASK_PROMPT_TUNING P_TUNING PREFIX_TUNING LORA ADALORA ADAMSS BOFT ADAPTION_PROMPT IA3 BEFT "
    "LILY LOHA LOKR OFT POLY LN_TUNING VERA FROD PVERA FOURIERFT GLORA XLORA HRA VBLORA UNILORA CPT MISS RANDLORA "
    "ROAD TRAINABLE_TOKENS HIRA SHIRA C3A WAVEFT OSF DELORA GRALORA CARTRIDGE TINYLORA PSOFT PEANUT SHADOW "
    "SUPERTUNING DEFT").split()


@pytest.mark.parametrize("peft_type", PEFT_0_21_2_TYPES)
def test_every_peft_type_is_audited_or_refused_by_name(peft_type):
    refusal = gl.peft_type_refusal({"peft_type": peft_type})
    if peft_type in gl.PEFT_VARIANTS:
        assert refusal is None
    else:
        assert refusal.startswith(f"peft_type {peft_type} (") and "low-rank additive update" in refusal


# ── kohya / LyCORIS .alpha of any numeric dtype ─────────────────────────────

def test_diffusers_kohya_converter_int64_alpha_is_read():
    truth = expected("diffusers_kohya_int64_alpha")
    assert truth["alpha_dtypes"] == ["torch.int64"]
    result = audit("diffusers_kohya_int64_alpha")
    assert result.adapter_format == "kohya" and result.n_modules_skipped == 0
    assert {layer.name for layer in result.layers} == set(truth["modules"])
    for layer in result.layers:
        assert (layer.alpha, layer.scale, layer.scale_rule) == (4.0, 1.0, "alpha/r")
        assert_matches_truth(layer, truth["modules"][layer.name])


@pytest.mark.parametrize("alpha,dtype,shape", [
    (np.array(6, np.int64), None, ()), (np.array([6], np.int32), None, (1,)), (np.array(6, np.float16), None, ()),
    (to_bf16_bits(np.array([6.0])), "BF16", (1,)), (np.array(6, np.uint8), None, ()), (np.array(6.0), None, ())])
def test_kohya_alpha_of_any_numeric_dtype_0d_or_one_element(tmp_path, alpha, dtype, shape):
    rng = np.random.default_rng(0)
    down, up = rng.normal(size=(4, 12)).astype(np.float32), rng.normal(size=(10, 4)).astype(np.float32)
    name = "lora_unet_mid_block_attentions_0_to_q"
    path = write_safetensors(tmp_path / "lora.safetensors",
                             {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                              f"{name}.alpha": alpha.reshape(shape)},
                             dtype_override={f"{name}.alpha": dtype} if dtype else None)
    layer, = gl.audit_lora_peft_dir(path).layers
    delta = 6 / 4 * up.astype(np.float64) @ down.astype(np.float64)
    assert (layer.alpha, layer.scale) == (6.0, 1.5)
    assert layer.delta_sigma_max == pytest.approx(np.linalg.svd(delta, compute_uv=False)[0], rel=1e-9)


def test_kohya_boolean_alpha_is_refused(tmp_path):
    name = "lora_te1_q_proj"
    path = write_safetensors(tmp_path / "lora.safetensors",
                             {f"{name}.lora_down.weight": np.ones((2, 4), np.float32),
                              f"{name}.lora_up.weight": np.ones((4, 2), np.float32),
                              f"{name}.alpha": np.array(1, np.uint8)}, dtype_override={f"{name}.alpha": "BOOL"})
    result = gl.audit_lora_peft_dir(path)
    assert not result.layers
    assert any("non-numeric dtype BOOL" in issue for issue in result.issues)


@pytest.mark.parametrize("case,field,value", [("peft_loha_flat_conv", "r", 3), ("peft_adalora", "init_r", 7),
                                              ("peft_lokr_decompose_both", "r", 2)])
def test_stored_rank_the_config_disagrees_with_is_refused(tmp_path, case, field, value):
    # PEFT builds every layer from the config and then loads the weights: such a module cannot load.
    target = tmp_path / case
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes((VARIANTS / case / "adapter_model.safetensors").read_bytes())
    config = json.loads((VARIANTS / case / "adapter_config.json").read_text())
    config[field] = value
    (target / "adapter_config.json").write_text(json.dumps(config))
    result = gl.audit_lora_peft_dir(target)
    assert result.n_modules_skipped >= 1
    assert any("PEFT cannot load this module" in issue for issue in result.issues)
