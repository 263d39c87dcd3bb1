"""The one training loop: any stage of any method, on accelerate (DDP, accumulation, mixed precision).

``Trainer.train`` runs a :class:`~kdengine.methods.base.Stage`: per micro-batch the method's
``training_step`` (by default teacher under ``no_grad`` -> student forward -> ``student_loss``),
then backward -> clip -> AdamW step -> warmup + linear-decay (or constant) schedule for each
optimizer of the stage the method did not update itself; it logs, evaluates and writes atomic
checkpoints of every module of the stage; ``resume`` restores everything, data position included. The data order of epoch e is a permutation seeded with ``seed + e``, the same
on every process; accelerate shards it, so N processes with per-device batch B see the batches of
one process with batch N·B. Every stage starts from :func:`seed_stage` (the run seed and the
stage's name), so its numbers do not depend on which stages ran before it in the process.
"""

from __future__ import annotations

import math
import os
import time
import zlib

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from kdengine.constants import IGNORE_INDEX
from kdengine.methods.base import STUDENT, Stage, StepContext
from kdengine.metrics import compute_metrics
from kdengine.models import model_inputs
from kdengine.train import checkpoint
from kdengine.train.reporting import MetricsLog


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf."""


def seed_stage(seed: int, name: str) -> None:
    """Seed python, numpy and torch (every device) for the stage ``name`` from the run's ``seed`` and
    the name alone: a stage draws the same numbers whether the stages before it ran in this process
    or were skipped (a resumed run, ``--stages``, finished baselines)."""
    set_seed((seed + zlib.crc32(name.encode())) % 2**32)


def cpu_only() -> bool:
    """No CUDA device: accelerate must be told, or torchrun's processes would not form a (gloo) group."""
    return not torch.cuda.is_available()


def make_accelerator(cfg, run_dir: str) -> Accelerator:
    """One accelerator per run directory (TensorBoard events go to ``run_dir/runs``)."""
    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    trackers = cfg.report_list()
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, cpu=cpu_only(),
                              mixed_precision=precision, log_with=trackers or None, project_dir=run_dir)
    if trackers:
        accelerator.init_trackers("runs")
    return accelerator


def _merged_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """:func:`param_groups` of several modules as one decay group and one no-decay group."""
    groups = [param_groups(m, weight_decay) for m in modules]
    return [{"params": [p for g in groups for p in g[i]["params"]], "weight_decay": groups[0][i]["weight_decay"]}
            for i in range(2)]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only (not on biases or LayerNorm/RMSNorm weights)."""
    no_decay = set()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower():
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (rest if name.endswith("bias") or id(param) in no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class _Step(StepContext):
    """The trainer's StepContext: counters and the optimizers one micro-batch may update."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.stage, self.modules, self.accelerator = trainer.stage, trainer.modules, trainer.accelerator
        self.total_steps = trainer.total_steps
        self.global_step, self.epoch = 0, 0.0
        self.updated: set[str] = set()

    def update(self, loss: torch.Tensor, *optimizers: str) -> None:
        trainer, acc = self.trainer, self.accelerator
        names = optimizers or tuple(n for n in trainer.optimizers if n not in self.updated)
        unknown = [n for n in names if n not in trainer.optimizers]
        if unknown:
            raise ValueError(f"stage {self.stage.name!r} has no optimizer {unknown[0]!r} "
                             f"(optimizers: {', '.join(trainer.optimizers)})")
        acc.backward(loss)
        for name in names:
            optimizer = trainer.optimizers[name]
            if acc.sync_gradients and trainer.cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(trainer.optimizer_params[name], trainer.cfg.max_grad_norm)
            optimizer.step()
            if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                trainer.schedulers[name].step()
            optimizer.zero_grad(set_to_none=True)
            self.updated.add(name)


class Trainer:
    """Train one :class:`~kdengine.methods.base.Stage` of ``method`` into ``run_dir``.

    Args:
        cfg: the TrainConfig (batch sizes, warmup, clipping, logging/eval/save strategy, seed).
        accelerator: from :func:`make_accelerator` for ``run_dir``.
        method: the Method whose ``training_step`` computes each micro-batch's loss; its ctx holds
            the datasets and collate_fn.
        stage: the modules to train (all join the optimizers, DDP and checkpoints), learning
            rate, epochs/max_steps, schedule, optimizers.
        save_checkpoints: False for a trainer that only evaluates or is not resumable.
        desc: progress bar label (default: the stage name).
    """

    def __init__(self, cfg, accelerator, method, stage: Stage, run_dir: str, *, save_checkpoints: bool = True,
                 desc: str | None = None):
        self.cfg, self.accelerator, self.method, self.run_dir = cfg, accelerator, method, run_dir
        self.stage, self.desc = stage, desc or stage.name
        self.ctx = method.ctx
        self.save_checkpoints = save_checkpoints
        self.metric = cfg.best_metric_name()
        specs = stage.optimizer_specs()
        for spec in specs:
            missing = [m for m in spec.modules if m not in stage.modules]
            if missing or not spec.modules:
                raise ValueError(f"stage {stage.name!r}: optimizer {spec.name!r} names modules {missing or '()'} "
                                 f"that the stage does not have ({', '.join(stage.modules)})")
        trained = [name for name, m in stage.modules.items() if any(p.requires_grad for p in m.parameters())]
        if not trained:
            raise ValueError(f"stage {stage.name!r} has no trainable parameter")
        optimizers = [torch.optim.AdamW(_merged_groups([stage.modules[m] for m in spec.modules], cfg.weight_decay),
                                        lr=spec.learning_rate) for spec in specs]
        prepared = accelerator.prepare(*(stage.modules[m] for m in trained), *optimizers)
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        wrapped = dict(zip(trained, prepared[:len(trained)]))
        self.modules = {name: wrapped.get(name, module) for name, module in stage.modules.items()}
        self.model = next(iter(self.modules.values()))
        self.optimizers = {spec.name: opt for spec, opt in zip(specs, prepared[len(trained):])}
        self.optimizer_params = {spec.name: [p for m in spec.modules for p in self.modules[m].parameters()]
                                 for spec in specs}
        self.optimizer = self.optimizers[specs[0].name]
        self.batches_per_epoch = len(self._train_loader(0))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.gradient_accumulation_steps)
        if stage.max_steps > 0:
            self.total_steps = stage.max_steps
        else:
            self.total_steps = max(1, math.ceil(stage.num_train_epochs * self.steps_per_epoch))
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.schedulers = {spec.name: (get_linear_schedule_with_warmup(opt.optimizer, warmup, self.total_steps)
                                       if spec.schedule == "linear" else
                                       get_constant_schedule_with_warmup(opt.optimizer, warmup))
                           for spec, opt in zip(specs, self.optimizers.values())}
        self.scheduler = self.schedulers[specs[0].name]
        self.step_context = _Step(self)
        self.metrics_log = MetricsLog(accelerator, run_dir)
        self.state = {"stage": stage.name, "global_step": 0, "epoch": 0, "batch_in_epoch": 0,
                      "total_steps": self.total_steps,
                      "best_metric": None, "best_step": None, "metric_for_best_model": f"eval_{self.metric}",
                      "loss_sum": 0.0, "loss_count": 0, "train_runtime": 0.0, "train_samples": 0,
                      "log_history": []}

    # ---------------------------------------------------------------- data
    def _train_loader(self, epoch: int) -> DataLoader:
        """Epoch ``epoch``'s batches: a permutation seeded with seed + epoch, sharded by accelerate.

        The loader gets its own generator: a DataLoader without one draws its worker base seed from
        the global torch RNG at each ``iter()``, which would shift dropout after a resume."""
        dataset = self.ctx.train_dataset
        generator = torch.Generator().manual_seed(self.cfg.seed + epoch)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        loader = DataLoader(dataset, batch_size=self.cfg.per_device_train_batch_size, sampler=order,
                            collate_fn=self.ctx.collate_fn, num_workers=self.cfg.dataloader_num_workers,
                            generator=generator)
        return self.accelerator.prepare_data_loader(loader)

    def _eval_loader(self, dataset) -> DataLoader:
        loader = DataLoader(dataset, batch_size=self.cfg.per_device_eval_batch_size, shuffle=False,
                            collate_fn=self.ctx.collate_fn, num_workers=self.cfg.dataloader_num_workers,
                            generator=torch.Generator().manual_seed(self.cfg.seed))
        return self.accelerator.prepare_data_loader(loader)

    # ---------------------------------------------------------------- one step
    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """One micro-batch: ``method.training_step`` -> backward -> (clip, step, schedule) of the
        optimizers the method did not update itself."""
        acc, step = self.accelerator, self.step_context
        step.global_step = self.state["global_step"]
        step.epoch = self.state["global_step"] / self.steps_per_epoch
        step.updated = set()
        with acc.accumulate(*self.modules.values()):
            loss, logs = self.method.training_step(step, batch)
            if len(step.updated) < len(self.optimizers):
                step.update(loss)
        return loss.detach(), {k: v.detach().float() for k, v in logs.items()}

    def _train_mode(self) -> None:
        for module in self.modules.values():
            module.train()

    # ---------------------------------------------------------------- loop
    def train(self, resume_dir: str | None = None) -> dict:
        """Train to ``total_steps``; returns train_results (HF keys)."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        if resume_dir:
            state.update(checkpoint.load_checkpoint(acc, resume_dir, modules=self.modules, optimizers=self.optimizers,
                                                    schedulers=self.schedulers, template=state))
            self.ctx.log(f"[{self.desc}] resumed from {resume_dir} at step {state['global_step']} "
                         f"(epoch {state['epoch']}, batch {state['batch_in_epoch']})")
        self.metrics_log.rewrite(state["log_history"])
        device = acc.device
        saved = state.pop("window", None) or {"loss": 0.0, "n": 0, "logs": {}}
        window = {"loss": torch.tensor(saved["loss"], device=device), "n": saved["n"],
                  "logs": {k: torch.tensor(v, device=device) for k, v in saved["logs"].items()}}
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        step_counter = torch.full((), state["global_step"] + 1, dtype=torch.long, device=device)
        bar = tqdm(total=self.total_steps, initial=state["global_step"], desc=self.desc,
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        started, window_start, window_samples = time.perf_counter(), time.perf_counter(), 0
        runtime_before = state["train_runtime"]
        self._train_mode()
        for epoch in range(state["epoch"], self.num_epochs):
            loader = self._train_loader(epoch)
            if state["batch_in_epoch"]:
                loader = acc.skip_first_batches(loader, state["batch_in_epoch"])
            for batch in loader:
                loss, logs = self.training_step(batch)
                first_bad = torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, step_counter)
                window["loss"] += loss
                window["n"] += 1
                for k, v in logs.items():
                    window["logs"][k] = window["logs"].get(k, 0.0) + v
                batch_size = batch["input_ids"].shape[0] * acc.num_processes
                window_samples += batch_size
                state["train_samples"] += batch_size
                state["batch_in_epoch"] += 1
                if not acc.sync_gradients:
                    continue
                state["global_step"] += 1
                step_counter += 1
                bar.update(1)
                step = state["global_step"]
                if step % cfg.logging_steps == 0 or step == self.total_steps:
                    row = self._flush(window, first_bad, step / self.steps_per_epoch,
                                      window_samples / (time.perf_counter() - window_start))
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}",
                                    ex_s=f"{row['examples_per_second']:.0f}")
                    window_start, window_samples = time.perf_counter(), 0
                if self.stage.evaluate and cfg.eval_strategy == "steps" \
                        and step % (cfg.eval_steps or cfg.logging_steps) == 0:
                    self._evaluate_and_track(step / self.steps_per_epoch)
                if step >= self.total_steps:
                    break
                if self.save_checkpoints and cfg.save_strategy == "steps" and step % cfg.save_steps == 0:
                    self._checkpoint(window, first_bad, started, runtime_before)
            else:  # the epoch ran to its end
                self._end_of_epoch(epoch, window, first_bad, started, runtime_before)
                continue
            if state["batch_in_epoch"] >= self.batches_per_epoch:  # the last step closed the epoch too
                self._end_of_epoch(epoch, window, first_bad, started, runtime_before)
            break
        bar.close()
        if window["n"]:
            self._flush(window, first_bad, state["epoch"], 0.0, log=False)
        self._check_finite(first_bad)
        state["train_runtime"] = runtime_before + time.perf_counter() - started
        return self.train_results()

    def _end_of_epoch(self, epoch: int, window, first_bad, started: float, runtime_before: float) -> None:
        state = self.state
        state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
        if self.cfg.eval_strategy == "epoch" and self.stage.evaluate:
            self._evaluate_and_track(epoch + 1)
        if state["global_step"] < self.total_steps and self.save_checkpoints and self.cfg.save_strategy == "epoch":
            self._checkpoint(window, first_bad, started, runtime_before)

    def train_results(self) -> dict:
        state = self.state
        runtime = state["train_runtime"]
        return {"train_loss": state["loss_sum"] / max(1, state["loss_count"]), "train_runtime": round(runtime, 3),
                "train_samples": state["train_samples"],
                "train_samples_per_second": round(state["train_samples"] / max(runtime, 1e-9), 3),
                "train_steps_per_second": round(state["global_step"] / max(runtime, 1e-9), 3),
                "global_step": state["global_step"], "epoch": round(state["global_step"] / self.steps_per_epoch, 4)}

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad = int(first_bad.item())
        if bad >= 0:
            last = checkpoint.latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"[{self.desc}] the training loss became NaN/inf at step {bad}; last good checkpoint: "
                f"{last or 'none (no checkpoint was written before the failure)'}. Lower learning_rate, enable "
                f"max_grad_norm or use bf16 instead of fp16, then resume_from_checkpoint={last or 'None'}")

    def _flush(self, window: dict, first_bad: torch.Tensor, epoch: float, examples_per_second: float,
               log: bool = True) -> dict:
        """Reduce the logging window over processes, check it is finite, append it to the history."""
        acc, state = self.accelerator, self.state
        self._check_finite(first_bad)
        n = max(window["n"], 1)
        names = sorted(window["logs"])
        values = torch.stack([window["loss"].float() / n] + [window["logs"][k] / n for k in names])
        values = acc.reduce(values, reduction="mean").tolist()
        state["loss_sum"] += values[0] * window["n"]
        state["loss_count"] += window["n"]
        window["loss"].zero_()
        window["n"], window["logs"] = 0, {}
        row = {"step": state["global_step"], "epoch": round(epoch, 4), "loss": values[0],
               "learning_rate": self.scheduler.get_last_lr()[0],
               "examples_per_second": round(examples_per_second, 2), **dict(zip(names, values[1:]))}
        if log:
            state["log_history"].append(row)
            self.metrics_log.log(row)
        return row

    def _checkpoint(self, window, first_bad, started: float, runtime_before: float) -> None:
        self._check_finite(first_bad)
        self.state["train_runtime"] = runtime_before + time.perf_counter() - started
        # The open logging window travels with the checkpoint, so a resumed run logs the same values.
        state = {**self.state, "window": {"loss": window["loss"].item(), "n": window["n"],
                                          "logs": {k: float(v) for k, v in window["logs"].items()}}}
        checkpoint.save_checkpoint(self.accelerator, self.run_dir, self.state["global_step"], modules=self.modules,
                                   optimizers=self.optimizers, schedulers=self.schedulers, state=state,
                                   save_total_limit=self.cfg.save_total_limit)

    def _evaluate_and_track(self, epoch: float) -> dict:
        results = self.evaluate()
        row = {"step": self.state["global_step"], "epoch": round(epoch, 4), **results}
        self.state["log_history"].append(row)
        self.metrics_log.log(row)
        value = results.get(f"eval_{self.metric}")
        best = self.state["best_metric"]
        if value is not None and (best is None or (value < best if self.metric == "loss" else value > best)):
            self.state["best_metric"], self.state["best_step"] = value, self.state["global_step"]
        self._train_mode()
        return results

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, dataset=None, *, plot_teacher=None) -> dict:
        """Metrics of the student on ``dataset`` (default: the validation split), HF keys.

        With ``plot_teacher`` (a teacher model), also returns ``(teacher [N, C], student [N, C])``
        numpy logits of the first labelled rows (for the logit plot) under the key ``"_logits"``:
        the method's teacher logits when its ``teacher_outputs`` has ``"logits"``, else that model's.
        """
        teacher_logits = plot_teacher is not None
        acc, task = self.accelerator, self.ctx.task
        dataset = self.ctx.eval_dataset if dataset is None else dataset
        if dataset is None:
            return {}
        self.model.eval()
        preds, refs, losses, counts, pairs = [], [], [], [], []
        for batch in self._eval_loader(dataset):
            logits = self.model(**model_inputs(batch)).logits.float()
            labels = batch["labels"]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                 reduction="none").reshape(labels.shape)
            valid = labels != IGNORE_INDEX
            prediction = logits.argmax(-1)
            if labels.dim() == 2:                       # token classification, causal LM
                ce_sum, count = ce.sum(-1), valid.sum(-1)
                prediction = acc.pad_across_processes(prediction, dim=1, pad_index=IGNORE_INDEX)
                labels = acc.pad_across_processes(labels, dim=1, pad_index=IGNORE_INDEX)
            else:
                ce_sum, count = ce, valid.long()
            gathered = acc.gather_for_metrics((prediction, labels, ce_sum, count))
            for store, value in zip((preds, refs, losses, counts), gathered):
                store.append(value.cpu())
            if teacher_logits and acc.is_main_process and sum(len(p[0]) for p in pairs) < 400:
                pairs.append(self._logit_pair(batch, logits, valid, plot_teacher))
        results = {"eval_loss": float(torch.cat(losses).sum() / torch.cat(counts).sum().clamp_min(1))}
        references = _stack(refs)
        scored = compute_metrics(task, _stack(preds).numpy(), references.numpy(), self.ctx.label_names)
        results.update({f"eval_{k}": v for k, v in scored.items()})
        results["eval_samples"] = len(references)
        if self.stage.name == STUDENT or task == "causal_lm":   # causal_lm: the teacher's ROUGE-L too
            results.update({f"eval_{k}": v for k, v in self.method.extra_metrics(self.model, dataset).items()})
        if pairs:
            import numpy as np  # noqa: PLC0415

            results["_logits"] = (np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))
        return results

    def _logit_pair(self, batch: dict, student_logits: torch.Tensor, valid: torch.Tensor, teacher_model):
        """(teacher, student) logits of the labelled rows of a batch."""
        teacher = None
        if self.method.uses_teacher:
            out = self.method.teacher_outputs(batch)
            teacher = out.get("logits") if isinstance(out, dict) else None
        if teacher is None:
            teacher = teacher_model(**model_inputs(batch)).logits
        return teacher.float()[valid].cpu().numpy(), student_logits[valid].cpu().numpy()


def _stack(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [B] or [B, L] chunks (padding L with -100 to the longest)."""
    if chunks[0].dim() == 1:
        return torch.cat(chunks)
    width = max(c.shape[1] for c in chunks)
    return torch.cat([F.pad(c, (0, width - c.shape[1]), value=IGNORE_INDEX) for c in chunks])


def save_model(accelerator, model, tokenizer, directory: str) -> None:
    """The model in transformers layout (safetensors) with its tokenizer (main process)."""
    if accelerator.is_main_process:
        os.makedirs(directory, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    accelerator.wait_for_everyone()
