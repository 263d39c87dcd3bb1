"""Reference math of the K-expert fusion (``kdengine.ops.fuse_experts``), unfused.

Per row, for experts k = 1..K with logits z_k and temperature T:

    p_k = softmax(z_k / T)        H_k = −Σ_c p_k,c log p_k,c   (natural log; 0·log 0 = 0)

Mixture weights α [N, K] (constants: no gradient flows through them):

    uniform     α_k = 1 / K
    entropy     α = softmax_k(−H_k / sharpness)          (confident experts count more)
    confidence  α_k ∝ max_c p_k,c, normalised over k
    weights     a given [K] (fixed mixture) or [N, K] tensor (e.g. a selector's probabilities),
                normalised to sum 1 per row; overrides ``weighting``

Fused teacher log-probabilities:

    space="logit"   log_softmax(z̄ / T),  z̄ = Σ_k α_k z_k   (a product of experts)
    space="prob"    log Σ_k α_k p_k                          (a mixture of experts)

``fused_experts_kd_loss_reference(s, z, temperature=T, ...)`` is exactly
``kd_loss_reference(s, T · fused_log_probs, temperature=T, ...)``: the fused teacher, written as
logits whose temperature softmax gives back the fused distribution.

Columns masked with −inf (the same columns in every expert) stay −inf and give no NaN in values
or gradients. A NaN or +inf logit in any expert of a row makes that row's fused log-probs (and so
its loss and gradients) NaN. Memory: several [K, N, V] temporaries; this is the oracle, not the fast path.
"""

from __future__ import annotations

import math

import torch

from kdengine.constants import IGNORE_INDEX
from kdengine.reference.kd_loss import kd_loss_reference, nonfinite_poison, zero_ignored_rows

WEIGHTINGS = ("uniform", "entropy", "confidence")
SPACES = ("logit", "prob")


def expert_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """H_k per row: [K, N, V] log-probabilities -> [N, K]; −inf columns contribute 0."""
    keep = log_p > -math.inf
    safe = torch.where(keep, log_p, torch.zeros_like(log_p))
    return -(safe.exp() * safe).sum(-1).transpose(0, 1)


def mixture_weights(log_p: torch.Tensor, entropy: torch.Tensor, *, weighting: str = "entropy",
                    sharpness: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """α [N, K] (detached) from the experts' log-probabilities [K, N, V] and entropies [N, K].

    ``weights`` ([K] or [N, K], non-negative, no all-zero row) overrides ``weighting``; it is only
    normalised here (the public ops validate it).
    """
    n = log_p.shape[1]
    if weights is not None:
        w = weights.detach().to(log_p.dtype).expand(n, log_p.shape[0])
        return w / w.sum(-1, keepdim=True)
    if weighting == "uniform":
        return torch.full_like(entropy, 1.0 / log_p.shape[0]).detach()
    if weighting == "entropy":
        return torch.softmax(-entropy.detach() / sharpness, dim=-1)
    if weighting == "confidence":
        top = log_p.detach().amax(-1).exp().transpose(0, 1)
        return top / top.sum(-1, keepdim=True)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


def fused_log_probs(expert_logits: torch.Tensor, alpha: torch.Tensor, *, temperature: float = 1.0,
                    space: str = "logit") -> torch.Tensor:
    """Fused teacher log-probabilities [N, V] from [K, N, V] logits and α [N, K]; differentiable
    in the logits (α is used as given)."""
    a = alpha.transpose(0, 1).unsqueeze(-1).to(expert_logits.dtype)  # [K, N, 1]
    if space == "logit":
        # α_k = 0 must drop expert k even at −inf columns (0 · −inf would be NaN).
        terms = torch.where(a > 0, a * expert_logits, torch.zeros_like(expert_logits))
        return torch.log_softmax(terms.sum(0) / temperature, dim=-1)
    if space == "prob":
        log_p = torch.log_softmax(expert_logits / temperature, dim=-1)
        terms = log_p + a.log()
        # log Σ_k exp(terms); columns where every term is −inf stay −inf with zero gradient.
        live = (terms > -math.inf).any(0)
        safe = torch.where(live, terms, torch.zeros_like(terms))
        masked = torch.full_like(live, -math.inf, dtype=terms.dtype)
        return torch.where(live, torch.logsumexp(safe, dim=0), masked)
    raise ValueError(f"unknown space {space!r}; expected one of {', '.join(SPACES)}")


def fuse_experts_reference(expert_logits: torch.Tensor, *, weighting: str = "entropy", space: str = "logit",
                           temperature: float = 1.0, sharpness: float = 1.0,
                           weights: torch.Tensor | None = None):
    """(fused log-probs [N, V], α [N, K], H [N, K]) in the logits' dtype; α and H are detached."""
    log_p = torch.log_softmax(expert_logits / temperature, dim=-1)
    entropy = expert_entropy(log_p.detach())
    alpha = mixture_weights(log_p, entropy, weighting=weighting, sharpness=sharpness, weights=weights)
    # A NaN or +inf logit in any expert of a row (α_k = 0 included) makes its log-probs NaN.
    poison = nonfinite_poison(expert_logits).detach().unsqueeze(-1)
    return fused_log_probs(expert_logits, alpha, temperature=temperature, space=space) + poison, alpha, entropy


def fused_experts_kd_loss_reference(student_logits: torch.Tensor, expert_logits: torch.Tensor, *,
                                    weighting: str = "entropy", space: str = "logit",
                                    temperature: float = 1.0, sharpness: float = 1.0,
                                    weights: torch.Tensor | None = None, **kd_options):
    """``kd_loss_reference(student, T · fused_log_probs, temperature=T, **kd_options)``, unfused."""
    labels = kd_options.get("labels")
    valid = None if labels is None else labels != kd_options.get("ignore_index", IGNORE_INDEX)
    # Ignored rows: zeros (no NaN from a broken expert flows back into a row that counts for nothing).
    log_probs, _, _ = fuse_experts_reference(zero_ignored_rows(expert_logits, valid), weighting=weighting,
                                             space=space, temperature=temperature, sharpness=sharpness,
                                             weights=weights)
    return kd_loss_reference(student_logits, temperature * log_probs, temperature=temperature, experts=expert_logits,
                             **kd_options)
