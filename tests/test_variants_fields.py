"""The LoRA-family fields of PEFT 0.21.2's LoraConfig: KaSA, BD-LoRA,
target_parameters (MoE experts, fused and transposed), lora_bias,
trainable_token_indices, and the fields the audit refuses or reports.

The oracle is what the live PEFT library applied, recorded by
tools/make_lora_field_fixtures.py in each fixture's expected.json: the dense ΔW
of the layer's own forward pass (or, for target_parameters, the parameter
PEFT's parametrization hands the forward), as σ list, σ_max, Frobenius norm and
stable rank.  No torch here.
"""
import json
import math

import numpy as np
import pytest

from conftest import FIXTURES, oracle_load, run_cli
from gradience_lite import LORA_CONFIG_FIELDS, audit_lora_peft_dir, audit_lora_state_dict, compare_adapters

VARIANTS = FIXTURES / "variants"
AUDITED_CASES = ["field_kasa", "field_bdlora", "field_moe_mixtral", "field_moe_gptoss", "field_lora_bias",
                 "field_trainable_tokens"]
REL = 1e-6


def load_case(case):
    folder = VARIANTS / case
    expected = json.loads((folder / "expected.json").read_text())
    return folder, expected


def audited(case):
    folder, expected = load_case(case)
    result = audit_lora_peft_dir(folder, include_top_singular_values=64)
    return result, expected, {layer.name: layer for layer in result.layers}


@pytest.mark.parametrize("case", AUDITED_CASES)
def test_every_module_matches_the_live_forward_pass(case):
    result, expected, layers = audited(case)
    assert set(layers) == set(expected["modules"])
    for name, truth in expected["modules"].items():
        layer = layers[name]
        sigma = np.array(truth["sigma"])
        mine = abs(layer.scale) * np.array(layer.top_singular_values)
        assert mine == pytest.approx(sigma[:layer.r], rel=REL, abs=REL * sigma[0]), name
        assert np.all(sigma[layer.r:] <= 1e-9 * sigma[0]), name  # the live ΔW has rank ≤ r: nothing left out
        assert layer.delta_sigma_max == pytest.approx(truth["sigma_max"], rel=REL), name
        assert layer.delta_fro_norm == pytest.approx(truth["fro_norm"], rel=REL), name
        assert layer.stable_rank == pytest.approx(truth["stable_rank"], rel=REL), name
        assert layer.scale == pytest.approx(truth["scaling"], rel=1e-12), name
        assert layer.r == truth["r"], name


# ── KaSA ─────────────────────────────────────────────────────────────────────

def test_kasa_folds_lora_diag_between_the_factors():
    result, expected, layers = audited("field_kasa")
    assert {layer.family for layer in result.layers} == {"kasa"}
    assert "lora_diag" not in " ".join(result.non_lora_tensors)
    assert all(layer.params == 4 * 32 + 32 * 4 + 4 for name, layer in layers.items() if name.endswith("q_proj"))


def test_kasa_follows_the_forward_pass_not_get_delta_weight():
    # PEFT 0.21.2's LoraLayer.get_delta_weight ignores lora_diag (s·B·A); the forward pass applies it.
    _, expected, layers = audited("field_kasa")
    for name, helper_sigma_max in expected["layer_get_delta_weight_sigma_max"].items():
        assert abs(helper_sigma_max - expected["modules"][name]["sigma_max"]) > 0.05 * helper_sigma_max
        assert layers[name].delta_sigma_max == pytest.approx(expected["modules"][name]["sigma_max"], rel=REL)


def test_kasa_reports_the_base_truncation():
    result, _, _ = audited("field_kasa")
    assert any("kasa_config" in issue and "truncates" in issue for issue in result.issues)


def kasa_tensors_and_config():
    folder, _ = load_case("field_kasa")
    return oracle_load(folder / "adapter_model.safetensors"), json.loads((folder / "adapter_config.json").read_text())


def test_lora_diag_without_kasa_config_is_refused():
    tensors, config = kasa_tensors_and_config()
    config["kasa_config"] = None
    result = audit_lora_state_dict(tensors, config)
    assert result.layers == () and result.n_modules_skipped == 6
    assert all("kasa_config" in issue for issue in result.issues if "lora_diag is saved" in issue)


def test_kasa_config_without_lora_diag_is_refused():
    tensors, config = kasa_tensors_and_config()
    tensors = {key: value for key, value in tensors.items() if "lora_diag" not in key}
    result = audit_lora_state_dict(tensors, config)
    assert result.layers == () and result.n_modules_skipped == 6
    assert sum("no lora_diag is saved" in issue for issue in result.issues) == 6


def test_kasa_lora_diag_of_the_wrong_length_is_refused():
    tensors, config = kasa_tensors_and_config()
    key = next(key for key in tensors if key.endswith("layers.0.self_attn.q_proj.lora_diag"))
    tensors[key] = tensors[key][:3]
    result = audit_lora_state_dict(tensors, config)
    assert len(result.layers) == 5
    assert any("q_proj: lora_diag has shape [3], not [4]" in issue for issue in result.issues)


def test_compare_overlap_sees_the_kasa_diagonal(tmp_adapter):
    # Change one module's lora_diag: the update cosine must be that of the dense KaSA updates.
    tensors, config = kasa_tensors_and_config()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    changed = dict(tensors)
    changed[prefix + "lora_diag"] = tensors[prefix + "lora_diag"] * np.array([1.0, -2.0, 0.5, 3.0])
    first = tmp_adapter({k: v.astype(np.float32) for k, v in tensors.items()}, config, name="a")
    second = tmp_adapter({k: v.astype(np.float32) for k, v in changed.items()}, config, name="b")
    document = compare_adapters(str(first), str(second))
    row = next(row for row in document["modules"] if row["name"] == "model.layers.0.self_attn.q_proj")

    def dense(values):
        diag = np.diag(values[prefix + "lora_diag"])
        return values[prefix + "lora_B.weight"] @ diag @ values[prefix + "lora_A.weight"]
    a, b = dense(tensors), dense(changed)
    cosine = float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert row["overlap"]["update_cosine"] == pytest.approx(cosine, rel=1e-6)


# ── BD-LoRA ──────────────────────────────────────────────────────────────────

def test_bd_lora_block_diagonal_side_follows_the_config_patterns():
    result, _, layers = audited("field_bdlora")
    for name, layer in layers.items():
        leaf = name.rsplit(".", 1)[1]
        if leaf in ("o_proj", "down_proj"):  # block-diagonal lora_A, stored (r, in / nblocks)
            assert (layer.family, layer.b_shape[1]) == ("bd_lora", 4), name
        elif leaf in ("q_proj", "k_proj", "v_proj", "up_proj"):  # block-diagonal lora_B, stored (out, r / nblocks)
            assert (layer.family, layer.b_shape[1]) == ("bd_lora", 2), name
        else:  # match_strict=False: gate_proj is a plain LoRA module
            assert layer.family == "lora", name
    assert not any("rank mismatch" in issue for issue in result.issues)


def test_bd_lora_spectrum_is_not_the_dense_product_of_the_stored_factors():
    # The stored lora_A of a block-diagonal-A module has the shape of a plain LoRA factor
    # over in/nblocks inputs; auditing it as dense B·A would give another spectrum.
    folder, expected = load_case("field_bdlora")
    tensors = oracle_load(folder / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.o_proj."
    naive = np.linalg.svd(1.5 * tensors[prefix + "lora_B.weight"] @ tensors[prefix + "lora_A.weight"],
                          compute_uv=False)[:4]
    truth = np.array(expected["modules"]["model.layers.0.self_attn.o_proj"]["sigma"][:4])
    assert np.max(np.abs(naive - truth) / truth) > 0.05


def test_bd_lora_factors_that_do_not_fit_the_blocks_are_refused():
    folder, _ = load_case("field_bdlora")
    tensors = oracle_load(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_bdlora"]["nblocks"] = 3
    result = audit_lora_state_dict(tensors, config)
    assert {layer.family for layer in result.layers} == {"lora"}  # only gate_proj is left
    assert sum("do not fit 3 diagonal blocks" in issue for issue in result.issues) == 12


# ── target_parameters: MoE experts ──────────────────────────────────────────

def test_moe_experts_are_one_module_per_expert_named_by_parameter():
    result, expected, layers = audited("field_moe_mixtral")
    experts = [name for name in layers if "experts" in name]
    assert len(experts) == 2 * 2 * 4
    assert "model.layers.0.mlp.experts.gate_up_proj[3]" in layers
    assert "model.layers.1.mlp.experts.down_proj[0]" in layers
    assert not any("base_layer" in name for name in layers)
    for name in experts:
        assert layers[name].family == "lora_expert"
        assert layers[name].module_type == "mlp"


def test_moe_expert_rank_and_scale_come_from_the_parameter_patterns():
    result, _, layers = audited("field_moe_mixtral")
    gate_up_0 = layers["model.layers.0.mlp.experts.gate_up_proj[1]"]  # alpha_pattern: alpha 5, r 2
    assert (gate_up_0.r, gate_up_0.alpha, gate_up_0.scale) == (2, 5, 2.5)
    assert gate_up_0.alpha_pattern_key == "layers.0.mlp.experts.gate_up_proj"
    down_1 = layers["model.layers.1.mlp.experts.down_proj[2]"]  # rank_pattern: r 3, alpha 6
    assert (down_1.r, down_1.scale, down_1.rank_pattern_key) == (3, 2.0, "layers.1.mlp.experts.down_proj")
    assert (down_1.a_shape, down_1.b_shape) == ((3, 12), (16, 3))
    assert not any("matches no audited module" in issue or "disagrees" in issue for issue in result.issues)


def test_gpt_oss_transposed_experts_use_the_same_factor_layout():
    result, expected, layers = audited("field_moe_gptoss")
    assert all(truth["stored_transposed"] for truth in expected["modules"].values())
    layer = layers["model.layers.0.mlp.experts.gate_up_proj[2]"]
    assert (layer.r, layer.scale_rule, layer.scale) == (2, "alpha/sqrt(r)", pytest.approx(4 / math.sqrt(2)))
    assert (layer.a_shape, layer.b_shape) == ((2, 16), (16, 2))


def mixtral_tensors_and_config():
    folder, _ = load_case("field_moe_mixtral")
    return oracle_load(folder / "adapter_model.safetensors"), json.loads((folder / "adapter_config.json").read_text())


def test_nested_wrappers_of_unknown_parameters_are_refused():
    # Which nested ParamWrapper holds which parameter follows the module's registration
    # order; for names outside the known expert layouts that is unknowable from the file.
    tensors, config = mixtral_tensors_and_config()
    config["target_parameters"] = ["mlp.experts.w_in", "mlp.experts.w_out"]
    result = audit_lora_state_dict(tensors, config)
    assert not any("experts" in layer.name for layer in result.layers)
    assert sum("target_parameters" in issue and "registration order" in issue for issue in result.issues) == 4
    assert result.n_modules_skipped == 4


def test_fused_factors_that_do_not_split_by_r_are_refused():
    tensors, config = mixtral_tensors_and_config()
    config["r"], config["rank_pattern"] = 3, {}  # 8 rows of lora_A are not 3·E
    result = audit_lora_state_dict(tensors, config)
    assert any("model.layers.0.mlp.experts.gate_up_proj: target_parameters" in issue and "r = 3" in issue
               for issue in result.issues)


def test_one_targeted_parameter_needs_no_ordering():
    tensors, config = mixtral_tensors_and_config()
    tensors = {key: value for key, value in tensors.items() if "base_layer" not in key}  # the outer wrapper only
    config["target_parameters"] = ["mlp.experts.down_proj"]
    result = audit_lora_state_dict(tensors, config)
    names = {layer.name for layer in result.layers}
    assert {f"model.layers.0.mlp.experts.down_proj[{e}]" for e in range(4)} <= names


# ── lora_bias, trainable tokens, refusals ───────────────────────────────────

def test_lora_bias_is_reported_beside_the_spectrum():
    _, expected, layers = audited("field_lora_bias")
    for name, truth in expected["modules"].items():
        layer = layers[name]
        assert layer.lora_bias_key.endswith("lora_B.bias")
        assert layer.delta_bias_norm == pytest.approx(truth["bias_shift_norm"], rel=REL)  # |s|·‖b‖, the live shift
        assert layer.lora_bias_norm == pytest.approx(truth["bias_shift_norm"] / truth["scaling"], rel=REL)


def test_lora_b_bias_without_lora_bias_in_the_config_is_reported():
    folder, _ = load_case("field_lora_bias")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_bias"] = False
    result = audit_lora_state_dict(oracle_load(folder / "adapter_model.safetensors"), config)
    assert len(result.layers) == 4
    expected = "config: lora_bias is false but 4 module(s) saved lora_B.bias"
    assert any(issue.startswith(expected) for issue in result.issues)


def test_trainable_tokens_are_refused_by_name():
    result, _, layers = audited("field_trainable_tokens")
    assert result.n_modules_skipped == 1
    assert any(issue.startswith("model.embed_tokens: trainable_token_indices") for issue in result.issues)
    assert len(layers) == 2


def test_unsupported_field_refuses_every_module_and_unknown_keys_are_reported():
    folder, expected = load_case("field_refused")
    result = audit_lora_peft_dir(folder)
    assert result.layers == ()
    assert result.n_modules_skipped == len(expected["modules"]) == 4
    for name in expected["modules"]:
        assert any(issue.startswith(f"{name}: use_qalora") for issue in result.issues)
    assert any(issue.startswith("config: lora_future_option:") for issue in result.issues)


def test_refusal_is_an_exit_0_audit_with_the_issues_in_json():
    process = run_cli("audit", VARIANTS / "field_refused", "--json")
    assert process.returncode == 0, process.stderr
    document = json.loads(process.stdout)
    assert document["n_layers"] == 0 and document["n_modules_skipped"] == 4


def test_field_table_covers_every_field_peft_wrote():
    # PEFT writes every LoraConfig field (to_dict drops only runtime_config) into adapter_config.json.
    written = set(json.loads((VARIANTS / "field_kasa" / "adapter_config.json").read_text()))
    assert written <= set(LORA_CONFIG_FIELDS)
    assert set(LORA_CONFIG_FIELDS) - written == {"runtime_config"}


def test_written_defaults_raise_no_config_issue():
    result, _, _ = audited("field_lora_bias")
    assert [issue for issue in result.issues if issue.startswith("config:")] == []


@pytest.mark.parametrize("field, value", [("init_lora_weights", "pissa"), ("use_dora", True), ("bias", "all"),
                                          ("alora_invocation_tokens", [1, 2])])
def test_fields_that_change_what_delta_w_means_are_named_in_an_issue(field, value):
    tensors, config = kasa_tensors_and_config()
    tensors = {key: value for key, value in tensors.items() if "lora_diag" not in key}
    config.update({"kasa_config": None, field: value})
    result = audit_lora_state_dict(tensors, config)
    assert len(result.layers) == 6
    assert any(issue.startswith(f"config: {field}:") for issue in result.issues)


def test_arrow_config_is_refused():
    tensors, config = kasa_tensors_and_config()
    tensors = {key: value for key, value in tensors.items() if "lora_diag" not in key}
    config.update({"kasa_config": None, "arrow_config": {"top_k": 3}})
    result = audit_lora_state_dict(tensors, config)
    assert result.layers == () and result.n_modules_skipped == 6


# ── the same layouts through the other code paths: bf16 bytes, Householder QR ──

def dense_expert_sigmas(tensors, config, rank_of):
    """Per expert, σ of s·B[:, e::E]·A[e·r:(e+1)·r], formed densely from the stored factors."""
    out = {}
    for key in tensors:
        if not key.endswith("lora_A.weight") or "experts" not in key:
            continue
        prefix = key[:-len("lora_A.weight")]
        path = prefix[len("base_model.model."):].replace(".base_layer.", ".")
        parameter = "gate_up_proj" if ".base_layer." in prefix else "down_proj"
        name = path + parameter
        a, b = tensors[key], tensors[prefix + "lora_B.weight"]
        rank = rank_of(name)
        experts = a.shape[0] // rank
        for e in range(experts):
            delta = b[:, e::experts] @ a[e * rank:(e + 1) * rank]
            out[f"{name}[{e}]"] = np.linalg.svd(delta, compute_uv=False)[:rank]
    return out


def mixtral_rank(name):
    return 3 if name.endswith("layers.1.mlp.experts.down_proj") else 2  # the fixture's rank_pattern


def audited_layers(tensors, config):
    return {layer.name: layer for layer in audit_lora_state_dict(tensors, config, include_top_singular_values=8).layers}


def test_bf16_fused_experts_match_the_dense_oracle(tmp_adapter):
    from conftest import oracle_decode_bf16, to_bf16_bits
    tensors, config = mixtral_tensors_and_config()
    bits = {key: to_bf16_bits(value) for key, value in tensors.items()}
    folder = tmp_adapter(bits, config, dtype_override={key: "BF16" for key in bits})
    decoded = {key: oracle_decode_bf16(value) for key, value in bits.items()}
    truth = dense_expert_sigmas(decoded, config, mixtral_rank)
    layers = {layer.name: layer for layer in audit_lora_peft_dir(folder, include_top_singular_values=8).layers}
    assert len(truth) == 16
    for name, sigma in truth.items():
        mine = np.array(layers[name].top_singular_values)
        assert mine == pytest.approx(sigma, rel=1e-9, abs=1e-12 * sigma[0]), name


def test_ill_conditioned_expert_and_block_factors_take_the_qr_route(monkeypatch):
    # Two nearly collinear rank directions make κ(scaled factor) > 1e5: the r×r factor then comes
    # from Householder QR of the expert's strided slice / of the block-diagonal factor, which must
    # be laid out exactly as PEFT lays it out.
    import gradience_lite
    qr_reads = []
    tall_factor = gradience_lite._tall_factor
    monkeypatch.setattr(gradience_lite, "_tall_factor",
                        lambda source, ref: qr_reads.append(ref) or tall_factor(source, ref))
    noise = np.random.default_rng(0).normal(size=64) * 1e-7

    def close(mine, truth):
        assert np.array(mine) == pytest.approx(truth, rel=1e-7, abs=1e-9 * truth[0])

    tensors, config = mixtral_tensors_and_config()
    key = "base_model.model.model.layers.0.mlp.experts.lora_B.weight"
    b = tensors[key] = tensors[key].copy()
    for e in range(4):  # expert e's rank columns are e and 4 + e (rank-major, E = 4)
        b[:, 4 + e] = b[:, e] + noise[:b.shape[0]]
    truth = dense_expert_sigmas(tensors, config, mixtral_rank)
    layers = audited_layers(tensors, config)
    for e in range(4):
        name = f"model.layers.0.mlp.experts.down_proj[{e}]"
        close(layers[name].top_singular_values, truth[name])
    assert {ref.expert for ref in qr_reads if ref.key == key} == {0, 1, 2, 3}

    folder, _ = load_case("field_bdlora")
    tensors = oracle_load(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    prefix = "base_model.model.model.layers.0.self_attn."
    a = tensors[prefix + "o_proj.lora_A.weight"]  # block-diagonal A (4, 16): blocks are rows 0-1 and 2-3
    a[1] = a[0] + noise[:16]
    b = tensors[prefix + "q_proj.lora_B.weight"]  # block-diagonal B (32, 2): blocks are rows 0-15 and 16-31
    b[:, 1] = b[:, 0] + noise[:32]
    qr_reads.clear()
    layers = audited_layers(tensors, config)
    a_full = np.zeros((4, 32))
    a_full[:2, :16], a_full[2:, 16:] = a[:2], a[2:]  # torch.block_diag(*torch.chunk(weight, 2, dim=0))
    close(layers["model.layers.0.self_attn.o_proj"].top_singular_values,
          np.linalg.svd(tensors[prefix + "o_proj.lora_B.weight"] @ a_full, compute_uv=False)[:4])
    b_full = np.zeros((32, 4))
    b_full[:16, :2], b_full[16:, 2:] = b[:16], b[16:]
    close(layers["model.layers.0.self_attn.q_proj"].top_singular_values,
          np.linalg.svd(b_full @ tensors[prefix + "q_proj.lora_A.weight"], compute_uv=False)[:4])
    assert {ref.blocks for ref in qr_reads} == {2}
