"""Quantized and GGUF bases: σ_max against the owning library's own dequantization.

The truths in tests/fixtures/quantized/expected.json were recorded by
tools/make_base_fixtures.py from the live libraries (bitsandbytes 0.50
dequantize_4bit / int8_vectorwise_dequant, compressed-tensors 0.20
ModelCompressor.decompress_model, transformers 5.24's FP8 and MXFP4
dequantizers, gguf-py 0.19's GGUFReader + quants.dequantize), each followed by
a dense float64 SVD.  No torch here.
"""
import json
import os
import stat
import struct

import numpy as np
import pytest

from conftest import FIXTURES, ROOT, run_cli

import base_norms as bn
from gradience_lite import AdapterFormatError

QUANTIZED = FIXTURES / "quantized"
EXPECTED = json.loads((QUANTIZED / "expected.json").read_text())
WEIGHTS = [(case, name) for case, spec in sorted(EXPECTED.items()) for name in sorted(spec["weights"])]


@pytest.fixture(scope="module")
def computed():
    """Every case's norms, computed once (tight tolerance: the comparison is with float64 SVD)."""
    return {case: bn.compute_base_norms(QUANTIZED / case, list(spec["weights"]) + list(spec["refused"]),
                                        tol=1e-9, max_iter=400)
            for case, spec in EXPECTED.items()}


@pytest.mark.parametrize("case, name", WEIGHTS, ids=[f"{c}:{n}" for c, n in WEIGHTS])
def test_sigma_max_matches_the_librarys_own_dequantization(computed, case, name):
    want = EXPECTED[case]["weights"][name]
    got = computed[case]["norms"].get(name)
    assert got is not None, computed[case]["errors"].get(name)
    assert got["sigma_max"] == pytest.approx(want["sigma_max"], rel=1e-6)
    assert got["fro_norm"] == pytest.approx(want["fro_norm"], rel=1e-6)
    assert got["shape"] == want["shape"] and got["storage"] == want["storage"]
    assert got["converged"]


def test_every_method_of_the_table_and_every_gguf_decoder_is_exercised():
    storages = {w["storage"] for spec in EXPECTED.values() for w in spec["weights"].values()}
    assert {"bitsandbytes-nf4", "bitsandbytes-fp4", "bitsandbytes-int8", "fp8-e4m3-block128", "fp8-e5m2-block128",
            "mxfp4-gpt-oss"} <= storages
    assert {f"compressed-tensors-{f}" for f in ("float-quantized", "naive-quantized", "pack-quantized",
                                                 "nvfp4-pack-quantized", "mxfp4-pack-quantized")} <= storages
    assert {f"gguf-{t}" for t in bn.SUPPORTED_GGUF_TYPES if t != "F64"} <= storages


def test_refused_gguf_type_is_named(computed):
    for case, spec in EXPECTED.items():
        for name, storage in spec["refused"].items():
            error = computed[case]["errors"][name]
            assert storage.split("-", 1)[1] in error and "no decoder" in error and name not in computed[case]["norms"]


def test_list_parameters_shows_logical_weights_not_their_companions():
    params = bn.list_parameters(bn.resolve_base(QUANTIZED / "bnb_nf4_double_quant"))
    up = params["model.layers.0.mlp.up_proj.weight"]
    assert (up.shape, up.storage) == ((192, 128), "bitsandbytes-nf4")
    file, shape, storage = up  # still unpacks like the (file, shape, dtype) tuples of before
    assert not [n for n in params if n.endswith(("absmax", "quant_map", "bitsandbytes__nf4"))]
    assert params["model.embed_tokens.weight"].storage in ("F16", "F32", "BF16")
    int8 = bn.list_parameters(bn.resolve_base(QUANTIZED / "bnb_int8"))
    assert int8["model.layers.0.self_attn.k_proj.weight"].storage == "bitsandbytes-int8"
    assert not [n for n in int8 if n.endswith((".SCB", "weight_format"))]
    packed = bn.list_parameters(bn.resolve_base(QUANTIZED / "ct_w4a16_asym"))
    assert packed["model.layers.0.mlp.down_proj.weight"].shape == (128, 192)
    assert not [n for n in packed if "weight_packed" in n or "zero_point" in n or "weight_shape" in n]


def test_gguf_names_map_to_hugging_face_and_shapes_are_out_by_in():
    params = bn.list_parameters(bn.resolve_base(QUANTIZED / "gguf_llama" / "model.gguf"))
    assert params["model.layers.0.self_attn.k_proj.weight"].shape == (64, 256)  # ne = [256, 64]
    assert params["model.layers.1.mlp.down_proj.weight"].storage == "gguf-MXFP4"
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(params)
    assert not [n for n in params if n.startswith("blk.")]
    assert bn.gguf_hf_name("blk.7.attn_q.weight", "gpt2") == "blk.7.attn_q.weight"  # unknown family: untouched


def test_a_gguf_directory_resolves_to_its_single_file(tmp_path):
    assert bn.resolve_base(QUANTIZED / "gguf_llama").files[0].endswith("model.gguf")
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes((QUANTIZED / "gguf_llama" / "model.gguf").read_bytes())
    with pytest.raises(AdapterFormatError, match="2 GGUF files"):
        bn.resolve_base(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"GGUX" + raw[4:], "bad magic"),
    (lambda raw: raw[:4] + struct.pack("<I", 9) + raw[8:], "version 9"),
    (lambda raw: raw[:600], "runs past the end"),
    (lambda raw: raw[:len(raw) // 2], "truncated or its header lies"),
    (lambda raw: raw[:8] + struct.pack("<Q", 1 << 60) + raw[16:], "more than a"),
])
def test_damaged_gguf_files_fail_with_a_clear_error(tmp_path, damage, message):
    path = tmp_path / "model.gguf"
    path.write_bytes(damage((QUANTIZED / "gguf_llama" / "model.gguf").read_bytes()))
    with pytest.raises(AdapterFormatError, match=message):
        bn.open_gguf(path)


def test_a_gguf_truncated_while_open_is_an_error_naming_it_not_sigbus(tmp_path):
    # Read through a memory map, the shrunken file killed the process with
    # SIGBUS; positional reads see the short read and say so.
    path = tmp_path / "model.gguf"
    path.write_bytes((QUANTIZED / "gguf_llama" / "model.gguf").read_bytes())
    gguf = bn.open_gguf(path)
    last = max(gguf.tensors.values(), key=lambda tensor: tensor.start)
    os.truncate(path, last.start + 1)
    with pytest.raises(AdapterFormatError, match="file changed while being read"):
        bn.gguf_matrix(gguf, last)


def write_safetensors(path, tensors, config=None):
    """tensors: name → (dtype name, shape, raw bytes)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    blob = json.dumps(header).encode()
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(blobs))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_gptq_is_refused_by_name_with_the_tensors_seen(tmp_path):
    base = write_safetensors(tmp_path / "gptq", {
        "model.layers.0.self_attn.q_proj.qweight": ("I32", (8, 64), bytes(8 * 64 * 4)),
        "model.layers.0.self_attn.q_proj.qzeros": ("I32", (1, 8), bytes(32)),
        "model.layers.0.self_attn.q_proj.scales": ("F16", (1, 64), bytes(128)),
        "model.layers.0.self_attn.q_proj.g_idx": ("I32", (64,), bytes(256)),
    }, {"quantization_config": {"quant_method": "gptq", "bits": 4}})
    name = "model.layers.0.self_attn.q_proj.weight"
    assert bn.list_parameters(bn.resolve_base(base))[name].storage == "gptq"
    error = bn.compute_base_norms(base, [name])["errors"][name]
    assert "gptq" in error and "qweight" in error and "qzeros" in error and "g_idx" in error


def test_unknown_quantized_layouts_are_never_read_as_float_weights(tmp_path):
    base = write_safetensors(tmp_path / "odd", {
        "a.weight": ("I8", (4, 4), bytes(16)),  # integers with no recognised companions
        "b.weight": ("F8_E4M3", (4, 4), bytes(16)),  # float8 next to a scale nobody claimed
        "b.weight_scale": ("F32", (4, 1), np.ones(4, "<f4").tobytes()),
        "c.weight": ("F32", (2, 2), np.eye(2, dtype="<f4").tobytes()),
    }, {"quantization_config": {"quant_method": "fbgemm_fp8"}})
    document = bn.compute_base_norms(base)
    assert set(document["norms"]) == {"c.weight"}
    assert "fbgemm_fp8" in document["errors"]["b.weight"] and "weight_scale" in document["errors"]["b.weight"]
    assert "not read as a float weight" in document["errors"]["a.weight"]


def test_fp8_block_scales_without_a_block_size_are_refused(tmp_path):
    base = write_safetensors(tmp_path / "fp8", {
        "m.weight": ("F8_E4M3", (4, 300), bytes(1200)),
        "m.weight_scale_inv": ("F32", (1, 3), np.ones(3, "<f4").tobytes()),
    }, {"quantization_config": {"quant_method": "fp8"}})
    assert "weight_block_size" in bn.compute_base_norms(base, ["m.weight"])["errors"]["m.weight"]


def test_expert_slices_of_a_fused_3d_weight(tmp_path):
    rng = np.random.default_rng(0)
    experts = rng.standard_normal((3, 6, 5)).astype("<f4")
    base = write_safetensors(tmp_path / "moe", {"mlp.experts.down_proj": ("F32", experts.shape, experts.tobytes())})
    document = bn.compute_base_norms(base, ["mlp.experts.down_proj[1]", "mlp.experts.down_proj[3]"], tol=1e-10)
    record = document["norms"]["mlp.experts.down_proj[1]"]
    assert record["sigma_max"] == pytest.approx(np.linalg.svd(experts[1].astype(float), compute_uv=False)[0], rel=1e-6)
    assert record["shape"] == [6, 5] and record["storage"] == "F32"
    assert "no expert slice [3]" in document["errors"]["mlp.experts.down_proj[3]"]


def test_spectral_norm_accepts_an_operator():
    rng = np.random.default_rng(1)
    left, right = rng.standard_normal((40, 3)), rng.standard_normal((3, 30))
    dense = left @ right

    class LowRank:
        shape = (40, 30)

        def matvec(self, x):
            return left @ (right @ x)

        def rmatvec(self, y):
            return right.T @ (left.T @ y)

    result = bn.spectral_norm(LowRank(), tol=1e-12)
    assert result.sigma_max == pytest.approx(np.linalg.svd(dense, compute_uv=False)[0], rel=1e-9)


def test_norms_files_of_format_1_are_stale_and_say_why(tmp_path):
    path = tmp_path / "norms.json"
    path.write_text(json.dumps({"format": "gradience_lite.base_norms/1", "files": {},
                                "norms": {"w": {"sigma_max": 0.0, "fro_norm": 0.0}}}))
    with pytest.raises(bn.StaleNormsError, match="BF16 decoding fix"):
        bn.load_norms(path)


def test_a_stale_cache_is_recomputed_from_the_base(tmp_path):
    from gradience_lite import collect_base_norms

    cache = tmp_path / "cache.json"
    cache.write_text(json.dumps({"format": "gradience_lite.base_norms/1", "files": {},
                                 "norms": {"model.layers.0.mlp.up_proj.weight": {"sigma_max": 0.0, "fro_norm": 0.0}}}))
    lookup = collect_base_norms(["model.layers.0.mlp.up_proj"], base_model=str(QUANTIZED / "bnb_nf4"),
                                cache_file=str(cache))
    truth = EXPECTED["bnb_nf4"]["weights"]["model.layers.0.mlp.up_proj.weight"]["sigma_max"]
    assert lookup.norms["model.layers.0.mlp.up_proj"][0] == pytest.approx(truth, rel=1e-5)
    assert any("stale" in issue for issue in lookup.issues)
    assert bn.load_norms(cache)["format"] == bn.NORMS_FORMAT


def test_norms_files_are_written_with_the_umask_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        bn.save_norms(tmp_path / "norms.json", {"format": bn.NORMS_FORMAT, "files": {}, "norms": {}, "errors": {}})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "norms.json").stat().st_mode) == 0o644


def test_the_quantized_fixtures_stay_small():
    total = sum(f.stat().st_size for f in QUANTIZED.rglob("*") if f.is_file())
    assert total < 3_000_000
    assert (ROOT / "tools" / "make_base_fixtures.py").is_file()


def test_bnb_4bit_decoding_in_runs_matches_one_pass_across_run_and_block_edges():
    rng = np.random.default_rng(0)
    shape = (2100, 1001)  # 2,102,100 values: past one 2^21-value run, odd count, a short last block
    count = shape[0] * shape[1]
    packed = rng.integers(0, 256, (count + 1) // 2, dtype=np.uint8)
    absmax = rng.uniform(0.5, 2, -(-count // 64)).astype(np.float32)
    stored = {"weight": bn.Stored(packed, "U8"), "absmax": bn.Stored(absmax, "F32")}
    got = bn.dequantize_bnb_4bit(stored, {"quant_type": "nf4", "blocksize": 64, "dtype": "F32", "shape": shape})
    codes = np.stack([packed >> 4, packed & 0x0F], axis=1).ravel()[:count]
    np.testing.assert_array_equal(got.ravel(), bn.BNB_4BIT_CODES["nf4"][codes] * np.repeat(absmax, 64)[:count])


@pytest.mark.parametrize("case", ["bnb_nf4_double_quant", "fp8_block128", "ct_w4a16_asym", "gguf_llama"])
def test_udr_against_a_quantized_base_uses_the_dequantized_sigma(tmp_adapter, case):
    from gradience_lite import audit_lora_peft_dir

    weights = EXPECTED[case]["weights"]
    rng = np.random.default_rng(2)
    tensors, deltas = {}, {}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        out_features, in_features = weights[module + ".weight"]["shape"]
        a, b = rng.standard_normal((4, in_features)), rng.standard_normal((out_features, 4)) * 0.01
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.astype(np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.astype(np.float32)
        deltas[module] = 2.0 * b.astype(np.float32).astype(float) @ a.astype(np.float32).astype(float)
    adapter = tmp_adapter(tensors, {"r": 4, "lora_alpha": 8, "peft_type": "LORA"})
    result = audit_lora_peft_dir(adapter, base_model=str(QUANTIZED / case))
    for layer in result.layers:
        base_sigma = weights[layer.name + ".weight"]["sigma_max"]
        delta_sigma = np.linalg.svd(deltas[layer.name], compute_uv=False)[0]
        assert layer.base_sigma_max == pytest.approx(base_sigma, rel=1e-5)
        assert layer.udr == pytest.approx(delta_sigma / base_sigma, rel=1e-5)


def test_a_gguf_base_audit_imports_no_torch_or_gguf(tmp_adapter):
    blocker = ("import sys\n"
               "for name in ('torch', 'transformers', 'peft', 'huggingface_hub', 'safetensors.torch', 'gguf'):\n"
               "    sys.modules[name] = None\n")
    shape = EXPECTED["gguf_llama"]["weights"]["model.layers.0.self_attn.q_proj.weight"]["shape"]
    adapter = tmp_adapter({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, shape[1]), np.float32),
                           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((shape[0], 2), np.float32)},
                          {"r": 2, "lora_alpha": 2})
    proc = run_cli("audit", adapter, "--json", "--layers", "--base-model", QUANTIZED / "gguf_llama", preamble=blocker)
    assert proc.returncode == 0, proc.stderr
    layer = json.loads(proc.stdout)["layers"][0]
    assert layer["base_sigma_max"] == pytest.approx(
        EXPECTED["gguf_llama"]["weights"]["model.layers.0.self_attn.q_proj.weight"]["sigma_max"], rel=1e-5)


def test_damaged_bitsandbytes_companions_give_an_error_not_a_traceback(tmp_path):
    from gradience_lite import open_safetensors, raw_view

    source = open_safetensors(QUANTIZED / "bnb_nf4_double_quant" / "model.safetensors")
    tensors = {name: (info.dtype, info.shape, raw_view(source, info).tobytes())
               for name, info in source.tensors.items()}
    nested = "model.layers.0.mlp.up_proj.weight.nested_absmax"
    tensors[nested] = ("F32", (0,), b"")  # the nested absmax lost
    base = write_safetensors(tmp_path / "damaged", tensors)
    (base / "config.json").write_text((QUANTIZED / "bnb_nf4_double_quant" / "config.json").read_text())
    document = bn.compute_base_norms(base, ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"])
    assert "do not fit together" in document["errors"]["model.layers.0.mlp.up_proj.weight"]
    assert "model.layers.0.mlp.down_proj.weight" in document["norms"]


def test_bitsandbytes_codes_stored_under_a_float_dtype_are_read_as_bytes(tmp_path):
    # bnb_4bit_quant_storage=bfloat16 (FSDP / QLoRA setups) saves the same packed bytes as BF16.
    from gradience_lite import open_safetensors, raw_view

    source = open_safetensors(QUANTIZED / "bnb_nf4" / "model.safetensors")
    tensors = {name: (info.dtype, info.shape, raw_view(source, info).tobytes())
               for name, info in source.tensors.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    dtype, shape, raw = tensors[name]
    tensors[name] = ("BF16", (shape[0] // 2, 1), raw)
    base = write_safetensors(tmp_path / "bf16_storage", tensors)
    (base / "config.json").write_text((QUANTIZED / "bnb_nf4" / "config.json").read_text())
    record = bn.compute_base_norms(base, [name], tol=1e-9)["norms"][name]
    assert record["sigma_max"] == pytest.approx(EXPECTED["bnb_nf4"]["weights"][name]["sigma_max"], rel=1e-6)
    assert record["storage"] == "bitsandbytes-nf4"


def test_a_quantized_weight_missing_a_tensor_its_method_needs_is_refused(tmp_path):
    from gradience_lite import open_safetensors, raw_view

    source = open_safetensors(QUANTIZED / "gpt_oss_mxfp4" / "model.safetensors")
    tensors = {name: (info.dtype, info.shape, raw_view(source, info).tobytes())
               for name, info in source.tensors.items()}
    tensors["model.layers.0.mlp.experts.down_proj_scales"] = ("F32", (1,), bytes(4))
    document = bn.compute_base_norms(write_safetensors(tmp_path / "broken", tensors),
                                     ["model.layers.0.mlp.experts.down_proj[0]",
                                      "model.layers.0.mlp.experts.gate_up_proj[0]"])
    assert "not the gpt-oss layout" in document["errors"]["model.layers.0.mlp.experts.down_proj[0]"]
    assert "model.layers.0.mlp.experts.gate_up_proj[0]" in document["norms"]


def test_a_weight_without_a_tensor_its_method_needs_is_refused_naming_it(tmp_path):
    from gradience_lite import open_safetensors, raw_view

    source = open_safetensors(QUANTIZED / "bnb_nf4" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = {n: (info.dtype, info.shape, raw_view(source, info).tobytes())
               for n, info in source.tensors.items() if n != name + ".absmax"}
    base = write_safetensors(tmp_path / "no_absmax", tensors)
    (base / "config.json").write_text((QUANTIZED / "bnb_nf4" / "config.json").read_text())
    error = bn.compute_base_norms(base, [name])["errors"][name]
    assert "bitsandbytes-nf4 weight without its absmax tensor" in error
