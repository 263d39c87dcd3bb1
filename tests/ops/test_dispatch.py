"""Backend availability probes and selection (kdengine.ops._backends), with the probes'
environment monkeypatched and the availability cache cleared around every test."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from kdengine import _ext
from kdengine.ops import _backends
from kdengine.ops._backends import BackendUnavailable, availability, select


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    monkeypatch.delenv("KDENGINE_BACKEND", raising=False)
    availability.cache_clear()
    yield
    availability.cache_clear()


def fake_availability(monkeypatch, table: dict[str, str | None]) -> None:
    """Replace the probes: ``table[name]`` is None when available, else the reason it is not."""
    monkeypatch.setattr(_backends, "availability",
                        lambda name: (table[name] is None, table[name] or f"{name} fake: available"))


def no_input_problems(name: str) -> list[str]:
    return []


# ---------------------------------------------------------------------------------------------
# The real probes
# ---------------------------------------------------------------------------------------------
def test_torch_is_always_available():
    ok, why = availability("torch")
    assert ok and torch.__version__ in why


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        availability("tpu")


def test_triton_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    ok, why = availability("triton")
    assert not ok and "triton is not importable" in why and "pip install triton" in why


def test_triton_without_gpu_or_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = availability("triton")
    assert not ok and "no CUDA device" in why and "TRITON_INTERPRET=1" in why


def test_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = availability("triton")
    assert ok and "interpreter" in why


def test_cuda_extension_not_built(monkeypatch):
    monkeypatch.setattr(_ext, "load", lambda: (None, "kdengine._C is not built (fake)"))
    assert availability("cuda") == (False, "kdengine._C is not built (fake)")


def test_cuda_extension_built_without_gpu(monkeypatch):
    monkeypatch.setattr(_ext, "load", lambda: (object(), "kdengine._C loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = availability("cuda")
    assert not ok and "no CUDA device" in why


def test_probe_is_cached(monkeypatch):
    calls = []
    monkeypatch.setattr(_ext, "load", lambda: calls.append(1) or (None, "not built"))
    availability("cuda")
    availability("cuda")
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------
def test_auto_picks_first_available(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fake_availability(monkeypatch, {"cuda": None, "triton": None, "torch": None})
    assert select("op", "auto", no_input_problems) == "cuda"
    assert select("op", None, no_input_problems) == "cuda"


def test_auto_falls_back_quietly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fake_availability(monkeypatch, {"cuda": "no extension", "triton": None, "torch": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select("op", "auto", no_input_problems) == "triton"
        # an input problem of triton (e.g. a dtype) moves auto on to torch, still quietly
        assert select("op", "auto", lambda b: ["float64 unsupported"] if b == "triton" else []) == "torch"


def test_auto_with_no_backend_lists_every_reason(monkeypatch):
    fake_availability(monkeypatch, {"cuda": "no extension", "triton": "no triton", "torch": None})
    expected = r"op: no backend accepts.*cuda: no extension.*triton: no triton.*torch: weird input"
    with pytest.raises(BackendUnavailable, match=expected):
        select("op", "auto", lambda b: ["weird input"] if b == "torch" else [])


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    fake_availability(monkeypatch, {"cuda": "kdengine._C is not built", "triton": None, "torch": None})
    expected = r"backend 'cuda' cannot run: cuda: kdengine\._C is not built"
    with pytest.raises(BackendUnavailable, match=expected):
        select("op", "cuda", no_input_problems)


def test_explicit_backend_with_input_problem_raises(monkeypatch):
    fake_availability(monkeypatch, {"cuda": None, "triton": None, "torch": None})
    with pytest.raises(BackendUnavailable, match=r"backend 'triton' cannot run: triton: needs CUDA tensors"):
        select("op", "triton", lambda b: ["needs CUDA tensors"])


def test_env_overrides_argument(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fake_availability(monkeypatch, {"cuda": None, "triton": None, "torch": None})
    monkeypatch.setenv("KDENGINE_BACKEND", " Torch ")
    assert select("op", "cuda", no_input_problems) == "torch"
    monkeypatch.setenv("KDENGINE_BACKEND", "triton")
    assert select("op", "auto", no_input_problems) == "triton"


def test_invalid_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"backend='gpu' is not a backend; expected one of"):
        select("op", "gpu", no_input_problems)
    monkeypatch.setenv("KDENGINE_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"KDENGINE_BACKEND='fast' is not a backend"):
        select("op", "torch", no_input_problems)


def test_auto_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake_availability(monkeypatch, {"cuda": "no extension", "triton": None, "torch": None})
    assert select("op", "auto", no_input_problems) == "torch"
    assert select("op", "triton", no_input_problems) == "triton"
    fake_availability(monkeypatch, {"cuda": "no extension", "triton": None, "torch": "disabled"})
    with pytest.raises(BackendUnavailable, match="auto never picks the Triton interpreter"):
        select("op", "auto", no_input_problems)


def test_tensor_device_reasons(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    needs_cuda = ["needs CUDA tensors, got device(s) ['cpu']"]
    assert _backends.tensor_device_reasons("cuda", [cpu, None]) == needs_cuda
    assert _backends.tensor_device_reasons("triton", [cpu]) == needs_cuda
    assert _backends.tensor_device_reasons("torch", [cpu]) == []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backends.tensor_device_reasons("triton", [cpu]) == []


# ---------------------------------------------------------------------------------------------
# Through an op: which autograd Function ran tells which backend was chosen
# ---------------------------------------------------------------------------------------------
def _kd_loss_function(**kwargs) -> str:
    from kdengine.ops.kd_loss import kd_loss

    student = torch.randn(2, 16, requires_grad=True)
    return type(kd_loss(student, torch.randn(2, 16), **kwargs).grad_fn).__name__


def test_kd_loss_dispatch_on_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU dispatch (auto → torch, the interpreter only on request)")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _kd_loss_function() == "KDLossTorchFunctionBackward"
    assert _kd_loss_function(backend="triton") == "KDLossFunctionBackward"
    monkeypatch.setenv("KDENGINE_BACKEND", "torch")
    assert _kd_loss_function(backend="triton") == "KDLossTorchFunctionBackward"
    monkeypatch.setenv("KDENGINE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run"):
        _kd_loss_function()
