"""The offline teacher cache: a run's teacher side computed once over the training data, on disk.

Written by ``python -m kdengine.cache_teacher``, read by ``python -m kdengine.train --teacher_cache DIR``
(the teacher is then never loaded). Layout::

    DIR/manifest.json          what the cache holds and what it was made from (below)
    DIR/shard-00000/tensors.safetensors   examples [0, S), S = shard_size; each shard is written into a
    DIR/shard-00001/...                   temporary directory and renamed (kdengine.atomic), so a shard
                                          is complete or absent

Three kinds, by task:

* ``full`` (sequence classification): every tensor the method's ``teacher_outputs`` returns, raw logits
  ([..., B, C] per batch: the vanilla-KD teacher's ``logits``, PEE-KD's ``expert_logits`` [K, B, C]),
  stored per example. Raw logits re-temperature exactly: any ``kd_temperature`` works, and the
  student loss is the method's own, unchanged.
* ``rows`` (token classification, vanilla_kd): the teacher's raw logits [C] per labelled position
  (label != IGNORE_INDEX), fp32; any temperature works, the student loss is the method's own.
* ``topk`` (causal_lm): per labelled position (label != IGNORE_INDEX), the teacher's ``topk`` largest
  log-probabilities at the cache's temperature T (fp32) and their token ids (int32): 8 · topk bytes
  per position plus 8 per example. Top-k log-probs do not re-temperature (the rest of the row is
  gone), so training refuses another ``kd_temperature``; the student loss is
  :func:`kdengine.ops.sparse_kd_loss` (``tail="bucket"``).

The manifest records the method and its teacher-side options (routing, fusion, experts), the
temperature, the teacher sources and a fingerprint of the teachers' weight files, a fingerprint of
the tokenizer's vocabulary, the label names or vocabulary size, a fingerprint of the tokenized
training data and N. :func:`open_for_run` compares them with a training run and names every mismatch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch

from kdengine.atomic import atomic_directory, read_json, write_json
from kdengine.constants import IGNORE_INDEX

FORMAT = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
KINDS = {"sequence_classification": "full", "token_classification": "rows", "causal_lm": "topk"}
# Methods whose student stage reads its teacher side through ``teacher_outputs`` alone (what a cache
# can replace); others (MT-BERT's hidden states, Meta-KD's meta-teacher) compute it in their step.
CACHEABLE_METHODS = ("vanilla_kd", "pee_kd")
# Options of KDLossOptions that shape only the student's loss, not the teacher side (kd_temperature
# is checked on its own: it matters for top-k caches only).
STUDENT_SIDE_OPTIONS = ("kd_divergence", "kd_temperature", "kd_weight", "hard_weight", "jsd_beta")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _sha256(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(dataset) -> str:
    """sha256 over every training example's input ids, labels and order."""
    return _sha256(json.dumps([item["input_ids"], item["labels"]]).encode() for item in dataset)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    return _sha256([json.dumps([vocab, sorted(map(str, tokenizer.all_special_tokens))]).encode()])


def files_fingerprint(directories: list[str]) -> str:
    """sha256 over the weight files (*.safetensors, *.bin) of each directory, in order."""
    chunks = []
    for directory in directories:
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            if name.endswith((".safetensors", ".bin")):
                with open(os.path.join(directory, name), "rb") as fh:
                    chunks.append(name.encode() + fh.read())
    return _sha256(chunks)


def teacher_side_options(options) -> dict:
    """The method's options that change what its teacher side computes."""
    values = dataclasses.asdict(options) if options is not None else {}
    return {k: v for k, v in sorted(values.items()) if k not in STUDENT_SIDE_OPTIONS}


def run_identity(cfg, tokenizer, label_names: list[str], train_dataset, vocab_size: int | None) -> dict:
    """The manifest fields a training run must match (its data, tokenizer, vocabulary, method, teacher)."""
    return {
        "task": cfg.task,
        "method": cfg.method,
        "teacher_options": teacher_side_options(cfg.options),
        "teacher_model_name_or_path": cfg.teacher_list(),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "label_names": list(label_names),
        "vocab_size": vocab_size,
        "data_fingerprint": data_fingerprint(train_dataset),
        "num_examples": len(train_dataset),
    }


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def example_rows(teacher_outputs: dict, labels: torch.Tensor, kind: str, topk: int, temperature: float) -> list[dict]:
    """Per example of one batch, its tensors to store (CPU). ``full``: each [..., B, C] tensor's slice
    [..., C] (fp32). ``rows``: the labelled positions' logits [P, C] (fp32). ``topk``: the labelled
    positions' top-k log-probs at T and ids."""
    rows = []
    for b in range(labels.shape[0]):
        if kind == "full":
            rows.append({key: value.movedim(-2, 0)[b].float().cpu() for key, value in teacher_outputs.items()})
            continue
        logits = teacher_outputs["logits"][b][labels[b] != IGNORE_INDEX]
        if kind == "rows":
            rows.append({"logits": logits.float().cpu()})
        else:
            logprobs, indices = torch.log_softmax(logits.float() / temperature, -1).topk(topk, -1)
            rows.append({"topk_logprobs": logprobs.cpu(), "topk_indices": indices.to(torch.int32).cpu()})
    return rows


def write_shard(directory: str, index: int, rows: list[dict], kind: str) -> None:
    """One shard (atomic): ``full`` stacks each key over its examples; ``rows`` and ``topk`` concatenate positions
    and adds ``offsets`` [count + 1] (example e's positions are offsets[e] .. offsets[e + 1])."""
    from safetensors.torch import save_file  # noqa: PLC0415

    if kind == "full":
        tensors = {key: torch.stack([row[key] for row in rows]).contiguous() for key in rows[0]}
    else:
        counts = torch.tensor([0] + [next(iter(row.values())).shape[0] for row in rows], dtype=torch.int64)
        tensors = {"offsets": counts.cumsum(0),
                   **{key: torch.cat([row[key] for row in rows]).contiguous() for key in rows[0]}}
    with atomic_directory(os.path.join(directory, shard_name(index))) as tmp:
        save_file(tensors, os.path.join(tmp, TENSORS))


def shard_ranges(num_examples: int, shard_size: int) -> list[list[int]]:
    """[start, stop) of each shard (lists: as the manifest's JSON reads back)."""
    return [[start, min(num_examples, start + shard_size)] for start in range(0, num_examples, shard_size)]


def write_manifest(directory: str, manifest: dict) -> None:
    write_json(os.path.join(directory, MANIFEST), manifest)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def load_shard(directory: str, index: int, start: int, stop: int, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of one shard, checked against the example range it must cover (ValueError naming
    the shard when it is missing, truncated or holds another number of examples)."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    path = os.path.join(directory, shard_name(index), TENSORS)
    if not os.path.isfile(path):
        raise ValueError(f"teacher cache {directory}: {shard_name(index)} (examples {start}..{stop - 1}) is "
                         f"missing; rerun python -m kdengine.cache_teacher to complete the cache")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"teacher cache {directory}: {path} is truncated or damaged ({exc}); delete that "
                         f"shard directory and rerun python -m kdengine.cache_teacher to rewrite it") from None
    count = next(iter(tensors.values())).shape[0] if kind == "full" else tensors["offsets"].shape[0] - 1
    if count != stop - start:
        raise ValueError(f"teacher cache {directory}: {path} holds {count} examples but must hold examples "
                         f"{start}..{stop - 1} ({stop - start})")
    return tensors


class TeacherCache:
    """A complete cache in memory: ``rows(example_ids)`` gives what the method's teacher side gave."""

    def __init__(self, directory: str, manifest: dict, shards: list[dict[str, torch.Tensor]]):
        self.directory, self.manifest = directory, manifest
        self.kind = manifest["kind"]
        if self.kind == "full":
            self.tensors = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
        else:
            offsets = [shards[0]["offsets"]]
            for shard in shards[1:]:
                offsets.append(shard["offsets"][1:] + offsets[-1][-1])
            self.offsets = torch.cat(offsets)
            self.tensors = {key: torch.cat([s[key] for s in shards]) for key in shards[0] if key != "offsets"}

    def teacher_outputs(self, batch: dict) -> dict:
        """``full``: {key: [..., B, C]} as the method's teacher_outputs. ``rows``: {"logits": [B, L, C]}.
        ``topk``: {"topk_logprobs", "topk_indices": [B · L, k]}. Positions without a label hold zeros
        (the losses ignore them)."""
        ids = batch["example_id"].cpu()
        device = batch["input_ids"].device
        if self.kind == "full":
            return {key: value[ids].movedim(0, -2).to(device) for key, value in self.tensors.items()}
        labels = batch["labels"]
        live = (labels != IGNORE_INDEX).reshape(-1)
        picks = torch.cat([torch.arange(self.offsets[i], self.offsets[i + 1]) for i in ids.tolist()])
        if picks.numel() != int(live.sum()):
            raise ValueError(f"teacher cache {self.directory}: the batch has {int(live.sum())} labelled positions "
                             f"but the cache holds {picks.numel()} for its examples; the data changed")
        rows = live.nonzero().squeeze(1).cpu()
        out = {}
        for key, value in self.tensors.items():
            dense = torch.zeros(live.numel(), value.shape[1], dtype=torch.int64 if key == "topk_indices" else value.dtype)
            dense[rows] = value[picks].to(dense.dtype)
            out[key] = dense.to(device)
        if self.kind == "rows":
            out["logits"] = out["logits"].reshape(*labels.shape, -1)
        return out


def read_manifest(directory: str) -> dict:
    """The manifest of a cache directory (ValueError when there is none or it is damaged)."""
    if not os.path.isdir(directory):
        raise ValueError(f"teacher_cache {directory!r} is not a directory; create it with python -m "
                         f"kdengine.cache_teacher --config RUN.yaml --output {directory}")
    manifest = read_json(os.path.join(directory, MANIFEST))
    if manifest is None or manifest.get("format") != FORMAT:
        raise ValueError(f"teacher_cache {directory!r} has no {MANIFEST} of format {FORMAT}; it is not a "
                         f"teacher cache (python -m kdengine.cache_teacher writes one)")
    return manifest


def mismatches(manifest: dict, identity: dict) -> list[str]:
    """'<field>: cache <value> vs run <value>' for every identity field that differs."""
    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."

    return [f"{key}: cache {short(manifest.get(key))} vs this run {short(value)}"
            for key, value in identity.items() if manifest.get(key) != value]


def load(directory: str, manifest: dict) -> TeacherCache:
    """Every shard of a complete cache (checked: present, readable, the right number of examples)."""
    if not manifest.get("complete"):
        done = sum(os.path.isfile(os.path.join(directory, shard_name(i), TENSORS))
                   for i in range(len(manifest["shards"])))
        raise ValueError(f"teacher_cache {directory!r} is incomplete ({done} of {len(manifest['shards'])} shards "
                         f"written); rerun python -m kdengine.cache_teacher with the same options to finish it")
    shards = [load_shard(directory, i, start, stop, manifest["kind"])
              for i, (start, stop) in enumerate(manifest["shards"])]
    return TeacherCache(directory, manifest, shards)


def open_for_run(cfg, inputs, student_src: str | None) -> TeacherCache:
    """The cache ``cfg.teacher_cache`` checked against a training run (``inputs``: its TaskInputs; the
    student's vocabulary is read from ``student_src``'s config): ValueError naming each mismatch (data,
    tokenizer, vocabulary, method, teacher options or sources, temperature), an incomplete cache,
    missing or damaged shards, or options a cache cannot serve."""
    manifest = read_manifest(cfg.teacher_cache)
    if cfg.compare_baselines:
        raise ValueError("--teacher_cache serves one method's teacher side; pass --compare_baselines false")
    if cfg.student_num_layers is not None:
        raise ValueError("--teacher_cache never loads the teacher, so the student cannot be built from its layers "
                         "(student_num_layers); pass --model_name_or_path")
    student_vocab = None
    if manifest["kind"] == "topk":
        from transformers import AutoConfig  # noqa: PLC0415

        student_vocab = AutoConfig.from_pretrained(student_src).vocab_size
        if cfg.options.kd_divergence == "mse":
            raise ValueError("kd_divergence mse needs the teacher's raw logits, which a top-k cache does not hold")
    identity = run_identity(cfg, inputs.tokenizer, inputs.label_names, inputs.train_dataset, student_vocab)
    problems = mismatches(manifest, identity)
    temperature = getattr(cfg.options, "kd_temperature", None)
    if manifest["kind"] == "topk" and manifest["temperature"] != temperature:
        problems.append(f"kd_temperature: the cache stores top-{manifest['topk']} log-probs at T="
                        f"{manifest['temperature']} and this run distils at T={temperature}; top-k log-probs "
                        f"cannot be re-temperatured exactly (the rest of the row is gone): cache again with "
                        f"--kd_temperature {temperature}")
    if problems:
        raise ValueError(f"teacher_cache {cfg.teacher_cache!r} does not match this run: " + "; ".join(problems))
    return load(cfg.teacher_cache, manifest)


def attach(method, cache: TeacherCache) -> None:
    """Serve ``method``'s teacher side from ``cache``: its stages before the student are skipped (their
    outcome is cached), ``teacher_outputs`` reads the cache, a top-k cache distils through
    :func:`kdengine.ops.sparse_kd_loss`, and there is no teacher to report."""
    from kdengine.methods.base import STUDENT  # noqa: PLC0415

    method.stages = (STUDENT,)
    method.teacher_outputs = cache.teacher_outputs
    method.teacher_report = dict
    if cache.kind == "topk":
        method.student_loss = lambda outputs, batch, teacher: sparse_student_loss(method, outputs, batch, teacher)


def sparse_student_loss(method, student_outputs, batch: dict, teacher_outputs: dict):
    """VanillaKD's loss with the teacher's top-k: kd_weight · sparse_kd_loss + hard_weight · CE."""
    import torch.nn.functional as F  # noqa: PLC0415

    from kdengine.ops import sparse_kd_loss  # noqa: PLC0415

    opts = method.options
    student = student_outputs.logits.reshape(-1, student_outputs.logits.shape[-1])
    labels = batch["labels"].reshape(-1)
    soft = sparse_kd_loss(student, teacher_outputs["topk_logprobs"], teacher_outputs["topk_indices"], tail="bucket",
                          divergence=opts.kd_divergence, temperature=opts.kd_temperature, jsd_beta=opts.jsd_beta,
                          labels=labels, ignore_index=IGNORE_INDEX, backend=method.ctx.args.kernel_backend)
    hard = F.cross_entropy(student.float(), labels, ignore_index=IGNORE_INDEX)
    loss = opts.kd_weight * soft + opts.hard_weight * hard
    return loss, {"kd_loss": soft.detach(), "ce_loss": hard.detach()}
