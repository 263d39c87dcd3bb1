"""Shared pytest set-up for every test file.

* Without a CUDA device, TRITON_INTERPRET=1 is set here, before anything imports triton, so the
  Triton kernels run on CPU tensors through the interpreter.
* ``seed`` (autouse): seeds torch per test from the test's id, so every test draws its own
  reproducible random inputs; set KDENGINE_TEST_SEED=<int> to draw different ones.
* ``backend``: parametrises a test over "torch", "triton" and "cuda"; a backend that cannot run
  here is skipped with the reason from ``kdengine.ops._backends.availability``. For a subset,
  ``@pytest.mark.parametrize("backend", backend_params("torch", "triton"), indirect=True)``.
* ``device``: "cuda" when a CUDA device exists, else "cpu" (where the interpreter runs Triton).
  ``device_for(backend)`` gives the device a given backend runs on.

Helpers are importable: ``from tests.conftest import backend_params, require_backend, device_for``.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from kdengine.ops import _backends

_BACKEND_MARKS = {
    "torch": (),
    "triton": (pytest.mark.triton,),
    "cuda": (pytest.mark.cuda_ext, pytest.mark.gpu),
}


def require_backend(name: str) -> str:
    """Return ``name`` if that backend can run in this process, else skip with its reason."""
    ok, why = _backends.availability(name)
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {why}")
    return name


def backend_params(*names: str) -> list:
    """``pytest.param`` per backend (all of them by default), with the triton / cuda_ext marks."""
    return [pytest.param(name, marks=_BACKEND_MARKS[name], id=name) for name in (names or _backends.BACKENDS)]


def device_for(backend: str) -> torch.device:
    """The device a backend runs on here: CUDA for cuda, and for triton unless interpreted."""
    if backend == "cuda" or (backend == "triton" and not _backends.triton_interpreter()):
        return torch.device("cuda")
    return torch.device("cuda" if backend == "torch" and torch.cuda.is_available() else "cpu")


@pytest.fixture(params=backend_params())
def backend(request) -> str:
    return require_backend(request.param)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def seed(request) -> int:
    value = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("KDENGINE_TEST_SEED", "0"))
    torch.manual_seed(value)
    return value
