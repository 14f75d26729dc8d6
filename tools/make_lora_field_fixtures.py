"""Fixtures for the LoRA-family fields of PEFT 0.21.2's LoraConfig (KaSA,
BD-LoRA, target_parameters on MoE experts, lora_bias, trainable tokens, and a
config the audit must refuse).

Like tools/make_fixtures.py, this is run by a developer, never by the tests:

    /work/venv-tools/bin/python tools/make_lora_field_fixtures.py

Each case builds a tiny model from a config (no downloads), wraps it with the
real PEFT library, gives every adapter tensor non-zero values, saves it with
``save_pretrained`` into tests/fixtures/variants/field_<case>/, and records in
``expected.json`` the truth read from the LIVE library: the dense ΔW that the
layer's own forward pass applies (forward difference on an identity input, or
for ``target_parameters`` the parameter as PEFT's parametrization presents it to
the forward), as singular values, σ_max, Frobenius norm and stable rank per
module, plus the scaling PEFT used.  Where a library helper disagrees with the
forward pass the forward pass is the truth, and the disagreement is recorded.
"""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import BdLoraConfig, KasaConfig
from peft.tuners.lora.layer import ParamWrapper
from transformers import (GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                          MixtralForCausalLM)

warnings.filterwarnings("ignore")
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "variants"
WRAPPER = "base_model.model."


def tiny_llama(bias=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False, attention_bias=bias))


def tiny_mixtral():
    torch.manual_seed(1)
    return MixtralForCausalLM(MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=32))


def tiny_gpt_oss():
    torch.manual_seed(2)
    return GptOssForCausalLM(GptOssConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                          num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32))


def randomise_adapter(model, seed):
    """Every adapter tensor non-zero, with a decaying scale so spectra are not flat."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("lora_", "trainable_tokens_delta")):
                values = torch.randn(param.shape, generator=gen) * 0.3
                if param.ndim == 2:
                    values *= torch.linspace(1.0, 0.2, param.shape[-1])
                param.copy_(values)


def spectrum(delta):
    sigma = np.linalg.svd(np.asarray(delta, dtype=np.float64), compute_uv=False)
    frob_sq = float(np.sum(sigma ** 2))
    return {"sigma": [float(s) for s in sigma], "sigma_max": float(sigma[0]), "fro_norm": float(np.sqrt(frob_sq)),
            "stable_rank": frob_sq / float(sigma[0]) ** 2 if sigma[0] > 0 else 0.0}


def linear_forward_delta(layer):
    """ΔW (out×in) and the output-bias shift that the layer's own forward adds:
    f(x) − f_disabled(x) = x·ΔWᵀ + shift, read at x = I and x = 0."""
    eye = torch.eye(layer.in_features, dtype=torch.float64)
    zero = torch.zeros(1, layer.in_features, dtype=torch.float64)
    dtype = layer.lora_A["default"].weight.dtype
    layer.double()
    with torch.no_grad():
        on_eye, on_zero = layer(eye), layer(zero)
        with layer._disable_adapters_ctx() if hasattr(layer, "_disable_adapters_ctx") else _disabled(layer):
            off_eye, off_zero = layer(eye), layer(zero)
    shift = (on_zero - off_zero)[0]
    delta = (on_eye - off_eye - shift).T
    layer.to(dtype)
    return delta.numpy(), shift.numpy()


class _disabled:
    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.layer._disable_adapters = True

    def __exit__(self, *exc):
        self.layer._disable_adapters = False


def lora_layers(model):
    return {name[len(WRAPPER):]: module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper)}


def save(case, model, modules, *, note, extra=None):
    folder = OUT / case
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's model-card template, not part of the adapter
    document = {"note": note, "peft_version": __import__("peft").__version__, "modules": modules}
    document.update(extra or {})
    (folder / "expected.json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    return folder


def linear_truth(model):
    modules = {}
    for name, layer in lora_layers(model).items():
        delta, shift = linear_forward_delta(layer)
        record = spectrum(delta)
        record.update(scaling=float(layer.scaling["default"]), r=int(layer.r["default"]),
                      bias_shift_norm=float(np.linalg.norm(shift)))
        modules[name] = record
    return modules


# ── KaSA ─────────────────────────────────────────────────────────────────────

def make_kasa():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                    kasa_config=KasaConfig()))
    randomise_adapter(model, 10)
    modules = linear_truth(model)
    helper = {}
    for name, layer in lora_layers(model).items():
        # PEFT 0.21.2: the layer's get_delta_weight is s·B·A (no lora_diag); the KaSA variant's forward and
        # merge use s·B·diag(d)·A.  The forward pass is the truth; the helper's number is kept to show it.
        helper_delta = layer.get_delta_weight("default").detach().double().numpy()
        helper[name] = float(np.linalg.svd(helper_delta, compute_uv=False)[0])
        variant = layer.lora_variant["default"]
        merged = variant._get_delta_weight(layer, "default").detach().double().numpy()
        assert np.allclose(merged, linear_forward_delta(layer)[0], rtol=1e-5, atol=1e-7), name
    save("field_kasa", model, modules, note="KaSA (kasa_config): ΔW = s·B·diag(lora_diag)·A from the forward pass",
         extra={"layer_get_delta_weight_sigma_max": helper})


# ── BD-LoRA ──────────────────────────────────────────────────────────────────

def make_bdlora():
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"],
                        use_bdlora=BdLoraConfig(target_modules_bd_a=["o_proj", "down_proj"],
                                                target_modules_bd_b=["q_proj", "k_proj", "v_proj", "up_proj"],
                                                nblocks=2, match_strict=False))
    model = get_peft_model(tiny_llama(), config)
    randomise_adapter(model, 11)
    modules = linear_truth(model)
    for name, layer in lora_layers(model).items():
        variant = layer.lora_variant.get("default")
        if variant is not None:
            helper = variant._get_bdlora_delta_weight(layer, "default").detach().double().numpy()
            assert np.allclose(helper, linear_forward_delta(layer)[0], rtol=1e-5, atol=1e-7), name
    save("field_bdlora", model, modules, note="BD-LoRA nblocks=2: o/down block-diagonal A, q/k/v/up block-diagonal B, "
                                              "gate plain (match_strict=False); ΔW from the forward pass")


# ── target_parameters: MoE experts ──────────────────────────────────────────

def expert_truth(model):
    """Per expert, the parameter PEFT's parametrization hands the forward pass, minus the stored parameter."""
    modules = {}
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ParamWrapper):
            continue
        path = name[len(WRAPPER):].replace(".base_layer", "")
        holder = wrapper.get_base_layer()
        stored = getattr(holder, wrapper.parameter_name).detach().double().clone()
        with wrapper._activate_lora(["default"]):
            applied = getattr(holder, wrapper.parameter_name).detach().double().clone()
        helper = wrapper.get_delta_weight("default").detach().double()
        assert torch.allclose(applied - stored, helper, rtol=1e-5, atol=1e-7), name
        transposed = not wrapper._did_swap_in_out_features
        for expert in range(wrapper.num_experts):
            delta = (applied - stored)[expert].numpy()
            record = spectrum(delta.T if transposed else delta)  # stored (in, out) when transposed
            record.update(scaling=float(wrapper.scaling["default"]), r=int(wrapper.r["default"]),
                          num_experts=int(wrapper.num_experts), parameter_shape=list(stored.shape),
                          stored_transposed=transposed)
            modules[f"{path}.{wrapper.parameter_name}[{expert}]"] = record
    for name, layer in lora_layers(model).items():
        delta, _ = linear_forward_delta(layer)
        record = spectrum(delta)
        record.update(scaling=float(layer.scaling["default"]), r=int(layer.r["default"]))
        modules[name] = record
    return modules


def merged_matches(model, modules):
    """merge_and_unload minus the base parameter agrees with the recorded per-expert truth."""
    base = {name: p.detach().double().clone() for name, p in model.base_model.model.named_parameters()
            if "lora_" not in name}
    merged = model.merge_and_unload()
    for name, param in merged.named_parameters():
        key = name
        stored = next((v for k, v in base.items() if k.replace(".base_layer", "") == key), None)
        if stored is None or param.ndim != 3:
            continue
        for expert in range(param.shape[0]):
            label = f"{key}[{expert}]"
            if label in modules:
                delta = (param.detach().double() - stored)[expert].numpy()
                sigma = np.linalg.svd(delta, compute_uv=False)
                assert np.allclose(sigma[:len(modules[label]["sigma"])], modules[label]["sigma"][:len(sigma)],
                                   rtol=1e-4, atol=1e-6), label


def make_moe():
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                        rank_pattern={"layers.1.mlp.experts.down_proj": 3},
                        alpha_pattern={"layers.0.mlp.experts.gate_up_proj": 5})
    model = get_peft_model(tiny_mixtral(), config)
    randomise_adapter(model, 12)
    folder = save("field_moe_mixtral", model, {},
                  note="Mixtral-style fused experts (E, out, in) via target_parameters; A expert-major, B rank-major")
    record_expert_truth(folder, model)

    config = LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=[],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(tiny_gpt_oss(), config)
    randomise_adapter(model, 13)
    folder = save("field_moe_gptoss", model, {},
                  note="gpt-oss experts stored transposed (E, in, out) via target_parameters, rsLoRA")
    save_base(folder, tiny_gpt_oss(), model)
    record_expert_truth(folder, model)


def save_base(folder, base, model):
    """The base the adapter was made on (same seed), saved by transformers into ``folder/base`` for UDR
    tests; checked equal to the parameters PEFT wraps."""
    wrapped = {name.replace(".base_layer", ""): p for name, p in model.base_model.model.named_parameters()
               if "lora_" not in name}
    for name, param in base.named_parameters():
        assert torch.equal(param, wrapped[name]), name
    base.save_pretrained(folder / "base")
    (folder / "base" / "generation_config.json").unlink(missing_ok=True)


def record_expert_truth(folder, model):
    """Saved in float32; the truth is read in float64 (exact widening) so it carries no float32 rounding."""
    model.double()
    modules = expert_truth(model)
    path = folder / "expected.json"
    document = json.loads(path.read_text())
    document["modules"] = modules
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    merged_matches(model, modules)


# ── lora_bias, trainable tokens, and a config the audit refuses ─────────────

def make_lora_bias():
    model = get_peft_model(tiny_llama(bias=True), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             lora_bias=True))
    randomise_adapter(model, 14)
    modules = linear_truth(model)
    merged = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    save("field_lora_bias", model, modules, note="lora_bias=True: lora_B has a bias; the forward adds s·bias "
                                                 "(bias_shift_norm), not part of ΔW")
    # the merge adds scaling·lora_B.bias to the base bias: the same shift as the forward's
    for name, layer in lora_layers(model).items():
        shift = (layer.lora_B["default"].bias * layer.scaling["default"]).detach().double().numpy()
        assert np.isclose(np.linalg.norm(shift), modules[name]["bias_shift_norm"], rtol=1e-6), name
    del merged


def make_trainable_tokens():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                    trainable_token_indices=[3, 5, 7]))
    randomise_adapter(model, 15)
    save("field_trainable_tokens", model, linear_truth(model),
         note="trainable_token_indices=[3, 5, 7]: embedding rows replaced (not low-rank); LoRA modules as usual")


def make_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    use_qalora=True))
    randomise_adapter(model, 16)
    folder = save("field_refused", model, linear_truth(model),
                  note="use_qalora=True (written by PEFT; ΔW depends on whether the base layer is GPTQ, which the "
                       "adapter does not say) plus an unknown key added by hand: the audit refuses / reports")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_future_option"] = {"enabled": True}  # a key PEFT 0.21.2 does not know
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    make_kasa()
    make_bdlora()
    make_moe()
    make_lora_bias()
    make_trainable_tokens()
    make_refused()
    total = sum(p.stat().st_size for p in OUT.glob("field_*/*"))
    print(f"fixtures written: {total} bytes")
