"""`resize` writes, per module, exactly the best rank-k approximation of ΔW.

Oracles: the dense float64 SVD of ΔW formed from an independent reader
(conftest.oracle_load), PEFT's own scaling recorded in expected.json, and PEFT's
pattern rule re-implemented here from peft.utils.other.get_pattern_key.
"""
import json
import math
import re
import struct

import numpy as np
import pytest

from conftest import (FIXTURES, dense_delta, fixture_deltas, oracle_load, peft_cases, run_cli, to_bf16_bits,
                      write_safetensors)

import gradience_lite as gl

RESIZABLE = [case for case in peft_cases() if case.name != "llama_dora"]


def peft_rule(patterns, name, default):
    """PEFT: the first key k (in dict order) with re.match(rf"(.*\\.)?({k})$", name) wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def peft_scaling(config, name):
    r = peft_rule(config.get("rank_pattern"), name, config["r"])
    alpha = peft_rule(config.get("alpha_pattern"), name, config["lora_alpha"])
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def truncated(delta, k):
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k], s


def written_deltas(folder):
    """name → (ΔW as PEFT would apply it from the written files, rank written)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = oracle_load(folder / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        for suffix, kind in ((".lora_A.weight", "linear"), (".lora_embedding_A", "embedding")):
            if key.endswith(suffix):
                name = key[len("base_model.model."):-len(suffix)]
                b = tensors[key.replace("_A", "_B")]
                r, scale = peft_scaling(config, name)
                assert r == a.shape[0] == b.shape[1], (name, r, a.shape, b.shape)
                out[name] = (dense_delta(a, b, scale, kind), a.shape[0])
    return out


def relative_difference(got, want):
    norm = np.linalg.norm(want)
    return np.linalg.norm(got - want) / norm if norm > 0 else np.linalg.norm(got)


@pytest.mark.parametrize("case", RESIZABLE, ids=lambda case: str(case.relative_to(FIXTURES)))
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_fixed_rank_is_the_dense_truncated_svd(case, rank, tmp_path):
    out = tmp_path / "out"
    done = run_cli("resize", case, out, "--rank", rank, "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    written = written_deltas(out)
    originals = fixture_deltas(case)
    assert set(written) == set(originals)
    for name, (delta, _, a, _) in originals.items():
        k = min(rank, a.shape[0])
        want, _ = truncated(delta, k)
        got, written_rank = written[name]
        assert written_rank == k
        assert relative_difference(got, want) < 1e-6, name


@pytest.mark.parametrize("case", RESIZABLE, ids=lambda case: str(case.relative_to(FIXTURES)))
def test_policy_rank_and_update_match_the_definition(case, tmp_path):
    out = tmp_path / "out"
    done = run_cli("resize", case, out, "--policy", "energy@0.9", "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    written = written_deltas(out)
    for name, (delta, peft, a, _) in fixture_deltas(case).items():
        r = a.shape[0]
        want_full, sigma = truncated(delta, r)
        energy = sigma[:r] ** 2
        if energy.sum() == 0:
            k = 1  # a zero update: every policy says 0, --min-rank 1 keeps one (zero) component
        else:
            k = next(i + 1 for i in range(r) if energy[:i + 1].sum() >= 0.9 * energy.sum())
        got, written_rank = written[name]
        assert written_rank == k, name
        want, _ = truncated(delta, k)
        if np.linalg.norm(want) == 0:
            assert np.linalg.norm(got) == 0
        else:
            assert relative_difference(got, want) < 1e-6, name


def test_patterns_keep_every_module_scale(tmp_path):
    case = FIXTURES / "peft" / "llama_patterns"
    out = tmp_path / "out"
    assert run_cli("resize", case, out, "--policy", "erank").returncode == 0
    config = json.loads((out / "adapter_config.json").read_text())
    report = json.loads((out / "resize_report.json").read_text())
    peft_record = json.loads((case / "expected.json").read_text())["modules"]
    for row in report["modules"]:
        r, scale = peft_scaling(config, row["name"])
        assert r == row["k"]
        assert scale == pytest.approx(peft_record[row["name"]]["scaling"], rel=1e-12)
    # every key is anchored: it matches its own module and no name that merely ends with it
    for key in config["rank_pattern"]:
        name = re.sub(r"\\(.)", r"\1", key[1:])
        assert re.match(rf"(.*\.)?({key})$", name)
        assert not re.match(rf"(.*\.)?({key})$", "wrapper." + name)


def test_rslora_scale_is_kept(tmp_path):
    case = FIXTURES / "peft" / "llama_rslora"
    out = tmp_path / "out"
    assert run_cli("resize", case, out, "--rank", "3").returncode == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is True
    for name, peft in json.loads((case / "expected.json").read_text())["modules"].items():
        assert peft_scaling(config, name)[1] == pytest.approx(peft["scaling"], rel=1e-12)


def test_audit_of_the_output_reports_the_truncated_spectra(tmp_path):
    case = FIXTURES / "peft" / "llama_fp32_qv"
    out = tmp_path / "out"
    assert run_cli("resize", case, out, "--rank", "2", "--dtype", "fp32").returncode == 0
    done = run_cli("audit", out, "--json", "--layers", "--top-singular-values", "4")
    layers = {row["name"]: row for row in json.loads(done.stdout)["layers"]}
    for name, (delta, peft, _, _) in fixture_deltas(case).items():
        sigma = np.linalg.svd(delta / peft["scaling"], compute_uv=False)
        row = layers[name]
        assert row["r"] == 2 and row["scale"] == pytest.approx(peft["scaling"])
        np.testing.assert_allclose(row["top_singular_values"], sigma[:2], rtol=1e-6)


def test_bf16_output_rounds_like_the_reference(tmp_path):
    case = FIXTURES / "peft" / "llama_bf16_all_linear"
    out = tmp_path / "out"
    assert run_cli("resize", case, out, "--rank", "2").returncode == 0  # dtype same: bf16
    header = json.loads((out / "adapter_model.safetensors").read_bytes()[8:8 + struct.unpack(
        "<Q", (out / "adapter_model.safetensors").read_bytes()[:8])[0]])
    assert {entry["dtype"] for key, entry in header.items() if key != "__metadata__"} == {"BF16"}
    for name, (delta, _, _, _) in fixture_deltas(case).items():
        want, _ = truncated(delta, 2)
        assert relative_difference(written_deltas(out)[name][0], want) < 1e-2


def test_bf16_encoder_is_round_to_nearest_even():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=10000).astype(np.float32),
                             # exact ties between two bf16 values: even mantissa wins
                             np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 0.0, -0.0], np.float32)])
    np.testing.assert_array_equal(gl.encode(values, "BF16"), to_bf16_bits(values))
    with pytest.raises(ValueError):
        gl.encode(np.array([1e6]), "F16")


def test_writer_output_reads_back_with_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file

    case = FIXTURES / "peft" / "gpt2_conv1d"
    out = tmp_path / "out"
    assert run_cli("resize", case, out, "--rank", "1", "--dtype", "fp16").returncode == 0
    loaded = load_file(str(out / "adapter_model.safetensors"))
    mine = oracle_load(out / "adapter_model.safetensors")
    assert set(loaded) == set(mine)
    for key, values in loaded.items():
        np.testing.assert_array_equal(values.astype(np.float64), mine[key])


def test_everything_else_is_carried_over_byte_for_byte(tmp_path):
    case = FIXTURES / "peft" / "llama_fp32_qv"  # saves lm_head (modules_to_save) with the adapter
    out = tmp_path / "out"
    assert run_cli("resize", case, out, "--rank", "1").returncode == 0
    source, written = gl.open_safetensors(case / "adapter_model.safetensors"), gl.open_safetensors(out / "adapter_model.safetensors")
    assert written.metadata == source.metadata
    carried = [name for name in source.tensors if ".lora_" not in name]
    assert carried, "the fixture should hold non-LoRA tensors (modules_to_save)"
    for name in carried:
        a, b = source.tensors[name], written.tensors[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert source.mapped[a.start:a.end] == written.mapped[b.start:b.end]
    config_in = json.loads((case / "adapter_config.json").read_text())
    config_out = json.loads((out / "adapter_config.json").read_text())
    changed = {key for key in config_in if config_in[key] != config_out.get(key)}
    assert changed <= {"r", "lora_alpha", "rank_pattern", "alpha_pattern"}


def kohya_without_dora(folder):
    """The kohya fixture minus its DoRA module, alphas kept in their stored dtypes (bf16, fp16, fp32)."""
    source = FIXTURES / "formats" / "kohya_sdxl" / "tiny_lora.safetensors"
    header = json.loads(source.read_bytes()[8:8 + struct.unpack("<Q", source.read_bytes()[:8])[0]])
    dora = {key.rsplit(".", 1)[0] for key in header if key.endswith(".dora_scale")}
    tensors, overrides = {}, {}
    for key, values in oracle_load(source).items():
        if key.split(".", 1)[0] in dora:
            continue
        dtype = header[key]["dtype"]
        if key.endswith(".alpha") and dtype == "BF16":
            tensors[key], overrides[key] = to_bf16_bits(np.atleast_1d(values)), "BF16"  # 1-d: NumPy 1.x casts 0-d uint64 >> int to float
        else:
            tensors[key] = values.astype(np.float16 if key.endswith(".alpha") and dtype == "F16" else np.float32)
    folder.mkdir()
    write_safetensors(folder / "tiny_lora.safetensors", tensors, {"ss_network_dim": "8"}, dtype_override=overrides)
    return folder, dora


def test_kohya_is_written_back_in_kohya_layout(tmp_path):
    case, dora = kohya_without_dora(tmp_path / "kohya")
    out = tmp_path / "out"
    done = run_cli("resize", case, out, "--rank", "2", "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    before = oracle_load(case / "tiny_lora.safetensors")
    after = oracle_load(out / "tiny_lora.safetensors")
    expected = json.loads((FIXTURES / "formats" / "kohya_sdxl" / "expected.json").read_text())["modules"]
    assert set(after) == set(before)
    assert gl.open_safetensors(out / "tiny_lora.safetensors").metadata == {"ss_network_dim": "8"}
    checked = 0
    for name, record in expected.items():
        if name in dora:
            continue
        down, up = before[f"{name}.lora_down.weight"], before[f"{name}.lora_up.weight"]
        delta = record["scale"] * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
        k = min(2, down.shape[0])
        new_down, new_up = after[f"{name}.lora_down.weight"], after[f"{name}.lora_up.weight"]
        assert new_down.shape == (k,) + down.shape[1:] and new_up.shape == (up.shape[0], k) + up.shape[2:]
        alpha = after.get(f"{name}.alpha")
        alpha = float(np.ravel(alpha)[0]) if alpha is not None else 0.0
        scale = alpha / k if alpha != 0 else 1.0  # kohya's rule: no alpha (or 0) means scale 1
        got = scale * (new_up.reshape(new_up.shape[0], -1) @ new_down.reshape(k, -1))
        want, _ = truncated(delta, k)
        assert relative_difference(got, want) < 1e-6, name
        checked += 1
    assert checked == len(expected) - len(dora) >= 3


def test_existing_output_needs_force_and_input_is_never_replaced(tmp_path):
    case = FIXTURES / "peft" / "llama_fp32_qv"
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    refused = run_cli("resize", case, out, "--rank", "1")
    assert refused.returncode == 2 and "already exists" in refused.stderr and (out / "old.txt").exists()
    assert run_cli("resize", case, out, "--rank", "1", "--force").returncode == 0
    assert not (out / "old.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert run_cli("resize", out, out, "--rank", "1", "--force").returncode == 2
    assert not list(tmp_path.glob(".*"))  # no temporary or backup directory left behind


@pytest.mark.parametrize("case, message", [
    (FIXTURES / "peft" / "llama_dora", "DoRA"),
    (FIXTURES / "formats" / "kohya_sdxl", "DoRA"),
    (FIXTURES / "formats" / "lycoris_loha", "loha"),
    (FIXTURES / "formats" / "mlx_lm", "format 'mlx'"),
])
def test_what_cannot_be_truncated_exactly_is_refused(case, message, tmp_path):
    out = tmp_path / "out"
    done = run_cli("resize", case, out, "--rank", "1")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_report_costs_come_from_the_discarded_singular_values(tmp_path):
    case = FIXTURES / "peft" / "llama_fp32_qv"
    out = tmp_path / "out"
    assert run_cli("resize", case, out, "--rank", "2", "--base-model", FIXTURES / "base" / "llama_fp32").returncode == 0
    report = json.loads((out / "resize_report.json").read_text())
    base = oracle_load(FIXTURES / "base" / "llama_fp32" / "model.safetensors")
    for row in report["modules"]:
        delta = fixture_deltas(case)[row["name"]][0]
        want, sigma = truncated(delta, 2)
        assert row["relative_error"] == pytest.approx(np.linalg.norm(delta - want) / np.linalg.norm(delta), rel=1e-9)
        assert row["kept_energy"] == pytest.approx(np.sum(sigma[:2] ** 2) / np.sum(sigma ** 2), rel=1e-9)
        base_sigma = np.linalg.svd(base[row["name"] + ".weight"], compute_uv=False)[0]
        assert row["udr"] == pytest.approx(np.linalg.svd(want, compute_uv=False)[0] / base_sigma, rel=1e-5)
    totals = report["totals"]
    assert totals["file_size_after"] == (out / "adapter_model.safetensors").stat().st_size
    assert totals["params_after"] == sum(v.size for key, v in oracle_load(out / "adapter_model.safetensors").items()
                                        if ".lora_" in key)


def test_truncate_lora_on_rank_deficient_factors():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 50))
    b = rng.normal(size=(40, 6))
    b[:, 3:] = b[:, :3] @ rng.normal(size=(3, 3))  # rank(B) = 3
    a2, b2 = gl.truncate_lora(a, b, 5)  # k above the numerical rank: extra components are zero
    want, _ = truncated(b @ a, 3)
    assert relative_difference(b2 @ a2, want) < 1e-10


def test_kohya_alpha_rounding_is_folded_into_the_factors(tmp_path):
    # alpha 3 at r = 7: the new alpha s·k = 6/7 has no exact fp16 value; the
    # written factors absorb the difference so the applied update stays exact.
    rng = np.random.default_rng(2)
    down, up = rng.normal(size=(7, 24)), rng.normal(size=(20, 7))
    folder = tmp_path / "kohya"
    folder.mkdir()
    write_safetensors(folder / "lora.safetensors", {"lora_unet_x_proj.lora_down.weight": down.astype(np.float32),
                                                     "lora_unet_x_proj.lora_up.weight": up.astype(np.float32),
                                                     "lora_unet_x_proj.alpha": np.array(3.0, np.float16)})
    before = oracle_load(folder / "lora.safetensors")
    out = tmp_path / "out"
    assert run_cli("resize", folder, out, "--rank", "2").returncode == 0
    after = oracle_load(out / "lora.safetensors")
    alpha = float(np.ravel(after["lora_unet_x_proj.alpha"])[0])
    assert alpha != pytest.approx(6 / 7, rel=1e-6)  # the stored fp16 value, not s·k itself
    got = alpha / 2 * (after["lora_unet_x_proj.lora_up.weight"] @ after["lora_unet_x_proj.lora_down.weight"])
    want, _ = truncated(3 / 7 * (before["lora_unet_x_proj.lora_up.weight"] @ before["lora_unet_x_proj.lora_down.weight"]), 2)
    assert relative_difference(got, want) < 1e-6


def test_real_peft_loaded_and_merged_every_resized_fixture():
    """tools/check_resize_with_peft.py ran the written adapters through PEFT itself
    (from_pretrained, set_peft_model_state_dict, merge_and_unload or the forward pass)
    and recorded the outcome; this checks the record covers every case and passed."""
    record = json.loads((FIXTURES / "resize_peft_check.json").read_text())
    results = record["results"]
    assert {result["case"] for result in results} == {str(case.relative_to(FIXTURES)) for case in RESIZABLE}
    for result in results:
        assert result["ok"] and not result["missing_keys"] and not result["unexpected_keys"], result["case"]
        assert result["worst_merged_error_relative_to_delta"] <= 1e-5
        recorded = json.loads((FIXTURES / result["case"] / "expected.json").read_text())["modules"]
        for name, module in result["modules"].items():
            assert module["scaling_loaded"] == pytest.approx(recorded[name]["scaling"], rel=1e-12)
            assert module["k_loaded"] == module["k_report"]


def test_integer_kohya_alpha_stays_integer_when_s_times_k_is_whole(tmp_path):
    # diffusers' convert_state_dict_to_kohya writes a 0-d int64 alpha = r (scale 1); at k = 2 it must be 2.
    from safetensors.numpy import load_file

    case = FIXTURES / "variants" / "diffusers_kohya_int64_alpha"
    out = tmp_path / "out"
    done = run_cli("resize", case, out, "--rank", "2", "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    written = load_file(str(out / "pytorch_lora_weights.safetensors"))
    truth = json.loads((case / "expected.json").read_text())["modules"]
    for name, record in truth.items():
        alpha = written[f"{name}.alpha"]
        assert alpha.dtype == np.int64 and alpha.shape == () and int(alpha) == 2
        up, down = written[f"{name}.lora_up.weight"].astype(np.float64), written[f"{name}.lora_down.weight"].astype(np.float64)
        sigma = np.linalg.svd(int(alpha) / 2 * (up @ down), compute_uv=False)
        np.testing.assert_allclose(sigma[:2], record["sigma"][:2], rtol=1e-6)
        assert sigma[2:].max(initial=0.0) < 1e-6 * sigma[0]


VARIANTS = FIXTURES / "variants"


@pytest.mark.parametrize("name", ["field_bdlora", "field_kasa", "field_moe_gptoss", "field_moe_mixtral", "field_refused",
                                  "field_trainable_tokens", "peft_adalora", "peft_ia3", "peft_loha_conv", "peft_lokr_full",
                                  "peft_oft", "peft_vera"])
def test_peft_variants_whose_update_is_not_one_product_are_refused(name, tmp_path):
    out = tmp_path / "out"
    done = run_cli("resize", VARIANTS / name, out, "--rank", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr and not out.exists(), done.stderr
