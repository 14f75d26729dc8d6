"""Generate the PEFT fixtures the test suite checks against.

This is the only file in the repository that imports torch, transformers or
peft.  It is run once by a developer (never by the tests or CI):

    python -m venv /tmp/fixenv
    /tmp/fixenv/bin/pip install torch==2.13.0 peft transformers safetensors numpy
    /tmp/fixenv/bin/python tools/make_fixtures.py

It builds tiny models from configs (no hub downloads), wraps them with the real
PEFT library, gives the LoRA factors non-zero values with a decaying spectrum,
saves the adapters exactly as ``save_pretrained`` writes them, and records the
scalings and ranks PEFT itself used (read from the live model) in
``expected.json`` next to each adapter.  The tiny base models are saved too, for
the base-norms / UDR tests.
"""
import json
import shutil
from pathlib import Path

import torch
from torch import nn
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PEFT_DIR = OUT / "peft"
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


if __name__ == "__main__":
    make_adapters()
    make_bases()
