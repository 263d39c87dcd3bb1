"""``sparse_kd_loss``: distillation from the teacher's top-k log-probabilities (an offline teacher cache).

Backends (math in :mod:`kdengine.reference.sparse_kd_loss`):

* ``triton`` kdengine.kernels.sparse_kd_loss: CUDA tensors (or CPU under TRITON_INTERPRET=1),
  fp32/bf16/fp16 student, k ≤ 1024. Recompute-in-backward: the forward reads the student row once
  and keeps fp32 row statistics ([N, 4]); the backward reads it once more and writes the gradient
  once, already multiplied by dL/d(row loss). Nothing of size [N, V] lives between the two.
* ``torch``  chunks of rows through the reference math in float64 (fp32 autograd cancels in the
  bucket's tail gradient, a difference of O(q_j) terms), any device and float dtype; forward keeps
  per-row losses only, backward recomputes each chunk with autograd.
* ``cuda``   not implemented for this op: an explicit ``backend="cuda"`` raises BackendUnavailable.
"""

from __future__ import annotations

import torch

from kdengine.constants import IGNORE_INDEX
from kdengine.ops import _backends
from kdengine.ops.kd_loss import (
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    _chunk_rows,
    accumulation_dtype,
    check_row_args,
    grad_scale_for,
    make_spec,
)
from kdengine.reference.sparse_kd_loss import check_tail, sparse_kd_loss_rows

# The Triton kernel's largest k: its repeated-column check compares every pair of the k indices.
TRITON_MAX_K = 1024


def _rows_kwargs(spec, tail: str) -> dict:
    return dict(spec.rows_kwargs(), tail=tail)


class SparseKDLossTorchFunction(torch.autograd.Function):
    """sparse_kd_loss on the torch backend (any device, any float dtype)."""

    @staticmethod
    def forward(ctx, student, logprobs, indices, labels, row_weights, grad_scale, spec, tail, reduction):
        n, v = student.shape
        row_loss = torch.empty(n, dtype=torch.float64, device=student.device)
        step = _chunk_rows(v)
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            row_loss[sl] = sparse_kd_loss_rows(student[sl].double(), logprobs[sl].double(), indices[sl],
                                               None if labels is None else labels[sl],
                                               None if row_weights is None else row_weights[sl],
                                               **_rows_kwargs(spec, tail))
        ctx.spec, ctx.tail, ctx.reduction = spec, tail, reduction
        ctx.save_for_backward(student, logprobs, indices, labels, row_weights, grad_scale)
        row_loss = row_loss.to(grad_scale.dtype)
        return row_loss if reduction == "none" else row_loss.sum() * grad_scale

    @staticmethod
    def backward(ctx, grad_output):
        student, logprobs, indices, labels, row_weights, grad_scale = ctx.saved_tensors
        n, v = student.shape
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        step = _chunk_rows(v)
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            s = student[sl].detach().double().requires_grad_()
            with torch.enable_grad():
                rows = sparse_kd_loss_rows(s, logprobs[sl].double(), indices[sl],
                                           None if labels is None else labels[sl],
                                           None if row_weights is None else row_weights[sl],
                                           **_rows_kwargs(ctx.spec, ctx.tail))
                weight = grad_output[sl] if ctx.reduction == "none" else (grad_output * grad_scale).expand_as(rows)
                (grad[sl],) = torch.autograd.grad(rows, [s], grad_outputs=weight.to(rows.dtype))
        return grad, None, None, None, None, None, None, None, None


class SparseKDLossFunction(torch.autograd.Function):
    """Triton backend, recompute-in-backward (as ``KDLossFunction``): the forward keeps the inputs it
    was given and fp32 row statistics; the backward re-reads the student and writes its gradient once."""

    @staticmethod
    def forward(ctx, student, logprobs, indices, labels, row_weights, grad_scale, spec, tail, reduction):
        from kdengine.kernels.sparse_kd_loss import sparse_kd_loss_forward_triton  # noqa: PLC0415

        row_loss, stats = sparse_kd_loss_forward_triton(student, logprobs, indices, labels, row_weights, spec, tail)
        ctx.spec, ctx.tail, ctx.reduction = spec, tail, reduction
        ctx.save_for_backward(student, logprobs, indices, labels, row_weights, grad_scale, stats)
        return row_loss if reduction == "none" else row_loss.sum() * grad_scale

    @staticmethod
    def backward(ctx, grad_output):
        from kdengine.kernels.sparse_kd_loss import sparse_kd_loss_backward_triton  # noqa: PLC0415

        student, logprobs, indices, labels, row_weights, grad_scale, stats = ctx.saved_tensors
        scale = grad_output if ctx.reduction == "none" else grad_output * grad_scale
        grad = sparse_kd_loss_backward_triton(student, logprobs, indices, labels, row_weights, stats, scale.float(),
                                              ctx.spec, ctx.tail)
        return grad, None, None, None, None, None, None, None, None


def _check_inputs(student, logprobs, indices) -> None:
    for name, t in (("student_logits", student), ("teacher_topk_logprobs", logprobs)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (flatten batch and sequence first), got shape {tuple(t.shape)}")
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError("teacher_topk_indices must be an integer tensor [N, k]")
    if indices.shape != logprobs.shape:
        raise ValueError(f"teacher_topk_indices has shape {tuple(indices.shape)} but teacher_topk_logprobs has "
                         f"{tuple(logprobs.shape)}; both must be [N, k]")
    n, v = student.shape
    if logprobs.shape[0] != n:
        raise ValueError(f"row mismatch: student_logits has N={n} rows but teacher_topk_logprobs has "
                         f"N={logprobs.shape[0]}")
    k = logprobs.shape[1]
    if not 1 <= k <= v:
        raise ValueError(f"k={k} teacher columns per row for a vocabulary of V={v}; expected 1 <= k <= V")
    if logprobs.requires_grad:
        raise ValueError("teacher_topk_logprobs requires grad; sparse_kd_loss treats the cached teacher as a "
                         "constant (detach it)")
    for name, t in (("teacher_topk_logprobs", logprobs), ("teacher_topk_indices", indices)):
        if t.device != student.device:
            raise ValueError(f"student_logits is on {student.device} but {name} is on {t.device}")


def _kernel_reasons(name: str, student, logprobs, indices, labels, row_weights) -> list[str]:
    reasons = _backends.tensor_device_reasons(name, [student, logprobs, indices, labels, row_weights])
    if name == "torch":
        return reasons
    if name == "cuda":
        return reasons + ["sparse_kd_loss has no CUDA-extension kernel yet (use backend='triton' or 'torch')"]
    for label, t in (("student_logits", student), ("teacher_topk_logprobs", logprobs)):
        if t.dtype not in KERNEL_DTYPES:
            reasons.append(f"{label} dtype {t.dtype} unsupported (fp32/bf16/fp16)")
    if indices.shape[1] > TRITON_MAX_K:
        reasons.append(f"k={indices.shape[1]} > {TRITON_MAX_K} teacher columns per row")
    return reasons


def sparse_kd_loss(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                   teacher_topk_indices: torch.Tensor, *, tail: str = "bucket", divergence: str = "forward_kl",
                   temperature: float = 1.0, t2_scale: bool = True, jsd_beta: float = 0.5,
                   labels: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX, kd_weight: float = 1.0,
                   hard_weight: float = 0.0, row_weights: torch.Tensor | None = None, reduction: str = "batchmean",
                   normalizer=None, backend: str | None = "auto") -> torch.Tensor:
    """Distillation loss against a teacher known on k columns per row (top-k log-probs), fused.

    Args:
        student_logits: [N, V] float32/bfloat16/float16 (float64: torch backend only); flatten batch
            and sequence. Any row stride. Gets the only gradient.
        teacher_topk_logprobs: [N, k] float, 1 ≤ k ≤ V: log p of the teacher at the k columns, with
            p = softmax(teacher / ``temperature``) (the cache stores them at the run's temperature).
            A constant: it must not require grad. −inf is a zero-probability column.
        teacher_topk_indices: [N, k] integer, the columns, distinct within a row.
        tail: what happens to the teacher mass outside the k columns (1 − Σ p):
            ``bucket`` one extra outcome matched against the student's mass outside the k columns;
            ``renormalize`` dropped, both sides renormalised over the k columns;
            ``ignore`` dropped, D's terms summed over the k columns with the full student softmax
            (forward_kl, reverse_kl, soft_ce only).
            See docs/kernels.md ("sparse_kd_loss") for the bias of each.
        divergence: ``forward_kl``, ``reverse_kl``, ``soft_ce``, ``jsd`` or ``tvd`` (not ``mse``).
        temperature, t2_scale, jsd_beta, labels, ignore_index, kd_weight, hard_weight, row_weights,
        reduction, normalizer: as :func:`kdengine.ops.kd_loss` (``mean`` divides by valid rows · V).
        backend: ``auto`` | ``triton`` | ``torch`` (``cuda`` raises: no extension kernel yet);
            ``KDENGINE_BACKEND`` overrides.

    A row whose student logits hold a NaN or +inf, whose log-probs a NaN or +inf, or whose indices one
    outside [0, V) or a repeated column, gets a NaN loss and NaN student gradient (checking values on
    the host would synchronise); rows whose label is ``ignore_index`` contribute exactly 0.

    Returns:
        fp32 scalar, or fp32 [N] with ``reduction="none"`` (float64 when an input is float64).
    """
    check_tail(tail, divergence, jsd_beta)
    _check_inputs(student_logits, teacher_topk_logprobs, teacher_topk_indices)
    spec = make_spec(divergence=divergence, temperature=temperature, t2_scale=t2_scale, jsd_beta=jsd_beta,
                     ignore_index=ignore_index, kd_weight=kd_weight, hard_weight=hard_weight)
    n, v = student_logits.shape
    labels, row_weights = check_row_args(n, student_logits.device, labels, row_weights, reduction, normalizer, spec)
    name = _backends.select("sparse_kd_loss", backend, lambda b: _kernel_reasons(
        b, student_logits, teacher_topk_logprobs, teacher_topk_indices, labels, row_weights))
    grad_scale = grad_scale_for(reduction, normalizer, labels, spec, n, v, student_logits.device,
                                accumulation_dtype(student_logits, teacher_topk_logprobs))
    function = SparseKDLossTorchFunction if name == "torch" else SparseKDLossFunction
    return function.apply(student_logits, teacher_topk_logprobs, teacher_topk_indices, labels, row_weights,
                          grad_scale, spec, tail, reduction)
