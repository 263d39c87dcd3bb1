"""A distillation method written outside kdengine: hidden-state MSE through a learned projection,
plus the usual KL on logits. Run it on the embedded synthetic task from the repository root::

    python -m kdengine.train --method examples.custom_method:HiddenStateKD --hidden_weight 0.5

What it shows (docs/methods.md, "Writing a method", walks through it):

* its own options: a dataclass of ``option`` fields with its range checks (``validate``); they show
  in ``--help``, work in YAML and as flags, and are refused with any other method;
* an extra trainable module: the projection from the student's hidden size to the teacher's joins
  the optimizer, DDP and checkpoints because the student stage lists it (saved at the end as
  ``output_dir/modules/projection.safetensors``);
* its own training step: the teacher forward under ``no_grad``, the student forward with hidden
  states, the projection through ``step.modules``; the trainer does backward, clipping, the
  optimizer step and the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdengine.methods.base import STUDENT, Stage, StepContext
from kdengine.methods.baselines import KDLossOptions, VanillaKD
from kdengine.models import model_inputs
from kdengine.options import option


@dataclass
class HiddenStateKDOptions(KDLossOptions):
    """The logit-KD options (kd_temperature, kd_weight, hard_weight, ...) plus the hidden-state term."""

    hidden_weight: float = option(1.0, "weight of the MSE between the projected student and the teacher last "
                                       "hidden states")

    def validate(self) -> None:
        super().validate()
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")


class HiddenStateKD(VanillaKD):
    """loss = kd_weight · KD(logits) + hard_weight · CE + hidden_weight · MSE(W h_s, h_t) over real tokens."""

    name = "hidden_state_kd"
    options_class = HiddenStateKDOptions

    def build_stage(self, name: str, student: torch.nn.Module) -> Stage:
        stage = super().build_stage(name, student)          # the student at the general learning rate/epochs
        if name == STUDENT:
            projection = torch.nn.Linear(student.config.hidden_size, self.ctx.teacher.config.hidden_size)
            stage.modules["projection"] = projection.to(self.ctx.device)
        return stage

    def training_step(self, step: StepContext, batch: dict) -> tuple[torch.Tensor, dict]:
        inputs = model_inputs(batch)
        with torch.no_grad(), step.accelerator.autocast():
            teacher = self.ctx.teacher(**inputs, output_hidden_states=True)
        student = step.model(**inputs, output_hidden_states=True)
        loss, logs = self.student_loss(student, batch, {"logits": teacher.logits})   # KD + CE (VanillaKD)
        projected = step.modules["projection"](student.hidden_states[-1])             # [B, L, H_teacher]
        target = teacher.hidden_states[-1].to(projected.dtype)                         # [B, L, H_teacher]
        mask = batch["attention_mask"].unsqueeze(-1).to(projected.dtype)               # [B, L, 1]
        hidden = ((projected - target) ** 2 * mask).sum() / (mask.sum() * projected.shape[-1])
        return loss + self.options.hidden_weight * hidden, {**logs, "hidden_loss": hidden.detach()}
