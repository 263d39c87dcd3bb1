"""The one run configuration of ``python -m kdengine.train``: a dataclass, YAML and flags.

``TrainConfig`` holds every option with its default (the embedded default: a PEE-KD run on the
synthetic multi-domain sentiment task with tiny models). ``parse_args`` applies, in order:
defaults, then ``--config run.yaml`` (replaces defaults), then ``--key value`` flags (override
the YAML): TRL's ``parse_args_and_config`` behaviour. Unknown keys (YAML or flag) and
out-of-range values raise :class:`ConfigError` (a ValueError) before any work; unknown keys name
the closest valid one. Option names follow transformers ``TrainingArguments`` where one exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field

import yaml

METHODS = ("pee_kd", "vanilla_kd", "no_kd")
TASKS = ("sequence_classification", "token_classification")
STRATEGIES = ("no", "steps", "epoch")
STAGES = ("teacher", "method", "student", "evaluate")
DIVERGENCES = ("forward_kl", "reverse_kl", "soft_ce", "jsd", "tvd", "mse")
REPORT_TO = ("tensorboard", "none")
# Options that change how a run is driven, not what it computes: a different value does not make
# an existing output_dir "a different run".
RUN_CONTROL_KEYS = ("output_dir", "resume_from_checkpoint", "stages", "overwrite_output_dir", "compare_baselines",
                    "dataloader_num_workers", "kernel_backend", "report_to", "logging_steps",
                    "per_device_eval_batch_size", "save_steps", "save_strategy", "save_total_limit")


# The embedded default (no data and no model options: the synthetic task with tiny, randomly
# initialised models) trains from scratch and needs higher rates than the defaults for fine-tuning
# pretrained models (transformers' 5e-5). Applied by parse_args to the options the user did not set.
EMBEDDED_DEFAULTS = {"learning_rate": 1e-3, "teacher_learning_rate": 1e-3}
_EMBEDDED_UNLESS = ("train_file", "dataset_name", "teacher_model_name_or_path", "model_name_or_path")


def is_embedded(cfg) -> bool:
    """Whether ``cfg`` runs the embedded default task (no data and no model options)."""
    return not any(getattr(cfg, name) for name in _EMBEDDED_UNLESS)


class ConfigError(ValueError):
    """A bad option (unknown key, wrong type, out of range)."""


def _opt(default, help: str, choices: tuple | None = None):  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Every option of a kdengine run (see ``python -m kdengine.train --help``)."""

    # ---- transformers TrainingArguments names ----
    output_dir: str = _opt("runs/kdengine-demo", "where the run writes its model, results, logs and checkpoints")
    overwrite_output_dir: bool = _opt(False, "allow a non-empty output_dir that holds a different run or "
                                             "unfinished checkpoints (its old outputs are replaced)")
    learning_rate: float = _opt(5e-5, "peak AdamW learning rate of the student (linear decay after warmup)")
    num_train_epochs: float = _opt(4.0, "student training epochs (ignored when max_steps > 0)")
    max_steps: int = _opt(-1, "student optimizer steps; > 0 overrides num_train_epochs")
    per_device_train_batch_size: int = _opt(32, "training batch size per process")
    per_device_eval_batch_size: int = _opt(64, "evaluation batch size per process")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    warmup_ratio: float = _opt(0.1, "fraction of the optimizer steps spent in linear warmup")
    weight_decay: float = _opt(0.01, "AdamW weight decay (never on biases and LayerNorm weights)")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables clipping)")
    bf16: bool = _opt(False, "bfloat16 mixed precision")
    fp16: bool = _opt(False, "float16 mixed precision (with loss scaling)")
    seed: int = _opt(42, "random seed (data order, initialisation, dropout, synthetic data)")
    logging_steps: int = _opt(10, "log training loss/lr every N optimizer steps (metrics.jsonl, TensorBoard)")
    eval_strategy: str = _opt("epoch", "when to evaluate on the validation split", STRATEGIES)
    eval_steps: int | None = _opt(None, "evaluate every N steps with eval_strategy=steps (default logging_steps)")
    save_strategy: str = _opt("epoch", "when to write checkpoint-<step>/", STRATEGIES)
    save_steps: int = _opt(500, "checkpoint every N steps with save_strategy=steps")
    save_total_limit: int | None = _opt(2, "keep at most N checkpoints (oldest removed; None keeps all)")
    resume_from_checkpoint: str | None = _opt(None, "checkpoint directory to resume from, or 'last' / true for "
                                                    "the latest complete checkpoint in output_dir")
    report_to: str = _opt("tensorboard", "comma list of trackers: tensorboard, or none")
    metric_for_best_model: str | None = _opt(None, "validation metric tracked as best (default accuracy, or f1 "
                                                   "for token classification)")
    dataloader_num_workers: int = _opt(0, "DataLoader worker processes")

    # ---- what to run ----
    method: str = _opt("pee_kd", "distillation method", METHODS)
    task: str = _opt("sequence_classification", "task type", TASKS)
    stages: str = _opt("all", "stages to run: all, or a comma list of teacher,method,student,evaluate "
                              "(a stage whose output exists is skipped)")
    compare_baselines: bool = _opt(True, "also train the no_kd and vanilla_kd students with the same teacher "
                                         "(output_dir/baselines/<method>/) and print them beside the main one")
    kernel_backend: str = _opt("auto", "kernel backend of the loss ops", ("auto", "cuda", "triton", "torch"))

    # ---- data (no train_file and no dataset_name: the synthetic task) ----
    train_file: str | None = _opt(None, "training file (csv/tsv/jsonl, or CoNLL for token classification)")
    validation_file: str | None = _opt(None, "validation file")
    test_file: str | None = _opt(None, "test file")
    dataset_name: str | None = _opt(None, "datasets hub name (instead of files)")
    dataset_config_name: str | None = _opt(None, "datasets config name")
    text_column: str | None = _opt(None, "text column (default: the data layer's choice, e.g. sentence)")
    text_pair_column: str | None = _opt(None, "second text column of sentence-pair tasks")
    label_column: str | None = _opt(None, "label column")
    max_seq_length: int = _opt(128, "maximum tokens per example (longer ones are truncated)")
    max_train_samples: int | None = _opt(None, "use only the first N training examples")
    max_eval_samples: int | None = _opt(None, "use only the first N validation examples")
    synthetic_num_train: int = _opt(2000, "synthetic task: training examples")
    synthetic_num_validation: int = _opt(500, "synthetic task: validation examples")
    synthetic_num_test: int = _opt(500, "synthetic task: test examples")

    # ---- models (none given on the synthetic task: tiny models built into output_dir/tiny_models) ----
    teacher_model_name_or_path: str | None = _opt(None, "teacher: a task-trained model (used as is) or a "
                                                        "pretrained one (fine-tuned first, into output_dir/teacher)")
    model_name_or_path: str | None = _opt(None, "student model (or use student_num_layers)")
    student_num_layers: int | None = _opt(None, "initialise the student from the task-trained teacher, keeping "
                                                "this many evenly spaced layers (DistilBERT-style)")
    teacher_num_train_epochs: float = _opt(3.0, "epochs of the teacher fine-tuning stage")
    teacher_learning_rate: float = _opt(5e-5, "peak learning rate of the teacher fine-tuning stage (linear decay "
                                              "after warmup)")
    teacher_min_margin: float = _opt(0.01, "the fine-tuned teacher must beat the majority-class baseline on the "
                                           "validation metric by this much, or the run stops before distilling "
                                           "(a negative value disables the check)")

    # ---- PEE-KD (read by kdengine.methods.pee_kd) ----
    teacher_backbone: str = _opt("frozen", "PEE-KD: the teacher backbone while its prompt experts train",
                                 ("frozen", "trainable"))
    num_experts: int = _opt(4, "PEE-KD: prompt experts (the selector's K)")
    num_virtual_tokens: int = _opt(8, "PEE-KD: virtual tokens per prompt expert")
    prompt_kind: str = _opt("prefix", "PEE-KD: deep prefix (P-tuning v2, as the paper) or input prompt",
                            ("prompt", "prefix"))
    prompt_placement: str = _opt("prepend", "PEE-KD: where input prompts go", ("prepend", "append"))
    expert_weighting: str = _opt("entropy", "PEE-KD: per-example weights of the experts' outputs",
                                 ("uniform", "entropy", "confidence"))
    expert_sharpness: float = _opt(1.0, "PEE-KD: entropy weighting alpha = softmax(-H / expert_sharpness) "
                                        "(smaller is sharper)")
    fusion_space: str = _opt("logit", "PEE-KD: fuse experts as logits or as probabilities", ("logit", "prob"))
    selector: str = _opt("learned", "PEE-KD: learned selector routing to the top experts, or none (all)",
                         ("learned", "none"))
    teacher_top_k: int | None = _opt(None, "PEE-KD: experts run per example (None = all)")
    expert_weighting_loss: str = _opt("uncertainty", "PEE-KD: expert training loss weighting",
                                      ("uncertainty", "none"))
    expert_learning_rate: float = _opt(1e-2, "PEE-KD: learning rate of the prompt experts")
    expert_num_train_epochs: float = _opt(2.0, "PEE-KD: epochs of the expert training stage")
    selector_learning_rate: float = _opt(1e-3, "PEE-KD: learning rate of the selector")
    selector_num_train_epochs: float = _opt(1.0, "PEE-KD: epochs of the selector training stage")
    selector_hidden_size: int = _opt(512, "PEE-KD: selector MLP width (the paper's 512)")

    # ---- distillation loss (kdengine.ops.kd_loss) ----
    kd_divergence: str = _opt("forward_kl", "divergence between teacher and student distributions", DIVERGENCES)
    kd_temperature: float = _opt(4.0, "softmax temperature T (losses scaled by T^2)")
    kd_weight: float = _opt(0.3, "weight of the distillation term")
    hard_weight: float = _opt(0.7, "weight of the cross-entropy on labels")
    jsd_beta: float = _opt(0.5, "generalised JSD beta (TRL semantics: 0 forward KL, 1 reverse KL)")

    def stage_list(self) -> list[str]:
        return list(STAGES) if self.stages.strip() == "all" else [s.strip() for s in self.stages.split(",")]

    def report_list(self) -> list[str]:
        return [r.strip() for r in self.report_to.split(",") if r.strip() and r.strip() != "none"]

    def best_metric_name(self) -> str:
        """``metric_for_best_model`` without its eval_ prefix (default by task)."""
        name = self.metric_for_best_model or ("f1" if self.task == "token_classification" else "accuracy")
        return name[len("eval_"):] if name.startswith("eval_") else name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else "; see --help for the options"


def _base_type(name: str):
    """(type, optional) of a field from its annotation (int | None -> (int, True))."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return args[0], True
    return hint, False


def convert(name: str, value):
    """Convert a YAML or flag value to the field's type (ConfigError naming the option)."""
    if name not in FIELDS:
        raise ConfigError(f"unknown option {name!r}{_suggest(name)}")
    kind, optional = _base_type(name)
    if name == "resume_from_checkpoint":
        if value is None or value is False or str(value).lower() in ("none", "null", "false", ""):
            return None
        return "last" if value is True or str(value).lower() in ("true", "last") else str(value)
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
        raise ConfigError(f"{name} expects {kind.__name__}{' or None' if optional else ''}, got {value!r}") from None


def _check_range(cfg: TrainConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        value = getattr(cfg, name)
        if choices and value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(value, float):
            need(math.isfinite(value), f"{name} must be finite, got {value}")
    for name in ("learning_rate", "teacher_learning_rate", "expert_learning_rate", "selector_learning_rate",
                 "kd_temperature"):
        need(getattr(cfg, name) > 0, f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("num_train_epochs", "teacher_num_train_epochs", "expert_num_train_epochs",
                 "selector_num_train_epochs", "weight_decay", "max_grad_norm", "kd_weight", "hard_weight",
                 "expert_sharpness"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    need(cfg.kd_weight + cfg.hard_weight > 0, "kd_weight + hard_weight must be > 0 (otherwise the loss is 0)")
    need(cfg.max_steps > 0 or cfg.num_train_epochs > 0,
         "num_train_epochs must be > 0 when max_steps <= 0 (nothing to train)")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "save_steps", "num_experts", "num_virtual_tokens", "selector_hidden_size",
                 "max_seq_length", "synthetic_num_train"):
        need(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("dataloader_num_workers", "synthetic_num_validation", "synthetic_num_test"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("eval_steps", "save_total_limit", "max_train_samples", "max_eval_samples", "student_num_layers",
                 "teacher_top_k"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"{name} must be >= 1 or None, got {value}")
    need(0.0 <= cfg.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    need(0.0 <= cfg.jsd_beta <= 1.0, f"jsd_beta must be in [0, 1], got {cfg.jsd_beta}")
    need(not (cfg.bf16 and cfg.fp16), "bf16 and fp16 are exclusive; choose one")
    need(cfg.teacher_top_k is None or cfg.teacher_top_k <= cfg.num_experts,
         f"teacher_top_k={cfg.teacher_top_k} exceeds num_experts={cfg.num_experts}")
    stages = cfg.stage_list()
    for stage in stages:
        need(stage in STAGES, f"unknown stage {stage!r} in stages={cfg.stages!r}; expected 'all' or a comma "
                              f"list of {', '.join(STAGES)}")
    for tracker in cfg.report_list():
        need(tracker in REPORT_TO, f"unknown report_to entry {tracker!r}; expected tensorboard or none")
    metric = cfg.best_metric_name()
    allowed = ("f1", "precision", "recall", "accuracy", "loss") if cfg.task == "token_classification" \
        else ("accuracy", "loss")
    need(metric in allowed, f"metric_for_best_model={cfg.metric_for_best_model!r} is not computed for "
                            f"{cfg.task}; expected one of {', '.join(allowed)} (with or without eval_)")
    need(bool(cfg.output_dir.strip()), "output_dir must not be empty")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range and choice checks of every option (ConfigError); returns cfg."""
    _check_range(cfg)
    return cfg


def from_dict(values: dict, base: TrainConfig | None = None, *, source: str = "config") -> TrainConfig:
    """Apply ``values`` over ``base`` (defaults when None); unknown keys are ConfigErrors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must be a mapping of option: value, got {type(values).__name__}")
    updates = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown option {key!r} in {source}{_suggest(str(key))}")
        updates[key] = convert(key, value)
    return dataclasses.replace(base or TrainConfig(), **updates)


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
    return values or {}


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = _Parser(prog="python -m kdengine.train", allow_abbrev=False,
                     description="Train a distilled student (defaults: PEE-KD on the synthetic task with tiny "
                                 "models). YAML from --config replaces defaults; flags override the YAML.")
    parser.add_argument("--config", default=None, help="YAML file of options (default: none)")
    for name, f in FIELDS.items():
        kind, optional = _base_type(name)
        choices = f.metadata.get("choices")
        meta = "{" + ",".join(choices) + "}" if choices else kind.__name__.upper()
        flag_only = dict(nargs="?", const="true") if kind is bool else {}
        default = f"default: {getattr(defaults, name)!r}"
        if name in EMBEDDED_DEFAULTS:
            default += f"; {EMBEDDED_DEFAULTS[name]!r} on the embedded synthetic task"
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=meta, **flag_only,
                            help=f"{f.metadata['help']} ({default})")
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """defaults <- YAML (--config) <- flags; validated. ConfigError on any bad option.

    On the embedded task (:func:`is_embedded`) the options of ``EMBEDDED_DEFAULTS`` that neither
    the YAML nor a flag set take their embedded values."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0]
            raise ConfigError(f"unknown option --{key}{_suggest(key)}")
        raise ConfigError(f"unexpected argument {token!r} (options are --key value)")
    flags = {k: v for k, v in vars(namespace).items() if k != "config"}
    cfg, given = TrainConfig(), set(flags)
    if namespace.config:
        values = load_yaml(namespace.config)
        cfg = from_dict(values, cfg, source=namespace.config)
        given |= set(values)
    cfg = from_dict(flags, cfg, source="the command line")
    if is_embedded(cfg):
        cfg = dataclasses.replace(cfg, **{k: v for k, v in EMBEDDED_DEFAULTS.items() if k not in given})
    return validate(cfg)
