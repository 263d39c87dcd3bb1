"""Reference math of the sparse (top-k teacher) distillation loss (``kdengine.ops.sparse_kd_loss``).

The teacher is known only on k columns per row: ``teacher_topk_logprobs`` [N, k] = log p at those
columns, p = softmax(teacher / T) (cached at the run's temperature), and ``teacher_topk_indices``
[N, k]. The student is q = softmax(student / T) over all V columns. With P = Σ_k p, Q = Σ_k q:

    tail="bucket"       D over k + 1 outcomes: (p_1 .. p_k, 1 − P) against (q_1 .. q_k, 1 − Q);
                        the teacher's remaining mass is matched against the student's mass
                        outside the k columns. Both tail masses are clamped to at least TAIL_FLOOR.
    tail="renormalize"  D over the k columns of p / P and q / Q (both renormalised): the tail
                        is dropped and the student's mass outside the k columns is unconstrained.
    tail="ignore"       Σ over the k columns of D's per-column terms with p as given and the full
                        q (DistillKit's truncated soft cross-entropy / KL): forward_kl p (a − b),
                        reverse_kl q (b − a), soft_ce −p b with a = log p, b = log q. jsd and tvd
                        have no per-column truncation (use bucket or renormalize).

bucket and renormalize take every kd_loss divergence but mse, which needs the raw teacher logits a
top-k cache does not hold. A clamped bucket leaves the slots summing to 1 + O(TAIL_FLOOR); the
reference renormalises them (kd_loss's log_softmax), the Triton kernel does not: they differ by
O(TAIL_FLOOR).

    row loss = row_weight · [kd_weight · (T² if t2_scale) · D + hard_weight · CE(student at T=1, label)]

Rows whose label is ``ignore_index`` contribute 0 whatever they hold. A row is NaN (loss and
student gradient) when its student logits hold a NaN or +inf, its log-probs a NaN or +inf, or its
indices one outside [0, V) or a repeated column. Memory: [N, V] temporaries; the oracle.
"""

from __future__ import annotations

import math

import torch

from kdengine.constants import IGNORE_INDEX
from kdengine.reference.kd_loss import (
    _weighted_log_ratio,
    divergence_rows,
    effective_divergence,
    kd_loss_rows,
    reduce_rows,
    zero_ignored_rows,
)

SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl", "soft_ce", "jsd", "tvd")
TAILS = ("bucket", "renormalize", "ignore")
IGNORE_DIVERGENCES = ("forward_kl", "reverse_kl", "soft_ce")  # the divergences tail="ignore" can truncate
# Smallest tail mass of tail="bucket" (either side): below it 1 − Σ_k p is fp32 rounding, and a
# zero tail on one side against rounding noise on the other would make D infinite.
TAIL_FLOOR = 2.0**-20


def check_tail(tail: str, divergence: str, jsd_beta: float) -> str:
    """The divergence computed (jsd at β = 0 / 1 is forward / reverse KL); ValueError for an unknown
    tail or divergence, or one that tail="ignore" cannot truncate."""
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; expected one of {', '.join(TAILS)}")
    if divergence not in SPARSE_DIVERGENCES:
        raise ValueError(f"divergence {divergence!r} is not available from top-k log-probs; expected one of "
                         f"{', '.join(SPARSE_DIVERGENCES)} (mse needs the teacher's raw logits)")
    kind = effective_divergence(divergence, jsd_beta)
    if tail == "ignore" and kind not in IGNORE_DIVERGENCES:
        raise ValueError(f"tail='ignore' sums the k columns' terms of {', '.join(IGNORE_DIVERGENCES)}; "
                         f"{divergence} needs tail='bucket' or 'renormalize'")
    return kind


def slot_divergence(log_q: torch.Tensor, log_p: torch.Tensor, *, tail: str, divergence: str,
                    jsd_beta: float = 0.5) -> torch.Tensor:
    """D per row from the log-probabilities [N, C] of :func:`sparse_slots`. bucket and renormalize
    compare two distributions over the slots (kd_loss's :func:`divergence_rows` at T=1, whose
    log_softmax leaves normalised slots as they are); ignore sums the per-column terms of
    forward_kl, reverse_kl or soft_ce over k columns that do not sum to 1."""
    if tail != "ignore":
        return divergence_rows(log_q, log_p, divergence=divergence, jsd_beta=jsd_beta)
    kind = check_tail(tail, divergence, jsd_beta)
    if kind == "reverse_kl":
        return _weighted_log_ratio(log_q, log_p)
    d = _weighted_log_ratio(log_p, log_q)
    return d if kind == "forward_kl" else d - _weighted_log_ratio(log_p, torch.zeros_like(log_p))


def broken_rows(student: torch.Tensor, teacher_logprobs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """bool [N]: a NaN or +inf logit or log-prob, an index outside [0, V) or a repeated column."""
    nonfinite = [(torch.isnan(x) | (x == math.inf)).any(-1) for x in (student, teacher_logprobs)]
    out_of_range = ((indices < 0) | (indices >= student.shape[-1])).any(-1)
    ordered = indices.sort(-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(-1)
    return nonfinite[0] | nonfinite[1] | out_of_range | repeated


def sparse_slots(student: torch.Tensor, teacher_logprobs: torch.Tensor, indices: torch.Tensor, *, tail: str,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q, log p) of the outcomes D compares, [N, k + 1] for bucket (tail last), else [N, k]."""
    log_q_full = torch.log_softmax(student / temperature, dim=-1)
    safe = indices.clamp(0, max(student.shape[-1] - 1, 0)).long()
    if tail == "renormalize":
        u = (student / temperature).gather(-1, safe)
        return torch.log_softmax(u, dim=-1), torch.log_softmax(teacher_logprobs, dim=-1)
    log_q = log_q_full.gather(-1, safe)
    if tail == "ignore":
        return log_q, teacher_logprobs
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, safe, False)
    q_tail = torch.where(outside, log_q_full.exp(), 0.0).sum(-1, keepdim=True).clamp_min(TAIL_FLOOR)
    p_tail = (1.0 - teacher_logprobs.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)
    return torch.cat([log_q, q_tail.log()], -1), torch.cat([teacher_logprobs, p_tail.log()], -1)


def sparse_kd_loss_rows(student: torch.Tensor, teacher_logprobs: torch.Tensor, indices: torch.Tensor,
                        labels: torch.Tensor | None = None, row_weights: torch.Tensor | None = None, *,
                        tail: str = "bucket", divergence: str = "forward_kl", temperature: float = 1.0,
                        t2_scale: bool = True, jsd_beta: float = 0.5, ignore_index: int = IGNORE_INDEX,
                        kd_weight: float = 1.0, hard_weight: float = 0.0) -> torch.Tensor:
    """Row losses [N] (before reduction) in the dtype of the inputs; differentiable by autograd."""
    valid = None if labels is None else labels != ignore_index
    bad = broken_rows(student, teacher_logprobs, indices)
    if valid is not None:
        bad = bad & valid
    # NaN in the loss and in every student gradient of a broken row; exactly 0 (value and gradient)
    # elsewhere.
    nan = torch.where(bad, math.nan, 0.0).to(student.dtype).unsqueeze(-1)
    poison = (torch.where(bad.unsqueeze(-1), student, torch.zeros_like(student)) * nan).sum(-1)
    student = zero_ignored_rows(student, valid)
    teacher_logprobs = zero_ignored_rows(teacher_logprobs, valid)
    log_q, log_p = sparse_slots(student, teacher_logprobs, indices, tail=tail, temperature=temperature)
    d = slot_divergence(log_q, log_p, tail=tail, divergence=divergence, jsd_beta=jsd_beta)
    loss = (kd_weight * temperature * temperature if t2_scale else kd_weight) * d
    if labels is not None:
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        if hard_weight != 0.0:
            # kd_loss's hard-label term (its divergence weighted 0): hard_weight · CE at T=1, 0 on ignored
            # rows, NaN for a label outside [0, V)
            loss = loss + kd_loss_rows(student, student.detach(), labels, divergence="mse", kd_weight=0.0,
                                       hard_weight=hard_weight, ignore_index=ignore_index)
    loss = loss + poison
    if row_weights is not None:
        loss = loss * row_weights.to(loss.dtype)
    return loss


def sparse_kd_loss_reference(student: torch.Tensor, teacher_logprobs: torch.Tensor, indices: torch.Tensor, *,
                             tail: str = "bucket", divergence: str = "forward_kl", temperature: float = 1.0,
                             t2_scale: bool = True, jsd_beta: float = 0.5, labels: torch.Tensor | None = None,
                             ignore_index: int = IGNORE_INDEX, kd_weight: float = 1.0, hard_weight: float = 0.0,
                             row_weights: torch.Tensor | None = None, reduction: str = "batchmean",
                             normalizer=None) -> torch.Tensor:
    """Unfused ``sparse_kd_loss`` with the same options: the oracle for every backend."""
    rows = sparse_kd_loss_rows(student, teacher_logprobs, indices, labels, row_weights, tail=tail,
                               divergence=divergence, temperature=temperature, t2_scale=t2_scale,
                               jsd_beta=jsd_beta, ignore_index=ignore_index, kd_weight=kd_weight,
                               hard_weight=hard_weight)
    n_valid = student.shape[0] if labels is None else (labels != ignore_index).sum()
    return reduce_rows(rows, reduction=reduction, n_valid=n_valid, vocab_size=student.shape[-1],
                       normalizer=normalizer)
