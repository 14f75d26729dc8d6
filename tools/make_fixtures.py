"""Generate the PEFT fixtures the test suite checks against.

This is the only file in the repository that imports torch, transformers or
peft.  It is run once by a developer (never by the tests or CI):

    python -m venv /tmp/fixenv
    /tmp/fixenv/bin/pip install torch==2.13.0 peft transformers safetensors numpy lycoris-lora diffusers
    /tmp/fixenv/bin/python tools/make_fixtures.py

It builds tiny models from configs (no hub downloads), wraps them with the real
PEFT library (and, for tests/fixtures/formats/, the real LyCORIS and diffusers
libraries; kohya and MLX-LM files are written by their documented key layouts,
since neither library installs here), gives the LoRA factors non-zero values with a decaying spectrum,
saves the adapters exactly as ``save_pretrained`` writes them, and records the
scalings and ranks PEFT itself used (read from the live model) in
``expected.json`` next to each adapter.  The tiny base models are saved too, for
the base-norms / UDR tests.
"""
import json
import shutil
from pathlib import Path

import numpy as np

import torch
from torch import nn
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PEFT_DIR = OUT / "peft"
FORMATS_DIR = OUT / "formats"
BASE_DIR = OUT / "base"


def tiny_llama(num_layers=2):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def tiny_gpt2():
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config)


def tiny_bert():
    torch.manual_seed(2)
    config = BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=40,
                        max_position_embeddings=32)
    return BertModel(config)


class TinyConvNet(nn.Module):
    """A small CNN: PEFT's Conv2d LoRA (3x3 and 1x1 kernels) plus a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, kernel_size=1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def give_lora_weights_a_spectrum(model, seed):
    """Replace PEFT's init (B = 0) with factors whose product has a decaying,
    non-trivial spectrum, as a trained adapter would."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            for factor in (module.lora_A[adapter].weight, module.lora_B[adapter].weight):
                with torch.no_grad():
                    values = torch.randn(factor.shape, generator=gen, dtype=torch.float32)
                    rank_axis = 0 if factor is module.lora_A[adapter].weight else 1
                    decay = torch.logspace(0, -2, factor.shape[rank_axis])
                    shape = [1] * factor.dim()
                    shape[rank_axis] = -1
                    # Trained-adapter magnitudes: A ~ 1/sqrt(fan_in), B small, so UDR is well below 1.
                    magnitude = factor[0].numel() ** -0.5 if rank_axis == 0 else 0.005
                    factor.copy_((values * decay.reshape(shape) * magnitude).to(factor.dtype))
        for adapter in module.lora_embedding_A:
            for factor in (module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]):
                with torch.no_grad():
                    values = torch.randn(factor.shape, generator=gen, dtype=torch.float32)
                    factor.copy_((values * 0.05).to(factor.dtype))


def live_expectations(model, adapter="default"):
    """What PEFT itself decided per module: r, alpha, scaling (read from the model)."""
    modules = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            modules[name] = {
                "r": int(module.r[adapter]),
                "lora_alpha": float(module.lora_alpha[adapter]),
                "scaling": float(module.scaling[adapter]),
            }
    return modules


def save_case(name, model, *, note, adapters=("default",)):
    target = PEFT_DIR / name
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(str(target))
    for readme in target.glob("**/README.md"):  # PEFT's model-card template: not a fixture
        readme.unlink()
    for adapter in adapters:
        folder = target if adapter == "default" else target / adapter
        expected = {"note": note, "adapter": adapter, "modules": live_expectations(model, adapter)}
        (folder / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target}")


def make_adapters():
    # fp32, q/v only, classic alpha/r; lm_head in modules_to_save.
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"]))
    give_lora_weights_a_spectrum(model, 10)
    save_case("llama_fp32_qv", model, note="fp32, q_proj/v_proj, alpha/r, modules_to_save lm_head")

    # bf16 all-linear.
    model = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    give_lora_weights_a_spectrum(model, 11)
    model.to(torch.bfloat16)
    save_case("llama_bf16_all_linear", model, note="bf16 all-linear")

    # fp16.
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]))
    give_lora_weights_a_spectrum(model, 12)
    model.to(torch.float16)
    save_case("llama_fp16", model, note="fp16 o_proj/down_proj")

    # rsLoRA (scale alpha/sqrt(r)), with lora_bias so lora_B.bias is saved.
    model = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=8, use_rslora=True, lora_bias=True,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    give_lora_weights_a_spectrum(model, 13)
    save_case("llama_rslora", model, note="rsLoRA alpha/sqrt(r), lora_bias")

    # rank_pattern / alpha_pattern with keys a substring match gets wrong:
    # - "q_proj" comes first, so it wins over "layers.0.self_attn.q_proj" (dict order);
    # - "0.mlp.up_proj" must not match layer 10 (dot-aligned tail);
    # - "proj" matches nothing (no dot-aligned tail is exactly "proj");
    # - a real regular expression selects layers 1-3.
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=False,
                        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        rank_pattern={"q_proj": 4, "layers.0.self_attn.q_proj": 2, "0.mlp.up_proj": 6,
                                      "proj": 3, r"layers\.[1-3]\.mlp\.down_proj": 12},
                        alpha_pattern={"v_proj": 5, "layers.11.mlp.up_proj": 7, "0.mlp.up_proj": 9})
    model = get_peft_model(tiny_llama(num_layers=12), config)
    give_lora_weights_a_spectrum(model, 14)
    save_case("llama_patterns", model, note="rank_pattern/alpha_pattern, 12 layers")

    # DoRA.
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=4, use_dora=True,
                                                    target_modules=["q_proj", "down_proj"]))
    give_lora_weights_a_spectrum(model, 15)
    save_case("llama_dora", model, note="DoRA magnitude vectors")

    # Embedding LoRA (lora_embedding_A/B, no .weight suffix) + a linear.
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=12, target_modules=["embed_tokens", "q_proj"]))
    give_lora_weights_a_spectrum(model, 16)
    save_case("llama_embedding", model, note="embedding LoRA")

    # GPT-2 Conv1D (fan_in_fan_out).
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True,
                                                   target_modules=["c_attn", "c_proj", "c_fc"]))
    give_lora_weights_a_spectrum(model, 17)
    save_case("gpt2_conv1d", model, note="GPT-2 Conv1D, fan_in_fan_out")

    # BERT (encoder.layer.N..., attention.self.query etc.).
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value", "dense"]))
    give_lora_weights_a_spectrum(model, 18)
    save_case("bert_qv_dense", model, note="BERT query/value/dense")

    # Conv2d, 3x3 and 1x1 kernels.
    model = get_peft_model(TinyConvNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "head"]))
    give_lora_weights_a_spectrum(model, 19)
    save_case("conv2d", model, note="Conv2d 3x3 and 1x1")

    # Two adapters in one save: "default" at the root, "second" in a subfolder.
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "gate_proj"]))
    give_lora_weights_a_spectrum(model, 20)
    save_case("two_adapters", model, note="two adapters", adapters=("default", "second"))

    # Freshly initialised (B = 0): no update at all.
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    save_case("llama_zero_init", model, note="fresh init, B = 0")


def make_bases():
    if BASE_DIR.exists():
        shutil.rmtree(BASE_DIR)
    tiny_llama().save_pretrained(str(BASE_DIR / "llama_fp32"))
    tiny_llama(num_layers=12).to(torch.bfloat16).save_pretrained(str(BASE_DIR / "llama12_bf16_sharded"),
                                                                  max_shard_size="60KB")
    tiny_gpt2().save_pretrained(str(BASE_DIR / "gpt2_fp32"))
    tiny_bert().save_pretrained(str(BASE_DIR / "bert_fp32"))
    for folder in BASE_DIR.iterdir():
        print(f"wrote {folder}: {sorted(p.name for p in folder.iterdir())}")


def fill_random(module_tensors, gen, magnitude=0.1):
    with torch.no_grad():
        for tensor in module_tensors:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * magnitude)


def fresh_case(name):
    target = FORMATS_DIR / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    return target


class SmallNet(nn.Module):
    """Linear layers (one square: the orientation trap) and a 3x3 conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 48)
        self.square = nn.Linear(48, 48)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)


def make_lycoris():
    """LoHa, LoKr (full and decomposed halves), LoCon with Tucker: saved by LyCORIS itself."""
    from lycoris import LycorisNetwork, create_lycoris

    cases = {
        "lycoris_loha": dict(algo="loha", linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2),
        "lycoris_lokr": dict(algo="lokr", linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, factor=4),
        "lycoris_lokr_full": dict(algo="lokr", linear_dim=10000, linear_alpha=1, factor=8),
        "lycoris_locon_tucker": dict(algo="locon", linear_dim=4, linear_alpha=8, conv_dim=4, conv_alpha=2,
                                     use_tucker=True),
        "lycoris_loha_tucker": dict(algo="loha", linear_dim=4, linear_alpha=4, conv_dim=3, conv_alpha=1,
                                    use_tucker=True),
    }
    for index, (name, options) in enumerate(cases.items()):
        net = SmallNet()
        LycorisNetwork.apply_preset({"target_name": ["fc1", "fc2", "square", "conv"]})
        network = create_lycoris(net, 1.0, **options)
        network.apply_to()
        gen = torch.Generator().manual_seed(30 + index)
        for module in network.loras:
            fill_random([p for n, p in module.named_parameters() if not n.startswith("org")], gen)
        target = fresh_case(name)
        network.save_weights(str(target / f"{name}.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
        expected = {"note": f"LyCORIS {options}", "modules": {
            module.lora_name: {"scale": float(module.scale)} for module in network.loras}}
        (target / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
        print(f"wrote {target}")


def bf16_bits(array):
    bits = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
    return bits.numpy().view(np.uint16)


def write_raw_safetensors(path, tensors, metadata=None):
    """tensors: name -> (dtype code, numpy array of the stored values or raw bits)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, array) in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def make_kohya():
    """A kohya/A1111 file by the layout of sd-scripts networks/lora.py: bf16 factors,
    alpha scalars in bf16 and fp16, one module without alpha, one with alpha 0, a
    3x3 conv, a dora_scale, and the ss_* training metadata."""
    rng = np.random.default_rng(40)
    tensors, expected = {}, {}
    layout = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((32, 32), 4, ("BF16", 8.0)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": ((64, 32), 4, ("F16", 2.0)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((40, 40), 8, None),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": ((40, 80), 8, ("F32", 0.0)),
        "lora_unet_down_blocks_0_resnets_0_conv1": ((16, 8, 3, 3), 4, ("BF16", 1.0)),
    }
    for name, (shape, rank, alpha) in layout.items():
        out_features, rest = shape[0], shape[1:]
        down = rng.normal(size=(rank, *rest)).astype(np.float32) * 0.1
        up = rng.normal(size=(out_features, rank) + (1,) * (len(rest) - 1)).astype(np.float32) * 0.1
        tensors[f"{name}.lora_down.weight"] = ("BF16", bf16_bits(down))
        tensors[f"{name}.lora_up.weight"] = ("BF16", bf16_bits(up))
        scale = 1.0
        if alpha is not None:
            dtype, value = alpha
            stored = {"BF16": bf16_bits(np.array(value)), "F16": np.array(value, dtype="<f2"),
                      "F32": np.array(value, dtype="<f4")}[dtype]
            tensors[f"{name}.alpha"] = (dtype, stored.reshape(()))
            scale = value / rank if value else 1.0
        expected[name] = {"scale": scale}
    dora = rng.normal(size=(1, 32)).astype(np.float32)
    tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.dora_scale"] = ("F32", dora)
    metadata = {"ss_network_dim": "4", "ss_network_alpha": "8.0", "ss_network_module": "networks.lora",
                "ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": "tiny"}
    target = fresh_case("kohya_sdxl")
    write_raw_safetensors(target / "tiny_lora.safetensors", tensors, metadata)
    (target / "expected.json").write_text(json.dumps({"note": "kohya layout", "modules": expected},
                                                     indent=1, sort_keys=True) + "\n")
    print(f"wrote {target}")


def make_mlx():
    """MLX-LM adapters by mlx_lm/tuner/lora.py: lora_a (in×r), lora_b (r×out), transposed
    relative to PEFT; a square layer (orientation trap); a SwitchLinear MoE layer with
    (E, r, in) / (E, out, r) factors; a DoRA magnitude .m; lora_parameters.scale absolute."""
    rng = np.random.default_rng(41)
    tensors = {
        "model.layers.0.self_attn.q_proj.lora_a": rng.normal(size=(48, 4)),
        "model.layers.0.self_attn.q_proj.lora_b": rng.normal(size=(4, 48)) * 0.05,
        "model.layers.0.self_attn.k_proj.lora_a": rng.normal(size=(48, 4)),
        "model.layers.0.self_attn.k_proj.lora_b": rng.normal(size=(4, 16)) * 0.05,
        "model.layers.0.self_attn.k_proj.m": rng.normal(size=(16,)) + 1.0,
        "model.layers.0.mlp.switch_mlp.gate_proj.lora_a": rng.normal(size=(3, 4, 48)),
        "model.layers.0.mlp.switch_mlp.gate_proj.lora_b": rng.normal(size=(3, 64, 4)) * 0.05,
    }
    target = fresh_case("mlx_lm")
    write_raw_safetensors(target / "adapters.safetensors",
                          {k: ("F32", v.astype("<f4")) for k, v in tensors.items()})
    (target / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "dora", "num_layers": 1, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}},
        indent=1))
    print(f"wrote {target}")


def make_diffusers():
    """A tiny UNet with PEFT LoRA saved by diffusers' own save_lora_weights (component
    prefix "unet.", LoraConfig in the lora_adapter_metadata header field), and an
    old-style attention-processor file (…to_q_lora.down.weight)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(5)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 2})
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(50)
    modules = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            fill_random([module.lora_A["default"].weight, module.lora_B["default"].weight], gen)
            modules[f"unet.{name}"] = {"scale": float(module.scaling["default"]), "r": int(module.r["default"])}
    target = fresh_case("diffusers_unet")
    StableDiffusionPipeline.save_lora_weights(str(target), unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    (target / "expected.json").write_text(json.dumps({"note": "diffusers save_lora_weights", "modules": modules},
                                                     indent=1, sort_keys=True) + "\n")
    print(f"wrote {target}")

    rng = np.random.default_rng(42)
    old = {}
    for block in range(2):
        prefix = f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn{block + 1}.processor"
        for proj, (out_features, in_features) in (("to_q", (8, 8)), ("to_k", (8, 8 if block == 0 else 8))):
            old[f"{prefix}.{proj}_lora.down.weight"] = ("F32", (rng.normal(size=(4, in_features)) * 0.1).astype("<f4"))
            old[f"{prefix}.{proj}_lora.up.weight"] = ("F32", (rng.normal(size=(out_features, 4)) * 0.1).astype("<f4"))
    target = fresh_case("diffusers_old")
    write_raw_safetensors(target / "pytorch_lora_weights.safetensors", old)
    print(f"wrote {target}")


if __name__ == "__main__":
    make_adapters()
    make_bases()
    make_lycoris()
    make_kohya()
    make_mlx()
    make_diffusers()
