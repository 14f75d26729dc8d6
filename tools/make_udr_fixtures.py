"""Generate the UDR-against-real-bases fixtures (tests/fixtures/udr/) and their truths.

Run once by a developer with the real libraries (never by the tests or CI):

    /work/venv-tools/bin/python tools/make_udr_fixtures.py

Every model is built tiny from a config (no hub downloads).  The truths in
``tests/fixtures/udr/expected.json`` come from the libraries themselves:

- kohya / LyCORIS: LyCORIS 4.1.3's ``lycoris.kohya.create_network`` wraps a
  diffusers 0.42.1 UNet2DConditionModel and transformers CLIP text encoders,
  names its modules (``lora_unet_…``, ``lora_te1_…``) and saves them; ΔW is each
  LyCORIS module's own ``get_diff_weight()`` (checked against its forward pass
  for linear layers), and the module it wraps names the base weight it adapts.
- the diffusers layout is ``save_pretrained`` of each component.  The
  original-layout (LDM) single file renames the UNet's parameters with the
  mapping written below (diffusers ships the reverse conversion only as a
  repository script, not in the package); it is accepted only if diffusers'
  own ``convert_ldm_unet_checkpoint`` turns it back into exactly the diffusers
  state dict.  sd-scripts' SDXL networks name UNet modules after the
  original layout (``lora_unet_input_blocks_1_1_proj_in``): the
  ``kohya_sdxl_ldm`` adapter is the LyCORIS adapter with its UNet keys renamed
  by the same mapping.
- DoRA: PEFT 0.21.2; ΔW_eff = PEFT's ``merge_and_unload`` weight − W₀, in
  float64 (the adapter and base were saved in float32 and converted exactly);
  the merged weight is checked against the DoRA layer's forward pass on the
  identity.
- MoE: transformers' GptOss (fused experts stored (E, in, out)) and Mixtral
  bases saved by ``save_pretrained``; MLX-style fused and per-expert bases for
  the MLX SwitchLinear adapter fixture written with safetensors.
- shape mismatch: tiny Llama bases with another num_key_value_heads and
  another hidden size, for the tests/fixtures/peft/llama_fp32_qv adapter.

σ_max truths are dense float64 SVDs of the formed matrices.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "udr"
PEFT_FIXTURES = ROOT / "tests" / "fixtures" / "peft"
FORMATS = ROOT / "tests" / "fixtures" / "formats"


def sigma_max(matrix) -> float:
    matrix = np.asarray(matrix, dtype=np.float64)
    return float(np.linalg.svd(matrix.reshape(matrix.shape[0], -1), compute_uv=False)[0])


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def fill_random(parameters, generator, scale=0.3):
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


# ── SD-like pipeline: UNet + two CLIP text encoders ──────────────────────────

def tiny_pipeline():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    clip = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16)
    # Both encoders are the same class with the same shapes on purpose (as SD3's two CLIPs): their
    # parameters have equal names, so only their containers (text_encoder/ vs text_encoder_2/) tell
    # lora_te1_ from lora_te2_.
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=16, **clip))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=16, **clip))
    return unet, text_encoder, text_encoder_2


def ldm_unet_names(unet) -> dict:
    """diffusers UNet parameter name → original (LDM) name, for down/up blocks
    of ``layers_per_block`` resnets (+ attention) and one down/upsampler."""
    per_block = unet.config.layers_per_block
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    names = {}
    for name in unet.state_dict():
        parts = name.split(".")
        if ".".join(parts[:2]) in top:
            names[name] = top[".".join(parts[:2])] + "." + ".".join(parts[2:])
            continue
        if parts[0] in top:
            names[name] = top[parts[0]] + "." + ".".join(parts[1:])
            continue
        if parts[0] == "down_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "downsamplers":
                head = f"input_blocks.{(per_block + 1) * (block + 1)}.0.op"
                rest = rest[1:]  # downsamplers.0.conv.weight → ….op.weight
            else:
                head = f"input_blocks.{(per_block + 1) * block + index + 1}.{0 if kind == 'resnets' else 1}"
        elif parts[0] == "up_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            has_attention = hasattr(unet.up_blocks[block], "attentions")
            if kind == "upsamplers":
                head = f"output_blocks.{(per_block + 1) * block + per_block}.{2 if has_attention else 1}.conv"
                rest = rest[1:]
            else:
                head = f"output_blocks.{(per_block + 1) * block + index}.{0 if kind == 'resnets' else 1}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), parts[3:]
            head = f"middle_block.{1 if kind == 'attentions' else 2 * index}"
        else:
            raise ValueError(f"unmapped UNet parameter {name}")
        if kind == "resnets" and rest[0] in resnet:
            rest = resnet[rest[0]].split(".") + rest[1:]
        names[name] = head + "." + ".".join(rest)
    return names


def check_ldm_round_trip(unet, ldm_state):
    """diffusers' own single-file converter must give back the diffusers state dict exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint(dict(ldm_state), dict(unet.config))
    original = unet.state_dict()
    assert set(converted) == set(original), sorted(set(converted) ^ set(original))[:10]
    for name, value in original.items():
        assert torch.equal(converted[name], value), name


def lycoris_network(unet, text_encoders, seed):
    from lycoris.kohya import create_network

    # Attention blocks and ResNet blocks (linear + conv LoCon) of the UNet, attention and MLP of the encoders.
    preset = Path("/tmp/udr_fixture_preset.toml")
    preset.write_text('enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D"]\n'
                      'unet_target_name = []\ntext_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n'
                      'text_encoder_target_name = []\n')
    network = create_network(1.0, 4, 2.0, None, text_encoders, unet, algo="lora", conv_dim=4, conv_alpha=2.0,
                             preset=str(preset))
    network.apply_to(text_encoders, unet, True, True)
    gen = torch.Generator().manual_seed(seed)
    for module in network.loras:
        fill_random([p for n, p in module.named_parameters() if n.startswith(("lora_down", "lora_up"))], gen)
    return network


def module_paths(models: dict) -> dict:
    """id(module) → (component, module path) over the wrapped models."""
    paths = {}
    for component, model in models.items():
        for path, module in model.named_modules():
            paths[id(module)] = (component, path)
    return paths


def lycoris_truths(network, paths) -> dict:
    truths = {}
    for module in network.loras:
        original = module.org_module[0]
        component, path = paths[id(original)]
        with torch.no_grad():
            delta = module.get_diff_weight(multiplier=1)[0].double().numpy()
            weight = original.weight.detach().double().numpy()
            if isinstance(original, torch.nn.Linear):  # the forward pass agrees with get_diff_weight
                eye = torch.eye(original.in_features)
                through = (module(eye) - torch.nn.functional.linear(eye, original.weight, original.bias)).T
                assert np.allclose(through.double().numpy(), delta, atol=1e-5), module.lora_name
        truths[module.lora_name] = {"component": component, "module": path,
                                    "delta_shape": [delta.shape[0], int(np.prod(delta.shape[1:]))],
                                    "delta_sigma_max": sigma_max(delta), "base_sigma_max": sigma_max(weight),
                                    "base_fro_norm": float(np.linalg.norm(weight))}
    return truths


def make_diffusion(expected):
    unet, text_encoder, text_encoder_2 = tiny_pipeline()
    pipeline = fresh(OUT / "sd_pipeline")
    unet.save_pretrained(str(pipeline / "unet"))
    text_encoder.save_pretrained(str(pipeline / "text_encoder"))
    text_encoder_2.save_pretrained(str(pipeline / "text_encoder_2"))
    (pipeline / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, indent=1) + "\n")

    ldm = ldm_unet_names(unet)
    unet_ldm = {"model.diffusion_model." + ldm[name]: value.contiguous() for name, value in unet.state_dict().items()}
    check_ldm_round_trip(unet, unet_ldm)
    te1 = {name: value.contiguous() for name, value in text_encoder.state_dict().items()}
    assert all(name.startswith(("text_model.", "text_projection.")) for name in te1)
    singles = fresh(OUT / "sd_single_file")
    # SD 1.x single file: the UNet in LDM names, its one CLIP under cond_stage_model.transformer.
    save_file({**unet_ldm, **{"cond_stage_model.transformer." + k: v for k, v in te1.items()}},
              str(singles / "sd15_like.safetensors"))
    # SDXL single file: CLIP-L under conditioner.embedders.0.transformer.  (A real SDXL file keeps
    # CLIP-G under conditioner.embedders.1.model in OpenCLIP names; it is left out here.)
    save_file({**unet_ldm, **{"conditioner.embedders.0.transformer." + k: v for k, v in te1.items()}},
              str(singles / "sdxl_like.safetensors"))

    paths = module_paths({"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2})
    cases = {}
    # SD 1.x style: one text encoder (lora_te_), diffusers-named UNet modules (sd-scripts converts SD 1.x to diffusers).
    network = lycoris_network(unet, text_encoder, seed=1)  # one encoder, not a list: LyCORIS names it lora_te_
    target = fresh(OUT / "kohya_sd15")
    network.save_weights(str(target / "kohya_sd15.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
    cases["kohya_sd15"] = lycoris_truths(network, paths)

    unet, text_encoder, text_encoder_2 = tiny_pipeline()  # fresh, unwrapped models: the same weights as saved above
    paths = module_paths({"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2})
    network = lycoris_network(unet, [text_encoder, text_encoder_2], seed=2)
    target = fresh(OUT / "kohya_sdxl")
    network.save_weights(str(target / "kohya_sdxl.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
    truths = lycoris_truths(network, paths)
    cases["kohya_sdxl"] = truths

    # sd-scripts' SDXL UNet is the original layout: its module names are LDM names.
    modules = {name[:-len(".weight")]: ldm[name][:-len(".weight")] for name in ldm if name.endswith(".weight")}
    renamed, ldm_truths = {}, {}
    tensors = load_file(str(target / "kohya_sdxl.safetensors"))
    for key, value in tensors.items():
        lora_name, role = key.split(".", 1)
        truth = truths[lora_name]
        if truth["component"] == "unet":
            new_name = "lora_unet_" + modules[truth["module"]].replace(".", "_")
            ldm_truths[new_name] = dict(truth, module=modules[truth["module"]])
        else:
            new_name = lora_name
            ldm_truths[new_name] = truth
        renamed[f"{new_name}.{role}"] = value
    target = fresh(OUT / "kohya_sdxl_ldm")
    save_file(renamed, str(target / "kohya_sdxl_ldm.safetensors"), {"ss_network_module": "lycoris.kohya"})
    cases["kohya_sdxl_ldm"] = ldm_truths
    expected["diffusion"] = cases


# ── LyCORIS on an arbitrary model (lycoris_ prefix) ─────────────────────────

class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)])
        self.head_proj = torch.nn.Linear(8, 5)


def make_lycoris_generic(expected):
    from lycoris import LycorisNetwork, create_lycoris

    torch.manual_seed(3)
    net = ConvNet()
    target = fresh(OUT / "lycoris_convnet")
    save_file({"model." + k: v.contiguous() for k, v in net.state_dict().items()},
              str(fresh(OUT / "lycoris_convnet_base") / "model.safetensors"))
    LycorisNetwork.apply_preset({"target_name": ["conv1", "blocks.0", "blocks.1", "head_proj"]})
    network = create_lycoris(net, 1.0, algo="lora", linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2)
    network.apply_to()
    gen = torch.Generator().manual_seed(4)
    for module in network.loras:
        fill_random([p for n, p in module.named_parameters() if n.startswith(("lora_down", "lora_up"))], gen)
    network.save_weights(str(target / "lycoris_convnet.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
    paths = module_paths({"": net})
    expected["lycoris_convnet"] = lycoris_truths(network, paths)


def make_lycoris_dora(expected):
    """LyCORIS DoRA (weight_decompose): dora_scale per output row (wd_on_out) or per input column.
    Truth: LyCORIS's own get_merged_weight − W₀, as its non-bypass forward applies it (float32, like
    the library at work: its ε is float32 eps); checked against the forward pass for linear layers."""
    from lycoris import LycorisNetwork, create_lycoris

    expected["lycoris_dora"] = {}
    for index, wd_on_out in enumerate((True, False)):
        name = f"lycoris_dora_{'out' if wd_on_out else 'in'}"
        torch.manual_seed(40 + index)
        net = ConvNet()
        target = fresh(OUT / name)
        (target / "base").mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(target / "base" / "model.safetensors"))
        # per input column has no flattened-matrix form for a conv: linear layers only there.
        names = ["conv1", "blocks.0", "blocks.1", "head_proj"] if wd_on_out else ["blocks.0", "blocks.1", "head_proj"]
        LycorisNetwork.apply_preset({"target_name": names})
        network = create_lycoris(net, 1.0, algo="lora", linear_dim=3, linear_alpha=1.5, conv_dim=3, conv_alpha=1.5,
                                 dora_wd=True, wd_on_output=wd_on_out)
        network.apply_to()
        gen = torch.Generator().manual_seed(50 + index)
        for module in network.loras:
            fill_random([p for n, p in module.named_parameters() if n.startswith(("lora_down", "lora_up"))], gen)
            with torch.no_grad():
                module.dora_scale.mul_(1 + 0.2 * torch.randn(module.dora_scale.shape, generator=gen))
        network.save_weights(str(target / f"{name}.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
        truths = {}
        for module in network.loras:
            original = module.org_module[0]
            with torch.no_grad():
                w0 = original.weight.detach().double().numpy()
                merged = module.get_merged_weight(multiplier=1)[0].double().numpy()
                effective = (merged - w0).reshape(w0.shape[0], -1)
                if isinstance(original, torch.nn.Linear):
                    eye = torch.eye(original.in_features)
                    through = (module(eye) - torch.nn.functional.linear(eye, original.weight, original.bias)).T
                    assert np.allclose(through.double().numpy(), effective, atol=1e-5), module.lora_name
            w0 = w0.reshape(w0.shape[0], -1)
            truths[module.lora_name] = {"dora_effective_sigma_max": sigma_max(effective),
                                        "base_sigma_max": sigma_max(w0),
                                        "udr_dora_effective": sigma_max(effective) / sigma_max(w0),
                                        "dora_scale_shape": list(module.dora_scale.shape)}
        expected["lycoris_dora"][name] = truths


# ── shape mismatch: the same adapter against Llama bases of other sizes ──────

def make_mismatched_bases(expected):
    from transformers import LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, tie_word_embeddings=False, head_dim=8)
    bases = {"llama_gqa_1kv": dict(hidden_size=32, num_key_value_heads=1),  # adapter's base: 2 KV heads
             "llama_wide": dict(hidden_size=48, num_key_value_heads=2)}
    expected["mismatched_bases"] = {}
    for name, options in bases.items():
        torch.manual_seed(5)
        model = LlamaForCausalLM(LlamaConfig(**common, **options))
        model.save_pretrained(str(fresh(OUT / name)))
        expected["mismatched_bases"][name] = {
            key[:-len(".weight")]: {"shape": list(value.shape), "sigma_max": sigma_max(value.numpy())}
            for key, value in model.state_dict().items() if key.endswith("_proj.weight") and ".layers." in key}


# ── DoRA: the update PEFT really applies ─────────────────────────────────────

def make_dora(expected):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    cases = {
        "dora_llama": (lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
            dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
        # GPT-2 Conv1D stores W as (in, out): fan_in_fan_out.
        "dora_gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=24, n_layer=1,
                                                         n_head=4)),
                      dict(r=4, lora_alpha=4, use_dora=True, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])),
    }
    # Conv2d DoRA: the magnitude is per output channel, the norm over (in, kh, kw).
    cases["dora_conv"] = (ConvNet, dict(r=3, lora_alpha=6, use_dora=True, target_modules=["conv1", "blocks.0"]))
    expected["dora"] = {}
    for index, (name, (build, options)) in enumerate(cases.items()):
        torch.manual_seed(10 + index)
        model = build()
        target = fresh(OUT / name)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(str(target / "base"))
        else:
            (target / "base").mkdir()
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target / "base" / "model.safetensors"))
        base = {k: v.double().numpy() for k, v in load_file(str(target / "base" / "model.safetensors")).items()}
        peft_model = get_peft_model(model, LoraConfig(**options))
        gen = torch.Generator().manual_seed(20 + index)
        with torch.no_grad():
            for module_name, module in peft_model.named_modules():
                if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_A:
                    fill_random([module.lora_A["default"].weight, module.lora_B["default"].weight], gen, 0.4)
                    magnitude = module.lora_magnitude_vector["default"].weight
                    magnitude.mul_(1 + 0.2 * torch.randn(magnitude.shape, generator=gen))
        peft_model.save_pretrained(str(target / "adapter"))
        (target / "adapter" / "README.md").unlink()  # PEFT's model card: not needed
        peft_model = peft_model.double().eval()
        truths = {}
        for module_name, module in peft_model.named_modules():
            if not (hasattr(module, "lora_magnitude_vector") and "default" in module.lora_A):
                continue
            path = module_name[len("base_model.model."):]
            fan_in_fan_out = options.get("fan_in_fan_out", False)
            w0 = base[path + ".weight"]
            w0 = w0.T if fan_in_fan_out else w0  # (out, in)
            with torch.no_grad():
                if w0.ndim == 4:  # one-hot k×k inputs: the centre output pixel (padding 1) is ΔW_eff·e_j
                    columns = int(np.prod(w0.shape[1:]))
                    patches = torch.eye(columns, dtype=torch.float64).reshape(columns, *w0.shape[1:])
                    centre = (w0.shape[2] // 2, w0.shape[3] // 2)
                    through = (module(patches) - module.base_layer(patches))[:, :, centre[0], centre[1]].T.numpy()
                    w0 = w0.reshape(w0.shape[0], -1)
                else:
                    eye = torch.eye(w0.shape[1], dtype=torch.float64)
                    through = (module(eye) - (module.base_layer(eye))).T.numpy()  # ΔW_eff by the forward pass
                lora_a = module.lora_A["default"].weight.reshape(module.lora_A["default"].weight.shape[0], -1)
                lora_b = module.lora_B["default"].weight.reshape(module.lora_B["default"].weight.shape[0], -1)
                plain = (lora_b @ lora_a).numpy() * module.scaling["default"]
                magnitude = module.lora_magnitude_vector["default"].weight.numpy().reshape(-1).copy()  # conv: (1, out, 1, 1)
            truths[path] = {"forward_delta": through, "plain_sigma_max": sigma_max(plain), "w0": w0,
                            "magnitude": magnitude}
        merged = peft_model.merge_and_unload()
        state = {k: v.numpy() for k, v in merged.state_dict().items()}
        expected["dora"][name] = {}
        for path, truth in truths.items():
            merged_weight = state[path + ".weight"]
            merged_weight = merged_weight.T if options.get("fan_in_fan_out", False) else merged_weight
            effective = merged_weight.reshape(merged_weight.shape[0], -1) - truth["w0"]
            agreement = float(np.abs(effective - truth["forward_delta"]).max() / np.abs(effective).max())
            assert agreement < 1e-10, (name, path, agreement)  # PEFT's merge and its forward agree
            base_sigma = sigma_max(truth["w0"])
            change = truth["magnitude"] / np.linalg.norm(truth["w0"], axis=1) - 1
            expected["dora"][name][path] = {
                "dora_effective_sigma_max": sigma_max(effective), "plain_sigma_max": truth["plain_sigma_max"],
                "base_sigma_max": base_sigma, "udr_dora_effective": sigma_max(effective) / base_sigma,
                "udr": truth["plain_sigma_max"] / base_sigma, "merge_vs_forward_max_rel": agreement,
                "magnitude_change": {"mean": float(change.mean()), "min": float(change.min()),
                                     "max": float(change.max()), "std": float(change.std())}}


def make_dora_quantized():
    """DoRA trained on a bitsandbytes 4-bit base: tests/fixtures/quantized/bnb_fp4 as bitsandbytes saved it
    (FP4, float32 compute), loaded by transformers and wrapped by PEFT.  Written to
    ``dora_bnb_fp4/adapter`` with its own ``dora_bnb_fp4/expected.json`` (this file's main one untouched).

    Truth: PEFT's DoRA forward on the identity, in float64, over W₀ = bitsandbytes' ``dequantize_4bit``
    (what PEFT's DoRA uses for W₀ and its norms: ``dequantize_module_weight``).  The bnb-wrapped layer's
    own forward is recorded too: bitsandbytes 0.50's CPU Linear4bit matmul differs from its own
    ``dequantize_4bit`` by up to ~3e-4 absolute (a kernel rounding, float32 compute requested; the same
    1e-2-level agreement tools/make_base_fixtures.py accepts), so that forward's ΔW_eff is a rounded copy
    of the same formula, not another formula: it is checked to agree within 2e-2 of max |ΔW_eff|.
    """
    import bitsandbytes.functional as bnbf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = ROOT / "tests" / "fixtures" / "quantized" / "bnb_fp4"
    target = fresh(OUT / "dora_bnb_fp4")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), device_map="cpu")
    options = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, LoraConfig(**options))
    gen = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_A:
                fill_random([module.lora_A["default"].weight, module.lora_B["default"].weight], gen, 0.4)
                magnitude = module.lora_magnitude_vector["default"].weight
                magnitude.mul_(1 + 0.2 * torch.randn(magnitude.shape, generator=gen))
    peft_model.save_pretrained(str(target / "adapter"))
    (target / "adapter" / "README.md").unlink()
    truths = {}
    for module_name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_magnitude_vector") and "default" in module.lora_A):
            continue
        path = module_name[len("base_model.model."):]
        weight = module.base_layer.weight
        w0 = bnbf.dequantize_4bit(weight.data, weight.quant_state).double()  # (out, in)
        with torch.no_grad():
            eye32 = torch.eye(w0.shape[1], dtype=torch.float32)
            forward32 = (module(eye32) - module.base_layer(eye32)).T.double()  # the bnb layer's own forward
            plain = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False, dtype=torch.float64)
            plain.weight.copy_(w0)
            holder = torch.nn.Sequential()
            holder.add_module("layer", plain)
            twin = get_peft_model(holder, LoraConfig(r=options["r"], lora_alpha=options["lora_alpha"], use_dora=True,
                                                     target_modules=["layer"])).double()
            layer = twin.base_model.model.layer
            for part in ("lora_A", "lora_B"):
                getattr(layer, part)["default"].weight.copy_(getattr(module, part)["default"].weight.double())
            layer.lora_magnitude_vector["default"].weight.copy_(module.lora_magnitude_vector["default"].weight.double())
            eye = torch.eye(w0.shape[1], dtype=torch.float64)
            effective = (layer(eye) - layer.base_layer(eye)).T.numpy()  # PEFT's DoRA forward in float64
            disagreement = float(np.abs(forward32.numpy() - effective).max() / np.abs(effective).max())
            assert disagreement < 2e-2, (path, disagreement)
            lora = module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
            plain_sigma = sigma_max((lora * module.scaling["default"]).numpy())
            magnitude = module.lora_magnitude_vector["default"].weight.double().numpy()
        w0 = w0.numpy()
        change = magnitude / np.linalg.norm(w0, axis=1) - 1
        truths[path] = {"dora_effective_sigma_max": sigma_max(effective), "plain_sigma_max": plain_sigma,
                        "base_sigma_max": sigma_max(w0), "udr_dora_effective": sigma_max(effective) / sigma_max(w0),
                        "bnb_cpu_forward_max_rel": disagreement,
                        "bnb_cpu_forward_sigma_max": sigma_max(forward32.numpy()),
                        "magnitude_change": {"mean": float(change.mean()), "min": float(change.min()),
                                             "max": float(change.max()), "std": float(change.std())}}
    (target / "expected.json").write_text(json.dumps({"base": "tests/fixtures/quantized/bnb_fp4", "modules": truths},
                                                     indent=1, sort_keys=True) + "\n")


# ── MoE: fused and per-expert base weights ───────────────────────────────────

def make_moe(expected):
    from transformers import GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM

    expected["moe"] = {}
    torch.manual_seed(6)
    gpt_oss = GptOssForCausalLM(GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["full_attention"]))
    torch.manual_seed(7)
    mixtral = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
    for name, model in (("gpt_oss", gpt_oss), ("mixtral", mixtral)):
        with torch.no_grad():  # fresh expert tensors may be left uninitialised (empty) by from-config construction
            for key, parameter in model.named_parameters():
                if ".experts." in key:
                    parameter.copy_(torch.randn(parameter.shape) * 0.05)
        model.save_pretrained(str(fresh(OUT / f"{name}_base")))
        state = load_file(str(OUT / f"{name}_base" / "model.safetensors"))
        # gpt-oss saves fused (E, in, out) tensors; Mixtral saves per-expert experts.<e>.w1.weight matrices.
        experts = {key: value.double().numpy() for key, value in state.items()
                   if ".experts." in key and not key.endswith("_bias")}
        expected["moe"][name] = {
            key: {"shape": list(value.shape),
                  "sigma_max": [sigma_max(part) for part in (value if value.ndim == 3 else [value])],
                  "fro_norm": [float(np.linalg.norm(part)) for part in (value if value.ndim == 3 else [value])]}
            for key, value in experts.items()}

    # MLX SwitchLinear adapter fixture (tests/fixtures/formats/mlx_lm): model.layers.0.mlp.switch_mlp.gate_proj,
    # three experts of (64, 48).  An MLX checkpoint stacks them; a Hugging Face one keeps experts.<e>.gate_proj.
    rng = np.random.default_rng(8)
    stacked = (rng.standard_normal((3, 64, 48)) * 0.05).astype(np.float32)
    attention = {"model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((48, 48)) * 0.05).astype(np.float32),
                 "model.layers.0.self_attn.k_proj.weight": (rng.standard_normal((16, 48)) * 0.05).astype(np.float32)}
    fused = fresh(OUT / "mlx_fused_base")
    save_numpy({**attention, "model.layers.0.mlp.switch_mlp.gate_proj.weight": stacked}, str(fused / "model.safetensors"))
    per_expert = fresh(OUT / "mlx_per_expert_base")
    save_numpy({**attention, **{f"model.layers.0.mlp.experts.{e}.gate_proj.weight": np.ascontiguousarray(stacked[e])
                                for e in range(3)}}, str(per_expert / "model.safetensors"))
    expected["moe"]["mlx_gate_proj"] = {"sigma_max": [sigma_max(stacked[e]) for e in range(3)],
                                        "fro_norm": [float(np.linalg.norm(stacked[e].astype(np.float64))) for e in range(3)]}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] == ["dora_quantized"]:  # its own folder and truths; the rest is left as it is
        make_dora_quantized()
        return
    expected = {"note": "written by tools/make_udr_fixtures.py from the live libraries; see its docstring"}
    make_diffusion(expected)
    make_lycoris_generic(expected)
    make_lycoris_dora(expected)
    make_mismatched_bases(expected)
    make_dora(expected)
    make_moe(expected)
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
