"""Teacher preparation: use a task-trained teacher as is, or fine-tune a pretrained one first.

A teacher directory whose checkpoint already holds the task head for the same label set (no
missing head weights, same ``id2label``) is used as is. Otherwise the model is fine-tuned on the
task (``teacher_num_train_epochs``, ``teacher_learning_rate``; the shared loop with the no_kd
loss, resumable from its checkpoints in ``output_dir/stages/teacher``) and saved to
``output_dir/teacher/`` (``save_pretrained`` + tokenizer + its ``eval_results.json``), renamed
into place only when complete. A later stage or run reuses that
folder (or points ``teacher_model_name_or_path`` at it).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from kdengine import models
from kdengine.atomic import atomic_directory, write_json
from kdengine.constants import IGNORE_INDEX
from kdengine.metrics import compute_metrics
from kdengine.methods.base import RunContext, Stage
from kdengine.methods.baselines import NoKD
from kdengine.options import MethodOptions
from kdengine.train import checkpoint
from kdengine.train.reporting import read_json, write_results
from kdengine.train.stages import DONE_MARKER, stage_accelerator, stage_done, work_dir
from kdengine.train.trainer import Trainer, make_accelerator, seed_stage

TEACHER_DIR = "teacher"


class TeacherFailedError(ValueError):
    """The fine-tuned teacher is no better than always predicting one class."""


def majority_baseline(cfg, inputs) -> tuple[float, str]:
    """(best score, label) of a predictor that always outputs one label, on the validation split,
    in the run's metric (``metric_for_best_model``): the level a teacher that learned nothing reaches."""
    import numpy as np  # noqa: PLC0415

    labels = [item["labels"] for item in inputs.eval_dataset]
    if cfg.task == "token_classification":
        width = max(len(row) for row in labels)
        refs = np.array([row + [IGNORE_INDEX] * (width - len(row)) for row in labels])
    else:
        refs = np.array(labels)
    metric = cfg.best_metric_name()
    if metric == "loss":
        return float("nan"), ""
    scores = []
    for label in range(len(inputs.label_names)):
        predictions = np.where(refs == IGNORE_INDEX, 0, label)
        scores.append(compute_metrics(cfg.task, predictions, refs, inputs.label_names)[metric])
    best = int(np.argmax(scores))
    return scores[best], inputs.label_names[best]


def check_teacher(cfg, inputs, eval_results: dict) -> None:
    """Stop the run (TeacherFailedError) when the teacher is within ``teacher_min_margin`` of the
    majority-class baseline: distilling it would teach the student nothing."""
    metric = cfg.best_metric_name()
    if cfg.teacher_min_margin < 0 or metric == "loss":
        return
    baseline, label = majority_baseline(cfg, inputs)
    score = eval_results[f"eval_{metric}"]
    if score < baseline + cfg.teacher_min_margin:
        raise TeacherFailedError(
            f"the fine-tuned teacher did not learn the task: validation {metric} {score:.4f} is at the "
            f"majority-class level ({baseline:.4f}, always predicting {label!r}; teacher_min_margin "
            f"{cfg.teacher_min_margin}) after {cfg.teacher_num_train_epochs} epochs at teacher_learning_rate "
            f"{cfg.teacher_learning_rate}. The usual cause is a learning rate far from what the model needs "
            f"(pretrained models: about 5e-5; models trained from scratch: about 1e-3) or too few epochs: set "
            f"--teacher_learning_rate / --teacher_num_train_epochs (or --teacher_min_margin -1 to distil "
            f"anyway). Nothing was kept of the teacher stage.")


def teacher_name(index: int) -> str:
    """The i-th teacher's name: its row in the reports and its directories (teacher, teacher_1, ...)."""
    return TEACHER_DIR if index == 0 else f"{TEACHER_DIR}_{index}"


def teacher_dir(output_dir: str, name: str = TEACHER_DIR) -> str:
    return os.path.join(output_dir, name)


def context(cfg, accelerator, inputs, run_dir: str, teachers=(), log=print, teacher_sources=()) -> RunContext:
    """A RunContext over the tokenized task ``inputs`` (kdengine.train.__main__.TaskInputs)."""
    return RunContext(args=cfg, options=cfg.options if cfg.options is not None else MethodOptions(),
                      accelerator=accelerator, task=cfg.task, num_labels=len(inputs.label_names),
                      label_names=inputs.label_names, tokenizer=inputs.tokenizer, teachers=list(teachers),
                      train_dataset=inputs.train_dataset, eval_dataset=inputs.eval_dataset,
                      collate_fn=inputs.collate_fn, output_dir=run_dir, device=accelerator.device, log=log,
                      teacher_sources=list(teacher_sources), domain_names=inputs.domain_names)


def prepare_teacher(cfg, inputs, source: str, *, name: str = TEACHER_DIR, needs_training: bool = False,
                    log=print) -> str:
    """Return the directory of a task-trained teacher, fine-tuning ``source`` when needed.

    The fine-tuning is the stage ``name`` on the shared loop (NoKD loss): it trains in
    ``output_dir/stages/<name>`` (checkpoints; ``resume_from_checkpoint`` continues it) and
    writes ``output_dir/<name>`` atomically once the teacher passes :func:`check_teacher`.

    Args:
        source: one teacher of teacher_model_name_or_path (local directory or hub name).
        name: :func:`teacher_name` of its index.
        needs_training: fine-tune even when a task head is present (tiny randomly initialised models).
    """
    out = teacher_dir(cfg.output_dir, name)
    if stage_done(out):
        log(f"[{name}] reusing the fine-tuned teacher in {out}")
        return out
    seed_stage(cfg.seed, name)
    model, head_trained = models.load_for_task(source, cfg.task, inputs.label_names, what="teacher_model_name_or_path")
    if head_trained and not needs_training:
        log(f"[{name}] {source} already holds a {cfg.task} head for {inputs.label_names}: used as is")
        return source
    work = work_dir(cfg.output_dir, name)
    resume = checkpoint.latest_checkpoint(work) if cfg.resume_from_checkpoint else None
    log(f"[{name}] fine-tuning {source} on the task ({cfg.teacher_num_train_epochs} epochs, "
        f"lr {cfg.teacher_learning_rate})")
    accelerator = stage_accelerator(cfg, work)
    method = NoKD(context(dataclasses.replace(cfg, options=MethodOptions()), accelerator, inputs, work, log=log))
    stage = Stage(name, {name: model}, cfg.teacher_learning_rate, cfg.teacher_num_train_epochs)
    trainer = Trainer(cfg, accelerator, method, stage, work)
    train_results = trainer.train(resume)
    eval_results = trainer.evaluate()
    for tracker in accelerator.trackers:
        tracker.finish()
    try:
        check_teacher(cfg, inputs, eval_results)
    except TeacherFailedError:
        if accelerator.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        with atomic_directory(out) as tmp:
            accelerator.unwrap_model(trainer.model).save_pretrained(tmp, safe_serialization=True)
            inputs.tokenizer.save_pretrained(tmp)
            write_results(tmp, "train", train_results)
            write_results(tmp, "eval", {**eval_results, "epoch": train_results["epoch"]})
            write_json(os.path.join(tmp, DONE_MARKER), train_results)
        checkpoint.prune(work, 0)
    accelerator.wait_for_everyone()
    log(f"[{name}] done: eval_{cfg.best_metric_name()} = {eval_results.get(f'eval_{cfg.best_metric_name()}')}"
        f" (saved to {out})")
    return out


def teacher_row(cfg, inputs, directory: str, log=print) -> dict:
    """The teacher's own validation results (from its eval_results.json, or evaluated now)."""
    saved = read_json(os.path.join(directory, "eval_results.json"))
    if saved is not None:
        train = read_json(os.path.join(directory, "train_results.json")) or {}
        return {**saved, "train_runtime": train.get("train_runtime")}
    model, _ = models.load_for_task(directory, cfg.task, inputs.label_names, what="teacher_model_name_or_path")
    accelerator = make_accelerator(dataclasses.replace(cfg, report_to="none"), cfg.output_dir)
    method = NoKD(context(dataclasses.replace(cfg, options=MethodOptions()), accelerator, inputs, cfg.output_dir,
                          log=log))
    trainer = Trainer(cfg, accelerator, method, Stage(TEACHER_DIR, {TEACHER_DIR: model}, cfg.teacher_learning_rate,
                                                      cfg.teacher_num_train_epochs),
                      cfg.output_dir, save_checkpoints=False, desc="teacher-eval")
    return trainer.evaluate()
