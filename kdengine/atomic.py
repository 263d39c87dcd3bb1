"""Atomic outputs: a directory or JSON file appears complete, or not at all.

Every directory kdengine writes as a whole (checkpoints, stage outputs, the fine-tuned teacher)
goes through :func:`temporary_directory` + :func:`commit_directory` (or :func:`atomic_directory`
when one process writes it): written into ``.tmp-<name>`` beside its final path, fsynced, then
renamed over it. A crash leaves at most a ``.tmp-*`` directory, which readers ignore and the next
write replaces. :func:`read_json` reads such files back, naming the file when one is damaged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

TMP_PREFIX = ".tmp-"


def temporary_directory(final: str) -> str:
    """Create (empty) and return the temporary sibling of ``final``."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(final)), TMP_PREFIX + os.path.basename(final))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_directory(tmp: str, final: str) -> None:
    """fsync every file of ``tmp``, then rename it to ``final`` (replacing an existing one)."""
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(root)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))


@contextlib.contextmanager
def atomic_directory(final: str):
    """``with atomic_directory(path) as tmp:`` write into ``tmp``; on success it becomes ``path``, on an
    exception it is removed (one process writes)."""
    tmp = temporary_directory(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, final)


def read_json(path: str):
    """The JSON value in ``path``, None when there is no such file; a ValueError naming the file when
    it cannot be read or parsed (a truncated results file, a damaged checkpoint)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); the file is damaged") from None


def write_json(path: str, data: dict) -> None:
    """Write JSON through a temp file and a rename (never a half-written file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
