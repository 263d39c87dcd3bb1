"""Atomic checkpoints of a training stage: ``checkpoint-<step>/`` appears complete or not at all.

A checkpoint is written into ``<stage dir>/.tmp-checkpoint-<step>`` (every process writes its own
RNG state, the main process the rest), fsynced, then renamed (:mod:`kdengine.atomic`). A crash
leaves at most a ``.tmp-*`` directory, which resume ignores and the next save replaces.

Contents: the stage's first module if it is a transformers model (``save_pretrained``,
safetensors), every other module as ``<name>.safetensors`` (trainable parameters),
``optimizer.pt``/``scheduler.pt`` (``optimizer_<name>.pt`` for a stage's further optimizers),
``rng_state_<process>.pth`` (python, numpy, torch, cuda) and ``trainer_state.json`` (global step,
epoch, batch position, best metric, log history, the open logging window).
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

from kdengine.atomic import TMP_PREFIX as _TMP, commit_directory, temporary_directory
from kdengine.models import load_trainable, save_trainable

PREFIX = "checkpoint-"
TMP_PREFIX = _TMP + PREFIX
STATE_FILE = "trainer_state.json"
_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    """optimizer.pt / scheduler.pt for the stage's first optimizer "main", <kind>_<name>.pt otherwise."""
    return f"{kind}.pt" if name == "main" else f"{kind}_{name}.pt"


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
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pth"))
    if accelerator.is_main_process:
        for index, (name, module) in enumerate(modules.items()):
            unwrapped = accelerator.unwrap_model(module)
            if index == 0 and isinstance(unwrapped, PreTrainedModel):
                unwrapped.save_pretrained(tmp, safe_serialization=True)
            else:
                save_trainable(unwrapped, os.path.join(tmp, f"{name}.safetensors"))
        for name, optimizer in optimizers.items():
            torch.save(optimizer.state_dict(), os.path.join(tmp, _optimizer_file(name, "optimizer")))
            torch.save(schedulers[name].state_dict(), os.path.join(tmp, _optimizer_file(name, "scheduler")))
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


def load_checkpoint(accelerator, directory: str, *, modules: dict, optimizers: dict, schedulers: dict) -> dict:
    """Restore what :func:`save_checkpoint` wrote: modules, optimizers, schedulers and this process's
    RNG state; returns the trainer state."""
    for index, (name, module) in enumerate(modules.items()):
        unwrapped = accelerator.unwrap_model(module)
        if index == 0 and isinstance(unwrapped, PreTrainedModel):
            saved = type(unwrapped).from_pretrained(directory)
            unwrapped.load_state_dict(saved.state_dict())
            del saved
        else:
            load_trainable(unwrapped, os.path.join(directory, f"{name}.safetensors"))
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(torch.load(os.path.join(directory, _optimizer_file(name, "optimizer")),
                                             map_location="cpu", weights_only=False))
        schedulers[name].load_state_dict(torch.load(os.path.join(directory, _optimizer_file(name, "scheduler")),
                                                    weights_only=False))
    rng_file = os.path.join(directory, f"rng_state_{accelerator.process_index}.pth")
    if not os.path.isfile(rng_file):
        raise ValueError(f"{directory} has no RNG state for process {accelerator.process_index} (it was saved "
                         f"with fewer processes); resume with the same number of processes")
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as fh:
        state = json.load(fh)
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state
