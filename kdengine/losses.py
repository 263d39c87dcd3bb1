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
