"""One PromptKD training step, split into its three phases, fused against unfused and TRL's GKD.

    python -m benchmarks.bench_prompt_kd_step [--vocab 32000] [--batch 8] [--max-new-tokens 32]
                                              [--steps 5] [--repeats 1] [--variants fused unfused ...] [--quick]
                                              [--device cpu|cuda] [--threads 1] [--out-dir DIR]

Models: tiny GPT-2s written from scratch with a ``--vocab``-token word-level vocabulary (the
synthetic instruction task's words, then filler words): teacher 2 layers × 64, student 1 layer ×
64, 2 heads, no dropout, seeds 0 and 1. The batch: ``--batch`` prompts of the synthetic
instruction task; every step the student samples up to ``--max-new-tokens`` tokens per prompt
(random initial models almost never sample the eos, so nearly every response is full length; the
mean number of response tokens per step is reported).

Variants (each a step from the same models, batch and seed; AdamW, lr 1e-3, clipped at 1.0):

* ``fused``            :meth:`kdengine.train.trainer.Trainer.training_step` of ``prompt_kd``
  (prompt_length 7): sampling (``kdengine.generation``), the prompt update and the student update
  with ``linear_kd_loss`` on hidden states and LM heads (``kdengine.methods.prompt_kd``).
* ``unfused``          the same step in plain PyTorch: the same sampling; the prompt prepended by
  hand (``inputs_embeds``), full ``[B, L, V]`` logits of every model, ``log_softmax`` and the KL
  written out, on the response rows ([N, V]).
* ``fused_no_prompt``  ``prompt_kd`` with prompt_length 0 (reverse KL to the teacher itself on
  the student's samples, TRL's GKD with lmbda 1): the like-for-like partner of ``trl_gkd``.
* ``trl_gkd``          ``trl.experimental.gkd.GKDTrainer.training_step`` (lmbda 1, beta 1 =
  reverse KL, temperature 1) + its optimizer step; skipped with the reason when trl is not
  importable.

Phases: ``sampling_ms`` (the student's ``generate`` and the batch it makes), ``prompt_update_ms``
(forwards, loss, backward and optimizer step of the teacher prompt; none without a prompt) and
``student_update_ms`` (the rest of the step), medians over ``--steps`` timed steps after one
untimed step; ``step_ms`` the median whole step (:func:`benchmarks._harness.time_ms`'s
``perf_counter`` loop on either device: ``generate`` synchronises with the host every token, and
each phase boundary synchronises CUDA). The untimed first step starts every variant from the same
state and RNG, so its losses are compared: ``loss_rel_err`` against ``fused`` (``unfused``) and
``fused_no_prompt`` (``trl_gkd``: the same samples, but TRL scores them left-padded without
position ids, which shifts GPT-2's positions in rows with shorter prompts).

Peak memory (``peak_MB``): every variant runs in its own fresh subprocess (the parent builds the
models once), so no variant inherits another's heap. After the timed steps, one more step is
measured with :func:`benchmarks._harness.peak_extra_bytes`: on CUDA the ``max_memory_allocated``
delta; on CPU the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus
the resident set before the step. torch keeps no CPU allocator statistics and its tensors are
invisible to tracemalloc, so the resident set is what sees them; it counts everything the step
allocates on top of the models, optimizer states and batch (logits, activations, gradients,
``generate``'s cache), at page granularity.

``--repeats R`` runs R processes per variant, round robin (fused, unfused, ..., fused, unfused,
...), so that a change in the load of a shared machine reaches every variant alike.

Results: ``<out-dir>/prompt_kd_step-<device>.{json,csv}`` (``prompt_kd_step_quick`` with
``--quick``), one row per variant and repeat, then a ``target`` row from the medians over the
repeats: fused peak / unfused peak (issue target ≤ 0.5), fused step time / unfused, and
``fused_no_prompt`` / ``trl_gkd`` for both (targets ≤ 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks._harness import (ResultRows, parse_threaded_args, peak_extra_bytes, print_table, time_ms,
                                 write_results)

VARIANTS = ("fused", "unfused", "fused_no_prompt", "trl_gkd")
PHASES = ("sampling", "prompt_update", "student_update")
PROMPT_LENGTH = 7
PROMPT_INIT = "Suppose you are a student."
LEARNING_RATE = 1e-3
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
TEACHER_SHAPE = dict(n_layer=2, n_embd=64, n_head=2, **NO_DROPOUT)
STUDENT_SHAPE = dict(n_layer=1, n_embd=64, n_head=2, **NO_DROPOUT)
COLUMNS = ("variant", "repeat", "response_tokens", "sampling_ms", "prompt_update_ms", "student_update_ms", "step_ms",
           "peak_MB", "first_teacher_loss", "first_student_loss", "loss_rel_err", "status")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size of both models")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one untimed step)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="processes per variant, run round robin")
    parser.add_argument("--quick", action="store_true", help="vocab 512, batch 2, 4 new tokens, 1 timed step")
    parser.add_argument("--models", help=argparse.SUPPRESS)          # a child: the parent's model folder
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------- models and data (parent, then each child)
def build_models(workdir: str, vocab_size: int) -> tuple[str, str]:
    """Teacher and student folders with a ``vocab_size``-token word-level tokenizer (5 special tokens,
    the instruction task's words, then filler words ``f0``, ``f1``, ...)."""
    from kdengine.data.synthetic import instruction_vocab
    from kdengine.tiny_models import SPECIAL_TOKENS, build_tiny_models

    words = instruction_vocab()
    filler = vocab_size - len(SPECIAL_TOKENS) - len(words)
    if filler < 0:
        raise SystemExit(f"--vocab must be >= {len(SPECIAL_TOKENS) + len(words)} (the task's words), "
                         f"got {vocab_size}")
    vocab = words + [f"f{i}" for i in range(filler)]
    return build_tiny_models(workdir, task="causal_lm", label_names=[], vocab=vocab, teacher=TEACHER_SHAPE,
                             student=STUDENT_SHAPE)


class _Setup:
    """Tokenizer, frozen teacher, student, the fixed batch (on ``device``) and the run's TrainConfig."""

    def __init__(self, models_dir: str, args, workdir: str):
        from kdengine import models
        from kdengine.data import make_collate_fn, tokenize_split
        from kdengine.data.synthetic import make_synthetic_instruction_task
        from kdengine.methods.prompt_kd import PromptKDOptions
        from kdengine.options import TrainConfig
        from kdengine.train.__main__ import TaskInputs

        teacher_dir, student_dir = (os.path.join(models_dir, role) for role in ("teacher", "student"))
        self.device = torch.device(args.device)
        self.tokenizer = models.load_tokenizer(student_dir, "student")
        data = make_synthetic_instruction_task(0, args.batch, 1, 0)
        max_seq_length = 64 + args.max_new_tokens                     # the synthetic prompts are < 64 tokens
        train = tokenize_split(data.train, self.tokenizer, "causal_lm", max_seq_length)
        collate = make_collate_fn(self.tokenizer, "causal_lm")
        self.inputs = TaskInputs([], self.tokenizer, train, train, collate)
        self.batch = {k: v.to(self.device) for k, v in collate(list(train)).items()}
        self.teacher = models.freeze(models.load_for_task(teacher_dir, "causal_lm", [], what="teacher")[0])
        self.teacher.to(self.device)
        self.student = models.load_for_task(student_dir, "causal_lm", [], what="student")[0].to(self.device)
        prompt_length = 0 if args.variant == "fused_no_prompt" else PROMPT_LENGTH
        self.cfg = TrainConfig(output_dir=workdir, task="causal_lm", method="prompt_kd", report_to="none",
                               max_seq_length=max_seq_length, per_device_train_batch_size=args.batch,
                               learning_rate=LEARNING_RATE, warmup_ratio=0.0, max_steps=args.steps + 2,
                               options=PromptKDOptions(max_new_tokens=args.max_new_tokens,
                                                       prompt_length=prompt_length, prompt_init_text=PROMPT_INIT,
                                                       sft_num_train_epochs=0))
        self.max_new_tokens = args.max_new_tokens


class _PhaseTimer:
    """Milliseconds per named phase, the device synchronised at each boundary."""

    def __init__(self, device: torch.device):
        self.device, self.ms = device, {name: [] for name in PHASES}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.ms[name].append((time.perf_counter() - start) * 1e3)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed


# ---------------------------------------------------------------- the variants: () -> (step, first-step losses)
def _fused(setup: _Setup, timer: _PhaseTimer):
    """The method's own step through the trainer; sampling and the prompt update timed by wrapping the
    method's two helpers, the student update = the step less both."""
    from kdengine.methods.base import STUDENT
    from kdengine.methods.prompt_kd import PromptKD
    from kdengine.train.teacher import context
    from kdengine.train.trainer import Trainer, make_accelerator

    accelerator = make_accelerator(setup.cfg, setup.cfg.output_dir)
    method = PromptKD(context(setup.cfg, accelerator, setup.inputs, setup.cfg.output_dir,
                              teachers=[setup.teacher], log=lambda message: None))
    trainer = Trainer(setup.cfg, accelerator, method, method.build_stage(STUDENT, setup.student),
                      setup.cfg.output_dir, save_checkpoints=False)
    method._sample = timer.wrap("sampling", method._sample)
    method._update_prompt = timer.wrap("prompt_update", method._update_prompt)

    def step():
        start = len(timer.ms["sampling"])
        with timer.phase("student_update"):          # the whole step; the two inner phases are taken off below
            loss, logs = trainer.training_step(setup.batch)
        inner = timer.ms["sampling"][start:] + timer.ms["prompt_update"][start:]
        timer.ms["student_update"][-1] -= sum(inner)
        return float(loss), None if "teacher_loss" not in logs else float(logs["teacher_loss"]), logs
    return step


def _sample(setup: _Setup, student):
    """The fused path's sampling (kdengine.generation), for the unfused step:
    ({"input_ids", "attention_mask"} [B, L], rows bool [B, L] whose next token is a response token)."""
    from kdengine import generation
    from kdengine.constants import IGNORE_INDEX

    eos, pad = generation.eos_token_id(setup.tokenizer), setup.tokenizer.pad_token_id
    prompt_ids, prompt_mask, _ = generation.prompt_batch(setup.batch["input_ids"], setup.batch["labels"], pad)
    student.eval()
    response, keep = generation.sample_responses(student, prompt_ids, prompt_mask,
                                                 max_new_tokens=setup.max_new_tokens, temperature=1.0, top_p=1.0,
                                                 eos_token_id=eos, pad_token_id=pad)
    sampled = generation.response_batch(prompt_ids, prompt_mask, response, keep, pad)
    return ({"input_ids": sampled["input_ids"], "attention_mask": sampled["attention_mask"]},
            sampled["labels"] != IGNORE_INDEX)


def reverse_kl(trained_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(trained) ‖ softmax(target)), written out: [N, V] fp32 -> scalar."""
    log_q = torch.log_softmax(trained_logits, -1)
    return (log_q.exp() * (log_q - torch.log_softmax(target_logits, -1))).sum(-1).mean()


def _unfused(setup: _Setup, timer: _PhaseTimer):
    """The same step in plain PyTorch with full logits (see the module docstring)."""
    from kdengine.experts import PromptExperts
    from kdengine.methods.prompt_kd import base_weight_at
    from kdengine.train.trainer import param_groups

    teacher, student, cfg = setup.teacher, setup.student, setup.cfg
    initial = PromptExperts(teacher, 1, PROMPT_LENGTH, init=PROMPT_INIT, tokenizer=setup.tokenizer).prompts
    prompt = torch.nn.Parameter(initial.detach()[0].clone())                       # [P, H]
    prompt_opt = torch.optim.AdamW([prompt], lr=LEARNING_RATE, weight_decay=cfg.weight_decay)
    student_opt = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=LEARNING_RATE)
    embed = teacher.get_input_embeddings()
    state = {"step": 0}

    def prompted_logits(inputs):
        """[B, L, V] the teacher's logits with the prompt in front (prompt positions dropped)."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), embed(ids)], 1)
        full_mask = torch.cat([mask.new_ones(ids.shape[0], PROMPT_LENGTH), mask], 1)
        return teacher(inputs_embeds=embeds, attention_mask=full_mask).logits[:, PROMPT_LENGTH:]

    def update(loss, params, optimizer):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step():
        with timer.phase("sampling"):
            inputs, rows = _sample(setup, student)
        with timer.phase("prompt_update"):
            with torch.no_grad():
                q_student = student(**inputs).logits[rows]
                p_plain = teacher(**inputs).logits[rows]
            p_prompted = prompted_logits(inputs)[rows]
            weight = base_weight_at(cfg.options.base_weight, state["step"], cfg.max_steps)
            teacher_loss = reverse_kl(p_prompted, q_student) + weight * reverse_kl(p_prompted, p_plain)
            update(teacher_loss, [prompt], prompt_opt)
        with timer.phase("student_update"):
            student.train()
            with torch.no_grad():
                target = prompted_logits(inputs)[rows]
            loss = reverse_kl(student(**inputs).logits[rows], target)
            update(loss, list(student.parameters()), student_opt)
        state["step"] += 1
        return float(loss), float(teacher_loss), {"response_tokens": rows.sum(1).float().mean()}
    return step


def _trl_gkd(setup: _Setup, timer: _PhaseTimer):
    """TRL's GKDTrainer.training_step (on-policy sampling, student and teacher full logits, generalised
    JSD at beta 1) and its optimizer step; None with the reason when trl does not import."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as exc:
        return None, f"trl is not importable ({exc})"
    from datasets import Dataset

    from kdengine import generation

    pad = setup.tokenizer.pad_token_id
    args = GKDConfig(output_dir=setup.cfg.output_dir, per_device_train_batch_size=len(setup.batch["input_ids"]),
                     learning_rate=LEARNING_RATE, lr_scheduler_type="constant", max_grad_norm=setup.cfg.max_grad_norm,
                     weight_decay=setup.cfg.weight_decay, lmbda=1.0, beta=1.0, temperature=1.0,
                     max_new_tokens=setup.max_new_tokens, max_length=setup.cfg.max_seq_length, report_to="none",
                     use_cpu=setup.device.type != "cuda", save_strategy="no", disable_dropout=True)
    unused = Dataset.from_dict({"input_ids": setup.batch["input_ids"].tolist()})   # required; steps get `batch`
    trainer = GKDTrainer(model=setup.student, teacher_model=setup.teacher, args=args, train_dataset=unused,
                         processing_class=setup.tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1          # set by Trainer.train's loop, which is not run here
    trainer.generate_on_policy_outputs = timer.wrap("sampling", trainer.generate_on_policy_outputs)
    prompt_ids, prompt_mask, _ = generation.prompt_batch(setup.batch["input_ids"], setup.batch["labels"], pad)
    batch = dict(setup.batch, prompts=prompt_ids, prompt_attention_mask=prompt_mask)

    def step():
        start = len(timer.ms["sampling"])
        with timer.phase("student_update"):
            inputs = dict(batch)
            loss = trainer.training_step(trainer.model, inputs)
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), setup.cfg.max_grad_norm)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        timer.ms["student_update"][-1] -= sum(timer.ms["sampling"][start:])
        tokens = (inputs["labels"] != -100).sum(1).float().mean()
        return float(loss), None, {"response_tokens": tokens}
    return step, None


def run_variant(args) -> dict:
    """In a child process: one untimed step (its losses), ``--steps`` timed ones, then the peak of one more."""
    with tempfile.TemporaryDirectory() as workdir:
        setup = _Setup(args.models, args, workdir)
        timer = _PhaseTimer(setup.device)
        if args.variant == "trl_gkd":
            step, reason = _trl_gkd(setup, timer)
            if step is None:
                return dict(variant=args.variant, status=f"skipped: {reason}")
        else:
            step = (_unfused if args.variant == "unfused" else _fused)(setup, timer)
        torch.manual_seed(0)
        first_loss, first_teacher_loss, _ = step()
        for name in PHASES:
            timer.ms[name].clear()
        tokens = []
        timed = time_ms(lambda: tokens.append(float(step()[2]["response_tokens"])), warmup=0, rep=args.steps,
                        device="cpu")          # a perf_counter loop on either device (see the docstring)
        peak = peak_extra_bytes(step, setup.device, warmup=0)
    row = dict(variant=args.variant, vocab=args.vocab, batch=args.batch, max_new_tokens=args.max_new_tokens,
               response_tokens=sum(tokens) / len(tokens))
    for name in PHASES:
        times = sorted(timer.ms[name])
        row[f"{name}_ms"] = times[len(times) // 2] if times else None
    row.update(step_ms=timed["p50"], step_ms_p20=timed["p20"], step_ms_p80=timed["p80"], peak_MB=peak / 2 ** 20,
               first_student_loss=first_loss, first_teacher_loss=first_teacher_loss)
    return row


# ---------------------------------------------------------------- parent
def _child(args, models_dir: str, variant: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_prompt_kd_step", "--models", models_dir, "--variant", variant,
               "--vocab", str(args.vocab), "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens),
               "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed (exit {done.returncode}):\n{done.stdout[-3000:]}"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_threaded_args(_parser(), argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    if args.quick:
        args.vocab, args.batch, args.max_new_tokens, args.steps, args.repeats = 512, 2, 4, 1, 1
    rows = ResultRows("prompt_kd_step")
    with tempfile.TemporaryDirectory() as workdir:
        models_dir = os.path.dirname(build_models(workdir, args.vocab)[0])
        for repeat in range(args.repeats):            # round robin: a change of the machine's load hits every variant
            for variant in args.variants:
                rows.append(dict(_child(args, models_dir, variant), repeat=repeat))
    for variant, reference in (("unfused", "fused"), ("trl_gkd", "fused_no_prompt")):
        for row in rows:
            ref = next((r for r in rows if r["variant"] == reference and r["repeat"] == row["repeat"]), None)
            if row["variant"] == variant and ref and "status" not in row:
                first = ref["first_student_loss"]
                row["loss_rel_err"] = abs(row["first_student_loss"] - first) / first

    def median(variant: str, key: str):
        values = sorted(r[key] for r in rows if r["variant"] == variant and r.get(key) is not None)
        return values[len(values) // 2] if values else None

    def ratio(key: str, a: str, b: str):
        top, bottom = median(a, key), median(b, key)
        return None if top is None or bottom is None else top / bottom

    rows.append(dict(variant="target", repeats=args.repeats,
                     peak_ratio_fused_vs_unfused=ratio("peak_MB", "fused", "unfused"),
                     time_ratio_fused_vs_unfused=ratio("step_ms", "fused", "unfused"),
                     time_ratio_fused_no_prompt_vs_trl_gkd=ratio("step_ms", "fused_no_prompt", "trl_gkd"),
                     peak_ratio_fused_no_prompt_vs_trl_gkd=ratio("peak_MB", "fused_no_prompt", "trl_gkd"),
                     peak_ratio_target=0.5, time_ratio_target=1.0))
    name = "prompt_kd_step_quick" if args.quick else "prompt_kd_step"
    print_table([r for r in rows if r["variant"] != "target"], COLUMNS,
                title=f"PromptKD step, V={args.vocab}, batch {args.batch}, {args.max_new_tokens} new tokens, "
                      f"{args.device}")
    print_table(rows[-1:], [k for k in rows[-1] if k != "variant"],
                title="fused / other (targets: peak <= 0.5, time <= 1)")
    paths = write_results(name, list(rows), args.out_dir, device=args.device)
    print("results:", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
