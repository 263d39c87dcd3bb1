"""The real CUDA kernels of csrc/ run on CPU through the CUDA-runtime emulator (tests/cuda_emulator/).

csrc/bindings.cpp and csrc/*.cu are built once per session as a CPU torch extension (in pytest's
cache directory, so an unchanged csrc/ rebuilds nothing) and driven through
kdengine/ops/_cuda.py, i.e. with the CUDA backend's own argument packing: the ``emulated``
fixture points ``_cuda._module`` at the emulated extension and replaces the CUDA device guard and
stream lookup (which need a GPU) by no-ops. Every result is compared with the float64 references
of kdengine.reference on fresh random inputs, under tests/tolerances.py. The emulator computes
__expf exactly, so these tests check the kernels' math and indexing, not the GPU's fast-math bits;
they say nothing about speed. Sizes are tiny: every emulated thread is an OS thread.

Skipped, with the reason, when no C++ compiler, ninja, torch C++ headers or Python.h is found. A
build error is a failure: csrc/ changed in a way the compiler or the emulator's rewrites reject.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import subprocess
from pathlib import Path

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from kdengine.ops import _cuda
from kdengine.ops.expert_batch_embed import ExpertBatchEmbedFunction
from kdengine.ops.fuse_experts import FusedExpertsKDLossFunction
from kdengine.ops.kd_loss import KDLossFunction, grad_scale_for, make_spec
from kdengine.reference import (
    expert_batch_embed_reference,
    fuse_experts_reference,
    fused_experts_kd_loss_reference,
    kd_loss_reference,
)
from kdengine.reference.kd_loss import DIVERGENCES
from tests.cuda_emulator.build import (
    EmulatorBuildError,
    build_emulated_extension,
    build_selftest,
    toolchain_skip_reason,
    translate_kernels,
)
from tests.tolerances import assert_close

# The module (kdengine.ops exports the function under the same name).
_linear = importlib.import_module("kdengine.ops.linear_kd_loss")
_SKIP = toolchain_skip_reason()
pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=f"cannot build csrc/ on the CUDA emulator: {_SKIP}"),
    pytest.mark.usefixtures("emulated"),
]

# Loss options shared by every case (the divergence, T and hard_weight vary per test).
LOSS = {"t2_scale": True, "jsd_beta": 0.3, "ignore_index": -100, "kd_weight": 1.3}
GRAD_SCALE = 0.37
IGNORE = -100
CSRC_STUB = Path("csrc/stub.cu")


@pytest.fixture(scope="module")
def emulated(request, tmp_path_factory):
    """The emulated extension, wired into kdengine.ops._cuda for the tests of this module."""
    cache = getattr(request.config, "cache", None)
    build_dir = (cache.mkdir("kdengine_C_emulated") if cache is not None
                 else tmp_path_factory.mktemp("kdengine_C_emulated"))
    module = build_emulated_extension(build_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_cuda, "_module", lambda: module)
        patch.setattr(_cuda, "_stream", lambda device: 0)
        patch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        yield module


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def _masked_columns(v: int) -> list[int]:
    """A padded vocabulary: −inf at the first, a middle and the last column."""
    return [0, v // 2, v - 1]


def _logits(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Random logits (spread ×3 so the softmaxes are far from flat) with the masked columns −inf."""
    x = torch.randn(*shape) * 3
    x[..., _masked_columns(shape[-1])] = -math.inf
    return x.to(dtype)


def _labels(n: int, v: int) -> torch.Tensor:
    """Labels on unmasked columns; row 1 (when there is one) is ignored."""
    allowed = torch.tensor([c for c in range(v) if c not in _masked_columns(v)])
    labels = allowed[torch.randint(len(allowed), (n,))]
    if n > 1:
        labels[1] = IGNORE
    return labels


def _row_weights(n: int) -> torch.Tensor:
    return torch.rand(n) + 0.5


def _as64(t: torch.Tensor | None, grad: bool = False) -> torch.Tensor | None:
    return None if t is None else t.detach().double().requires_grad_(grad)


def _check_grad(actual, expected, dtype, shape, name):
    if expected is None:
        assert actual is None, f"{name} was not asked for but was returned"
        return
    assert actual.dtype == dtype and actual.shape == shape, f"{name}: {actual.dtype} {tuple(actual.shape)}"
    assert_close(actual, expected, dtype, name)


# ------------------------------------------------------------------------------------------------
# kd_loss rows (csrc/kd_loss.cu)
# ------------------------------------------------------------------------------------------------
def _kd_rows(student, teacher, labels, row_weights, spec, need, scale=GRAD_SCALE, grad_dtypes=(None, None)):
    """The emulated forward launch, then the backward launch with dL/d(row_loss) = scale."""
    row_loss, stats = _cuda.kd_loss_forward_cuda(student, teacher, labels, row_weights, spec)
    assert stats.dtype == torch.float32 and stats.shape[0] == student.shape[0]
    grads = _cuda.kd_loss_backward_cuda(student, teacher, labels, row_weights, stats, torch.as_tensor(scale),
                                        spec, *need, grad_dtypes=grad_dtypes)
    return (row_loss, *grads)


def check_kd_rows(student, teacher, labels, row_weights, *, divergence, temperature=2.0, hard_weight=0.0,
                  need=(True, True), grad_dtypes=(None, None)):
    """Emulated kd_loss rows vs the float64 reference: row losses and d(Σ rows · grad_scale), each
    gradient in its ``grad_dtypes`` entry (None: its logits' dtype)."""
    spec = make_spec(divergence=divergence, temperature=temperature, hard_weight=hard_weight, **LOSS)
    row_loss, grad_s, grad_t = _kd_rows(student, teacher, labels, row_weights, spec, need, grad_dtypes=grad_dtypes)
    s64, t64 = _as64(student, need[0]), _as64(teacher, need[1])
    ref = kd_loss_reference(s64, t64, divergence=divergence, temperature=temperature, hard_weight=hard_weight,
                            labels=labels, row_weights=_as64(row_weights), reduction="none", **LOSS)
    if need[0] or need[1]:
        (ref.sum() * GRAD_SCALE).backward()
    assert row_loss.dtype == torch.float32
    assert_close(row_loss, ref, torch.float32, "row_loss")
    _check_grad(grad_s, s64.grad if need[0] else None, grad_dtypes[0] or student.dtype, student.shape,
                "grad_student")
    _check_grad(grad_t, t64.grad if need[1] else None, grad_dtypes[1] or teacher.dtype, teacher.shape,
                "grad_teacher")


@pytest.mark.parametrize("hard_weight", [0.0, 0.7], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_rows(divergence, dtype, hard_weight):
    """Prime V, −inf columns, an ignored row, row weights, grad_scale != 1, both gradients."""
    n, v = 4, 1009
    check_kd_rows(_logits(n, v, dtype=dtype), _logits(n, v, dtype=dtype), _labels(n, v), _row_weights(n),
                  divergence=divergence, hard_weight=hard_weight)


@pytest.mark.parametrize("divergence, need", [
    ("forward_kl", (False, True)), ("soft_ce", (False, True)), ("reverse_kl", (True, False)),
    ("jsd", (True, False)), ("tvd", (False, True)), ("mse", (False, False)),
])
def test_kd_loss_rows_one_gradient(divergence, need):
    """Only the gradients asked for are written (the late-gradient pass runs for the others)."""
    n, v = 3, 211
    check_kd_rows(_logits(n, v, dtype=torch.float32), _logits(n, v, dtype=torch.float32), _labels(n, v),
                  _row_weights(n), divergence=divergence, hard_weight=0.4, need=need)


def test_kd_loss_rows_strided_fp16():
    """fp16; a student with row stride != V and a teacher whose columns are strided (copied by
    _cuda._unit_columns); no labels, no row weights."""
    n, v = 3, 131
    student = (torch.randn(n, v + 7) * 3).to(torch.float16)[:, 3:v + 3]
    teacher = (torch.randn(v, n) * 3).to(torch.float16).t()
    for logits in (student, teacher):
        logits[:, _masked_columns(v)] = -math.inf
    assert student.stride() == (v + 7, 1) and teacher.stride(1) != 1
    check_kd_rows(student, teacher, None, None, divergence="jsd")


def test_kd_loss_rows_temperature_one():
    """T = 1: the hard label reuses the student's log-sum-exp."""
    n, v = 3, 97
    check_kd_rows(_logits(n, v, dtype=torch.float32), _logits(n, v, dtype=torch.float32), _labels(n, v),
                  _row_weights(n), divergence="forward_kl", temperature=1.0, hard_weight=0.5)


@pytest.mark.parametrize("divergence, dtype", [("forward_kl", torch.bfloat16), ("reverse_kl", torch.float32)],
                         ids=["forward_kl-bf16", "reverse_kl-fp32"])
def test_kd_loss_rows_large_vocab(divergence, dtype):
    """One row with V = 70001 > 65536 (512 threads, many chunks per thread)."""
    v = 70001
    check_kd_rows(_logits(1, v, dtype=dtype), _logits(1, v, dtype=dtype), _labels(1, v), _row_weights(1),
                  divergence=divergence, hard_weight=0.2)


# (student, teacher, (grad_student, grad_teacher) dtypes): linear_kd_loss's fp32 chunk logits against
# half teacher logits with half gradients, half students against an fp32 teacher, and fp32 gradients
# of bf16 logits (32-byte chunk stores).
MIXED = [
    (torch.float32, torch.bfloat16, (torch.bfloat16, None)),
    (torch.float32, torch.float16, (torch.float16, torch.float32)),
    (torch.bfloat16, torch.float32, (None, torch.bfloat16)),
    (torch.float16, torch.float32, (torch.float32, None)),
    (torch.bfloat16, torch.bfloat16, (torch.float32, torch.float32)),
]


def _mixed_id(case) -> str:
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: "own"}
    student, teacher, (gs, gt) = case
    return f"{name[student]}-{name[teacher]}-grads_{name[gs]}_{name[gt]}"


@pytest.mark.parametrize("case", MIXED, ids=_mixed_id)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_rows_mixed_dtypes(divergence, case):
    """Each side read in its own dtype, each gradient written in the dtype asked for: prime V, −inf
    columns, an ignored row, a hard label, row weights, grad_scale != 1."""
    student_dtype, teacher_dtype, grad_dtypes = case
    n, v = 4, 509
    check_kd_rows(_logits(n, v, dtype=student_dtype), _logits(n, v, dtype=teacher_dtype), _labels(n, v),
                  _row_weights(n), divergence=divergence, hard_weight=0.6, grad_dtypes=grad_dtypes)


CUDA_KERNELS = (_cuda.kd_loss_forward_cuda, _cuda.kd_loss_backward_cuda)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_kd_loss_function_backward_scales_grad_output(reduction):
    """KDLossFunction on the emulated kernels: reduced loss and gradients for grad_output != 1
    (per row with reduction="none"); the backward recomputes, so it can run twice."""
    n, v = 4, 257
    student = _logits(n, v, dtype=torch.float32).requires_grad_()
    teacher = _logits(n, v, dtype=torch.float32).requires_grad_()
    labels, row_weights = _labels(n, v), _row_weights(n)
    spec = make_spec(divergence="jsd", temperature=2.0, hard_weight=0.3, **LOSS)
    grad_scale = grad_scale_for(reduction, None, labels, spec, n, v, student.device)
    loss = KDLossFunction.apply(student, teacher, labels, row_weights, grad_scale, spec, reduction, CUDA_KERNELS)
    grad_output = torch.rand(n) + 0.5 if reduction == "none" else torch.tensor(1.7)
    loss.backward(grad_output, retain_graph=True)
    s64, t64 = _as64(student, True), _as64(teacher, True)
    ref = kd_loss_reference(s64, t64, divergence="jsd", temperature=2.0, hard_weight=0.3, labels=labels,
                            row_weights=_as64(row_weights), reduction=reduction, **LOSS)
    ref.backward(grad_output.double())
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(student.grad, s64.grad, torch.float32, "student.grad")
    assert_close(teacher.grad, t64.grad, torch.float32, "teacher.grad")
    first = student.grad.clone()
    student.grad = None
    loss.backward(grad_output)
    assert torch.equal(student.grad, first)


def _peaked(n: int, v: int, peak: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student rows with one logit at 20 (σ=1 noise elsewhere) and the peak column of each row."""
    x = torch.randn(n, v)
    cols = torch.randint(v, (n,))
    x[torch.arange(n), cols] = peak
    return x, cols


@pytest.mark.parametrize("teacher_peak", [17.0, 23.0])
def test_kd_loss_tvd_peaked_rows_exact(teacher_peak):
    """TVD in peaked rows (Σ q g ≈ −½ + 1e-6): loss and both gradients match float64 row by row."""
    n, v = 3, 613
    student, cols = _peaked(n, v, 20.0)
    teacher = student.clone()
    teacher[torch.arange(n), cols] = teacher_peak
    teacher[:, :300] += 0.3 * torch.randn(n, 300)
    spec = make_spec(divergence="tvd", temperature=1.0, hard_weight=0.0, **LOSS)
    row_loss, grad_s, grad_t = _kd_rows(student, teacher, None, None, spec, (True, True), scale=1.0)
    s64, t64 = _as64(student, True), _as64(teacher, True)
    ref = kd_loss_reference(s64, t64, divergence="tvd", temperature=1.0, reduction="none", **LOSS)
    ref.sum().backward()
    assert_close(row_loss, ref, torch.float32, "row_loss")
    for row in range(n):
        assert_close(grad_s[row], s64.grad[row], torch.float32, f"grad_student row {row}")
        assert_close(grad_t[row], t64.grad[row], torch.float32, f"grad_teacher row {row}")


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd"])
def test_kd_loss_out_of_range_label_gives_nan_row(divergence):
    """A hard label outside [0, V) (not ignore_index): NaN row loss and NaN student gradient row."""
    n, v = 3, 64
    labels = torch.tensor([3, v, IGNORE])
    spec = make_spec(divergence=divergence, temperature=2.0, hard_weight=0.5, **LOSS)
    row_loss, grad_s, _ = _kd_rows(_logits(n, v, dtype=torch.float32), _logits(n, v, dtype=torch.float32),
                                   labels, None, spec, (True, False))
    assert torch.isfinite(row_loss[0]) and torch.isnan(row_loss[1]) and row_loss[2] == 0
    assert torch.isfinite(grad_s[0]).all() and torch.isnan(grad_s[1]).all() and torch.equal(grad_s[2], torch.zeros(v))


def _nonfinite_rows(*rows: torch.Tensor) -> None:
    """Row 1: a NaN, row 2: a +inf (in the first of ``rows``); the last row, ignored, a NaN."""
    rows[0][1, 5] = math.nan
    rows[0][2, -4] = math.inf
    rows[0][-1, 9] = math.nan


def _check_nonfinite(row_loss, grads, reference, grads64, grad_dtype=torch.float32):
    """Rows 1-2 NaN (loss and every gradient), row 3 (ignored) exactly 0, row 0 as float64."""
    assert torch.isnan(row_loss[1:3]).all() and row_loss[3] == 0, row_loss
    assert_close(row_loss[:1], reference[:1], torch.float32, "clean row_loss")
    for name, grad, grad64 in zip(("student", "teacher"), grads, grads64, strict=True):
        assert torch.isnan(grad[1:3]).all(), f"grad_{name} of a broken row is not all NaN"
        assert not grad[3].any(), f"grad_{name} of the ignored row"
        assert grad.dtype == grad_dtype, f"grad_{name} is {grad.dtype}"
        assert_close(grad[:1], grad64[:1], grad_dtype, f"grad_{name} clean row")


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_teacher-bf16_grads"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_nonfinite_logit_gives_nan_row(divergence, side, teacher_dtype):
    """Only −inf is masked: a NaN or +inf logit makes the row's loss and both gradients NaN (also for
    an fp32 student against bf16 teacher logits with bf16 gradients, linear_kd_loss's case)."""
    n, v = 4, 97
    student, teacher = _logits(n, v, dtype=torch.float32), _logits(n, v, dtype=teacher_dtype)
    _nonfinite_rows(student if side == "student" else teacher)
    labels = torch.tensor([3, 4, 6, IGNORE])
    spec = make_spec(divergence=divergence, temperature=2.0, hard_weight=0.4, **LOSS)
    row_loss, grad_s, grad_t = _kd_rows(student, teacher, labels, None, spec, (True, True),
                                        grad_dtypes=(teacher_dtype, teacher_dtype))
    s64, t64 = _as64(student, True), _as64(teacher, True)
    ref = kd_loss_reference(s64, t64, divergence=divergence, temperature=2.0, hard_weight=0.4, labels=labels,
                            reduction="none", **LOSS)
    (ref.sum() * GRAD_SCALE).backward()
    _check_nonfinite(row_loss, (grad_s, grad_t), ref, (s64.grad, t64.grad), teacher_dtype)


@pytest.mark.parametrize("weighting", ["uniform", "entropy"])
@pytest.mark.parametrize("space", ["logit", "prob"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_experts_nonfinite_logit_gives_nan_row(divergence, space, weighting):
    """A NaN / +inf logit in one expert (uniform: α > 0; the given weights below give it α = 0, still NaN)."""
    k, n, v = 3, 4, 53
    student, experts = _logits(n, v, dtype=torch.float32), _logits(k, n, v, dtype=torch.float32)
    _nonfinite_rows(experts[1])
    weights = _weights("K", k, n) if weighting == "uniform" else None  # expert 1 weighted 0
    labels = torch.tensor([3, 4, 6, IGNORE])
    spec = make_spec(divergence=divergence, temperature=1.5, hard_weight=0.3, **LOSS)
    row_loss, _, _, grad_s, grad_e = _fused_kd_rows(student, experts, labels, None, spec, weighting, space, 0.7,
                                                    weights, (True, True))
    s64, z64 = _as64(student, True), _as64(experts, True)
    ref = fused_experts_kd_loss_reference(s64, z64, weighting=weighting, space=space, weights=_as64(weights),
                                          sharpness=0.7, divergence=divergence, temperature=1.5, hard_weight=0.3,
                                          labels=labels, reduction="none", **LOSS)
    (ref.sum() * GRAD_SCALE).backward()
    _check_nonfinite(row_loss, (grad_s, grad_e.transpose(0, 1)), ref, (s64.grad, z64.grad.transpose(0, 1)))
    log_probs, _, _ = _cuda.fuse_experts_cuda(experts, 1.5, weighting, space, 0.7, weights)
    assert torch.isnan(log_probs).all(-1).tolist() == [False, True, True, True]


def test_kd_loss_fp16_grad_scaler_exact():
    """fp16, batchmean over 16384 rows and a 65536 loss scale: dL/d(row_loss) = 4 enters the fp32
    gradient before its one rounding, so it matches float64 to fp16 accuracy."""
    n, v = 3, 301
    student, teacher = _logits(n, v, dtype=torch.float16), _logits(n, v, dtype=torch.float16)
    spec = make_spec(divergence="forward_kl", temperature=2.0, hard_weight=0.0, **LOSS)
    _, grad_s, _ = _kd_rows(student, teacher, None, None, spec, (True, False), scale=65536.0 / 16384)
    s64 = _as64(student, True)
    ref = kd_loss_reference(s64, _as64(teacher), divergence="forward_kl", temperature=2.0, reduction="none", **LOSS)
    (ref.sum() * 65536.0 / 16384).backward()
    assert_close(grad_s, s64.grad, torch.float16, "fp16 grad_student")


# ------------------------------------------------------------------------------------------------
# linear_kd_loss on the CUDA rows (kdengine/ops/linear_kd_loss.py over csrc/kd_loss.cu)
# ------------------------------------------------------------------------------------------------
class _ChunkConversions(TorchDispatchMode):
    """Records every op that changes the dtype of a logits or logit-gradient chunk ([c <= chunk, V])."""

    def __init__(self, chunk: int, vocab: int):
        super().__init__()
        self.chunk, self.vocab, self.seen = chunk, vocab, []

    def _is_chunk(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] <= self.chunk and t.shape[1] == self.vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in (*args, *(out if isinstance(out, (tuple, list)) else (out,)))
                   if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
        if any(self._is_chunk(t) for t in tensors) and len({t.dtype for t in tensors}) > 1:
            self.seen.append((str(func), [(t.dtype, tuple(t.shape)) for t in tensors]))
        return out


HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("head, teacher_dtype, divergence, reduction", [
    (torch.bfloat16, torch.bfloat16, "forward_kl", "batchmean"),
    (torch.float16, torch.float32, "jsd", "sum"),
    (torch.float32, torch.bfloat16, "tvd", "none"),
    (torch.bfloat16, torch.float32, "soft_ce", "none"),
], ids=lambda x: str(x).replace("torch.", ""))
def test_linear_kd_loss_cuda_rows(monkeypatch, head, teacher_dtype, divergence, reduction):
    """linear_kd_loss over the emulated CUDA rows vs float64: teacher logits reach the kernel in their
    own dtype (no fp32 copy of a chunk) and a half head's logit gradient comes out of the kernel in
    the head's dtype (no conversion pass): no op changes the dtype of a [chunk, V] tensor. −inf
    teacher columns, an ignored row, a hard label, grad_output != 1; with reduction="none" a NaN and
    a +inf teacher logit (rows 2, 3) give NaN rows. On a GPU the half heads use cuBLAS's fp32-output
    matmuls; CPU torch has none, so fp32 matmuls stand in for them (their own [c, H] / [H, V]
    conversions are not chunks)."""
    monkeypatch.setattr(_linear, "_fp32_out_head", lambda hidden, compute: hidden.dtype in HALF)
    monkeypatch.setattr(_linear, "_mm_fp32", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(_linear, "_addmm_fp32", lambda acc, a, b: acc + a.float() @ b.float())
    n, h, v, chunk = 7, 16, 509, 3  # h > chunk: the stand-ins' conversions are never [c <= chunk, V]
    hidden = torch.randn(n, h).to(head).requires_grad_()
    weight = (torch.randn(v, h) * 3 / h ** 0.5).to(head).requires_grad_()
    teacher = _logits(n, v, dtype=teacher_dtype)
    if reduction == "none":
        teacher[2, 7], teacher[3, 11] = math.nan, math.inf
    teacher.requires_grad_()
    labels = _labels(n, v)
    spec = make_spec(divergence=divergence, temperature=2.0, hard_weight=0.5, **LOSS)
    grad_scale = grad_scale_for(reduction, None, labels, spec, n, v, hidden.device)
    grad_output = torch.rand(n) + 0.5 if reduction == "none" else torch.tensor(2.5)
    with _ChunkConversions(chunk, v) as conversions:
        loss = _linear.LinearKDLossFunction.apply(hidden, weight, teacher, None, None, labels, None, grad_scale,
                                                  spec, reduction, chunk, _linear._kernel_rows("cuda"))
        loss.backward(grad_output)
    assert conversions.seen == [], conversions.seen
    h64, w64, t64 = _as64(hidden, True), _as64(weight, True), _as64(teacher, True)
    ref = kd_loss_reference(h64 @ w64.T, t64, divergence=divergence, temperature=2.0, hard_weight=0.5,
                            labels=labels, reduction=reduction, **LOSS)
    ref.backward(grad_output.double())
    assert_close(loss, ref, torch.float32, "loss")
    if reduction == "none":
        assert torch.isnan(loss[2:4]).all() and loss[1] == 0 and torch.isfinite(loss[[0, 4, 5, 6]]).all()
    for name, x, x64 in (("hidden", hidden, h64), ("weight", weight, w64), ("teacher_logits", teacher, t64)):
        assert x.grad.dtype == x.dtype, name
        assert_close(x.grad, x64.grad, x.dtype, f"grad {name}")


# ------------------------------------------------------------------------------------------------
# fuse_experts and fused_experts_kd_loss rows (csrc/fuse_experts.cu)
# ------------------------------------------------------------------------------------------------
FUSION = {"temperature": 1.5, "sharpness": 0.7}
# Explicit mixture weights [K] with bf16 logits, [N, K] with fp16 ones.
WEIGHT_CASES = pytest.mark.parametrize("kind, dtype", [("K", torch.bfloat16), ("NK", torch.float16)],
                                       ids=["K-bf16", "NK-fp16"])


def check_fuse(experts, weighting, space, weights=None):
    """Emulated fused teacher vs fuse_experts_reference in float64: log-probs, α and entropies."""
    log_probs, alpha, entropy = _cuda.fuse_experts_cuda(experts, FUSION["temperature"], weighting, space,
                                                        FUSION["sharpness"], weights)
    ref_lp, ref_alpha, ref_h = fuse_experts_reference(_as64(experts), weighting=weighting, space=space,
                                                      weights=_as64(weights), **FUSION)
    assert log_probs.dtype == alpha.dtype == entropy.dtype == torch.float32
    assert_close(log_probs, ref_lp, torch.float32, "log_probs")
    assert_close(alpha, ref_alpha, torch.float32, "alpha")
    assert_close(entropy, ref_h, torch.float32, "entropy")


def _weights(kind: str, k: int, n: int) -> torch.Tensor:
    """Normalised fp32 weights [K] or [N, K] (as the op passes them) with expert 1 dropped."""
    w = torch.rand(k) + 0.1 if kind == "K" else torch.rand(n, k) + 0.1
    w[..., 1] = 0.0
    return (w / w.sum(-1, keepdim=True)).contiguous()


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("weighting", ["uniform", "entropy", "confidence"])
@pytest.mark.parametrize("space", ["logit", "prob"])
def test_fuse_experts(space, weighting, k):
    check_fuse(_logits(k, 3, 61, dtype=torch.float32), weighting, space)


@WEIGHT_CASES
@pytest.mark.parametrize("space", ["logit", "prob"])
def test_fuse_experts_weights(space, kind, dtype):
    """Explicit weights [K] / [N, K] with a zero weight; experts with expert stride != N·V."""
    k, n, v = 3, 4, 67
    experts = _logits(n, k, v, dtype=dtype).transpose(0, 1)
    check_fuse(experts, "entropy", space, _weights(kind, k, n))


def _fused_kd_rows(student, experts, labels, row_weights, spec, weighting, space, sharpness, weights, need,
                   scale=GRAD_SCALE):
    """The emulated fused forward launch, then the backward launch with dL/d(row_loss) = scale."""
    row_loss, alpha, entropy, stats = _cuda.fused_experts_kd_forward_cuda(student, experts, labels, row_weights, spec,
                                                                          weighting, space, sharpness, weights)
    grads = _cuda.fused_experts_kd_backward_cuda(student, experts, labels, row_weights, alpha, stats,
                                                 torch.as_tensor(scale), spec, space, *need)
    return (row_loss, alpha, entropy, *grads)


def check_fused_kd_rows(student, experts, *, divergence, weighting, space, weights=None, hard_weight=0.3,
                        need=(True, True)):
    """Emulated fused-experts kd rows vs fused_experts_kd_loss_reference in float64 (α constant)."""
    n, v = student.shape
    labels, row_weights = _labels(n, v), _row_weights(n)
    temperature, sharpness = FUSION["temperature"], FUSION["sharpness"]
    spec = make_spec(divergence=divergence, temperature=temperature, hard_weight=hard_weight, **LOSS)
    row_loss, alpha, entropy, grad_s, grad_e = _fused_kd_rows(student, experts, labels, row_weights, spec, weighting,
                                                              space, sharpness, weights, need)
    s64, z64 = _as64(student, need[0]), _as64(experts, need[1])
    ref = fused_experts_kd_loss_reference(
        s64, z64, weighting=weighting, space=space, weights=_as64(weights), divergence=divergence,
        hard_weight=hard_weight, labels=labels, row_weights=_as64(row_weights), reduction="none", **FUSION,
        **LOSS)
    if need[0] or need[1]:
        (ref.sum() * GRAD_SCALE).backward()
    _, ref_alpha, ref_h = fuse_experts_reference(_as64(experts), weighting=weighting, space=space,
                                                 weights=_as64(weights), **FUSION)
    assert_close(row_loss, ref, torch.float32, "row_loss")
    assert_close(alpha, ref_alpha, torch.float32, "alpha")
    assert_close(entropy, ref_h, torch.float32, "entropy")
    _check_grad(grad_s, s64.grad if need[0] else None, student.dtype, student.shape, "grad_student")
    _check_grad(grad_e, z64.grad if need[1] else None, experts.dtype, experts.shape, "grad_experts")


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("weighting", ["uniform", "entropy", "confidence"])
@pytest.mark.parametrize("space", ["logit", "prob"])
def test_fused_experts_kd_rows_fusion(space, weighting, k):
    n, v = 3, 61
    check_fused_kd_rows(_logits(n, v, dtype=torch.float32), _logits(k, n, v, dtype=torch.float32),
                        divergence="jsd", weighting=weighting, space=space)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("space", ["logit", "prob"])
def test_fused_experts_kd_rows_divergences(space, divergence):
    n, v = 3, 53
    check_fused_kd_rows(_logits(n, v, dtype=torch.float32), _logits(3, n, v, dtype=torch.float32),
                        divergence=divergence, weighting="entropy", space=space)


@WEIGHT_CASES
@pytest.mark.parametrize("space", ["logit", "prob"])
def test_fused_experts_kd_rows_weights(space, kind, dtype):
    k, n, v = 3, 4, 77
    check_fused_kd_rows(_logits(n, v, dtype=dtype), _logits(k, n, v, dtype=dtype), divergence="forward_kl",
                        weighting="uniform", space=space, weights=_weights(kind, k, n))


@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["student-only", "experts-only"])
@pytest.mark.parametrize("space", ["logit", "prob"])
def test_fused_experts_kd_rows_one_gradient(space, need):
    n, v = 2, 45
    check_fused_kd_rows(_logits(n, v, dtype=torch.float32), _logits(2, n, v, dtype=torch.float32),
                        divergence="mse" if space == "logit" else "reverse_kl", weighting="confidence",
                        space=space, need=need)


@pytest.mark.parametrize("space", ["logit", "prob"])
def test_fused_experts_tvd_peaked_rows_exact(space):
    """TVD against a peaked fused teacher (one expert less, one more confident than the student):
    student and expert gradients match float64 row by row (split sums, no cancellation)."""
    n, v = 2, 389
    student, cols = _peaked(n, v, 20.0)
    experts = student.expand(2, n, v).clone()
    experts[0, torch.arange(n), cols] = 17.0
    experts[1, torch.arange(n), cols] = 22.0
    experts[:, :, :200] += 0.3 * torch.randn(2, n, 200)
    spec = make_spec(divergence="tvd", temperature=1.0, hard_weight=0.0, **LOSS)
    row_loss, _, _, grad_s, grad_e = _fused_kd_rows(student, experts, None, None, spec, "uniform", space, 1.0, None,
                                                    (True, True), scale=1.0)
    s64, z64 = _as64(student, True), _as64(experts, True)
    ref = fused_experts_kd_loss_reference(s64, z64, weighting="uniform", space=space, divergence="tvd",
                                          temperature=1.0, reduction="none", **LOSS)
    ref.sum().backward()
    assert_close(row_loss, ref, torch.float32, "row_loss")
    for row in range(n):
        assert_close(grad_s[row], s64.grad[row], torch.float32, f"grad_student row {row}")
        assert_close(grad_e[:, row], z64.grad[:, row], torch.float32, f"grad_experts row {row}")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_fused_experts_kd_loss_function(reduction):
    """FusedExpertsKDLossFunction on the emulated kernels, with grad_output != 1; the backward
    recomputes, so a retained graph's second backward gives the same gradients."""
    k, n, v = 3, 4, 59
    student = _logits(n, v, dtype=torch.float32).requires_grad_()
    experts = _logits(k, n, v, dtype=torch.float32).requires_grad_()
    labels, row_weights = _labels(n, v), _row_weights(n)
    spec = make_spec(divergence="forward_kl", temperature=FUSION["temperature"], hard_weight=0.2, **LOSS)
    grad_scale = grad_scale_for(reduction, None, labels, spec, n, v, student.device)
    fusion = ("entropy", "prob", FUSION["sharpness"])
    loss = FusedExpertsKDLossFunction.apply(student, experts, labels, row_weights, grad_scale, spec, reduction,
                                            fusion, None,
                                            (_cuda.fused_experts_kd_forward_cuda, _cuda.fused_experts_kd_backward_cuda))
    grad_output = torch.rand(loss.shape) + 0.5
    loss.backward(grad_output, retain_graph=True)
    s64, z64 = _as64(student, True), _as64(experts, True)
    ref = fused_experts_kd_loss_reference(s64, z64, weighting="entropy", space="prob",
                                          divergence="forward_kl", hard_weight=0.2, labels=labels,
                                          row_weights=_as64(row_weights), reduction=reduction, **FUSION,
                                          **LOSS)
    ref.backward(grad_output.double())
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(student.grad, s64.grad, torch.float32, "student.grad")
    assert_close(experts.grad, z64.grad, torch.float32, "experts.grad")
    first = (student.grad.clone(), experts.grad.clone())
    student.grad = experts.grad = None
    loss.backward(grad_output)
    assert torch.equal(student.grad, first[0]) and torch.equal(experts.grad, first[1])


@pytest.mark.parametrize("space", ["logit", "prob"])
def test_fused_experts_fp16_grad_scaler_exact(space):
    """fp16, batchmean over 16384 rows and a 65536 loss scale (dL/d(row_loss) = 4): student and expert
    gradients match float64 to fp16 accuracy (scaled in fp32 before the one rounding)."""
    k, n, v = 2, 3, 211
    student, experts = _logits(n, v, dtype=torch.float16), _logits(k, n, v, dtype=torch.float16)
    spec = make_spec(divergence="forward_kl", temperature=2.0, hard_weight=0.0, **LOSS)
    _, _, _, grad_s, grad_e = _fused_kd_rows(student, experts, None, None, spec, "entropy", space, 1.0, None,
                                             (True, True), scale=65536.0 / 16384)
    s64, z64 = _as64(student, True), _as64(experts, True)
    ref = fused_experts_kd_loss_reference(s64, z64, weighting="entropy", space=space, divergence="forward_kl",
                                          temperature=2.0, reduction="none", sharpness=1.0,
                                          **LOSS)
    (ref.sum() * 65536.0 / 16384).backward()
    assert_close(grad_s, s64.grad, torch.float16, "fp16 grad_student")
    assert_close(grad_e, z64.grad, torch.float16, "fp16 grad_experts")


# ------------------------------------------------------------------------------------------------
# expert_batch_embed (csrc/expert_batch_embed.cu)
# ------------------------------------------------------------------------------------------------
def _batch(b: int, length: int, k: int, vocab: int, experts_mode: str):
    """input_ids with a repeated id, a right-padded attention mask (every row >= 1 token), experts."""
    ids = torch.randint(0, vocab, (b, length))
    ids[:, -1] = ids[0, 0]
    lengths = torch.randint(1, length + 1, (b,))
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    experts = {"none": None, "B": torch.randint(0, k, (b,)), "Bk": torch.randint(0, k, (b, 2))}[experts_mode]
    return ids, mask, experts


def check_expert_batch_embed(ids, weight, prompts, mask, experts, placement, weight_grad=True):
    """Emulated forward (an exact copy: bitwise equal) and fp32 backward vs the float64 autograd."""
    embeds, out_mask = _cuda.expert_batch_embed_cuda(ids, weight, prompts, mask, experts, placement)
    ref_embeds, ref_mask = expert_batch_embed_reference(ids, weight, prompts, mask, experts, placement)
    assert embeds.dtype == weight.dtype and torch.equal(embeds, ref_embeds)
    assert out_mask.dtype == mask.dtype and torch.equal(out_mask, ref_mask)

    grad_embeds = torch.randn(embeds.shape).to(weight.dtype)
    k, vocab = prompts.shape[0], weight.shape[0]
    grad_prompts, grad_weight = _cuda.expert_batch_embed_backward_cuda(grad_embeds, ids, mask, experts, k,
                                                                       placement, weight_grad, vocab)
    w64, p64 = _as64(weight, True), _as64(prompts, True)
    ref64, _ = expert_batch_embed_reference(ids, w64, p64, mask, experts, placement)
    ref64.backward(grad_embeds.double())
    assert grad_prompts.dtype == torch.float32
    assert_close(grad_prompts, p64.grad, torch.float32, "grad_prompts")
    _check_grad(grad_weight, w64.grad if weight_grad else None, torch.float32, weight.shape, "grad_weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("experts_mode", ["none", "B", "Bk"])
@pytest.mark.parametrize("placement", ["prepend", "append"])
def test_expert_batch_embed(placement, experts_mode, dtype):
    """H = 40: rows of 16-byte vectors (the vector copy path)."""
    b, length, k, p, h, vocab = 3, 6, 3, 2, 40, 11
    ids, mask, experts = _batch(b, length, k, vocab, experts_mode)
    check_expert_batch_embed(ids, torch.randn(vocab, h).to(dtype), torch.randn(k, p, h), mask, experts,
                             placement)


@pytest.mark.parametrize("placement", ["prepend", "append"])
def test_expert_batch_embed_odd_layout(placement):
    """fp16, H = 13 (scalar copies), a weight with row stride != H, a bool mask, no weight gradient."""
    b, length, k, p, h, vocab = 2, 5, 2, 3, 13, 9
    ids, mask, experts = _batch(b, length, k, vocab, "Bk")
    weight = torch.randn(vocab, h + 3).to(torch.float16)[:, 1:h + 1]
    check_expert_batch_embed(ids, weight, torch.randn(k, p, h), mask.bool(), experts, placement,
                             weight_grad=False)


def test_expert_batch_embed_function():
    """ExpertBatchEmbedFunction with the emulated forward/backward: gradients of prompts and weight."""
    b, length, k, p, h, vocab = 3, 5, 2, 2, 24, 10
    ids, mask, experts = _batch(b, length, k, vocab, "none")
    weight = torch.randn(vocab, h).requires_grad_()
    prompts = torch.randn(k, p, h).requires_grad_()
    embeds, _ = ExpertBatchEmbedFunction.apply(prompts, weight, ids, mask, experts, "append",
                                               _cuda.expert_batch_embed_cuda,
                                               _cuda.expert_batch_embed_backward_cuda)
    grad = torch.randn(embeds.shape)
    embeds.backward(grad)
    w64, p64 = _as64(weight, True), _as64(prompts, True)
    ref, _ = expert_batch_embed_reference(ids, w64, p64, mask, experts, "append")
    ref.backward(grad.double())
    assert_close(prompts.grad, p64.grad, torch.float32, "prompts.grad")
    assert_close(weight.grad, w64.grad, torch.float32, "weight.grad")


# ------------------------------------------------------------------------------------------------
# The bindings' checks and determinism
# ------------------------------------------------------------------------------------------------
def test_bindings_reject_bad_inputs_with_value_errors(emulated):
    """csrc/bindings.cpp's TORCH_CHECK_VALUE checks reach Python as ValueErrors naming the problem."""
    s = torch.randn(2, 8)
    with pytest.raises(ValueError, match="teacher must have the student's shape"):
        emulated.kd_loss_forward(s, torch.randn(2, 9), None, None, 0, 1.0, 0.5, 1.0, 0.0, IGNORE, 0)
    _, stats = emulated.kd_loss_forward(s, s, None, None, 0, 1.0, 0.5, 1.0, 0.0, IGNORE, 0)
    with pytest.raises(ValueError, match="scale must be 0-d or have shape"):
        emulated.kd_loss_backward(s, s, None, None, stats, torch.ones(3), 0, 1.0, 0.5, 1.0, 0.0, IGNORE, True,
                                  True, None, None, 0)
    with pytest.raises(ValueError, match="stats must have shape"):
        emulated.kd_loss_backward(s, s, None, None, stats[:, 1:].contiguous(), torch.ones(()), 0, 1.0, 0.5, 1.0,
                                  0.0, IGNORE, True, True, None, None, 0)
    with pytest.raises(ValueError, match="grad_teacher_dtype must be float32, bfloat16 or float16"):
        emulated.kd_loss_backward(s, s, None, None, stats, torch.ones(()), 0, 1.0, 0.5, 1.0, 0.0, IGNORE, True,
                                  True, None, torch.float64, 0)
    with pytest.raises(ValueError, match="share a dtype or one of them be float32"):
        emulated.kd_loss_forward(s.bfloat16(), s.half(), None, None, 0, 1.0, 0.5, 1.0, 0.0, IGNORE, 0)
    with pytest.raises(ValueError, match="1 <= K <= 16"):
        emulated.fuse_experts_forward(torch.randn(17, 2, 8), 1.0, 0, 0, 1.0, None, 0)
    with pytest.raises(ValueError, match="unit stride in its last dimension"):
        emulated.fuse_experts_forward(torch.randn(2, 8, 3).transpose(1, 2), 1.0, 0, 0, 1.0, None, 0)


def test_kernels_are_deterministic():
    """Same inputs, bitwise the same outputs (fixed-order block reductions, no races between threads)."""
    n, v = 3, 300
    student, teacher = _logits(n, v, dtype=torch.bfloat16), _logits(n, v, dtype=torch.bfloat16)
    labels, row_weights = _labels(n, v), _row_weights(n)
    spec = make_spec(divergence="tvd", temperature=2.0, hard_weight=0.5, **LOSS)
    runs = [_kd_rows(student, teacher, labels, row_weights, spec, (True, True)) for _ in range(2)]
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


# ------------------------------------------------------------------------------------------------
# The emulator itself
# ------------------------------------------------------------------------------------------------
def test_emulator_semantics(tmp_path):
    """tests/cuda_emulator/selftest.cu: shuffles (partial warp too), exits before a barrier, per-block
    shared memory, and the launch errors (too many threads, a deadlocked barrier)."""
    result = subprocess.run([str(build_selftest(tmp_path))], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["launch"] == "0"
    assert [int(x) for x in lines["xor"].split()] == [t ^ 1 for t in range(48)]
    # __shfl_down_sync by 4: lanes past the warp's end (or past the block's last thread) keep their own.
    assert [int(x) for x in lines["down"].split()] == [
        t + 4 if t % 32 + 4 < 32 and t + 4 < 48 else t for t in range(48)]
    assert lines["early_exit"].split() == ["0"] + [str(64 * 100 * b + sum(range(64))) for b in range(3)]
    assert lines["too_many_threads"] == "9 invalid configuration argument"
    assert lines["deadlock"] == "719" and "deadlock in block (0, 0, 0)" in result.stderr
    assert lines["after"] == "0", "cudaGetLastError must clear the error"


def test_launch_rewrite_refuses_what_it_cannot_translate():
    text = "k<<<1, 32, 0, s>>>(a);\nk2<scalar_t, 3><<<grid, threads, 0, s>>>(a, b);\n"
    out = translate_kernels(text, CSRC_STUB)
    assert "kdemu::launch(k, kdemu::LaunchConfig(1, 32, 0, s), a);" in out
    assert "kdemu::launch(k2<scalar_t, 3>, kdemu::LaunchConfig(grid, threads, 0, s), a, b);" in out
    with pytest.raises(EmulatorBuildError, match="1 kernel launches but 0 matched"):
        translate_kernels("(*table[i])<<<1, 32>>>(a);", CSRC_STUB)
