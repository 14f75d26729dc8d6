"""Hostile and damaged input: every case ends in a clear message or a recorded
per-module issue — never a traceback, a hang, a huge allocation, or a silently
wrong number — and whatever can still be audited is."""
import contextlib
import json
import math
import os
import re
import resource
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradience_lite as gl
from conftest import run_cli, FIXTURES, ROOT, oracle_load, write_safetensors

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
                         {"header_override": header_edit(**{a_key: {"shape": [10 ** 5, 10 ** 5]}})},
                         "more than the whole data section"),
        "absurd empty shape": ({a_key: good_a, b_key: good_b},
                               {"header_override": header_edit(**{a_key: {"shape": [2 ** 31, 2 ** 31, 0]}})},
                               "is absurd"),
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


# ══ round two: a crafted case per class, each in a limited subprocess ═══════
# Every case runs `python -m gradience_lite` under RLIMIT_AS (2 GiB) and a
# wall-clock limit, and asserts the exit code, a one-line message on stderr,
# no traceback, and bounded time and peak RSS (from wait4's rusage).

LIMIT_BYTES = 2 << 30
MAX_SECONDS = 10.0
MAX_RSS_MIB = 512.0


class Limited(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    rss_mib: float


def run_limited(*args, preamble="", timeout=60, env=None):
    """The CLI in a child under RLIMIT_AS; (exit code, stdout, stderr, wall seconds, peak RSS MiB).

    ``preamble`` runs before main() in the child (a test hook, e.g. to truncate
    a file at a chosen moment); the CLI itself is unchanged.
    """
    code = preamble + "\nimport sys, gradience_lite\nsys.exit(gradience_lite.main(sys.argv[1:]))"
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=out, stderr=err,
                                   env=env, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS,
                                                                                   (LIMIT_BYTES, LIMIT_BYTES)))
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > timeout:
                process.kill()
                os.wait4(process.pid, 0)
                raise AssertionError(f"gradience-lite {args} ran past {timeout} s")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Limited(process.returncode, out.read().decode("utf-8", "replace"),
                       err.read().decode("utf-8", "replace"), seconds, usage.ru_maxrss / 1024.0)


def assert_bounded(run, code, message=None):
    """Exit ``code``, no traceback or internal error, within time and memory;
    on exit 2, exactly one stderr line holding ``message``."""
    assert run.returncode == code, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.stderr[-2000:]
    assert run.seconds < MAX_SECONDS, run.seconds
    assert run.rss_mib < MAX_RSS_MIB, run.rss_mib
    if code == 2:
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert message is None or message in lines[0], lines[0]
    return run


def audit_json(run):
    document = strict_json(run.stdout)
    return document, " | ".join(document["issues"])


def raw_file(path, entries, metadata=None):
    """A safetensors file from (name, dtype, shape, bytes) entries, shapes taken as given."""
    header, blobs, offset = {}, [], 0
    for name, dtype, shape, blob in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make_file_bytes(header, b"".join(blobs)))
    return path


def f16(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype("<f2").tobytes()


# ── class 1: sizes from header and config, bounded before allocation ────────

def test_zero_width_factors_claiming_a_huge_gram_allocate_nothing(tmp_path):
    # 216 bytes that once asked for a 30000² Gram (6.7 GiB).
    raw_file(tmp_path / "a" / "adapter_model.safetensors",
             [(f"{HEALTHY}.lora_A.weight", "F32", [30000, 0], b""), (f"{HEALTHY}.lora_B.weight", "F32", [0, 30000], b"")])
    run = assert_bounded(run_limited("audit", tmp_path / "a", "--json"), 0)
    document, issues = audit_json(run)
    assert document["n_modules_skipped"] == 1 and "ΔW is empty" in issues


def test_rank_larger_than_the_layer_is_formed_densely_and_matches_the_oracle(tmp_path):
    # A (10⁶, 1): the Gram would be 10¹² entries; ΔW is 1×1 and its σ is |b·a|.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300_000, 1)), rng.normal(size=(1, 300_000))
    raw_file(tmp_path / "a" / "adapter_model.safetensors",
             [(f"{HEALTHY}.lora_A.weight", "F32", [300_000, 1], a.astype("<f4").tobytes()),
              (f"{HEALTHY}.lora_B.weight", "F32", [1, 300_000], b.astype("<f4").tobytes())])
    run = assert_bounded(run_limited("audit", tmp_path / "a", "--json", "--layers"), 0)
    layer = strict_json(run.stdout)["layers"][0]
    oracle = abs((b.astype(np.float32).astype(np.float64) @ a.astype(np.float32).astype(np.float64)).item())
    assert layer["sigma_max"] == pytest.approx(oracle, rel=1e-9) and layer["r"] == 300_000


def test_rank_over_the_cap_is_a_module_issue(tmp_path):
    r = gl.MAX_RANK + 1
    raw_file(tmp_path / "a" / "adapter_model.safetensors",
             [(f"{HEALTHY}.lora_A.weight", "F8_E4M3", [r, r], b"\x01" * r * r),
              (f"{HEALTHY}.lora_B.weight", "F8_E4M3", [r, r], b"\x01" * r * r)])
    document, issues = audit_json(assert_bounded(run_limited("audit", tmp_path / "a", "--json"), 0))
    assert document["n_modules_skipped"] == 1 and "MAX_RANK" in issues


@pytest.mark.parametrize("experts, cap", [(10 ** 6, "MAX_EXPERTS"), (10 ** 7, "MAX_EMPTY_EXTENT")])
def test_a_header_claiming_millions_of_experts_creates_no_modules(tmp_path, experts, cap):
    raw_file(tmp_path / "a" / "adapters.safetensors",
             [("model.layers.0.mlp.switch_mlp.up_proj.lora_a", "F32", [experts, 0, 4], b""),
              ("model.layers.0.mlp.switch_mlp.up_proj.lora_b", "F32", [experts, 4, 0], b"")])
    document, issues = audit_json(assert_bounded(run_limited("audit", tmp_path / "a", "--json"), 0))
    assert document["n_modules_skipped"] == 1 and cap in issues


def _kohya(tmp_path, module, entries):
    return raw_file(tmp_path / "a" / "adapter_model.safetensors",
                    [(f"{module}.{role}", dtype, shape, blob) for role, dtype, shape, blob in entries])


def test_tucker_lora_mid_rebuild_over_the_dense_cap_is_refused(tmp_path):
    # 28 KB of factors asking for a 4·10⁷-element rebuilt factor.
    _kohya(tmp_path, "lora_unet_conv", [("lora_down.weight", "F16", [1, 4000, 1, 1], f16((1, 4000, 1, 1))),
                                        ("lora_mid.weight", "F16", [1, 1, 100, 100], f16((1, 1, 100, 100), 1)),
                                        ("lora_up.weight", "F16", [8, 1, 1, 1], f16((8, 1, 1, 1), 2))])
    document, issues = audit_json(assert_bounded(run_limited("audit", tmp_path / "a", "--json"), 0))
    assert document["n_modules_skipped"] == 1 and "MAX_DENSE_ELEMENTS" in issues


def test_dense_loha_route_over_the_work_cap_is_refused(tmp_path):
    # r₁·r₂ = 4096 ≥ 4000: only the dense route is exact, and its SVD is ~6·10¹⁰ flops.
    _kohya(tmp_path, "lora_unet_proj", [("hada_w1_a", "F16", [4000, 64], f16((4000, 64))),
                                        ("hada_w1_b", "F16", [64, 4000], f16((64, 4000), 1)),
                                        ("hada_w2_a", "F16", [4000, 64], f16((4000, 64), 2)),
                                        ("hada_w2_b", "F16", [64, 4000], f16((64, 4000), 3))])
    document, issues = audit_json(assert_bounded(run_limited("audit", tmp_path / "a", "--json"), 0))
    assert document["n_modules_skipped"] == 1 and "MAX_DENSE_WORK" in issues


def test_tucker_loha_is_audited_through_low_rank_halves_and_matches_the_dense_rebuild(tmp_path):
    # LyCORIS rebuild_tucker per half, Hadamard product, dense SVD: the oracle.
    rng = np.random.default_rng(4)
    t1, t2 = rng.normal(size=(3, 3, 3, 3)), rng.normal(size=(3, 3, 3, 3))
    w1a, w1b, w2a, w2b = (rng.normal(size=(3, n)) for n in (40, 24, 40, 24))
    half1 = np.einsum("ij...,jr,ip->pr...", t1, w1b, w1a)
    half2 = np.einsum("ij...,jr,ip->pr...", t2, w2b, w2a)
    oracle = np.linalg.svd((half1 * half2).reshape(40, -1), compute_uv=False)
    sd = {"lora_unet_conv.hada_t1": t1, "lora_unet_conv.hada_t2": t2, "lora_unet_conv.hada_w1_a": w1a,
          "lora_unet_conv.hada_w1_b": w1b, "lora_unet_conv.hada_w2_a": w2a, "lora_unet_conv.hada_w2_b": w2b}
    result = gl.audit_lora_state_dict(sd, include_top_singular_values=9)
    layer = result.layers[0]
    assert layer.sigma_max == pytest.approx(oracle[0], rel=1e-9)
    np.testing.assert_allclose(layer.top_singular_values, oracle[:9], rtol=1e-8, atol=1e-10 * oracle[0])


def test_lokr_full_factor_over_the_work_cap_is_refused(tmp_path):
    _kohya(tmp_path, "lora_unet_big", [("lokr_w1", "F8_E4M3", [2000, 2000], b"\x30" * 4_000_000),
                                       ("lokr_w2", "F16", [2, 2], f16((2, 2)))])
    document, issues = audit_json(assert_bounded(run_limited("audit", tmp_path / "a", "--json"), 0))
    assert document["n_modules_skipped"] == 1 and "MAX_DENSE_WORK" in issues


def test_layer_replication_span_over_the_cap_is_an_issue_not_a_loop(tmp_path, tmp_adapter):
    folder = tmp_adapter(healthy_tensors(), {**CONFIG, "layer_replication": [[0, 10 ** 12]]})
    norms = tmp_path / "norms.json"
    norms.write_text(json.dumps({"model.layers.0.self_attn.q_proj": {"sigma_max": 2.0, "fro_norm": 3.0}}))
    document, issues = audit_json(assert_bounded(run_limited("audit", folder, "--json", "--base-norms", norms), 0))
    assert "MAX_REPLICATED_LAYERS" in issues


def test_a_header_with_too_many_entries_is_refused(tmp_path):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(gl.MAX_HEADER_ENTRIES + 1)}
    (tmp_path / "adapter_model.safetensors").write_bytes(make_file_bytes(header))
    assert_bounded(run_limited("audit", tmp_path), 2, "MAX_HEADER_ENTRIES")


def test_a_tensor_with_too_many_axes_is_a_module_issue(tmp_path):
    raw_file(tmp_path / "a" / "adapter_model.safetensors",
             [(f"{HEALTHY}.lora_A.weight", "F32", [1] * 40, b"\0" * 4), (f"{HEALTHY}.lora_B.weight", "F32", [1, 1], b"\0" * 4)])
    document, issues = audit_json(assert_bounded(run_limited("audit", tmp_path / "a", "--json"), 0))
    assert "MAX_NDIM" in issues


# ── class 2: patterns by construction ───────────────────────────────────────

@pytest.mark.parametrize("key", ["((a)+)+", "(a?){32}a{32}", "(a|aa)+", ".*.*.*a", "(?=a)a", r"(a)\1"])
def test_patterns_outside_the_safe_subset_are_literal_and_fast(tmp_adapter, key):
    name = "a" * 31
    tensors = {f"base_model.model.{name}.lora_A.weight": np.ones((4, 8), np.float32),
               f"base_model.model.{name}.lora_B.weight": np.ones((8, 4), np.float32)}
    folder = tmp_adapter(tensors, {**CONFIG, "rank_pattern": {key: 2}})
    document, issues = audit_json(assert_bounded(run_limited("audit", folder, "--json", "--layers"), 0))
    assert "matched literally" in issues
    assert document["layers"][0]["rank_pattern_key"] is None


@pytest.mark.parametrize("key,name,hit", [
    ("^model.decoder.layers.0.encoder_attn.k_proj", "model.decoder.layers.0.encoder_attn.k_proj", True),
    ("^model.decoder.layers.0.encoder_attn.k_proj", "x.model.decoder.layers.0.encoder_attn.k_proj", False),
    (r"layers\.\d+\.mlp\.down_proj", "model.layers.12.mlp.down_proj", True),
    ("(q|v)_proj", "model.layers.0.self_attn.v_proj", True),
    ("[qk]_proj", "model.layers.0.self_attn.v_proj", False),
    (r".*\.(q_proj|v_proj)$", "model.layers.0.self_attn.q_proj", True),
    ("layers.0.q", "model.layers_0_q", True),  # "." is a regex wildcard in PEFT, kept for few keys
    ("layers.0.q", "model.layers_0.q", True),
    ("layers.0.q", "modellayers.0.q", False),  # dot-aligned tails only
    ("0.q", "model.layers.0.q", True),
])
def test_safe_subset_matches_exactly_like_peft(key, name, hit):
    # PEFT's get_pattern_key: re.match(rf"(.*\.)?({key})$", name) — the oracle, run here directly.
    assert bool(re.match(rf"(.*\.)?({key})$", name)) == hit
    config, issues = gl.parse_adapter_config({"r": 8, "lora_alpha": 8, "rank_pattern": {key: 2}})
    assert not issues
    assert (gl.match_pattern(config.rank_pattern, name) is not None) == hit


def test_four_hundred_thousand_literal_keys_are_matched_by_dict_quickly(tmp_adapter):
    keys = {f"l.{i}.{j}": 2 for i in range(400) for j in range(1000)}
    keys["model.layers.0.self_attn.q_proj"] = 3
    folder = tmp_adapter(healthy_tensors(), {**CONFIG, "rank_pattern": keys})
    assert os.path.getsize(folder / "adapter_config.json") < 10 ** 7
    document, issues = audit_json(assert_bounded(run_limited("audit", folder, "--json", "--layers"), 0))
    layer = document["layers"][0]
    assert layer["rank_pattern_key"] == "model.layers.0.self_attn.q_proj" and layer["config_r"] == 3
    assert "looked up as exact module names" in issues


def test_first_match_in_config_order_holds_across_dict_and_regex_keys():
    keys = {f"k{i}": 1 for i in range(gl.MAX_REGEX_KEYS)}
    keys.update({r"self_attn\.q_proj": 5, "q_proj": 6, "layers.0.self_attn.q_proj": 7})
    config, _ = gl.parse_adapter_config({"r": 8, "lora_alpha": 8, "rank_pattern": keys})
    assert gl.match_pattern(config.rank_pattern, "model.layers.0.self_attn.q_proj").value == 5
    keys = dict(reversed(list(keys.items())))
    config, _ = gl.parse_adapter_config({"r": 8, "lora_alpha": 8, "rank_pattern": keys})
    assert gl.match_pattern(config.rank_pattern, "model.layers.0.self_attn.q_proj").value == 7


# ── class 3: a file that shrinks while it is read ───────────────────────────

TRUNCATE_AFTER_OPEN = """
import os, gradience_lite as _gl
_open = _gl.open_safetensors
def _open_then_truncate(path):
    sf = _open(path)
    if "victim" in str(path):
        os.truncate(path, sf.file_size // 2)  # another process cuts the file after its header was read
    return sf
_gl.open_safetensors = _open_then_truncate
"""


def _big_adapter(folder, modules=16):
    rng = np.random.default_rng(9)
    tensors = {}
    for index in range(modules):
        prefix = f"base_model.model.model.layers.{index}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.normal(size=(8, 256)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.normal(size=(256, 8)).astype(np.float32)
    folder.mkdir(parents=True)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    return folder


def test_a_file_truncated_while_being_read_is_a_clean_exit_2(tmp_path):
    victim = _big_adapter(tmp_path / "victim")
    run = assert_bounded(run_limited("audit", victim, "--json", preamble=TRUNCATE_AFTER_OPEN), 2, "changed while being read")
    assert "victim" in run.stderr and run.stdout == "" and run.returncode != -7


def test_batch_truncation_fails_only_that_line(tmp_path):
    good, victim = _big_adapter(tmp_path / "good"), _big_adapter(tmp_path / "victim")
    run = assert_bounded(run_limited("audit", good, victim, good, "--jobs", "2", preamble=TRUNCATE_AFTER_OPEN), 1)
    lines = sorted((json.loads(line) for line in run.stdout.splitlines()), key=lambda line: line["index"])
    assert [line["ok"] for line in lines] == [True, False, True]
    assert "changed while being read" in lines[1]["error"]


CRASH_ON_VICTIM = """
import os, signal, time, gradience_lite as _gl
_line = _gl.batch_audit_line
def _crashing(path, options):
    if "victim" in path:
        os.kill(os.getpid(), signal.SIGBUS)  # what a mapped file cut short used to do
    if "sleeper" in path:
        time.sleep(60)
    return _line(path, options)
_gl.batch_audit_line = _crashing
"""


def test_a_crashed_worker_is_a_failure_line_and_every_other_input_gets_its_line(tmp_path):
    good, victim = _big_adapter(tmp_path / "good"), _big_adapter(tmp_path / "victim")
    run = assert_bounded(run_limited("audit", good, victim, good, good, "--jobs", "2", preamble=CRASH_ON_VICTIM), 1)
    lines = sorted((json.loads(line) for line in run.stdout.splitlines()), key=lambda line: line["index"])
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert [line["ok"] for line in lines] == [True, False, True, True]
    assert "SIGBUS" in lines[1]["error"]


def test_timeout_stops_one_adapter_and_the_batch_goes_on(tmp_path):
    good, sleeper = _big_adapter(tmp_path / "good"), _big_adapter(tmp_path / "sleeper")
    run = assert_bounded(run_limited("audit", sleeper, good, "--timeout", "2", "--jobs", "2",
                                     preamble=CRASH_ON_VICTIM), 1)
    lines = sorted((json.loads(line) for line in run.stdout.splitlines()), key=lambda line: line["index"])
    assert [line["ok"] for line in lines] == [False, True] and "timed out" in lines[0]["error"]


def test_timeout_on_a_single_audit_is_exit_2(tmp_path):
    sleeper = _big_adapter(tmp_path / "sleeper")
    preamble = ("import time, gradience_lite as _gl\n_audit = _gl._audit\n"
                "_gl._audit = lambda *a, **k: (time.sleep(30), _audit(*a, **k))[1]\n")
    assert_bounded(run_limited("audit", sleeper, "--timeout", "1", preamble=preamble), 2, "timed out after 1 s")


def test_jobs_are_capped_at_the_number_of_inputs(tmp_path):
    good = _big_adapter(tmp_path / "good")
    preamble = ("import sys, gradience_lite as _gl\n_run = _gl._audit_in_workers\n"
                "def _spy(paths, options, jobs, timeout, emit):\n"
                "    print('jobs', jobs, file=sys.stderr)\n    return _run(paths, options, jobs, timeout, emit)\n"
                "_gl._audit_in_workers = _spy\n")
    run = assert_bounded(run_limited("audit", good, good, "--jobs", "40", preamble=preamble), 0)
    assert "jobs 2" in run.stderr


def test_batch_workers_die_with_their_parent(tmp_path):
    good = _big_adapter(tmp_path / "good")
    pids = tmp_path / "pids"
    pids.mkdir()
    preamble = ("import os, time, gradience_lite as _gl\n"
                f"def _slow(path, options):\n    open(os.path.join({str(pids)!r}, str(os.getpid())), 'w').close()\n"
                "    time.sleep(120)\n_gl.batch_audit_line = _slow\n")
    parent = subprocess.Popen([sys.executable, "-c", preamble + "import sys; sys.exit(_gl.main(sys.argv[1:]))",
                               "audit", str(good), str(good), "--jobs", "2"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while len(list(pids.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.1)
    workers = [int(p.name) for p in pids.iterdir()]
    assert len(workers) == 2
    parent.kill()
    parent.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                return handle.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)


@pytest.mark.parametrize("flag", [["--weights", "x.safetensors"], ["--html", "r.html"], ["--append", "run.jsonl"],
                                  ["--adapter-config", "c.json"], ["--top-wasteful", "3"]])
def test_batch_refuses_per_adapter_flags_it_cannot_honour(tmp_path, flag):
    good = _big_adapter(tmp_path / "good")
    assert_bounded(run_limited("audit", good, good, *flag), 2, "cannot be honoured in batch mode")


def test_batch_honours_adapter(tmp_path):
    folder = _big_adapter(tmp_path / "root")
    _big_adapter(folder / "other")
    run = assert_bounded(run_limited("audit", folder, folder, "--adapter", "other"), 0)
    assert all(json.loads(line)["adapter_name"] == "other" for line in run.stdout.splitlines())


# ── class 4: ordinary bad input never reaches exit 3 ────────────────────────

def _named_adapter(tmp_adapter, names, config=CONFIG):
    rng = np.random.default_rng(6)
    tensors = {}
    for name in names:
        tensors[f"base_model.model.{name}.lora_A.weight"] = rng.normal(size=(4, 8)).astype(np.float32)
        tensors[f"base_model.model.{name}.lora_B.weight"] = rng.normal(size=(8, 4)).astype(np.float32)
    return tmp_adapter(tensors, config)


@pytest.mark.parametrize("name", ["model.layers." + "9" * 5000 + ".q_proj", "model.layers.².q_proj",
                                  "model.layers.٣.q_proj", "model.layers.0.q\ud800proj"])
@pytest.mark.parametrize("output", [["--json"], [], ["--html", "REPORT"]])
def test_odd_names_never_stop_the_audit(tmp_path, tmp_adapter, name, output):
    folder = _named_adapter(tmp_adapter, [name, "model.layers.1.q_proj"])
    output = [str(tmp_path / "r.html") if item == "REPORT" else item for item in output]
    run = assert_bounded(run_limited("audit", folder, "--layers", *output), 0)
    if "--json" in output:
        assert strict_json(run.stdout)["n_layers"] == 2


def test_compare_with_odd_names_is_exit_0(tmp_adapter):
    folder = _named_adapter(tmp_adapter, ["model.layers." + "9" * 5000 + ".q_proj", "model.layers.².q_proj"])
    assert_bounded(run_limited("compare", folder, folder), 0)


DAMAGED_DOCUMENTS = {
    "name is a list": {"layers": [{"name": ["x"]}]},
    "rows not objects": {"layers": [5, None, "x"]},
    "metric of the wrong type": {"layers": [{"name": "m", "utilization": "high", "r": [1]}], "by_type": [1]},
    "by_type rows not objects": {"layers": [], "by_type": {"attn": 3, "mlp": {"udr_median": "x"}}},
    "summary of the wrong type": {"layers": [], "utilization_mean": {"a": 1}, "format": 7},
}


@pytest.mark.parametrize("case", sorted(DAMAGED_DOCUMENTS))
@pytest.mark.parametrize("as_json", [True, False])
def test_damaged_documents_given_to_compare_are_not_a_crash(tmp_path, case, as_json):
    good = run_limited("audit", FIXTURES / "peft" / "llama_fp32_qv", "--json", "--layers")
    (tmp_path / "good.json").write_text(good.stdout)
    (tmp_path / "bad.json").write_text(json.dumps(DAMAGED_DOCUMENTS[case]))
    extra = ["--json"] if as_json else []
    run = assert_bounded(run_limited("compare", tmp_path / "bad.json", tmp_path / "good.json", *extra), 0)
    if as_json:
        strict_json(run.stdout)


NORMS_FILES = {
    "errors is a string": {"format": "gradience_lite.base_norms/1", "norms": {}, "errors": "ab"},
    "errors is a number": {"format": "gradience_lite.base_norms/1", "norms": {}, "errors": 5},
    "sigma 1e400": '{"model.layers.0.self_attn.q_proj": {"sigma_max": 1e400, "fro_norm": 1}}',
    "norms a list": {"format": "gradience_lite.base_norms/1", "norms": [1]},
    "files a list": {"format": "gradience_lite.base_norms/1", "norms": {}, "files": [1]},
}


@pytest.mark.parametrize("case", sorted(NORMS_FILES))
def test_damaged_norms_files_are_issues(tmp_path, tmp_adapter, case):
    folder = tmp_adapter(healthy_tensors(), CONFIG)
    norms = tmp_path / "norms.json"
    content = NORMS_FILES[case]
    norms.write_text(content if isinstance(content, str) else json.dumps(content))
    document, issues = audit_json(assert_bounded(run_limited("audit", folder, "--json", "--base-norms", norms), 0))
    assert document["n_layers_with_udr"] == 0 and "udr:" in issues


def test_norms_from_a_device_or_folder_are_refused(tmp_path, tmp_adapter):
    folder = tmp_adapter(healthy_tensors(), CONFIG)
    assert_bounded(run_limited("audit", folder, "--json", "--base-norms", "/dev/zero"), 2, "not a regular file")
    base = FIXTURES / "base" / "llama12_bf16_sharded"
    assert_bounded(run_limited("audit", FIXTURES / "peft" / "llama_patterns", "--json", "--base-model", base,
                               "--base-norms-cache", tmp_path), 2, "not a regular file")
    # The API records the same as issues and goes on (never reads /dev/zero, never writes a folder).
    result = gl.audit_lora_peft_dir(folder, base_norms="/dev/zero")
    assert any("not a regular file" in issue for issue in result.issues)
    result = gl.audit_lora_peft_dir(FIXTURES / "peft" / "llama_patterns", base_model=str(base),
                                    base_norms_cache=str(tmp_path))
    assert any("--base-norms-cache" in issue and "not a regular file" in issue for issue in result.issues)


@pytest.mark.parametrize("where", ["directory", "read-only", "device"])
def test_append_to_something_not_appendable_is_exit_2_before_any_output(tmp_path, where):
    target = {"directory": tmp_path, "read-only": tmp_path / "ro.jsonl", "device": "/dev/full"}[where]
    if where == "read-only":
        target.write_text("")
        target.chmod(0o444)
        if os.access(target, os.W_OK):
            pytest.skip("running as a user who can write read-only files (root)")
    run = assert_bounded(run_limited("audit", FIXTURES / "peft" / "llama_fp32_qv", "--json", "--append", target), 2,
                         "--append")
    assert run.stdout == ""


def test_html_to_an_unwritable_path_is_exit_2_before_any_output(tmp_path):
    run = assert_bounded(run_limited("audit", FIXTURES / "peft" / "llama_fp32_qv", "--json",
                                     "--html", tmp_path / "missing" / "r.html"), 2, "--html")
    assert run.stdout == ""
    run = assert_bounded(run_limited("audit", FIXTURES / "peft" / "llama_fp32_qv", "--html", tmp_path), 2,
                         "not a regular file")


# ── class 5: output integrity ───────────────────────────────────────────────

def test_append_adds_the_missing_newline(tmp_path):
    telemetry = tmp_path / "run.jsonl"
    telemetry.write_text('{"run_id": "r1", "step": 7, "event": "train"}')  # no final newline
    assert_bounded(run_limited("audit", FIXTURES / "peft" / "llama_fp32_qv", "--append", telemetry), 0)
    lines = telemetry.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["step"] == 7
    event = json.loads(lines[1])
    assert event["run_id"] == "r1" and event["step"] == 7


@pytest.mark.parametrize("scale", [1e150, 1e200, 1e300])
def test_huge_factors_keep_stdout_json_and_never_report_zero(tmp_path, scale):
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(4, 16)) * scale, rng.normal(size=(12, 4)) * scale
    folder = tmp_path / "a"
    folder.mkdir()
    write_safetensors(folder / "adapter_model.safetensors",
                      {f"{HEALTHY}.lora_A.weight": a, f"{HEALTHY}.lora_B.weight": b,
                       f"{DAMAGED}.lora_A.weight": a / scale, f"{DAMAGED}.lora_B.weight": b / scale})
    run = assert_bounded(run_limited("audit", folder, "--json", "--layers"), 0)
    assert "DLASCL" not in run.stdout + run.stderr
    document, issues = audit_json(run)
    rows = {row["name"]: row for row in document["layers"]}
    healthy = HEALTHY[len("base_model.model."):]
    oracle = np.linalg.svd((b / scale) @ (a / scale), compute_uv=False)
    stable = float(np.sum(oracle ** 2) / oracle[0] ** 2)
    if 2 * math.log10(scale) + math.log10(oracle[0]) < 308:  # σ itself is finite: scale-free metrics are exact, σ² overflows → null
        row = rows[healthy]
        assert row["sigma_max"] == pytest.approx(oracle[0] * scale * scale, rel=1e-9)
        assert row["stable_rank"] == pytest.approx(stable, rel=1e-9) and row["frob_sq"] is None
        assert "overflows float64" in issues
    else:  # σ exceeds float64: the module is refused, never reported as 0
        assert healthy not in rows and "overflow float64" in issues
    assert rows[DAMAGED[len("base_model.model."):]]["stable_rank"] == pytest.approx(stable, rel=1e-9)


def test_lapack_output_on_fd_1_cannot_reach_the_json(tmp_path):
    # Whatever native code writes to fd 1 during the audit lands on stderr.
    preamble = ("import os, gradience_lite as _gl\n_audit = _gl._audit\n"
                "def _noisy(*a, **k):\n    os.write(1, b'** On entry to DLASCL parameter number 4 had an illegal value\\n')\n"
                "    return _audit(*a, **k)\n_gl._audit = _noisy\n")
    run = assert_bounded(run_limited("audit", FIXTURES / "peft" / "llama_fp32_qv", "--json", preamble=preamble), 0)
    strict_json(run.stdout)
    assert "DLASCL" in run.stderr


def test_control_characters_in_names_are_escaped_in_text(tmp_adapter):
    evil = "model.layers.0.q_proj\x1b]0;pwned\x07\x1b[2J"
    rng = np.random.default_rng(6)
    tensors = {f"base_model.model.{evil}.lora_A.weight": rng.normal(size=(4, 8)).astype(np.float32),
               f"base_model.model.{evil}.lora_B.weight": rng.normal(size=(8, 4)).astype(np.float32),
               "extra\n  modules audited: 999": np.ones(3, np.float32)}  # a non-LoRA tensor, listed in the report
    folder = tmp_adapter(tensors, CONFIG)
    run = assert_bounded(run_limited("audit", folder, "--layers"), 0)
    assert "\x1b" not in run.stdout and "\x07" not in run.stdout
    assert not any(line.startswith("  modules audited: 999") for line in run.stdout.splitlines())
    assert "\\x1b]0;pwned" in run.stdout and "\\n  modules audited: 999" in run.stdout


# ── class 6: leaks and paths ────────────────────────────────────────────────

def test_a_non_safetensors_file_is_never_echoed(tmp_path):
    secret = "hf_SECRETTOKENabcdefgh1234567890"
    (tmp_path / "token").write_text(secret)
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_model.safetensors").symlink_to(tmp_path / "token")
    run = assert_bounded(run_limited("audit", folder, "--json"), 2, "not a safetensors file")
    leaked = int.from_bytes(secret.encode()[:8], "little")
    assert "SECRET" not in run.stderr and str(leaked) not in run.stderr and "hf_" not in run.stderr


@pytest.mark.parametrize("adapter", ["../other", "/tmp", "..", "a/b"])
def test_adapter_must_be_a_plain_child_name(tmp_path, adapter):
    folder = _big_adapter(tmp_path / "root")
    _big_adapter(tmp_path / "other")
    assert_bounded(run_limited("audit", folder, "--adapter", adapter), 2, "not a plain subfolder name")


def test_weight_map_outside_the_base_directory_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    outside = write_safetensors(tmp_path / "outside.safetensors",
                                {"model.layers.0.self_attn.q_proj.weight": np.ones((12, 16), np.float32)})
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.layers.0.self_attn.q_proj.weight": "../outside.safetensors"}}))
    folder = tmp_path / "a"
    folder.mkdir()
    write_safetensors(folder / "adapter_model.safetensors", healthy_tensors())
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    # The base cannot be resolved at all: refused up front like a mistyped path.
    assert_bounded(run_limited("audit", folder, "--json", "--base-model", base), 2, "outside the base directory")
    assert outside.exists()


# ── fuzzing, round two: shapes and config fields with huge values ───────────
# In-process (hypothesis needs it), under a raised-back soft RLIMIT_AS: an
# unbounded allocation fails the example with MemoryError instead of the machine.

@contextlib.contextmanager
def address_space_cap(extra=2 << 30):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        current = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    cap = current + extra if hard == resource.RLIM_INFINITY else min(current + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


DIMENSIONS = st.sampled_from([0, 1, 2, 3, 8, 64, 300, 10 ** 6, 2 ** 31, 2 ** 40])
SHAPES = st.lists(DIMENSIONS, min_size=1, max_size=4)
ROLES = ["lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha",
         "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
         "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "lora_a", "lora_b", "lora_magnitude_vector"]
MAX_FUZZ_TENSOR_BYTES = 1 << 18
# These examples write a file and audit it: their own time bound below is the
# check, not hypothesis' per-example deadline (a loaded machine stalls 1 s now and then).
FUZZ_AUDITS = settings(FUZZ, deadline=None)


@FUZZ_AUDITS
@given(st.lists(st.tuples(st.sampled_from(["base_model.model.m.q_proj", "lora_unet_m", "model.layers.0.mlp.switch"]),
                          st.sampled_from(ROLES), SHAPES, st.sampled_from(["F32", "F16", "BF16", "F8_E4M3"]),
                          st.floats(-1e300, 1e300) | st.sampled_from([0.0, 1e-300, 1.0])),
                min_size=1, max_size=6))
def test_fuzz_shapes_with_huge_dimensions(tmp_path, tensors):
    entries = {}
    for prefix, role, shape, dtype, value in tensors:
        itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}[dtype]
        if math.prod(shape) * itemsize > MAX_FUZZ_TENSOR_BYTES:
            shape = shape + [0]  # claims the huge dimensions, holds no bytes
        count = math.prod(shape)
        with np.errstate(over="ignore"):
            fill = np.full(count, value, dtype={"F32": "<f4", "F16": "<f2"}.get(dtype, "<f4"))
        blob = fill.tobytes() if dtype in ("F32", "F16") else bytes([0x3c]) * (count * itemsize)
        entries[f"{prefix}.{role}"] = (f"{prefix}.{role}", dtype, shape, blob)
    raw_file(tmp_path / "adapter_model.safetensors", list(entries.values()))
    with address_space_cap():
        started = time.perf_counter()
        try:
            result = gl.audit_lora_peft_dir(tmp_path, include_top_singular_values=4)
            json.dumps(result.to_summary_dict(include_layers=True), allow_nan=False)
            gl.render_text_report(result, show_layers=True)
        except gl.AdapterFormatError:
            pass
        assert time.perf_counter() - started < 2.0


HUGE = (st.integers(-2 ** 70, 2 ** 70) | st.sampled_from([10 ** 12, 2 ** 63, 10 ** 400, -1, 0])
        | st.floats(allow_nan=True, allow_infinity=True))


@FUZZ_AUDITS
@given(st.fixed_dictionaries({}, optional={
    "r": HUGE, "lora_alpha": HUGE, "use_rslora": st.booleans() | HUGE,
    "rank_pattern": st.dictionaries(st.text(alphabet="q_proj.*+?()|[]{}^$\\0123456789", max_size=24), HUGE,
                                    max_size=80),
    "alpha_pattern": st.dictionaries(st.text(max_size=12), HUGE, max_size=8),
    "layer_replication": st.lists(st.lists(HUGE, max_size=3), max_size=4) | HUGE,
    "target_modules": st.lists(st.text(max_size=8), max_size=4) | HUGE}))
def test_fuzz_config_fields_with_huge_values(tmp_path, config):
    norms = tmp_path / "norms.json"
    norms.write_text(json.dumps({"model.layers.0.self_attn.q_proj": {"sigma_max": 2.0, "fro_norm": 3.0}}))
    with address_space_cap():
        started = time.perf_counter()
        result = gl.audit_lora_state_dict(healthy_tensors(), config)
        result = gl.attach_udr(result, base_norms=str(norms))
        json.dumps(result.to_summary_dict(include_layers=True), allow_nan=False)
        assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("position", ["path", "--weights", "--adapter-config", "--adapter", "--base-model", "compare"])
def test_a_path_the_file_system_refuses_is_exit_2(position):
    too_long = "x" * 5000  # ENAMETOOLONG from every os call
    adapter = FIXTURES / "peft" / "llama_fp32_qv"
    args = {"path": ["audit", too_long], "compare": ["compare", too_long, adapter]}.get(
        position, ["audit", adapter, position, too_long])
    assert_bounded(run_limited(*args), 2)


def test_adalora_rank_larger_than_the_layer_is_formed_densely():
    # The same bound for factors combined in memory (AdaLoRA's E ⊙ A): no 30000² Gram.
    rng = np.random.default_rng(12)
    r = 30000
    a, b, e = rng.normal(size=(r, 2)), rng.normal(size=(3, r)), rng.normal(size=(r, 1))
    sd = {"base_model.model.q.lora_A": a, "base_model.model.q.lora_B": b, "base_model.model.q.lora_E": e}
    tracemalloc.start()
    result = gl.audit_lora_state_dict(sd, {"peft_type": "ADALORA", "r": r, "lora_alpha": r, "init_r": r, "target_r": r})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2 ** 20
    oracle = np.linalg.svd(b @ (e * a), compute_uv=False)
    assert result.layers[0].sigma_max == pytest.approx(oracle[0], rel=1e-9)


def test_peft_fused_experts_claiming_millions_of_experts_are_one_issue():
    # PEFT target_parameters: E = rows of lora_A / r, so a zero-width A claims any E.
    folder = FIXTURES / "variants" / "field_moe_mixtral"
    tensors = oracle_load(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    prefix = "base_model.model.model.layers.0.mlp.experts.base_layer"
    tensors[f"{prefix}.lora_A.weight"] = np.zeros((2 * 10 ** 7, 0))
    tensors[f"{prefix}.lora_B.weight"] = np.zeros((0, 2 * 10 ** 7))
    started = time.perf_counter()
    result = gl.audit_lora_state_dict(tensors, config)
    assert time.perf_counter() - started < MAX_SECONDS
    assert sum("MAX_EXPERTS" in issue for issue in result.issues) == 1
    assert len(result.layers) > 0  # the other parameters are still audited


def test_lokr_halves_claiming_a_huge_rank_with_no_entries_allocate_nothing():
    # Fuzzer finding: w1_b [2³¹, 0] / w1_a [0, 2³¹] — the dense route padded σ to r (16 GiB).
    sd = {"lora_unet_m.lokr_w1_a": np.zeros((0, 2 ** 31)), "lora_unet_m.lokr_w1_b": np.zeros((2 ** 31, 0)),
          "lora_unet_m.lokr_w2": np.ones((2, 2))}
    with address_space_cap():
        result = gl.audit_lora_state_dict(sd)
    assert not result.layers and any("empty" in issue for issue in result.issues)
