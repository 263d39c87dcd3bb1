"""The one tolerance table of the test suite, and the comparison every kernel test uses.

Kernels are checked against a float64 reference. ``TOL`` is keyed by the dtype the compared
tensor was *produced in*: a loss accumulated in fp32 uses ``TOL[torch.float32]`` even when its
inputs were bf16; a gradient stored in bf16 uses ``TOL[torch.bfloat16]``.

An element passes when

    |actual − expected| <= atol · scale + rtol · |expected| + quantum

* ``scale`` = the largest finite |expected| of the tensor (or the dtype's smallest normal when
  that is larger). ``atol`` is therefore relative to the tensor's magnitude, so one table
  serves a loss of O(10) and gradients of O(1 / (N · V)). A test whose exact result is ~0
  everywhere (a cancellation such as one-hot p ⊙ (log p − log q − D)) passes the magnitude of
  the terms that cancel as ``scale=``: fp32 leaves ~eps of them.
* fp32: atol 1e-4 of the magnitude. Softmax-divergence gradients such as q ⊙ (log q − log p − D)
  cancel terms of size |log q| ~ 10–20 down to O(1): measured, the fp32 torch backend is off by
  up to ~4e-5 of the largest gradient at V = 70001 (the Triton kernel by ~1e-6).
* ``rtol`` covers the rounding of each element to its dtype plus fp32 accumulation: fp32 1e-4;
  bf16 2⁻⁶ and fp16 2⁻⁹, i.e. 4 unit roundoffs of their 8- and 11-bit significands (the kernel's
  output, grad_output, their product: 3 roundings, plus slack).
* ``quantum`` = the dtype's subnormal spacing: a value below the dtype's resolution may round
  to 0 (fp16 gradients of a large mean-reduced loss).

NaN must be NaN at the same positions, ±inf the same signed inf.
"""

from __future__ import annotations

import torch

TOL = {
    torch.float64: {"atol": 1e-12, "rtol": 1e-9},
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 1e-3, "rtol": 2.0**-6},
    torch.float16: {"atol": 1e-3, "rtol": 2.0**-9},
}

_SHOW = 8  # mismatching elements listed in a failure message


def _quantum(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def _scale(expected: torch.Tensor, dtype: torch.dtype) -> float:
    finite = expected[torch.isfinite(expected)]
    biggest = finite.abs().max().item() if finite.numel() else 0.0
    return max(biggest, torch.finfo(dtype).smallest_normal)


def _where(mask: torch.Tensor, shape) -> str:
    idx = mask.nonzero()[:_SHOW].tolist()
    return ", ".join(str(tuple(i)) for i in idx) if len(shape) else "(scalar)"


def _check_specials(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> torch.Tensor:
    """NaN / ±inf must sit at the same positions; returns the mask of elements finite in both."""
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{msg}: NaN positions differ: actual NaN at "
                             f"{_where(nan_a & ~nan_e, actual.shape)}; expected NaN at "
                             f"{_where(nan_e & ~nan_a, expected.shape)}")
    inf_a, inf_e = torch.isinf(actual), torch.isinf(expected)
    bad_inf = (inf_a | inf_e) & (actual != expected)
    if bad_inf.any():
        raise AssertionError(f"{msg}: ±inf positions/signs differ at {_where(bad_inf, actual.shape)}")
    return ~(nan_a | inf_a)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "", *,
                 scale: float | None = None) -> None:
    """Compare ``actual`` with ``expected`` in float64 under ``TOL[dtype]`` (see the module doc);
    ``scale`` overrides the magnitude that ``atol`` is relative to.

    Shapes must match exactly. The failure message lists the first mismatching indices with
    actual, expected, |diff| and the allowed difference, and the worst normalised error.
    """
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise TypeError("assert_close compares tensors")
    label = msg or "tensors"
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = TOL[dtype]
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    finite = _check_specials(a, e, label)
    magnitude = _scale(e, dtype) if scale is None else scale
    allowed = tol["atol"] * magnitude + tol["rtol"] * e.abs() + _quantum(dtype)
    diff = (a - e).abs()
    bad = finite & (diff > allowed)
    if bad.any():
        worst = (diff[finite] / allowed[finite]).max().item()
        head = (f"{label}: {int(bad.sum())} of {a.numel()} elements outside TOL[{dtype}] = {tol} "
                f"(worst |diff| / allowed = {worst:.3g}); first mismatches:")
        lines = [head]
        for idx in bad.nonzero()[:_SHOW].tolist():
            i = tuple(idx)
            lines.append(f"  at {i if i else '(scalar)'}: actual {a[i].item():.9g}  "
                         f"expected {e[i].item():.9g}  |diff| {diff[i].item():.3g}  "
                         f"allowed {allowed[i].item():.3g}")
        raise AssertionError("\n".join(lines))


def assert_within_reference_error(actual: torch.Tensor, truth64: torch.Tensor, lowp_reference: torch.Tensor,
                                  factor: float = 2.0, msg: str = "") -> None:
    """Flash-attention-style bound for low-precision outputs.

    ``max |actual − truth64| <= factor · max |lowp_reference − truth64| + floor``, where
    ``lowp_reference`` is the plain PyTorch computation in the low precision (what a user gets
    without the kernel) and ``floor = TOL[float32]['atol'] · max |truth64|`` keeps the bound
    meaningful when the low-precision reference happens to be exact.
    """
    label = msg or "tensors"
    if not actual.shape == truth64.shape == lowp_reference.shape:
        raise AssertionError(f"{label}: shapes differ: {tuple(actual.shape)}, {tuple(truth64.shape)}, "
                             f"{tuple(lowp_reference.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    t = truth64.detach().to("cpu", torch.float64)
    r = lowp_reference.detach().to("cpu", torch.float64)
    _check_specials(a, t, label)
    finite = torch.isfinite(t)
    err = (a - t)[finite].abs().max().item() if finite.any() else 0.0
    ref_err = (r - t)[finite].abs().max().item() if finite.any() else 0.0
    floor = TOL[torch.float32]["atol"] * _scale(t, torch.float32)
    if err > factor * ref_err + floor:
        raise AssertionError(f"{label}: max error {err:.3g} exceeds {factor} × the low-precision reference's "
                             f"{ref_err:.3g} + floor {floor:.3g}")
