"""Baselines every distillation result is compared with, and the logit-distillation options.

* ``no_kd``: the student trained on labels alone (cross-entropy), no teacher.
* ``vanilla_kd``: one task-trained teacher; Hinton logit distillation through
  :func:`kdengine.ops.kd_loss` (:class:`KDLossOptions`: ``kd_divergence``, ``kd_temperature``
  with T² scaling, ``kd_weight``·KD + ``hard_weight``·CE on labels, ``jsd_beta``; backend
  ``kernel_backend``).

Token classification flattens logits to [N, C] rows; rows whose label is IGNORE_INDEX (padding,
sub-word continuations) are ignored by both terms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdengine.constants import IGNORE_INDEX
from kdengine.methods.base import Method
from kdengine.models import model_inputs
from kdengine.ops.kd_loss import kd_loss
from kdengine.options import MethodOptions, option
from kdengine.reference.kd_loss import DIVERGENCES


@dataclass
class KDLossOptions(MethodOptions):
    """The logit-distillation loss (``kdengine.ops.kd_loss``); methods distilling logits inherit it."""

    kd_divergence: str = option("forward_kl", "divergence between teacher and student distributions", DIVERGENCES)
    kd_temperature: float = option(4.0, "softmax temperature T (losses scaled by T^2)")
    kd_weight: float = option(0.3, "weight of the distillation term")
    hard_weight: float = option(0.7, "weight of the cross-entropy on labels")
    jsd_beta: float = option(0.5, "generalised JSD beta (TRL semantics: 0 forward KL, 1 reverse KL)")

    def validate(self) -> None:
        super().validate()
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        for name in ("kd_weight", "hard_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kd_weight + self.hard_weight <= 0:
            raise ValueError("kd_weight + hard_weight must be > 0 (otherwise the loss is 0)")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")


def kd_option(name: str, value):
    """The :class:`KDLossOptions` option ``name`` with another default (same help and choices), for a
    method whose published loss has other defaults."""
    return dataclasses.field(default=value, metadata=KDLossOptions.__dataclass_fields__[name].metadata)


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
    options_class = KDLossOptions

    def teacher_outputs(self, batch):
        return {"logits": self.ctx.teacher(**model_inputs(batch)).logits}

    def student_loss(self, student_outputs, batch, teacher_outputs):
        opts = self.options
        student, labels = flat_rows(student_outputs.logits, batch["labels"])
        teacher, _ = flat_rows(teacher_outputs["logits"], batch["labels"])
        common = dict(divergence=opts.kd_divergence, temperature=opts.kd_temperature, jsd_beta=opts.jsd_beta,
                      labels=labels, ignore_index=IGNORE_INDEX, backend=self.ctx.args.kernel_backend)
        soft = kd_loss(student, teacher.to(student.dtype), kd_weight=1.0, hard_weight=0.0, **common)
        hard = F.cross_entropy(student.float(), labels, ignore_index=IGNORE_INDEX)
        loss = opts.kd_weight * soft + opts.hard_weight * hard
        return loss, {"kd_loss": soft.detach(), "ce_loss": hard.detach()}
