"""Hostile and damaged input: every case ends in a clear message or a recorded
per-module issue — never a traceback, a hang, a huge allocation, or a silently
wrong number — and whatever can still be audited is."""
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradience_lite as gl
from conftest import run_cli, FIXTURES, ROOT, write_safetensors

HEALTHY = "base_model.model.model.layers.0.self_attn.q_proj"
DAMAGED = "base_model.model.model.layers.1.self_attn.q_proj"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}


def healthy_tensors(rng=None):
    rng = rng or np.random.default_rng(0)
    return {f"{HEALTHY}.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float32),
            f"{HEALTHY}.lora_B.weight": rng.normal(size=(12, 4)).astype(np.float32)}


def make_file_bytes(header, data=b"", header_size=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(blob) if header_size is None else header_size
    return struct.pack("<Q", size) + blob + data


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


# ── file-level damage: exit 2, one line naming file and problem ─────────────

def _valid_file_bytes():
    header = {"t.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "t.lora_B.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}
    return make_file_bytes(header, b"\x00" * 32)


FILE_CASES = {
    "empty": (b"", "empty"),
    "seven bytes": (b"\x01" * 7, "too short"),
    "header past end": (make_file_bytes(b"{}", header_size=4096), "not a safetensors file"),
    "absurd header length": (struct.pack("<Q", 2 ** 63) + b"{}", "not a safetensors file"),
    "header not utf-8": (make_file_bytes(b'{"\xff\xfe": 1}'), "not UTF-8"),
    "header not json": (make_file_bytes(b"{this is not json"), "not valid JSON"),
    "header is a list": (make_file_bytes(b"[1, 2, 3]"), "not an object"),
    "duplicate keys": (make_file_bytes(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                       b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
                       "duplicate key 'a'"),
    "offsets outside data": (make_file_bytes({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
                             "truncated or its header lies"),
    "byte length lies": (make_file_bytes({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16),
                         "needs 12"),
    "truncated data": (_valid_file_bytes()[:-5], "truncated"),
    "entry not an object": (make_file_bytes({"x": [1, 2]}), "not a tensor description"),
    "offsets not integers": (make_file_bytes({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.5]}}, b"\0" * 8),
                             "invalid data_offsets"),
    "deeply nested header": (make_file_bytes(b"[" * 100000 + b"]" * 100000), "nested too deeply"),
    "metadata not an object": (make_file_bytes({"__metadata__": [1]}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_file_level_damage_is_one_clear_line_and_exit_2(tmp_path, case):
    content, message = FILE_CASES[case]
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(content)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(gl.AdapterFormatError) as error:
        gl.audit_lora_peft_dir(folder)
    assert message in str(error.value) and "adapter_model.safetensors" in str(error.value)
    proc = run_cli("audit", folder, "--json")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "adapter_model.safetensors" in lines[0]


def test_no_weights_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(CONFIG))
    proc = run_cli("audit", tmp_path)
    assert proc.returncode == 2 and "no adapter_model.safetensors found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "adapter_model.pth"])
def test_pickle_weights_are_never_opened(tmp_path, name):
    marker = tmp_path / "marker"
    # A pickle whose loading would run os.system("touch marker").
    payload = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    (tmp_path / name).write_bytes(payload)
    proc = run_cli("audit", tmp_path)
    assert proc.returncode == 2 and "pickle" in proc.stderr and "never unpickles" in proc.stderr
    proc = run_cli("audit", tmp_path, "--weights", tmp_path / name)
    assert proc.returncode == 2 and "pickle" in proc.stderr
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_is_refused_instead_of_blocking(tmp_path):
    fifo = tmp_path / "adapter_model.safetensors"
    os.mkfifo(fifo)
    proc = run_cli("audit", tmp_path, timeout=30)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr


# ── tensor-level damage: exit 0, named in issues, healthy module audited ────

def _damage_cases():
    rng = np.random.default_rng(1)
    good_a = rng.normal(size=(4, 16)).astype(np.float32)
    good_b = rng.normal(size=(12, 4)).astype(np.float32)
    nan_a = good_a.copy()
    nan_a[1, 3] = np.nan
    inf_b = good_b.copy()
    inf_b[0, 0] = np.inf
    a_key, b_key = f"{DAMAGED}.lora_A.weight", f"{DAMAGED}.lora_B.weight"

    def header_edit(**changes):
        def edit(header):
            for key, entry in changes.items():
                header[key].update(entry)
        return edit

    return {
        "unknown dtype": ({a_key: good_a, b_key: good_b}, {"header_override": header_edit(**{a_key: {"dtype": "F4"}})},
                          "unknown dtype 'F4'"),
        "integer dtype": ({a_key: good_a.astype(np.int32), b_key: good_b}, {}, "non-floating dtype I32"),
        "negative shape": ({a_key: good_a, b_key: good_b}, {"header_override": header_edit(**{a_key: {"shape": [-4, -16]}})},
                           "negative dimension"),
        "absurd shape": ({a_key: good_a, b_key: good_b},
                         {"header_override": header_edit(**{a_key: {"shape": [10 ** 9, 10 ** 9]}})},
                         "more than the whole data section"),
        "overlapping offsets": ({a_key: good_a, b_key: good_b},
                                {"header_override": lambda h: h[b_key].update(
                                    data_offsets=[h[a_key]["data_offsets"][0], h[a_key]["data_offsets"][0] + 192])},
                                "overlap"),
        "nan in A": ({a_key: nan_a, b_key: good_b}, {}, "lora_A contains 1 NaN/Inf"),
        "inf in B": ({a_key: good_a, b_key: inf_b}, {}, "lora_B contains 1 NaN/Inf"),
        "A without B": ({a_key: good_a}, {}, "has lora_A but no lora_B"),
        "B without A": ({b_key: good_b}, {}, "has lora_B but no lora_A"),
        "rank mismatch": ({a_key: good_a, b_key: rng.normal(size=(12, 3)).astype(np.float32)}, {}, "rank mismatch"),
        "rank zero": ({a_key: np.zeros((0, 16), np.float32), b_key: np.zeros((12, 0), np.float32)}, {}, "r = 0"),
        "3-D not conv": ({a_key: rng.normal(size=(4, 16, 2)).astype(np.float32),
                          b_key: rng.normal(size=(12, 4, 2)).astype(np.float32)}, {}, "not a known LoRA layout"),
        "1-D factor": ({a_key: good_a.ravel(), b_key: good_b}, {}, "not a known LoRA layout"),
        "duplicate factor": ({a_key: good_a, f"{DAMAGED}.lora_A.default.weight": good_a, b_key: good_b}, {},
                             "more than one tensor"),
    }


DAMAGE = _damage_cases()


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_tensor_level_damage_is_an_issue_and_the_rest_is_audited(tmp_adapter, case):
    tensors, options, message = DAMAGE[case]
    folder = tmp_adapter({**healthy_tensors(), **tensors}, CONFIG, **options)
    result = gl.audit_lora_peft_dir(folder)
    assert [layer.name for layer in result.layers] == ["model.layers.0.self_attn.q_proj"]
    damaged = [issue for issue in result.issues if issue.startswith("model.layers.1.self_attn.q_proj")]
    assert len(damaged) == 1 and message in damaged[0], result.issues
    proc = run_cli("audit", folder, "--json", "--layers")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    document = strict_json(proc.stdout)
    assert document["n_layers"] == 1 and document["n_modules_skipped"] == 1


def test_absurd_shape_allocates_nothing(tmp_adapter):
    tensors, options, _ = DAMAGE["absurd shape"]
    folder = tmp_adapter({**healthy_tensors(), **tensors}, CONFIG, **options)
    tracemalloc.start()
    gl.audit_lora_peft_dir(folder)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5 * 2 ** 20


def test_the_healthy_module_still_matches_its_oracle_next_to_damage(tmp_adapter):
    tensors, options, _ = DAMAGE["nan in A"]
    healthy = healthy_tensors()
    folder = tmp_adapter({**healthy, **tensors}, CONFIG, **options)
    layer = gl.audit_lora_peft_dir(folder).layers[0]
    a, b = (healthy[f"{HEALTHY}.lora_{x}.weight"].astype(np.float64) for x in "AB")
    assert layer.delta_sigma_max == pytest.approx(2.0 * np.linalg.norm(b @ a, 2), rel=1e-9)


# ── config damage: the audit runs from the weights, with an issue ───────────

CONFIG_CASES = {
    "malformed json": ('{"r": 4, "lora_alpha": ', "could not be read"),
    "config is a list": ("[4, 8]", "not a JSON object"),
    "r of the wrong type": (json.dumps({"r": "four", "lora_alpha": 8}), "r = 'four' is not a valid value"),
    "alpha null": (json.dumps({"r": 4, "lora_alpha": None}), "lora_alpha = None is not a valid value"),
    "missing fields": (json.dumps({"peft_type": "LORA"}), "r is missing"),
    "rslora not a bool": (json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": "yes"}), "use_rslora = 'yes'"),
    "invalid regex": (json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj(": 2}}), "unclosed ("),
    "nested quantifier": (json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"(a+)+$": 2}}), "backtrack"),
    "quantified alternation": (json.dumps({"r": 4, "lora_alpha": 8, "alpha_pattern": {"(q|qq)+x": 2}}), "backtrack"),
    "many stars": (json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {".*.*.*.*.*.*.*.*z": 2}}), "backtrack"),
    "pattern value not a number": (json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": "big"}}), "not a number"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_damage_is_an_issue_and_the_audit_runs(tmp_adapter, case):
    text, message = CONFIG_CASES[case]
    folder = tmp_adapter(healthy_tensors(), text)
    started = time.perf_counter()
    proc = run_cli("audit", folder, "--json", "--layers")
    assert time.perf_counter() - started < 30
    assert proc.returncode == 0, proc.stderr
    document = strict_json(proc.stdout)
    assert document["n_layers"] == 1
    assert any(issue.startswith("config:") and message in issue for issue in document["issues"]), document["issues"]


def test_catastrophic_patterns_on_long_names_take_no_time():
    config, issues = gl.parse_adapter_config({"r": 4, "lora_alpha": 8, "rank_pattern": {"(a+)+$": 2, "(a|aa)*b": 3}})
    name = "a" * 900 + "!"
    started = time.perf_counter()
    assert gl.module_scale(config, name, 4).rank_pattern_key is None
    assert time.perf_counter() - started < 0.1
    assert len(issues) == 2


def test_overflowing_scale_gives_null_and_an_issue(tmp_adapter):
    folder = tmp_adapter(healthy_tensors(), {"r": 4, "lora_alpha": 1e308})
    proc = run_cli("audit", folder, "--json", "--layers")
    assert proc.returncode == 0, proc.stderr
    document = strict_json(proc.stdout)
    assert document["layers"][0]["delta_sigma_max"] is None
    assert any("overflows float64" in issue for issue in document["issues"])


def test_huge_finite_factors_do_not_overflow_the_gram(tmp_adapter):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(3, 10)) * 1e160
    b = rng.normal(size=(7, 3)) * 1e-160
    result = gl.audit_lora_state_dict({"m.lora_A.weight": a, "m.lora_B.weight": b}, {"r": 3, "lora_alpha": 3})
    assert result.layers[0].sigma_max == pytest.approx(np.linalg.norm((b * 1e160) @ (a * 1e-160), 2), rel=1e-9)


# ── fuzzing ──────────────────────────────────────────────────────────────────

def _audit_bytes(tmp_path, content):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(content)
    started = time.perf_counter()
    try:
        result = gl.audit_lora_peft_dir(tmp_path)
        json.dumps(result.to_summary_dict(include_layers=True), allow_nan=False)
    except gl.AdapterFormatError:
        pass
    return time.perf_counter() - started


def _seed_file():
    rng = np.random.default_rng(2)
    tensors = {**healthy_tensors(rng), f"{DAMAGED}.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float16),
               f"{DAMAGED}.lora_B.weight": rng.normal(size=(12, 4)).astype(np.float64)}
    with tempfile.TemporaryDirectory() as scratch:
        return write_safetensors(os.path.join(scratch, "seed.safetensors"), tensors, {"format": "pt"}).read_bytes()


SEED = _seed_file()
# Example counts come from the hypothesis profile (tests/conftest.py): 300 per
# fuzzer in CI, many more with `pytest --hypothesis-profile=thorough`.
FUZZ = settings(deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(tmp_path, content):
    assert _audit_bytes(tmp_path, content) < 1.0


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(SEED)))
def test_fuzz_mutated_valid_files(tmp_path, flips, cut):
    content = bytearray(SEED)
    for position, value in flips:
        content[position] = value
    assert _audit_bytes(tmp_path, bytes(content[:max(cut, 8)])) < 1.0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "F8_E4M3", "X9"]) | json_values,
    "shape": st.lists(st.integers(-3, 2 ** 45), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-5, 200), min_size=0, max_size=3) | json_values})


@FUZZ
@given(st.dictionaries(st.sampled_from([f"{HEALTHY}.lora_A.weight", f"{HEALTHY}.lora_B.weight",
                                        f"{DAMAGED}.lora_A.weight", "__metadata__", "other"]) | st.text(max_size=30),
                       entry | json_values, max_size=5),
       st.binary(max_size=200))
def test_fuzz_structured_headers(tmp_path, header, data):
    blob = json.dumps(header).encode()
    assert _audit_bytes(tmp_path, struct.pack("<Q", len(blob)) + blob + data) < 1.0


config_keys = st.sampled_from(["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type",
                               "fan_in_fan_out", "use_dora", "layer_replication", "target_modules"])


@FUZZ
@given(st.dictionaries(config_keys | st.text(max_size=8), json_values
                       | st.dictionaries(st.text(max_size=12), st.integers(-3, 64) | st.floats(), max_size=4),
                       max_size=8) | json_values,
       st.text(alphabet="abq_proj.0123456789", min_size=1, max_size=60))
def test_fuzz_config_parsing(config, module_name):
    started = time.perf_counter()
    parsed, issues = gl.parse_adapter_config(config)
    scale = gl.module_scale(parsed, module_name, 4)
    assert math.isfinite(scale.scale) or scale.alpha is not None
    assert all(isinstance(issue, str) for issue in issues)
    assert time.perf_counter() - started < 1.0


# ── concurrency: one norms cache, several audits at once ────────────────────

def test_concurrent_audits_share_a_cache_without_tearing_it(tmp_path):
    cache = tmp_path / "cache.json"
    base = FIXTURES / "base" / "llama12_bf16_sharded"
    command = [sys.executable, "-m", "gradience_lite", "audit", str(FIXTURES / "peft" / "llama_patterns"),
               "--json", "--layers", "--base-model", str(base), "--base-norms-cache", str(cache)]
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err for _, err in outputs]
    documents = [strict_json(out) for out, _ in outputs]
    udr = [[row["udr"] for row in document["layers"]] for document in documents]
    assert all(values == udr[0] for values in udr) and None not in udr[0]
    cached = json.loads(cache.read_text())
    assert len(cached["norms"]) == 48
    assert not [p for p in tmp_path.iterdir() if p.name != "cache.json"]  # no temp files left behind
    # A later audit reads the cache and agrees.
    again = strict_json(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout)
    assert [row["udr"] for row in again["layers"]] == udr[0]
