"""PEE-KD: one frozen teacher + K soft-prompt experts, uncertainty weighting and a trained selector.

Stages (methods.md §2, with the fixes it lists), each on the shared training loop (checkpoints,
mid-stage resume, metrics.jsonl in ``output_dir/stages/<stage>/``) and written atomically to
``output_dir/<stage>/`` when complete (a later run reuses it):

1. ``experts`` — K prompts (and the shared task head) on a copy of the task-fine-tuned teacher,
   whose backbone stays frozen (``teacher_backbone: trainable`` unfreezes it). ``expert_routing``
   picks the examples each expert trains on (:func:`expert_assignment`; ``learned``: top-1 of a
   router trained with the experts, :func:`router_loss`, a module of the stage's checkpoints that
   is not kept after it); the chosen experts run as ONE batched forward
   (:class:`kdengine.experts.PromptExperts`, per-example expert ids). Each expert's
   cross-entropy over its examples is weighted by :func:`uncertainty_weights` of the certainties of
   the experts present in the batch, u_k = mean over k's examples i of 1[expert k correct on i] ·
   max_c p_k,i,c, treated as a constant (``expert_weighting_loss: uncertainty``; ``none`` averages
   the losses); certainties and weights are logged as ``expert_certainty_<k>`` and
   ``expert_weight_<k>``. The reference code has this branch but never runs it and would crash in it.
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
    backbone_features,
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
ROUTER = "router"                          # the experts stage's router (expert_routing learned)
EXPERT_ROUTINGS = ("all", "one_per_batch", "hash", "learned")
HASH_MULTIPLIER = 2654435761               # Knuth's multiplicative hash, ⌊2^32 / golden ratio⌋
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
    expert_routing: str = option("all", "examples each expert trains on: all; one_per_batch (each optimizer step "
                                        "trains one expert, cycling, as the reference code runs); hash (a fixed "
                                        "partition of the training examples by example id); learned (top-1 of a "
                                        "router on the frozen backbone's [CLS], trained with the experts)",
                                 EXPERT_ROUTINGS)
    router_balance_weight: float = option(0.5, "expert_routing learned: weight of the load-balancing loss "
                                               "K · Σ_k f_k · P_k (Switch Transformer)")
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
    selector_layers: int | None = option(None, "selector_features backbone: read the [CLS] state after the "
                                               "backbone's first selector_layers layers, running only those "
                                               "(None: all; fewer route cheaper)")
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
                     "selector_disagreement_weight", "router_balance_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_experts", "num_virtual_tokens", "selector_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.selector_layers is not None and (self.selector_layers < 1 or self.selector_features != "backbone"):
            raise ValueError(f"selector_layers={self.selector_layers} needs selector_features backbone and a value "
                             f">= 1 (got selector_features {self.selector_features})")
        if self.teacher_top_k is not None and not 1 <= self.teacher_top_k <= self.num_experts:
            raise ValueError(f"teacher_top_k={self.teacher_top_k} must be in [1, num_experts={self.num_experts}]")


def uncertainty_weights(certainty: torch.Tensor, temperature: float) -> torch.Tensor:
    """Expert loss weights a = softmax_k(u_k / temperature) from certainties u [K] in [0, 1]
    (−inf: an expert left out, weight 0)."""
    return (certainty / temperature).softmax(0)


def expert_assignment(routing: str, num_experts: int, example_id: torch.Tensor, step: int) -> torch.Tensor:
    """Each example's training expert under a fixed ``expert_routing``: [B] int64, example_id's device.

    ``one_per_batch``: expert ``step`` mod K for the whole batch (``step``: the stage's optimizer
    step, so micro-batches of one accumulated step share it, and a resumed run continues the cycle).
    ``hash``: a fixed partition of the training examples, expert ⌊K · h / 2^32⌋ of
    h = example_id · HASH_MULTIPLIER mod 2^32 (the hash's high bits: even for any K, whatever order the
    examples come in). ``example_id`` [B] integer (the example's index in its split).
    """
    if routing == "one_per_batch":
        return torch.full_like(example_id, step % num_experts, dtype=torch.long)
    if routing == "hash":
        return ((example_id.long() * HASH_MULTIPLIER) % 2 ** 32 * num_experts) >> 32
    raise ValueError(f"expert_assignment: routing {routing!r} is not one of one_per_batch, hash")


def router_loss(router_logits: torch.Tensor, assign: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                balance_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The learned routing's loss: (total, load-balancing term), fp32 scalars; gradients reach
    ``router_logits`` only.

    CE of the routed expert's logits scaled by its gate probability p_e(x) (Switch Transformer's
    gate · expert output; the logits are constants here, the expert trains on its raw logits) plus
    ``balance_weight`` · K · Σ_k f_k · P_k, f_k the fraction of examples routed to k (a constant), P_k
    the mean router probability of k (1 at an even split, up to K when one expert takes all).
    ``router_logits`` [B, K]; ``assign`` [B] (their argmax); ``logits`` [B(, L), C] of each example's
    expert; ``labels`` [B(, L)].
    """
    k = router_logits.shape[-1]
    probs = router_logits.float().softmax(-1)
    gate = probs.gather(1, assign.unsqueeze(1)).squeeze(1)                    # [B]
    scaled = gate.view(-1, *[1] * (logits.dim() - 1)) * logits.detach().float()
    ce = F.cross_entropy(scaled.reshape(-1, scaled.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    share = F.one_hot(assign, k).float().mean(0)
    balance = k * (share * probs.mean(0)).sum()
    return ce + balance_weight * balance, balance.detach()


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
        """Before any work: selector_layers within the teacher's depth, and input prompts (prompt_kind
        prompt) within its positions."""
        opts = run.options
        depth = getattr(run.teacher_configs[0], "num_hidden_layers", None)
        if opts.selector_layers is not None and depth is not None and opts.selector_layers > depth:
            raise ConfigError(f"selector_layers={opts.selector_layers}: the teacher {run.teacher_sources[0]!r} has "
                              f"{depth} layers")
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
            modules = {EXPERTS: experts.to(ctx.device)}
            if opts.expert_routing == "learned":
                modules[ROUTER] = ExpertSelector(backbone.config.hidden_size, opts.num_experts,
                                                 opts.selector_hidden_size).to(ctx.device)
            ctx.log(f"[pee_kd] experts: training {opts.num_experts} prompt experts "
                    f"({opts.num_virtual_tokens} virtual tokens, kind={opts.prompt_kind}, "
                    f"placement={opts.prompt_placement}, routing={opts.expert_routing}, "
                    f"loss weighting={opts.expert_weighting_loss})")
            return Stage(EXPERTS, modules, opts.expert_learning_rate, opts.expert_num_train_epochs, evaluate=False)
        if name == SELECTOR:
            features = (self.experts.model.get_input_embeddings().weight if opts.selector_features == "embeddings"
                        else self.experts.model.config.hidden_size)
            selector = ExpertSelector(features, opts.num_experts, opts.selector_hidden_size, opts.selector_layers)
            ctx.log(f"[pee_kd] selector: training on {opts.selector_features} features against softmax(-CE / "
                    f"{opts.selector_target_temperature}) of {opts.num_experts} experts")
            return Stage(SELECTOR, {SELECTOR: selector.to(ctx.device)}, opts.selector_learning_rate,
                         opts.selector_num_train_epochs, evaluate=False)
        return super().build_stage(name, student)

    def training_step(self, step, batch):
        name = step.stage.name
        if name == EXPERTS:
            return self._experts_step(step, batch)
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

    def _experts_step(self, step, batch: dict):
        """One batch of the experts stage under ``expert_routing``."""
        opts, labels = self.options, batch["labels"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **_extra_inputs(batch)}
        assign, logs = None, {}
        if opts.expert_routing == "learned":
            scores = step.modules[ROUTER](backbone_features(step.stage.modules[EXPERTS].model, **inputs))
            assign = scores.argmax(-1)
        elif opts.expert_routing != "all":
            assign = expert_assignment(opts.expert_routing, opts.num_experts, batch["example_id"], step.global_step)
        logits = step.model(**inputs, experts=assign).logits          # [K, B(, L), C] or [B(, L), C]
        loss, certainty, weights = self._expert_loss(logits, labels, assign)
        if opts.expert_routing == "learned":
            routing, balance = router_loss(scores, assign, logits, labels, opts.router_balance_weight)
            loss = loss + routing
            logs["router_balance"] = balance
        if assign is not None:
            share = F.one_hot(assign, opts.num_experts).float().mean(0)
            logs.update({f"expert_share_{k}": f for k, f in enumerate(share)})
        logs.update({f"expert_weight_{k}": w for k, w in enumerate(weights.detach())})
        return loss, {**logs, **{f"expert_certainty_{k}": u for k, u in enumerate(certainty)}}

    def _expert_loss(self, logits: torch.Tensor, labels: torch.Tensor, assign: torch.Tensor | None = None):
        """Weighted sum of the experts' cross-entropies, each over the examples it ran on; returns
        (loss, certainties u [K], weights a [K]).

        ``logits`` [K, B(, L), C] when every expert ran on every example (``assign`` None), else
        [B(, L), C] of each example's expert ``assign`` [B]. Only the experts with a labelled example
        in the batch share the weights; the others get weight and certainty 0."""
        k = self.options.num_experts if assign is not None else logits.shape[0]
        rows, flat = _flatten_rows(logits, labels)                        # [K, N, C] or [N, C]; [N]
        if assign is None:
            parts = [(rows[i], flat) for i in range(k)]
        else:
            owner = assign if labels.dim() == 1 else assign.repeat_interleave(labels.shape[1])   # [N]
            parts = [(rows[owner == i], flat[owner == i]) for i in range(k)]
        zero = rows.new_zeros((), dtype=torch.float32)
        present = [assign is None or bool((y != IGNORE_INDEX).any()) for _, y in parts]
        ce = torch.stack([F.cross_entropy(x.float(), y, ignore_index=IGNORE_INDEX) if here else zero
                          for (x, y), here in zip(parts, present)])
        with torch.no_grad():
            certainty = torch.stack([_certainty(x, y) if here else zero for (x, y), here in zip(parts, present)])
        present = torch.tensor(present, device=ce.device)
        if self.options.expert_weighting_loss == "none":
            weights = present.float() / present.sum()
        else:
            weights = uncertainty_weights(certainty.masked_fill(~present, float("-inf")),
                                          self.options.uncertainty_temperature)
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
        metric = f"eval_{ctx.args.best_metric_name()}"
        best = max(range(k), key=lambda i: report[f"expert_{i}"][metric])
        oracle = report["oracle_routed"]
        oracle["oracle_gap"] = oracle[metric] - report[f"expert_{best}"][metric]     # over the best single expert
        oracle["pairwise_agreement"] = expert_agreement([torch.cat(preds[f"expert_{i}"]) for i in range(k)],
                                                        torch.cat(refs))
        oracle["mean_pairwise_agreement"] = sum(oracle["pairwise_agreement"].values()) / max(k * (k - 1) // 2, 1)
        ctx.log(f"[pee_kd] experts: mean pairwise agreement {oracle['mean_pairwise_agreement']:.3f}; the oracle's "
                f"{metric} {oracle[metric]:.4f} is {oracle['oracle_gap']:+.4f} over the best single expert "
                f"(expert_{best})")
        if self.selector is not None:
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


def expert_agreement(predictions: list[torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """{"i-j": fraction of labelled positions where experts i and j predict the same class} for i < j;
    ``predictions`` K tensors shaped like ``labels`` [N] or [N, L] (IGNORE_INDEX positions skipped)."""
    valid = labels != IGNORE_INDEX
    flat = [p[valid] for p in predictions]
    return {f"{i}-{j}": (flat[i] == flat[j]).float().mean().item()
            for i in range(len(flat)) for j in range(i + 1, len(flat))}


def _certainty(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over labelled rows of 1[correct] · max-probability: rows [N, C], labels [N] -> fp32 scalar."""
    valid = (labels != IGNORE_INDEX).float()
    confidence, prediction = rows.float().softmax(-1).max(-1)
    return ((prediction == labels).float() * confidence * valid).sum() / valid.sum().clamp_min(1)


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
