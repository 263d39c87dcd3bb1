"""Reference math of the distillation loss (``kdengine.ops.kd_loss``), row by row.

Per row, with p = softmax(teacher / T) and q = softmax(student / T):

    forward_kl  Σ p (log p − log q)            reverse_kl  Σ q (log q − log p)
    soft_ce     −Σ p log q                     tvd         ½ Σ |p − q|
    jsd         β KL(p‖m) + (1−β) KL(q‖m),  m = β p + (1−β) q   (β=0: forward_kl, β=1: reverse_kl,
                exactly as TRL's generalized_jsd_loss)
    mse         mean over V of (student − teacher)² on raw logits (T and t2_scale ignored);
                columns where either logit is −inf contribute 0

    row loss = row_weight · [kd_weight · (T² if t2_scale) · D + hard_weight · CE(student at T=1, label)]

Rows whose label equals ``ignore_index`` contribute 0. With ``hard_weight != 0`` a label outside
[0, V) that is not ``ignore_index`` makes that row's loss and student gradient NaN. Terms weighted
by a zero probability (−inf logits: a masked or padded vocabulary) contribute 0 (0·log 0 = 0),
with finite gradients. Only −inf means masked: a NaN or +inf logit anywhere in a row (student or
teacher) makes that row's loss and all its gradients NaN, so a broken teacher is never hidden as
a masked column (rows whose label is ``ignore_index`` still contribute exactly 0).
Memory: several [N, V] temporaries; this is the oracle, not the fast path.
"""

from __future__ import annotations

import math

import torch

from kdengine.constants import IGNORE_INDEX

DIVERGENCES = ("forward_kl", "reverse_kl", "soft_ce", "jsd", "tvd", "mse")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def effective_divergence(divergence: str, jsd_beta: float) -> str:
    """TRL's endpoints: generalized JSD with β=0 is forward KL and with β=1 reverse KL."""
    if divergence == "jsd" and jsd_beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and jsd_beta == 1.0:
        return "reverse_kl"
    return divergence


def _all_finite(*tensors: torch.Tensor) -> bool:
    """True when no value is −inf (a masked column) or NaN, so the masking below can be skipped.

    One reduction per tensor (``isfinite`` costs four elementwise passes); a host sync on GPU.
    Logits and log-probabilities are never +inf here (+inf logits give NaN log-probs).
    """
    return all(bool(t.amin() > -math.inf) for t in tensors)


def _weighted_log_ratio(log_w: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
    """Σ_v w_v (log w_v − log other_v) with w = exp(log_w); columns where w = 0 contribute 0.

    The masked columns are replaced by zeros *before* the product so that no NaN reaches
    either the value or the gradient (the usual torch.where double-branch trap). Rows with no
    masked column (the common case) take the plain formula: same values, a third of the ops.
    """
    if _all_finite(log_w, log_other):
        return (log_w.exp() * (log_w - log_other)).sum(-1)
    keep = log_w > -math.inf
    safe_w = torch.where(keep, log_w, torch.zeros_like(log_w))
    safe_o = torch.where(keep, log_other, torch.zeros_like(log_other))
    terms = torch.where(keep, safe_w.exp() * (safe_w - safe_o), torch.zeros_like(log_w))
    return terms.sum(-1)


def _tvd_centered(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g − Σ_v w_v g_v per row for a distribution w and g = ½ sign(p − q), from the sums of w split
    by the sign of g (W₊, W₋, W₀): W₋ + W₀/2 where g = ½, −(W₊ + W₀/2) where g = −½, (W₋ − W₊)/2
    where g = 0. Positive terms only: in a peaked row g − Σ w g is ~1e-6 and the plain difference
    of two O(1) numbers loses it."""
    plus = torch.where(g > 0, w, 0.0).sum(-1, keepdim=True)
    minus = torch.where(g < 0, w, 0.0).sum(-1, keepdim=True)
    zero = torch.where(g == 0, w, 0.0).sum(-1, keepdim=True)
    return torch.where(g > 0, minus + 0.5 * zero, torch.where(g < 0, -(plus + 0.5 * zero), 0.5 * (minus - plus)))


class TVDRows(torch.autograd.Function):
    """½ Σ |p − q| per row, p = softmax(u_t), q = softmax(u_s), exact in the inputs' dtype.

    Σ p = Σ q makes the two sides of the sum equal: D = Σ_{p>q} (p − q) = Σ_{p<q} (q − p). The side
    with the smaller mass (Σ_{p>q} p vs Σ_{p<q} q) is summed, so a peaked column's 1 − 1 never
    enters D. Gradients (w.r.t. u, through the softmax): dD/du_s = −q (g − Σ q g) and
    dD/du_t = p (g − Σ p g), g = ½ sign(p − q), each from sums split by the sign of g
    (:func:`_tvd_centered`). The fused kernels use the same algebra.
    """

    @staticmethod
    def forward(ctx, u_t, u_s):
        log_p = torch.log_softmax(u_t, dim=-1)
        log_q = torch.log_softmax(u_s, dim=-1)
        p, q = log_p.exp(), log_q.exp()
        g = 0.5 * ((log_p > log_q).to(p.dtype) - (log_p < log_q).to(p.dtype))
        d_plus = torch.where(g > 0, p - q, 0.0).sum(-1)
        d_minus = torch.where(g < 0, q - p, 0.0).sum(-1)
        p_plus = torch.where(g > 0, p, 0.0).sum(-1)
        q_minus = torch.where(g < 0, q, 0.0).sum(-1)
        ctx.save_for_backward(p, q, g)
        return torch.where(p_plus <= q_minus, d_plus, d_minus)

    @staticmethod
    def backward(ctx, grad):
        p, q, g = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        return grad * p * _tvd_centered(g, p), -grad * q * _tvd_centered(g, q)


def divergence_rows(student: torch.Tensor, teacher: torch.Tensor, *, divergence: str,
                    temperature: float = 1.0, jsd_beta: float = 0.5) -> torch.Tensor:
    """D per row, [N, V] × [N, V] -> [N], computed in the inputs' dtype (use float64 for truth)."""
    divergence = effective_divergence(divergence, jsd_beta)
    if divergence == "mse":
        if _all_finite(student, teacher):
            return (student - teacher).pow(2).sum(-1) / student.shape[-1]
        finite = torch.isfinite(student) & torch.isfinite(teacher)
        diff = torch.where(finite, student - teacher, torch.zeros_like(student))
        return diff.pow(2).sum(-1) / student.shape[-1]
    log_q = torch.log_softmax(student / temperature, dim=-1)
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    if divergence == "forward_kl":
        return _weighted_log_ratio(log_p, log_q)
    if divergence == "reverse_kl":
        return _weighted_log_ratio(log_q, log_p)
    if divergence == "soft_ce":
        return _weighted_log_ratio(log_p, log_q) - _weighted_log_ratio(log_p, torch.zeros_like(log_p))
    if divergence == "tvd":
        return TVDRows.apply(teacher / temperature, student / temperature)
    if divergence == "jsd":
        beta = jsd_beta
        # log m = log(β p + (1−β) q); columns where both are 0 stay −inf without NaN gradients.
        if _all_finite(log_p, log_q):
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
            return beta * _weighted_log_ratio(log_p, log_m) + (1.0 - beta) * _weighted_log_ratio(log_q, log_m)
        either = (log_p > -math.inf) | (log_q > -math.inf)
        safe_p = torch.where(either, log_p, torch.zeros_like(log_p))
        safe_q = torch.where(either, log_q, torch.zeros_like(log_q))
        mixed = torch.logaddexp(safe_p + math.log(beta), safe_q + math.log1p(-beta))
        log_m = torch.where(either, mixed, torch.full_like(mixed, -math.inf))
        return beta * _weighted_log_ratio(log_p, log_m) + (1.0 - beta) * _weighted_log_ratio(log_q, log_m)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")


def kd_loss_rows(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None,
                 row_weights: torch.Tensor | None = None, *, divergence: str = "forward_kl",
                 temperature: float = 1.0, t2_scale: bool = True, jsd_beta: float = 0.5,
                 ignore_index: int = IGNORE_INDEX, kd_weight: float = 1.0, hard_weight: float = 0.0,
                 experts: torch.Tensor | None = None) -> torch.Tensor:
    """Row losses [N] (before reduction) in the dtype of the inputs; differentiable by autograd.

    ``experts``: the [K, N, V] logits a fused teacher was made of; a NaN or +inf in them makes the
    row NaN too (as one in the student or teacher does), also where α_k = 0 dropped the expert.
    """
    valid = None if labels is None else labels != ignore_index
    poison = nonfinite_poison(student, teacher, *(() if experts is None else (experts,)), rows=valid)
    student, teacher = zero_ignored_rows(student, valid), zero_ignored_rows(teacher, valid)
    d = divergence_rows(student, teacher, divergence=divergence, temperature=temperature, jsd_beta=jsd_beta)
    scale = kd_weight
    if t2_scale and effective_divergence(divergence, jsd_beta) != "mse":
        scale = kd_weight * temperature * temperature
    loss = scale * d
    if labels is not None:
        if hard_weight != 0.0:
            log_q1 = torch.log_softmax(student, dim=-1)
            in_range = (labels >= 0) & (labels < student.shape[-1])
            target = torch.where(valid & in_range, labels, torch.zeros_like(labels)).long()
            ce = -log_q1.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            # A label outside [0, V) that is not ignore_index: the row's loss and its student
            # gradient are NaN (every backend does the same; checking values would sync the host).
            ce = ce * torch.where(in_range | ~valid, 1.0, math.nan).to(ce.dtype)
            loss = loss + hard_weight * ce
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    loss = loss + poison
    if row_weights is not None:
        loss = loss * row_weights.to(loss.dtype)
    return loss


def nonfinite_poison(*logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[N] term per row: NaN where any of the [..., N, V] ``logits`` holds a NaN or +inf, else 0.

    Added to a row loss it makes the loss and the gradient of every logit of the row NaN, whatever
    the column masks hid (``x > −inf`` is False for NaN, so a NaN column would otherwise read as
    masked); other rows get exactly 0 and no gradient. ``rows`` (bool [N]) limits it to those rows
    (ignored rows stay exactly 0). Leading dimensions (the experts of a [K, N, V] tensor) are
    folded in.
    """
    n_rows = logits[0].shape[-2]
    # The common case in one reduction per tensor (a host sync, as _all_finite): max is NaN or +inf
    # exactly when some value is.
    if all(x.numel() == 0 or bool(x.amax() < math.inf) for x in logits):
        return torch.zeros(n_rows, dtype=logits[0].dtype, device=logits[0].device)
    bad = None  # [N, 1]: the row holds a NaN or +inf in any input
    for x in logits:
        row_bad = (torch.isnan(x) | (x == math.inf)).any(-1, keepdim=True)
        while row_bad.dim() > 2:
            row_bad = row_bad.any(0)
        bad = row_bad if bad is None else bad | row_bad
    if rows is not None:
        bad = bad & rows.unsqueeze(-1)
    total = 0.0
    for x in logits:
        # Both factors are zero on good rows, value and gradient (x · NaN in a where would send
        # NaN · 0 = NaN back to them).
        nan = torch.where(bad, math.nan, 0.0).to(x.dtype)
        term = (torch.where(bad, x, torch.zeros_like(x)) * nan).sum(-1)
        while term.dim() > 1:
            term = term.sum(0)
        total = total + term
    return total


def zero_ignored_rows(logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """[..., N, V] logits with the rows where ``valid`` [N] is False replaced by zeros (gradient 0).

    An ignored row contributes exactly 0 and no gradient whatever it holds: masking its loss alone
    would send 0 · NaN = NaN back through the math of a NaN row. Nothing to do (no copy) when every
    row is valid, the common case (a host sync, as :func:`_all_finite`).
    """
    if valid is None or bool(valid.all()):
        return logits
    return torch.where(valid.unsqueeze(-1), logits, torch.zeros_like(logits))


def reduce_rows(row_loss: torch.Tensor, *, reduction: str, n_valid, vocab_size: int, normalizer=None):
    """Apply a reduction to row losses; ``n_valid`` may be an int or a 0-d tensor."""
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if normalizer is not None:
        return total / normalizer
    if reduction == "sum":
        return total
    n = torch.as_tensor(n_valid, dtype=total.dtype, device=total.device).clamp_min(1)
    if reduction == "batchmean":
        return total / n
    if reduction == "mean":
        return total / (n * vocab_size)
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def kd_loss_reference(student: torch.Tensor, teacher: torch.Tensor, *, divergence: str = "forward_kl",
                      temperature: float = 1.0, t2_scale: bool = True, jsd_beta: float = 0.5,
                      labels: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX, kd_weight: float = 1.0,
                      hard_weight: float = 0.0, row_weights: torch.Tensor | None = None,
                      reduction: str = "batchmean", normalizer=None, experts: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Unfused, unchunked ``kd_loss`` with the same options: the oracle for every backend
    (``experts``: as :func:`kd_loss_rows`)."""
    rows = kd_loss_rows(student, teacher, labels, row_weights, divergence=divergence, temperature=temperature,
                        t2_scale=t2_scale, jsd_beta=jsd_beta, ignore_index=ignore_index,
                        kd_weight=kd_weight, hard_weight=hard_weight, experts=experts)
    n_valid = student.shape[0] if labels is None else (labels != ignore_index).sum()
    return reduce_rows(rows, reduction=reduction, n_valid=n_valid, vocab_size=student.shape[-1],
                       normalizer=normalizer)
