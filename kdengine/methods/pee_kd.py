"""PEE-KD: one frozen teacher + K soft-prompt experts, uncertainty weighting and a trained selector.

Stages (methods.md §2, with the fixes it lists; each stage is skipped when its output exists, so
any stage can be rerun alone by deleting its folder, and a crashed run resumes at the stage):

1. ``experts/`` — K prompts (and the shared task head) on a copy of the task-fine-tuned teacher,
   whose backbone stays frozen (``teacher_backbone: trainable`` unfreezes it). Every batch runs
   all K experts as ONE batched forward (:class:`kdengine.experts.PromptExperts`). Each expert's
   cross-entropy is weighted by a softmax over the experts' certainty on the batch,
   u_k = (1/B) Σ_i 1[expert k correct on i] · max_c p_k,i,c, treated as a constant
   (``expert_weighting_loss: uncertainty``; ``none`` averages the K losses). The reference code
   has this branch but never runs it and would crash in it.
2. ``selector/`` — :class:`~kdengine.methods.selector.ExpertSelector` trained with cross-entropy
   against the per-example most reliable expert (correct and confident); the reference code's
   selector is never trained. Reports routing accuracy and the selector-routed teacher.
3. Student — distilled with :func:`kdengine.ops.fused_experts_kd_loss` from the
   uncertainty-weighted fusion of all experts, or of the selector's top-k
   (``teacher_top_k``), plus ``hard_weight`` · CE on the labels.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from kdengine.methods.base import Method
from kdengine.methods.selector import ExpertSelector, expert_scores
from kdengine.metrics import compute_metrics
from kdengine.ops import fuse_experts, fused_experts_kd_loss

EXPERTS_DIR = "experts"
SELECTOR_DIR = "selector"
DONE_MARKER = "stage_complete.json"


def _stage_done(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, DONE_MARKER))


def _finish_stage(tmp_dir: str, final_dir: str, summary: dict) -> None:
    """Atomic stage output: write into tmp_dir, mark complete, then rename into place."""
    with open(os.path.join(tmp_dir, DONE_MARKER), "w") as f:
        json.dump(summary, f, indent=2)
    if os.path.isdir(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def _flatten_rows(logits: torch.Tensor, labels: torch.Tensor):
    """[.., B(, L), C] + labels [B(, L)] -> rows [.., N, C] and labels [N] (token tasks: N = B·L)."""
    if labels.dim() == 2:
        lead = logits.shape[:-3]
        return logits.reshape(*lead, -1, logits.shape[-1]), labels.reshape(-1)
    return logits, labels


class PEEKD(Method):
    name = "pee_kd"
    uses_teacher = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.args = ctx.args
        self.experts = None
        self.selector = None
        self.report: dict = {}

    # ------------------------------------------------------------------ stages
    def prepare(self) -> None:
        args, ctx = self.args, self.ctx
        experts_dir = os.path.join(ctx.output_dir, EXPERTS_DIR)
        if _stage_done(experts_dir):
            ctx.log(f"[pee_kd] experts: reusing {experts_dir}")
            self.experts = self._load_experts(experts_dir)
        else:
            self.experts = self._train_experts(experts_dir)
        self.experts.eval().requires_grad_(False)
        if args.selector == "learned":
            selector_dir = os.path.join(ctx.output_dir, SELECTOR_DIR)
            if _stage_done(selector_dir):
                ctx.log(f"[pee_kd] selector: reusing {selector_dir}")
                self.selector = ExpertSelector.from_pretrained(selector_dir).to(ctx.device)
            else:
                self.selector = self._train_selector(selector_dir)
            self.selector.eval().requires_grad_(False)
        self.report = self._evaluate_teacher()

    def _new_experts(self):
        from kdengine.experts import PromptExperts  # noqa: PLC0415

        args = self.args
        backbone = copy.deepcopy(self.ctx.teacher)
        experts = PromptExperts(backbone, args.num_experts, args.num_virtual_tokens, kind=args.prompt_kind,
                                placement=args.prompt_placement, init="vocab")
        if args.teacher_backbone == "trainable":
            backbone.requires_grad_(True)
        return experts

    def _load_experts(self, directory: str):
        from kdengine.experts import PromptExperts  # noqa: PLC0415

        return PromptExperts.from_pretrained(directory, copy.deepcopy(self.ctx.teacher)).to(self.ctx.device)

    def _loader(self, dataset, *, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        generator = torch.Generator().manual_seed(self.args.seed)
        return DataLoader(dataset, batch_size=batch_size or self.args.per_device_train_batch_size,
                          shuffle=shuffle, generator=generator, collate_fn=self.ctx.collate_fn,
                          num_workers=self.args.dataloader_num_workers)

    def _expert_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncertainty-weighted sum of the K experts' cross-entropies; returns (loss, weights a [K])."""
        k = logits.shape[0]
        rows, flat = _flatten_rows(logits, labels)                        # [K, N, C], [N]
        ce = torch.stack([F.cross_entropy(rows[i].float(), flat, ignore_index=-100) for i in range(k)])
        if self.args.expert_weighting_loss == "none":
            weights = torch.full((k,), 1.0 / k, device=ce.device)
        else:
            with torch.no_grad():
                valid = (flat != -100).float()
                probs = rows.float().softmax(-1)
                confidence, prediction = probs.max(-1)                    # [K, N]
                certainty = ((prediction == flat).float() * confidence * valid).sum(-1) / valid.sum().clamp_min(1)
                weights = certainty.softmax(0)
        return (weights * ce).sum(), weights

    def _run_stage(self, model, params, *, lr: float, epochs: float, desc: str, step_fn) -> list[float]:
        """A small accelerate training loop shared by the expert and selector stages."""
        acc, args = self.ctx.accelerator, self.args
        loader = self._loader(self.ctx.train_dataset, shuffle=True)
        optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=args.weight_decay)
        steps = max(1, math.ceil(len(loader) * epochs))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * steps), steps)
        model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
        model.train()
        losses, step = [], 0
        bar = tqdm(total=steps, desc=desc, disable=not acc.is_main_process, dynamic_ncols=True)
        while step < steps:
            for batch in loader:
                loss = step_fn(model, batch)
                acc.backward(loss)
                if args.max_grad_norm:
                    acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update(1)
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f"[pee_kd] {desc}: loss is {losses[-1]} at step {step}; "
                                             "lower the learning rate")
                if step >= steps:
                    break
        bar.close()
        acc.wait_for_everyone()
        return losses

    def _train_experts(self, directory: str):
        args, ctx = self.args, self.ctx
        experts = self._new_experts().to(ctx.device)
        started = time.perf_counter()
        last_weights = {}

        def step(model, batch):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        **_extra_inputs(batch))
            loss, weights = self._expert_loss(out.logits, batch["labels"])
            last_weights["a"] = weights.detach().cpu().tolist()
            return loss

        ctx.log(f"[pee_kd] experts: training {args.num_experts} prompt experts "
                f"({args.num_virtual_tokens} virtual tokens, kind={args.prompt_kind}, "
                f"placement={args.prompt_placement}, loss weighting={args.expert_weighting_loss})")
        losses = self._run_stage(experts, list(experts.parameters()), lr=args.expert_learning_rate,
                                 epochs=args.expert_num_train_epochs, desc="experts", step_fn=step)
        summary = {"final_loss": losses[-1], "steps": len(losses), "last_expert_weights": last_weights.get("a"),
                   "train_seconds": round(time.perf_counter() - started, 2)}
        if ctx.accelerator.is_main_process:
            tmp = f"{directory}.tmp-{os.getpid()}"
            ctx.accelerator.unwrap_model(experts).save_pretrained(tmp)
            _finish_stage(tmp, directory, summary)
        ctx.accelerator.wait_for_everyone()
        ctx.log(f"[pee_kd] experts done in {summary['train_seconds']} s (final loss {losses[-1]:.4f})")
        return ctx.accelerator.unwrap_model(experts)

    @torch.no_grad()
    def _expert_logits(self, batch: dict, experts: torch.Tensor | None = None) -> torch.Tensor:
        out = self.experts(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           experts=experts, **_extra_inputs(batch))
        return out.logits

    def _train_selector(self, directory: str):
        args, ctx = self.args, self.ctx
        embedding = self.experts.model.get_input_embeddings().weight
        selector = ExpertSelector(embedding, args.num_experts, args.selector_hidden_size).to(ctx.device)
        started = time.perf_counter()

        def step(model, batch):
            target = expert_scores(self._expert_logits(batch), batch["labels"]).argmax(-1)
            return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), target)

        ctx.log(f"[pee_kd] selector: training on the per-example best of {args.num_experts} experts")
        losses = self._run_stage(selector, list(selector.parameters()), lr=args.selector_learning_rate,
                                 epochs=args.selector_num_train_epochs, desc="selector", step_fn=step)
        selector = ctx.accelerator.unwrap_model(selector)
        summary = {"final_loss": losses[-1], "steps": len(losses),
                   "train_seconds": round(time.perf_counter() - started, 2)}
        if ctx.accelerator.is_main_process:
            tmp = f"{directory}.tmp-{os.getpid()}"
            selector.save_pretrained(tmp)
            _finish_stage(tmp, directory, summary)
        ctx.accelerator.wait_for_everyone()
        ctx.log(f"[pee_kd] selector done in {summary['train_seconds']} s (final loss {losses[-1]:.4f})")
        return selector

    # ------------------------------------------------------------------ teacher evaluation
    @torch.no_grad()
    def _evaluate_teacher(self) -> dict:
        """Validation metrics of each expert, the fusions, the routed and oracle-routed teachers."""
        args, ctx = self.args, self.ctx
        if ctx.eval_dataset is None:
            return {}
        acc = ctx.accelerator
        loader = acc.prepare(self._loader(ctx.eval_dataset, shuffle=False, batch_size=args.per_device_eval_batch_size))
        k = args.num_experts
        fusions = {"uniform_fusion": "uniform", f"{args.expert_weighting}_fusion": args.expert_weighting}
        preds = {f"expert_{i}": [] for i in range(k)}
        for key in (*fusions, "oracle_routed"):
            preds[key] = []
        if self.selector is not None:
            preds["selector_routed"] = []
        refs, routing_hits, routing_total = [], 0, 0
        timings = {"all_experts_s": 0.0, "routed_s": 0.0}
        gather = lambda t: _gather(acc, t, args.max_seq_length)  # noqa: E731
        for batch in loader:
            labels = batch["labels"]
            t0 = time.perf_counter()
            logits = self._expert_logits(batch)                          # [K, B(, L), C]
            timings["all_experts_s"] += time.perf_counter() - t0
            rows, _ = _flatten_rows(logits, labels)
            for i in range(k):
                preds[f"expert_{i}"].append(gather(logits[i].argmax(-1)))
            for key, weighting in fusions.items():
                fused, _, _ = fuse_experts(rows.float(), weighting=weighting, space=args.fusion_space,
                                           sharpness=args.expert_sharpness, backend=args.kernel_backend)
                preds[key].append(gather(fused.argmax(-1).reshape(labels.shape)))
            best = expert_scores(logits, labels).argmax(-1)              # [B]
            preds["oracle_routed"].append(gather(_pick(logits, best).argmax(-1)))
            if self.selector is not None:
                t0 = time.perf_counter()
                routed = self.selector(batch["input_ids"], batch["attention_mask"]).argmax(-1)
                one = self._expert_logits(batch, experts=routed)         # [B(, L), C]: one expert per example
                timings["routed_s"] += time.perf_counter() - t0
                preds["selector_routed"].append(gather(one.argmax(-1)))
                hits = gather((routed == best).long())
                routing_hits += int(hits.sum())
                routing_total += int(hits.numel())
            refs.append(gather(labels))
        references = torch.cat(refs).numpy()
        report = {}
        for key, chunks in preds.items():
            metrics = compute_metrics(ctx.task, torch.cat(chunks).numpy(), references, ctx.label_names)
            report[key] = {f"eval_{name}": value for name, value in metrics.items()}
        if self.selector is not None:
            routed = report["selector_routed"]
            routed["eval_routing_accuracy"] = routing_hits / max(routing_total, 1)
            routed["teacher_forward_speedup"] = timings["all_experts_s"] / max(timings["routed_s"], 1e-9)
            ctx.log(f"[pee_kd] selector: routing accuracy {routed['eval_routing_accuracy']:.3f} "
                    f"(chance {1 / k:.3f}); routed teacher runs one expert per example, "
                    f"{routed['teacher_forward_speedup']:.2f}x faster than all {k}")
        return report

    def teacher_report(self) -> dict:
        return self.report

    # ------------------------------------------------------------------ student distillation
    @torch.no_grad()
    def teacher_outputs(self, batch: dict) -> dict:
        args = self.args
        experts = None
        if self.selector is not None and args.teacher_top_k is not None and args.teacher_top_k < args.num_experts:
            scores = self.selector(batch["input_ids"], batch["attention_mask"])
            experts = scores.topk(args.teacher_top_k, dim=-1).indices         # [B, k]
        logits = self._expert_logits(batch, experts=experts)
        if experts is not None:
            logits = logits.movedim(1, 0)                                    # [B, k, ...] -> [k, B, ...]
        rows, _ = _flatten_rows(logits, batch["labels"])
        # The fused teacher itself (T = 1; [N, C] is tiny for classification) for plots and logs.
        fused, _, _ = fuse_experts(rows.float(), weighting=args.expert_weighting, space=args.fusion_space,
                                   sharpness=args.expert_sharpness, backend=args.kernel_backend)
        return {"expert_logits": rows, "logits": fused.reshape(*logits.shape[1:-1], -1)}

    def student_loss(self, student_outputs, batch: dict, teacher_outputs: dict):
        args = self.args
        student, labels = _flatten_rows(student_outputs.logits, batch["labels"])
        loss = fused_experts_kd_loss(student, teacher_outputs["expert_logits"], weighting=args.expert_weighting,
                                     space=args.fusion_space, temperature=args.kd_temperature,
                                     sharpness=args.expert_sharpness, divergence=args.kd_divergence,
                                     jsd_beta=args.jsd_beta, labels=labels, kd_weight=args.kd_weight,
                                     hard_weight=args.hard_weight, backend=args.kernel_backend)
        with torch.no_grad():
            ce = F.cross_entropy(student.float(), labels, ignore_index=-100)
        # batchmean over valid rows: loss = kd part + hard_weight · mean CE (no row weights here).
        return loss, {"kd_loss": loss.detach() - args.hard_weight * ce, "ce_loss": ce}

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str) -> None:
        for name in (EXPERTS_DIR, SELECTOR_DIR):
            src, dst = os.path.join(self.ctx.output_dir, name), os.path.join(directory, name)
            if _stage_done(src) and os.path.realpath(src) != os.path.realpath(dst):
                shutil.copytree(src, dst, dirs_exist_ok=True)

    def load(self, directory: str) -> None:
        """Experts and selector are frozen during distillation: prepare() already restored them."""


def _extra_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("token_type_ids",) if k in batch}


def _pick(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """logits [K, B, ...] and index [B] -> logits[index[b], b, ...]."""
    return logits.movedim(0, 1)[torch.arange(index.numel(), device=index.device), index]


def _gather(accelerator, tensor: torch.Tensor, max_len: int) -> torch.Tensor:
    """One batch of predictions/labels from every process (token tasks padded with -100 to
    max_len), without the duplicates a distributed sampler adds to the last batch."""
    if tensor.dim() == 2:
        tensor = F.pad(tensor, (0, max_len - tensor.shape[1]), value=-100)
    return accelerator.gather_for_metrics(tensor).cpu()
