"""The training-loop examples of the README, run with real torch + PEFT + transformers.

Skipped (with the reason shown by ``pytest -ra``) where torch is absent, as in
the main CI suite; CI runs this file in its own venv with torch, peft,
transformers and accelerate.  The truths: the adapter PEFT itself saves
(``save_pretrained``), and a dense float64 SVD of ΔW = scaling·B·A formed from
the live parameters with the scaling PEFT's own layer applies.
"""
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (CI runs this file in a separate torch venv)")
peft = pytest.importorskip("peft", reason="peft is not installed (CI runs this file in a separate torch venv)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (CI runs this file in a separate torch venv)")

import base_norms  # noqa: E402
import gradience_lite as gl  # noqa: E402
from conftest import ROOT  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def readme_example(marker: str) -> str:
    """The README's python code block containing ``marker`` (the examples are tested as written)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"expected one README python block containing {marker!r}, found {len(found)}"
    return found[0]


def tiny_bf16_peft_model(seed=0, save_base_to=None):
    """A tiny Llama from a config, in bf16, with bf16 LoRA factors (PEFT would
    otherwise upcast the adapter to float32; training in bf16 is the case a
    NumPy-only auditor could not read).  ``save_base_to``: also save the base
    model there (safetensors) before the adapter is attached."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    if save_base_to is not None:
        model.save_pretrained(save_base_to)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, rank_pattern={"down_proj": 4})
    return peft.get_peft_model(model, lora, autocast_adapter_dtype=False)


def batches(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(0, 96, (2, 12), generator=generator)
        yield {"input_ids": ids, "labels": ids}


def train(model, steps):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for batch in batches(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def rows(result):
    return [layer.to_dict() for layer in result.layers]


def test_live_bf16_state_dict_audits_to_the_saved_adapters_numbers(tmp_path):
    model = tiny_bf16_peft_model()
    train(model, 4)
    live_tensors = peft.get_peft_model_state_dict(model)
    assert {t.dtype for t in live_tensors.values()} == {torch.bfloat16}
    live = gl.audit_lora_state_dict(live_tensors, model.peft_config["default"], include_top_singular_values=8)
    # The trainable parameters themselves (requiring grad; keys carry the adapter name) audit alike.
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in parameters.values())
    by_parameters = gl.audit_lora_state_dict(parameters, model.peft_config["default"], include_top_singular_values=8)
    without_keys = lambda result: [{k: v for k, v in row.items() if k not in ("lora_a_key", "lora_b_key")}
                                   for row in rows(result)]
    assert without_keys(by_parameters) == without_keys(live)
    model.save_pretrained(tmp_path / "adapter")
    saved = gl.audit_lora_peft_dir(tmp_path / "adapter", include_top_singular_values=8)

    assert len(live.layers) == 2 * len(TARGETS) and live.n_modules_skipped == 0
    assert rows(live) == rows(saved)
    live_summary, saved_summary = live.to_summary_dict(), saved.to_summary_dict()
    for key in ("weights_path", "config_path"):
        live_summary.pop(key), saved_summary.pop(key)
    assert live_summary == saved_summary

    # The truth: PEFT's own modules (their scaling, their bf16 factors) → dense float64 SVD.
    peft_modules = {name.replace("base_model.model.", "", 1): module for name, module in model.named_modules()
                    if isinstance(module, peft.tuners.lora.LoraLayer)}
    for layer in live.layers:
        module = peft_modules[layer.name]
        a = module.lora_A["default"].weight.detach().double()
        b = module.lora_B["default"].weight.detach().double()
        sigma = torch.linalg.svdvals(module.scaling["default"] * (b @ a)).numpy()
        assert layer.scale == module.scaling["default"]
        assert layer.delta_sigma_max == pytest.approx(sigma[0], rel=1e-9)
        assert layer.delta_fro_norm == pytest.approx(float(np.linalg.norm(sigma)), rel=1e-9)
        assert layer.sigma_max > 0  # trained: B moved away from zero


def test_trainer_callback_from_the_readme_appends_valid_events(tmp_path):
    namespace = {}
    exec(readme_example("class GradienceAuditCallback"), namespace)
    run_file = tmp_path / "run.jsonl"
    model = tiny_bf16_peft_model()
    data = [batch for batch in batches(6)]
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=1, learning_rate=5e-3,
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(
        model=model, args=arguments, train_dataset=[{k: v[0] for k, v in batch.items()} for batch in data],
        callbacks=[namespace["GradienceAuditCallback"](str(run_file), every=2, run_id="tiny-run")])
    trainer.train()

    events = [json.loads(line) for line in run_file.read_text().splitlines()]
    assert [event["step"] for event in events] == [2, 4, 6]
    for event in events:
        assert set(event) == {"schema", "ts", "run_id", "event", "kind", "step", "metrics"}
        assert (event["schema"], event["event"], event["kind"], event["run_id"]) == \
            ("gradience.vnext.telemetry/v1", "metrics", "lora_audit", "tiny-run")
        assert event["metrics"]["n_layers"] == 2 * len(TARGETS) and event["metrics"]["n_modules_skipped"] == 0
        assert event["metrics"]["schema"] == gl.SCHEMA_VERSION
    # Training moved the adapter between audits, and the last event is the final adapter's audit.
    assert events[0]["metrics"]["stable_rank_mean"] != events[-1]["metrics"]["stable_rank_mean"]
    final = gl.audit_lora_state_dict(peft.get_peft_model_state_dict(model), model.peft_config["default"])
    assert events[-1]["metrics"] == json.loads(json.dumps(final.to_summary_dict()))


def test_plain_loop_from_the_readme_appends_valid_events(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes "run.jsonl" in the working directory
    model = tiny_bf16_peft_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    namespace = {"model": model, "optimizer": optimizer, "batches": list(batches(6)), "audit_every": 3}
    exec(readme_example("for step, batch in enumerate(batches"), namespace)
    events = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [(event["run_id"], event["step"]) for event in events] == [("my-run", 3), ("my-run", 6)]
    assert all(event["metrics"]["n_layers"] == 2 * len(TARGETS) for event in events)


def test_udr_in_the_loop_from_a_cached_base_equals_svd_of_the_live_weights(tmp_path, monkeypatch):
    model = tiny_bf16_peft_model(save_base_to=tmp_path / "base")  # what the loop points base_model at
    train(model, 3)
    cache = tmp_path / "base_norms.json"
    result = gl.audit_lora_state_dict(peft.get_peft_model_state_dict(model), model.peft_config["default"])
    first = gl.attach_udr(result, base_model=str(tmp_path / "base"), base_norms_cache=str(cache))
    # Later audits in the loop reuse the cache: no base tensor is decomposed again.
    monkeypatch.setattr(base_norms, "tensor_norms", lambda *args, **kwargs: pytest.fail("recomputed a base norm"))
    again = gl.attach_udr(result, base_model=str(tmp_path / "base"), base_norms_cache=str(cache))
    assert rows(first) == rows(again)
    modules = {name.replace("base_model.model.", "", 1): module for name, module in model.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert first.to_summary_dict()["n_layers_with_udr"] == len(first.layers)
    for layer in first.layers:
        base = modules[layer.name].base_layer.weight.detach().double()
        base_sigma = float(torch.linalg.svdvals(base)[0])
        assert layer.base_sigma_max == pytest.approx(base_sigma, rel=1e-6)  # Lanczos tolerance
        assert layer.base_fro_norm == pytest.approx(float(torch.linalg.norm(base)), rel=1e-12)
        assert layer.udr == pytest.approx(layer.delta_sigma_max / base_sigma, rel=1e-6)
