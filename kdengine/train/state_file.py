"""Optimizer, scheduler and RNG states in one safetensors file each: nothing is ever unpickled.

A state (nested dicts, lists and tuples of tensors, numbers, strings, booleans and None: what
``optimizer.state_dict()``, ``scheduler.state_dict()`` and :func:`kdengine.train.checkpoint.rng_state`
return) is written as the tensors of a safetensors file plus its structure as JSON in the file's
metadata. Loading reads the safetensors header and the JSON back: a file from anywhere can at
worst fail to load (:class:`ValueError` naming it), never run code.

Structure nodes: a JSON number, string, boolean or null is itself; a JSON list is a list;
``{"tensor": key}``, ``{"tuple": [...]}`` and ``{"dict": [[key, value], ...]}`` (keys of any
leaf type, e.g. the int parameter ids of an optimizer state) are the rest.
"""

from __future__ import annotations

import json
import os

import torch

FORMAT = "kdengine-state-1"
SUFFIX = ".state.safetensors"
_LEAVES = (type(None), bool, int, float, str)


def _encode(obj, tensors: dict):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"tensor": key}
    if isinstance(obj, _LEAVES):
        return obj
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"a state file holds tensors, numbers, strings, None, lists, tuples and dicts; got "
                    f"{type(obj).__name__}")


def _decode(node, tensors: dict, path: str):
    if isinstance(node, _LEAVES):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, path) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        (kind, value), = node.items()
        if kind == "tensor" and isinstance(value, str) and value in tensors:
            return tensors[value]
        if kind == "tuple" and isinstance(value, list):
            return tuple(_decode(v, tensors, path) for v in value)
        if kind == "dict" and isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
            keys = [_decode(k, tensors, path) for k, _ in value]
            if all(isinstance(k, _LEAVES) for k in keys):
                return dict(zip(keys, (_decode(v, tensors, path) for _, v in value)))
    raise ValueError(f"{path}: malformed state structure at {json.dumps(node)[:80]}; the file is damaged or "
                     f"was not written by kdengine")


def save_state(obj, path: str) -> None:
    """Write ``obj`` to ``path`` (a ``*.state.safetensors`` file)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors: dict = {}
    structure = _encode(obj, tensors)
    save_file(tensors, path, metadata={"format": FORMAT, "structure": json.dumps(structure)})


def load_state(path: str):
    """Read what :func:`save_state` wrote (ValueError naming ``path`` if it is missing or malformed)."""
    from safetensors import safe_open  # noqa: PLC0415

    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); the "
                         f"checkpoint is damaged") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}; not a kdengine state file")
    try:
        structure = json.loads(metadata["structure"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: its structure is not valid JSON ({exc}); the file is damaged") from None
    return _decode(structure, tensors, path)
