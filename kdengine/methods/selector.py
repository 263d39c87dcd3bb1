"""The PEE-KD expert selector: routes each input to the prompt experts most likely to be right.

Two feature modes (``selector_features``):

* ``backbone`` (default): an MLP (Linear(H, hidden) → Tanh → Linear(hidden, K)) over the frozen
  backbone's final [CLS] state, computed once per input without any prompt (:func:`selector_logits`
  runs that forward). A context-free selector collapses to the class prior (methods.md §2.8).
* ``embeddings``: the PEE-KD code's module (a frozen copy of the input embeddings → the same MLP per
  token → max-pool over tokens, masked), with the fix methods.md §2.8 asks for (``[B, L, K] → [B, K]``
  pooled over tokens, not reshaped across slots). It never runs the backbone.

Either mode is trained per example (the reference code never trains it and picks one expert per
batch) against :func:`soft_targets`, weighted by :func:`disagreement`.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from kdengine import models
from kdengine.atomic import read_json
from kdengine.constants import IGNORE_INDEX
from kdengine.models import read_safetensors

SELECTOR_CONFIG = "selector_config.json"
SELECTOR_WEIGHTS = "selector.safetensors"
FEATURES = ("backbone", "embeddings")


class ExpertSelector(nn.Module):
    """Scores K experts per example.

    Args:
        features: an int H (``backbone`` mode: ``forward(features [B, H]) -> [B, K]``) or a
            [Vocab, H] embedding table, copied and frozen (``embeddings`` mode:
            ``forward(input_ids [B, L], attention_mask [B, L]) -> [B, K]``).
        num_experts: K.
        hidden_size: width of the MLP (512 in the PEE-KD code).
        layers: ``backbone`` mode: the backbone layers whose [CLS] state it reads (None: all;
            :func:`selector_logits` runs only those).
    Logits are fp32.
    """

    def __init__(self, features: int | torch.Tensor, num_experts: int, hidden_size: int = 512,
                 layers: int | None = None):
        super().__init__()
        self.layers = layers
        if isinstance(features, torch.Tensor):
            vocab, dim = features.shape
            self.embed = nn.Embedding(vocab, dim)
            self.embed.weight.data.copy_(features.detach().float())
            self.embed.weight.requires_grad_(False)
            self.features = "embeddings"
        else:
            dim, self.embed, self.features = features, None, "backbone"
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, num_experts))
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.feature_size = dim

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is None:
            return self.mlp(inputs.float())                              # [B, H] -> [B, K]
        scores = self.mlp(self.embed(inputs))                            # [B, L, K]
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf"))
        return scores.max(dim=1).values                                  # max-pool over tokens → [B, K]

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(directory, SELECTOR_WEIGHTS))
        config = {"features": self.features, "num_experts": self.num_experts, "hidden_size": self.hidden_size,
                  "embedding_dim": self.feature_size, "backbone_layers": self.layers}
        if self.embed is not None:
            config["vocab_size"] = self.embed.weight.shape[0]
        with open(os.path.join(directory, SELECTOR_CONFIG), "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str) -> ExpertSelector:
        """Read what :meth:`save_pretrained` wrote (JSON + safetensors only; ValueError naming the file
        that is missing, damaged or does not match its config)."""
        path = os.path.join(directory, SELECTOR_CONFIG)
        cfg = read_json(path)
        mode = cfg.get("features", "embeddings") if isinstance(cfg, dict) else None
        keys = ("num_experts", "hidden_size", "embedding_dim") + (("vocab_size",) if mode == "embeddings" else ())
        if mode not in FEATURES or not all(isinstance(cfg.get(k), int) and cfg[k] >= 1 for k in keys):
            raise ValueError(f"{path}: expected features in {FEATURES} and positive integers {', '.join(keys)}, "
                             f"got {cfg!r:.120}")
        features = (torch.zeros(cfg["vocab_size"], cfg["embedding_dim"]) if mode == "embeddings"
                    else cfg["embedding_dim"])
        layers = cfg.get("backbone_layers")
        if layers is not None and not (isinstance(layers, int) and layers >= 1):
            raise ValueError(f"{path}: backbone_layers must be a positive integer or null, got {layers!r}")
        selector = cls(features, cfg["num_experts"], cfg["hidden_size"], layers)
        weights = os.path.join(directory, SELECTOR_WEIGHTS)
        try:
            selector.load_state_dict(read_safetensors(weights))
        except RuntimeError as exc:
            raise ValueError(f"{weights} does not match {SELECTOR_CONFIG} ({str(exc).splitlines()[0]})") from None
        return selector


@torch.no_grad()
def backbone_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: int | None = None,
                      **extra) -> torch.Tensor:
    """The frozen backbone's [CLS] (first-position) state after its last layer, or after its first
    ``layers`` layers (only those run), without prompts: [B, H] fp32, a constant (no gradient reaches
    the backbone)."""
    with first_layers(model, layers):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
    return out.hidden_states[-1][:, 0].float()


@contextmanager
def first_layers(model, layers: int | None):
    """Within the block ``model`` runs only its first ``layers`` transformer layers (None: all); the
    layer list is restored on exit. ValueError when ``layers`` exceeds the model's."""
    total = model.config.num_hidden_layers
    if layers is None or layers == total:
        yield
        return
    if not 1 <= layers <= total:
        raise ValueError(f"selector_layers={layers} must be in [1, {total}] (the backbone's layers)")
    name, stack = models.layer_list(model, total, "selector_layers")
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, attr, nn.ModuleList(list(stack)[:layers]))
    try:
        yield
    finally:
        setattr(owner, attr, stack)


def selector_logits(selector: ExpertSelector, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    **extra) -> torch.Tensor:
    """The selector's [B, K] logits; ``model`` (the experts' backbone) runs once in ``backbone`` mode."""
    if selector.features == "backbone":
        return selector(backbone_features(model, input_ids, attention_mask, selector.layers, **extra))
    return selector(input_ids, attention_mask)


TIE_BREAK = 1e-3


def expert_scores(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-example reliability of each expert: oracle routing and routing accuracy.

    score_k = mean over the example's labelled positions of 1[expert k correct] · max-probability,
    plus TIE_BREAK · p_k(true label), so that when no expert is right the one closest to right
    wins instead of expert 0. ``logits`` [K, B, C] or [K, B, L, C]; labels [B] or [B, L].
    Returns [B, K] (fp32); the oracle's expert is its argmax.
    """
    probs = logits.float().softmax(-1)
    confidence, prediction = probs.max(-1)                            # [K, B(, L)]
    target = labels.clamp_min(0).unsqueeze(0).expand_as(prediction)
    p_true = probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    score = (prediction == labels.unsqueeze(0)).float() * confidence + TIE_BREAK * p_true
    return _per_example(score, labels, ignore_index).transpose(0, 1)


def _per_example(values: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[K, B(, L)] -> [K, B]: token values averaged over the example's labelled positions."""
    if labels.dim() == 2:
        valid = (labels != ignore_index).unsqueeze(0).float()
        return (values * valid).sum(-1) / valid.sum(-1).clamp_min(1.0)
    return values


def expert_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-example cross-entropy of each expert (token tasks: mean over labelled tokens): [B, K] fp32."""
    ce = F.cross_entropy(logits.float().movedim(-1, 1), labels.unsqueeze(0).expand(logits.shape[:-1]),
                         ignore_index=ignore_index, reduction="none")    # [K, B(, L)]
    return _per_example(ce, labels, ignore_index).transpose(0, 1)


def soft_targets(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The selector's target distribution softmax_k(−CE_k / temperature) per example: [B, K]."""
    return (-expert_losses(logits, labels) / temperature).softmax(-1)


def disagreement(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per example, the fraction of labelled positions where the K experts' predictions are not all
    equal: [B] in [0, 1] (sequence tasks: 0 or 1)."""
    prediction = logits.argmax(-1)                                    # [K, B(, L)]
    split = (prediction != prediction[:1]).any(0).float().unsqueeze(0)
    return _per_example(split, labels, ignore_index)[0]
