"""Fixes from the newcomer review of main: each test failed before its fix."""
import json
import re
import shutil

import pytest

import gradience_lite as gl
from conftest import FIXTURES, PEFT_FIXTURES, ROOT, run_cli

README = (ROOT / "README.md").read_text(encoding="utf-8")
PIPELINE = FIXTURES / "udr" / "sd_pipeline"
KOHYA_SD15 = FIXTURES / "udr" / "kohya_sd15"
ZERO_INIT = PEFT_FIXTURES / "llama_zero_init"
QV = PEFT_FIXTURES / "llama_fp32_qv"


# 1 ── a diffusers pipeline folder is a base for the CLI as it is for the API

def test_cli_accepts_a_diffusers_pipeline_folder_as_base_like_the_api():
    api = gl.audit_lora_peft_dir(str(KOHYA_SD15), base_model=str(PIPELINE)).to_summary_dict()
    proc = run_cli("audit", KOHYA_SD15, "--base-model", PIPELINE, "--json")
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(proc.stdout)
    assert cli["n_layers_with_udr"] == api["n_layers_with_udr"] == cli["n_layers"] > 0
    # Same numbers up to the last bits: the Lanczos mat-vecs run through
    # threaded BLAS, whose reduction order may differ between two processes.
    assert cli["udr_median"] == pytest.approx(api["udr_median"], rel=1e-12)
    proc = run_cli("compare", KOHYA_SD15, KOHYA_SD15, "--base-model", PIPELINE, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["a"]["summary"]["udr_median"] == pytest.approx(api["udr_median"], rel=1e-12)


def test_norms_on_a_pipeline_folder_names_the_component_folders():
    proc = run_cli("norms", PIPELINE, "--out", "/nonexistent-dir-h10/n.json")
    assert proc.returncode == 2  # the --out directory is refused first
    proc = run_cli("norms", PIPELINE, "--out", ROOT / "test-artifacts" / "unused.json")
    assert proc.returncode == 2 and "unet/" in proc.stderr and "pass one of them" in proc.stderr


# 2 ── compare with no update cosine anywhere

def test_compare_without_any_update_cosine_does_not_crash():
    for pair in ((ZERO_INIT, QV), (QV, ZERO_INIT)):
        for extra in ((), ("--json",)):
            proc = run_cli("compare", *pair, *extra)
            assert proc.returncode == 0, proc.stderr
            assert "internal error" not in proc.stderr
    proc = run_cli("compare", QV, PEFT_FIXTURES / "llama_rslora", "--top", "0")
    assert proc.returncode == 0 and "internal error" not in proc.stderr, proc.stderr
    assert "lowest cosine" not in proc.stdout  # no empty "top 0" table


def test_compare_json_does_not_render_the_text(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise AssertionError("the text report was rendered under --json")
    monkeypatch.setattr(gl, "render_comparison", broken)
    assert gl.main(["compare", str(QV), str(ZERO_INIT), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_common"] > 0


# 3 ── README: attach_udr returns a new result

def test_readme_assigns_the_result_of_attach_udr():
    starts = [match.start() for match in re.finditer(r"attach_udr\(result", README)]
    assert starts and all(README[start - 10:start].endswith("`result = ") for start in starts)


# 4 ── --html does not change the JSON

def test_html_report_does_not_change_the_json(tmp_path):
    plain = run_cli("audit", QV, "--json", "--layers")
    with_html = run_cli("audit", QV, "--json", "--layers", "--html", tmp_path / "r.html")
    assert plain.returncode == with_html.returncode == 0, with_html.stderr
    assert json.loads(plain.stdout) == json.loads(with_html.stdout)
    assert all(layer["top_singular_values"] is None for layer in json.loads(with_html.stdout)["layers"])
    assert "Singular-value spectra" in (tmp_path / "r.html").read_text() or "spectr" in (tmp_path / "r.html").read_text()
    asked = json.loads(run_cli("audit", QV, "--json", "--layers", "--top-singular-values", "2",
                               "--html", tmp_path / "r2.html").stdout)
    assert all(len(layer["top_singular_values"]) == 2 for layer in asked["layers"])


# 7 ── nothing to audit is an error; one issue when there is no config

def test_a_file_without_lora_factors_exits_2_with_one_line():
    proc = run_cli("audit", FIXTURES / "base" / "llama_fp32")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no LoRA factors found in" in proc.stderr


def test_an_adapter_whose_every_module_is_refused_is_still_a_result_with_issues():
    proc = run_cli("audit", FIXTURES / "variants" / "field_refused", "--json")
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["n_layers"] == 0 and document["n_modules_skipped"] == 4
    assert sum("not audited" in issue for issue in document["issues"]) == 4


def test_a_missing_config_is_reported_once(tmp_path):
    shutil.copy(QV / "adapter_model.safetensors", tmp_path / "adapter_model.safetensors")
    document = json.loads(run_cli("audit", tmp_path, "--json").stdout)
    no_config = [issue for issue in document["issues"] if "config" in issue and "scale" in issue]
    assert len(no_config) == 1 and no_config[0].startswith("config: "), document["issues"]
    # The API with no config at all still says so (once).
    result = gl.audit_lora_state_dict({"q.lora_A.weight": [[1.0, 0.0]], "q.lora_B.weight": [[1.0]]})
    assert sum(issue.startswith("config: no usable adapter config") for issue in result.issues) == 1


# 9, 10, 11 ── README and issue texts

def test_readme_dora_count_and_direction_and_scale_rules():
    assert "eleven DoRA" not in README
    assert "rescales each column" not in README and "merged weight's columns" not in README
    assert "each column" not in gl.LORA_CONFIG_FIELDS["use_dora"].text and "row" in gl.LORA_CONFIG_FIELDS["use_dora"].text
    scale_row = next(line for line in README.splitlines() if line.startswith("| `alpha`, `scale`, `scale_rule`"))
    assert "`diffusers_old`" in scale_row and '"implicit 1 (no alpha)"' in scale_row
    rules = {layer["scale_rule"] for layer in json.loads(
        run_cli("audit", FIXTURES / "formats" / "diffusers_old", "--json", "--layers").stdout)["layers"]}
    assert rules and all(f'"{rule}"' in scale_row for rule in rules)


# 12, 13 ── usage and help texts

def test_missing_command_lists_every_subcommand():
    proc = run_cli()
    assert proc.returncode == 2
    for name in ("audit", "compare", "norms"):
        assert name in proc.stderr.split("required:")[1]


def test_compare_help_has_no_exit_1_and_audit_help_shows_zero_defaults():
    compare = run_cli("compare", "--help").stdout
    assert "exit codes:" in compare and not re.search(r"^\s+1\s", compare, re.M)
    audit = run_cli("audit", "--help").stdout
    assert re.search(r"^\s+1\s", audit, re.M)
    assert re.search(r"--top-singular-values K\s+report the first K singular values \(default: 0\)", audit)
    assert "--json                print one JSON document on stdout\n" in audit  # store_true: no default shown


# 14 ── norms

def test_norms_refuses_bad_tolerances_and_names_itself(tmp_path):
    base = FIXTURES / "base" / "llama_fp32"
    for bad in (("--tol", "-1"), ("--tol", "0"), ("--tol", "nan"), ("--max-iter", "0")):
        proc = run_cli("norms", base, "--out", tmp_path / "n.json", *bad)
        assert proc.returncode == 2 and bad[0] in proc.stderr and not (tmp_path / "n.json").exists()
        assert "gradience-lite norms: error:" in proc.stderr and "base_norms" not in proc.stderr
    proc = run_cli("norms", "no-such-owner-h10/no-such-model", "--out", tmp_path / "n.json")
    assert proc.returncode == 2 and "--base-norms" not in proc.stderr
    proc = run_cli("audit", QV, "--base-model", "no-such-owner-h10/no-such-model")
    assert proc.returncode == 2 and "--base-norms FILE" in proc.stderr
    missing = tmp_path / "missing"
    proc = run_cli("norms", base, "--out", missing / "n.json", "--only", "q_proj")
    assert proc.returncode == 2 and str(missing) in proc.stderr and not missing.exists()


# 15 ── drift honours --no-overlap and says why a pair has no cosine

def test_drift_honours_no_overlap_and_explains_empty_pairs(tmp_path):
    for step, source in ((1, QV), (2, ZERO_INIT), (3, QV)):
        shutil.copytree(source, tmp_path / f"checkpoint-{step}")
    document = json.loads(run_cli("compare", tmp_path, "--json").stdout)
    assert [row["update_cosine_mean"] for row in document["pairs"]] == [None, None]  # each pair has the zero update
    assert all(any(issue.startswith("overlap: no module has an update cosine") for issue in row["issues"])
               for row in document["pairs"])
    (tmp_path / "checkpoint-2").rename(tmp_path / "checkpoint-4")
    shutil.copytree(QV, tmp_path / "checkpoint-2")
    document = json.loads(run_cli("compare", tmp_path, "--json", "--no-overlap").stdout)
    assert all(row["update_cosine_mean"] is None and "overlap: not computed (--no-overlap)" in row["issues"]
               for row in document["pairs"])
    document = json.loads(run_cli("compare", tmp_path, "--json").stdout)
    assert document["pairs"][0]["update_cosine_mean"] is not None and document["pairs"][0]["issues"] == []
