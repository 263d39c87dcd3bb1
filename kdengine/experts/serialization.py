"""Saving and loading :class:`PromptExperts`: the experts alone, loadable onto a fresh backbone.

Layout of a saved directory (written atomically through :mod:`kdengine.atomic`):

* ``experts.safetensors``: ``prompts`` [K, P, width] (fp32; float64 on a float64 backbone) and,
  when the head is trained, ``head.<name>`` tensors of the task head's state dict.
* ``experts_config.json``: ``peft`` (a peft ``PromptTuningConfig`` / ``PrefixTuningConfig`` as a dict:
  num_virtual_tokens, token_dim, num_layers, init) plus our fields (num_experts, kind, placement,
  init, train_head, the backbone's geometry used to reject a mismatched backbone).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from kdengine.atomic import atomic_directory, read_json
from kdengine.models import read_safetensors

CONFIG_NAME = "experts_config.json"
WEIGHTS_NAME = "experts.safetensors"
FORMAT_VERSION = 1
_CONFIG_KEYS = ("peft", "num_experts", "num_virtual_tokens", "kind", "placement", "init", "train_head", "task",
                "hidden_size", "num_layers", "kv_heads", "head_dim", "prefix_dropout")
PEFT_TASK_TYPES = {
    "sequence_classification": "SEQ_CLS",
    "token_classification": "TOKEN_CLS",
    "causal_lm": "CAUSAL_LM",
}


def _peft_config(experts) -> dict:
    from peft import PrefixTuningConfig, PromptTuningConfig  # noqa: PLC0415

    common = dict(
        task_type=PEFT_TASK_TYPES[experts.task],
        num_virtual_tokens=experts.num_virtual_tokens,
        token_dim=experts.hidden_size,
        num_layers=experts.num_layers,
        num_attention_heads=experts.model.config.num_attention_heads,
    )
    if experts.kind == "prefix":
        config = PrefixTuningConfig(
            prefix_projection=False, encoder_hidden_size=experts.hidden_size, **common
        )
    elif experts.init_text is not None:
        tokenizer = experts.tokenizer_name or getattr(experts.model.config, "_name_or_path", "") or "unknown"
        config = PromptTuningConfig(
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=experts.init_text,
            tokenizer_name_or_path=tokenizer,
            **common,
        )
    else:
        init = "SAMPLE_VOCAB" if experts.init == "vocab" else "RANDOM"
        config = PromptTuningConfig(prompt_tuning_init=init, **common)
    return json.loads(json.dumps(config.to_dict(), default=str))


def experts_config(experts) -> dict:
    """The JSON config of ``experts``."""
    return {
        "format_version": FORMAT_VERSION,
        "peft": _peft_config(experts),
        "num_experts": experts.num_experts,
        "num_virtual_tokens": experts.num_virtual_tokens,
        "kind": experts.kind,
        "placement": experts.placement,
        "init": experts.init,
        "train_head": experts.train_head,
        "task": experts.task,
        "model_type": getattr(experts.model.config, "model_type", None),
        "hidden_size": experts.hidden_size,
        "num_layers": experts.num_layers,
        "kv_heads": experts.kv_heads,
        "head_dim": experts.head_dim,
        "prefix_dropout": None if experts.prefix_dropout is None else experts.prefix_dropout.p,
    }


def save_experts(experts, directory: str) -> None:
    """Write ``experts`` into ``directory`` atomically (replacing a previous save there)."""
    directory = os.path.abspath(directory)
    if os.path.isdir(directory):
        foreign = sorted(set(os.listdir(directory)) - {CONFIG_NAME, WEIGHTS_NAME})
        if foreign:
            raise ValueError(
                f"{directory} holds other files ({', '.join(foreign[:5])}); save the experts into "
                "their own directory (it is replaced as a whole)"
            )
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tensors = {"prompts": experts.prompts.detach().cpu().contiguous()}
    if experts.head is not None:
        for name, value in experts.head.state_dict().items():
            tensors[f"head.{name}"] = value.detach().cpu().contiguous().clone()
    with atomic_directory(directory) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(experts_config(experts), f, indent=2, sort_keys=True)


def load_experts(cls, directory: str, model, **kwargs):
    """Build ``cls`` on ``model`` from a directory written by :func:`save_experts`."""
    path = os.path.join(directory, CONFIG_NAME)
    config = read_json(path)
    if config is None:
        raise ValueError(f"{directory} has no {CONFIG_NAME}: not a PromptExperts directory")
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        found = config.get("format_version") if isinstance(config, dict) else config
        raise ValueError(f"{path}: format_version {found!r:.60}, expected {FORMAT_VERSION}")
    missing = [key for key in _CONFIG_KEYS if key not in config]
    if missing or not isinstance(config["peft"], dict):
        raise ValueError(f"{path}: missing or malformed {', '.join(missing) or 'peft'}; the file is damaged")
    experts = cls(
        model,
        config["num_experts"],
        config["num_virtual_tokens"],
        kind=config["kind"],
        placement=config["placement"],
        init="random",
        train_head=config["train_head"],
        prefix_dropout=config["prefix_dropout"],
        seed=0,
        **kwargs,
    )
    expected = {key: config[key] for key in ("task", "hidden_size", "num_layers", "kv_heads", "head_dim")}
    found = {key: getattr(experts, key) for key in expected}
    if config["kind"] == "prompt":
        for key in ("num_layers", "kv_heads", "head_dim"):
            expected.pop(key)
            found.pop(key)
    if expected != found:
        diff = ", ".join(
            f"{k}: saved {expected[k]}, backbone {found[k]}" for k in expected if expected[k] != found[k]
        )
        raise ValueError(f"the experts in {directory} were trained on a different backbone ({diff})")
    weights = os.path.join(directory, WEIGHTS_NAME)
    tensors = read_safetensors(weights)
    prompts = tensors.pop("prompts", None)
    if prompts is None:
        raise ValueError(f"{weights} has no 'prompts' tensor; the file is damaged")
    if tuple(prompts.shape) != tuple(experts.prompts.shape):
        raise ValueError(
            f"{directory}: prompts have shape {tuple(prompts.shape)}, expected {tuple(experts.prompts.shape)}"
        )
    with torch.no_grad():
        experts.prompts.copy_(prompts.to(experts.prompts.device))
    experts.init, experts.init_text = config["init"], config["peft"].get("prompt_tuning_init_text")
    head = {name[len("head.") :]: value for name, value in tensors.items() if name.startswith("head.")}
    if head:
        if experts.head is None:
            raise ValueError(f"{weights} holds a task head but {CONFIG_NAME} says train_head is false")
        try:
            experts.head.load_state_dict(head)
        except RuntimeError as exc:
            raise ValueError(f"{weights}: its head does not fit the backbone's ({str(exc).splitlines()[0]})") from None
    return experts
