"""``fuse_experts`` / ``fused_experts_kd_loss``: uncertainty-weighted fusion of K expert logits,
alone or fused with the distillation loss (math in :mod:`kdengine.reference.fuse_experts`).

Backends:

* ``cuda``   kdengine._C (csrc/fuse_experts.cu): CUDA tensors, fp32/bf16/fp16, same dtype both sides.
* ``triton`` kdengine.kernels.fuse_experts: CUDA tensors (or CPU under TRITON_INTERPRET=1).
* ``torch``  chunks of rows through the reference math: any device and float dtype (float64
  too). Peak extra memory ~ K × chunk × V (never K × N × V); the backward recomputes each chunk.

The fused backends implement three kernels with identical signatures (recompute-in-backward):

* ``fused_experts_kd_forward(student, experts, labels, row_weights, spec, weighting, space, sharpness,
  weights) -> (row_loss fp32 [N], alpha fp32 [N, K], entropy fp32 [N, K], stats fp32 [N, S])``: row
  losses before reduction and the per-row statistics only (one program per row, online statistics
  over V; neither the fused distribution nor any [K, N, V] tensor exists).
* ``fused_experts_kd_backward(student, experts, labels, row_weights, alpha, stats, scale, spec, space,
  need_grad_student, need_grad_experts) -> (grad_student | None, grad_experts | None)``: the gradients
  of Σ_rows scale · row_loss (``scale`` 0-d or [N] on the device, α constant), re-reading the logits,
  written once in fp32-then-input-dtype.
* ``fuse_experts(experts, temperature, weighting, space, sharpness, weights) -> (log_probs fp32 [N, V],
  alpha, entropy)``.

``weights`` reaches a primitive already validated and normalised: fp32 [K] or [N, K] summing to 1
per row, or None. α is a constant of the fused loss (no gradient through it); the gradient of
``fuse_experts``' log-probs is computed, on every backend, in closed form from the forward's α and
log-probs (``_fused_backward``: one pass over them in logit space, no autograd graph).

Weight values: checking them needs their values on the host. CPU tensors are checked (ValueError on
negative, non-finite or all-zero weights). CUDA tensors are not synchronised on: a negative or
non-finite weight, or an all-zero row, turns the affected rows' α (and therefore the loss) into
NaN on the device, so the error surfaces as a non-finite loss instead of silently mixing.
"""

from __future__ import annotations

import math

import torch

from kdengine.constants import IGNORE_INDEX
from kdengine.ops import _backends
from kdengine.ops.kd_loss import (
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    TORCH_CHUNK_ELEMENTS,
    _check_number,
    accumulation_dtype,
    check_row_args,
    grad_scale_for,
    make_spec,
)
from kdengine.reference.fuse_experts import SPACES, WEIGHTINGS, fuse_experts_reference, fused_log_probs
from kdengine.reference.kd_loss import kd_loss_rows, zero_ignored_rows

# The fused kernels keep the K experts' statistics of a row on chip.
MAX_KERNEL_EXPERTS = 16


def check_expert_logits(experts) -> tuple[int, int, int]:
    """Type, dtype and shape checks of the [K, N, V] expert logits; returns (K, N, V)."""
    if not isinstance(experts, torch.Tensor):
        raise ValueError(f"expert_logits must be a torch.Tensor, got {type(experts).__name__}")
    if experts.dtype not in FLOAT_DTYPES:
        raise ValueError(f"expert_logits must be a floating tensor (float32, bfloat16, float16 or float64), "
                         f"got {experts.dtype}")
    if experts.dim() != 3:
        raise ValueError(f"expert_logits must be 3-D [K, N, V] (experts, rows, vocabulary), "
                         f"got shape {tuple(experts.shape)}")
    k, n, v = experts.shape
    if k < 1:
        raise ValueError(f"expert_logits must hold K >= 1 experts, got K={k}")
    return k, n, v


def check_student(student, experts) -> None:
    """The student [N, V] must match the experts [K, N, V] in N, V and device."""
    if not isinstance(student, torch.Tensor):
        raise ValueError(f"student_logits must be a torch.Tensor, got {type(student).__name__}")
    if student.dtype not in FLOAT_DTYPES:
        raise ValueError(f"student_logits must be a floating tensor (float32, bfloat16, float16 or float64), "
                         f"got {student.dtype}")
    if student.dim() != 2 or tuple(student.shape) != tuple(experts.shape[1:]):
        raise ValueError(f"shape mismatch: student_logits {tuple(student.shape)} must be [N, V] = "
                         f"{tuple(experts.shape[1:])} to match expert_logits [K, N, V] = "
                         f"{tuple(experts.shape)}")
    if student.device != experts.device:
        raise ValueError(f"student_logits is on {student.device} but expert_logits is on {experts.device}")


def check_fusion_options(weighting, space, temperature, sharpness) -> tuple[float, float]:
    """Validate weighting/space/temperature/sharpness; returns (temperature, sharpness) as floats."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}; expected one of {', '.join(SPACES)}")
    temperature = _check_number("temperature", temperature, minimum=0.0, exclusive=True)
    sharpness = _check_number("sharpness", sharpness, minimum=0.0, exclusive=True)
    return temperature, sharpness


def normalized_weights(weights, k: int, n: int, device, dtype) -> torch.Tensor | None:
    """Validate ``weights`` ([K] or [N, K]) and normalise each row to sum 1 (see the module
    docstring for what is checked on CUDA tensors); returns ``dtype`` [K] or [N, K], or None."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be a floating tensor of shape [K] or [N, K], got "
                         f"{weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__}")
    rows_ok = weights.dim() == 1 or weights.shape[0] == n
    if weights.dim() not in (1, 2) or weights.shape[-1] != k or not rows_ok:
        raise ValueError(f"weights must have shape [K]=[{k}] or [N, K]=[{n}, {k}] to match expert_logits "
                         f"(K={k} experts, N={n} rows), got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights are on {weights.device} but expert_logits is on {device}")
    w = weights.detach().to(dtype)
    if w.device.type == "cpu":
        if not torch.isfinite(w).all():
            raise ValueError("weights must be finite")
        if (w < 0).any():
            raise ValueError(f"weights must be non-negative, got a minimum of {w.min().item():g}")
        if (w.sum(-1) == 0).any():
            raise ValueError("weights must not be all zero (per row for [N, K] weights): the mixture "
                             "would be undefined")
    else:
        w = torch.where(torch.isfinite(w) & (w >= 0), w, torch.full_like(w, math.nan))
    return (w / w.sum(-1, keepdim=True)).contiguous()


def _kernel_reasons(name: str, experts, others, student=None) -> list[str]:
    reasons = _backends.tensor_device_reasons(name, [experts, student, *others])
    if name == "torch":
        return reasons
    for label, t in (("expert_logits", experts), ("student_logits", student)):
        if t is not None and t.dtype not in KERNEL_DTYPES:
            reasons.append(f"{label} dtype {t.dtype} unsupported (fp32/bf16/fp16)")
    if experts.shape[0] > MAX_KERNEL_EXPERTS:
        reasons.append(f"K={experts.shape[0]} experts; the fused kernels take K <= {MAX_KERNEL_EXPERTS}")
    if name == "cuda" and student is not None and student.dtype != experts.dtype:
        reasons.append(f"needs the same dtype on both sides, got {student.dtype} and {experts.dtype}")
    return reasons


def _primitives(name: str):
    """((kd loss forward, backward), fuse primitive) of a fused backend, imported lazily."""
    if name == "triton":
        from kdengine.kernels.fuse_experts import (  # noqa: PLC0415
            fuse_experts_triton,
            fused_experts_kd_backward_triton,
            fused_experts_kd_forward_triton,
        )

        return (fused_experts_kd_forward_triton, fused_experts_kd_backward_triton), fuse_experts_triton
    if name == "cuda":
        from kdengine.ops._cuda import (  # noqa: PLC0415
            fuse_experts_cuda,
            fused_experts_kd_backward_cuda,
            fused_experts_kd_forward_cuda,
        )

        return (fused_experts_kd_forward_cuda, fused_experts_kd_backward_cuda), fuse_experts_cuda
    raise ValueError(name)


def _chunk_rows(k: int, v: int) -> int:
    return max(1, TORCH_CHUNK_ELEMENTS // max(k * v, 1))


def _rows(x, sl):
    return None if x is None else x[sl]


def _valid_rows(labels, sl, spec):
    """The rows of ``sl`` that count (labels != ignore_index), or None without labels."""
    return None if labels is None else labels[sl] != spec.ignore_index


def _weights_rows(weights, sl):
    """Rows ``sl`` of normalised weights ([K] weights apply to every row)."""
    if weights is None or weights.dim() == 1:
        return weights
    return weights[sl]


def _fused_backward(experts, alpha, log_probs, grad_log_probs, temperature, space):
    """d(Σ g · log p̄)/d experts with α fixed (g = grad_log_probs), chunk by chunk (any backend).

    Logit space, one pass over g and the forward's log p̄, the experts are not read:
        dL/dz_k = α_k (g − p̄ Σ_c g_c) / T
    Prob space (log p̄ = log Σ_k α_k p_k), with ρ_k = p_k / p̄ = exp(log p_k − log p̄) <= 1 / α_k:
        dL/dz_k = α_k (g ρ_k − p_k Σ_c g_c ρ_k,c) / T
    which needs p_k, so it reads the experts once (their log-softmax per chunk).
    """
    k, n, v = experts.shape
    compute = accumulation_dtype(experts, log_probs)
    grad = torch.empty_like(experts, memory_format=torch.contiguous_format)
    step = _chunk_rows(k, v)
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        g = grad_log_probs[sl].to(compute)
        a = alpha[sl].to(compute).t().unsqueeze(-1) / temperature                      # [K, C, 1]
        if space == "logit":
            p_bar = log_probs[sl].to(compute).exp()
            grad[:, sl] = a * (g - p_bar * g.sum(-1, keepdim=True))
        else:
            log_p = torch.log_softmax(experts[:, sl].to(compute) / temperature, dim=-1)
            live = log_p > -math.inf
            rho = torch.where(live, (log_p - log_probs[sl].to(compute)).exp(), 0.0)      # 0 at masked columns
            c_k = (g * rho).sum(-1, keepdim=True)
            grad[:, sl] = torch.where(a > 0, a * (g * rho - log_p.exp() * c_k), 0.0)
    return grad


class FuseExpertsFunction(torch.autograd.Function):
    """fuse_experts on any backend: the forward runs the backend's ``primitive`` (None: torch
    chunks); α and H are constants; the backward is ``_fused_backward``'s closed form (from the saved
    log-probs: one pass in logit space)."""

    @staticmethod
    def forward(ctx, experts, weights, temperature, weighting, space, sharpness, primitive):
        if primitive is None:
            outputs = _fuse_torch(experts, weights, temperature, weighting, space, sharpness)
        else:
            outputs = primitive(experts, temperature, weighting, space, sharpness, weights)
        log_probs, alpha, entropy = outputs
        ctx.temperature, ctx.space = temperature, space
        ctx.save_for_backward(experts, alpha, log_probs)
        ctx.mark_non_differentiable(alpha, entropy)
        return log_probs, alpha, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_alpha, _grad_entropy):
        experts, alpha, log_probs = ctx.saved_tensors
        grad = _fused_backward(experts, alpha, log_probs, grad_log_probs, ctx.temperature, ctx.space)
        return grad, None, None, None, None, None, None


def _fuse_torch(experts, weights, temperature, weighting, space, sharpness):
    k, n, v = experts.shape
    compute = accumulation_dtype(experts)
    log_probs = torch.empty((n, v), dtype=compute, device=experts.device)
    alpha = torch.empty((n, k), dtype=compute, device=experts.device)
    entropy = torch.empty((n, k), dtype=compute, device=experts.device)
    step = _chunk_rows(k, v)
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        log_probs[sl], alpha[sl], entropy[sl] = fuse_experts_reference(
            experts[:, sl].detach().to(compute), weighting=weighting, space=space, temperature=temperature,
            sharpness=sharpness, weights=_weights_rows(weights, sl))
    return log_probs, alpha, entropy


def fuse_experts(expert_logits: torch.Tensor, *, weighting: str = "entropy", space: str = "logit",
                 temperature: float = 1.0, sharpness: float = 1.0, weights: torch.Tensor | None = None,
                 backend: str | None = "auto"):
    """Uncertainty-weighted fusion of K experts' logits into one teacher distribution.

    Args:
        expert_logits: [K, N, V] float32/bfloat16/float16 (float64: torch backend only), K >= 1
            (the fused kernels take K <= 16). Gets a gradient through the log-probs when it requires
            grad (α and H are constants).
        weighting: ``uniform`` (α_k = 1/K), ``entropy`` (α = softmax_k(−H_k / sharpness)) or
            ``confidence`` (α_k ∝ max_c p_k,c).
        space: ``logit`` (log_softmax(Σ α_k z_k / T), a product of experts) or ``prob``
            (log Σ α_k softmax(z_k / T), a mixture).
        temperature: T > 0 of every p_k = softmax(z_k / T).
        sharpness: > 0, the temperature of the entropy weighting.
        weights: [K] (fixed mixture) or [N, K] (per row, e.g. a selector's probabilities),
            non-negative, normalised here; overrides ``weighting``. See the module docstring for
            what is checked on CUDA tensors.
        backend: ``auto`` | ``cuda`` | ``triton`` | ``torch``; ``KDENGINE_BACKEND`` overrides.

    Returns:
        (log_probs [N, V], alpha [N, K], entropy [N, K]), fp32 (float64 when the logits are).
        Columns that are −inf in the experts stay −inf; a row with a NaN or +inf logit in any
        expert has NaN log-probs.
    """
    k, n, v = check_expert_logits(expert_logits)
    temperature, sharpness = check_fusion_options(weighting, space, temperature, sharpness)
    weights = normalized_weights(weights, k, n, expert_logits.device, accumulation_dtype(expert_logits))
    name = _backends.select("fuse_experts", backend, lambda b: _kernel_reasons(b, expert_logits, [weights]))
    primitive = None if name == "torch" else _primitives(name)[1]
    return FuseExpertsFunction.apply(expert_logits, weights, temperature, weighting, space, sharpness,
                                     primitive)


class FusedExpertsKDLossTorchFunction(torch.autograd.Function):
    """fused_experts_kd_loss on the torch backend: forward keeps row losses and α; backward
    recomputes each chunk with autograd (α fixed)."""

    @staticmethod
    def forward(ctx, student, experts, labels, row_weights, grad_scale, spec, reduction, fusion, weights):
        weighting, space, sharpness = fusion
        k, n, v = experts.shape
        compute = accumulation_dtype(student, experts)
        row_loss = torch.empty(n, dtype=compute, device=student.device)
        alpha = torch.empty((n, k), dtype=compute, device=student.device)
        step = _chunk_rows(k + 1, v)
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            log_probs, alpha[sl], _ = fuse_experts_reference(
                zero_ignored_rows(experts[:, sl].to(compute), _valid_rows(labels, sl, spec)), weighting=weighting, space=space, temperature=spec.temperature,
                sharpness=sharpness, weights=_weights_rows(weights, sl))
            row_loss[sl] = kd_loss_rows(student[sl].to(compute), spec.temperature * log_probs,
                                        _rows(labels, sl), _rows(row_weights, sl), experts=experts[:, sl],
                                        **spec.rows_kwargs())
        ctx.spec, ctx.reduction, ctx.space = spec, reduction, space
        ctx.save_for_backward(student, experts, labels, row_weights, grad_scale, alpha)
        return row_loss if reduction == "none" else row_loss.sum() * grad_scale

    @staticmethod
    def backward(ctx, grad_output):
        student, experts, labels, row_weights, grad_scale, alpha = ctx.saved_tensors
        need_s, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        k, n, v = experts.shape
        compute = accumulation_dtype(student, experts)
        grad_s = torch.empty_like(student, memory_format=torch.contiguous_format) if need_s else None
        grad_e = torch.empty_like(experts, memory_format=torch.contiguous_format) if need_e else None
        step = _chunk_rows(k + 1, v)
        t = ctx.spec.temperature
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            s = student[sl].detach().to(compute).requires_grad_(need_s)
            z = experts[:, sl].detach().to(compute).requires_grad_(need_e)
            with torch.enable_grad():
                kept = zero_ignored_rows(z, _valid_rows(labels, sl, ctx.spec))
                teacher = t * fused_log_probs(kept, alpha[sl], temperature=t, space=ctx.space)
                rows = kd_loss_rows(s, teacher, _rows(labels, sl), _rows(row_weights, sl), experts=z,
                                    **ctx.spec.rows_kwargs())
                if ctx.reduction == "none":
                    weight = grad_output[sl]
                else:
                    weight = (grad_output * grad_scale).expand_as(rows)
                grads = list(torch.autograd.grad(rows, [x for x in (s, z) if x.requires_grad],
                                                 grad_outputs=weight.to(rows.dtype)))
            if need_s:
                grad_s[sl] = grads.pop(0)
            if need_e:
                grad_e[:, sl] = grads.pop(0)
        return grad_s, grad_e, None, None, None, None, None, None, None


class FusedExpertsKDLossFunction(torch.autograd.Function):
    """Fused backends, recompute-in-backward: the forward keeps the logits (saved, not copied), α and fp32 row
    statistics; the backward re-reads the logits and writes each gradient once, already scaled by
    grad_output (fp32, one rounding). Nothing [N, V] or [K, N, V] lives between the two."""

    @staticmethod
    def forward(ctx, student, experts, labels, row_weights, grad_scale, spec, reduction, fusion, weights, kernels):
        forward, ctx.backward_kernel = kernels
        weighting, space, sharpness = fusion
        row_loss, alpha, _, stats = forward(student, experts, labels, row_weights, spec, weighting, space,
                                            sharpness, weights)
        ctx.spec, ctx.reduction, ctx.space = spec, reduction, space
        ctx.save_for_backward(student, experts, labels, row_weights, grad_scale, alpha, stats)
        if reduction == "none":
            return row_loss
        return row_loss.sum() * grad_scale

    @staticmethod
    def backward(ctx, grad_output):
        student, experts, labels, row_weights, grad_scale, alpha, stats = ctx.saved_tensors
        scale = grad_output if ctx.reduction == "none" else grad_output * grad_scale
        grad_s, grad_e = ctx.backward_kernel(student, experts, labels, row_weights, alpha, stats, scale.float(),
                                             ctx.spec, ctx.space, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_s, grad_e, None, None, None, None, None, None, None, None


def fused_experts_kd_loss(student_logits: torch.Tensor, expert_logits: torch.Tensor, *,
                          weighting: str = "entropy", space: str = "logit", temperature: float = 1.0,
                          sharpness: float = 1.0, weights: torch.Tensor | None = None,
                          divergence: str = "forward_kl", t2_scale: bool = True, jsd_beta: float = 0.5,
                          labels: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                          kd_weight: float = 1.0, hard_weight: float = 0.0,
                          row_weights: torch.Tensor | None = None, reduction: str = "batchmean",
                          normalizer=None, backend: str | None = "auto") -> torch.Tensor:
    """Distillation loss against the fusion of K experts, without materialising the fusion.

    Equals ``kd_loss(student_logits, T · fuse_experts(expert_logits, ...)[0], temperature=T, ...)``
    with the same options (see :func:`fuse_experts` for weighting/space/sharpness/weights and
    :func:`kdengine.ops.kd_loss.kd_loss` for the loss options), but the fused backends never build
    the fused distribution nor any [K, N, V] fp32 tensor, and the torch backend works on chunks of
    rows.

    Args:
        student_logits: [N, V] float32/bfloat16/float16 (float64: torch backend only).
        expert_logits: [K, N, V], same N and V. Gets a gradient when it requires grad: in logit
            space dL/dz_k = α_k · dL/dz̄; in prob space through each p_k (α is a constant).

    Returns:
        fp32 scalar, or fp32 [N] with ``reduction="none"`` (float64 when an input is float64). A NaN
        or +inf logit in the student or in any expert (α_k = 0 included) makes the row's loss and
        gradients NaN, as in ``kd_loss``.
    """
    k, n, v = check_expert_logits(expert_logits)
    check_student(student_logits, expert_logits)
    temperature, sharpness = check_fusion_options(weighting, space, temperature, sharpness)
    spec = make_spec(divergence=divergence, temperature=temperature, t2_scale=t2_scale, jsd_beta=jsd_beta,
                     ignore_index=ignore_index, kd_weight=kd_weight, hard_weight=hard_weight)
    labels, row_weights = check_row_args(n, student_logits.device, labels, row_weights, reduction, normalizer,
                                         spec)
    compute = accumulation_dtype(student_logits, expert_logits)
    weights = normalized_weights(weights, k, n, expert_logits.device, compute)
    name = _backends.select("fused_experts_kd_loss", backend,
                            lambda b: _kernel_reasons(b, expert_logits, [labels, row_weights, weights],
                                                      student_logits))
    grad_scale = grad_scale_for(reduction, normalizer, labels, spec, n, v, student_logits.device, compute)
    fusion = (weighting, space, sharpness)
    if name == "torch":
        return FusedExpertsKDLossTorchFunction.apply(student_logits, expert_logits, labels, row_weights,
                                                     grad_scale, spec, reduction, fusion, weights)
    return FusedExpertsKDLossFunction.apply(student_logits, expert_logits, labels, row_weights, grad_scale, spec,
                                            reduction, fusion, weights, _primitives(name)[0])
