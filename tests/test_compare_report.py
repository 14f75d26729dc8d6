"""compare, drift over checkpoints and batch audits — overlaps checked against
dense ΔW.  The HTML report's tests are in test_html_report.py."""
import json
import shutil

import numpy as np
import pytest

import gradience_lite as gl
from conftest import FIXTURES, PEFT_FIXTURES, fixture_deltas, run_cli, oracle_load, write_safetensors

BASES = FIXTURES / "base"


def dense_overlap(d1, d2):
    """Oracle: cosine, relative difference and principal cosines from dense ΔW and dense SVDs."""
    cosine = np.sum(d1 * d2) / (np.linalg.norm(d1) * np.linalg.norm(d2))
    difference = np.linalg.norm(d2 - d1) / np.linalg.norm(d1)

    def basis(delta, side):
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        keep = s > s[0] * 1e-10
        return u[:, keep] if side == "out" else vt[keep].T

    out = np.linalg.svd(basis(d1, "out").T @ basis(d2, "out"), compute_uv=False)
    inn = np.linalg.svd(basis(d1, "in").T @ basis(d2, "in"), compute_uv=False)
    return cosine, difference, out, inn


def test_update_overlap_matches_dense_on_random_low_rank_pairs():
    rng = np.random.default_rng(0)
    for trial in range(20):
        m, n, r1, r2 = 30, 24, int(rng.integers(1, 7)), int(rng.integers(1, 7))
        shared_b, shared_a = rng.normal(size=(m, 2)), rng.normal(size=(2, n))
        b1 = np.hstack([shared_b, rng.normal(size=(m, r1))])
        a1 = np.vstack([shared_a, rng.normal(size=(r1, n))])
        b2 = np.hstack([shared_b + 0.1 * rng.normal(size=(m, 2)), rng.normal(size=(m, r2))])
        a2 = np.vstack([shared_a, rng.normal(size=(r2, n))])
        s1, s2 = float(rng.uniform(0.5, 2)), float(rng.uniform(-2, 2))
        got = gl.update_overlap(gl.update_basis(a1, b1, s1), gl.update_basis(a2, b2, s2))
        cosine, difference, out, inn = dense_overlap(s1 * b1 @ a1, s2 * b2 @ a2)
        assert got.update_cosine == pytest.approx(cosine, abs=1e-9)
        assert got.relative_difference == pytest.approx(difference, rel=1e-7)
        np.testing.assert_allclose(got.principal_cosines_out, np.clip(out, 0, 1)[:8], atol=1e-7)
        np.testing.assert_allclose(got.principal_cosines_in, np.clip(inn, 0, 1)[:8], atol=1e-7)
        assert got.output_overlap == pytest.approx(np.sum(out ** 2) / min(b1.shape[1], b2.shape[1]), abs=1e-7)


def peft_delta(case, name):
    return fixture_deltas(PEFT_FIXTURES / case)[name][0]


def test_compare_two_peft_adapters():
    document = gl.compare_adapters(str(PEFT_FIXTURES / "llama_fp32_qv"), str(PEFT_FIXTURES / "llama_rslora"))
    assert document["n_common"] == 4 and document["only_in_a"] == []
    assert sorted(document["only_in_b"]) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "ko"]
    a = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_fp32_qv").to_summary_dict()
    b = gl.audit_lora_peft_dir(PEFT_FIXTURES / "llama_rslora").to_summary_dict()
    assert document["summary_delta"]["utilization_mean"] == pytest.approx(b["utilization_mean"] - a["utilization_mean"])
    cosines = []
    for module in document["modules"]:
        cosine, difference, out, inn = dense_overlap(peft_delta("llama_fp32_qv", module["name"]),
                                                     peft_delta("llama_rslora", module["name"]))
        assert module["overlap"]["update_cosine"] == pytest.approx(cosine, abs=1e-9)
        assert module["overlap"]["relative_difference"] == pytest.approx(difference, rel=1e-7)
        assert module["overlap"]["output_overlap"] == pytest.approx(np.sum(out ** 2) / min(8, 16), abs=1e-7)
        assert module["delta"]["stable_rank"] == pytest.approx(module["b"]["stable_rank"] - module["a"]["stable_rank"])
        cosines.append(cosine)
    assert document["overlap_summary"]["update_cosine_mean"] == pytest.approx(np.mean(cosines), abs=1e-9)
    json.dumps(document, allow_nan=False)


def test_an_adapter_compared_with_itself_overlaps_fully():
    path = str(PEFT_FIXTURES / "llama_bf16_all_linear")
    summary = gl.compare_adapters(path, path)["overlap_summary"]
    assert summary["n_modules"] == 14
    assert summary["update_cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert summary["relative_difference_mean"] == pytest.approx(0.0, abs=1e-6)
    assert summary["output_overlap_mean"] == pytest.approx(1.0, abs=1e-9)


def test_compare_with_a_saved_audit_json(tmp_path):
    saved = tmp_path / "audit.json"
    proc = run_cli("audit", str(PEFT_FIXTURES / "llama_fp32_qv"), "--json", "--layers", timeout=60)
    saved.write_text(proc.stdout)
    proc = run_cli("compare", str(saved), str(PEFT_FIXTURES / "llama_rslora"), "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["n_common"] == 4 and document["overlap_summary"]["n_modules"] == 0
    assert any("saved audit JSON" in issue for issue in document["issues"])
    text = run_cli("compare", str(saved), str(PEFT_FIXTURES / "llama_rslora"), timeout=60)
    assert "utilization_mean" in text.stdout and "only in B" in text.stdout


def test_compare_refuses_what_is_not_an_audit(tmp_path):
    bogus = tmp_path / "x.json"
    bogus.write_text('{"hello": 1}')
    proc = run_cli("compare", str(bogus), str(bogus), timeout=60)
    assert proc.returncode == 2 and "not an audit document" in proc.stderr and "Traceback" not in proc.stderr


def make_checkpoints(root, steps=(100, 200, 1000)):
    """Trainer-style checkpoint-N folders whose B factors drift step by step."""
    source = PEFT_FIXTURES / "llama_fp32_qv"
    tensors = oracle_load(source / "adapter_model.safetensors")
    rng = np.random.default_rng(3)
    saved = {}
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for key in tensors:
            if "lora_B" in key:
                tensors[key] = tensors[key] + 0.002 * rng.normal(size=tensors[key].shape)
        write_safetensors(folder / "adapter_model.safetensors", {k: v.astype(np.float32) for k, v in tensors.items()})
        shutil.copy(source / "adapter_config.json", folder)
        saved[step] = oracle_load(folder / "adapter_model.safetensors")
    return saved


def test_drift_over_checkpoints_in_step_order(tmp_path):
    saved = make_checkpoints(tmp_path)
    proc = run_cli("compare", str(tmp_path), "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert [(p["step_from"], p["step_to"]) for p in document["pairs"]] == [(100, 200), (200, 1000)]
    name = "model.layers.0.self_attn.q_proj"
    for pair in document["pairs"]:
        assert -1 <= pair["update_cosine_min"] <= pair["update_cosine_mean"] <= 1
        assert pair["n_modules"] == 4
    one = gl.compare_adapters(str(tmp_path / "checkpoint-100"), str(tmp_path / "checkpoint-200"))
    mine = next(m for m in one["modules"] if m["name"] == name)["overlap"]["update_cosine"]
    d1, d2 = (2.0 * saved[s][f"base_model.model.{name}.lora_B.weight"] @ saved[s][f"base_model.model.{name}.lora_A.weight"]
              for s in (100, 200))
    assert mine == pytest.approx(np.sum(d1 * d2) / np.linalg.norm(d1) / np.linalg.norm(d2), abs=1e-9)
    text = run_cli("compare", str(tmp_path), timeout=120).stdout
    assert "100 → 200" in text and "200 → 1000" in text


# ── batch ────────────────────────────────────────────────────────────────────

def test_batch_audits_in_parallel_and_continues_past_failures(tmp_path):
    out = tmp_path / "out.jsonl"
    paths = [PEFT_FIXTURES / "llama_fp16", tmp_path / "missing", FIXTURES / "formats" / "mlx_lm",
             PEFT_FIXTURES / "llama_patterns"]
    proc = run_cli("audit", *map(str, paths), "--jsonl", str(out), "--jobs", "2", timeout=120)
    assert proc.returncode == 1  # one adapter failed
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3]
    by_index = {line["index"]: line for line in lines}
    assert not by_index[1]["ok"] and "no such file or directory" in by_index[1]["error"]
    for index in (0, 2, 3):
        single = gl.audit_lora_peft_dir(paths[index]).to_summary_dict()
        assert by_index[index]["ok"] and by_index[index]["n_layers"] == single["n_layers"]
        assert by_index[index]["utilization_mean"] == pytest.approx(single["utilization_mean"], rel=1e-12)
    assert proc.stderr.count("[") >= 4 and "audited 3/4 adapters" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_batch_to_stdout_with_layers():
    proc = run_cli("audit", str(PEFT_FIXTURES / "llama_fp16"), str(PEFT_FIXTURES / "llama_dora"), "--layers", timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [len(line["layers"]) for line in sorted(lines, key=lambda l: l["index"])] == [4, 4]
