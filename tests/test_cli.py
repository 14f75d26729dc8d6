"""Command-line conventions: --version, `norms`, base paths that do not exist,
--fail-on for CI, the text report's sections, --help, aligned tables, compare
with a base and with saved documents, and the file modes of what is written."""
import json
import re
import stat
from pathlib import Path

import numpy as np
import pytest

import base_norms as bn
import gradience_lite as gl
from conftest import FIXTURES, PEFT_FIXTURES, ROOT, oracle_load, run_cli

BASES = FIXTURES / "base"
CLEAN = PEFT_FIXTURES / "llama_fp16"  # an adapter with no issues at all


# ── version ─────────────────────────────────────────────────────────────────

def test_version_flag_and_attribute_agree_with_the_package_metadata():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"gradience-lite {gl.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", gl.__version__)
    pyproject = (ROOT / "pyproject.toml").read_text()
    # One source of truth: pyproject reads the version from the module, and states none of its own.
    assert 'dynamic = ["version"]' in pyproject and 'attr = "gradience_lite.__version__"' in pyproject
    project_table = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project_table, re.M)


# ── norms ───────────────────────────────────────────────────────────────────

def test_norms_subcommand_is_base_norms(tmp_path):
    via_cli = tmp_path / "cli.json"
    proc = run_cli("norms", BASES / "llama_fp32", "--out", via_cli, "--only", r"q_proj", "--quiet")
    assert proc.returncode == 0, proc.stderr
    direct = tmp_path / "direct.json"
    assert bn.main([str(BASES / "llama_fp32"), "--out", str(direct), "--only", "q_proj", "--quiet"]) == 0
    cli_norms, direct_norms = json.loads(via_cli.read_text())["norms"], json.loads(direct.read_text())["norms"]
    assert cli_norms.keys() == direct_norms.keys() and len(cli_norms) == 2
    weights = oracle_load(BASES / "llama_fp32" / "model.safetensors")
    for name, record in cli_norms.items():  # and the numbers are right (dense SVD)
        assert record["sigma_max"] == pytest.approx(np.linalg.svd(weights[name], compute_uv=False)[0], rel=1e-5)
    assert run_cli("norms", "--help").returncode == 0
    assert run_cli("norms").returncode == 2  # base_norms' own usage error


# ── base paths that do not exist ────────────────────────────────────────────

@pytest.mark.parametrize("flag, value, says", [
    ("--base-model", "/no/such/base", "/no/such/base"),
    ("--base-norms", "/no/such/norms.json", "--base-norms /no/such/norms.json: no such file"),
    ("--base-norms-cache", "/no/such/cache.json", "--base-norms-cache /no/such/cache.json: no such file"),
])
def test_a_base_path_that_does_not_exist_is_a_usage_error(flag, value, says):
    proc = run_cli("audit", CLEAN, flag, value)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr and "Traceback" not in proc.stderr


def test_an_uncached_hub_id_says_it_was_looked_up_offline_and_where(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    proc = run_cli("audit", CLEAN, "--base-model", "nobody/no-model",
                   preamble=f"import os; os.environ['HF_HUB_CACHE'] = {str(hub)!r}\n")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "offline" in proc.stderr and str(hub / "models--nobody--no-model") in proc.stderr


def test_base_model_auto_is_checked_like_a_typed_path(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes((CLEAN / "adapter_model.safetensors").read_bytes())
    config = json.loads((CLEAN / "adapter_config.json").read_text())
    for base, code in ((str(BASES / "llama_fp32"), 0), ("/no/such/base/from/config", 2), (None, 2)):
        config["base_model_name_or_path"] = base
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        proc = run_cli("audit", adapter, "--base-model", "auto", "--json")
        assert proc.returncode == code, proc.stderr
        if code == 0:
            assert json.loads(proc.stdout)["n_layers_with_udr"] == 4
        else:
            assert len(proc.stderr.strip().splitlines()) == 1
            assert ("/no/such/base/from/config" if base else "names no base_model_name_or_path") in proc.stderr


def test_a_cache_in_a_missing_directory_is_a_usage_error():
    proc = run_cli("audit", CLEAN, "--base-model", BASES / "llama_fp32", "--base-norms-cache", "/no/such/dir/c.json")
    assert proc.returncode == 2 and "its directory does not exist" in proc.stderr


def test_base_paths_are_not_checked_with_no_udr():
    assert run_cli("audit", CLEAN, "--base-model", "/no/such/base", "--no-udr").returncode == 0


# ── --fail-on ───────────────────────────────────────────────────────────────

def damaged_adapter(tmp_adapter):
    """One module with NaN in A (skipped, nonfinite), one with stored r 4 where the
    config says 8 (rank-mismatch), a rank_pattern key that matches nothing, one zero update."""
    rng = np.random.default_rng(3)
    prefix = "base_model.model.model.layers.{}.self_attn.q_proj"
    a_nan = rng.normal(size=(4, 16))
    a_nan[0, 0] = np.nan
    tensors = {
        prefix.format(0) + ".lora_A.weight": a_nan, prefix.format(0) + ".lora_B.weight": rng.normal(size=(16, 4)),
        prefix.format(1) + ".lora_A.weight": rng.normal(size=(4, 16)), prefix.format(1) + ".lora_B.weight": rng.normal(size=(16, 4)),
        prefix.format(2) + ".lora_A.weight": rng.normal(size=(8, 16)), prefix.format(2) + ".lora_B.weight": np.zeros((16, 8)),
    }
    config = {"r": 8, "lora_alpha": 8, "rank_pattern": {"layers.1.self_attn.q_proj": 4, "nothing_matches_this": 2}}
    return tmp_adapter(tensors, config)


@pytest.mark.parametrize("condition, says", [
    ("skipped", "1 LoRA module(s) could not be audited"),
    ("nonfinite", "NaN/Inf"),
    ("zero", "the update is zero"),
    ("unmatched-pattern", "'nothing_matches_this' matches no audited module"),
    ("issues", "config: rank_pattern key"),
])
def test_fail_on_exits_1_with_reasons_on_stderr_and_the_json_on_stdout(tmp_adapter, condition, says):
    adapter = damaged_adapter(tmp_adapter)
    proc = run_cli("audit", adapter, "--json", "--fail-on", condition)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["schema"] == "gradience_lite.audit/1"  # stdout still carries the document
    assert f"fail-on {condition}:" in proc.stderr and says in proc.stderr


def test_fail_on_rank_mismatch():
    proc = run_cli("audit", PEFT_FIXTURES / "llama_patterns", "--fail-on", "rank-mismatch")
    assert proc.returncode == 1 and "stored rank 4 disagrees with config" in proc.stderr
    assert "LoRA audit:" in proc.stdout  # the text report still printed


def test_fail_on_passes_a_clean_adapter_and_never_looks_at_udr():
    everything = "issues,skipped,nonfinite,zero,unmatched-pattern,rank-mismatch"
    proc = run_cli("audit", CLEAN, "--base-model", BASES / "llama_fp32", "--json", "--fail-on", everything)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["udr_max"] is not None and proc.stderr.count("fail-on") == 0


def test_fail_on_refuses_unknown_conditions_and_batches():
    proc = run_cli("audit", CLEAN, "--fail-on", "issues,udr")
    assert proc.returncode == 2 and "unknown condition(s) udr" in proc.stderr
    assert run_cli("audit", CLEAN, CLEAN, "--fail-on", "issues").returncode == 2


def test_fail_on_reasons_reads_a_batch_line_too():
    line = gl.batch_audit_line(str(PEFT_FIXTURES / "llama_zero_init"), {})
    assert gl.fail_on_reasons(line, ["zero"]) and not gl.fail_on_reasons(line, ["skipped", "rank-mismatch"])


# ── the text report ─────────────────────────────────────────────────────────

def test_top_singular_values_are_shown_in_the_text_report():
    proc = run_cli("audit", CLEAN, "--top-singular-values", "3")
    assert proc.returncode == 0, proc.stderr
    assert "top 3 singular values of B·A" in proc.stdout
    tensors = oracle_load(CLEAN / "adapter_model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
    sigma = np.linalg.svd(b @ a, compute_uv=False)[:3]  # oracle: dense SVD of the formed B·A
    lines = proc.stdout.splitlines()
    section = lines[next(i for i, line in enumerate(lines) if "singular values of B·A" in line):]
    row = next(line for line in section if line.strip().startswith(name + " "))
    assert [float(v) for v in row.split()[1:]] == pytest.approx(sigma, rel=5e-3)  # printed to 3 digits


def test_singular_values_are_not_printed_unless_asked(tmp_path):
    # --html audits 64 singular values for its charts; the text report still shows only what was asked for.
    proc = run_cli("audit", CLEAN, "--html", tmp_path / "r.html")
    assert proc.returncode == 0 and "singular values of B·A" not in proc.stdout
    proc = run_cli("audit", CLEAN, "--html", tmp_path / "r.html", "--top-singular-values", "2")
    assert "top 2 singular values of B·A" in proc.stdout


def test_udr_cheat_sheet_only_with_udr():
    without = run_cli("audit", CLEAN).stdout
    assert "UDR > 3" not in without and "UDR not computed: add --base-model" in without
    with_base = run_cli("audit", CLEAN, "--base-model", BASES / "llama_fp32").stdout
    assert "UDR > 3" in with_base and "UDR not computed" not in with_base


def test_a_zero_update_is_headlined_as_zero():
    text = run_cli("audit", PEFT_FIXTURES / "llama_zero_init").stdout
    assert "the update is ZERO in every module" in text and "suggested r: 1" not in text
    assert "most wasteful" not in text


def test_help_has_examples_defaults_and_exit_codes():
    for args in (["--help"], ["audit", "--help"], ["compare", "--help"]):
        proc = run_cli(*args)
        assert proc.returncode == 0 and "examples:" in proc.stdout and "exit codes:" in proc.stdout
    audit_help = run_cli("audit", "--help").stdout
    assert "(default: 5)" in audit_help and "UDR is instrumentation, not a gate" in audit_help
    assert "rank-mismatch" in audit_help and "norms" in run_cli("--help").stdout


def test_layers_table_stays_aligned_for_long_module_names(tmp_adapter):
    rng = np.random.default_rng(5)
    tensors = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.encoder.blocks.0.a_rather_long_submodule_name.with_more.q_proj_x"):
        tensors[f"base_model.model.{name}.lora_A.weight"] = rng.normal(size=(2, 8))
        tensors[f"base_model.model.{name}.lora_B.weight"] = rng.normal(size=(8, 2))
    text = run_cli("audit", tmp_adapter(tensors, {"r": 2, "lora_alpha": 2}), "--layers").stdout
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("module "))
    header, rows = lines[start], lines[start + 1:start + 3]
    column = header.index(" type ") + 1
    for row in rows:  # the type column starts at the same offset on every row
        assert row[column:].split()[0] in ("attn", "mlp", "other"), (header, row)
    assert max(len(name) for name in tensors) > 60


# ── compare ─────────────────────────────────────────────────────────────────

def test_compare_takes_a_base_and_prints_integers_as_integers():
    proc = run_cli("compare", PEFT_FIXTURES / "llama_fp16", PEFT_FIXTURES / "llama_bf16_all_linear",
                   "--base-model", BASES / "llama_fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["a"]["summary"]["udr_max"] is not None and document["b"]["summary"]["udr_max"] is not None
    delta = document["summary_delta"]["total_lora_params"]
    assert isinstance(delta, int) and delta == 14848 - 1152
    text = run_cli("compare", PEFT_FIXTURES / "llama_fp16", PEFT_FIXTURES / "llama_bf16_all_linear").stdout
    assert re.search(r"total_lora_params\s+1152\s+14848\s+13696\b", text)
    assert "e+0" not in text


def test_compare_top_lists_modules_for_saved_documents(tmp_path):
    saved = []
    for case in ("llama_fp16", "llama_fp16"):
        proc = run_cli("audit", PEFT_FIXTURES / case, "--json", "--layers")
        saved.append(tmp_path / f"{case}-{len(saved)}.json")
        saved[-1].write_text(proc.stdout)
    proc = run_cli("compare", *saved, "--top", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "modules that changed most" in line)
    listed = [line for line in lines[start + 1:start + 4] if line.startswith("    model.")]
    assert len(listed) == 3


# ── files written ───────────────────────────────────────────────────────────

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_process_umask(tmp_path, umask, mode):
    html, events, lines = tmp_path / "r.html", tmp_path / "run.jsonl", tmp_path / "batch.jsonl"
    preamble = f"import os; os.umask({umask})\n"
    assert run_cli("audit", CLEAN, "--html", html, "--append", events, preamble=preamble).returncode == 0
    assert run_cli("audit", CLEAN, "--jsonl", lines, preamble=preamble).returncode == 0
    for path in (html, events, lines):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert text.strip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190
