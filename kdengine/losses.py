"""``KDLoss``: the distillation loss as an ``nn.Module`` (options fixed at construction).

Per token row, with p = softmax(z_t / T) (teacher) and q = softmax(z_s / T) (student):

    row_loss = row_weight · [kd_weight · T² · D(p, q) + hard_weight · CE(softmax(z_s), label)]

D is one of forward_kl Σ p log(p/q), reverse_kl Σ q log(q/p), soft_ce −Σ p log q, jsd
(generalised, β = jsd_beta), tvd ½ Σ |p − q|, or mse (raw logits, mean over V; no T, no T²).
The T² factor follows ``t2_scale``. Rows whose label is ``ignore_index`` contribute 0; the
reduction divides Σ row_loss by the valid rows (``batchmean``), by valid rows · V (``mean``),
by nothing (``sum``) or returns the rows (``none``); a ``normalizer`` passed to forward replaces
the divisor (e.g. the valid-token count of a whole gradient-accumulation step).

Two ways to call it:

* **logits** — ``loss(student_logits, teacher_logits, labels=None, row_weights=None,
  normalizer=None)``: student/teacher logits [..., V] (leading dimensions are flattened to N
  rows, labels and row_weights [...] likewise); runs :func:`kdengine.ops.kd_loss`.
* **fused LM head** — ``loss(student_hidden, teacher_logits=None, ..., student_weight=W_s,
  teacher_hidden=h_t, teacher_weight=W_t)``: the student's final hidden states [..., H] and its
  lm_head weight [V, H]; the teacher as logits [..., V] or as hidden states [..., Ht] plus weight
  [V, Ht]. Runs :func:`kdengine.ops.linear_kd_loss`, which never materialises the [N, V] logits.

Returns a fp32 scalar, or fp32 rows shaped like the leading dimensions with ``reduction="none"``.

``hidden_state_loss`` is the feature term of multi-layer distillation (MT-BERT's multi-teacher
hidden loss, TinyBERT-style layer matching): student layers mapped to teacher layers, each through
its learned projection, compared by MSE or cosine distance over the real (unpadded) tokens.
``attention_score_loss`` is the attention term (TinyBERT, Meta-KD stage 1): the MSE of pre-softmax
attention scores of mapped layers over the real (query, key) pairs, masked entries (−inf) zeroed.

Example::

    import torch
    from kdengine.losses import KDLoss

    loss_fn = KDLoss(divergence="forward_kl", temperature=2.0, hard_weight=0.5)
    student_logits = torch.randn(2, 16, 32000, requires_grad=True)   # [B, L, V]
    teacher_logits = torch.randn(2, 16, 32000)
    labels = torch.randint(0, 32000, (2, 16)); labels[:, :4] = -100  # prompt tokens ignored
    loss = loss_fn(student_logits, teacher_logits, labels=labels)
    loss.backward()

    # Fused with the student's lm_head: no [B·L, V] logits are kept.
    head = torch.nn.Linear(512, 32000, bias=False)
    hidden = torch.randn(2, 16, 512, requires_grad=True)
    loss = loss_fn(hidden, teacher_logits, labels=labels, student_weight=head.weight)
    loss.backward()  # gradients reach hidden and head.weight
"""

from __future__ import annotations

import torch
from torch import nn

from kdengine.ops.kd_loss import kd_loss, make_spec
from kdengine.ops.linear_kd_loss import linear_kd_loss
from kdengine.reference.kd_loss import REDUCTIONS

HIDDEN_LOSSES = ("mse", "cosine")


def _rows(t: torch.Tensor | None, name: str, last_dim: bool) -> torch.Tensor | None:
    """Flatten the leading dimensions: [..., D] -> [N, D] (last_dim) or [...] -> [N]."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if last_dim:
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape [..., D] with at least 2 dimensions, got "
                             f"{tuple(t.shape)}")
        return t.reshape(-1, t.shape[-1])
    return t.reshape(-1)


class KDLoss(nn.Module):
    """Knowledge-distillation loss module over :func:`kd_loss` / :func:`linear_kd_loss`.

    Args (constructor; all validated here, ValueError on a bad one):
        divergence: ``forward_kl`` | ``reverse_kl`` | ``soft_ce`` | ``jsd`` | ``tvd`` | ``mse``.
        temperature: T > 0. t2_scale: multiply the divergence by T². jsd_beta: β in [0, 1].
        ignore_index: label value of ignored rows. kd_weight, hard_weight: term weights
            (hard_weight != 0 needs labels at forward).
        reduction: ``batchmean`` | ``sum`` | ``mean`` | ``none``.
        chunk_size: rows per chunk of the fused-linear path (None: automatic).
        backend: ``auto`` | ``cuda`` | ``triton`` | ``torch``.

    See the module docstring for the math, the two call forms, shapes and an example.
    """

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0, t2_scale: bool = True,
                 jsd_beta: float = 0.5, ignore_index: int = -100, kd_weight: float = 1.0,
                 hard_weight: float = 0.0, reduction: str = "batchmean", chunk_size: int | None = None,
                 backend: str | None = "auto"):
        super().__init__()
        spec = make_spec(divergence=divergence, temperature=temperature, t2_scale=t2_scale, jsd_beta=jsd_beta,
                         ignore_index=ignore_index, kd_weight=kd_weight, hard_weight=hard_weight)
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer (rows per chunk) or None, got "
                             f"{chunk_size!r}")
        self.options = dict(spec.rows_kwargs(), reduction=reduction)
        self.chunk_size = chunk_size
        self.backend = backend

    def extra_repr(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{extra}, chunk_size={self.chunk_size!r}, backend={self.backend!r}"

    def forward(self, student: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, row_weights: torch.Tensor | None = None,
                normalizer=None, *,
                student_weight: torch.Tensor | None = None, teacher_hidden: torch.Tensor | None = None,
                teacher_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of ``student`` (logits [..., V], or hidden states [..., H] with ``student_weight``).

        Args:
            student: student logits [..., V]; with ``student_weight`` [V, H], hidden states [..., H].
            teacher_logits: [..., V], or None with ``teacher_hidden`` [..., Ht] + ``teacher_weight``
                [V, Ht] (fused path only).
            labels: [...] integer or None. row_weights: [...] float or None.
            normalizer: number or 0-d tensor replacing the reduction's divisor.

        Returns:
            fp32 scalar; with ``reduction="none"`` fp32 rows shaped like ``student.shape[:-1]``.
        """
        lead = student.shape[:-1] if isinstance(student, torch.Tensor) else None
        rows = dict(labels=_rows(labels, "labels", False),
                    row_weights=_rows(row_weights, "row_weights", False),
                    normalizer=normalizer, backend=self.backend, **self.options)
        if student_weight is None:
            if teacher_hidden is not None or teacher_weight is not None:
                raise ValueError("teacher_hidden / teacher_weight need the fused path: pass student "
                                 "hidden states "
                                 "and student_weight=[V, H] (or pass teacher_logits instead)")
            if teacher_logits is None:
                raise ValueError("teacher_logits [..., V] is required when student logits are given")
            out = kd_loss(_rows(student, "student_logits", True),
                          _rows(teacher_logits, "teacher_logits", True),
                          **rows)
        else:
            out = linear_kd_loss(_rows(student, "student_hidden", True), student_weight,
                                 _rows(teacher_logits, "teacher_logits", True),
                                 teacher_hidden=_rows(teacher_hidden, "teacher_hidden", True),
                                 teacher_weight=teacher_weight, chunk_size=self.chunk_size, **rows)
        if self.options["reduction"] == "none":
            return out.reshape(lead)
        return out


def hidden_state_loss(student_hidden_states, teacher_hidden_states, layer_map, projections=None,
                      attention_mask: torch.Tensor | None = None, loss_type: str = "mse") -> torch.Tensor:
    """Σ over the pairs (s, t) of ``layer_map`` of the distance between the projected student layer s
    and the teacher layer t, averaged over the real tokens.

    Args:
        student_hidden_states: the student's ``hidden_states`` (a sequence, index 0 the embeddings,
            as transformers returns with ``output_hidden_states=True``), each [B, L, Hs].
        teacher_hidden_states: the teacher's, each [B, L, Ht] (same B and L).
        layer_map: pairs ``(student_layer, teacher_layer)`` indexing those sequences.
        projections: None (Hs == Ht), or one callable per pair mapping [..., Hs] -> [..., Ht]
            (e.g. an ``nn.ModuleList`` of ``nn.Linear``).
        attention_mask: [B, L], 1 on real tokens, 0 on padding (None: every token counts).
        loss_type: ``mse`` (mean over the real tokens and the Ht dimensions of the squared error)
            or ``cosine`` (mean over the real tokens of 1 − cos(projected student, teacher)).

    Returns:
        a scalar in the accumulation dtype (fp32; float64 for float64 inputs); gradients reach the
        student states and the projections (the teacher states are targets, detached).
    """
    if loss_type not in HIDDEN_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(HIDDEN_LOSSES)}")
    if student_hidden_states is None or teacher_hidden_states is None:
        raise ValueError("hidden_state_loss needs both models' hidden_states (call them with "
                         "output_hidden_states=True)")
    pairs = [tuple(pair) for pair in layer_map]
    if not pairs:
        raise ValueError("layer_map is empty: expected at least one (student_layer, teacher_layer) pair")
    if projections is not None and len(projections) != len(pairs):
        raise ValueError(f"{len(projections)} projections for {len(pairs)} layer pairs; pass one per pair")
    for side, states, index in (("student", student_hidden_states, 0), ("teacher", teacher_hidden_states, 1)):
        for pair in pairs:
            if not 0 <= pair[index] < len(states):
                raise ValueError(f"layer_map pair {pair} names {side} layer {pair[index]}, but the {side} has "
                                 f"hidden states 0..{len(states) - 1} (0: embeddings)")
    first = student_hidden_states[pairs[0][0]]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    if attention_mask is None:
        mask = torch.ones(first.shape[:-1], dtype=dtype, device=first.device)
    else:
        if tuple(attention_mask.shape) != tuple(first.shape[:-1]):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be [B, L] = "
                             f"{tuple(first.shape[:-1])} of the hidden states")
        mask = attention_mask.to(dtype)
    tokens = mask.sum().clamp_min(1.0)
    total = torch.zeros((), dtype=dtype, device=first.device)
    for i, (s, t) in enumerate(pairs):
        student = student_hidden_states[s]
        projected = (student if projections is None else projections[i](student)).to(dtype)
        target = teacher_hidden_states[t].detach().to(dtype)
        if projected.shape != target.shape:
            raise ValueError(f"layer pair {(s, t)}: the projected student state {tuple(projected.shape)} does not "
                             f"match the teacher state {tuple(target.shape)}; pass projections to width "
                             f"{target.shape[-1]}")
        if loss_type == "mse":
            per_token = (projected - target).pow(2).mean(-1)
        else:
            per_token = 1.0 - torch.nn.functional.cosine_similarity(projected, target, dim=-1, eps=1e-8)
        total = total + (per_token * mask).sum() / tokens
    return total


def attention_score_loss(student_scores, teacher_scores, layer_map, attention_mask: torch.Tensor | None = None,
                         masked_at: float = -100.0, reduction: str = "mean") -> torch.Tensor:
    """Σ over the pairs (s, t) of ``layer_map`` of the mean squared difference between the student's
    attention scores of layer s and the teacher's of layer t (TinyBERT's attention loss, Meta-KD's
    stage 1), per example over its heads and real (query, key) pairs.

    Args:
        student_scores: the student's PRE-softmax scores per layer, a sequence whose entry j − 1 is
            layer j (as transformers' ``attentions``), each [B, heads, L, L].
        teacher_scores: the teacher's, each [B, heads, L, L] (same B, heads and L).
        layer_map: pairs ``(student_layer, teacher_layer)``, layers numbered from 1.
        attention_mask: [B, L], 1 on real tokens, 0 on padding; a (query, key) pair counts when both
            are real (None: all L × L pairs count).
        masked_at: entries ``<= masked_at`` (an additive padding mask: −10000, the dtype's minimum,
            −inf) are set to 0, on each side separately, before the difference (the TinyBERT
            convention; they would otherwise dominate or make the loss inf/NaN).
        reduction: ``mean`` (over examples) or ``none`` ([B], one loss per example, e.g. to weight).

    Returns:
        a scalar or [B] in the accumulation dtype (fp32; float64 for float64 inputs); gradients
        reach the student scores (the teacher's are targets, detached).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; expected mean or none")
    pairs = [tuple(pair) for pair in layer_map]
    if not pairs:
        raise ValueError("layer_map is empty: expected at least one (student_layer, teacher_layer) pair")
    for side, scores, index in (("student", student_scores, 0), ("teacher", teacher_scores, 1)):
        for pair in pairs:
            if not 1 <= pair[index] <= len(scores):
                raise ValueError(f"layer_map pair {pair} names {side} attention layer {pair[index]}, but the "
                                 f"{side} has attention layers 1..{len(scores)}")
    first = student_scores[pairs[0][0] - 1]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    batch, _, length, _ = first.shape
    if attention_mask is None:
        mask = torch.ones(batch, length, dtype=dtype, device=first.device)
    else:
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be [B, L] = {(batch, length)} of "
                             f"the scores")
        mask = attention_mask.to(dtype)
    pair_mask = mask[:, None, :, None] * mask[:, None, None, :]          # [B, 1, L, L]
    total = torch.zeros(batch, dtype=dtype, device=first.device)
    for s, t in pairs:
        student = student_scores[s - 1].to(dtype)
        target = teacher_scores[t - 1].detach().to(dtype)
        if student.shape != target.shape:
            raise ValueError(f"layer pair {(s, t)}: student scores {tuple(student.shape)} and teacher scores "
                             f"{tuple(target.shape)} differ; both must be [B, heads, L, L] with the same heads")
        student = torch.where(student <= masked_at, torch.zeros((), dtype=dtype, device=student.device), student)
        target = torch.where(target <= masked_at, torch.zeros((), dtype=dtype, device=target.device), target)
        squared = (student - target).pow(2) * pair_mask
        total = total + squared.sum((1, 2, 3)) / (pair_mask.sum((1, 2, 3)) * student.shape[1]).clamp_min(1.0)
    return total if reduction == "none" else total.mean()
