"""Running one stage of a method on the shared loop: resumable, with an atomic output directory.

A stage ``S`` other than the final student trains in ``output_dir/stages/S/`` (checkpoints,
metrics.jsonl, TensorBoard ``runs/``) and, when complete, writes ``output_dir/S/`` atomically
(``method.save_stage`` + ``stage_complete.json`` with its train results); its checkpoints are
then removed. A later run (or a rerun after a crash) reuses ``output_dir/S/``; a run killed in
the middle of ``S`` continues from the stage's latest checkpoint with
``--resume_from_checkpoint last``. The student stage trains in ``output_dir`` itself
(:func:`kdengine.train.__main__.run_student`).
"""

from __future__ import annotations

import os
import re

from kdengine.atomic import TMP_PREFIX, atomic_directory, write_json
from kdengine.methods.base import STUDENT
from kdengine.train import checkpoint

STAGES_DIR = "stages"
DONE_MARKER = "stage_complete.json"
# Names a stage cannot take: they are other outputs of output_dir (and teacher_<i>, the i-th teacher).
RESERVED = ("teacher", STAGES_DIR, "baselines", "tiny_models", "runs", "modules")


def work_dir(output_dir: str, name: str) -> str:
    return os.path.join(output_dir, STAGES_DIR, name)


def stage_done(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, DONE_MARKER))


def check_stage_names(names, label: str) -> None:
    """A method's stages: distinct simple names, not reserved, ending with the student (ValueError)."""
    names = list(names)
    if not names or names[-1] != STUDENT:
        raise ValueError(f"method {label}: its stages {names} must end with {STUDENT!r} (the stage that trains "
                         "the final student)")
    for name in names:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or name in RESERVED or names.count(name) > 1 \
                or re.fullmatch(r"teacher_\d+", name):
            raise ValueError(f"method {label}: stage name {name!r} must be a unique identifier, not one of "
                             f"{', '.join(RESERVED)}")


def unfinished_checkpoints(output_dir: str) -> list[str]:
    """The latest complete checkpoint of every unfinished stage under ``output_dir``: what
    ``--resume_from_checkpoint last`` continues. A student's directory (output_dir, each
    ``baselines/<method>``) is finished once it holds train_results.json, ``stages/<stage>`` once
    ``output_dir/<stage>`` holds stage_complete.json."""
    found = []
    for root, dirs, _ in os.walk(output_dir):
        dirs[:] = [d for d in dirs if not d.startswith((checkpoint.PREFIX, TMP_PREFIX))]
        latest = checkpoint.latest_checkpoint(root)
        parts = os.path.relpath(root, output_dir).split(os.sep)
        finished = stage_done(os.path.join(output_dir, *parts[:-2], parts[-1])) \
            if len(parts) >= 2 and parts[-2] == STAGES_DIR else os.path.isfile(os.path.join(root, "train_results.json"))
        if latest is not None and not finished:
            found.append(latest)
    return found


def stage_accelerator(cfg, run_dir: str):
    """An accelerator for a stage trained in ``run_dir`` (created; TensorBoard events in ``run_dir/runs``)."""
    from accelerate.state import PartialState  # noqa: PLC0415

    from kdengine.train.trainer import make_accelerator  # noqa: PLC0415

    state = PartialState()
    if state.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
    state.wait_for_everyone()
    return make_accelerator(cfg, run_dir)


def run_method_stage(cfg, method, name: str, student, *, log):
    """Train the method's stage ``name`` (or reuse its finished output); returns the Stage."""
    from kdengine.train.trainer import Trainer, seed_stage  # noqa: PLC0415

    seed_stage(cfg.seed, f"{cfg.method}:{name}")
    output_dir = method.ctx.output_dir
    final, work = os.path.join(output_dir, name), work_dir(output_dir, name)
    if stage_done(final):
        stage = method.load_stage(name, final, student)
    else:
        stage = method.build_stage(name, student)
        accelerator = stage_accelerator(cfg, work)
        trainer = Trainer(cfg, accelerator, method, stage, work, desc=f"{cfg.method}:{name}")
        results = trainer.train(checkpoint.latest_checkpoint(work) if cfg.resume_from_checkpoint else None)
        if accelerator.is_main_process:
            with atomic_directory(final) as tmp:
                summary = method.save_stage(stage, tmp) or {}
                write_json(os.path.join(tmp, DONE_MARKER), {**results, **summary})
            checkpoint.prune(work, 0)
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.wait_for_everyone()
        log(f"[{cfg.method}] {name} done in {results['train_runtime']} s (train loss {results['train_loss']:.4f})")
    method.stage_finished(stage)
    return stage
