"""Backend availability and selection: the one place that decides which implementation runs.

Backends, fastest first: ``"cuda"`` (the compiled extension kdengine._C), ``"triton"`` and
``"torch"`` (plain PyTorch: the CPU path and the test oracle).

* ``backend="auto"`` (default) takes the first backend whose availability probe and input
  checks pass, and falls back quietly.
* An explicitly requested backend that cannot run raises :class:`BackendUnavailable` with
  every reason.
* The environment variable ``KDENGINE_BACKEND`` overrides the ``backend`` argument of every op.
* ``TRITON_INTERPRET=1`` lets the Triton backend run on CPU tensors (the interpreter), but only
  when it is requested explicitly: "auto" never picks the slow interpreter.

Availability is probed once per process and cached with its reason; input checks look only at
tensor metadata (device, dtype, strides), never at values, so they cause no host sync.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("cuda", "triton", "torch")
_CHOICES = ("auto",) + BACKENDS


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def availability(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run at all in this process, and why (cached)."""
    if name == "torch":
        return True, f"PyTorch {torch.__version__}: always available"
    if name == "triton":
        try:
            import triton  # noqa: PLC0415
        except ImportError as exc:
            return False, f"triton is not importable ({exc}); pip install triton"
        if triton_interpreter():
            return True, f"triton {triton.__version__} (TRITON_INTERPRET=1: interpreter on CPU tensors)"
        if not torch.cuda.is_available():
            return False, (f"triton {triton.__version__} is installed but there is no CUDA device "
                           "(set TRITON_INTERPRET=1 to run the interpreter on CPU tensors)")
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if name == "cuda":
        from kdengine import _ext  # noqa: PLC0415

        module, reason = _ext.load()
        if module is None:
            return False, reason
        if not torch.cuda.is_available():
            return False, "kdengine._C is built but there is no CUDA device"
        return True, f"{reason} on {torch.cuda.get_device_name()}"
    raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")


def tensor_device_reasons(name: str, tensors: Sequence[torch.Tensor | None]) -> list[str]:
    """Generic device checks for a backend; ops add their own dtype/shape checks."""
    reasons = []
    devices = {t.device.type for t in tensors if t is not None}
    if name == "cuda" and devices != {"cuda"}:
        reasons.append(f"needs CUDA tensors, got device(s) {sorted(devices)}")
    if name == "triton":
        if triton_interpreter():
            if devices - {"cpu"}:
                reasons.append(f"TRITON_INTERPRET=1 runs on CPU tensors, got {sorted(devices)}")
        elif devices != {"cuda"}:
            reasons.append(f"needs CUDA tensors, got device(s) {sorted(devices)}")
    return reasons


def requested_backend(backend: str | None) -> str:
    env = os.environ.get("KDENGINE_BACKEND")
    choice = (env or backend or "auto").strip().lower()
    if choice not in _CHOICES:
        source = "KDENGINE_BACKEND" if env else "backend"
        raise ValueError(f"{source}={choice!r} is not a backend; expected one of {_CHOICES}")
    return choice


def select(op: str, backend: str | None, reasons_for: Callable[[str], list[str]]) -> str:
    """Pick the backend that runs ``op``.

    ``reasons_for(name)`` returns the op's input-specific reasons why backend ``name`` cannot
    run (empty when it can). The availability probe is checked first.
    """
    choice = requested_backend(backend)
    order = BACKENDS if choice == "auto" else (choice,)
    collected = {}
    for name in order:
        ok, why = availability(name)
        problems = [] if ok else [why]
        if ok:
            problems += reasons_for(name)
            if choice == "auto" and name == "triton" and triton_interpreter():
                problems.append("auto never picks the Triton interpreter (request backend='triton')")
        if not problems:
            return name
        collected[name] = problems
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in collected.items())
    if choice == "auto":
        raise BackendUnavailable(f"{op}: no backend accepts these inputs ({detail})")
    raise BackendUnavailable(f"{op}: backend {choice!r} cannot run: {detail}")
