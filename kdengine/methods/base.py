"""The contract between the trainer (``kdengine.train``) and a distillation method.

The trainer owns everything generic: options, data, teachers' fine-tuning, the one training loop
(accelerate/DDP, gradient accumulation, mixed precision, clipping, schedule, progress bar,
metrics.jsonl, TensorBoard), evaluation, atomic checkpoints and mid-stage resume, result files.
A method owns what is specific to it, in one module:

* ``options_class``: its options, a :class:`~kdengine.options.MethodOptions` dataclass
  (``--help``, YAML and flags like any option; ``validate`` for its range checks);
* ``stages``: the names of its training stages in order, ending with ``"student"``; each is
  built by :meth:`Method.build_stage` as a :class:`Stage` (trainable modules, learning rate,
  epochs) and run on the shared loop, writing ``output_dir/<stage>/`` when complete;
* :meth:`Method.training_step`: the loss of one micro-batch of a stage (default: teacher side
  under ``no_grad`` -> student -> :meth:`Method.student_loss`). It can take gradients through
  teacher-side modules listed in the stage, sample from the student, read the step counters
  (:class:`StepContext`) and update optimizers in its own order (``step.update``).

A method is found by name (:mod:`kdengine.methods`): a built-in short name, or
``package.module:ClassName`` for any importable subclass (``examples/custom_method.py``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kdengine import models
from kdengine.models import model_inputs
from kdengine.constants import TASKS
from kdengine.options import MethodOptions, TrainConfig

STUDENT = "student"


@dataclass
class RunSpec:
    """What a run is about to do, before anything trains or is written (:meth:`Method.check_run`).
    The models' configs are read on first access (a method that checks no model reads none)."""

    args: TrainConfig
    options: MethodOptions
    label_names: list[str]
    domain_names: list[str] | None      # domains of the training split (None without a domain column)
    train_dataset: Any                  # tokenized training split (items carry "domain" with domains)
    teacher_sources: list[str]          # teacher_model_name_or_path as given
    embedded: bool                      # the embedded synthetic task with its tiny models
    student_source: str | None          # model_name_or_path; None: the teacher's first student_num_layers
    read_config: Callable[[str], Any]   # source -> its transformers config (PretrainedConfig)

    @functools.cached_property
    def teacher_configs(self) -> list[Any]:
        return [self.read_config(source) for source in self.teacher_sources]

    @functools.cached_property
    def student_config(self) -> Any:
        """The student's config; built from the teacher's: num_hidden_layers = student_num_layers."""
        if self.student_source is not None:
            return self.read_config(self.student_source)
        teacher = self.teacher_configs[0]
        return teacher.__class__.from_dict({**teacher.to_dict(), "num_hidden_layers": self.args.student_num_layers})


@dataclass
class RunContext:
    """What the trainer hands a method (filled before the method is built)."""

    args: TrainConfig              # the resolved general options
    options: MethodOptions         # the method's own options (its options_class)
    accelerator: Any               # accelerate.Accelerator
    task: str                      # "sequence_classification" | "token_classification"
    num_labels: int
    label_names: list[str]
    tokenizer: Any
    teachers: list[torch.nn.Module]   # task-trained teachers (frozen, on device); [] without a teacher
    train_dataset: Any             # tokenized torch Dataset of dicts (input_ids, attention_mask, labels, example_id)
    eval_dataset: Any
    collate_fn: Any
    output_dir: str
    device: torch.device
    log: Callable[[str], None] = print   # prints on the main process only
    # teacher_model_name_or_path as given (before fine-tuning), for methods that train their own teachers
    teacher_sources: list[str] = field(default_factory=list)
    # domains of the training split; batches then carry "domain" [B] (an index into this list)
    domain_names: list[str] | None = None

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The teacher of single-teacher methods (None without one)."""
        return self.teachers[0] if self.teachers else None


@dataclass
class OptimizerSpec:
    """One AdamW optimizer of a stage over some of its modules (weight decay as the trainer's
    ``param_groups``), with its own learning rate (default: the stage's) and linear warmup/decay
    or constant (after warmup) schedule (default: the stage's)."""

    name: str
    modules: tuple[str, ...]
    learning_rate: float | None = None
    schedule: str | None = None


@dataclass
class Stage:
    """One training stage run on the shared loop.

    Args:
        name: the stage's name (progress label; outputs in ``output_dir/<name>/``).
        modules: the trainable modules, by name (a module with no trainable parameter is frozen);
            all join the optimizer(s), DDP (accelerate) and checkpoints. The first module is the one
            ``evaluate`` scores and, for the ``student`` stage, the model saved as the result.
        learning_rate, num_train_epochs, max_steps: the stage's schedule (``max_steps > 0`` wins).
        schedule: ``linear`` (warmup, then linear decay to 0) or ``constant`` (warmup, then flat).
        optimizers: several optimizers stepped separately (``step.update``); default one over all.
        evaluate: evaluate the first module on the validation split per ``eval_strategy``
            (a classifier whose forward takes the batch's model inputs and returns ``.logits``).
    """

    name: str
    modules: dict[str, torch.nn.Module]
    learning_rate: float
    num_train_epochs: float
    max_steps: int = -1
    schedule: str = "linear"
    optimizers: list[OptimizerSpec] | None = None
    evaluate: bool = True

    def optimizer_specs(self) -> list[OptimizerSpec]:
        specs = self.optimizers or [OptimizerSpec("main", tuple(self.modules))]
        return [OptimizerSpec(s.name, tuple(s.modules), s.learning_rate or self.learning_rate,
                              s.schedule or self.schedule) for s in specs]


class StepContext:
    """What :meth:`Method.training_step` sees of the loop (set by the trainer for each micro-batch).

    Attributes:
        stage: the running :class:`Stage`.
        modules: its modules as the loop runs them (wrapped by accelerate/DDP); ``model`` is the first.
        accelerator: the run's accelerate.Accelerator (``autocast()``, ``num_processes``, ...).
        global_step: optimizer steps done in this stage before this micro-batch.
        total_steps: optimizer steps of the whole stage.
        epoch: fractional epoch (global_step / steps per epoch).
    """

    stage: Stage
    modules: dict[str, torch.nn.Module]
    accelerator: Any
    global_step: int
    total_steps: int
    epoch: float

    @property
    def model(self) -> torch.nn.Module:
        return next(iter(self.modules.values()))

    def update(self, loss: torch.Tensor, *optimizers: str) -> None:
        """Backward ``loss`` and step the named optimizers now (at accumulation boundaries: clip,
        step, schedule, zero grads). The loss a step returns updates the optimizers not updated yet."""
        raise NotImplementedError


class Method:
    """Base class. Subclasses set ``name`` and ``options_class`` and implement ``student_loss``
    (or ``training_step``); multi-stage methods list ``stages`` and implement ``build_stage``."""

    name = "base"
    options_class: type[MethodOptions] = MethodOptions
    # True: the trainer prepares the task-trained teacher(s) (ctx.teachers). False: no teacher, or the
    # method builds its own from ctx.teacher_sources in its stages.
    uses_teacher = True
    stages: tuple[str, ...] = (STUDENT,)
    tasks: tuple[str, ...] = TASKS      # the task types the method supports (checked before any work)
    # Extra keyword arguments of the student forward in the default step, e.g.
    # {"output_hidden_states": True, "output_attentions": True}.
    student_forward_kwargs: dict = {}

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.options = ctx.options
        self.stages = self.stage_names(ctx.options)

    @classmethod
    def stage_names(cls, options: MethodOptions) -> tuple[str, ...]:
        """The stages of a run with ``options`` (default ``cls.stages``); checked before any work."""
        return tuple(cls.stages)

    @classmethod
    def check_run(cls, run: RunSpec) -> None:
        """Checks of the method's options against the run's data and models that need nothing
        trained (number of teachers, domains, layer maps against the configs' depths). The trainer
        calls it after the data and models are validated and before anything is written or
        trained; raise ConfigError/ValueError with what was wrong and what was expected. Default:
        nothing to check."""

    # ---- stages ----
    def build_stage(self, name: str, student: torch.nn.Module) -> Stage:
        """The :class:`Stage` ``name`` (called before it trains, or before its finished output is
        loaded back by :meth:`load_stage`). The default is the student stage: ``student`` alone at
        the general ``learning_rate`` / ``num_train_epochs`` / ``max_steps``; a method adding
        trainable modules (a projection head) returns them beside it."""
        if name != STUDENT:
            raise NotImplementedError(f"{type(self).__name__} lists stage {name!r} but does not build it")
        args = self.ctx.args
        return Stage(STUDENT, {STUDENT: student}, args.learning_rate, args.num_train_epochs, args.max_steps)

    def save_stage(self, stage: Stage, directory: str) -> dict | None:
        """Write a finished stage's outputs into ``directory`` (a temporary directory the trainer
        renames into place). Default: the trainable parameters of each module as
        ``<module>.safetensors``. Returns a summary for ``stage_complete.json`` (or None). Not called
        for the student stage (saved in transformers layout)."""
        for module_name, module in stage.modules.items():
            models.save_trainable(module, os.path.join(directory, f"{module_name}.safetensors"))
        return None

    def load_stage(self, name: str, directory: str, student: torch.nn.Module) -> Stage:
        """The finished stage ``name`` restored from what :meth:`save_stage` wrote (instead of training
        it again). Default: :meth:`build_stage`, then each module's ``<module>.safetensors``."""
        stage = self.build_stage(name, student)
        for module_name, module in stage.modules.items():
            models.load_trainable(module, os.path.join(directory, f"{module_name}.safetensors"))
        return stage

    def stage_finished(self, stage: Stage) -> None:
        """Called after a stage trained or was loaded, before the next one is built (e.g. freeze its
        modules and keep them for the next stage's teacher side)."""

    # ---- per training step ----
    def training_step(self, step: StepContext, batch: dict) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch and {name: scalar tensor} to log.

        Default (student stage): :meth:`teacher_outputs` under ``no_grad`` and autocast, the
        student forward (``student_forward_kwargs``), :meth:`student_loss`."""
        with torch.no_grad(), step.accelerator.autocast():
            teacher_outputs = self.teacher_outputs(batch)
        outputs = step.model(**model_inputs(batch), **self.student_forward_kwargs)
        return self.student_loss(outputs, batch, teacher_outputs)

    def teacher_outputs(self, batch: dict) -> dict | None:
        """Teacher side of one batch (the default step runs it under no_grad), e.g. {"logits": ...}."""
        return None

    def student_loss(self, student_outputs, batch: dict, teacher_outputs: dict | None) -> tuple[torch.Tensor, dict]:
        """(loss, {name: scalar tensor}) of the student's outputs for one micro-batch."""
        raise NotImplementedError(f"{type(self).__name__} implements neither student_loss nor training_step")

    # ---- reporting ----
    def extra_metrics(self, model: torch.nn.Module, dataset) -> dict:
        """Further validation metrics of the student ({name: float}, stored as ``eval_<name>``), e.g.
        generation-based ones for causal_lm: sample responses with ``model`` (DDP-wrapped: unwrap
        it with ``self.ctx.accelerator.unwrap_model``) and score them. Called by every evaluation
        of the student stage (for causal_lm: of every stage, the teacher's included, with that
        stage's first module), under ``torch.no_grad``. Default: for causal_lm, ROUGE-L of responses
        sampled per ``eval_generation_seeds`` (:func:`kdengine.generation.rouge_l`); none otherwise."""
        ctx = self.ctx
        if ctx.task != "causal_lm" or not ctx.args.generation_seeds():
            return {}
        from kdengine.generation import rouge_l  # noqa: PLC0415

        return rouge_l(ctx.accelerator.unwrap_model(model), dataset, tokenizer=ctx.tokenizer,
                       collate_fn=ctx.collate_fn, batch_size=ctx.args.per_device_eval_batch_size,
                       max_seq_length=ctx.args.max_seq_length, seeds=ctx.args.generation_seeds(), device=ctx.device,
                       output_dir=ctx.output_dir, log=ctx.log, is_main=ctx.accelerator.is_main_process)

    def teacher_report(self) -> dict:
        """Rows for teacher_results.json / the printed table: {row_name: {metric: value}}."""
        return {}
