"""Atomic checkpoints of a training stage: ``checkpoint-<step>/`` appears complete or not at all.

A checkpoint is written into ``<stage dir>/.tmp-checkpoint-<step>`` (every process writes its own
RNG state, the main process the rest), fsynced, then renamed (:mod:`kdengine.atomic`). A crash
leaves at most a ``.tmp-*`` directory, which resume ignores and the next save replaces.

Contents: the stage's first module if it is a transformers model (``save_pretrained``,
safetensors), every other module as ``<name>.safetensors`` (trainable parameters),
``optimizer.state.safetensors``/``scheduler.state.safetensors`` (``optimizer_<name>...`` for a
stage's further optimizers), ``rng_state_<process>.state.safetensors`` (python, numpy, torch,
cuda) and ``trainer_state.json`` (global step, epoch, batch position, best metric, log history,
the open logging window).

Loading unpickles nothing: safetensors and JSON only (:mod:`kdengine.train.state_file`), the
first module with ``use_safetensors=True``. A damaged or foreign file is a ValueError naming it;
a checkpoint of the old pickled layout (``optimizer.pt``) is refused, never read.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
from transformers import PreTrainedModel

from kdengine.atomic import TMP_PREFIX as _TMP, commit_directory, read_json, temporary_directory
from kdengine.models import load_trainable, save_trainable
from kdengine.train.state_file import SUFFIX, load_state, save_state

PREFIX = "checkpoint-"
TMP_PREFIX = _TMP + PREFIX
STATE_FILE = "trainer_state.json"
_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")
# Files of the pickled layout kdengine wrote before: never loaded (resume refuses such a checkpoint).
_PICKLED = ("optimizer.pt", "scheduler.pt", "rng_state_0.pth")


def rng_state() -> dict:
    """Every RNG state of this process (numpy's key as an int64 tensor: state files hold no arrays)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                                                    cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (renamed, with trainer_state.json), sorted by step."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: None, 'last' (latest in output_dir, or None if there is none
    yet: a fresh start) or an explicit path (ValueError when it is not a complete checkpoint)."""
    if resume is None:
        return None
    if resume == "last":
        return latest_checkpoint(output_dir)
    if not os.path.isdir(resume):
        raise ValueError(f"resume_from_checkpoint={resume!r} does not exist; pass a checkpoint-<step> directory "
                         f"or 'last' (complete checkpoints in {output_dir}: "
                         f"{[os.path.basename(p) for _, p in list_checkpoints(output_dir)] or 'none'})")
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise ValueError(f"resume_from_checkpoint={resume!r} is not a complete checkpoint (no {STATE_FILE})")
    return resume


def _optimizer_file(name: str, kind: str) -> str:
    """optimizer / scheduler state of the stage's first optimizer "main", <kind>_<name> otherwise."""
    return f"{kind}{SUFFIX}" if name == "main" else f"{kind}_{name}{SUFFIX}"


def _rng_file(process: int) -> str:
    return f"rng_state_{process}{SUFFIX}"


def save_checkpoint(accelerator, output_dir: str, step: int, *, modules: dict, optimizers: dict, schedulers: dict,
                    state: dict, save_total_limit: int | None) -> str:
    """Write ``checkpoint-<step>`` atomically (collective: every process must call it).

    The first module, when it is a transformers model, is saved with ``save_pretrained`` (the
    checkpoint loads with ``from_pretrained``); every other module as ``<name>.safetensors``
    (its trainable parameters)."""
    final, tmp = os.path.join(output_dir, f"{PREFIX}{step}"), os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    if accelerator.is_main_process:
        temporary_directory(final)   # creates tmp, empty
    accelerator.wait_for_everyone()
    save_state(rng_state(), os.path.join(tmp, _rng_file(accelerator.process_index)))
    if accelerator.is_main_process:
        for index, (name, module) in enumerate(modules.items()):
            unwrapped = accelerator.unwrap_model(module)
            if index == 0 and isinstance(unwrapped, PreTrainedModel):
                unwrapped.save_pretrained(tmp, safe_serialization=True)
            else:
                save_trainable(unwrapped, os.path.join(tmp, f"{name}.safetensors"))
        for name, optimizer in optimizers.items():
            save_state(optimizer.state_dict(), os.path.join(tmp, _optimizer_file(name, "optimizer")))
            save_state(schedulers[name].state_dict(), os.path.join(tmp, _optimizer_file(name, "scheduler")))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit_directory(tmp, final)
        prune(output_dir, save_total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


def prune(output_dir: str, limit: int | None, *, keep: str | None = None) -> None:
    """Remove the oldest checkpoints beyond ``limit`` (never ``keep``)."""
    if limit is None:
        return
    found = [path for _, path in list_checkpoints(output_dir)]
    for path in found[:max(0, len(found) - limit)]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def verify(directory: str, stage: str | None = None) -> None:
    """Check, before any work, that every file of the checkpoint ``directory`` parses (JSON, the
    safetensors headers, the state structures) without loading its tensors, and that it is one of
    ``stage`` when given; ValueError naming the first that does not. :func:`load_checkpoint` then
    checks that they fit the stage."""
    from safetensors import safe_open  # noqa: PLC0415

    _refuse_pickled(directory)
    state = read_json(os.path.join(directory, STATE_FILE))
    if stage is not None:
        _check_stage(directory, state, stage)
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(SUFFIX):
            load_state(path)
        elif name.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as fh:
                    fh.keys()
            except Exception as exc:  # safetensors raises its own error types for every kind of damage
                raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); the "
                                 f"checkpoint is damaged") from None
        elif name.endswith(".json"):
            read_json(path)


def _check_stage(directory: str, state, stage: str) -> None:
    found = state.get("stage") if isinstance(state, dict) else None
    if found != stage:
        raise ValueError(f"{directory} is a checkpoint of the stage {found!r}, not of {stage!r} "
                         f"(resume_from_checkpoint=<path> continues the student stage; 'last' continues every stage)")


def _refuse_pickled(directory: str) -> None:
    pickled = [name for name in _PICKLED if os.path.isfile(os.path.join(directory, name))]
    if pickled and not os.path.isfile(os.path.join(directory, _optimizer_file("main", "optimizer"))):
        raise ValueError(f"{directory} is a checkpoint of the old pickled layout ({', '.join(pickled)}), which "
                         f"kdengine no longer loads (unpickling runs code); restart this stage: remove {directory}")


def _restore(path: str, what: str, restore) -> None:
    """``restore(load_state(path))``; a state that does not fit (another stage, other options) is a
    ValueError naming the file."""
    state = load_state(path)
    try:
        restore(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} does not fit this stage's {what} ({type(exc).__name__}: {exc}); the checkpoint "
                         f"belongs to another stage or options, or is damaged") from None


def read_state(directory: str, template: dict) -> dict:
    """``trainer_state.json`` of a checkpoint: every key of ``template`` (the trainer's fresh state) with
    a value of the same kind, else a ValueError naming the file."""
    path = os.path.join(directory, STATE_FILE)
    state = read_json(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(state).__name__}; the checkpoint is damaged")
    for key, fresh in template.items():
        value = state.get(key, KeyError)
        kinds = (int, float) if isinstance(fresh, float) else (type(fresh),) if fresh is not None else \
            (type(None), int, float, str)
        if value is KeyError or isinstance(value, bool) != isinstance(fresh, bool) or not isinstance(value, kinds):
            raise ValueError(f"{path}: {key!r} is {'missing' if value is KeyError else repr(value)[:40]}, expected "
                             f"{' or '.join(k.__name__ for k in kinds)}; the checkpoint is damaged")
    _check_stage(directory, state, template["stage"])
    window = state.get("window", {"loss": 0.0, "n": 0, "logs": {}})
    if not (isinstance(window, dict) and isinstance(window.get("loss"), (int, float))
            and isinstance(window.get("n"), int) and isinstance(window.get("logs"), dict)
            and all(isinstance(v, (int, float)) for v in window["logs"].values())):
        raise ValueError(f"{path}: 'window' is {repr(window)[:60]}, expected {{loss: number, n: int, logs: {{name: "
                         f"number}}}}; the checkpoint is damaged")
    return state


def load_checkpoint(accelerator, directory: str, *, modules: dict, optimizers: dict, schedulers: dict,
                    template: dict) -> dict:
    """Restore what :func:`save_checkpoint` wrote: modules, optimizers, schedulers and this process's
    RNG state; returns the trainer state (checked against ``template``, the trainer's fresh state).
    Reads safetensors and JSON only; ValueError naming the file that is missing, damaged or foreign."""
    _refuse_pickled(directory)
    rng_file = os.path.join(directory, _rng_file(accelerator.process_index))
    if not os.path.isfile(rng_file):
        raise ValueError(f"{directory} has no RNG state for process {accelerator.process_index} (it was saved "
                         f"with fewer processes); resume with the same number of processes")
    state = read_state(directory, template)
    for index, (name, module) in enumerate(modules.items()):
        unwrapped = accelerator.unwrap_model(module)
        if index == 0 and isinstance(unwrapped, PreTrainedModel):
            try:
                saved = type(unwrapped).from_pretrained(directory, use_safetensors=True)
                unwrapped.load_state_dict(saved.state_dict())
            except Exception as exc:  # transformers and safetensors raise many types for damaged files
                raise ValueError(f"{directory}: its model (config.json + model.safetensors) does not load "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the "
                                 f"checkpoint is damaged") from None
            del saved
        else:
            load_trainable(unwrapped, os.path.join(directory, f"{name}.safetensors"))
    for name, optimizer in optimizers.items():
        _restore(os.path.join(directory, _optimizer_file(name, "optimizer")), f"optimizer {name!r}",
                 optimizer.load_state_dict)
        _restore(os.path.join(directory, _optimizer_file(name, "scheduler")), f"schedule {name!r}",
                 schedulers[name].load_state_dict)
    _restore(rng_file, "RNG state", set_rng_state)
    return state
