"""Base norms and UDR, specified against exact SVDs of the base weights and
dense ΔW formed from the PEFT fixtures."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

import base_norms as bn
import gradience_lite as gl
from conftest import run_cli, FIXTURES, PEFT_FIXTURES, ROOT, fixture_deltas, oracle_load, write_safetensors

BASES = FIXTURES / "base"


def matrix_with_spectrum(sigma, rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(rows, len(sigma))))
    v, _ = np.linalg.qr(rng.normal(size=(cols, len(sigma))))
    return (u * np.asarray(sigma)) @ v.T


# ── σ_max ────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("label,matrix", [
    ("gaussian", np.random.default_rng(1).normal(size=(300, 200))),
    ("tall gaussian", np.random.default_rng(2).normal(size=(500, 40))),
    ("sigma1 ~ sigma2", matrix_with_spectrum(np.r_[1.0, 1.0 - 1e-4, np.linspace(0.99, 0.01, 60)], 120, 90)),
    ("sigma1 == sigma2", matrix_with_spectrum(np.r_[2.0, 2.0, 2.0, np.linspace(1.9, 0.1, 40)], 100, 80, seed=3)),
    ("rank deficient", matrix_with_spectrum([5.0, 4.0, 0.5], 100, 80, seed=4)),
    ("rank one", np.outer(np.arange(1.0, 51.0), np.linspace(-1, 1, 30))),
    ("one row", np.random.default_rng(5).normal(size=(1, 64))),
    ("one column", np.random.default_rng(6).normal(size=(64, 1))),
])
def test_spectral_norm_matches_exact_svd_at_default_tolerance(label, matrix):
    matrix = matrix.astype(np.float32)
    exact = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[0]
    result = bn.spectral_norm(matrix)
    assert result.converged, label
    assert result.sigma_max == pytest.approx(exact, rel=1e-6), label


def test_spectral_norm_of_zero_matrix_is_zero():
    assert bn.spectral_norm(np.zeros((10, 7), np.float32)) == (0.0, 1, True)


def test_spectral_norm_beats_power_iteration_when_the_gap_is_small():
    matrix = np.random.default_rng(0).normal(size=(400, 400)).astype(np.float32)
    exact = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[0]
    v = np.random.default_rng(0).normal(size=400)
    for _ in range(20):  # 20 plain power steps on AᵀA
        v = matrix.T @ (matrix @ v)
        v /= np.linalg.norm(v)
    power = np.linalg.norm(matrix @ v)
    result = bn.spectral_norm(matrix)
    assert abs(power - exact) / exact > 1e-3  # power iteration is visibly low
    assert abs(result.sigma_max - exact) / exact <= 1e-6
    assert result.iterations < 120


def test_spectral_norm_is_deterministic_and_reports_non_convergence():
    matrix = np.random.default_rng(9).normal(size=(200, 150)).astype(np.float32)
    assert bn.spectral_norm(matrix) == bn.spectral_norm(matrix)
    capped = bn.spectral_norm(matrix, max_iter=3)
    assert (capped.iterations, capped.converged) == (3, False)
    assert capped.sigma_max < np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[0]


def test_frobenius_norm_is_exact():
    matrix = np.random.default_rng(0).normal(size=(1000, 33)).astype(np.float32)
    assert bn.frobenius_norm(matrix, block_rows=64) == pytest.approx(np.linalg.norm(matrix.astype(np.float64)), rel=1e-14)


# ── checkpoints ──────────────────────────────────────────────────────────────

@pytest.mark.parametrize("base,expected_files", [
    ("llama_fp32", 1), ("llama12_bf16_sharded", 4), ("gpt2_fp32", 1), ("bert_fp32", 1)])
def test_norms_of_real_checkpoints_match_exact_svd(base, expected_files):
    checkpoint = bn.resolve_base(BASES / base)
    assert len(checkpoint.files) == expected_files
    document = bn.compute_base_norms(BASES / base)
    oracle = {}
    for file in checkpoint.files:
        oracle.update(oracle_load(file))
    matrices = {name: values for name, values in oracle.items() if values.ndim >= 2}
    assert set(document["norms"]) == set(matrices)
    for name, values in matrices.items():
        record = document["norms"][name]
        matrix = values.reshape(values.shape[0], -1)
        assert record["sigma_max"] == pytest.approx(np.linalg.svd(matrix, compute_uv=False)[0], rel=1e-6), name
        assert record["fro_norm"] == pytest.approx(np.linalg.norm(matrix), rel=1e-12), name
        assert record["converged"] and record["shape"] == list(values.shape)
    assert document["method"] and document["tol"] == 1e-6
    assert all(set(fp) == {"size", "header_sha256"} for fp in document["files"].values())


def test_single_file_and_conv_kernels(tmp_path):
    kernel = np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)
    path = write_safetensors(tmp_path / "m.safetensors", {"conv.weight": kernel, "conv.bias": np.ones(8, np.float32)})
    document = bn.compute_base_norms(path)
    assert set(document["norms"]) == {"conv.weight"}  # 1-D tensors are skipped
    exact = np.linalg.svd(kernel.reshape(8, -1).astype(np.float64), compute_uv=False)[0]
    assert document["norms"]["conv.weight"]["sigma_max"] == pytest.approx(exact, rel=1e-6)


def fake_hub_cache(root, model_id="org/tiny-llama", base="llama_fp32"):
    repo = root / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(BASES / base, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


@pytest.mark.parametrize("variable,subdir", [("HF_HUB_CACHE", ""), ("HF_HOME", "hub")])
def test_hub_ids_resolve_offline_in_the_cache(tmp_path, monkeypatch, variable, subdir):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    cache = tmp_path / subdir if subdir else tmp_path
    cache.mkdir(exist_ok=True)
    snapshot = fake_hub_cache(cache)
    monkeypatch.setenv(variable, str(tmp_path))
    assert bn.resolve_base("org/tiny-llama").root == str(snapshot)


def test_missing_base_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(gl.AdapterFormatError) as error:
        bn.resolve_base("nobody/nothing")
    message = str(error.value)
    assert "models--nobody--nothing" in message and "downloaded" in message
    # The --base-norms hint is the CLI's (audit/compare have that option; `norms` does not): tests/test_review_fixes.py


def test_pickle_base_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(gl.AdapterFormatError, match="pickle"):
        bn.resolve_base(tmp_path)
    with pytest.raises(gl.AdapterFormatError, match="never unpickles"):
        bn.resolve_base(tmp_path / "pytorch_model.bin")


# ── norms files ──────────────────────────────────────────────────────────────

def test_norms_file_round_trip_is_atomic(tmp_path):
    document = bn.compute_base_norms(BASES / "llama_fp32", ["lm_head.weight"])
    path = tmp_path / "norms.json"
    bn.save_norms(path, document)
    assert [p.name for p in tmp_path.iterdir()] == ["norms.json"]  # no temp file left behind
    loaded = bn.load_norms(path)
    assert loaded["norms"] == json.loads(json.dumps(document["norms"]))
    assert loaded["format"] == bn.NORMS_FORMAT and loaded["files"] == document["files"]


def test_existing_records_are_reused_only_while_the_fingerprint_holds(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASES / "llama_fp32", base)
    document = bn.compute_base_norms(base, ["lm_head.weight"])
    document["norms"]["lm_head.weight"]["sigma_max"] = 12345.0  # a sentinel: reused means not recomputed
    reused = bn.compute_base_norms(base, ["lm_head.weight"], existing=document)
    assert reused["norms"]["lm_head.weight"]["sigma_max"] == 12345.0 and reused["stale_files"] == []
    # Rewrite the checkpoint with different values (same file name): the header hash changes.
    tensors = oracle_load(base / "model.safetensors")
    write_safetensors(base / "model.safetensors", {k: (v * 2).astype(np.float32) for k, v in tensors.items()},
                      metadata={"format": "pt", "changed": "yes"})
    recomputed = bn.compute_base_norms(base, ["lm_head.weight"], existing=document)
    assert recomputed["stale_files"] == ["model.safetensors"]
    exact = np.linalg.svd(tensors["lm_head.weight"] * 2, compute_uv=False)[0]
    assert recomputed["norms"]["lm_head.weight"]["sigma_max"] == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("document", [
    {"model.layers.0.self_attn.q_proj": {"sigma_max": 2.0, "fro_norm": 5.0}},
    {"model_id": "x/y", "base_norms": {"model.layers.0.self_attn.q_proj": {"base_sigma_max": 2.0, "base_fro_norm": 5.0}}},
])
def test_upstream_norms_formats_are_read(tmp_path, document):
    path = tmp_path / "upstream.json"
    path.write_text(json.dumps(document))
    loaded = bn.load_norms(path)
    assert loaded["norms"]["model.layers.0.self_attn.q_proj"] == {"sigma_max": 2.0, "fro_norm": 5.0}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "{}", json.dumps({"format": bn.NORMS_FORMAT, "norms": 3})])
def test_corrupted_norms_files_raise_a_clear_error(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(bn.NormsFileError, match=str(path)):
        bn.load_norms(path)


def test_invalid_records_are_dropped_and_listed(tmp_path):
    path = tmp_path / "n.json"
    path.write_text(json.dumps({"format": bn.NORMS_FORMAT, "files": {}, "norms": {
        "a.weight": {"sigma_max": 1.0, "fro_norm": 2.0}, "b.weight": {"sigma_max": "NaN", "fro_norm": 1.0},
        "c.weight": {"sigma_max": -1.0, "fro_norm": 1.0}}}))
    loaded = bn.load_norms(path)
    assert set(loaded["norms"]) == {"a.weight"} and set(loaded["errors"]) == {"b.weight", "c.weight"}


def test_cli_writes_a_norms_file_with_only_filter(tmp_path):
    out = tmp_path / "norms.json"
    proc = subprocess.run([sys.executable, "-m", "base_norms", str(BASES / "llama_fp32"), "--out", str(out),
                           "--only", r"self_attn\.q_proj"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    document = json.loads(out.read_text())
    assert sorted(document["norms"]) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    proc = subprocess.run([sys.executable, "-m", "base_norms", str(tmp_path / "missing"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


# ── matching modules to base weights ─────────────────────────────────────────

def test_matching_handles_wrapper_prefixes_ambiguity_and_misses():
    params = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
              "h.0.attn.c_attn.weight", "encoder.block.0.q.weight", "decoder.block.0.q.weight", "wte.weight"]
    modules = ["model.layers.0.self_attn.q_proj", "transformer.h.0.attn.c_attn", "block.0.q", "lm_head", "transformer.wte"]
    matches, issues = gl.match_base_parameters(modules, params)
    assert matches == {"model.layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj.weight",
                       "transformer.h.0.attn.c_attn": "h.0.attn.c_attn.weight", "transformer.wte": "wte.weight"}
    assert any("block.0.q: ambiguous" in issue for issue in issues)
    assert any("lm_head: no base weight" in issue for issue in issues)
    # a base saved under an extra wrapper (LlamaForCausalLM inside another model) still matches
    matches, _ = gl.match_base_parameters(["model.layers.0.mlp.up_proj"], ["language_model.model.layers.0.mlp.up_proj.weight"])
    assert matches == {"model.layers.0.mlp.up_proj": "language_model.model.layers.0.mlp.up_proj.weight"}


def test_layer_replication_maps_copies_to_their_source_layer():
    mapping = gl._layer_replication_map([[0, 4], [2, 5]])
    assert mapping == {0: 0, 1: 1, 2: 2, 3: 3, 4: 2, 5: 3, 6: 4}
    assert gl.base_module_name("model.layers.5.self_attn.q_proj", mapping) == "model.layers.3.self_attn.q_proj"
    assert gl.base_module_name("model.layers.1.mlp.up_proj", mapping) == "model.layers.1.mlp.up_proj"


# ── UDR in the audit ─────────────────────────────────────────────────────────

def udr_oracle(case, base):
    """name → (‖ΔW‖₂, ‖ΔW‖_F, ‖W_base‖₂, ‖W_base‖_F), all from dense float64 arrays."""
    weights = {}
    for file in bn.resolve_base(BASES / base).files:
        weights.update(oracle_load(file))
    out = {}
    for name, (delta, _, _, _) in fixture_deltas(PEFT_FIXTURES / case).items():
        base_weight = next(v for k, v in weights.items()
                           if k == name + ".weight" or k.endswith("." + name + ".weight") or name.endswith("." + k[:-7]))
        base_weight = base_weight.reshape(base_weight.shape[0], -1)
        out[name] = (np.linalg.norm(delta, 2), np.linalg.norm(delta),
                     np.linalg.svd(base_weight, compute_uv=False)[0], np.linalg.norm(base_weight))
    return out


@pytest.mark.parametrize("case,base", [
    ("llama_fp32_qv", "llama_fp32"), ("llama_patterns", "llama12_bf16_sharded"), ("gpt2_conv1d", "gpt2_fp32"),
    ("bert_qv_dense", "bert_fp32"), ("llama_embedding", "llama_fp32"), ("llama_bf16_all_linear", "llama_fp32")])
def test_udr_sdi_match_the_oracle_for_every_module(case, base):
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / case, base_model=str(BASES / base))
    oracle = udr_oracle(case, base)
    assert not [issue for issue in result.issues if issue.startswith("udr")], result.issues
    assert {layer.name for layer in result.layers} == set(oracle)
    for layer in result.layers:
        delta_sigma, delta_fro, base_sigma, base_fro = oracle[layer.name]
        assert layer.base_sigma_max == pytest.approx(base_sigma, rel=1e-6)
        assert layer.base_fro_norm == pytest.approx(base_fro, rel=1e-9)
        assert layer.udr == pytest.approx(delta_sigma / (base_sigma + 1e-12), rel=2e-6)
        assert layer.udr_f == pytest.approx(delta_fro / (base_fro + 1e-12), rel=1e-9)
        assert layer.sdi == pytest.approx(math.log10(delta_sigma / base_sigma + 1e-12), abs=1e-6)
    summary = result.to_summary_dict()
    udr = np.array([delta_sigma / base_sigma for delta_sigma, _, base_sigma, _ in oracle.values()])
    sdi = np.log10(udr + 1e-12)
    assert summary["n_layers_with_udr"] == len(udr)
    assert summary["udr_mean"] == pytest.approx(udr.mean(), rel=2e-6)
    assert summary["udr_median"] == pytest.approx(np.median(udr), rel=2e-6)
    assert summary["udr_p90"] == pytest.approx(np.percentile(udr, 90), rel=2e-6)
    assert summary["udr_max"] == pytest.approx(udr.max(), rel=2e-6)
    assert summary["sdi_mean"] == pytest.approx(sdi.mean(), abs=1e-6)
    assert summary["sdi_median"] == pytest.approx(np.median(sdi), abs=1e-6)
    assert summary["sdi_p90"] == pytest.approx(np.percentile(sdi, 90), abs=1e-6)
    assert summary["fraction_udr_gt_0_1"] == pytest.approx(np.mean(udr > 0.1))
    assert summary["fraction_udr_gt_0_3"] == pytest.approx(np.mean(udr > 0.3))


def test_only_the_adapted_base_tensors_are_read(tmp_path):
    cache = tmp_path / "cache.json"
    gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=str(BASES / "llama_fp32"),
                           base_norms_cache=str(cache))
    assert sorted(json.loads(cache.read_text())["norms"]) == [
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "v")]


def test_cache_is_reused_extended_and_never_trusted_when_corrupted(tmp_path):
    cache = tmp_path / "cache.json"
    base = str(BASES / "llama_fp32")
    gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=base, base_norms_cache=str(cache))
    document = json.loads(cache.read_text())
    document["norms"]["model.layers.0.self_attn.q_proj.weight"]["sigma_max"] = 1000.0  # sentinel
    cache.write_text(json.dumps(document))
    reused = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=base, base_norms_cache=str(cache))
    assert {l.name: l.base_sigma_max for l in reused.layers}["model.layers.0.self_attn.q_proj"] == 1000.0
    # A different adapter extends the same cache in place.
    gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp16", base_model=base, base_norms_cache=str(cache))
    names = set(json.loads(cache.read_text())["norms"])
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    # Corrupted: reported, recomputed, rewritten as valid JSON.
    cache.write_text('{"format": "gradience_lite.base_norms/1", "norms": {tor')
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=base, base_norms_cache=str(cache))
    assert any("corrupted" in issue for issue in result.issues)
    assert all(layer.udr is not None for layer in result.layers)
    assert bn.load_norms(cache)["norms"]


def test_cache_from_another_base_is_not_used(tmp_path):
    cache = tmp_path / "cache.json"
    other = tmp_path / "other"
    shutil.copytree(BASES / "llama_fp32", other)
    tensors = oracle_load(other / "model.safetensors")
    write_safetensors(other / "model.safetensors", {k: (v * 3).astype(np.float32) for k, v in tensors.items()})
    gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=str(other), base_norms_cache=str(cache))
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model=str(BASES / "llama_fp32"),
                                    base_norms_cache=str(cache))
    assert any("does not match this base" in issue for issue in result.issues)
    oracle = udr_oracle("llama_fp32_qv", "llama_fp32")
    for layer in result.layers:
        assert layer.base_sigma_max == pytest.approx(oracle[layer.name][2], rel=1e-6)


def test_precomputed_norms_file_is_read_only_and_partial_files_leave_nulls(tmp_path):
    norms = tmp_path / "norms.json"
    document = bn.compute_base_norms(BASES / "llama_fp32", ["model.layers.0.self_attn.q_proj.weight"])
    bn.save_norms(norms, document)
    before = norms.read_text()
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_norms=str(norms))
    assert norms.read_text() == before
    udr = {layer.name: layer.udr for layer in result.layers}
    assert udr["model.layers.0.self_attn.q_proj"] is not None
    assert sum(value is None for value in udr.values()) == 3
    assert sum("no base weight named like it" in issue for issue in result.issues) == 3
    assert result.to_summary_dict()["n_layers_with_udr"] == 1


def test_unconverged_norms_give_null_udr_and_an_issue(tmp_path):
    norms = tmp_path / "norms.json"
    document = bn.compute_base_norms(BASES / "llama_fp32", ["model.layers.0.self_attn.q_proj.weight"])
    document["norms"]["model.layers.0.self_attn.q_proj.weight"].update(converged=False, iterations=7)
    bn.save_norms(norms, document)
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_norms=str(norms))
    assert all(layer.udr is None for layer in result.layers)
    assert any("did not converge in 7 iterations" in issue for issue in result.issues)


def test_missing_base_still_completes_the_audit():
    # The API goes on with an issue; the CLI refuses the path up front (tests/test_cli.py).
    document = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model="/nonexistent/base").to_summary_dict(
        include_layers=True)
    assert all(row["udr"] is None for row in document["layers"])
    assert any("not found" in issue for issue in document["issues"])


def test_base_model_auto_reads_the_adapter_config(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(PEFT_FIXTURES / "llama_fp32_qv", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(BASES / "llama_fp32")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = gl.audit_lora_peft_dir(adapter, base_model="auto")
    assert all(layer.udr is not None for layer in result.layers)
    # Without "auto" the config's base is never used behind the user's back.
    assert all(layer.udr is None for layer in gl.audit_lora_peft_dir(adapter).layers)


def test_hub_id_base_resolves_through_the_cache(tmp_path, monkeypatch):
    fake_hub_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    result = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv", base_model="org/tiny-llama")
    assert all(layer.udr is not None for layer in result.layers)


def test_no_udr_flag_skips_the_base():
    proc = run_cli("audit", str(PEFT_FIXTURES / "llama_fp32_qv"), "--json", "--base-model", str(BASES / "llama_fp32"), "--no-udr", timeout=120)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["n_layers_with_udr"] == 0


def test_text_report_shows_udr_by_type_and_cheat_sheet():
    proc = run_cli("audit", str(PEFT_FIXTURES / "llama_bf16_all_linear"), "--base-model", str(BASES / "llama_fp32"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "UDR over 14 modules" in proc.stdout
    assert "attn   UDR p50" in proc.stdout and "mlp    UDR p50" in proc.stdout
    assert "UDR > 3" in proc.stdout


def test_layer_replication_reads_the_source_layers_base_weight(tmp_adapter):
    # PEFT layer_replication [[0, 2], [1, 2]]: layers 0, 1 of the base, then layer 1 again as layer 2.
    rng = np.random.default_rng(8)
    tensors = {}
    for layer in range(3):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.normal(size=(4, 32)).astype(np.float32) * 0.1
        tensors[f"{prefix}.lora_B.weight"] = rng.normal(size=(32, 4)).astype(np.float32) * 0.01
    folder = tmp_adapter(tensors, {"r": 4, "lora_alpha": 8, "layer_replication": [[0, 2], [1, 2]]})
    result = gl.audit_lora_peft_dir(folder, base_model=str(BASES / "llama_fp32"))
    base = oracle_load(BASES / "llama_fp32" / "model.safetensors")
    expected = {layer: np.linalg.svd(base[f"model.layers.{source}.self_attn.q_proj.weight"], compute_uv=False)[0]
                for layer, source in ((0, 0), (1, 1), (2, 1))}
    for layer in result.layers:
        assert layer.base_sigma_max == pytest.approx(expected[layer.layer_index], rel=1e-6)
    assert not [issue for issue in result.issues if issue.startswith("udr")]


def test_a_base_weight_with_nan_is_an_error_not_a_number(tmp_path):
    weight = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    weight[2, 3] = np.nan
    path = write_safetensors(tmp_path / "m.safetensors", {"w.weight": weight, "ok.weight": np.eye(4, dtype=np.float32)})
    document = bn.compute_base_norms(path)
    assert "contains NaN/Inf" in document["errors"]["w.weight"]
    assert document["norms"]["ok.weight"]["sigma_max"] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_a_weight_map_pointing_outside_the_base_directory_is_refused(tmp_path, shard):
    # The index is read by `gradience-lite norms` too, not only by audits.
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(gl.AdapterFormatError, match="outside the base directory"):
        bn.resolve_base(tmp_path)
