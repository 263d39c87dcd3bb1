"""Atomic checkpoints: ``checkpoint-<step>/`` appears complete or not at all.

A checkpoint is written into ``output_dir/.tmp-checkpoint-<step>`` (every process writes its own
RNG state, the main process the rest), fsynced, then renamed. A crash leaves at most a
``.tmp-*`` directory, which resume ignores and the next save replaces.

Contents: the student (``save_pretrained``, safetensors), ``optimizer.pt``, ``scheduler.pt``,
``rng_state_<process>.pth`` (python, numpy, torch, cuda), ``trainer_state.json`` (global step,
epoch, batch position, best metric, log history) and whatever ``method.save`` writes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
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


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(root)


def write_json(path: str, data: dict) -> None:
    """Write JSON through a temp file and a rename (never a half-written file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(accelerator, output_dir: str, step: int, *, model, optimizer, scheduler, state: dict,
                    method, save_total_limit: int | None) -> str:
    """Write ``checkpoint-<step>`` atomically (collective: every process must call it)."""
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pth"))
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        method.save(tmp)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(output_dir)
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


def load_checkpoint(accelerator, directory: str, *, model, optimizer, scheduler, method) -> dict:
    """Restore model weights, optimizer, scheduler, this process's RNG state and the method; returns
    the trainer state."""
    unwrapped = accelerator.unwrap_model(model)
    saved = type(unwrapped).from_pretrained(directory)
    unwrapped.load_state_dict(saved.state_dict())
    del saved
    optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), map_location="cpu",
                                         weights_only=False))
    scheduler.load_state_dict(torch.load(os.path.join(directory, "scheduler.pt"), weights_only=False))
    method.load(directory)
    rng_file = os.path.join(directory, f"rng_state_{accelerator.process_index}.pth")
    if not os.path.isfile(rng_file):
        raise ValueError(f"{directory} has no RNG state for process {accelerator.process_index} (it was saved "
                         f"with fewer processes); resume with the same number of processes")
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as fh:
        state = json.load(fh)
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state
