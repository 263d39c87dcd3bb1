"""Option dataclasses: the general options of a run (:class:`TrainConfig`) and the base of every
method's own options (:class:`MethodOptions`), with typed conversion and choice/finiteness checks.

An option is a dataclass field made with :func:`option` (default, help text, optional choices).
:class:`Schema` reads a dataclass's options: it converts YAML and command-line values to the
field's type and checks choices, so the command line, YAML and ``--help`` of
:mod:`kdengine.config` treat the general options and any method's options alike. This module
imports only :mod:`kdengine.constants`: methods (:mod:`kdengine.methods`) and the trainer build on it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from kdengine.constants import TASKS

STRATEGIES = ("no", "steps", "epoch")
STAGES = ("teacher", "method", "student", "evaluate")
REPORT_TO = ("tensorboard", "none")
FLOAT32_MAX = 3.4028234663852886e38      # torch.finfo(torch.float32).max; this module does not import torch


class ConfigError(ValueError):
    """A bad option (unknown key, wrong type, out of range, a method that cannot be used)."""


def option(default, help: str, choices: tuple | None = None, *, convert=None):  # noqa: A002 - mirrors argparse
    """A dataclass field that is an option: ``help`` and ``choices`` show in ``--help``; ``convert``
    (value -> value) replaces the type conversion of :meth:`Schema.convert`."""
    return field(default=default, metadata={"help": help, "choices": choices, "convert": convert})


def _teacher_value(value):
    """One teacher or several: a comma list, or a YAML list, stored as a comma list."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    names = [str(v).strip() for v in value] if isinstance(value, (list, tuple)) else \
        [v.strip() for v in str(value).split(",")]
    if not all(names):
        raise ConfigError(f"teacher_model_name_or_path has an empty entry: {value!r}")
    return ",".join(names)


def _resume_value(value):
    if value is None or value is False or str(value).lower() in ("none", "null", "false", ""):
        return None
    return "last" if value is True or str(value).lower() in ("true", "last") else str(value)


@dataclass
class MethodOptions:
    """Base class of a method's options: subclass it as a dataclass of :func:`option` fields.

    ``validate`` checks ranges and cross-option rules (raise ValueError with a message naming the
    option); choices and finiteness are checked for every field before it runs."""

    def validate(self) -> None:
        """Range checks of the options (ValueError)."""


class Schema:
    """The options of one dataclass (general options or a method's): names, types, conversion, checks."""

    def __init__(self, cls: type):
        self.cls = cls
        self.fields = {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}
        self.hints = typing.get_type_hints(cls)

    def base_type(self, name: str) -> tuple[type, bool]:
        """(type, optional) of a field from its annotation (int | None -> (int, True))."""
        hint = self.hints[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if args:
            return args[0], True
        return hint, False

    def convert(self, name: str, value):
        """Convert a YAML or flag value to the field's type (ConfigError naming the option)."""
        custom = self.fields[name].metadata.get("convert")
        if custom is not None:
            return custom(value)
        kind, optional = self.base_type(name)
        if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
            if optional:
                return None
            raise ConfigError(f"{name} cannot be None (expected {kind.__name__})")
        try:
            if kind is bool:
                if isinstance(value, bool):
                    return value
                text = str(value).lower()
                if text in ("true", "1", "yes"):
                    return True
                if text in ("false", "0", "no"):
                    return False
                raise ValueError
            if kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                return int(value) if not isinstance(value, str) else int(value.strip())
            if kind is float:
                if isinstance(value, bool):
                    raise ValueError
                return float(value)
            return str(value)
        except ValueError:
            raise ConfigError(f"{name} expects {kind.__name__}{' or None' if optional else ''}, "
                              f"got {value!r}") from None

    def check(self, obj) -> None:
        """Choices, and finiteness in float32 of every float field of ``obj`` (ConfigError)."""
        for name, f in self.fields.items():
            choices = f.metadata.get("choices")
            value = getattr(obj, name)
            if choices and value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
            if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                raise ConfigError(f"{name} must be finite in float32 (|value| <= {FLOAT32_MAX:.4g}: the training "
                                  f"runs in float32), got {value}")

    def values(self, obj) -> dict:
        """{name: value} of the options of ``obj``."""
        return {name: getattr(obj, name) for name in self.fields}


@dataclass
class TrainConfig:
    """The general options of a kdengine run (see ``python -m kdengine.train --help``); the method's
    own options are ``options`` (an instance of its :class:`MethodOptions` class, filled by
    :func:`kdengine.config.parse_args`)."""

    # ---- transformers TrainingArguments names ----
    output_dir: str = option("runs/kdengine-demo", "where the run writes its model, results, logs and checkpoints")
    overwrite_output_dir: bool = option(False, "allow a non-empty output_dir that holds a different run or "
                                               "unfinished checkpoints (its old outputs are replaced)")
    learning_rate: float = option(5e-5, "peak AdamW learning rate of the student (linear decay after warmup)")
    num_train_epochs: float = option(4.0, "student training epochs (ignored when max_steps > 0)")
    max_steps: int = option(-1, "student optimizer steps; > 0 overrides num_train_epochs")
    per_device_train_batch_size: int = option(32, "training batch size per process")
    per_device_eval_batch_size: int = option(64, "evaluation batch size per process")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    warmup_ratio: float = option(0.1, "fraction of the optimizer steps spent in linear warmup")
    weight_decay: float = option(0.01, "AdamW weight decay (never on biases and LayerNorm weights)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables clipping)")
    bf16: bool = option(False, "bfloat16 mixed precision")
    fp16: bool = option(False, "float16 mixed precision (with loss scaling)")
    seed: int = option(42, "random seed (data order, initialisation, dropout, synthetic data)")
    logging_steps: int = option(10, "log training loss/lr every N optimizer steps (metrics.jsonl, TensorBoard)")
    eval_strategy: str = option("epoch", "when to evaluate on the validation split", STRATEGIES)
    eval_steps: int | None = option(None, "evaluate every N steps with eval_strategy=steps (default logging_steps)")
    save_strategy: str = option("epoch", "when every training stage writes checkpoint-<step>/", STRATEGIES)
    save_steps: int = option(500, "checkpoint every N steps with save_strategy=steps")
    save_total_limit: int | None = option(2, "keep at most N checkpoints per stage (oldest removed; None keeps all)")
    resume_from_checkpoint: str | None = option(
        None, "'last' / true: every stage resumes from its latest complete checkpoint; or the student's "
              "checkpoint directory", convert=_resume_value)
    report_to: str = option("tensorboard", "comma list of trackers: tensorboard, or none")
    metric_for_best_model: str | None = option(None, "validation metric tracked as best (default accuracy; f1 for "
                                                     "token classification; loss for causal_lm)")
    dataloader_num_workers: int = option(0, "DataLoader worker processes")
    eval_generation_seeds: str = option("10", "causal_lm: comma list of sampling seeds; with rouge-score installed, "
                                              "each evaluation samples one response per validation prompt per seed "
                                              "and reports the mean ROUGE-L as eval_rougeL (the reference uses "
                                              "10,20,30,40,50); 'none': no generation")

    # ---- what to run ----
    method: str = option("pee_kd", "distillation method: a built-in name, or package.module:ClassName of any "
                                   "importable kdengine.methods.base.Method subclass")
    task: str = option("sequence_classification", "task type", TASKS)
    stages: str = option("all", "stages to run: all, or a comma list of teacher,method,student,evaluate "
                                "(a stage whose output exists is skipped)")
    compare_baselines: bool = option(True, "also train the no_kd and vanilla_kd students with the same teacher "
                                           "(output_dir/baselines/<method>/) and print them beside the main one")
    kernel_backend: str = option("auto", "kernel backend of the loss ops and prompt experts",
                                 ("auto", "cuda", "triton", "torch"))

    # ---- data (no train_file and no dataset_name: the synthetic task) ----
    train_file: str | None = option(None, "training file (csv/tsv/jsonl, or CoNLL for token classification)")
    validation_file: str | None = option(None, "validation file")
    test_file: str | None = option(None, "test file")
    dataset_name: str | None = option(None, "datasets hub name (instead of files)")
    dataset_config_name: str | None = option(None, "datasets config name")
    text_column: str | None = option(None, "text column (default: sentence; causal_lm: prompt, the instruction)")
    text_pair_column: str | None = option(None, "second text column of sentence-pair tasks")
    label_column: str | None = option(None, "label column (default: label; causal_lm: response, the target text)")
    max_seq_length: int = option(128, "maximum tokens per example (longer ones are truncated)")
    max_train_samples: int | None = option(None, "use only the first N training examples")
    max_eval_samples: int | None = option(None, "use only the first N validation examples")
    synthetic_num_train: int = option(2000, "synthetic task: training examples")
    synthetic_num_validation: int = option(500, "synthetic task: validation examples")
    synthetic_num_test: int = option(500, "synthetic task: test examples")

    # ---- models (none given on the synthetic task: tiny models built into output_dir/tiny_models) ----
    teacher_model_name_or_path: str | None = option(
        None, "teacher, or several as a comma list (YAML: a list): each a task-trained model (used as is) or a "
              "pretrained one (fine-tuned first, into output_dir/teacher, teacher_1, ...)", convert=_teacher_value)
    model_name_or_path: str | None = option(None, "student model (or use student_num_layers)")
    student_num_layers: int | None = option(None, "initialise the student from the task-trained teacher, keeping "
                                                  "this many evenly spaced layers (DistilBERT-style)")
    teacher_num_train_epochs: float = option(3.0, "epochs of the teacher fine-tuning stage")
    teacher_learning_rate: float = option(5e-5, "peak learning rate of the teacher fine-tuning stage (linear decay "
                                                "after warmup)")
    teacher_cache: str | None = option(None, "distil from this offline teacher cache (python -m "
                                             "kdengine.cache_teacher) instead of running the teacher, which is "
                                             "then never loaded")
    teacher_min_margin: float = option(0.01, "the fine-tuned teacher must beat the majority-class baseline on the "
                                             "validation metric by this much, or the run stops before distilling "
                                             "(a negative value disables the check)")

    # The method's own options (kdengine.methods.base.MethodOptions subclass); not an option itself.
    options: MethodOptions | None = None

    def stage_list(self) -> list[str]:
        return list(STAGES) if self.stages.strip() == "all" else [s.strip() for s in self.stages.split(",")]

    def teacher_list(self) -> list[str]:
        """The teachers of ``teacher_model_name_or_path`` ([] without one)."""
        return self.teacher_model_name_or_path.split(",") if self.teacher_model_name_or_path else []

    def generation_seeds(self) -> list[int]:
        """The seeds of ``eval_generation_seeds`` ([] for 'none')."""
        text = self.eval_generation_seeds.strip()
        return [] if text == "none" else [int(s) for s in text.split(",")]

    def report_list(self) -> list[str]:
        return [r.strip() for r in self.report_to.split(",") if r.strip() and r.strip() != "none"]

    def best_metric_name(self) -> str:
        """``metric_for_best_model`` without its eval_ prefix (default by task)."""
        default = {"token_classification": "f1", "causal_lm": "loss"}.get(self.task, "accuracy")
        name = self.metric_for_best_model or default
        return name[len("eval_"):] if name.startswith("eval_") else name

    def to_dict(self) -> dict:
        """Every option, the method's own after the general ones (flat, as in YAML)."""
        values = GENERAL.values(self)
        if self.options is not None:
            values.update(Schema(type(self.options)).values(self.options))
        return values


GENERAL = Schema(TrainConfig)


def check_general(cfg: TrainConfig) -> None:
    """Range checks of the general options (ConfigError)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    GENERAL.check(cfg)
    for name in ("learning_rate", "teacher_learning_rate"):
        need(getattr(cfg, name) > 0, f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("num_train_epochs", "teacher_num_train_epochs", "weight_decay", "max_grad_norm"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    need(cfg.max_steps > 0 or cfg.num_train_epochs > 0,
         "num_train_epochs must be > 0 when max_steps <= 0 (nothing to train)")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "save_steps", "max_seq_length", "synthetic_num_train"):
        need(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("dataloader_num_workers", "synthetic_num_validation", "synthetic_num_test"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("eval_steps", "save_total_limit", "max_train_samples", "max_eval_samples", "student_num_layers"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"{name} must be >= 1 or None, got {value}")
    need(0.0 <= cfg.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    need(not (cfg.bf16 and cfg.fp16), "bf16 and fp16 are exclusive; choose one")
    for stage in cfg.stage_list():
        need(stage in STAGES, f"unknown stage {stage!r} in stages={cfg.stages!r}; expected 'all' or a comma "
                              f"list of {', '.join(STAGES)}")
    try:
        cfg.generation_seeds()
    except ValueError:
        raise ConfigError(f"eval_generation_seeds must be a comma list of integers or 'none', got "
                          f"{cfg.eval_generation_seeds!r}") from None
    for tracker in cfg.report_list():
        need(tracker in REPORT_TO, f"unknown report_to entry {tracker!r}; expected tensorboard or none")
    metric = cfg.best_metric_name()
    allowed = ("f1", "precision", "recall", "accuracy", "loss") if cfg.task == "token_classification" \
        else ("accuracy", "loss")
    need(metric in allowed, f"metric_for_best_model={cfg.metric_for_best_model!r} is not computed for "
                            f"{cfg.task}; expected one of {', '.join(allowed)} (with or without eval_)")
    need(bool(cfg.output_dir.strip()), "output_dir must not be empty")


def parse_layer_map(text: str) -> list[list[tuple[int, int]]] | None:
    """``uniform`` -> None; ``"s:t,s:t"`` -> one pair list for every teacher; lists separated by ``;``
    -> one per teacher (ValueError on bad syntax)."""
    if text.strip() == "uniform":
        return None
    maps = []
    for part in text.split(";"):
        pairs = []
        for item in part.split(","):
            s, sep, t = item.partition(":")
            if not sep or not s.strip().isdigit() or not t.strip().isdigit():
                raise ValueError(f"layer_map must be 'uniform' or pairs 'student:teacher' separated by ',' "
                                 f"(one list per teacher separated by ';'), got {text!r}")
            pairs.append((int(s), int(t)))
        maps.append(pairs)
    return maps
