"""Check `gradience-lite resize` against the real PEFT library (torch + peft; tools only).

    /work/venv-tools/bin/python tools/check_resize_with_peft.py [--record]

For every PEFT fixture that resize accepts, and for a fixed rank and a policy:
  1. resize it with gradience_lite (fp32 output) into a temporary folder;
  2. load that folder with PeftModel.from_pretrained on the fixture's base model
     (float64, so the merge adds no round-off) and report missing / unexpected keys,
     by loading the same file again with set_peft_model_state_dict;
  3. check every LoRA layer's live r and scaling (PEFT's own reading of the written
     config) against the original adapter's scaling;
  4. merge_and_unload() and compare each merged weight with W₀ + ΔW_k, where ΔW_k is
     the truncated SVD (torch.linalg.svd, float64) of the delta PEFT itself forms
     for the ORIGINAL adapter (get_delta_weight), at the k PEFT loaded.
With --record, the per-case results go to tests/fixtures/resize_peft_check.json,
which a torch-free test reads.
"""
import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import gradience_lite  # noqa: E402
from make_fixtures import TinyConvNet  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
BASE = FIXTURES / "base"
RECORD = FIXTURES / "resize_peft_check.json"


def base_for(case: Path):
    name = case.relative_to(FIXTURES / "peft").parts[0]
    if name.startswith("gpt2"):
        return GPT2LMHeadModel.from_pretrained(BASE / "gpt2_fp32")
    if name.startswith("bert"):
        return BertModel.from_pretrained(BASE / "bert_fp32")
    if name == "conv2d":
        return TinyConvNet()
    if name == "llama_patterns":
        return LlamaForCausalLM.from_pretrained(BASE / "llama12_bf16_sharded")
    return LlamaForCausalLM.from_pretrained(BASE / "llama_fp32")


def lora_layers(model):
    return {name: module for name, module in model.base_model.model.named_modules() if isinstance(module, LoraLayer)}


def truncate(delta: torch.Tensor, k: int) -> torch.Tensor:
    matrix = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(delta.shape)


def original_deltas(case: Path, resized_layers):
    """name → (W₀, ΔW of the ORIGINAL adapter as PEFT forms it), via get_delta_weight on
    the original loaded in PEFT; or, when PEFT cannot reload the original (see
    NOT_RELOADABLE), from its tensors with the scaling PEFT recorded when it made it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            original = PeftModel.from_pretrained(base_for(case).double(), str(case))
        return {name: (layer.get_base_layer().weight.detach().clone(), layer.get_delta_weight("default").detach(),
                       float(layer.scaling["default"])) for name, layer in lora_layers(original).items()}, None
    except RuntimeError as error:
        tensors = load_file(str(case / "adapter_model.safetensors"))
        recorded = json.loads((case / "expected.json").read_text())["modules"]
        out = {}
        for name, layer in resized_layers.items():  # linear layers only (the one such fixture is Llama)
            a = tensors[f"base_model.model.{name}.lora_A.weight"].double()
            b = tensors[f"base_model.model.{name}.lora_B.weight"].double()
            scaling = recorded[name]["scaling"]
            out[name] = (layer.get_base_layer().weight.detach().clone(), scaling * (b @ a), scaling)
        return out, f"PEFT cannot reload the original ({str(error).splitlines()[0]}...)"


def check(case: Path, options, workdir: Path):
    out = workdir / "out"
    report = gradience_lite.resize_adapter(case, out, dtype="fp32", force=True, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resized = PeftModel.from_pretrained(base_for(case).double(), str(out))
    load_result = set_peft_model_state_dict(resized, load_file(str(out / "adapter_model.safetensors")))
    missing = [key for key in load_result.missing_keys if "lora_" in key]
    unexpected = list(load_result.unexpected_keys)
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    new_k = {row["name"]: row["k"] for row in report["modules"]}
    loaded = lora_layers(resized)
    originals, note = original_deltas(case, loaded)
    truths, modules = {}, {}
    for name, (w0, delta, scaling) in originals.items():
        k = int(loaded[name].r["default"])
        truths[name] = (w0, truncate(delta, k))
        modules[name] = {"k_loaded": k, "k_report": new_k.get(name), "scaling_original": scaling,
                         "scaling_loaded": float(loaded[name].scaling["default"])}
    try:
        merged = resized.merge_and_unload()
    except RuntimeError as error:  # lora_bias on a base layer without bias: PEFT cannot merge
        note = f"merge impossible ({error}); compared the forward pass instead"
        merged = None
    tensors = load_file(str(case / "adapter_model.safetensors"))
    for name, (w0, delta_k) in truths.items():
        if merged is not None:
            weight = merged.get_submodule(name).weight.detach()
            error = float(torch.linalg.norm(weight - (w0 + delta_k)))
            reference = float(torch.linalg.norm(w0 + delta_k))
        else:
            # The forward pass of the loaded layer against x·(W₀ + ΔW_k)ᵀ + base bias + the ORIGINAL lora bias.
            layer = loaded[name]
            x = torch.randn(5, w0.shape[1], dtype=torch.float64)
            bias = tensors.get(f"base_model.model.{name}.lora_B.bias")
            # PEFT's forward adds lora_B(lora_A(x))·scaling, so the lora bias is scaled too.
            lora_bias = modules[name]["scaling_original"] * bias.double() if bias is not None else 0
            with torch.no_grad():
                want = layer.get_base_layer()(x) + x @ delta_k.T + lora_bias
            with torch.no_grad():
                got = layer(x)
            error = float(torch.linalg.norm(got - want)) / float(torch.linalg.norm(x))
            reference = float(torch.linalg.norm(want)) / float(torch.linalg.norm(x))
        norm = float(torch.linalg.norm(delta_k))
        modules[name]["merged_error_relative_to_delta"] = error / norm if norm > 0 else error
        modules[name]["merged_error_relative_to_weight"] = error / reference
    worst = max(m["merged_error_relative_to_delta"] for m in modules.values())
    scaling_ok = all(abs(m["scaling_loaded"] - m["scaling_original"]) <= 1e-12 * abs(m["scaling_original"])
                     for m in modules.values())
    ranks_ok = all(m["k_loaded"] == m["k_report"] for m in modules.values())
    ok = not missing and not unexpected and not key_warnings and worst <= 1e-5 and scaling_ok and ranks_ok
    return {"case": str(case.relative_to(FIXTURES)), "options": options, "ok": ok, "note": note, "missing_keys": missing,
            "unexpected_keys": unexpected, "key_warnings": key_warnings, "scalings_kept": scaling_ok,
            "ranks_as_reported": ranks_ok, "worst_merged_error_relative_to_delta": worst, "modules": modules}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help=f"write {RECORD.relative_to(ROOT)}")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [expected.parent for expected in sorted((FIXTURES / "peft").glob("**/expected.json"))
             if expected.parent.name != "llama_dora"]
    results = []
    for case in cases:
        for options in ({"rank": 2}, {"policy": "energy@0.90"}, {"policy": "erank", "min_rank": 2}):
            with tempfile.TemporaryDirectory() as workdir:
                result = check(case, options, Path(workdir))
            results.append(result)
            print(f"{'ok  ' if result['ok'] else 'FAIL'} {result['case']:<28} {json.dumps(options):<40} "
                  f"missing {len(result['missing_keys'])} unexpected {len(result['unexpected_keys'])} "
                  f"scalings kept {result['scalings_kept']} worst merged error {result['worst_merged_error_relative_to_delta']:.2e}")
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed "
          f"(peft {__import__('peft').__version__}, torch {torch.__version__})")
    if args.record:
        RECORD.write_text(json.dumps({"peft": __import__("peft").__version__, "torch": torch.__version__,
                                      "results": results}, indent=1))
        print(f"wrote {RECORD}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
