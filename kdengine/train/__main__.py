"""``python -m kdengine.train``: teacher -> method stages -> student -> evaluation, one command.

CPU smoke run (the embedded default: PEE-KD on the synthetic task with tiny models, plus the
no_kd and vanilla_kd baselines, a few minutes on 2 cores)::

    python -m kdengine.train
    python -m kdengine.train --config configs/sst2.yaml --num_train_epochs 1
    python -m kdengine.train --method examples.custom_method:HiddenStateKD --hidden_weight 0.5
    torchrun --nproc_per_node 2 -m kdengine.train --config run.yaml      # DDP (or accelerate launch -m)

Stages (``--stages``): ``teacher`` (each task-trained teacher in output_dir/teacher, teacher_1,
...), ``method`` (the method's own stages before its student, e.g. PEE-KD's experts and
selector), ``student`` (the student stage), ``evaluate`` (validation metrics, result JSONs, plots,
the comparison table). Every stage runs on the one training loop (:mod:`kdengine.train.trainer`)
and checkpoints; a stage whose output exists is skipped, and ``--resume_from_checkpoint last``
continues the stage a killed run was in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, replace

from kdengine.config import RUN_CONTROL_KEYS, ConfigError, TrainConfig, load_yaml, parse_args, to_yaml

BASELINES = ("no_kd", "vanilla_kd")
TINY_MODELS = "tiny_models"


@dataclass
class TaskInputs:
    """The tokenized task shared by the teacher, the baselines and the main student."""

    label_names: list[str]
    tokenizer: object
    train_dataset: object
    eval_dataset: object
    collate_fn: object
    domain_names: list[str] | None = None   # sorted domains of the training split (None: no domain column)


def _log(is_main: bool):
    """print on the main process only."""
    def log(message: str) -> None:
        if is_main:
            print(message, flush=True)
    return log


def describe_backends(requested: str) -> str:
    """One line saying which kernel backends can run here; ValueError (before any work) when the
    requested one cannot."""
    from kdengine.ops._backends import BACKENDS, availability  # noqa: PLC0415

    status = {name: availability(name) for name in BACKENDS}
    if requested != "auto" and not status[requested][0]:
        raise ValueError(f"kernel_backend={requested!r} cannot run here: {status[requested][1]}; use "
                         f"--kernel_backend auto (or see python -m kdengine.info)")
    usable = [name for name in BACKENDS if status[name][0]]
    chosen = (f"the ops use the first of {', '.join(usable)} that accepts their inputs" if requested == "auto"
              else f"every op runs on {requested}")
    skipped = "; ".join(f"{name} unavailable: {why}" for name, (ok, why) in status.items() if not ok)
    return f"kernel_backend={requested}: {chosen}" + (f" ({skipped})" if skipped else "")


def check_output_path(output_dir: str) -> None:
    """output_dir must be a directory this process can write, or a path where one can be created."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} is a file; expected a directory (existing or to be created)")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"output_dir {output_dir!r} is under the file {existing!r}; expected a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {output_dir!r} cannot be written: {existing!r} is not writable by this user; "
                         f"pass another --output_dir")


def check_precision(cfg: TrainConfig) -> None:
    """fp16 and bf16 only where they run: fp16 needs a CUDA device (accelerate would silently train
    in fp32 without one), bf16 a CUDA device that supports it or the CPU (CPU autocast)."""
    import torch  # noqa: PLC0415

    if cfg.fp16 and not torch.cuda.is_available():
        raise ValueError("fp16 needs a CUDA device and none is available here; use --bf16 true (CPU autocast) or "
                         "drop --fp16 (fp32)")
    if cfg.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16 is not supported by {torch.cuda.get_device_name()}; use --fp16 true or drop --bf16")


def check_output_dir(cfg: TrainConfig) -> bool:
    """Refuse an output_dir that holds a different run, or an unfinished one when not resuming;
    returns whether the run there is to be replaced (overwrite_output_dir; removed once validated)."""
    from kdengine.train.stages import unfinished_checkpoints  # noqa: PLC0415

    saved_path = os.path.join(cfg.output_dir, "config.yaml")
    if not os.path.isfile(saved_path):
        return False
    if cfg.overwrite_output_dir:
        return True
    saved = load_yaml(saved_path)
    current = cfg.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items()
             if k not in RUN_CONTROL_KEYS and saved.get(k) != v]
    if diffs:
        raise ValueError(f"output_dir {cfg.output_dir!r} holds a run with a different config ({'; '.join(diffs[:6])}"
                         f"{' ...' if len(diffs) > 6 else ''}); use a new --output_dir, or pass "
                         f"--overwrite_output_dir true to replace that run")
    if cfg.resume_from_checkpoint is None and unfinished_checkpoints(cfg.output_dir):
        raise ValueError(f"output_dir {cfg.output_dir!r} holds checkpoints of an unfinished run; pass "
                         f"--resume_from_checkpoint last to continue it, or --overwrite_output_dir true to restart")
    return False


def check_model_limits(cfg: TrainConfig, sources: list[tuple[str, str]], tokenizer) -> None:
    """Every model of ``sources`` ([(option, directory)], teachers first) reads the tokenized batch:
    max_seq_length within its positions, token ids within its embeddings, and student_num_layers
    within the first teacher's layers (read from the configs)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from kdengine import models  # noqa: PLC0415

    for index, (role, source) in enumerate(sources):
        config = AutoConfig.from_pretrained(source)
        positions = models.text_positions(config)
        if positions is not None and cfg.max_seq_length > positions:
            raise ValueError(f"max_seq_length={cfg.max_seq_length} exceeds the {positions} positions of {role} "
                             f"{source!r}; pass --max_seq_length {positions} or less")
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {role} {source!r} embeds only {vocab} "
                             f"ids; use the model's own tokenizer (or resize its embeddings)")
        layers = getattr(config, "num_hidden_layers", None)
        if index == 0 and role == "teacher_model_name_or_path" and cfg.student_num_layers is not None \
                and layers is not None and not 1 <= cfg.student_num_layers <= layers:
            raise ValueError(f"student_num_layers must be in [1, {layers}] (the teacher {source!r} has {layers} "
                             f"layers), got {cfg.student_num_layers}")


@dataclass
class RunPlan:
    """What the validation of a run found; nothing of it is written yet."""

    inputs: TaskInputs
    teacher_srcs: list[str]
    student_src: str | None
    tiny: bool
    resume: str | None
    replace_output_dir: bool
    tiny_build: str | None = None     # tiny models built in a temporary directory, moved into output_dir/tiny_models
    teacher_cache: object = None      # kdengine.teacher_cache.TeacherCache of --teacher_cache (checked against the run)


def load_inputs(cfg: TrainConfig, log, scratch: str) -> tuple[TaskInputs, list[str], str | None, bool, str | None]:
    """(TaskInputs, teacher sources, student source, tiny, tiny_build) from the data options, writing
    nothing into output_dir: missing tiny models are built in ``scratch`` (``tiny_build``) and the
    sources name their final place, output_dir/tiny_models."""
    from kdengine import models  # noqa: PLC0415
    from kdengine.data import load_task_data, make_collate_fn, tokenize_split  # noqa: PLC0415

    synthetic = not (cfg.train_file or cfg.dataset_name)
    data = load_task_data({**cfg.to_dict(), "synthetic": {"n_train": cfg.synthetic_num_train,
                                                          "n_validation": cfg.synthetic_num_validation,
                                                          "n_test": cfg.synthetic_num_test}})
    if data.validation is None:
        raise ValueError("the task has no validation split; pass --validation_file (it is used for evaluation)")
    teacher_srcs, student_src, tiny, tiny_build = cfg.teacher_list(), cfg.model_name_or_path, False, None
    read = {}                                  # source -> where it is read now (tiny models: the temporary build)
    if not teacher_srcs and student_src is None:
        if not synthetic:
            raise ValueError("tiny models are built only for the synthetic task; pass --teacher_model_name_or_path "
                             "and --model_name_or_path (or --student_num_layers) for real data")
        from kdengine.data.synthetic import instruction_vocab, synthetic_vocab  # noqa: PLC0415
        from kdengine.tiny_models import build_tiny_models  # noqa: PLC0415

        tiny_dir = os.path.join(cfg.output_dir, TINY_MODELS)
        teacher_srcs, student_src = [os.path.join(tiny_dir, "teacher")], os.path.join(tiny_dir, "student")
        if not os.path.isfile(os.path.join(student_src, "config.json")):
            from accelerate.state import PartialState  # noqa: PLC0415

            tiny_build = os.path.join(scratch, TINY_MODELS)
            vocab = instruction_vocab() if cfg.task == "causal_lm" else synthetic_vocab()
            # The main process builds them (under torch.distributed transformers' save_pretrained writes
            # on rank 0 only) into the scratch directory every process shares.
            state = PartialState()
            if state.is_main_process:
                build_tiny_models(tiny_build, task=cfg.task, label_names=data.label_names, vocab=vocab,
                                  seed=cfg.seed)
            state.wait_for_everyone()
            read = {teacher_srcs[0]: os.path.join(tiny_build, "teacher"), student_src: os.path.join(tiny_build, "student")}
        tiny = True
        if cfg.student_num_layers is not None:
            student_src = None
    elif student_src is None and cfg.student_num_layers is None:
        raise ValueError("no student: pass --model_name_or_path or --student_num_layers (layers kept from the teacher)")
    if student_src is not None and cfg.student_num_layers is not None:
        raise ValueError("pass either --model_name_or_path or --student_num_layers, not both")
    tokenizer_src = student_src or teacher_srcs[0]
    tokenizer = models.load_tokenizer(read.get(tokenizer_src, tokenizer_src),
                                      "model_name_or_path" if student_src else "teacher_model_name_or_path")
    for source in teacher_srcs:
        if source != tokenizer_src:
            models.check_tokenizers(models.load_tokenizer(read.get(source, source), "teacher_model_name_or_path"),
                                    tokenizer)
    if len(teacher_srcs) > 1:
        models.check_teacher_labels(teacher_srcs)
    check_model_limits(cfg, [("teacher_model_name_or_path", read.get(s, s)) for s in teacher_srcs]
                       + ([("model_name_or_path", read.get(student_src, student_src))] if student_src else []),
                       tokenizer)
    label_names = data.label_names
    domains = sorted({ex["domain"] for ex in data.train if ex.get("domain") is not None}) or None
    split = dict(tokenizer=tokenizer, task=cfg.task, max_seq_length=cfg.max_seq_length, domain_names=domains)
    inputs = TaskInputs(label_names=label_names, tokenizer=tokenizer,
                        train_dataset=tokenize_split(data.train, **split),
                        eval_dataset=tokenize_split(data.validation, **split),
                        collate_fn=make_collate_fn(tokenizer, cfg.task), domain_names=domains)
    log(f"[data] {'synthetic task' if synthetic else cfg.train_file or cfg.dataset_name}: "
        f"{len(inputs.train_dataset)} train / {len(inputs.eval_dataset)} validation examples, labels {label_names}")
    return inputs, teacher_srcs, student_src, tiny, tiny_build


def student_dirs(cfg: TrainConfig) -> dict[str, str]:
    """{method: the directory its student is trained in}: the baselines of compare_baselines, then the run's method."""
    from kdengine.methods import REGISTRY  # noqa: PLC0415

    same = REGISTRY.get(cfg.method)           # an alias of a baseline (sft is no_kd) trains it once
    methods = [m for m in BASELINES if cfg.compare_baselines and m != cfg.method and REGISTRY[m] != same]
    return {**{m: os.path.join(cfg.output_dir, "baselines", m) for m in methods}, cfg.method: cfg.output_dir}


def needs_teachers(methods, student_src: str | None) -> bool:
    """Whether the run prepares its teachers: a method of ``methods`` uses them, or the student is
    made from the first (student_num_layers)."""
    from kdengine.methods import resolve_method  # noqa: PLC0415

    return any(resolve_method(m).uses_teacher for m in methods) or student_src is None


def check_stage_inputs(cfg: TrainConfig, plan: RunPlan) -> None:
    """The outputs the requested ``stages`` read must exist when the stages that write them do not run."""
    from kdengine.train.teacher import teacher_dir, teacher_name  # noqa: PLC0415

    stages, methods = cfg.stage_list(), student_dirs(cfg)
    needs_teacher = needs_teachers(methods, plan.student_src)
    if needs_teacher and not plan.teacher_srcs:
        raise ValueError(f"method {cfg.method!r} needs a teacher: pass --teacher_model_name_or_path")
    if needs_teacher and plan.tiny and "teacher" not in stages:
        for index in range(len(plan.teacher_srcs)):
            if not os.path.isdir(teacher_dir(cfg.output_dir, teacher_name(index))):
                raise ValueError(f"the teacher stage has not run: {teacher_dir(cfg.output_dir, teacher_name(index))} "
                                 "does not exist; run with --stages teacher (or all) first")
    for run_dir in methods.values() if "evaluate" in stages and "student" not in stages else ():
        if not os.path.isfile(os.path.join(run_dir, "train_results.json")):
            raise ValueError(f"the student stage has not run: no final student in {run_dir}; run with --stages "
                             "student (or all) first")


def run_spec(cfg: TrainConfig, plan: RunPlan):
    """The :class:`~kdengine.methods.base.RunSpec` of a validated run (model configs read from
    where the models are now: the tiny models' temporary build before they move into place)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from kdengine.config import is_embedded  # noqa: PLC0415
    from kdengine.methods.base import RunSpec  # noqa: PLC0415

    def read_config(source: str):
        if plan.tiny_build is not None:
            source = os.path.join(plan.tiny_build, os.path.basename(source))
        return AutoConfig.from_pretrained(source)

    return RunSpec(args=cfg, options=cfg.options, label_names=plan.inputs.label_names,
                   domain_names=plan.inputs.domain_names, train_dataset=plan.inputs.train_dataset,
                   teacher_sources=list(plan.teacher_srcs), embedded=is_embedded(cfg),
                   student_source=plan.student_src, read_config=read_config)


@contextlib.contextmanager
def shared_scratch(state):
    """A temporary directory that every process of the run sees: the main process makes it, broadcasts
    its path, and removes it at the end."""
    import tempfile  # noqa: PLC0415

    from accelerate.utils import broadcast_object_list  # noqa: PLC0415

    path = [tempfile.mkdtemp(prefix="kdengine-") if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(path)
    try:
        yield path[0]
        state.wait_for_everyone()
    finally:
        if state.is_main_process:
            shutil.rmtree(path[0], ignore_errors=True)


def validate_run(cfg: TrainConfig, log, scratch: str) -> RunPlan:
    """Every check that can run before any work (options, output_dir, resume checkpoints, method,
    backends, precision, data, labels, models' limits, stage inputs); writes nothing but tiny models
    into ``scratch``."""
    from kdengine.methods import resolve_method  # noqa: PLC0415
    from kdengine.methods.base import STUDENT  # noqa: PLC0415
    from kdengine.train import checkpoint  # noqa: PLC0415
    from kdengine.train.stages import check_stage_names, unfinished_checkpoints  # noqa: PLC0415

    check_output_path(cfg.output_dir)
    replace_output_dir = check_output_dir(cfg)
    resume = None if replace_output_dir else checkpoint.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    if cfg.resume_from_checkpoint is not None and not replace_output_dir:
        for directory in {resume, *unfinished_checkpoints(cfg.output_dir)} - {None}:
            checkpoint.verify(directory, STUDENT if directory == resume else None)
    method_cls = resolve_method(cfg.method)
    check_stage_names(method_cls.stage_names(cfg.options), cfg.method)
    if cfg.task not in method_cls.tasks:
        raise ValueError(f"method {cfg.method} does not support task {cfg.task} (it supports "
                         f"{', '.join(method_cls.tasks)})")
    log(f"[backends] {describe_backends(cfg.kernel_backend)}")
    check_precision(cfg)
    inputs, teacher_srcs, student_src, tiny, tiny_build = load_inputs(cfg, log, scratch)
    plan = RunPlan(inputs, teacher_srcs, student_src, tiny, resume, replace_output_dir, tiny_build)
    method_cls.check_run(run_spec(cfg, plan))
    if cfg.teacher_cache is not None:
        from kdengine.teacher_cache import open_for_run  # noqa: PLC0415

        plan.teacher_cache = open_for_run(cfg, inputs, student_src)
    check_stage_inputs(cfg, plan)
    return plan


def run(cfg: TrainConfig, after_method_stages=None) -> dict:
    """Run the configured stages; returns {method: {"eval": ..., "train": ...}} of the students.

    Validation (:func:`validate_run`) comes first and writes nothing: a run refused there leaves
    output_dir as it found it. Only then is output_dir created (or replaced, with
    overwrite_output_dir) and config.yaml written. ``after_method_stages(method)``, when given, replaces
    each student's stages once its method stages are done (kdengine.cache_teacher)."""
    from accelerate.state import PartialState  # noqa: PLC0415

    from kdengine.config import options_for  # noqa: PLC0415
    from kdengine.methods import resolve_method  # noqa: PLC0415
    from kdengine.train import checkpoint  # noqa: PLC0415
    from kdengine.train.reporting import finish_comparison  # noqa: PLC0415
    from kdengine.train.teacher import (  # noqa: PLC0415
        TeacherFailedError, prepare_teacher, teacher_dir, teacher_name, teacher_row)
    from kdengine.train.trainer import cpu_only  # noqa: PLC0415

    if cfg.options is None:
        cfg = options_for(cfg, cfg.method)
    state = PartialState(cpu=cpu_only())
    log = _log(state.is_main_process)
    log(f"[config] method={cfg.method} task={cfg.task} output_dir={cfg.output_dir} stages={cfg.stage_list()} "
        f"processes={state.num_processes} device={state.device}")
    with shared_scratch(state) as scratch:
        plan = validate_run(cfg, log, scratch)
        state.wait_for_everyone()
        fresh_output_dir = plan.replace_output_dir or not os.path.isdir(cfg.output_dir) \
            or not os.listdir(cfg.output_dir)
        if state.is_main_process:
            if plan.replace_output_dir:
                shutil.rmtree(cfg.output_dir)
            os.makedirs(cfg.output_dir, exist_ok=True)
            with open(os.path.join(cfg.output_dir, "config.yaml"), "w", encoding="utf-8") as fh:
                fh.write(to_yaml(cfg))
            if plan.tiny_build is not None:
                shutil.move(plan.tiny_build, os.path.join(cfg.output_dir, TINY_MODELS))
        state.wait_for_everyone()
    methods = list(student_dirs(cfg))
    inputs, teacher_srcs, student_src, tiny, stages = (plan.inputs, plan.teacher_srcs, plan.student_src, plan.tiny,
                                                       cfg.stage_list())
    needs_teacher = needs_teachers(methods, student_src)
    if plan.teacher_cache is not None:  # the cache is the teacher side: no teacher is prepared or loaded
        needs_teacher = False
    teacher_paths = []
    for index, source in enumerate(teacher_srcs if needs_teacher else []):
        name = teacher_name(index)
        if "teacher" in stages:
            try:
                teacher_paths.append(prepare_teacher(cfg, inputs, source, name=name, needs_training=tiny, log=log))
            except TeacherFailedError:
                if fresh_output_dir and state.is_main_process:  # this run made it: leave nothing behind
                    shutil.rmtree(cfg.output_dir, ignore_errors=True)
                raise
        elif os.path.isdir(teacher_dir(cfg.output_dir, name)):
            teacher_paths.append(teacher_dir(cfg.output_dir, name))
        else:
            teacher_paths.append(source)
    teacher_results = {}
    if "evaluate" in stages:
        teacher_results = {teacher_name(i): teacher_row(cfg, inputs, path, log=log)
                           for i, path in enumerate(teacher_paths)}
    results = {}
    for name in methods:
        if name == cfg.method:
            run_cfg, run_resume = cfg, plan.resume
        else:
            run_dir = student_dirs(cfg)[name]
            run_cfg = replace(options_for(cfg, name), output_dir=run_dir)
            run_resume = checkpoint.resolve_resume("last", run_dir) if cfg.resume_from_checkpoint else None
        results[name] = run_student(run_cfg, resolve_method(name), inputs, teacher_paths=teacher_paths,
                                    teacher_sources=teacher_srcs, teacher_results=teacher_results,
                                    student_src=student_src, resume=run_resume, log=log,
                                    teacher_cache=plan.teacher_cache, after_method_stages=after_method_stages)
    if "evaluate" in stages and state.is_main_process:
        finish_comparison(cfg, teacher_results, results, log=log)
    state.wait_for_everyone()
    return results


def run_student(cfg: TrainConfig, method_cls, inputs: TaskInputs, *, teacher_paths, teacher_sources, teacher_results,
                student_src, resume, log, teacher_cache=None, after_method_stages=None) -> dict:
    """The method's stages (its own, then the student's) and the evaluate stage of one student in
    ``cfg.output_dir``. ``teacher_paths``: the task-trained teachers; ``teacher_results``: their
    validation rows {name: results}."""
    from kdengine import models  # noqa: PLC0415
    from kdengine.atomic import write_json  # noqa: PLC0415
    from kdengine.methods.base import STUDENT  # noqa: PLC0415
    from kdengine.plots import plot_run  # noqa: PLC0415
    from kdengine.train.reporting import read_json, write_results  # noqa: PLC0415
    from kdengine.train.stages import run_method_stage  # noqa: PLC0415
    from kdengine.train.teacher import context  # noqa: PLC0415
    from kdengine.train.trainer import Trainer, make_accelerator, save_model, seed_stage  # noqa: PLC0415

    seed_stage(cfg.seed, f"{cfg.method}:models")
    stages, run_dir = cfg.stage_list(), cfg.output_dir
    accelerator = make_accelerator(cfg, run_dir)
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as fh:
            fh.write(to_yaml(cfg))
    accelerator.wait_for_everyone()
    loaded = [models.freeze(models.load_for_task(path, cfg.task, inputs.label_names, what="teacher")[0])
              .to(accelerator.device) for path in teacher_paths]
    teacher = loaded[0] if loaded else None       # the first: student_num_layers, the logit plot
    method = method_cls(context(cfg, accelerator, inputs, run_dir, teachers=loaded if method_cls.uses_teacher else [],
                                log=log, teacher_sources=teacher_sources))
    if teacher_cache is not None:
        from kdengine.teacher_cache import attach  # noqa: PLC0415

        attach(method, teacher_cache)
    train_results = read_json(os.path.join(run_dir, "train_results.json"))
    trained_student = train_results is not None
    if not {"method", "student", "evaluate"} & set(stages):
        return {"eval": read_json(os.path.join(run_dir, "eval_results.json")) or {}, "train": train_results or {}}
    if trained_student:
        student, _ = models.load_for_task(run_dir, cfg.task, inputs.label_names, what="student")
    elif "student" not in stages:
        student = None
    elif student_src is not None:
        student, _ = models.load_for_task(student_src, cfg.task, inputs.label_names, what="model_name_or_path")
    else:
        student = models.student_from_teacher(teacher, cfg.student_num_layers)
        log(f"[{cfg.method}] student: {cfg.student_num_layers} of the teacher's "
            f"{teacher.config.num_hidden_layers} layers")
    for each in loaded if student is not None else []:
        models.check_pair(each, student, cfg.task)
    for name in method.stages[:-1]:
        run_method_stage(cfg, method, name, student, log=log)
    if after_method_stages is not None:
        return after_method_stages(method)
    trainer = None
    if "student" in stages and not trained_student:
        seed_stage(cfg.seed, f"{cfg.method}:{STUDENT}")
        stage = method.build_stage(STUDENT, student)
        trainer = Trainer(cfg, accelerator, method, stage, run_dir, desc=cfg.method)
        train_results = trainer.train(resume)
        save_model(accelerator, trainer.model, inputs.tokenizer, run_dir)
        if accelerator.is_main_process:
            _save_extra_modules(stage, run_dir)
            write_results(run_dir, "train", train_results)
            write_json(os.path.join(run_dir, "trainer_state.json"), trainer.state)
        accelerator.wait_for_everyone()
    eval_results = read_json(os.path.join(run_dir, "eval_results.json"))
    if "evaluate" in stages and (eval_results is None or trainer is not None):
        seed_stage(cfg.seed, f"{cfg.method}:evaluate")
        if trainer is None:
            trainer = Trainer(cfg, accelerator, method, method.build_stage(STUDENT, student), run_dir,
                              save_checkpoints=False, desc=cfg.method)
        # The logit plot shows classes; a causal LM's vocabulary is no scatter plot.
        eval_results = trainer.evaluate(plot_teacher=teacher if cfg.task != "causal_lm" else None)
        logits = eval_results.pop("_logits", None)
        if accelerator.is_main_process:
            eval_results["epoch"] = (train_results or {}).get("epoch")
            write_results(run_dir, "eval", eval_results)
            write_results(run_dir, "teacher", {**teacher_results, **method.teacher_report()})
            write_results(run_dir, "all", {**(train_results or {}), **eval_results})
            history = (read_json(os.path.join(run_dir, "trainer_state.json")) or {}).get("log_history", [])
            plot_run(run_dir, history, cfg.best_metric_name(), logits, inputs.label_names)
        accelerator.wait_for_everyone()
        log(f"[{cfg.method}] eval: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_results.items()
                                                  if isinstance(v, float)))
    for tracker in accelerator.trackers:
        tracker.finish()
    return {"eval": eval_results or {}, "train": train_results or {}}


def _save_extra_modules(stage, run_dir: str) -> None:
    """The student stage's modules beside the student (e.g. a projection head): ``modules/<name>.safetensors``."""
    from kdengine import models  # noqa: PLC0415
    from kdengine.atomic import atomic_directory  # noqa: PLC0415

    extra = dict(list(stage.modules.items())[1:])
    if extra:
        with atomic_directory(os.path.join(run_dir, "modules")) as tmp:
            for name, module in extra.items():
                models.save_trainable(module, os.path.join(tmp, f"{name}.safetensors"))


def _error(exc: Exception, status: int) -> int:
    """Print ``exc`` as the one line ``kdengine.train: error: ...`` (a library's multi-line text
    joined) and return the exit status."""
    print("kdengine.train: error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()),
          file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status: 0 done, 1 the training loss became NaN/inf, 2 bad options or
    inputs (refused before anything was written, but for a teacher that learned nothing)."""
    try:
        cfg = parse_args(argv)
    except ConfigError as exc:
        return _error(exc, 2)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    from kdengine.train.trainer import NonFiniteLossError  # noqa: PLC0415

    try:
        run(cfg)
    except NonFiniteLossError as exc:
        return _error(exc, 1)
    except ValueError as exc:
        return _error(exc, 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
