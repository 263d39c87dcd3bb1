"""PEE-KD: one frozen teacher + K soft-prompt experts, uncertainty weighting and a trained selector.

Stages (methods.md §2, with the fixes it lists), each on the shared training loop (checkpoints,
mid-stage resume, metrics.jsonl in ``output_dir/stages/<stage>/``) and written atomically to
``output_dir/<stage>/`` when complete (a later run reuses it):

1. ``experts`` — K prompts (and the shared task head) on a copy of the task-fine-tuned teacher,
   whose backbone stays frozen (``teacher_backbone: trainable`` unfreezes it). Every batch runs
   all K experts as ONE batched forward (:class:`kdengine.experts.PromptExperts`). Each expert's
   cross-entropy is weighted by :func:`uncertainty_weights` of the experts' certainty on the batch,
   u_k = (1/B) Σ_i 1[expert k correct on i] · max_c p_k,i,c, treated as a constant
   (``expert_weighting_loss: uncertainty``; ``none`` averages the K losses); certainties and
   weights are logged as ``expert_certainty_<k>`` and ``expert_weight_<k>``. The reference code has
   this branch but never runs it and would crash in it.
2. ``selector`` (``selector: learned``) — :class:`~kdengine.methods.selector.ExpertSelector`
   on the backbone's [CLS] state (or the paper's token embeddings), trained per example with
   cross-entropy against :func:`~kdengine.methods.selector.soft_targets` (softmax of −CE_k / τ),
   examples weighted 1 + ``selector_disagreement_weight`` · (experts disagree); the reference
   code's selector is never trained. Reports routing accuracy, the selector-routed teacher and
   the best single expert side by side.
3. ``student`` — distilled with :func:`kdengine.ops.fused_experts_kd_loss` from the
   ``expert_weighting`` fusion of all experts, or of the selector's top-k (``teacher_top_k``)
   weighted by the selector's own probabilities, plus ``hard_weight`` · CE on the labels.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import safetensors.torch
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdengine import models
from kdengine.constants import IGNORE_INDEX
from kdengine.methods.base import STUDENT, Method, Stage
from kdengine.methods.baselines import KDLossOptions
from kdengine.methods.selector import (
    ExpertSelector,
    disagreement,
    expert_scores,
    selector_logits,
    soft_targets,
)
from kdengine.metrics import compute_metrics
from kdengine.ops import fuse_experts, fused_experts_kd_loss, kd_loss
from kdengine.options import ConfigError, option

EXPERTS = "experts"
SELECTOR = "selector"
BACKBONE_FILE = "backbone.safetensors"     # the experts stage's backbone when teacher_backbone is trainable


@dataclass
class PEEKDOptions(KDLossOptions):
    """PEE-KD's options (and the logit-distillation loss of its student)."""

    teacher_backbone: str = option("frozen", "the teacher backbone while its prompt experts train",
                                   ("frozen", "trainable"))
    num_experts: int = option(4, "prompt experts (the selector's K)")
    num_virtual_tokens: int = option(8, "virtual tokens per prompt expert")
    prompt_kind: str = option("prefix", "deep prefix (P-tuning v2, as the paper) or input prompt", ("prompt", "prefix"))
    prompt_placement: str = option("prepend", "where input prompts go", ("prepend", "append"))
    expert_weighting: str = option("entropy", "per-example weights of the experts' outputs",
                                   ("uniform", "entropy", "confidence"))
    expert_sharpness: float = option(1.0, "entropy weighting alpha = softmax(-H / expert_sharpness) (smaller is "
                                          "sharper)")
    fusion_space: str = option("logit", "fuse experts as logits or as probabilities", ("logit", "prob"))
    selector: str = option("learned", "learned selector routing to the top experts, or none (all)", ("learned", "none"))
    teacher_top_k: int | None = option(None, "experts run per example (None = all)")
    expert_weighting_loss: str = option("uncertainty", "expert training loss weighting", ("uncertainty", "none"))
    uncertainty_temperature: float = option(0.2, "expert loss weights a = softmax(u / uncertainty_temperature) "
                                                  "over the batch certainties u in [0, 1]; 1.0 is the paper-faithful "
                                                  "form (near-uniform weights)")
    expert_learning_rate: float = option(1e-2, "learning rate of the prompt experts")
    expert_num_train_epochs: float = option(2.0, "epochs of the expert training stage")
    selector_learning_rate: float = option(1e-3, "learning rate of the selector")
    selector_num_train_epochs: float = option(1.0, "epochs of the selector training stage")
    selector_hidden_size: int = option(512, "selector MLP width (the paper's 512)")
    selector_features: str = option("backbone", "selector input: the frozen backbone's [CLS] state or the paper's "
                                                "context-free token embeddings (max-pooled)", ("backbone", "embeddings"))
    selector_target_temperature: float = option(0.1, "selector targets softmax(-CE_k / selector_target_temperature) "
                                                     "over the experts' per-example losses")
    selector_disagreement_weight: float = option(4.0, "selector loss weight 1 + this · (fraction of positions where "
                                                      "the experts disagree) per example")

    def validate(self) -> None:
        super().validate()
        for name in ("expert_learning_rate", "selector_learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("uncertainty_temperature", "selector_target_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("expert_num_train_epochs", "selector_num_train_epochs", "expert_sharpness",
                     "selector_disagreement_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_experts", "num_virtual_tokens", "selector_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.teacher_top_k is not None and not 1 <= self.teacher_top_k <= self.num_experts:
            raise ValueError(f"teacher_top_k={self.teacher_top_k} must be in [1, num_experts={self.num_experts}]")


def uncertainty_weights(certainty: torch.Tensor, temperature: float) -> torch.Tensor:
    """Expert loss weights a = softmax_k(u_k / temperature) from certainties u [K] in [0, 1]."""
    return (certainty / temperature).softmax(0)


def _flatten_rows(logits: torch.Tensor, labels: torch.Tensor):
    """[.., B(, L), C] + labels [B(, L)] -> rows [.., N, C] and labels [N] (token tasks: N = B·L)."""
    if labels.dim() == 2:
        lead = logits.shape[:-3]
        return logits.reshape(*lead, -1, logits.shape[-1]), labels.reshape(-1)
    return logits, labels


class PEEKD(Method):
    name = "pee_kd"
    options_class = PEEKDOptions
    tasks = ("sequence_classification", "token_classification")

    @classmethod
    def stage_names(cls, options: PEEKDOptions) -> tuple[str, ...]:
        return (EXPERTS, SELECTOR, STUDENT) if options.selector == "learned" else (EXPERTS, STUDENT)

    @classmethod
    def check_run(cls, run) -> None:
        """Before any work: input prompts (prompt_kind prompt) must fit the teacher's positions."""
        opts = run.options
        if opts.prompt_kind != "prompt":
            return                    # a deep prefix adds keys/values, not positions
        positions = models.text_positions(run.teacher_configs[0])
        needed = run.args.max_seq_length + opts.num_virtual_tokens
        if positions is not None and needed > positions:
            raise ConfigError(f"prompt_kind prompt puts num_virtual_tokens={opts.num_virtual_tokens} prompt tokens "
                              f"beside max_seq_length={run.args.max_seq_length} text tokens: {needed} positions, but "
                              f"the teacher {run.teacher_sources[0]!r} has {positions}; lower max_seq_length to "
                              f"{positions - opts.num_virtual_tokens} (or num_virtual_tokens), or use prompt_kind "
                              f"prefix")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.experts = None
        self.selector = None
        self.report: dict | None = None

    # ------------------------------------------------------------------ stages
    def build_stage(self, name: str, student) -> Stage:
        opts, ctx = self.options, self.ctx
        if name == EXPERTS:
            from kdengine.experts import PromptExperts  # noqa: PLC0415

            backbone = copy.deepcopy(ctx.teacher)
            experts = PromptExperts(backbone, opts.num_experts, opts.num_virtual_tokens, kind=opts.prompt_kind,
                                    placement=opts.prompt_placement, init="vocab", backend=ctx.args.kernel_backend)
            if opts.teacher_backbone == "trainable":
                backbone.requires_grad_(True)
            ctx.log(f"[pee_kd] experts: training {opts.num_experts} prompt experts "
                    f"({opts.num_virtual_tokens} virtual tokens, kind={opts.prompt_kind}, "
                    f"placement={opts.prompt_placement}, loss weighting={opts.expert_weighting_loss})")
            return Stage(EXPERTS, {EXPERTS: experts.to(ctx.device)}, opts.expert_learning_rate,
                         opts.expert_num_train_epochs, evaluate=False)
        if name == SELECTOR:
            features = (self.experts.model.get_input_embeddings().weight if opts.selector_features == "embeddings"
                        else self.experts.model.config.hidden_size)
            selector = ExpertSelector(features, opts.num_experts, opts.selector_hidden_size)
            ctx.log(f"[pee_kd] selector: training on {opts.selector_features} features against softmax(-CE / "
                    f"{opts.selector_target_temperature}) of {opts.num_experts} experts")
            return Stage(SELECTOR, {SELECTOR: selector.to(ctx.device)}, opts.selector_learning_rate,
                         opts.selector_num_train_epochs, evaluate=False)
        return super().build_stage(name, student)

    def training_step(self, step, batch):
        name = step.stage.name
        if name == EXPERTS:
            out = step.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             **_extra_inputs(batch))
            loss, certainty, weights = self._expert_loss(out.logits, batch["labels"])
            logs = {f"expert_weight_{k}": w for k, w in enumerate(weights.detach())}
            return loss, {**logs, **{f"expert_certainty_{k}": u for k, u in enumerate(certainty)}}
        if name == SELECTOR:
            return self._selector_loss(step.model, batch)
        return super().training_step(step, batch)

    def save_stage(self, stage: Stage, directory: str):
        module = stage.modules[stage.name]
        module.save_pretrained(directory)
        if stage.name == EXPERTS and self.options.teacher_backbone == "trainable":
            # the prompts were trained together with the backbone: keep the backbone they belong to
            safetensors.torch.save_model(module.model, os.path.join(directory, BACKBONE_FILE))
        return None

    def load_stage(self, name: str, directory: str, student) -> Stage:
        ctx, opts = self.ctx, self.options
        ctx.log(f"[pee_kd] {name}: reusing {directory}")
        if name == EXPERTS:
            from kdengine.experts import PromptExperts  # noqa: PLC0415

            backbone = copy.deepcopy(ctx.teacher)
            if opts.teacher_backbone == "trainable":
                path = os.path.join(directory, BACKBONE_FILE)
                if not os.path.isfile(path):
                    raise ValueError(f"{directory} has no {BACKBONE_FILE}: its experts were trained with "
                                     f"teacher_backbone: trainable by an older kdengine that did not save the "
                                     f"backbone; run the experts stage again (a new output_dir)")
                safetensors.torch.load_model(backbone, path)
            module = PromptExperts.from_pretrained(directory, backbone, backend=ctx.args.kernel_backend)
            return Stage(EXPERTS, {EXPERTS: module.to(ctx.device)}, opts.expert_learning_rate,
                         opts.expert_num_train_epochs, evaluate=False)
        if name == SELECTOR:
            module = ExpertSelector.from_pretrained(directory).to(ctx.device)
            return Stage(SELECTOR, {SELECTOR: module}, opts.selector_learning_rate, opts.selector_num_train_epochs,
                         evaluate=False)
        return super().load_stage(name, directory, student)

    def stage_finished(self, stage: Stage) -> None:
        if stage.name in (EXPERTS, SELECTOR):
            setattr(self, stage.name, stage.modules[stage.name].eval().requires_grad_(False))

    def _expert_loss(self, logits: torch.Tensor, labels: torch.Tensor):
        """Uncertainty-weighted sum of the K experts' cross-entropies; returns (loss, certainties u [K],
        weights a [K])."""
        k = logits.shape[0]
        rows, flat = _flatten_rows(logits, labels)                        # [K, N, C], [N]
        ce = torch.stack([F.cross_entropy(rows[i].float(), flat, ignore_index=IGNORE_INDEX) for i in range(k)])
        with torch.no_grad():
            valid = (flat != IGNORE_INDEX).float()
            confidence, prediction = rows.float().softmax(-1).max(-1)     # [K, N]
            certainty = ((prediction == flat).float() * confidence * valid).sum(-1) / valid.sum().clamp_min(1)
        if self.options.expert_weighting_loss == "none":
            weights = torch.full((k,), 1.0 / k, device=ce.device)
        else:
            weights = uncertainty_weights(certainty, self.options.uncertainty_temperature)
        return (weights * ce).sum(), certainty, weights

    def _selector_loss(self, selector: ExpertSelector, batch: dict):
        """Soft-target cross-entropy, examples weighted by how much the experts disagree on them."""
        opts = self.options
        logits, labels = self._expert_logits(batch), batch["labels"]
        target = soft_targets(logits, labels, opts.selector_target_temperature)          # [B, K]
        split = disagreement(logits, labels)                                             # [B]
        weight = 1.0 + opts.selector_disagreement_weight * split
        scores = selector_logits(selector, self.experts.model, batch["input_ids"], batch["attention_mask"],
                                 **_extra_inputs(batch))
        per_example = -(target * scores.log_softmax(-1)).sum(-1)
        return (weight * per_example).sum() / weight.sum(), {"selector_disagreement": split.mean()}

    def _route_logits(self, batch: dict) -> torch.Tensor:
        return selector_logits(self.selector, self.experts.model, batch["input_ids"], batch["attention_mask"],
                               **_extra_inputs(batch))

    @torch.no_grad()
    def _expert_logits(self, batch: dict, experts: torch.Tensor | None = None) -> torch.Tensor:
        out = self.experts(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           experts=experts, **_extra_inputs(batch))
        return out.logits

    # ------------------------------------------------------------------ teacher evaluation
    @torch.no_grad()
    def _evaluate_teacher(self) -> dict:
        """Validation metrics of each expert, the fusions, the routed and oracle-routed teachers."""
        args, ctx = self.options, self.ctx
        if ctx.eval_dataset is None:
            return {}
        acc = ctx.accelerator
        # Its own generator: a DataLoader without one draws a seed from the global RNG at iter().
        loader = DataLoader(ctx.eval_dataset, batch_size=ctx.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=ctx.collate_fn, num_workers=ctx.args.dataloader_num_workers,
                            generator=torch.Generator().manual_seed(ctx.args.seed))
        loader = acc.prepare_data_loader(loader)
        k = args.num_experts
        fusions = {"uniform_fusion": "uniform", f"{args.expert_weighting}_fusion": args.expert_weighting}
        preds = {f"expert_{i}": [] for i in range(k)}
        for key in (*fusions, "oracle_routed"):
            preds[key] = []
        if self.selector is not None:
            preds["selector_routed"] = []
        refs, routing_hits, routing_total, split_hits, split_total = [], 0, 0, 0, 0
        timings = {"all_experts_s": 0.0, "routed_s": 0.0}
        gather = lambda t: _gather(acc, t, ctx.args.max_seq_length)  # noqa: E731
        for batch in loader:
            labels = batch["labels"]
            t0 = time.perf_counter()
            logits = self._expert_logits(batch)                          # [K, B(, L), C]
            timings["all_experts_s"] += time.perf_counter() - t0
            rows, _ = _flatten_rows(logits, labels)
            for i in range(k):
                preds[f"expert_{i}"].append(gather(logits[i].argmax(-1)))
            for key, weighting in fusions.items():
                fused, _, _ = fuse_experts(rows, weighting=weighting, space=args.fusion_space,
                                           sharpness=args.expert_sharpness, backend=ctx.args.kernel_backend)
                preds[key].append(gather(fused.argmax(-1).reshape(labels.shape)))
            best = expert_scores(logits, labels).argmax(-1)              # [B]
            preds["oracle_routed"].append(gather(_pick(logits, best).argmax(-1)))
            if self.selector is not None:
                t0 = time.perf_counter()
                routed = self._route_logits(batch).argmax(-1)
                one = self._expert_logits(batch, experts=routed)         # [B(, L), C]: one expert per example
                timings["routed_s"] += time.perf_counter() - t0
                preds["selector_routed"].append(gather(one.argmax(-1)))
                hits = gather((routed == best).long())
                split = gather((disagreement(logits, labels) > 0).long())  # experts not unanimous
                routing_hits += int(hits.sum())
                routing_total += int(hits.numel())
                split_hits += int((hits * split).sum())
                split_total += int(split.sum())
            refs.append(gather(labels))
        references = torch.cat(refs).numpy()
        report = {}
        for key, chunks in preds.items():
            metrics = compute_metrics(ctx.task, torch.cat(chunks).numpy(), references, ctx.label_names)
            report[key] = {f"eval_{name}": value for name, value in metrics.items()}
        if self.selector is not None:
            metric = f"eval_{ctx.args.best_metric_name()}"
            best = max(range(k), key=lambda i: report[f"expert_{i}"][metric])
            routed = report["selector_routed"]
            routed["eval_routing_accuracy"] = routing_hits / max(routing_total, 1)
            routed["disagreement_examples"] = split_total
            routed["eval_routing_accuracy_on_disagreement"] = split_hits / max(split_total, 1)
            routed["routing_chance"] = 1 / k
            routed["best_single_expert"] = best
            routed[f"best_single_expert_{metric}"] = report[f"expert_{best}"][metric]
            routed["teacher_forward_speedup"] = timings["all_experts_s"] / max(timings["routed_s"], 1e-9)
            ctx.log(f"[pee_kd] selector: routing accuracy {routed['eval_routing_accuracy']:.3f} "
                    f"({routed['eval_routing_accuracy_on_disagreement']:.3f} on the {split_total} examples where "
                    f"the experts disagree; chance {1 / k:.3f}); routed {metric} {routed[metric]:.4f} vs best single expert "
                    f"(expert_{best}) {report[f'expert_{best}'][metric]:.4f}; one expert per example, "
                    f"{routed['teacher_forward_speedup']:.2f}x faster than all {k}")
        return report

    def teacher_report(self) -> dict:
        if self.report is None:
            self.report = self._evaluate_teacher()
        return self.report

    # ------------------------------------------------------------------ student distillation
    def teacher_outputs(self, batch: dict) -> dict:
        args = self.options
        experts = weights = None
        if self.selector is not None and args.teacher_top_k is not None and args.teacher_top_k < args.num_experts:
            probs = self._route_logits(batch).softmax(-1)
            weights, experts = probs.topk(args.teacher_top_k, dim=-1)          # [B, k]: fused by the selector
        logits = self._expert_logits(batch, experts=experts)
        if experts is not None:
            logits = logits.movedim(1, 0)                                    # [B, k, ...] -> [k, B, ...]
            if logits.dim() == 4:                                            # token tasks: one row per token
                weights = weights.repeat_interleave(logits.shape[2], dim=0)
        rows, _ = _flatten_rows(logits, batch["labels"])
        # The fused teacher itself (T = 1; fp32 [N, C], tiny for classification) for plots and logs; the
        # experts' logits go to the kernels in their own dtype (no fp32 [K, N, C] copy).
        fused, _, _ = fuse_experts(rows, weighting=args.expert_weighting, space=args.fusion_space,
                                   sharpness=args.expert_sharpness, weights=weights,
                                   backend=self.ctx.args.kernel_backend)
        out = {"expert_logits": rows, "logits": fused.reshape(*logits.shape[1:-1], -1)}
        return out if weights is None else {**out, "expert_weights": weights}

    def student_loss(self, student_outputs, batch: dict, teacher_outputs: dict):
        args, backend = self.options, self.ctx.args.kernel_backend
        student, labels = _flatten_rows(student_outputs.logits, batch["labels"])
        loss = fused_experts_kd_loss(student, teacher_outputs["expert_logits"], weighting=args.expert_weighting,
                                     weights=teacher_outputs.get("expert_weights"), space=args.fusion_space, temperature=args.kd_temperature,
                                     sharpness=args.expert_sharpness, divergence=args.kd_divergence,
                                     jsd_beta=args.jsd_beta, labels=labels, kd_weight=args.kd_weight,
                                     hard_weight=args.hard_weight, backend=backend)
        with torch.no_grad():  # the hard-label CE alone, in fp32 inside the kernel (no fp32 copy of the student)
            ce = kd_loss(student, student, labels=labels, kd_weight=0.0, hard_weight=1.0, backend=backend)
        # batchmean over valid rows: loss = kd part + hard_weight · mean CE (no row weights here).
        return loss, {"kd_loss": loss.detach() - args.hard_weight * ce, "ce_loss": ce}


def _extra_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("token_type_ids",) if k in batch}


def _pick(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """logits [K, B, ...] and index [B] -> logits[index[b], b, ...]."""
    return logits.movedim(0, 1)[torch.arange(index.numel(), device=index.device), index]


def _gather(accelerator, tensor: torch.Tensor, max_len: int) -> torch.Tensor:
    """One batch of predictions/labels from every process (token tasks padded with IGNORE_INDEX to
    max_len), without the duplicates a distributed sampler adds to the last batch."""
    if tensor.dim() == 2:
        tensor = F.pad(tensor, (0, max_len - tensor.shape[1]), value=IGNORE_INDEX)
    return accelerator.gather_for_metrics(tensor).cpu()
