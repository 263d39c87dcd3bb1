"""The PEE-KD expert selector: routes each input to the prompt expert most likely to be right.

Module shape follows the PEE-KD code (embedding → Linear(H, hidden) → Tanh → Linear(hidden, K) →
max-pool over tokens) with the two fixes methods.md §2.8 asks for: the per-token scores are
pooled over tokens (``[B, L, K] → [B, K]``, masked), not reshaped across slots, and routing is
per example and *trained* (cross-entropy against the per-example best expert), where the
reference code never trains it and picks one expert per batch.

The embedding is a frozen copy of the teacher's input embeddings, so the selector costs one
embedding lookup plus a two-layer MLP per token: it never runs the backbone.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from kdengine.atomic import read_json
from kdengine.constants import IGNORE_INDEX
from kdengine.models import read_safetensors

SELECTOR_CONFIG = "selector_config.json"
SELECTOR_WEIGHTS = "selector.safetensors"


class ExpertSelector(nn.Module):
    """Scores K experts per example from token embeddings.

    Args:
        embedding_weight: [Vocab, H] teacher input embeddings (copied and frozen).
        num_experts: K.
        hidden_size: width of the MLP (512 in the PEE-KD code).
    Shapes: ``forward(input_ids [B, L], attention_mask [B, L]) -> logits [B, K]`` (fp32).
    """

    def __init__(self, embedding_weight: torch.Tensor, num_experts: int, hidden_size: int = 512):
        super().__init__()
        vocab, dim = embedding_weight.shape
        self.embed = nn.Embedding(vocab, dim)
        self.embed.weight.data.copy_(embedding_weight.detach().float())
        self.embed.weight.requires_grad_(False)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, num_experts))
        self.num_experts = num_experts
        self.hidden_size = hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.mlp(self.embed(input_ids))                       # [B, L, K]
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf"))
        return scores.max(dim=1).values                                # max-pool over tokens → [B, K]

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(directory, SELECTOR_WEIGHTS))
        vocab, dim = self.embed.weight.shape
        with open(os.path.join(directory, SELECTOR_CONFIG), "w") as f:
            json.dump({"num_experts": self.num_experts, "hidden_size": self.hidden_size,
                       "vocab_size": vocab, "embedding_dim": dim}, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str) -> ExpertSelector:
        """Read what :meth:`save_pretrained` wrote (JSON + safetensors only; ValueError naming the file
        that is missing, damaged or does not match its config)."""
        path = os.path.join(directory, SELECTOR_CONFIG)
        cfg = read_json(path)
        keys = ("num_experts", "hidden_size", "vocab_size", "embedding_dim")
        if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), int) and cfg[k] >= 1 for k in keys):
            raise ValueError(f"{path}: expected positive integers {', '.join(keys)}, got {cfg!r:.120}")
        selector = cls(torch.zeros(cfg["vocab_size"], cfg["embedding_dim"]), cfg["num_experts"], cfg["hidden_size"])
        weights = os.path.join(directory, SELECTOR_WEIGHTS)
        try:
            selector.load_state_dict(read_safetensors(weights))
        except RuntimeError as exc:
            raise ValueError(f"{weights} does not match {SELECTOR_CONFIG} ({str(exc).splitlines()[0]})") from None
        return selector


TIE_BREAK = 1e-3


def expert_scores(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-example reliability of each expert, the selector's training signal.

    score_k = mean over the example's labelled positions of 1[expert k correct] · max-probability,
    plus TIE_BREAK · p_k(true label), so that when no expert is right the one closest to right
    wins instead of expert 0. ``logits`` [K, B, C] or [K, B, L, C]; labels [B] or [B, L].
    Returns [B, K] (fp32); the target expert is its argmax.
    """
    probs = logits.float().softmax(-1)
    confidence, prediction = probs.max(-1)                            # [K, B(, L)]
    target = labels.clamp_min(0).unsqueeze(0).expand_as(prediction)
    p_true = probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    score = (prediction == labels.unsqueeze(0)).float() * confidence + TIE_BREAK * p_true
    if labels.dim() == 2:
        valid = (labels != ignore_index).unsqueeze(0).float()
        score = (score * valid).sum(-1) / valid.sum(-1).clamp_min(1.0)
    return score.transpose(0, 1)
