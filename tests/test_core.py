"""The core auditor, specified against oracles: dense float64 SVD of the formed
ΔW, PEFT's own scalings (recorded from the live model), and an independent
safetensors decoder."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file as safetensors_load_numpy

import gradience_lite as gl
from conftest import (PEFT_FIXTURES, ROOT, run_cli, fixture_deltas, oracle_decode_bf16, oracle_load, peft_cases,
                      to_bf16_bits, write_safetensors)

REL = 1e-9
CASES = peft_cases()
CASE_IDS = [str(case.relative_to(PEFT_FIXTURES)) for case in CASES]


def audit_case(case, **kwargs):
    """Audit a fixture the way a user would: the root adapter, or a named subfolder via adapter=."""
    if case.parent != PEFT_FIXTURES:
        return gl.audit_lora_peft_dir(case.parent, adapter=case.name, **kwargs)
    return gl.audit_lora_peft_dir(case, **kwargs)


def oracle_spectra(case):
    """name → (dense singular values of ΔW/scale, PEFT's record, ΔW, A, B) for every module of a fixture."""
    return {name: (np.linalg.svd(delta / peft["scaling"], compute_uv=False), peft, delta, a, b)
            for name, (delta, peft, a, b) in fixture_deltas(case).items()}


# ── the safetensors reader ───────────────────────────────────────────────────

@pytest.mark.parametrize("case", ["llama_fp32_qv", "llama_fp16", "conv2d"])
def test_reader_matches_the_safetensors_package(case):
    path = PEFT_FIXTURES / case / "adapter_model.safetensors"
    reference = safetensors_load_numpy(str(path))
    sf = gl.open_safetensors(path)
    assert set(sf.tensors) == set(reference)
    for name, array in reference.items():
        np.testing.assert_array_equal(gl.read_tensor(sf, name), array.astype(np.float64))


def test_bf16_decodes_exactly_like_the_bitfield_oracle():
    path = PEFT_FIXTURES / "llama_bf16_all_linear" / "adapter_model.safetensors"
    sf = gl.open_safetensors(path)
    oracle = oracle_load(path)
    assert {info.dtype for info in sf.tensors.values()} == {"BF16"}
    for name in sf.tensors:
        np.testing.assert_array_equal(gl.read_tensor(sf, name), oracle[name])


def test_bf16_special_values_and_rounding(tmp_path):
    values = np.array([0.0, -0.0, 1.0, -2.5, 3.0e38, 1e-40, np.inf, -np.inf], dtype=np.float32)
    bits = to_bf16_bits(values)
    path = write_safetensors(tmp_path / "x.safetensors", {"t": bits}, dtype_override={"t": "BF16"})
    decoded = gl.read_tensor(gl.open_safetensors(path), "t")
    np.testing.assert_array_equal(decoded, oracle_decode_bf16(bits))
    assert np.isnan(gl.read_tensor(gl.open_safetensors(
        write_safetensors(tmp_path / "n.safetensors", {"t": np.array([0x7FC0], np.uint16)}, dtype_override={"t": "BF16"})), "t"))[0]


@pytest.mark.parametrize("dtype,code,value", [
    ("F8_E4M3", 0x7E, 448.0), ("F8_E4M3", 0x01, 2.0 ** -9), ("F8_E4M3", 0x38, 1.0), ("F8_E4M3", 0xC4, -3.0),
    ("F8_E4M3", 0x08, 2.0 ** -6), ("F8_E4M3", 0x7F, math.nan),
    ("F8_E5M2", 0x7B, 57344.0), ("F8_E5M2", 0x3C, 1.0), ("F8_E5M2", 0x01, 2.0 ** -16), ("F8_E5M2", 0x7C, math.inf),
    ("F8_E5M2", 0xFC, -math.inf), ("F8_E5M2", 0x7D, math.nan),
])
def test_fp8_formats_decode_to_their_documented_values(tmp_path, dtype, code, value):
    path = write_safetensors(tmp_path / "f8.safetensors", {"t": np.array([code], np.uint8)}, dtype_override={"t": dtype})
    decoded = gl.read_tensor(gl.open_safetensors(path), "t")[0]
    if math.isnan(value):
        assert math.isnan(decoded)
    else:
        assert decoded == value


def test_tensors_are_views_into_the_mapping_not_copies():
    sf = gl.open_safetensors(PEFT_FIXTURES / "llama_fp32_qv" / "adapter_model.safetensors")
    name = next(iter(sf.tensors))
    view = gl.raw_view(sf, sf.tensors[name])
    assert not view.flags.owndata and not view.flags.writeable


# ── per-module metrics against the dense oracle ──────────────────────────────

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_metric_matches_dense_svd_of_delta_w(case):
    oracle = oracle_spectra(case)
    result = audit_case(case, include_top_singular_values=64)
    layers = {layer.name: layer for layer in result.layers}
    assert set(layers) == set(oracle), "module names must equal the base model's module paths"
    for name, (sigma, peft, delta, a, b) in oracle.items():
        layer = layers[name]
        r = a.shape[0]
        top = sigma[:r]
        tol = 1e-9 * max(top[0], 1e-300)
        np.testing.assert_allclose(layer.top_singular_values, top, rtol=0, atol=tol)
        assert layer.sigma_max == pytest.approx(top[0], rel=REL, abs=1e-300)
        frob_sq = float(np.sum(sigma ** 2))
        assert layer.frob_sq == pytest.approx(frob_sq, rel=REL, abs=1e-300)
        assert layer.delta_sigma_max == pytest.approx(np.linalg.norm(delta, 2), rel=REL, abs=1e-300)
        assert layer.delta_fro_norm == pytest.approx(np.linalg.norm(delta), rel=REL, abs=1e-300)
        if top[0] == 0:
            assert (layer.stable_rank, layer.effective_rank, layer.utilization, layer.energy_rank_90) == (0, 0, 0, 0)
            continue
        assert layer.stable_rank == pytest.approx(frob_sq / top[0] ** 2, rel=REL)
        assert layer.utilization == pytest.approx(frob_sq / top[0] ** 2 / r, rel=REL)
        positive = sigma[sigma > 1e-12]
        p = positive / positive.sum()
        assert layer.effective_rank == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-8)
        energy = np.cumsum(sigma ** 2) / frob_sq
        for threshold, got in ((0.90, layer.energy_rank_90), (0.95, layer.energy_rank_95), (0.99, layer.energy_rank_99)):
            assert got == int(np.argmax(energy >= threshold)) + 1
        assert layer.r == r
        assert layer.params == a.size + b.size
        assert layer.a_shape == a.shape and layer.b_shape == b.shape


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_scale_rank_and_alpha_equal_what_peft_used(case):
    expected = json.loads((case / "expected.json").read_text())["modules"]
    result = audit_case(case)
    for layer in result.layers:
        peft = expected[layer.name]
        assert layer.scale == pytest.approx(peft["scaling"], rel=1e-12), layer.name
        assert layer.r == peft["r"]
        assert layer.alpha == pytest.approx(peft["lora_alpha"])


def test_rslora_scale_is_alpha_over_sqrt_r():
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_rslora")
    assert {layer.scale_rule for layer in result.layers} == {"alpha/sqrt(r)"}
    assert all(layer.scale == pytest.approx(8 / 4.0) for layer in result.layers)


def test_pattern_keys_are_dot_aligned_regexes_first_match_wins():
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_patterns")
    by_name = {layer.name: layer for layer in result.layers}
    # "0.mlp.up_proj" is a dot-aligned tail of layer 0 only, never of layer 10.
    assert by_name["model.layers.0.mlp.up_proj"].rank_pattern_key == "0.mlp.up_proj"
    assert by_name["model.layers.10.mlp.up_proj"].rank_pattern_key is None
    assert by_name["model.layers.10.mlp.up_proj"].r == 8
    # A real regular expression.
    assert [by_name[f"model.layers.{i}.mlp.down_proj"].r for i in range(5)] == [8, 12, 12, 12, 8]
    # r and alpha are looked up independently.
    assert by_name["model.layers.11.mlp.up_proj"].alpha == 7 and by_name["model.layers.11.mlp.up_proj"].r == 8
    # PEFT saves the config with sorted keys, so on reload "layers.0.self_attn.q_proj" comes before
    # "q_proj": the config then says r=2 where the trained weights have r=4.  Reported, and the scale
    # uses the stored rank (PEFT's own live scaling).
    q0 = by_name["model.layers.0.self_attn.q_proj"]
    assert (q0.r, q0.config_r, q0.rank_pattern_key, q0.scale) == (4, 2, "layers.0.self_attn.q_proj", 4.0)
    assert any("model.layers.0.self_attn.q_proj: stored rank 4 disagrees" in issue for issue in result.issues)
    assert any("'proj' matches no audited module" in issue for issue in result.issues)


def test_pattern_lookup_matches_peft_regex_semantics():
    config, _ = gl.parse_adapter_config({"r": 8, "lora_alpha": 8, "rank_pattern": {"q": 1, "attn.q": 2, r"h\.1\d\.q": 3}})
    lookup = lambda name: (gl.match_pattern(config.rank_pattern, name) or gl.PatternKey(None, None, None)).key
    assert lookup("model.attn.q") == "q"          # first key in order wins
    assert lookup("model.attn.xq") is None        # a substring is not a dot-aligned tail
    assert lookup("h.12.q") == "q"
    config, _ = gl.parse_adapter_config({"r": 8, "lora_alpha": 8, "rank_pattern": {r"h\.1\d\.q": 3, "q": 1}})
    assert gl.match_pattern(config.rank_pattern, "x.h.12.q").value == 3
    assert gl.match_pattern(config.rank_pattern, "x.h.2.q").value == 1


def test_zero_update_has_zero_metrics_and_an_issue():
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_zero_init")
    assert len(result.layers) == 4
    for layer in result.layers:
        assert (layer.sigma_max, layer.stable_rank, layer.effective_rank, layer.utilization, layer.energy_rank_90) == (0, 0, 0, 0, 0)
    assert sum("the update is zero" in issue for issue in result.issues) == 4
    json.dumps(result.to_summary_dict(include_layers=True), allow_nan=False)


def test_dora_magnitude_is_recorded_with_statistics():
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_dora")
    tensors = oracle_load(PEFT_FIXTURES / "llama_dora" / "adapter_model.safetensors")
    for layer in result.layers:
        magnitude = tensors[f"base_model.model.{layer.name}.lora_magnitude_vector"]
        assert layer.dora_magnitude["size"] == magnitude.size
        assert layer.dora_magnitude["mean"] == pytest.approx(magnitude.mean(), rel=1e-12)
        assert layer.dora_magnitude["max"] == pytest.approx(magnitude.max(), rel=1e-12)


def test_lora_bias_is_recorded_but_not_part_of_the_matrix():
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_rslora")
    tensors = oracle_load(PEFT_FIXTURES / "llama_rslora" / "adapter_model.safetensors")
    for layer in result.layers:
        assert layer.lora_bias_key == f"base_model.model.{layer.name}.lora_B.bias"
        assert layer.lora_bias_norm == pytest.approx(np.linalg.norm(tensors[layer.lora_bias_key]), rel=1e-12)
        assert layer.params == math.prod(layer.a_shape) + math.prod(layer.b_shape)


def test_modules_to_save_are_listed_as_non_lora_tensors():
    summary = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv").to_summary_dict()
    assert summary["non_lora_tensors"] == ["base_model.model.lm_head.weight"]


def test_embedding_and_conv_layouts_are_recognised_from_keys():
    kinds = {layer.name: layer.kind for layer in gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_embedding").layers}
    assert kinds["model.embed_tokens"] == "embedding"
    conv = {layer.name: layer for layer in gl.audit_lora_peft_dir(PEFT_FIXTURES / "conv2d").layers}
    assert conv["conv1"].kind == "conv" and conv["conv1"].a_shape == (4, 3, 3, 3)
    assert conv["head"].kind == "linear"


def test_named_adapters_in_subfolders_are_listed_and_selectable():
    root = gl.audit_lora_peft_dir(PEFT_FIXTURES / "two_adapters")
    assert root.adapter_name == "default" and root.other_adapters == ("second",)
    assert {layer.name.rsplit(".", 1)[-1] for layer in root.layers} == {"q_proj"}
    second = gl.audit_lora_peft_dir(PEFT_FIXTURES / "two_adapters", adapter="second")
    assert second.adapter_name == "second"
    assert {layer.name.rsplit(".", 1)[-1] for layer in second.layers} == {"v_proj", "gate_proj"}
    with pytest.raises(gl.AdapterFormatError, match="no adapter named 'third'.*second"):
        gl.audit_lora_peft_dir(PEFT_FIXTURES / "two_adapters", adapter="third")


def test_without_config_rank_comes_from_shapes_and_scale_is_one(tmp_path):
    case = PEFT_FIXTURES / "llama_fp32_qv"
    result = gl.audit_lora_peft_dir(tmp_path, weights=str(case / "adapter_model.safetensors"))
    assert result.config_path is None
    assert all(layer.scale == 1.0 and layer.r == 8 and layer.scale_rule == "implicit 1" for layer in result.layers)
    assert any("no adapter_config.json" in issue for issue in result.issues)


def test_module_types():
    assert gl.module_type("model.layers.0.self_attn.q_proj") == "attn"
    assert gl.module_type("model.layers.0.mlp.down_proj") == "mlp"
    assert gl.module_type("transformer.h.0.attn.c_proj") == "attn"
    assert gl.module_type("transformer.h.0.mlp.c_proj") == "mlp"
    assert gl.module_type("encoder.layer.0.attention.output.dense") == "attn"
    assert gl.module_type("encoder.layer.0.output.dense") == "mlp"
    assert gl.module_type("encoder.layer.0.intermediate.dense") == "mlp"
    assert gl.module_type("model.embed_tokens") == "other"
    assert gl.module_type("lm_head") == "other"


# ── the math on hard in-memory cases ─────────────────────────────────────────

def _hard_state_dict(rng):
    m, n, r = 40, 30, 8
    a = rng.normal(size=(r, n))
    a[5] = a[4] * (1 + 1e-13)            # nearly rank-deficient A
    b = rng.normal(size=(m, r)) * np.logspace(0, -9, r)  # B spans 9 decades
    b[:, 7] = 0.0                         # and one dead column
    wide_b = rng.normal(size=(3, r))      # out < r: B·A has rank ≤ 3
    return {
        "base_model.model.hard.lora_A.weight": a, "base_model.model.hard.lora_B.weight": b,
        "base_model.model.wide.lora_A.weight": rng.normal(size=(r, n)), "base_model.model.wide.lora_B.weight": wide_b,
    }


def test_ill_conditioned_and_rank_deficient_factors_stay_accurate():
    tensors = _hard_state_dict(np.random.default_rng(7))
    result = gl.audit_lora_state_dict(tensors, {"r": 8, "lora_alpha": 8}, include_top_singular_values=8)
    for layer in result.layers:
        a, b = tensors[layer.lora_a_key], tensors[layer.lora_b_key]
        sigma = np.linalg.svd(b @ a, compute_uv=False)[:8]
        sigma = np.pad(sigma, (0, 8 - sigma.size))
        np.testing.assert_allclose(layer.top_singular_values, sigma, rtol=0, atol=1e-9 * sigma[0])
        assert layer.frob_sq == pytest.approx(np.sum(sigma ** 2), rel=1e-9)


def test_random_shapes_match_dense_svd():
    rng = np.random.default_rng(3)
    for _ in range(30):
        r = int(rng.integers(1, 12))
        m, n = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        a, b = rng.normal(size=(r, n)), rng.normal(size=(m, r))
        dense = np.linalg.svd(b @ a, compute_uv=False)
        got = gl.lowrank_singular_values(a, b)
        expected = np.zeros(r)
        expected[:min(r, dense.size)] = dense[:r]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * dense[0])


def test_state_dict_keys_with_adapter_names_are_understood():
    rng = np.random.default_rng(0)
    result = gl.audit_lora_state_dict({
        "base_model.model.model.q_proj.lora_A.default.weight": rng.normal(size=(2, 6)),
        "base_model.model.model.q_proj.lora_B.default.weight": rng.normal(size=(5, 2)),
    }, {"r": 2, "lora_alpha": 4})
    assert [layer.name for layer in result.layers] == ["model.q_proj"]
    assert result.layers[0].scale == 2.0


# ── summaries against a direct computation ───────────────────────────────────

def test_summary_statistics_equal_a_direct_computation():
    case = PEFT_FIXTURES / "llama_patterns"
    oracle = oracle_spectra(case)
    summary = gl.audit_lora_peft_dir(case).to_summary_dict()
    stable, params, k90, util, eff, types = [], [], [], [], [], []
    for name, (sigma, peft, delta, a, b) in oracle.items():
        frob = np.sum(sigma ** 2)
        stable.append(frob / sigma[0] ** 2)
        util.append(stable[-1] / a.shape[0])
        params.append(a.size + b.size)
        k90.append(int(np.argmax(np.cumsum(sigma ** 2) / frob >= 0.9)) + 1)
        p = sigma[sigma > 1e-12] / sigma[sigma > 1e-12].sum()
        eff.append(math.exp(-np.sum(p * np.log(p))))
        types.append("attn" if "self_attn" in name else "mlp")
    assert summary["n_layers"] == len(stable)
    assert summary["total_lora_params"] == sum(params)
    assert summary["stable_rank_mean"] == pytest.approx(np.mean(stable), rel=1e-9)
    assert summary["stable_rank_median"] == pytest.approx(np.median(stable), rel=1e-9)
    assert summary["stable_rank_weighted_mean"] == pytest.approx(np.average(stable, weights=params), rel=1e-9)
    assert summary["effective_rank_mean"] == pytest.approx(np.mean(eff), rel=1e-8)
    assert summary["utilization_mean"] == pytest.approx(np.mean(util), rel=1e-9)
    ranks = sorted(k90)
    position = 0.9 * (len(ranks) - 1)
    low = int(math.floor(position))
    p90 = ranks[low] + (ranks[min(low + 1, len(ranks) - 1)] - ranks[low]) * (position - low)
    assert summary["energy_rank_90_p90"] == pytest.approx(p90)
    assert summary["energy_rank_90_p50"] == pytest.approx(np.median(k90))
    assert summary["suggested_r_global_median"] == 2 ** math.ceil(math.log2(max(np.median(k90), 1)))
    assert summary["suggested_r_global_90"] == 2 ** math.ceil(math.log2(max(p90, 1)))
    for kind in ("attn", "mlp"):
        rows = [i for i, t in enumerate(types) if t == kind]
        by_type = summary["by_type"][kind]
        assert by_type["n_layers"] == len(rows)
        assert by_type["params"] == sum(params[i] for i in rows)
        assert by_type["stable_rank_mean"] == pytest.approx(np.mean([stable[i] for i in rows]), rel=1e-9)
        assert by_type["utilization_mean"] == pytest.approx(np.mean([util[i] for i in rows]), rel=1e-9)
    assert summary["schema"] == gl.SCHEMA_VERSION


def test_suggest_rank_rounds_up_to_a_power_of_two():
    assert [gl.suggest_rank(k) for k in (0, 1, 1.2, 2, 3, 4.0, 4.5, 17)] == [1, 1, 2, 2, 4, 4, 8, 32]
    assert gl.suggest_rank(None) is None


def test_summary_dict_with_layers_and_topk_lowest_utilization_first():
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_bf16_all_linear")
    rows = result.to_summary_dict(include_layers=True, topk_layers=3)["layers"]
    assert len(rows) == 3
    utilizations = sorted(layer.utilization for layer in result.layers)[:3]
    assert [row["utilization"] for row in rows] == utilizations
    assert "layers" not in result.to_summary_dict()


def test_metrics_event_shape():
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp16")
    event = result.to_metrics_event("run-1", step=7)
    assert {k: event[k] for k in ("run_id", "event", "kind", "step")} == {
        "run_id": "run-1", "event": "metrics", "kind": "lora_audit", "step": 7}
    assert event["schema"] and isinstance(event["ts"], float)
    assert event["metrics"]["n_layers"] == len(result.layers)


# ── the CLI ──────────────────────────────────────────────────────────────────

def test_cli_json_is_one_document_on_stdout():
    proc = run_cli("audit", str(PEFT_FIXTURES / "llama_patterns"), "--json", "--layers", "--top-singular-values", "3", timeout=120)
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["n_layers"] == 48 and len(document["layers"]) == 48
    assert len(document["layers"][0]["top_singular_values"]) == 3
    assert "NaN" not in proc.stdout and "Infinity" not in proc.stdout


def test_cli_text_report_shows_the_sections():
    proc = run_cli("audit", PEFT_FIXTURES / "llama_bf16_all_linear", "--top-wasteful", "2")
    assert proc.returncode == 0, proc.stderr
    for text in ("stable rank", "attn", "mlp", "suggested r", "most wasteful modules (lowest utilization, top 2)",
                 "UDR not computed: add --base-model"):
        assert text in proc.stdout
    assert "UDR < 0.1" not in proc.stdout  # the UDR cheat sheet only when there is UDR to read


def test_cli_peft_dir_flag_and_adapter_flag():
    proc = run_cli("audit", "--peft-dir", PEFT_FIXTURES / "two_adapters", "--adapter", "second", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["adapter_name"] == "second"


@pytest.mark.parametrize("args,message", [
    (["audit", "/nonexistent/adapter"], "no such file or directory"),
    (["audit"], "needs an adapter directory"),
    (["frobnicate"], "invalid choice"),
    ([], "a command is required"),
    (["audit", "x", "--top-wasteful", "-1"], "must be >= 0"),
])
def test_cli_usage_errors_exit_2_with_one_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_refuses_pickle_weights_without_opening_them(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(Vtouch " + str(marker).encode() + b"\ntR.")
    proc = run_cli("audit", tmp_path)
    assert proc.returncode == 2
    assert "pickle" in proc.stderr and "safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_cli_append_reuses_run_id_and_last_step(tmp_path):
    run = tmp_path / "run.jsonl"
    run.write_text(json.dumps({"run_id": "abc", "event": "train", "step": 41}) + "\n")
    proc = run_cli("audit", PEFT_FIXTURES / "llama_fp16", "--append", run)
    assert proc.returncode == 0, proc.stderr
    event = json.loads(run.read_text().splitlines()[-1])
    assert (event["run_id"], event["step"], event["kind"]) == ("abc", 41, "lora_audit")


def test_json_for_a_224_module_adapter_parses(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(32):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if proj[0] in 'qkvo' else 'mlp'}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = to_bf16_bits(rng.normal(size=(4, 16)))
            tensors[f"{prefix}.lora_B.weight"] = to_bf16_bits(rng.normal(size=(12, 4)) * (layer % 3))
    write_safetensors(tmp_path / "adapter_model.safetensors", tensors, dtype_override={k: "BF16" for k in tensors})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    proc = run_cli("audit", tmp_path, "--json", "--layers")
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["n_layers"] == 224 and len(document["layers"]) == 224
    assert document["by_type"]["attn"]["n_layers"] == 128 and document["by_type"]["mlp"]["n_layers"] == 96


def test_the_audit_path_never_imports_torch_transformers_peft_or_hub(tmp_path):
    # Importing any of them raises inside this subprocess; a full audit (CLI, JSON, UDR) must still work.
    blocker = ("import sys\n"
               "for name in ('torch', 'transformers', 'peft', 'huggingface_hub', 'safetensors.torch'):\n"
               "    sys.modules[name] = None\n")
    base = ROOT / "tests" / "fixtures" / "base" / "llama_fp32"
    proc = run_cli("audit", PEFT_FIXTURES / "llama_fp32_qv", "--json", "--layers", "--base-model", base,
                   preamble=blocker)
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["n_layers"] == 4
    check = subprocess.run([sys.executable, "-c", blocker + "import gradience_lite, base_norms; "
                            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                            "('torch', 'transformers', 'peft', 'huggingface_hub') and sys.modules[m] is not None))"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "[]"
