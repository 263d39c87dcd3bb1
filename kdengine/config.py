"""The run configuration of ``python -m kdengine.train``: general options, the method's own, YAML and flags.

The general options are :class:`~kdengine.options.TrainConfig`; the method (``--method``: a
built-in name or ``package.module:ClassName``) brings its own options dataclass
(``Method.options_class``), stored as ``cfg.options``. ``parse_args`` applies, in order: defaults,
then ``--config run.yaml`` (replaces defaults), then ``--key value`` flags (override the YAML):
TRL's ``parse_args_and_config`` behaviour, one flat namespace for both kinds of option. Unknown
keys, a method's option given to another method, and out-of-range values raise
:class:`ConfigError` (a ValueError) before any work; unknown keys name the closest valid one.
Option names follow transformers ``TrainingArguments`` where one exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib

import yaml

from kdengine.methods import REGISTRY, builtin_methods, resolve_method
from kdengine.options import GENERAL, ConfigError, MethodOptions, Schema, TrainConfig, check_general  # noqa: F401

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


def method_options(method_cls, values: dict):
    """The options of ``method_cls`` from ``values`` ({option of the method: raw value}; the others
    keep their defaults), converted, choice-checked and validated (ConfigError naming the method)."""
    options_class = method_cls.options_class
    if not (isinstance(options_class, type) and issubclass(options_class, MethodOptions)
            and dataclasses.is_dataclass(options_class)):
        raise ConfigError(f"method {_label(method_cls)}: options_class must be a dataclass subclassing "
                          f"kdengine.options.MethodOptions, got {options_class!r}")
    schema = Schema(options_class)
    for name in schema.fields:
        if name in GENERAL.fields:
            raise ConfigError(f"method {_label(method_cls)}: its option {name!r} has the name of a general "
                              f"option; rename it")
    options = method_cls.options_class(**{k: schema.convert(k, v) for k, v in values.items()})
    schema.check(options)
    try:
        options.validate()
    except ValueError as exc:
        raise ConfigError(f"{exc} (an option of method {_label(method_cls)})") from None
    return options


def options_for(cfg: TrainConfig, name: str) -> TrainConfig:
    """``cfg`` for the method ``name`` (e.g. a baseline): its options take the values of the options
    of ``cfg.options`` with the same name (the shared distillation loss), defaults otherwise."""
    method_cls = resolve_method(name)
    shared = {}
    if cfg.options is not None:
        mine = Schema(method_cls.options_class).fields
        shared = {k: v for k, v in Schema(type(cfg.options)).values(cfg.options).items() if k in mine}
    return dataclasses.replace(cfg, method=name, options=method_options(method_cls, shared))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range and choice checks of the general options (ConfigError); returns cfg."""
    check_general(cfg)
    return cfg


def _method_list(names: list[str]) -> str:
    """'method a' or 'methods a, b, c'."""
    return f"method {names[0]}" if len(names) == 1 else f"methods {', '.join(names)}"


def _label(method_cls) -> str:
    """A method's name as --method takes it."""
    builtin = REGISTRY.get(method_cls.name)
    return method_cls.name if builtin == f"{method_cls.__module__}:{method_cls.__name__}" \
        else f"{method_cls.__module__}:{method_cls.__name__}"


def _methods(method_cls=None) -> dict[str, type]:
    """{label: class} of the built-in methods, led by ``method_cls`` when it is not one (so --help
    lists all of an out-of-tree method's options in its own group, shared names included)."""
    methods = builtin_methods()
    if method_cls is not None and method_cls not in methods.values():
        methods = {_label(method_cls): method_cls, **methods}
    return methods


def _owners(methods: dict[str, type]) -> dict[str, list[str]]:
    """{method option name: [labels of the methods taking it]}."""
    owners: dict[str, list[str]] = {}
    for name, cls in methods.items():
        for key in Schema(cls.options_class).fields:
            owners.setdefault(key, []).append(name)
    return owners


def _suggest(key: str, method_cls) -> str:
    names = list(GENERAL.fields) + list(Schema(method_cls.options_class).fields)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else "; see --help for the options"


def _split(values: dict, method_cls, source: str, flag: bool) -> tuple[dict, dict]:
    """({general option: value}, {method option: value}) of ``values`` (ConfigError on any other key)."""
    mine = Schema(method_cls.options_class).fields
    owners = _owners(_methods(method_cls))
    general, specific = {}, {}
    for key, value in values.items():
        shown = f"--{key}" if flag else repr(key)
        if key in GENERAL.fields:
            general[key] = GENERAL.convert(key, value)
        elif key in mine:
            specific[key] = value
        elif key in owners:
            raise ConfigError(f"option {shown} in {source} belongs to {_method_list(owners[key])}, not to "
                              f"the method of this run, {_label(method_cls)}")
        else:
            where = "" if flag else f" in {source}"
            raise ConfigError(f"unknown option {shown}{where}{_suggest(str(key), method_cls)}")
    return general, specific


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"config file {path!r} is not valid YAML{where}: {problem}") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must be a mapping of option: value, got {type(values).__name__}")
    return values


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def _add_option(group, schema: Schema, name: str, defaults, note: str = "") -> None:
    f = schema.fields[name]
    kind, _ = schema.base_type(name)
    choices = f.metadata.get("choices")
    meta = "{" + ",".join(choices) + "}" if choices else kind.__name__.upper()
    flag_only = dict(nargs="?", const="true") if kind is bool else {}
    default = f"default: {getattr(defaults, name)!r}"
    if name in EMBEDDED_DEFAULTS:
        default += f"; {EMBEDDED_DEFAULTS[name]!r} on the embedded synthetic task"
    group.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=meta, **flag_only,
                       help=f"{f.metadata['help']} ({default}{note})")


def build_parser(method_cls=None) -> argparse.ArgumentParser:
    """Every general option, then the options of each built-in method (and of ``method_cls``), each
    option once, in the group of the first method that takes it."""
    parser = _Parser(prog="python -m kdengine.train", allow_abbrev=False,
                     description="Train a distilled student (defaults: PEE-KD on the synthetic task with tiny "
                                 "models). YAML from --config replaces defaults; flags override the YAML. A "
                                 "method's options are accepted only with that method.")
    parser.add_argument("--config", default=None, help="YAML file of options (default: none)")
    defaults = TrainConfig()
    for name in GENERAL.fields:
        _add_option(parser, GENERAL, name, defaults)
    methods = _methods(method_cls)
    owners = _owners(methods)
    seen = set(GENERAL.fields)
    for label, cls in methods.items():
        schema = Schema(cls.options_class)
        new = [name for name in schema.fields if name not in seen]
        if new:
            group = parser.add_argument_group(f"options of method {label}")
            for name in new:
                others = f"; methods {', '.join(owners[name])}" if len(owners[name]) > 1 else ""
                _add_option(group, schema, name, cls.options_class(), others)
        seen.update(new)
    return parser


def _method_name(argv: list[str] | None) -> tuple[str, str | None]:
    """(method, --config path) from the command line and the YAML, before the full parse."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--method", default=None)
    known, _ = pre.parse_known_args(argv)
    yaml_method = load_yaml(known.config).get("method") if known.config else None
    return str(known.method or yaml_method or TrainConfig.method), known.config


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """defaults <- YAML (--config) <- flags; validated. ConfigError on any bad option.

    On the embedded task (:func:`is_embedded`) the options of ``EMBEDDED_DEFAULTS`` that neither
    the YAML nor a flag set take their embedded values, and a method that does not support the
    default task runs its first task (``Method.tasks``) unless ``task`` is set."""
    method_name, config_path = _method_name(argv)
    try:
        method_cls = resolve_method(method_name)
    except ConfigError:
        if argv is not None and ("--help" in argv or "-h" in argv):
            build_parser().parse_args(["--help"])
        raise
    parser = build_parser(method_cls)
    namespace, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0]
            raise ConfigError(f"unknown option --{key}{_suggest(key, method_cls)}")
        raise ConfigError(f"unexpected argument {token!r} (options are --key value)")
    yaml_values = load_yaml(config_path) if config_path else {}
    yaml_general, yaml_method = _split(yaml_values, method_cls, config_path, flag=False)
    flags = {k: v for k, v in vars(namespace).items() if k != "config"}
    flag_general, flag_method = _split(flags, method_cls, "the command line", flag=True)
    given = set(yaml_general) | set(flag_general)
    cfg = dataclasses.replace(TrainConfig(), **{**yaml_general, **flag_general})
    if is_embedded(cfg):
        cfg = dataclasses.replace(cfg, **{k: v for k, v in EMBEDDED_DEFAULTS.items() if k not in given})
        if "task" not in given and cfg.task not in method_cls.tasks:   # e.g. prompt_kd: the causal_lm task
            cfg = dataclasses.replace(cfg, task=method_cls.tasks[0])
    validate(cfg)
    options = method_options(method_cls, {**yaml_method, **flag_method})
    return dataclasses.replace(cfg, options=options)

