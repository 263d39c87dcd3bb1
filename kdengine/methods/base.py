"""The contract between the trainer (``kdengine.train``) and a distillation method.

The trainer owns everything generic: config, data, the student model, the optimizer, the
training loop (accelerate/DDP, gradient accumulation, mixed precision), evaluation, atomic
checkpoints and resume, logging, plots and result files. A method owns what is specific to it:
the stages that prepare its teachers, what the teachers produce per batch, and the student loss.

Adding a method (MT-BERT, Meta-KD, PromptKD, ...) = one module with a ``Method`` subclass,
registered in ``kdengine.methods.REGISTRY``. Several teachers, hidden-state losses (set
``needs_student_hidden_states``) and on-policy generation (override ``student_step``) all fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RunContext:
    """What the trainer hands a method. Filled by the trainer before ``prepare``."""

    args: Any                      # the resolved TrainConfig (kdengine.config)
    accelerator: Any               # accelerate.Accelerator
    task: str                      # "sequence_classification" | "token_classification"
    num_labels: int
    label_names: list[str]
    tokenizer: Any
    teacher: torch.nn.Module | None   # task-fine-tuned teacher (frozen), None for no_kd
    train_dataset: Any             # tokenized torch Dataset of dicts (input_ids, attention_mask, labels, ...)
    eval_dataset: Any
    collate_fn: Any
    output_dir: str
    device: torch.device
    log: Any = print               # callable(str) that prints on the main process only
    extra: dict = field(default_factory=dict)


class Method:
    """Base class: vanilla behaviour is a student trained on labels (no teacher)."""

    name = "base"
    uses_teacher = True                 # the trainer prepares (fine-tunes) a teacher when True
    needs_student_hidden_states = False

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    # ---- stages before the student: resumable, each writes its own folder under output_dir ----
    def prepare(self) -> None:
        """Run the method's teacher-side stages (idempotent: skip a stage whose output exists)."""

    # ---- per training step ----
    @torch.no_grad()
    def teacher_outputs(self, batch: dict) -> dict | None:
        """Teacher side of one batch (no grad; freed by the trainer before the student backward)."""
        return None

    def student_loss(self, student_outputs, batch: dict, teacher_outputs: dict | None) -> tuple[torch.Tensor, dict]:
        """Return (loss, {name: float-able tensor}) for one micro-batch."""
        raise NotImplementedError

    # ---- reporting and state ----
    def teacher_report(self) -> dict:
        """Rows for teacher_results.json / the printed table: {row_name: {metric: value}}."""
        return {}

    def save(self, directory: str) -> None:
        """Write the method's own artefacts (e.g. expert prompts, selector) into a checkpoint dir.

        Called by the trainer inside every ``checkpoint-<step>/`` (before the atomic rename) and
        for the final ``output_dir``. Must write only inside ``directory``.
        """

    def load(self, directory: str) -> None:
        """Restore what ``save`` wrote (resume from a checkpoint)."""
