"""Baselines every distillation result is compared with.

* ``no_kd``: the student trained on labels alone (cross-entropy), no teacher.
* ``vanilla_kd``: one task-trained teacher; Hinton logit distillation through
  :func:`kdengine.ops.kd_loss` (``kd_divergence``, ``kd_temperature`` with T² scaling,
  ``kd_weight``·KD + ``hard_weight``·CE on labels, ``jsd_beta``; backend ``kernel_backend``).

Token classification flattens logits to [N, C] rows; rows whose label is -100 (padding,
sub-word continuations) are ignored by both terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdengine.methods.base import Method
from kdengine.models import model_inputs
from kdengine.ops.kd_loss import kd_loss

IGNORE_INDEX = -100


def flat_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] or [B, L, C] logits with [B] or [B, L] labels -> ([N, C], [N])."""
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


class NoKD(Method):
    """Student on labels only: mean cross-entropy over the labelled rows."""

    name = "no_kd"
    uses_teacher = False

    def student_loss(self, student_outputs, batch, teacher_outputs):
        logits, labels = flat_rows(student_outputs.logits, batch["labels"])
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        return loss, {"ce_loss": loss.detach()}


class VanillaKD(Method):
    """Hinton KD from the one task-trained teacher (``ctx.teacher``)."""

    name = "vanilla_kd"
    uses_teacher = True

    @torch.no_grad()
    def teacher_outputs(self, batch):
        return {"logits": self.ctx.teacher(**model_inputs(batch)).logits}

    def student_loss(self, student_outputs, batch, teacher_outputs):
        args = self.ctx.args
        student, labels = flat_rows(student_outputs.logits, batch["labels"])
        teacher, _ = flat_rows(teacher_outputs["logits"], batch["labels"])
        common = dict(divergence=args.kd_divergence, temperature=args.kd_temperature, jsd_beta=args.jsd_beta,
                      labels=labels, ignore_index=IGNORE_INDEX, backend=args.kernel_backend)
        soft = kd_loss(student, teacher.to(student.dtype), kd_weight=1.0, hard_weight=0.0, **common)
        hard = F.cross_entropy(student.float(), labels, ignore_index=IGNORE_INDEX)
        loss = args.kd_weight * soft + args.hard_weight * hard
        return loss, {"kd_loss": soft.detach(), "ce_loss": hard.detach()}
