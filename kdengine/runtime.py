"""Inference with a trained PEE-KD teacher: the frozen backbone, its prompt experts and the selector.

``ExpertRuntime.from_pretrained(output_dir)`` reads what ``python -m kdengine.train --method pee_kd``
wrote (``teacher/`` or the configured teacher, ``experts/``, ``selector/``, ``config.yaml``).
``predict`` routes each input to experts, then runs the chosen experts as ONE batched forward
(per-example expert ids, :class:`kdengine.experts.PromptExperts`), inputs sorted by length and
answered in input order:

* ``routing="selector"``: the selector's ``top_k`` most probable experts, fused with its own
  probabilities (renormalised over the chosen ones).
* ``routing="all"``: every expert, uniform weights (the plain ensemble).
* ``routing="fixed:<k>"``: expert k alone.
* ``routing="oracle"`` (needs ``labels``): the ``top_k`` experts most reliable on the true label
  (:func:`kdengine.methods.selector.expert_scores`; all K run to find them), uniform weights.

Several experts are fused by :func:`kdengine.ops.fuse_experts` in the run's ``fusion_space``.
Sequence classification only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import safetensors.torch
import torch
import yaml

from kdengine.methods.pee_kd import BACKBONE_FILE
from kdengine.methods.selector import SELECTOR_CONFIG, ExpertSelector, expert_scores, selector_logits
from kdengine.models import AUTO_CLASSES, load_tokenizer, saved_labels
from kdengine.ops import fuse_experts

ROUTINGS = ("selector", "all", "fixed:<k>", "oracle")
_FIXED = re.compile(r"fixed:(\d+)")


@dataclass
class Prediction:
    """One input's answer: the label, the fused class probabilities, the experts that ran and their
    fusion weights (same order)."""

    label: str
    probabilities: list[float]
    experts: list[int]
    weights: list[float]


class ExpertRuntime:
    """A PEE-KD teacher ready for inference (eval mode, no gradients, deterministic)."""

    def __init__(self, experts, selector: ExpertSelector | None, tokenizer, *, label_names: list[str],
                 fusion_space: str, max_seq_length: int, source: str):
        self.experts, self.selector, self.tokenizer = experts.eval(), selector, tokenizer
        if selector is not None:
            selector.eval()
        self.label_names, self.fusion_space, self.max_seq_length = label_names, fusion_space, max_seq_length
        self.source = source

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @classmethod
    def from_pretrained(cls, output_dir: str, *, device: str | torch.device = "cpu",
                        kernel_backend: str = "auto") -> ExpertRuntime:
        """Load a PEE-KD output directory (ValueError naming what is missing or unsupported)."""
        from kdengine.experts import PromptExperts  # noqa: PLC0415

        config_path = os.path.join(output_dir, "config.yaml")
        if not os.path.isfile(config_path):
            raise ValueError(f"{output_dir} has no config.yaml: not a kdengine.train output directory")
        with open(config_path) as fh:
            cfg = yaml.safe_load(fh)
        experts_dir = os.path.join(output_dir, "experts")
        if not os.path.isfile(os.path.join(experts_dir, "experts_config.json")):
            raise ValueError(f"{output_dir} has no trained experts ({experts_dir}/experts_config.json): "
                             f"train it with --method pee_kd (method={cfg.get('method')!r})")
        if cfg.get("task") != "sequence_classification":
            raise ValueError(f"{output_dir}: task {cfg.get('task')!r}; ExpertRuntime serves sequence_classification")
        trained_backbone = os.path.join(experts_dir, BACKBONE_FILE)
        if cfg.get("teacher_backbone") == "trainable" and not os.path.isfile(trained_backbone):
            raise ValueError(f"{output_dir} was trained with teacher_backbone: trainable but {trained_backbone} is "
                             "missing (written since the experts stage saves its backbone); retrain the experts")
        local = os.path.join(output_dir, "teacher")
        backbone = local if os.path.isfile(os.path.join(local, "config.json")) else cfg.get("teacher_model_name_or_path")
        if not backbone:
            raise ValueError(f"{output_dir} has neither teacher/ nor a teacher_model_name_or_path in config.yaml")
        model = AUTO_CLASSES[cfg["task"]].from_pretrained(backbone)
        if cfg.get("teacher_backbone") == "trainable":
            safetensors.torch.load_model(model, trained_backbone)      # trained with the prompts
        experts = PromptExperts.from_pretrained(experts_dir, model, backend=kernel_backend).to(device)
        selector_dir = os.path.join(output_dir, "selector")
        selector = (ExpertSelector.from_pretrained(selector_dir).to(device)
                    if os.path.isfile(os.path.join(selector_dir, SELECTOR_CONFIG)) else None)
        if selector is not None and selector.num_experts != experts.num_experts:
            raise ValueError(f"{selector_dir} routes {selector.num_experts} experts, {experts_dir} holds "
                             f"{experts.num_experts}")
        return cls(experts, selector, load_tokenizer(backbone, "teacher"), label_names=saved_labels(model.config),
                   fusion_space=cfg["fusion_space"], max_seq_length=cfg["max_seq_length"], source=output_dir)

    # ------------------------------------------------------------------ checks
    def _plan(self, routing: str, top_k: int | None, labels, n: int) -> tuple[str, int]:
        """(mode, k) for a routing, after every check that needs no model work."""
        k_all = self.num_experts
        fixed = _FIXED.fullmatch(routing) if isinstance(routing, str) else None
        if routing not in ("selector", "all", "oracle") and fixed is None:
            raise ValueError(f"unknown routing {routing!r}; expected one of {', '.join(ROUTINGS)}")
        if routing in ("all",) or fixed is not None:
            if top_k is not None:
                raise ValueError(f"top_k applies to routing 'selector' and 'oracle', not {routing!r}")
            if fixed is not None and not 0 <= int(fixed.group(1)) < k_all:
                raise ValueError(f"routing {routing!r}: expert {fixed.group(1)} does not exist "
                                 f"(experts 0..{k_all - 1})")
            return ("all", k_all) if fixed is None else ("fixed", int(fixed.group(1)))
        top_k = 1 if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= k_all:
            raise ValueError(f"top_k={top_k!r} must be an integer in [1, {k_all}] (the number of experts)")
        if routing == "selector" and self.selector is None:
            raise ValueError(f"{self.source} has no selector (selector/{SELECTOR_CONFIG}); use routing 'all', "
                             "'fixed:<k>' or 'oracle', or train with selector: learned")
        if routing == "oracle":
            if labels is None:
                raise ValueError("routing 'oracle' needs the true labels (labels=...)")
            if len(labels) != n:
                raise ValueError(f"{len(labels)} labels for {n} inputs")
        return routing, top_k

    def _label_ids(self, labels) -> list[int]:
        ids = []
        for i, label in enumerate(labels):
            if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(self.label_names):
                ids.append(label)
            elif str(label) in self.label_names:
                ids.append(self.label_names.index(str(label)))
            else:
                raise ValueError(f"labels[{i}] = {label!r} is not one of {self.label_names} (or their ids)")
        return ids

    @staticmethod
    def _split_inputs(inputs) -> tuple[list[str], list[str] | None]:
        if isinstance(inputs, (str, tuple)) or not len(inputs):
            raise ValueError("inputs must be a non-empty list of texts or of (text, text_pair) pairs")
        pairs = [not isinstance(x, str) for x in inputs]
        for i, x in enumerate(inputs):
            ok = isinstance(x, str) or (isinstance(x, (tuple, list)) and len(x) == 2
                                        and all(isinstance(t, str) for t in x))
            if not ok or pairs[i] != pairs[0]:
                raise ValueError(f"inputs[{i}] = {x!r:.80}: expected {'a (text, text_pair) pair' if pairs[0] else 'a text'}"
                                 " like inputs[0]")
        if pairs[0]:
            return [x[0] for x in inputs], [x[1] for x in inputs]
        return list(inputs), None

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, inputs, *, top_k: int | None = None, routing: str = "selector", batch_size: int = 32,
                labels=None, progress=None) -> list[Prediction]:
        """Predict ``inputs`` (texts or (text, text_pair) pairs); one :class:`Prediction` per input, in
        input order. ``top_k`` (routing selector/oracle, default 1) experts per input; ``labels``
        (names or ids) for ``routing="oracle"``; ``progress(n)`` is called after each batch of n."""
        texts, pairs = self._split_inputs(inputs)
        mode, k = self._plan(routing, top_k, labels, len(texts))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        label_ids = torch.tensor(self._label_ids(labels)) if mode == "oracle" else None
        encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_seq_length)
        order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
        results: list[Prediction | None] = [None] * len(texts)
        device = self.experts.prompts.device
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenizer.pad({key: [encoded[key][i] for i in rows] for key in encoded},
                                       padding_side="right", return_tensors="pt").to(device)
            extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
            experts, weights, logits = self._route(mode, k, batch, extra,
                                                   None if label_ids is None else label_ids[rows].to(device))
            if logits is None:
                logits = self.experts(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      experts=experts, **extra).logits          # [B, k, C]: one forward
            probs = self._fuse(logits, weights).exp()
            for j, i in enumerate(rows):
                label = int(probs[j].argmax())
                results[i] = Prediction(self.label_names[label], probs[j].tolist(), experts[j].tolist(),
                                        weights[j].tolist())
            if progress is not None:
                progress(len(rows))
        return results

    def _route(self, mode: str, k: int, batch, extra: dict, label_ids):
        """Expert ids [B, k] and weights [B, k] per example (and the logits when routing computed them)."""
        b, device = batch["input_ids"].shape[0], batch["input_ids"].device
        if mode == "selector":
            probs = selector_logits(self.selector, self.experts.model, batch["input_ids"], batch["attention_mask"],
                                    **extra).softmax(-1)
            weights, experts = probs.topk(k, dim=-1)
            return experts, weights / weights.sum(-1, keepdim=True), None
        if mode == "oracle":
            every = self.experts(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 **extra).logits                                # [K, B, C]
            experts = expert_scores(every, label_ids).topk(k, dim=-1).indices
            chosen = every.movedim(0, 1)[torch.arange(b, device=device).unsqueeze(1), experts]
            return experts, torch.full((b, k), 1.0 / k, device=device), chosen
        if mode == "fixed":
            return torch.full((b, 1), k, device=device), torch.ones(b, 1, device=device), None
        experts = torch.arange(k, device=device).expand(b, k)
        return experts, torch.full((b, k), 1.0 / k, device=device), None

    def _fuse(self, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[B, k, C] expert logits + [B, k] weights -> [B, C] fused log-probabilities (fp32)."""
        fused, _, _ = fuse_experts(logits.movedim(1, 0).float(), weights=weights, space=self.fusion_space,
                                   backend=self.experts.backend)
        return fused
