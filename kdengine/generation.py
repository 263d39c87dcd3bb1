"""Sampling responses from a causal LM for on-policy distillation and generation-based evaluation.

A ``causal_lm`` batch (:func:`kdengine.data.tokenize.make_collate_fn`) holds prompt + response +
eos, right-padded, with ``labels[t] = input_ids[t + 1]`` on response positions. Here:

* :func:`prompt_batch` cuts the prompts out of such a batch, left-padded for ``generate``;
* :func:`sample_responses` samples responses with the KV cache (``model.generate``) and masks every
  token after the first eos;
* :func:`response_batch` builds ``[prompt; response]`` right-padded with the same label layout, so
  the responses can be scored like the reference ones (prompt positions out of the loss);
* :func:`rouge_l` scores generated responses for held-out prompts with ``rouge-score`` (ROUGE-L
  F1 × 100, stemming on, as MiniLLM and PromptKD report it) and writes them to
  ``output_dir/predictions/``; without the package it returns nothing and says so once.
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch

from kdengine.constants import IGNORE_INDEX
from kdengine.data.tokenize import eos_token_id

_NOTED = set()


def prompt_batch(input_ids: torch.Tensor, labels: torch.Tensor, pad_token_id: int):
    """The prompts of a right-padded causal_lm batch, left-padded.

    Args:
        input_ids: [B, L] int64, prompt + response + eos, right-padded.
        labels: [B, L] int64, IGNORE_INDEX before the last prompt token (labels[t] = input_ids[t + 1]).
        pad_token_id: the filler of the left padding.

    Returns:
        (prompt_ids [B, Lp] int64, prompt_mask [B, Lp] int64 0/1, prompt_lengths [B] int64), Lp the
        longest prompt.
    """
    has_label = labels != IGNORE_INDEX
    if not bool(has_label.any(1).all()):
        raise ValueError("a causal_lm row has no response token (every label is IGNORE_INDEX)")
    lengths = has_label.long().argmax(1) + 1                                   # last prompt token + 1
    width = int(lengths.max())
    cols = torch.arange(width, device=input_ids.device).unsqueeze(0) - (width - lengths).unsqueeze(1)
    valid = cols >= 0
    ids = input_ids.gather(1, cols.clamp_min(0)).masked_fill(~valid, pad_token_id)
    return ids, valid.long(), lengths


@torch.no_grad()
def sample_responses(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                     temperature: float, top_p: float, eos_token_id: int, pad_token_id: int):
    """Sample one response per prompt (``model.generate``: KV cache, ``do_sample``, top-k off).

    Args:
        model: a transformers causal LM (unwrapped), in the mode the caller wants (eval).
        prompt_ids, prompt_mask: [B, Lp] left-padded prompts (:func:`prompt_batch`).
        max_new_tokens: >= 1. temperature: > 0. top_p: in (0, 1].

    Returns:
        (response_ids [B, T] int64, response_mask [B, T] bool): T <= max_new_tokens; the mask keeps
        each response up to and including its first eos and drops everything after it (the filler
        ``generate`` writes once a row has ended, whatever its id).
    """
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=top_p,
                         temperature=temperature, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, use_cache=True)
    response = out[:, prompt_ids.shape[1]:]
    is_eos = (response == eos_token_id).long()
    return response, (is_eos.cumsum(1) - is_eos) == 0


def response_batch(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor, pad_token_id: int) -> dict:
    """``[prompt; response]`` right-padded, as a causal_lm batch.

    Args:
        prompt_ids, prompt_mask: [B, Lp] left-padded prompts; response_ids, response_mask: [B, T].

    Returns:
        {"input_ids", "attention_mask", "labels"}: [B, Lp + T] int64, each row's real tokens first;
        labels[t] = input_ids[t + 1] where t + 1 is a response token, IGNORE_INDEX elsewhere.
    """
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask.bool(), response_mask.bool()], 1)
    is_response = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), response_mask.bool()], 1)
    shift = (prompt_mask == 0).sum(1, keepdim=True)                            # left padding per row
    width = ids.shape[1]
    cols = torch.arange(width, device=ids.device).unsqueeze(0) + shift
    inside = cols < width
    cols = cols.clamp_max(width - 1)
    mask = mask.gather(1, cols) & inside
    ids = ids.gather(1, cols).masked_fill(~mask, pad_token_id)
    target = is_response.gather(1, cols) & inside
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(target[:, 1:], ids[:, 1:], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


def rouge_available() -> bool:
    return importlib.util.find_spec("rouge_score") is not None


def rouge_l(model, dataset, *, tokenizer, collate_fn, batch_size: int, max_seq_length: int, seeds: list[int],
            device, output_dir: str | None, log=print, is_main: bool = True) -> dict:
    """ROUGE-L F1 × 100 (``rouge_score``, stemming on) of responses sampled (temperature 1, top-p 1,
    up to ``max_seq_length`` tokens in all) for the prompts of ``dataset`` against its responses,
    once per seed: {"rougeL": mean over seeds, "rougeL_std": their std (several seeds)}. Writes
    ``output_dir/predictions/seed<seed>.jsonl`` ({"prompt", "reference", "generated"}) on the main
    process. {} (and one note) when rouge-score is not installed."""
    if not rouge_available():
        if "rouge" not in _NOTED:
            _NOTED.add("rouge")
            log("[evaluate] ROUGE-L skipped: the rouge-score package is not installed (pip install rouge-score)")
        return {}
    from rouge_score import rouge_scorer  # noqa: PLC0415

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    eos, pad = eos_token_id(tokenizer), tokenizer.pad_token_id
    items = list(dataset)
    scores = []
    for seed in seeds:
        rows = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(items), batch_size):
                batch = collate_fn(items[start:start + batch_size])
                ids, mask, _ = prompt_batch(batch["input_ids"].to(device), batch["labels"].to(device), pad)
                response, keep = sample_responses(model, ids, mask, max_new_tokens=max_seq_length - ids.shape[1],
                                                  temperature=1.0, top_p=1.0, eos_token_id=eos, pad_token_id=pad)
                for b in range(ids.shape[0]):
                    labels = batch["labels"][b]
                    reference = [t for t in labels.tolist() if t not in (IGNORE_INDEX, eos)]
                    generated = [t for t in response[b][keep[b]].tolist() if t != eos]
                    rows.append({"prompt": tokenizer.decode(ids[b][mask[b].bool()], skip_special_tokens=True),
                                 "reference": tokenizer.decode(reference, skip_special_tokens=True),
                                 "generated": tokenizer.decode(generated, skip_special_tokens=True)})
        f1 = [scorer.score(r["reference"], r["generated"])["rougeL"].fmeasure for r in rows]
        scores.append(100.0 * sum(f1) / len(f1))
        if is_main and output_dir is not None:
            os.makedirs(os.path.join(output_dir, "predictions"), exist_ok=True)
            with open(os.path.join(output_dir, "predictions", f"seed{seed}.jsonl"), "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
    result = {"rougeL": sum(scores) / len(scores)}
    if len(scores) > 1:
        result["rougeL_std"] = float(torch.tensor(scores).std())
    return result
