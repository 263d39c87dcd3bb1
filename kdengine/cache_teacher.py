"""``python -m kdengine.cache_teacher``: run a training run's teacher side once over its training data
and store it (format: :mod:`kdengine.teacher_cache`), so ``python -m kdengine.train ... --teacher_cache
DIR`` distils without loading the teacher.

    python -m kdengine.cache_teacher --config RUN.yaml [--output CACHE_DIR] [--topk N] [--shard_size S]
                                     [any kdengine.train option]

The run's teacher stage and method stages (PEE-KD's experts and selector) run first exactly as
``python -m kdengine.train --stages teacher,method`` would (reusing what its output_dir already
holds); then the method's ``teacher_outputs`` runs over the training examples in order, shard by
shard, under a progress bar. Sequence classification stores the raw logits (any temperature works
later), token classification the raw logits of every labelled token, causal_lm the top ``--topk``
(default 32) log-probs per response position at the run's ``kd_temperature``. Each shard is renamed into place complete; an interrupted run resumes at the first
missing shard when started again with the same options, and the manifest says ``complete`` only at
the end. ``--output`` defaults to ``output_dir/teacher_cache``. Exit status 2 on bad options or inputs
(nothing written into the cache directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

DEFAULT_TOPK = 32
DEFAULT_SHARD_SIZE = 4096


def _parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m kdengine.cache_teacher", add_help=False)
    parser.add_argument("--output", default=None)
    parser.add_argument("--topk", type=int, default=None)
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE)
    parser.add_argument("-h", "--help", action="store_true")
    own, rest = parser.parse_known_args(argv)
    if own.help:
        print(__doc__)
        raise SystemExit(0)
    return own, rest


def check_request(cfg, own) -> tuple[str, str, int | None]:
    """(cache directory, kind, topk) for ``cfg``; ValueError before any work for what no cache can serve."""
    from kdengine.methods import resolve_method  # noqa: PLC0415
    from kdengine.teacher_cache import CACHEABLE_METHODS, KINDS  # noqa: PLC0415

    if cfg.task not in KINDS:
        raise ValueError(f"task {cfg.task!r} has no teacher cache yet (supported: {', '.join(KINDS)})")
    if not resolve_method(cfg.method).uses_teacher:
        raise ValueError(f"method {cfg.method!r} uses no task-trained teacher: there is nothing to cache")
    if cfg.method not in CACHEABLE_METHODS:
        raise ValueError(f"method {cfg.method!r} computes its teacher side inside its training step; a teacher "
                         f"cache serves {', '.join(CACHEABLE_METHODS)}")
    if cfg.teacher_cache is not None:
        raise ValueError("--teacher_cache is the input of kdengine.train; the cache to write is --output")
    if own.shard_size < 1:
        raise ValueError(f"--shard_size must be >= 1, got {own.shard_size}")
    kind = KINDS[cfg.task]
    topk = own.topk
    if kind != "topk" and topk is not None:
        raise ValueError(f"--topk applies to causal_lm caches; {cfg.task} stores the full logits")
    if kind == "rows" and cfg.method != "vanilla_kd":
        raise ValueError(f"a token_classification cache stores one teacher's logits per token (method vanilla_kd), "
                         f"not {cfg.method}'s teacher side")
    if kind == "topk":
        topk = DEFAULT_TOPK if topk is None else topk
        if topk < 1:
            raise ValueError(f"--topk must be >= 1, got {topk}")
        if cfg.method != "vanilla_kd":
            raise ValueError(f"a causal_lm cache stores one teacher's top-k log-probs (method vanilla_kd), not "
                             f"{cfg.method}'s teacher side")
        from transformers import AutoConfig  # noqa: PLC0415

        for source in cfg.teacher_list():
            vocab = getattr(AutoConfig.from_pretrained(source), "vocab_size", None)
            if vocab is not None and topk > vocab:
                raise ValueError(f"--topk {topk} exceeds the vocabulary of the teacher {source!r} ({vocab} tokens)")
        if cfg.options.kd_divergence == "mse":
            raise ValueError("kd_divergence mse needs the teacher's raw logits, which a top-k cache does not hold")
    return own.output or os.path.join(cfg.output_dir, "teacher_cache"), kind, topk


def write_cache(method, cfg, directory: str, kind: str, topk: int | None, shard_size: int) -> dict:
    """The cache of ``method``'s teacher side over its training data (resuming at the first missing
    shard); returns the manifest. ValueError when ``directory`` holds something else."""
    import torch  # noqa: PLC0415
    from torch.utils.data import DataLoader, Subset  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from kdengine import teacher_cache as tc  # noqa: PLC0415
    from kdengine.atomic import read_json  # noqa: PLC0415
    from kdengine.train.teacher import teacher_dir, teacher_name  # noqa: PLC0415

    ctx = method.ctx
    if ctx.accelerator.num_processes > 1:
        raise ValueError("cache_teacher writes from one process: start it with python -m, not torchrun")
    vocab = None
    if kind == "topk":
        vocab = ctx.teacher.get_output_embeddings().weight.shape[0]
        if topk > vocab:
            raise ValueError(f"--topk {topk} exceeds the teacher's vocabulary of {vocab} tokens")
    temperature = cfg.options.kd_temperature if kind == "topk" else None
    configured = cfg.teacher_list()
    fine_tuned = [teacher_dir(cfg.output_dir, teacher_name(i)) for i in range(len(ctx.teachers))]
    sources = [path if os.path.isdir(path) or i >= len(configured) else configured[i]
               for i, path in enumerate(fine_tuned)]   # the teachers that ran: fine-tuned here, or used as given
    stage_dirs = [os.path.join(cfg.output_dir, name) for name in method.stages[:-1]]
    ranges = tc.shard_ranges(len(ctx.train_dataset), shard_size)
    manifest = {"format": tc.FORMAT, "kind": kind, "topk": topk, "temperature": temperature,
                **tc.run_identity(cfg, ctx.tokenizer, ctx.label_names, ctx.train_dataset, vocab),
                "teacher_fingerprint": tc.files_fingerprint(sources + stage_dirs),
                "shard_size": shard_size, "shards": ranges, "complete": False}
    existing = read_json(os.path.join(directory, tc.MANIFEST)) if os.path.isdir(directory) else None
    if existing is not None:
        differ = tc.mismatches(existing, {k: v for k, v in manifest.items() if k != "complete"})
        if differ:
            raise ValueError(f"{directory} holds a teacher cache of another run ({'; '.join(differ)}); pass "
                             f"another --output or delete it")
        if existing.get("complete"):
            ctx.log(f"[cache_teacher] {directory} is complete already")
            return existing
    elif os.path.isdir(directory) and os.listdir(directory):
        raise ValueError(f"--output {directory!r} is a non-empty directory without a teacher cache manifest; "
                         f"pass an empty or new directory")
    os.makedirs(directory, exist_ok=True)
    tc.write_manifest(directory, manifest)

    def present(index: int, start: int, stop: int) -> bool:
        try:
            tc.load_shard(directory, index, start, stop, kind)
        except ValueError:
            return False
        return True

    todo = [i for i, (start, stop) in enumerate(ranges) if not present(i, start, stop)]
    done_examples = sum(stop - start for i, (start, stop) in enumerate(ranges) if i not in todo)
    if done_examples:
        ctx.log(f"[cache_teacher] resuming: {len(ranges) - len(todo)} of {len(ranges)} shards present")
    bar = tqdm(total=len(ctx.train_dataset), initial=done_examples, desc="cache_teacher", unit="ex")
    for index in todo:
        start, stop = ranges[index]
        loader = DataLoader(Subset(ctx.train_dataset, range(start, stop)), batch_size=cfg.per_device_eval_batch_size,
                            shuffle=False, collate_fn=ctx.collate_fn)
        rows = []
        for batch in loader:
            batch = {k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.no_grad(), ctx.accelerator.autocast():
                outputs = method.teacher_outputs(batch)
            rows += tc.example_rows(outputs, batch["labels"], kind, topk, temperature)
            bar.update(batch["labels"].shape[0])
        tc.write_shard(directory, index, rows, kind)
    bar.close()
    manifest["complete"] = True
    tc.write_manifest(directory, manifest)
    ctx.log(f"[cache_teacher] {directory}: {len(ctx.train_dataset)} examples, {kind}"
            + (f" top-{topk} at T={temperature}" if kind == "topk" else " logits"))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2: bad options or inputs)."""
    from kdengine.config import ConfigError, parse_args  # noqa: PLC0415

    own, rest = _parse(argv)
    try:
        cfg = parse_args(rest)
        directory, kind, topk = check_request(cfg, own)
    except (ConfigError, ValueError) as exc:
        print(f"kdengine.cache_teacher: error: {exc}", file=sys.stderr)
        return 2
    from kdengine.train.__main__ import run  # noqa: PLC0415

    run_cfg = dataclasses.replace(cfg, stages="teacher,method", compare_baselines=False)
    try:
        run(run_cfg, after_method_stages=lambda method: write_cache(method, run_cfg, directory, kind, topk,
                                                                    own.shard_size))
    except ValueError as exc:
        print(f"kdengine.cache_teacher: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
