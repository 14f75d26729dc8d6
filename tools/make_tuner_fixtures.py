"""Fixtures for PEFT's own tuners (LoHa, LoKr, AdaLoRA, VeRA, a non-additive type)
and diffusers' PEFT→kohya converter, written by the real libraries.

Run once by a developer (never by the tests or CI), with the tools venv:

    /work/venv-tools/bin/python tools/make_tuner_fixtures.py

Each case is a tiny model built from a config (no hub downloads), wrapped by the
real PEFT 0.21.2, given non-zero weights, saved with ``save_pretrained`` into
``tests/fixtures/variants/<case>/``.  The truth recorded in ``expected.json`` is
the dense ΔW the live library applies: the layer's forward-pass difference
(adapter on minus adapter off, on an identity batch for linear layers), checked
against ``merge_and_unload()`` weight minus base weight.  Where the two disagree
the forward pass wins and the script stops.  Spectra are float64 SVDs of that ΔW
(viewed as out × in·∏kernel).
"""
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from peft import (AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, VeraConfig,
                  PeftModel, get_peft_model)
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "variants"


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class TinyConvNet(nn.Module):
    """Conv2d 3×3 (Tucker / effective-conv path), Conv2d 1×1 (flattened path), Conv1d, two Linear."""

    def __init__(self, seed=3):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(4, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, kernel_size=1)
        self.conv3 = nn.Conv1d(12, 8, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv3(x.flatten(2)))
        return self.head(torch.relu(self.fc1(x.mean(dim=2))))


def fresh(case):
    target = OUT / case
    if target.exists():
        shutil.rmtree(target)
    return target


def base_weights(model):
    return {name: p.detach().clone().double() for name, p in model.named_parameters()}


def tuner_layers(peft_model):
    return {name: module for name, module in peft_model.base_model.model.named_modules()
            if isinstance(module, BaseTunerLayer)}


def forward_delta(layer):
    """ΔW from the layer's own forward pass: the response to an identity batch with
    the adapter on minus the same with it off (float64 copies of everything)."""
    base = layer.get_base_layer()
    with torch.no_grad():
        dtype = base.weight.dtype
        if isinstance(base, nn.Linear):
            probe = torch.eye(base.in_features, dtype=dtype)
            on = layer(probe)
            with_adapters_off(layer)
            off = layer(probe)
            restore_adapters(layer)
            return (on - off).T.double()
        # Conv: a batch of unit impulses, one per (in-channel, kernel position), read out at the centre.
        kernel = base.kernel_size
        in_channels = base.in_channels
        count = in_channels * int(np.prod(kernel))
        spatial = tuple(2 * k - 1 for k in kernel)
        probe = torch.zeros((count, in_channels) + spatial, dtype=dtype)
        for index in range(count):
            channel, position = divmod(index, int(np.prod(kernel)))
            offsets = np.unravel_index(position, kernel)
            # Output at the centre sees input at centre + offset - padding; put the impulse where
            # weight[:, channel, *offsets] multiplies it.
            coords = tuple(int(c) + int(o) - int(p) for c, o, p in zip([k - 1 for k in kernel], offsets, base.padding))
            probe[(index, channel) + coords] = 1.0
        on = layer(probe)
        with_adapters_off(layer)
        off = layer(probe)
        restore_adapters(layer)
        centre = tuple(k - 1 for k in kernel)
        diff = (on - off)[(slice(None), slice(None)) + centre]  # count × out
        return diff.T.double()  # out × (in·∏kernel), in the weight's flattening order


def with_adapters_off(layer):
    layer.enable_adapters(False)


def restore_adapters(layer):
    layer.enable_adapters(True)


def spectrum_record(delta):
    sigma = np.linalg.svd(delta, compute_uv=False)
    return {"shape": list(delta.shape), "sigma": [float(s) for s in sigma], "sigma_max": float(sigma[0]),
            "fro_norm": float(np.sqrt(np.sum(sigma ** 2))),
            "stable_rank": float(np.sum(sigma ** 2) / sigma[0] ** 2) if sigma[0] > 0 else 0.0}


def record_truth(peft_model, base, extra=None, *, merge=True):
    """Per tuner layer: forward-pass ΔW (checked against merge − base when ``merge``).

    Call after saving: the forward runs once in float32 (as saved) and once with
    the whole model cast to float64, whose ΔW — the same float32 factors, without
    float32 rounding in the products — is recorded; the two must agree.
    """
    truths = {}
    peft_model.eval()
    single = {name: forward_delta(layer) for name, layer in tuner_layers(peft_model).items()}
    peft_model.double()
    deltas = {name: forward_delta(layer) for name, layer in tuner_layers(peft_model).items()}
    for name, delta in deltas.items():
        gap = float((single[name] - delta).abs().max())
        assert gap <= 1e-5 * max(float(delta.abs().max()), 1e-12), f"{name}: float32 forward differs by {gap}"
    if merge:
        merged = peft_model.merge_and_unload()
        merged_weights = {n: p.detach().double() for n, p in merged.named_parameters()}
        for name, delta in deltas.items():
            merge_delta = (merged_weights[name + ".weight"] - base[name + ".weight"]).reshape(delta.shape[0], -1)
            gap = float((merge_delta - delta).abs().max())
            size = float(delta.abs().max())
            # The forward pass is the truth; a disagreeing merge path would be a library bug worth knowing.
            assert gap <= 1e-5 * max(size, 1e-12), f"{name}: merge disagrees with forward by {gap} (|ΔW| {size})"
    for name, delta in deltas.items():
        truths[name] = spectrum_record(delta.numpy())
        truths[name].update((extra or {}).get(name, {}))
    return truths


def write_expected(target, note, modules, **fields):
    document = {"note": note, "modules": modules, **fields}
    (target / "expected.json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    for readme in target.glob("**/README.md"):
        readme.unlink()
    print(f"wrote {target}")


def randomise(peft_model, seed, names, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if any(f".{n}." in name or name.endswith(f".{n}") for n in names):
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * scale)


# ── LoHa / LoKr ─────────────────────────────────────────────────────────────

LOHA_ROLES = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"]
LOKR_ROLES = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"]


def save_lycoris_case(case, model, config, roles, seed, note):
    """Wrap, randomise every factor, save, and record the truth with PEFT's own r and scaling per layer."""
    base = base_weights(model)
    peft_model = get_peft_model(model, config)
    randomise(peft_model, seed, roles)
    extra = {name: {"scaling": float(layer.scaling["default"]), "r": int(layer.r["default"])}
             for name, layer in tuner_layers(peft_model).items()}
    target = fresh(case)
    peft_model.save_pretrained(str(target))
    write_expected(target, note, record_truth(peft_model, base, extra))


def make_loha():
    save_lycoris_case(
        "peft_loha_conv", TinyConvNet(),
        LoHaConfig(r=4, alpha=6, target_modules=["conv1", "conv2", "conv3", "fc1", "head"], rank_pattern={"head": 2},
                   alpha_pattern={"conv2": 3}, use_effective_conv2d=True, init_weights=False),
        LOHA_ROLES, 1, "PEFT LoHa: conv1 3x3 effective (hada_t1/t2), conv2 1x1 flattened, conv3 Conv1d, "
        "fc1/head Linear; alpha 6 != r 4; rank_pattern head=2, alpha_pattern conv2=3")
    save_lycoris_case(
        "peft_loha_flat_conv", TinyConvNet(seed=4),
        LoHaConfig(r=4, alpha=2, target_modules=["conv1", "fc1"], use_effective_conv2d=False, init_weights=False),
        LOHA_ROLES, 2, "PEFT LoHa, use_effective_conv2d false: the 3x3 conv's factors are flattened to (r, in*9)")


def make_lokr():
    # Both halves full: hidden 32 = 2·16 (decompose_factor 2), r = 8 ≥ 16/2, decompose_both off.
    # PEFT scales by alpha/r all the same (LyCORIS would use 1).
    save_lycoris_case(
        "peft_lokr_full", tiny_llama(seed=5),
        LoKrConfig(r=8, alpha=4, target_modules=["q_proj", "v_proj", "o_proj"], init_weights=False,
                   decompose_factor=2, alpha_pattern={"o_proj": 12}),
        LOKR_ROLES, 3, "PEFT LoKr, both Kronecker halves full (lokr_w1, lokr_w2); decompose_factor 2; alpha 4, r 8; "
        "alpha_pattern o_proj=12")
    # decompose_both with a small rank: w1 = w1_a·w1_b, w2 = w2_a·w2_b; a conv with the Tucker core
    # (use_effective_conv2d); a rank_pattern entry.  conv3 (Conv1d) is left out: PEFT 0.21.2's own
    # forward fails for a Conv1d with use_effective_conv2d (torch.kron "view size is not compatible"),
    # so there is no truth to record.
    save_lycoris_case(
        "peft_lokr_decompose_both", TinyConvNet(seed=6),
        LoKrConfig(r=1, alpha=3, target_modules=["conv1", "conv2", "fc1", "head"], decompose_both=True,
                   use_effective_conv2d=True, init_weights=False, rank_pattern={"fc1": 2}),
        LOKR_ROLES, 4, "PEFT LoKr, decompose_both, use_effective_conv2d (lokr_t2), r 1 (rank_pattern fc1=2), alpha 3")


# ── AdaLoRA ─────────────────────────────────────────────────────────────────

def make_adalora():
    model = tiny_llama(seed=7)
    base = base_weights(model)
    config = AdaLoraConfig(init_r=6, target_r=3, tinit=1, tfinal=2, deltaT=1, total_step=8, lora_alpha=16,
                           target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    randomise(peft_model, 5, ["lora_E"], scale=1.0)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(8)
    peft_model.train()
    for step in range(config.total_step - config.tfinal + 1):  # ends with the final allocation (masks fixed)
        tokens = torch.randint(0, 64, (4, 12), generator=gen)
        loss = peft_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    peft_model.eval()
    masks = {k: v for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    kept = {k: sum(v) for k, v in masks.items()}
    assert any(0 < n < 6 for n in kept.values()), kept
    extra = {}
    for name, layer in tuner_layers(peft_model).items():
        extra[name] = {"scaling": float(layer.scaling["default"]), "ranknum": float(layer.ranknum["default"]),
                       "lora_E": [float(e) for e in layer.lora_E["default"].detach().reshape(-1)]}
    target = fresh("peft_adalora")
    peft_model.save_pretrained(str(target))
    truths = record_truth(peft_model, base, extra, merge=False)
    # The saved adapter, loaded back by PEFT, must apply the same ΔW (ranks resized by the masks).
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=7), str(target))
    for name, layer in tuner_layers(reloaded).items():
        delta = forward_delta(layer).numpy()
        sigma = np.linalg.svd(delta, compute_uv=False)
        assert np.allclose(sigma, truths[name]["sigma"], rtol=1e-5, atol=1e-6 * max(sigma[0], 1e-30)), name
    write_expected(target, "AdaLoRA after update_and_allocate: init_r 6 → budget 2·3 modules, masks in rank_pattern",
                   truths, kept_ranks=kept)


# ── VeRA ────────────────────────────────────────────────────────────────────

def make_vera():
    for case, save_projection in (("peft_vera", True), ("peft_vera_no_projection", False)):
        model = tiny_llama(seed=9)
        base = base_weights(model)
        config = VeraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"], save_projection=save_projection,
                            projection_prng_key=11)
        peft_model = get_peft_model(model, config)
        randomise(peft_model, 6, ["vera_lambda_b", "vera_lambda_d"], scale=1.0)
        extra = {name: {"in_features": layer.in_features, "out_features": layer.out_features}
                 for name, layer in tuner_layers(peft_model).items()}
        target = fresh(case)
        peft_model.save_pretrained(str(target))
        # The base model's shapes: VeRA stores no in_features, the audit reads them from here.
        model_dir = target / "base"
        tiny_llama(seed=9).save_pretrained(str(model_dir))
        (model_dir / "generation_config.json").unlink(missing_ok=True)
        write_expected(target, f"VeRA r 4, save_projection {save_projection}; q (32→32), k (32→16), "
                       "down (48→32): vera_A sliced to in_features, vera_B to out_features",
                       record_truth(peft_model, base, extra))


# ── non-additive ────────────────────────────────────────────────────────────

def make_non_additive():
    for case, config in (("peft_ia3", IA3Config(target_modules=["q_proj", "down_proj"],
                                                feedforward_modules=["down_proj"])),
                         ("peft_oft", OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]))):
        peft_model = get_peft_model(tiny_llama(seed=10), config)
        target = fresh(case)
        peft_model.save_pretrained(str(target))
        write_expected(target, f"{config.peft_type.value}: not an additive low-rank update (exit 2)", {})


# ── diffusers convert_state_dict_to_kohya ───────────────────────────────────

class TinyUnet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.to_q = nn.Linear(16, 16)
        self.to_k = nn.Linear(16, 8)


def make_kohya_from_diffusers():
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    model = TinyUnet()
    base = base_weights(model)
    # lora_alpha = r: the converter writes alpha = r whatever the LoraConfig said.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"],
                                                  init_lora_weights=False))
    state_dict = get_peft_model_state_dict(peft_model)  # before merge_and_unload unwraps the model
    truths = record_truth(peft_model, base)
    state_dict = {"unet." + key[len("base_model.model."):]: value for key, value in state_dict.items()}
    kohya = convert_state_dict_to_kohya(state_dict)
    target = fresh("diffusers_kohya_int64_alpha")
    target.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(target / "pytorch_lora_weights.safetensors"))
    renamed = {"lora_unet_" + name: truth for name, truth in truths.items()}
    write_expected(target, "diffusers convert_state_dict_to_kohya: int64 0-d .alpha = r", renamed,
                   alpha_dtypes=sorted({str(v.dtype) for k, v in kohya.items() if k.endswith(".alpha")}))


if __name__ == "__main__":
    torch.set_default_dtype(torch.float32)
    make_loha()
    make_lokr()
    make_adalora()
    make_vera()
    make_non_additive()
    make_kohya_from_diffusers()
