"""Write the quantized base fixtures with the REAL libraries, and record their truth.

    /work/venv-tools/bin/python tools/make_base_fixtures.py

Each case is a tiny Llama-shaped base under tests/fixtures/quantized/<case>/,
written by the library that owns the format (bitsandbytes through
transformers' BitsAndBytesConfig, compressed-tensors' ModelCompressor, gguf-py's
GGUFWriter and quantizers) or, where the library cannot write the layout on CPU,
in the library's documented layout with torch.  The expected σ_max and ‖W‖_F of
every quantized weight are those of the LIBRARY'S OWN dequantization
(bitsandbytes.functional.dequantize_4bit / int8_vectorwise_dequant,
ModelCompressor.decompress_model, transformers' FP8 and MXFP4 dequantizers,
gguf.quants.dequantize after gguf.GGUFReader), by a dense float64 SVD, in
tests/fixtures/quantized/expected.json.  The tests never import torch.
"""
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "quantized"
EXPECTED = {}


def truth(values: torch.Tensor) -> dict:
    matrix = values.detach().to(torch.float64).numpy()
    flat = matrix.reshape(matrix.shape[0], -1)
    return {"sigma_max": float(np.linalg.svd(flat, compute_uv=False)[0]),
            "fro_norm": float(np.sqrt(np.sum(flat * flat))), "shape": list(matrix.shape)}


def record(case: str, name: str, values: torch.Tensor, storage: str) -> None:
    EXPECTED.setdefault(case, {"weights": {}, "refused": {}})["weights"][name] = dict(truth(values), storage=storage)


def refuse(case: str, name: str, words: str) -> None:
    EXPECTED.setdefault(case, {"weights": {}, "refused": {}})["refused"][name] = words


def fresh(case: str) -> Path:
    folder = OUT / case
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def tiny_llama(hidden: int, intermediate: int, dtype: torch.dtype, layers: int = 1, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=1, vocab_size=64,
                         tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # trained-like spectra: a few strong directions over noise
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2:
                rows, cols = parameter.shape
                spikes = torch.randn(rows, 3) @ torch.diag(torch.tensor([3.0, 2.0, 1.5])) @ torch.randn(3, cols)
                parameter.copy_(0.02 * torch.randn(rows, cols) + 0.01 * spikes / np.sqrt(cols))
    return model.to(dtype)


LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                   "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def trim_config(folder: Path) -> None:
    """Keep config.json small and deterministic (no transformers version churn)."""
    config = json.loads((folder / "config.json").read_text())
    for key in ("transformers_version", "torch_dtype"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    for extra in ("generation_config.json",):
        (folder / extra).unlink(missing_ok=True)


# ── bitsandbytes (transformers' BitsAndBytesConfig on CPU) ─────────────────────

def bitsandbytes_cases() -> None:
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    cases = {
        "bnb_nf4": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), torch.bfloat16),
        "bnb_nf4_double_quant": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
                                 torch.float16),
        "bnb_fp4": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), torch.float32),
        "bnb_fp4_double_quant": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
                                 torch.bfloat16),
        "bnb_int8": (dict(load_in_8bit=True), torch.float16),
    }
    for case, (options, dtype) in cases.items():
        with tempfile.TemporaryDirectory() as scratch:
            tiny_llama(128, 192, torch.float32).save_pretrained(scratch)
            quantized = LlamaForCausalLM.from_pretrained(
                scratch, quantization_config=BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **options),
                dtype=dtype, device_map="cpu")
            folder = fresh(case)
            quantized.save_pretrained(folder)
        trim_config(folder)
        tensors = load_file(str(folder / "model.safetensors"))
        for name in sorted(tensors):
            if not name.endswith(LINEAR_SUFFIXES):
                continue
            if "load_in_8bit" in options:
                values = bnbf.int8_vectorwise_dequant(tensors[name], tensors[name[:-len("weight")] + "SCB"])
                record(case, name, values, "bitsandbytes-int8")
                continue
            state = {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(name + ".")}
            quant_state = bnbf.QuantState.from_dict(state, device=torch.device("cpu"))
            values = bnbf.dequantize_4bit(tensors[name], quant_state)
            # The forward pass is the final word: Linear4bit on the identity must give Wᵀ.
            module = dict(quantized.named_modules())[name[:-len(".weight")]]
            forward = module(torch.eye(module.in_features, dtype=torch.float32)).T
            assert torch.allclose(forward.float(), values.float(), rtol=1e-2, atol=1e-4), (case, name)
            record(case, name, values, f"bitsandbytes-{quant_state.quant_type}")


# ── FP8 with 128×128 block scales (DeepSeek-V3 / Qwen3-FP8 layout) ─────────────

def fp8_block_case() -> None:
    """transformers' FP8 quantizer skips weights whose shape is not a multiple of the
    block (so it never writes a partial edge block), and its loader's Fp8Dequantize
    derives the block from rows // scale_rows, which is wrong for partial edges.  The
    checkpoints (DeepSeek-V3, Qwen3-FP8) do have partial edge blocks, so the layout is
    written here with torch's float8 and the truth is transformers'
    ``_dequantize_fp8_weight`` — the weight its FP8Linear uses in the backward pass,
    which handles edge blocks like the forward kernels (scale row i covers rows
    128·i … 128·i+127, truncated at the edge)."""
    from safetensors.torch import save_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    case = "fp8_block128"
    folder = fresh(case)
    model = tiny_llama(128, 192, torch.float32, layers=2)
    block = 128
    tensors = {}
    disagreements = []
    for name, weight in model.state_dict().items():
        if not name.endswith(LINEAR_SUFFIXES):
            tensors[name] = weight.to(torch.bfloat16).contiguous()
            continue
        fp8 = torch.float8_e4m3fn if ".layers.0." in name else torch.float8_e5m2
        top = torch.finfo(fp8).max
        rows, cols = weight.shape
        grid = (-(-rows // block), -(-cols // block))
        scale_inv = torch.empty(grid, dtype=torch.float32)
        quantized = torch.empty(rows, cols, dtype=fp8)
        for i in range(grid[0]):
            for j in range(grid[1]):
                tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block]
                scale_inv[i, j] = tile.abs().max() / top
                quantized[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale_inv[i, j]).to(fp8)
        tensors[name] = quantized
        tensors[name + "_scale_inv"] = scale_inv
        values = _dequantize_fp8_weight(quantized, scale_inv, [block, block], torch.float32)
        record(case, name, values, f"fp8-{'e4m3' if fp8 == torch.float8_e4m3fn else 'e5m2'}-block{block}")
        try:
            loader = Fp8Dequantize(None)._dequantize_one(quantized, scale_inv, output_dtype=torch.float32)
            if not torch.equal(loader, values):
                disagreements.append(name)
        except ValueError:
            disagreements.append(name)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [block, block]}
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str) + "\n")
    trim_config(folder)
    print(f"  Fp8Dequantize (loader) disagrees with _dequantize_fp8_weight on partial edges: {disagreements}")


# ── compressed-tensors (ModelCompressor on CPU) ────────────────────────────────

def compressed_tensors_cases() -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStrategy, apply_quantization_config)
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    cases = {  # case: (preset, overrides of the weight args, forced format)
        "ct_fp8_tensor": ("FP8", {}, None),
        "ct_fp8_channel": ("FP8_DYNAMIC", {}, None),
        "ct_fp8_block": ("FP8_BLOCK", {}, None),
        "ct_int8_naive": ("W8A16", {"strategy": "channel", "group_size": None}, "naive-quantized"),
        "ct_w4a16_group": ("W4A16", {"group_size": 32}, None),
        "ct_w4a16_asym": ("W4A16_ASYM", {"group_size": 32}, None),
        "ct_w3a16_asym": ("W3A16", {"group_size": 32, "symmetric": False}, None),  # values straddle int32 words
        "ct_w8a16_pack": ("W8A16", {"group_size": 64}, None),
        "ct_nvfp4": ("NVFP4A16", {}, None),
        "ct_mxfp4": ("MXFP4A16", {}, None),
    }
    for case, (preset, overrides, forced) in cases.items():
        model = tiny_llama(128, 192, torch.bfloat16)
        scheme_fields = dict(PRESET_SCHEMES[preset])
        if overrides:
            scheme_fields["weights"] = QuantizationArgs(**dict(scheme_fields["weights"].model_dump(), **overrides))
        scheme = QuantizationScheme(targets=["Linear"], **scheme_fields)
        apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
        for name, module in model.named_modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            if hasattr(module, "input_scale"):  # static activation scale: not part of the weight, but deterministic
                module.input_scale.data.fill_(1.0)
            weight = module.weight.data.float()
            rows, cols = weight.shape
            if args.strategy == QuantizationStrategy.TENSOR:
                low, high = weight.min().reshape(1), weight.max().reshape(1)
            elif args.strategy == QuantizationStrategy.CHANNEL:
                low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
            elif args.strategy == QuantizationStrategy.BLOCK:
                bh, bw = args.block_structure
                padded = torch.nn.functional.pad(weight, (0, -cols % bw, 0, -rows % bh))
                tiles = padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
                low, high = tiles.amin((1, 3)), tiles.amax((1, 3))
            else:  # group, tensor_group
                groups = weight.reshape(rows, cols // args.group_size, args.group_size)
                low, high = groups.amin(-1), groups.amax(-1)
            global_scale = None
            if args.strategy == QuantizationStrategy.TENSOR_GROUP:
                global_scale = generate_gparam(weight.min(), weight.max())
                module.weight_global_scale.data.copy_(global_scale)
            scale, zero_point = calculate_qparams(low, high, args, global_scale=global_scale)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=forced)
        compressor.compress_model(model)
        folder = fresh(case)
        from safetensors.torch import save_file
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(str(folder / "config.json"))
        compressor.update_config(str(folder))
        trim_config(folder)
        compressor.decompress_model(model)
        storage = "compressed-tensors-" + json.loads((folder / "config.json").read_text())["quantization_config"]["format"]
        for name, tensor in model.state_dict().items():
            if name.endswith(LINEAR_SUFFIXES):
                record(case, name, tensor, storage)


# ── gpt-oss MXFP4 experts (*_blocks / *_scales) ────────────────────────────────

def gpt_oss_mxfp4_case() -> None:
    """Fused experts in the gpt-oss checkpoint layout: blocks U8 [E, out, in/32, 16]
    (two e2m1 values per byte, low nibble first), scales U8 [E, out, in/32] (E8M0).
    The truth is transformers' convert_moe_packed_tensors, which returns the
    parameter as GptOssExperts stores it: [E, in, out]."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    case = "gpt_oss_mxfp4"
    folder = fresh(case)
    generator = torch.Generator().manual_seed(3)
    experts, hidden, intermediate = 3, 64, 96
    tensors = {}
    for proj, out_features, in_features in (("gate_up_proj", 2 * intermediate, hidden),
                                            ("down_proj", hidden, intermediate)):
        name = f"model.layers.0.mlp.experts.{proj}"
        blocks = torch.randint(0, 256, (experts, out_features, in_features // 32, 16), dtype=torch.uint8,
                               generator=generator)
        scales = torch.randint(118, 127, (experts, out_features, in_features // 32), dtype=torch.uint8,
                               generator=generator)
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        tensors[name + "_bias"] = torch.zeros(experts, out_features, dtype=torch.bfloat16)
        values = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, in, out]
        for expert in range(experts):
            record(case, f"{name}[{expert}]", values[expert], "mxfp4-gpt-oss")
    tensors["model.layers.0.mlp.router.weight"] = torch.randn(experts, hidden, generator=generator).to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_local_experts": experts, "num_hidden_layers": 1,
              "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                          "model.layers.*.mlp.router",
                                                                                          "model.embed_tokens",
                                                                                          "lm_head"]}}
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")


# ── GGUF (gguf-py's writer, quantizers, reader and dequantizers) ───────────────

# Offsets of the fp16 super-block scales (d, dmin) inside one block of each crafted
# type, so random blocks carry sane scales (gguf-py has no quantizer for these).
CRAFTED_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
                  "IQ2_XXS": (0,)}


def crafted_blocks(gguf, qtype, rows: int, cols: int, rng) -> np.ndarray:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    for offset in CRAFTED_SCALES[qtype.name]:
        scale = (rng.uniform(0.5, 1.0, size=(rows, cols // block)) * 1e-3).astype(np.float16)
        data[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def gguf_case() -> None:
    import gguf

    case = "gguf_llama"
    folder = fresh(case)
    path = folder / "model.gguf"
    hidden, intermediate, kv, vocab = 256, 256, 64, 64
    rng = np.random.default_rng(5)
    Q = gguf.GGMLQuantizationType
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (intermediate, hidden), "ffn_up": (intermediate, hidden),
              "ffn_down": (hidden, intermediate)}
    layer_types = [
        {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q5_0, "ffn_gate": Q.Q5_1,
         "ffn_up": Q.BF16, "ffn_down": Q.F16},
        {"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.IQ2_XXS, "ffn_gate": Q.Q2_K,
         "ffn_up": Q.Q3_K, "ffn_down": Q.MXFP4},
    ]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(len(layer_types))
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(4)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)

    def spiked(rows, cols):
        spikes = rng.standard_normal((rows, 3)) @ np.diag([3.0, 2.0, 1.5]) @ rng.standard_normal((3, cols))
        return (0.02 * rng.standard_normal((rows, cols)) + 0.01 * spikes / np.sqrt(cols)).astype(np.float32)

    def add(name, qtype, rows, cols):
        if qtype.name in CRAFTED_SCALES:
            data = crafted_blocks(gguf, qtype, rows, cols, rng)
        else:
            data = gguf.quants.quantize(spiked(rows, cols), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)

    add("token_embd.weight", Q.F32, vocab, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    add("output.weight", Q.Q6_K, vocab, hidden)
    for index, types in enumerate(layer_types):
        writer.add_tensor(f"blk.{index}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{index}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        for short, qtype in types.items():
            add(f"blk.{index}.{short}.weight", qtype, *shapes[short])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    hf_names = {"token_embd": "model.embed_tokens", "output": "lm_head", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    reader = gguf.GGUFReader(str(path))
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk":
            short = parts[2]
            if short not in hf_names:
                continue
            name = f"model.layers.{parts[1]}.{hf_names[short]}.weight"
        elif parts[0] in hf_names:
            name = f"{hf_names[parts[0]]}.weight"
        else:
            continue
        qtype = Q(tensor.tensor_type)
        if qtype == Q.IQ2_XXS:
            refuse(case, name, "gguf-IQ2_XXS")
            continue
        values = gguf.quants.dequantize(tensor.data, qtype)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ne[0] is the fastest axis
        record(case, name, torch.from_numpy(np.ascontiguousarray(values).reshape(shape)), f"gguf-{qtype.name}")


def vera_gguf_base_case() -> None:
    """tests/variants/peft_vera's base as a GGUF (q/k Q8_0, the rest F16): VeRA reads in_features
    from a quantized base's logical shape.  Truth (own expected.json, not this file's cases):
    gguf-py's dequantization + float64 SVD."""
    import gguf
    from safetensors.numpy import load_file

    variants = ROOT / "tests" / "fixtures" / "variants" / "peft_vera"
    folder = variants / "base_gguf"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    weights = load_file(str(variants / "base" / "model.safetensors"))
    config = json.loads((variants / "base" / "config.json").read_text())
    Q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(folder / "model.gguf"), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    gguf_names = {"self_attn.q_proj": ("attn_q", Q.Q8_0), "self_attn.k_proj": ("attn_k", Q.Q8_0),
                  "self_attn.v_proj": ("attn_v", Q.F16), "self_attn.o_proj": ("attn_output", Q.F16),
                  "mlp.gate_proj": ("ffn_gate", Q.F16), "mlp.up_proj": ("ffn_up", Q.F16),
                  "mlp.down_proj": ("ffn_down", Q.F16)}
    hf_by_gguf = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (short, qtype) in gguf_names.items():
            name = f"model.layers.{layer}.{module}.weight"
            data = gguf.quants.quantize(weights[name].astype(np.float32), qtype)
            writer.add_tensor(f"blk.{layer}.{short}.weight", data, raw_dtype=qtype if data.dtype == np.uint8 else None)
            hf_by_gguf[f"blk.{layer}.{short}.weight"] = name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = {}
    for tensor in gguf.GGUFReader(str(folder / "model.gguf")).tensors:
        qtype = Q(tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ne[0] is the fastest axis
        values = gguf.quants.dequantize(tensor.data, qtype)
        expected[hf_by_gguf[tensor.name]] = dict(truth(torch.from_numpy(np.ascontiguousarray(values).reshape(shape))),
                                                 storage=f"gguf-{qtype.name}")
    (folder / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])
    steps = {"bnb": bitsandbytes_cases, "fp8": fp8_block_case, "ct": compressed_tensors_cases,
             "gptoss": gpt_oss_mxfp4_case, "gguf": gguf_case}
    expected_path = OUT / "expected.json"
    if only and expected_path.exists():
        EXPECTED.update(json.loads(expected_path.read_text()))
    if "vera_gguf" in only:  # writes its own folder and truths, not this file's cases
        vera_gguf_base_case()
        only.discard("vera_gguf")
        if not only:
            return
    for key, step in steps.items():
        if only and key not in only:
            continue
        print(f"{key} …")
        for case in [c for c in EXPECTED if c.startswith({"bnb": "bnb_", "fp8": "fp8_", "ct": "ct_",
                                                            "gptoss": "gpt_oss", "gguf": "gguf"}[key])]:
            del EXPECTED[case]
        step()
    expected_path.write_text(json.dumps(EXPECTED, indent=1, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {len(EXPECTED)} cases, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
