"""``kd_loss``: temperature softmax fused with the distillation divergence, forward and backward.

Three backends compute the same row losses (math in :mod:`kdengine.reference.kd_loss`):

* ``cuda``   kdengine._C (csrc/kd_loss.cu): CUDA tensors, fp32/bf16/fp16, same dtype both sides.
* ``triton`` kdengine.kernels.kd_loss: CUDA tensors (or CPU under TRITON_INTERPRET=1).
* ``torch``  chunks of rows through the reference math: any device and float dtype (float64
  too); forward keeps per-row losses only, backward recomputes each chunk with autograd, so peak
  extra memory is ~ chunk × V, not N × V.

The fused backends implement two kernels (recompute-in-backward, see :func:`primitives`): a forward
that writes the row losses before reduction and fp32 per-row statistics only (online softmax over
each row), and a backward that re-reads the logits and writes each gradient once, already multiplied
by dL/d(row loss) (fp32 math, one rounding into the input dtype). ``KDLossFunction`` reduces the
rows; nothing of size [N, V] lives between forward and backward. Traffic: docs/kernels.md, "Memory
traffic".
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from kdengine.constants import IGNORE_INDEX
from kdengine.ops import _backends
from kdengine.reference.kd_loss import DIVERGENCES, REDUCTIONS, effective_divergence, kd_loss_rows

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per chunk of the torch backend: bounds its temporaries to a few tens of MB.
TORCH_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class KDLossSpec:
    """The per-row options of kd_loss (everything except reduction and normalizer)."""

    divergence: str = "forward_kl"
    temperature: float = 1.0
    t2_scale: bool = True
    jsd_beta: float = 0.5
    ignore_index: int = IGNORE_INDEX
    kd_weight: float = 1.0
    hard_weight: float = 0.0

    @property
    def kind(self) -> str:
        """The divergence actually computed (jsd at β=0/1 becomes forward/reverse KL)."""
        return effective_divergence(self.divergence, self.jsd_beta)

    @property
    def kd_scale(self) -> float:
        """kd_weight · T² (when t2_scale and the divergence uses T)."""
        if self.t2_scale and self.kind != "mse":
            return self.kd_weight * self.temperature * self.temperature
        return self.kd_weight

    def rows_kwargs(self) -> dict:
        return dict(divergence=self.divergence, temperature=self.temperature, t2_scale=self.t2_scale,
                    jsd_beta=self.jsd_beta, ignore_index=self.ignore_index, kd_weight=self.kd_weight,
                    hard_weight=self.hard_weight)


def _check_number(name: str, value, *, minimum=None, exclusive=False, maximum=None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def make_spec(*, divergence, temperature, t2_scale, jsd_beta, ignore_index, kd_weight, hard_weight) -> KDLossSpec:
    """Validate the per-row options and pack them (ValueError naming the bad option)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    return KDLossSpec(
        divergence=divergence,
        temperature=_check_number("temperature", temperature, minimum=0.0, exclusive=True),
        t2_scale=bool(t2_scale),
        jsd_beta=_check_number("jsd_beta", jsd_beta, minimum=0.0, maximum=1.0),
        ignore_index=int(ignore_index),
        kd_weight=_check_number("kd_weight", kd_weight, minimum=0),
        hard_weight=_check_number("hard_weight", hard_weight, minimum=0),
    )


def check_logits_pair(student: torch.Tensor, teacher: torch.Tensor, *, what: str = "teacher_logits") -> None:
    """Shape/dtype/device checks shared by the loss ops."""
    for name, t in (("student_logits", student), (what, teacher)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), "
                             f"got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, V] (flatten batch and sequence first), "
                             f"got shape {tuple(t.shape)}")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has V=0 columns; the vocabulary needs at least one")
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(f"vocabulary mismatch: student_logits has V={student.shape[1]} but {what} has "
                         f"V={teacher.shape[1]}; both must cover the same vocabulary")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"row mismatch: student_logits has N={student.shape[0]} rows but {what} has "
                         f"N={teacher.shape[0]}")
    if student.device != teacher.device:
        raise ValueError(f"student_logits is on {student.device} but {what} is on {teacher.device}")


def check_row_args(n_rows: int, device, labels, row_weights, reduction, normalizer, spec: KDLossSpec):
    """Checks of labels / row_weights / reduction / normalizer; returns labels, row_weights ready to use."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got "
                             f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.dim() != 1 or labels.shape[0] != n_rows:
            raise ValueError(f"labels must have shape [N]=[{n_rows}], got {tuple(labels.shape)}")
        if labels.device != device:
            raise ValueError(f"labels are on {labels.device} but the logits are on {device}")
    elif spec.hard_weight != 0.0:
        raise ValueError("hard_weight != 0 needs labels (the hard-label targets)")
    if row_weights is not None:
        if not isinstance(row_weights, torch.Tensor) or not row_weights.dtype.is_floating_point:
            raise ValueError("row_weights must be a floating tensor of shape [N]")
        if row_weights.dim() != 1 or row_weights.shape[0] != n_rows:
            raise ValueError(f"row_weights must have shape [N]=[{n_rows}], got {tuple(row_weights.shape)}")
        if row_weights.device != device:
            raise ValueError(f"row_weights are on {row_weights.device} but the logits are on {device}")
    if normalizer is not None:
        if reduction == "none":
            raise ValueError("normalizer replaces the divisor of a reduced loss; it cannot be used "
                             "with reduction='none'")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.dim() != 0:
                raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape "
                                 f"{tuple(normalizer.shape)}")
        else:
            _check_number("normalizer", normalizer, minimum=0.0, exclusive=True)
    return labels, row_weights


def accumulation_dtype(*tensors) -> torch.dtype:
    """float64 when any input is float64 (the oracle / gradcheck), float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def grad_scale_for(reduction, normalizer, labels, spec: KDLossSpec, n_rows: int, vocab: int, device,
                   dtype=torch.float32):
    """0-d device tensor: the factor from Σ row_loss to the reduced loss (no host sync)."""
    if reduction == "none":
        return torch.ones((), dtype=dtype, device=device)
    if normalizer is not None:
        return 1.0 / torch.as_tensor(normalizer, dtype=dtype, device=device)
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=device)
    if labels is None:
        n_valid = torch.full((), float(n_rows), dtype=dtype, device=device)
    else:
        n_valid = (labels != spec.ignore_index).sum().to(dtype)
    n_valid = n_valid.clamp_min(1.0)
    if reduction == "batchmean":
        return 1.0 / n_valid
    return 1.0 / (n_valid * vocab)


# --------------------------------------------------------------------------------------------
# torch backend: chunks of rows through the reference math. Forward keeps only per-row losses;
# backward recomputes each chunk with autograd, so peak extra memory is ~ chunk × V in both
# directions, and the backward can run more than once (gradcheck, retain_graph).
# --------------------------------------------------------------------------------------------
def _chunk_rows(v: int, chunk_elements: int = TORCH_CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(v, 1))


class KDLossTorchFunction(torch.autograd.Function):
    """kd_loss on the torch backend (any device, any float dtype)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, row_weights, grad_scale, spec, reduction):
        n, v = student.shape
        compute = accumulation_dtype(student, teacher)
        row_loss = torch.empty(n, dtype=compute, device=student.device)
        step = _chunk_rows(v)
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            row_loss[sl] = kd_loss_rows(student[sl].to(compute), teacher[sl].to(compute),
                                        None if labels is None else labels[sl],
                                        None if row_weights is None else row_weights[sl], **spec.rows_kwargs())
        ctx.spec, ctx.reduction = spec, reduction
        ctx.save_for_backward(student, teacher, labels, row_weights, grad_scale)
        return row_loss if reduction == "none" else row_loss.sum() * grad_scale

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, labels, row_weights, grad_scale = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, v = student.shape
        compute = accumulation_dtype(student, teacher)
        grad_s = torch.empty_like(student, memory_format=torch.contiguous_format) if need_s else None
        grad_t = torch.empty_like(teacher, memory_format=torch.contiguous_format) if need_t else None
        step = _chunk_rows(v)
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            s = student[sl].detach().to(compute).requires_grad_(need_s)
            t = teacher[sl].detach().to(compute).requires_grad_(need_t)
            with torch.enable_grad():
                rows = kd_loss_rows(s, t, None if labels is None else labels[sl],
                                    None if row_weights is None else row_weights[sl], **ctx.spec.rows_kwargs())
                weight = grad_output[sl] if ctx.reduction == "none" else (grad_output * grad_scale).expand_as(rows)
                grads = list(torch.autograd.grad(rows, [x for x in (s, t) if x.requires_grad],
                                                 grad_outputs=weight.to(rows.dtype)))
            if need_s:
                grad_s[sl] = grads.pop(0)
            if need_t:
                grad_t[sl] = grads.pop(0)
        return grad_s, grad_t, None, None, None, None, None


def _kernel_reasons(name: str, student, teacher, labels, row_weights) -> list[str]:
    reasons = _backends.tensor_device_reasons(name, [student, teacher, labels, row_weights])
    if name == "torch":
        return reasons
    for label, t in (("student_logits", student), ("teacher_logits", teacher)):
        if t.dtype not in KERNEL_DTYPES:
            reasons.append(f"{label} dtype {t.dtype} unsupported (fp32/bf16/fp16)")
    if name == "cuda" and student.dtype != teacher.dtype:
        reasons.append(f"needs the same dtype on both sides, got {student.dtype} and {teacher.dtype}")
    return reasons


def primitives(name: str):
    """(forward, backward) kernels of a fused backend, imported lazily (Triton/_C only when used).

    ``forward(student, teacher, labels, row_weights, spec) -> (row_loss fp32 [N], stats fp32 [N, S])``
    writes only per-row statistics; ``backward(student, teacher, labels, row_weights, stats, scale,
    spec, need_grad_student, need_grad_teacher) -> (grad_student | None, grad_teacher | None)``
    reads the logits again and writes the gradients of Σ_rows scale · row_loss (``scale`` a 0-d
    or [N] fp32 device tensor) in the logits' dtypes.
    """
    if name == "triton":
        from kdengine.kernels.kd_loss import kd_loss_backward_triton, kd_loss_forward_triton  # noqa: PLC0415

        return kd_loss_forward_triton, kd_loss_backward_triton
    if name == "cuda":
        from kdengine.ops._cuda import kd_loss_backward_cuda, kd_loss_forward_cuda  # noqa: PLC0415

        return kd_loss_forward_cuda, kd_loss_backward_cuda
    raise ValueError(name)


class KDLossFunction(torch.autograd.Function):
    """Fused backends, recompute-in-backward: the forward keeps the logits (saved, not copied) and
    fp32 row statistics; the backward re-reads the logits and writes each gradient once, already
    scaled by grad_output (fp32 math, one rounding; exact under fp16 loss scaling). No [N, V]
    tensor lives between forward and backward, and the backward can run more than once."""

    @staticmethod
    def forward(ctx, student, teacher, labels, row_weights, grad_scale, spec, reduction, kernels):
        forward, ctx.backward_kernel = kernels
        row_loss, stats = forward(student, teacher, labels, row_weights, spec)
        ctx.spec, ctx.reduction = spec, reduction
        ctx.save_for_backward(student, teacher, labels, row_weights, grad_scale, stats)
        if reduction == "none":
            return row_loss
        return row_loss.sum() * grad_scale

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, labels, row_weights, grad_scale, stats = ctx.saved_tensors
        # dL/d(row_loss): grad_output [N] (reduction="none") or grad_output · grad_scale (0-d).
        scale = grad_output if ctx.reduction == "none" else grad_output * grad_scale
        grad_s, grad_t = ctx.backward_kernel(student, teacher, labels, row_weights, stats, scale.float(), ctx.spec,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_s, grad_t, None, None, None, None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, divergence: str = "forward_kl",
            temperature: float = 1.0, t2_scale: bool = True, jsd_beta: float = 0.5,
            labels: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX, kd_weight: float = 1.0,
            hard_weight: float = 0.0, row_weights: torch.Tensor | None = None, reduction: str = "batchmean",
            normalizer=None, backend: str | None = "auto") -> torch.Tensor:
    """Temperature-softmax distillation loss, fused forward and backward.

    Args:
        student_logits: [N, V] float32/bfloat16/float16 (float64: torch backend only). Callers
            flatten batch and sequence. Any row stride; fp32 accumulation on every backend.
        teacher_logits: [N, V], same N and V. Gets a gradient when it requires grad.
        divergence: one of ``forward_kl``, ``reverse_kl``, ``soft_ce``, ``jsd``, ``tvd``, ``mse``.
        temperature: T > 0; p = softmax(teacher/T), q = softmax(student/T). Ignored by ``mse``.
        t2_scale: multiply the divergence by T² (Hinton); ignored by ``mse``.
        jsd_beta: β of the generalized JSD (TRL semantics: 0 → forward KL, 1 → reverse KL).
        labels: [N] integer. Rows equal to ``ignore_index`` contribute 0; the others are the
            hard-label targets of ``hard_weight · CE(student at T=1, label)``.
        kd_weight, hard_weight: weights of the divergence and hard-label terms.
        row_weights: [N] float multiplying each row's loss.
        reduction: ``batchmean`` (Σ / valid rows), ``sum``, ``mean`` (Σ / (valid rows · V)) or
            ``none`` (per-row [N]).
        normalizer: number or 0-d tensor replacing the divisor (gradient accumulation across
            micro-batches); never synchronises with the host.
        backend: ``auto`` | ``cuda`` | ``triton`` | ``torch``; ``KDENGINE_BACKEND`` overrides.

    Returns:
        fp32 scalar, or fp32 [N] with ``reduction="none"`` (float64 when an input is float64).
        −inf logits are masked columns; a NaN or +inf logit makes its row's loss and gradients NaN
        on every backend (never hidden as a masked column), unless the row is ignored.
    """
    check_logits_pair(student_logits, teacher_logits)
    spec = make_spec(divergence=divergence, temperature=temperature, t2_scale=t2_scale, jsd_beta=jsd_beta,
                     ignore_index=ignore_index, kd_weight=kd_weight, hard_weight=hard_weight)
    n, v = student_logits.shape
    labels, row_weights = check_row_args(n, student_logits.device, labels, row_weights, reduction, normalizer, spec)
    name = _backends.select("kd_loss", backend,
                            lambda b: _kernel_reasons(b, student_logits, teacher_logits, labels, row_weights))
    grad_scale = grad_scale_for(reduction, normalizer, labels, spec, n, v, student_logits.device,
                                accumulation_dtype(student_logits, teacher_logits))
    if name == "torch":
        return KDLossTorchFunction.apply(student_logits, teacher_logits, labels, row_weights, grad_scale, spec,
                                         reduction)
    return KDLossFunction.apply(student_logits, teacher_logits, labels, row_weights, grad_scale, spec,
                                reduction, primitives(name))
