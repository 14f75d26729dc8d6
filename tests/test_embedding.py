"""Embedding gradience_lite in other tools: tensors from any framework, upstream's names.

No framework is installed here, so torch / MLX / JAX tensors are stood in for
by fakes that refuse what the real ones refuse (torch: ``.numpy()`` on a bf16,
a grad-requiring or a GPU tensor; MLX: ``numpy.asarray`` of a bf16 array).
The real torch + PEFT path is tests/test_training_loop.py, real JAX and MLX
tests/test_frameworks.py (both skipped where those are absent).  The oracle for the
numbers is the file route (itself checked against dense SVD in test_core) and
a dense SVD of ΔW formed from independently decoded tensors.
"""
import json
import sys
import types
import weakref

import numpy as np
import pytest

import gradience_lite as gl
from conftest import FIXTURES, PEFT_FIXTURES, dense_delta, oracle_decode_bf16, oracle_load

BF16_CASE = PEFT_FIXTURES / "llama_bf16_all_linear"
BF16_FILE = BF16_CASE / "adapter_model.safetensors"
CONFIG = json.loads((BF16_CASE / "adapter_config.json").read_text())


class _Dtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


class FakeTorchTensor:
    """The slice of torch.Tensor's API the audit may use, with torch's refusals."""

    conversions = []  # weakrefs to every array numpy() handed out

    def __init__(self, values, dtype, device="cuda:0", requires_grad=True):
        self._values, self.dtype, self.device, self.requires_grad = values, _Dtype(dtype), device, requires_grad
        self.shape = values.shape

    def detach(self):
        return FakeTorchTensor(self._values, str(self.dtype), self.device, False)

    def to(self, device):
        return FakeTorchTensor(self._values, str(self.dtype), device, self.requires_grad)

    def float(self):
        values = oracle_decode_bf16(self._values).astype(np.float32) if str(self.dtype) == "torch.bfloat16" \
            else self._values.astype(np.float32)
        return FakeTorchTensor(values, "torch.float32", self.device, self.requires_grad)

    def numpy(self):
        if self.requires_grad:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.")
        if self.device != "cpu":
            raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() first.")
        if str(self.dtype) == "torch.bfloat16":
            raise TypeError("Got unsupported ScalarType BFloat16")
        array = self._values.copy()
        alive = sum(ref() is not None for ref in FakeTorchTensor.conversions)
        FakeTorchTensor.peak_alive = max(getattr(FakeTorchTensor, "peak_alive", 0), alive)
        FakeTorchTensor.conversions.append(weakref.ref(array))
        return array


def bf16_bits(path):
    """name → uint16 bf16 bit patterns, read straight from the file's bytes."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    return {name: np.frombuffer(raw[8 + size + e["data_offsets"][0]:8 + size + e["data_offsets"][1]],
                                dtype="<u2").reshape(e["shape"]) for name, e in header.items()}


def fake_torch_state_dict(path):
    return {name: FakeTorchTensor(bits, "torch.bfloat16") for name, bits in bf16_bits(path).items()}


def document(result):
    return json.dumps(result.to_summary_dict(include_layers=True), sort_keys=True)


def rows_of(result):
    return [layer.to_dict() for layer in result.layers]


def audited(tensors):
    return gl.audit_lora_state_dict(tensors, CONFIG, include_top_singular_values=8)


def test_bf16_file_path_open_safetensors_and_torch_tensors_give_identical_json():
    by_path = audited(BF16_FILE)
    by_handle = audited(gl.open_safetensors(BF16_FILE))
    by_tensors = audited(fake_torch_state_dict(BF16_FILE))
    assert by_path.layers and all(layer.dtype == "BF16" for layer in by_tensors.layers)
    assert document(by_path) == document(by_handle)
    assert by_path.weights_path == str(BF16_FILE) and by_tensors.weights_path is None
    # Only where the tensors came from differs.
    assert document(by_path) == document(by_tensors).replace('"weights_path": null', f'"weights_path": "{BF16_FILE}"')


def test_state_dict_route_equals_the_directory_audit_and_dense_svd():
    from_dir = gl.audit_lora_peft_dir(BF16_CASE, include_top_singular_values=8)
    from_tensors = audited(fake_torch_state_dict(BF16_FILE))
    assert rows_of(from_dir) == rows_of(from_tensors)
    tensors = oracle_load(BF16_FILE)
    for layer in from_tensors.layers:
        delta = dense_delta(tensors[layer.lora_a_key], tensors[layer.lora_b_key], layer.scale, layer.kind)
        sigma = np.linalg.svd(delta, compute_uv=False)
        assert layer.delta_sigma_max == pytest.approx(sigma[0], rel=1e-10)
        assert layer.delta_fro_norm == pytest.approx(np.linalg.norm(sigma), rel=1e-10)


def test_framework_tensors_are_converted_one_at_a_time():
    FakeTorchTensor.conversions, FakeTorchTensor.peak_alive = [], 0
    state_dict = fake_torch_state_dict(BF16_FILE)
    result = audited(state_dict)
    # Every factor was converted, and when each was, no earlier conversion was still held.
    assert len(FakeTorchTensor.conversions) >= 2 * len(result.layers)
    assert FakeTorchTensor.peak_alive == 0


class FakeTorchModuleTensor(FakeTorchTensor):
    """A tensor whose type lives in an imported framework module that has ``int16``
    (as torch's does): bf16 is handed over as its bits, through ``.view``."""

    def detach(self):
        return FakeTorchModuleTensor(self._values, str(self.dtype), self.device, False)

    def to(self, device):
        return FakeTorchModuleTensor(self._values, str(self.dtype), device, self.requires_grad)

    def float(self):
        raise AssertionError("bf16 must be read through its bits, not widened by the framework")

    def view(self, dtype):
        assert dtype is FAKE_TORCH.int16, "torch's view takes torch's own dtype"
        return FakeTorchTensor(self._values.view(np.int16), "torch.int16", self.device, self.requires_grad)


def fake_framework(name, dtype_name, tensor_class):
    """A framework module (as if imported by the caller) that defines ``tensor_class``
    and a dtype object ``dtype_name``, as torch defines torch.int16 and MLX mlx.core.float32."""
    module = types.ModuleType(name)
    setattr(module, dtype_name, object())
    tensor_class.__module__ = name
    return module


def audits_like_the_file(monkeypatch, framework, make_tensor):
    monkeypatch.setitem(sys.modules, framework.__name__, framework)
    tensors = {name: make_tensor(bits) for name, bits in bf16_bits(BF16_FILE).items()}
    return document(audited(tensors)) == document(audited(BF16_FILE)).replace(
        f'"weights_path": "{BF16_FILE}"', '"weights_path": null')


FAKE_TORCH = fake_framework("fake_torch", "int16", FakeTorchModuleTensor)


def test_torch_bf16_is_read_through_its_bits_when_the_framework_offers_a_view(monkeypatch):
    assert audits_like_the_file(monkeypatch, FAKE_TORCH, lambda bits: FakeTorchModuleTensor(bits, "torch.bfloat16"))


class FakeMlxArray:
    """MLX's way: ``astype(mlx.core.float32)``; NumPy cannot read a bf16 array."""

    def __init__(self, values, dtype):
        self._values, self.dtype, self.shape = values, _Dtype(f"fake_mlx.core.{dtype}"), values.shape

    def astype(self, dtype):
        assert dtype is FAKE_MLX.float32, "MLX's astype takes MLX's own dtype"
        return FakeMlxArray(oracle_decode_bf16(self._values).astype(np.float32), "float32")

    def __array__(self, dtype=None, copy=None):
        if str(self.dtype).endswith("bfloat16"):
            raise ValueError("Item size 2 for PEP 3118 buffer format string B does not match the dtype V item size 0.")
        return self._values


FAKE_MLX = fake_framework("fake_mlx.core", "float32", FakeMlxArray)


def test_mlx_style_arrays_are_widened_with_their_own_dtype(monkeypatch):
    assert audits_like_the_file(monkeypatch, FAKE_MLX, lambda bits: FakeMlxArray(bits, "bfloat16"))


class ArrayLike:
    """Only ``__array__``: NumPy asks for the values itself."""

    def __init__(self, values):
        self._values = values

    def __array__(self, dtype=None, copy=None):
        return self._values


def test_numpy_arrays_and_array_likes_report_safetensors_dtype_names():
    tensors = {name: values.astype(np.float32) for name, values in oracle_load(BF16_FILE).items()}
    plain = audited(tensors)
    wrapped = audited({name: ArrayLike(values) for name, values in tensors.items()})
    assert {layer.dtype for layer in plain.layers} == {"F32"}
    assert document(plain) == document(wrapped)
    # bf16 → float32 is exact, so the float32 copy audits to the bf16 file's numbers.
    by_file = gl.audit_lora_state_dict(BF16_FILE, CONFIG, include_top_singular_values=8)
    assert [(l.sigma_max, l.frob_sq, l.top_singular_values) for l in plain.layers] == \
        [(l.sigma_max, l.frob_sq, l.top_singular_values) for l in by_file.layers]


def test_unsupported_dtype_is_a_module_issue_and_a_failed_conversion_names_the_tensor():
    a, b = np.ones((2, 4), dtype=np.complex64), np.ones((4, 2), dtype=np.complex64)
    result = gl.audit_lora_state_dict({"m.lora_A.weight": a, "m.lora_B.weight": b}, {"r": 2, "lora_alpha": 2})
    assert result.n_modules_skipped == 1 and any("unsupported dtype complex64" in i for i in result.issues)

    class Meta(FakeTorchTensor):
        def detach(self):
            return self

        def to(self, device):
            return self

        def numpy(self):
            raise NotImplementedError("Cannot copy out of meta tensor; no data!")

    broken = {"m.lora_A.weight": Meta(np.ones((2, 4), np.float32), "torch.float32"),
              "m.lora_B.weight": Meta(np.ones((4, 2), np.float32), "torch.float32")}
    with pytest.raises(gl.AdapterFormatError, match=r"'m.lora_A.weight' \(Meta\) could not be converted"):
        gl.audit_lora_state_dict(broken, {"r": 2, "lora_alpha": 2})


def test_paths_that_are_not_weights_files_are_refused(tmp_path):
    with pytest.raises(gl.AdapterFormatError, match="is a directory; audit_lora_peft_dir"):
        gl.audit_lora_state_dict(BF16_CASE)
    pickle_path = tmp_path / "adapter_model.bin"
    pickle_path.write_bytes(b"\x80\x04")
    with pytest.raises(gl.AdapterFormatError, match="pickle"):
        gl.audit_lora_state_dict(pickle_path)
    with pytest.raises(gl.AdapterFormatError, match="not list"):
        gl.audit_lora_state_dict([1, 2, 3])


# ── upstream gradience 0.11.0's names ───────────────────────────────────────

QV_CASE = PEFT_FIXTURES / "llama_fp32_qv"
BASE = FIXTURES / "base" / "llama_fp32"


def test_upstream_keyword_names_are_aliases():
    ours = gl.audit_lora_peft_dir(QV_CASE, base_model=str(BASE), adapter_config=str(QV_CASE / "adapter_config.json"),
                                  weights=str(QV_CASE / "adapter_model.safetensors"))
    theirs = gl.audit_lora_peft_dir(QV_CASE, base_model_id=str(BASE),
                                    adapter_config_path=str(QV_CASE / "adapter_config.json"),
                                    adapter_weights_path=str(QV_CASE / "adapter_model.safetensors"))
    assert ours.layers[0].udr is not None
    assert document(ours) == document(theirs)
    plain = gl.audit_lora_peft_dir(QV_CASE)
    assert document(gl.attach_udr(plain, base_model_id=str(BASE))) == document(gl.attach_udr(plain, base_model=str(BASE)))
    with pytest.raises(TypeError, match="base_model= and its alias base_model_id="):
        gl.audit_lora_peft_dir(QV_CASE, base_model="a", base_model_id="b")


def test_config_may_be_upstreams_keyword_a_peft_config_object_or_upstreams_config_object():
    config = json.loads((QV_CASE / "adapter_config.json").read_text())
    path = QV_CASE / "adapter_model.safetensors"
    expected = document(gl.audit_lora_state_dict(path, config))
    assert document(gl.audit_lora_state_dict(path, adapter_config=config)) == expected
    peft_like = types.SimpleNamespace(to_dict=lambda: dict(config))  # peft.LoraConfig.to_dict()
    upstream_like = types.SimpleNamespace(raw=dict(config), r=config["r"])  # gradience's LoRAAdapterConfig
    assert document(gl.audit_lora_state_dict(path, peft_like)) == expected
    assert document(gl.audit_lora_state_dict(path, adapter_config=upstream_like)) == expected
    assert gl.audit_lora_state_dict(path, adapter_config=config).layers[0].scale == config["lora_alpha"] / config["r"]


def test_metrics_event_takes_include_layers_and_topk_layers():
    result = gl.audit_lora_peft_dir(QV_CASE)
    event = result.to_metrics_event(run_id="run", step=3, include_layers=True, topk_layers=2)
    assert event["metrics"] == json.loads(json.dumps(result.to_summary_dict(include_layers=True, topk_layers=2)))
    assert len(event["metrics"]["layers"]) == 2
    assert "layers" not in result.to_metrics_event(run_id="run")["metrics"]


def test_nearest_percentile_takes_the_element_at_rounded_position():
    result = gl.audit_lora_peft_dir(QV_CASE, base_model=str(BASE))
    udr = sorted(layer.udr for layer in result.layers)
    assert len(udr) == 4
    linear, nearest = result.to_summary_dict(), result.to_summary_dict(percentile="nearest")
    # n = 4: median position 1.5 → round → 2 (upstream's element); p90 position 2.7 → 3.
    assert nearest["udr_median"] == udr[2] and nearest["udr_p90"] == udr[3]
    assert linear["udr_median"] == pytest.approx((udr[1] + udr[2]) / 2)
    assert linear["udr_p90"] == pytest.approx(udr[2] + 0.7 * (udr[3] - udr[2]))
    sdi = sorted(layer.sdi for layer in result.layers)
    assert nearest["sdi_median"] == sdi[2] and nearest["by_type"]["attn"]["udr_median"] == udr[2]
    # Rank percentiles are linear upstream too: unchanged.
    assert nearest["energy_rank_90_p50"] == linear["energy_rank_90_p50"]
    # Python's round halves to even, as upstream's int(round(...)): n = 5, q = 0.5 → position 2.0;
    # n = 6 → 2.5 → 2 (not 3).
    assert gl._percentile([5, 1, 4, 2, 3, 6], 50, "nearest") == 3
    with pytest.raises(ValueError, match="percentile must be one of linear, nearest"):
        result.to_summary_dict(percentile="median")


def test_append_metrics_event_takes_the_training_loops_run_id_and_step(tmp_path):
    result = gl.audit_lora_peft_dir(QV_CASE)
    run_file = tmp_path / "run.jsonl"
    gl.append_metrics_event(result, str(run_file), run_id="train-1", step=10)
    gl.append_metrics_event(result, str(run_file), run_id="train-1", step=20)
    gl.append_metrics_event(result, str(run_file))  # --append style: the file's run_id and last step
    events = [json.loads(line) for line in run_file.read_text().splitlines()]
    assert [(e["run_id"], e["step"]) for e in events] == [("train-1", 10), ("train-1", 20), ("train-1", 20)]
    assert all(e["schema"] == "gradience.vnext.telemetry/v1" and e["kind"] == "lora_audit" for e in events)


@pytest.mark.parametrize("weights", sorted((FIXTURES / "formats").glob("*/*.safetensors")), ids=lambda p: p.parent.name)
def test_a_weights_path_audits_like_the_directory_route_in_every_format(weights):
    # The header metadata (kohya ss_*, diffusers lora_adapter_metadata) reaches the state-dict route too.
    config_file = weights.parent / "adapter_config.json"  # the directory route finds it; here it is passed
    config = json.loads(config_file.read_text()) if config_file.exists() else None
    by_path = gl.audit_lora_state_dict(weights, config, include_top_singular_values=4)
    by_dir = gl.audit_lora_peft_dir(weights, include_top_singular_values=4)
    assert by_path.layers and rows_of(by_path) == rows_of(by_dir)
    assert (by_path.adapter_format, by_path.format_metadata) == (by_dir.adapter_format, by_dir.format_metadata)
