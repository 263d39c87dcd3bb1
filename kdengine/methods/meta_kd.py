"""Meta-KD (Pan, Wang, Qiu, Zhang, Li, Huang; ACL 2021): a meta-teacher trained across domains with
prototype instance weights and a domain-corruption loss, then a two-stage meta-distillation into a
student for a target domain (or for all). Spec, with the reference code's bugs:
``../shared/docs/methods.md`` §5; what is verified and what is chosen here: docs/methods.md ("Meta-KD").

Before the first stage, each training example i gets a prototype (transferability) score
t_i = ½[cos(h_i, c_d(i)) + cos(h_i, mean_{k≠d(i)} c_k)] from a frozen encoder's mean-pooled
last-layer states h_i and the domain centroids c_k (:func:`prototype_scores`), cached in
``output_dir/prototype_scores.json``.

Stages, each on the shared loop (checkpoints, mid-stage resume, ``output_dir/<stage>/``):

1. ``meta_teacher``: a teacher (``teacher_model_name_or_path`` as given, or the task-trained one)
   with a domain branch, on ALL domains: mean_i t_i·[CE(y_i) + γ·CE(domain_logits_i, d̃_i)], d̃ the
   batch's domains shuffled (:func:`meta_teacher_loss`). Then, with the meta-teacher frozen, each
   example's domain-expertise weight e_i = 1/(1 + exp((1 − p_T(y_i|x_i))²)) and its instance
   weight ω_i = (1 + t_i)·e_i (:func:`instance_weights`).
2. ``distill``: the student's encoder on the target domain with the meta-teacher frozen:
   mean_i ω_i·[hidden_i + attention_i + γ·domain_i]: hidden states through the learned projection
   ``fit`` (``kdengine.losses.hidden_state_loss``), pre-softmax attention scores
   (``kdengine.losses.attention_score_loss``; captured by :class:`AttentionScores`) and the domain
   feature fit(W_S(E_S[d] + content_S)) vs the meta-teacher's W_T(E_T[d] + content_T). Constant
   learning rate after warmup, as the reference.
3. ``student``: soft cross-entropy on the meta-teacher's logits at ``kd_temperature`` through
   ``kdengine.ops.kd_loss`` (``row_weights`` = ω_i with ``prediction_instance_weights``), plus
   ``hard_weight`` · CE.

Every evaluation of the student adds its per-domain metrics (``eval_<domain>_<metric>``); the end of
the run prints a per-domain table (teachers, meta-teacher, the baseline students, the student).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from kdengine import models
from kdengine.atomic import read_json, write_json
from kdengine.constants import IGNORE_INDEX
from kdengine.losses import attention_score_loss, hidden_state_loss
from kdengine.methods.base import STUDENT, Stage
from kdengine.methods.baselines import KDLossOptions, VanillaKD, kd_option
from kdengine.metrics import compute_metrics
from kdengine.models import model_inputs
from kdengine.ops import kd_loss
from kdengine.options import ConfigError, option, parse_layer_map

META_TEACHER = "meta_teacher"
DISTILL = "distill"
ALL_DOMAINS = "all"
POOLINGS = ("masked", "reference")
INITS = ("pretrained", "finetuned")
PROTOTYPE_FILE = "prototype_scores.json"
BASELINE_ROWS = ("no_kd", "vanilla_kd")


@dataclass
class MetaKDOptions(KDLossOptions):
    """Meta-KD's options; stage 2 defaults to the reference's soft cross-entropy at T = 1 without a
    label term."""

    kd_divergence: str = kd_option("kd_divergence", "soft_ce")
    kd_temperature: float = kd_option("kd_temperature", 1.0)
    kd_weight: float = kd_option("kd_weight", 1.0)
    hard_weight: float = kd_option("hard_weight", 0.0)
    target_domain: str = option(ALL_DOMAINS, "the domain the student is distilled for (both distillation stages "
                                             "train on its examples only), or 'all': one student for every domain")
    target_train_fraction: float = option(1.0, "fraction of the target domain's training examples the "
                                               "distillation stages see (the data-scarce setting; the meta-teacher "
                                               "always sees every domain in full)")
    prototype_encoder: str = option("teacher", "frozen encoder of the prototype scores: 'teacher' "
                                               "(teacher_model_name_or_path as given, as the reference's "
                                               "off-the-shelf BERT), 'finetuned_teacher' (the task-trained "
                                               "teacher), or a model path")
    pooling: str = option("masked", "mean pooling of the prototype embeddings and of the domain content vectors: "
                                    "over the real tokens after [CLS] (masked), or over every position after [CLS], "
                                    "padding included (reference; prototypes then pad to max_seq_length)",
                          POOLINGS)
    prototype_weights: bool = option(True, "weight the meta-teacher's per-example loss by the prototype score t_i")
    domain_loss_weight: float = option(0.5, "γ: weight of the meta-teacher's domain-corruption loss and of the "
                                            "distillation's domain-feature loss (0: neither)")
    meta_teacher_init: str = option("pretrained", "the meta-teacher starts from teacher_model_name_or_path as given "
                                                  "(the paper), or from the task-trained teacher", INITS)
    meta_teacher_learning_rate: float | None = option(None, "learning rate of the meta-teacher (None: "
                                                            "teacher_learning_rate)")
    meta_teacher_num_train_epochs: float | None = option(None, "epochs of the meta-teacher (None: "
                                                               "teacher_num_train_epochs)")
    layer_map: str = option("uniform", "student layer -> meta-teacher layer of the distill stage: uniform "
                                       "(j -> j*M//K for j = 0..K: 3j for a 4-layer student of a 12-layer teacher), "
                                       "or pairs 's:t,s:t' (0 = embeddings: hidden states only)")
    hidden_weight: float = option(1.0, "weight of the hidden-state loss of the distill stage")
    attention_weight: float = option(1.0, "weight of the attention-score loss of the distill stage (0: no scores "
                                          "captured)")
    distill_learning_rate: float | None = option(None, "learning rate of the distill stage (constant after "
                                                       "warmup; None: learning_rate)")
    distill_num_train_epochs: float | None = option(None, "epochs of the distill stage (None: num_train_epochs)")
    prediction_instance_weights: bool = option(False, "weight the student stage's distillation rows by ω_i (the "
                                                      "paper's 'domain-expertise weighted' KD; the reference code "
                                                      "leaves that stage unweighted)")

    def validate(self) -> None:
        super().validate()
        for name in ("domain_loss_weight", "hidden_weight", "attention_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("meta_teacher_learning_rate", "meta_teacher_num_train_epochs", "distill_learning_rate",
                     "distill_num_train_epochs"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.target_train_fraction <= 1.0:
            raise ValueError(f"target_train_fraction must be in (0, 1], got {self.target_train_fraction}")
        if not self.target_domain.strip():
            raise ValueError("target_domain must name a domain, or be 'all'")
        maps = parse_layer_map(self.layer_map)
        if maps is not None and len(maps) != 1:
            raise ValueError(f"layer_map: Meta-KD has one teacher; give one pair list, got {self.layer_map!r}")


# ---------------------------------------------------------------------------- the pieces, testable alone

def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, L, H] -> [B, H]: the mean over positions 1.. (after [CLS]) of the real tokens (``masked``) or
    of every position, padding included (``reference``)."""
    after_cls = states[:, 1:]
    if pooling == "reference":
        return after_cls.mean(1)
    mask = attention_mask[:, 1:, None].to(states.dtype)
    return (after_cls * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def prototype_scores(embeddings: torch.Tensor, domains: torch.Tensor, num_domains: int) -> torch.Tensor:
    """t_i = ½[cos(h_i, c_d(i)) + cos(h_i, c̄_−d(i))] of embeddings [N, H] with domains [N] (indices):
    c_k the mean of domain k's embeddings, c̄_−k the mean of the other domains' centroids."""
    centroids = torch.stack([embeddings[domains == k].mean(0) for k in range(num_domains)])      # [K, H]
    others = (centroids.sum(0, keepdim=True) - centroids) / (num_domains - 1)                     # [K, H]
    own = F.cosine_similarity(embeddings, centroids[domains], dim=-1)
    rest = F.cosine_similarity(embeddings, others[domains], dim=-1)
    return 0.5 * (own + rest)


def meta_teacher_loss(logits: torch.Tensor, domain_logits: torch.Tensor, labels: torch.Tensor,
                      corrupted_domains: torch.Tensor, weights: torch.Tensor,
                      domain_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean_i w_i·[CE(logits_i, y_i) + γ·CE(domain_logits_i, d̃_i)], mean CE, mean domain CE)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    domain_ce = F.cross_entropy(domain_logits.float(), corrupted_domains, reduction="none")
    return (weights * (ce + domain_loss_weight * domain_ce)).mean(), ce.mean(), domain_ce.mean()


def instance_weights(logits: torch.Tensor, labels: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """ω_i = (1 + t_i)·e_i with the domain-expertise weight e_i = 1/(1 + exp((1 − p_T(y_i|x_i))²))."""
    gold = torch.softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]
    return (1.0 + prototype) * torch.sigmoid(-(1.0 - gold).pow(2))


def weighted_hidden_loss(projected_states, teacher_states, layer_map, attention_mask: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_i ω_i Σ_pairs mean over i's real tokens of (fit(h_S) − h_T)² of the projected student
    states, through ``hidden_state_loss``: its token mean with the mask m_il·ω_i/n_i is
    Σ_i ω_i·loss_i / Σ_i ω_i (the divisor clamped at 1, as that function does), rescaled here by that
    divisor / B."""
    mask = attention_mask.float()
    scaled = mask * (weights / mask.sum(1).clamp_min(1.0))[:, None]
    loss = hidden_state_loss(projected_states, teacher_states, layer_map, attention_mask=scaled, loss_type="mse")
    return loss * scaled.sum().clamp_min(1.0) / mask.shape[0]


def domain_feature_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """mean_i ω_i · mean over dims of (fit(R_S) − R_T)² of the features [B, H_T]."""
    return (weights * (student_feature.float() - teacher_feature.detach().float()).pow(2).mean(-1)).mean()


def prediction_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    weights: torch.Tensor | None, options: MetaKDOptions,
                    backend: str | None = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KD, CE): kd_weight · (1/B) Σ_i ω_i·T²·D(p_T,i, q_i) (``kd_divergence``, soft CE by default;
    ω = 1 without weights) + hard_weight · CE, through ``kdengine.ops.kd_loss``."""
    kd = kd_loss(student_logits, teacher_logits.to(student_logits.dtype), divergence=options.kd_divergence,
                 temperature=options.kd_temperature, jsd_beta=options.jsd_beta, labels=labels, kd_weight=1.0,
                 hard_weight=0.0, row_weights=weights, ignore_index=IGNORE_INDEX, backend=backend)
    ce = F.cross_entropy(student_logits.float(), labels)
    return options.kd_weight * kd + options.hard_weight * ce, kd, ce


class AttentionScores:
    """Pre-softmax attention scores of every self-attention layer of a BERT-like encoder.

    transformers returns post-softmax probabilities (and none under SDPA), so forward hooks on each
    layer's ``query`` and ``key`` projections keep their outputs and :meth:`scores` computes
    q·kᵀ·scaling per head, [B, heads, L, L], without the padding mask (the loss masks padded pairs).
    This is the score of absolute-position encoders (BERT, MiniLM); gradients flow through q and k."""

    def __init__(self, model: nn.Module, what: str):
        self.layers = [m for m in model.modules() if isinstance(getattr(m, "query", None), nn.Linear)
                       and isinstance(getattr(m, "key", None), nn.Linear) and hasattr(m, "attention_head_size")]
        layers = getattr(model.config, "num_hidden_layers", None)
        if not self.layers or len(self.layers) != layers:
            raise ConfigError(f"{what}: found {len(self.layers)} self-attention modules with query/key projections "
                              f"for {layers} layers; Meta-KD's attention loss reads BERT-like attention (set "
                              f"attention_weight 0 to distil without it)")
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = []

    def __enter__(self) -> AttentionScores:
        self.outputs.clear()
        for index, layer in enumerate(self.layers):
            for name in ("query", "key"):
                hook = (lambda key: lambda module, args, output: self.outputs.__setitem__(key, output))((index, name))
                self.handles.append(getattr(layer, name).register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def scores(self) -> list[torch.Tensor]:
        out = []
        for index, layer in enumerate(self.layers):
            q, k = (self.outputs[(index, name)].unflatten(-1, (-1, layer.attention_head_size)).transpose(1, 2)
                    for name in ("query", "key"))
            out.append(q @ k.transpose(-1, -2) * (layer.attention_head_size ** -0.5))
        return out


def bert_init(module: nn.Module, std: float) -> nn.Module:
    """Normal(0, std) weights and zero biases for every Linear and Embedding of ``module`` (BERT's
    ``initializer_range`` init, as the reference's heads get; PyTorch's N(0, 1) domain embedding would
    swamp the pooled content and stall the meta-teacher)."""
    for part in module.modules():
        if isinstance(part, (nn.Linear, nn.Embedding)):
            nn.init.normal_(part.weight, 0.0, std)
        if isinstance(part, nn.Linear) and part.bias is not None:
            nn.init.zeros_(part.bias)
    return module


class DomainBranch(nn.Module):
    """A domain embedding E and a dense layer W: the domain feature W(E[d] + content)."""

    def __init__(self, num_domains: int, hidden_size: int):
        super().__init__()
        self.embedding = nn.Embedding(num_domains, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, content: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return self.dense(self.embedding(domain) + content)


class MetaTeacher(nn.Module):
    """A sequence classifier with a domain branch: feature = W(E[d] + content) with content the pooled
    last layer, domain_logits = W_dc·dropout(tanh(feature)).

    ``forward(**inputs)`` returns the classifier's outputs; ``forward(domain=d, **inputs)`` returns
    (outputs with ``hidden_states``, domain_logits, feature)."""

    def __init__(self, model: nn.Module, num_domains: int, pooling: str):
        super().__init__()
        hidden = model.config.hidden_size
        self.model, self.pooling = model, pooling
        self.domain = DomainBranch(num_domains, hidden)
        self.dropout = nn.Dropout(getattr(model.config, "hidden_dropout_prob", 0.1))
        self.domain_classifier = nn.Linear(hidden, num_domains)
        bert_init(self.domain, model.config.initializer_range)
        bert_init(self.domain_classifier, model.config.initializer_range)

    def forward(self, domain: torch.Tensor | None = None, **inputs):
        if domain is None:
            return self.model(**inputs)
        outputs = self.model(**inputs, output_hidden_states=True)
        feature = self.domain(mean_pool(outputs.hidden_states[-1], inputs["attention_mask"], self.pooling), domain)
        return outputs, self.domain_classifier(self.dropout(torch.tanh(feature))), feature


class DistillHeads(nn.Module):
    """The student's trainable side of the distill stage: ``fit`` (student width -> teacher width) and
    the student's own domain branch (none when the domain-feature loss is off: no unused parameter
    under DDP). ``forward`` maps the student's hidden states through ``fit`` and returns them with
    fit(W_S(E_S[d] + content_S)) (or None)."""

    def __init__(self, student_size: int, teacher_size: int, num_domains: int, pooling: str, domain_branch: bool):
        super().__init__()
        self.fit = nn.Linear(student_size, teacher_size)
        self.domain = DomainBranch(num_domains, student_size) if domain_branch else None
        self.pooling = pooling

    def forward(self, hidden_states, attention_mask: torch.Tensor, domain: torch.Tensor):
        projected = [self.fit(h) for h in hidden_states]
        if self.domain is None:
            return projected, None
        return projected, self.fit(self.domain(mean_pool(hidden_states[-1], attention_mask, self.pooling), domain))


# ---------------------------------------------------------------------------- the method

def check_domains(domain_names: list[str] | None, opts: MetaKDOptions) -> None:
    """ConfigError unless the training data has two or more domains and target_domain is one."""
    if not domain_names:
        raise ConfigError("method meta_kd needs a domain per training example and the training data has none "
                          "(no domain column); use the embedded synthetic task or a multi-domain reader (the "
                          "Amazon reviews: train_file <sorted_data_acl directory>#train)")
    if len(domain_names) < 2:
        raise ConfigError(f"method meta_kd needs at least two domains (prototype scores compare a domain with "
                          f"the others); the training data has only {domain_names}")
    if opts.target_domain != ALL_DOMAINS and opts.target_domain not in domain_names:
        raise ConfigError(f"target_domain {opts.target_domain!r} is not a domain of the training data; its "
                          f"domains: {', '.join(domain_names)} (or 'all')")


def target_examples(domains: torch.Tensor, names: list[str], opts: MetaKDOptions, seed: int) -> list[int]:
    """The example ids the distillation stages train on: target_domain's (all for 'all'), a seeded
    target_train_fraction of them; ConfigError when there are none. ``domains``: [N] indices into names."""
    if opts.target_domain == ALL_DOMAINS:
        ids = list(range(len(domains)))
    else:
        ids = torch.nonzero(domains == names.index(opts.target_domain))[:, 0].tolist()
    if opts.target_train_fraction < 1.0:
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
        ids = sorted(ids[i] for i in order[:math.floor(opts.target_train_fraction * len(ids))])
    if not ids:
        raise ConfigError(f"target_train_fraction {opts.target_train_fraction} of the training examples of "
                          f"target_domain {opts.target_domain!r} leaves none; raise it")
    return ids


def resolve_layer_map(layer_map: str, k: int, m: int) -> list[tuple[int, int]]:
    """(student layer, meta-teacher layer) pairs for a k-layer student and an m-layer teacher
    (0 = embeddings; ``uniform``: j -> j·m // k); ConfigError for a layer a model does not have."""
    explicit = parse_layer_map(layer_map)
    if explicit is None:
        return [(j, j * m // k) for j in range(k + 1)]
    for s, t in explicit[0]:
        if s > k or t > m:
            raise ConfigError(f"layer_map pair {s}:{t} names {'student' if s > k else 'teacher'} layer "
                              f"{s if s > k else t}, but the student has {k} layers and the meta-teacher {m} "
                              f"(0 = embeddings)")
    return explicit[0]


class MetaKD(VanillaKD):
    """Meta-KD (module docstring). Subclasses VanillaKD for its student-stage loss form."""

    name = "meta_kd"
    options_class = MetaKDOptions
    tasks = ("sequence_classification",)
    stages = (META_TEACHER, DISTILL, STUDENT)

    @classmethod
    def check_run(cls, run) -> None:
        """Before any work: the domains, target_domain, and the layer map against the configs' depths."""
        check_domains(run.domain_names, run.options)
        target_examples(torch.tensor([item["domain"] for item in run.train_dataset]), run.domain_names, run.options,
                        run.args.seed)
        resolve_layer_map(run.options.layer_map, run.student_config.num_hidden_layers,
                          run.teacher_configs[0].num_hidden_layers)

    def __init__(self, ctx):
        super().__init__(ctx)
        check_domains(ctx.domain_names, self.options)
        self.full_train = ctx.train_dataset
        self.domains = torch.tensor([item["domain"] for item in self.full_train])
        self.target_ids = target_examples(self.domains, ctx.domain_names, self.options, ctx.args.seed)
        self.prototype: torch.Tensor | None = None       # t_i by example_id
        self.weights: torch.Tensor | None = None         # ω_i by example_id
        self.meta_teacher: MetaTeacher | None = None
        self.head_mean = False        # the attention loss averages scores over heads (head counts differ)
        self.captures: tuple = (contextlib.nullcontext(), contextlib.nullcontext())   # attention scores (distill)
        self.layer_map: list[tuple[int, int]] | None = None
        self.student_domains: dict | None = None
        self.report: dict[str, dict] = {}

    # ------------------------------------------------------------------ checks and preprocessing
    def _resolve_layer_map(self, student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
        return resolve_layer_map(self.options.layer_map, student.config.num_hidden_layers,
                                 teacher.config.num_hidden_layers)

    def _capture_attention(self, teacher: nn.Module, student: nn.Module) -> None:
        """Score hooks of both models (ConfigError without BERT-like attention); head-averaged scores when
        their head counts differ."""
        self.captures = (AttentionScores(teacher, "the meta-teacher"), AttentionScores(student, "the student"))
        heads = {m.config.num_attention_heads for m in (teacher, student)}
        self.head_mean = len(heads) > 1
        if self.head_mean:
            self.ctx.log(f"[meta_kd] the student and the meta-teacher have {sorted(heads)} attention heads: the "
                         f"attention loss compares their scores averaged over heads")

    def _prototype_encoder(self) -> nn.Module:
        source = self.options.prototype_encoder
        if source == "finetuned_teacher":
            if self.ctx.teacher is None:
                raise ConfigError("prototype_encoder finetuned_teacher: the run has no task-trained teacher")
            return self.ctx.teacher.base_model
        path = self.ctx.teacher_sources[0] if source == "teacher" else source
        model, _ = models.load_for_task(path, self.ctx.task, self.ctx.label_names, what="prototype_encoder")
        return models.freeze(model.base_model).to(self.ctx.device)

    @torch.no_grad()
    def _embed(self, encoder: nn.Module) -> torch.Tensor:
        """Pooled last-layer states [N, H] of the training split (in order)."""
        ctx, pooling = self.ctx, self.options.pooling
        loader = DataLoader(self.full_train, batch_size=ctx.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=ctx.collate_fn)
        chunks = []
        for batch in loader:
            inputs = {k: v.to(ctx.device) for k, v in model_inputs(batch).items()}
            if pooling == "reference":          # the reference pads every example to max_seq_length
                extra = ctx.args.max_seq_length - inputs["input_ids"].shape[1]
                pad = {"input_ids": ctx.tokenizer.pad_token_id or 0}
                inputs = {k: F.pad(v, (0, extra), value=pad.get(k, 0)) for k, v in inputs.items()}
            states = encoder(**inputs).last_hidden_state
            chunks.append(mean_pool(states.float(), inputs["attention_mask"], pooling).cpu())
        return torch.cat(chunks)

    def _load_prototypes(self) -> torch.Tensor:
        """t_i of every training example, computed once (main process) and cached in the output dir."""
        from accelerate.state import PartialState  # noqa: PLC0415

        opts, path = self.options, os.path.join(self.ctx.output_dir, PROTOTYPE_FILE)
        key = {"encoder": opts.prototype_encoder, "pooling": opts.pooling, "num_examples": len(self.full_train)}
        cached = read_json(path) if os.path.isfile(path) else None
        state = PartialState()
        if (cached is None or cached.get("key") != key) and state.is_main_process:
            self.ctx.log(f"[meta_kd] prototype scores of {len(self.full_train)} training examples "
                         f"({opts.prototype_encoder} encoder, {opts.pooling} pooling)")
            scores = prototype_scores(self._embed(self._prototype_encoder()), self.domains,
                                      len(self.ctx.domain_names))
            write_json(path, {"key": key, "scores": scores.tolist()})
        state.wait_for_everyone()
        return torch.tensor(read_json(path)["scores"], device=self.ctx.device)

    # ------------------------------------------------------------------ stages
    def _train_on(self, ids: list[int] | None) -> None:
        """The stage's training data (the trainer reads ctx.train_dataset): all, or these example ids."""
        self.ctx.train_dataset = self.full_train if ids is None else Subset(self.full_train, ids)

    def build_stage(self, name: str, student) -> Stage:
        ctx, opts, args = self.ctx, self.options, self.ctx.args
        if name == META_TEACHER:
            self._train_on(None)
            source = ctx.teacher_sources[0]
            if opts.meta_teacher_init == "finetuned":
                model = copy.deepcopy(ctx.teacher).train().requires_grad_(True)
            else:
                model, _ = models.load_for_task(source, ctx.task, ctx.label_names, what="teacher_model_name_or_path")
            if student is not None:                                         # checks before any Meta-KD work
                self.layer_map = self._resolve_layer_map(student, model)
                if opts.attention_weight > 0:
                    self._capture_attention(model, student)
            self.prototype = self._load_prototypes()
            module = MetaTeacher(model, len(ctx.domain_names), opts.pooling).to(ctx.device)
            return Stage(META_TEACHER, {META_TEACHER: module}, opts.meta_teacher_learning_rate or
                         args.teacher_learning_rate, opts.meta_teacher_num_train_epochs or
                         args.teacher_num_train_epochs, evaluate=False)
        self._train_on(self.target_ids)
        if name == DISTILL:
            if student is None:
                raise ValueError("the distill stage trains the student: run it with the student stage")
            student.requires_grad_(False)       # stage 1 trains the encoder, not the pooler and classifier
            for part in (student.base_model.embeddings, student.base_model.encoder):
                part.requires_grad_(True)
            heads = bert_init(DistillHeads(student.config.hidden_size, self.meta_teacher.model.config.hidden_size,
                                           len(ctx.domain_names), opts.pooling, opts.domain_loss_weight > 0),
                              student.config.initializer_range)
            return Stage(DISTILL, {STUDENT: student, "distill_heads": heads.to(ctx.device)},
                         opts.distill_learning_rate or args.learning_rate,
                         opts.distill_num_train_epochs or args.num_train_epochs, schedule="constant", evaluate=False)
        return super().build_stage(name, student)

    def load_stage(self, name: str, directory: str, student) -> Stage:
        """A finished stage; the distill stage's encoder is not loaded into a student already trained
        beyond it (a finished run evaluated again)."""
        if name == DISTILL and os.path.isfile(os.path.join(self.ctx.output_dir, "train_results.json")):
            return self.build_stage(name, student)
        return super().load_stage(name, directory, student)

    def stage_finished(self, stage: Stage) -> None:
        if stage.name == DISTILL:
            stage.modules[STUDENT].requires_grad_(True)
            return
        self.meta_teacher = models.freeze(stage.modules[META_TEACHER])
        logits = self._predict(lambda batch: self.meta_teacher(**model_inputs(batch)).logits, self.full_train)
        labels = torch.tensor([item["labels"] for item in self.full_train], device=logits.device)
        self.weights = instance_weights(logits, labels, self.prototype)
        self.report.update(self._domain_rows({META_TEACHER: self.meta_teacher}))

    # ------------------------------------------------------------------ training steps
    def training_step(self, step, batch):
        name, opts = step.stage.name, self.options
        inputs, labels = model_inputs(batch), batch["labels"]
        if name == META_TEACHER:
            outputs, domain_logits, _ = step.model(domain=batch["domain"], **inputs)
            corrupted = batch["domain"][torch.randperm(labels.shape[0], device=labels.device)]
            weights = self.prototype[batch["example_id"]] if opts.prototype_weights else torch.ones_like(
                labels, dtype=torch.float)
            loss, ce, domain_ce = meta_teacher_loss(outputs.logits, domain_logits, labels, corrupted, weights,
                                                    opts.domain_loss_weight)
            return loss, {"ce_loss": ce.detach(), "domain_loss": domain_ce.detach()}
        weights = self.weights[batch["example_id"]]
        if name == DISTILL:
            return self._distill_loss(step, batch, inputs, weights)
        with torch.no_grad(), step.accelerator.autocast():
            teacher_logits = self.meta_teacher(**inputs).logits
        loss, kd, ce = prediction_loss(step.model(**inputs).logits, teacher_logits, labels,
                                       weights if opts.prediction_instance_weights else None, opts,
                                       self.ctx.args.kernel_backend)
        return loss, {"kd_loss": kd.detach(), "ce_loss": ce.detach(), "instance_weight": weights.mean()}

    def _distill_loss(self, step, batch, inputs, weights):
        opts, mask = self.options, batch["attention_mask"]
        heads = step.modules["distill_heads"]
        attention = opts.attention_weight > 0
        teacher_capture, student_capture = self.captures
        with torch.no_grad(), step.accelerator.autocast(), teacher_capture:
            teacher, _, teacher_feature = self.meta_teacher(domain=batch["domain"], **inputs)
            teacher_scores = teacher_capture.scores() if attention else None
        with student_capture:
            student = step.model(**inputs, output_hidden_states=True)
            student_scores = student_capture.scores() if attention else None
        projected, own = heads(student.hidden_states, mask, batch["domain"])
        hidden = weighted_hidden_loss(projected, teacher.hidden_states, self.layer_map, mask, weights)
        loss, logs = opts.hidden_weight * hidden, {"hidden_loss": hidden.detach(), "instance_weight": weights.mean()}
        if attention:
            pairs = [(s, t) for s, t in self.layer_map if s > 0 and t > 0]
            if self.head_mean:
                student_scores, teacher_scores = ([s.mean(1, keepdim=True) for s in side]
                                                  for side in (student_scores, teacher_scores))
            rows = attention_score_loss(student_scores, teacher_scores, pairs, attention_mask=mask, reduction="none")
            att = (weights * rows).mean()
            loss, logs["attention_loss"] = loss + opts.attention_weight * att, att.detach()
        if opts.domain_loss_weight > 0:
            dom = domain_feature_loss(own, teacher_feature, weights)
            loss, logs["domain_loss"] = loss + opts.domain_loss_weight * dom, dom.detach()
        return loss, logs

    # ------------------------------------------------------------------ per-domain evaluation
    @torch.no_grad()
    def _predict(self, forward, dataset) -> torch.Tensor:
        """Logits [N, C] of ``forward(batch)`` over ``dataset`` in order (this process's copy)."""
        loader = DataLoader(dataset, batch_size=self.ctx.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=self.ctx.collate_fn)
        return torch.cat([forward({k: v.to(self.ctx.device) for k, v in batch.items()}).float() for batch in loader])

    def _domain_metrics(self, model: nn.Module) -> dict:
        """{metric: value} of ``model`` on the validation split, overall and per domain (``<domain>_<metric>``)."""
        ctx, dataset = self.ctx, self.ctx.eval_dataset
        training = model.training
        predictions = self._predict(lambda batch: model.eval()(**model_inputs(batch)).logits, dataset).argmax(-1)
        model.train(training)
        labels = torch.tensor([item["labels"] for item in dataset])
        domains = torch.tensor([item["domain"] for item in dataset])
        predictions = predictions.cpu()
        out = dict(compute_metrics(ctx.task, predictions.numpy(), labels.numpy(), ctx.label_names))
        for index, domain in enumerate(ctx.domain_names):
            keep = domains == index
            if keep.any():
                scored = compute_metrics(ctx.task, predictions[keep].numpy(), labels[keep].numpy(), ctx.label_names)
                out.update({f"{domain}_{k}": v for k, v in scored.items()})
        return out

    def _domain_rows(self, named: dict) -> dict[str, dict]:
        return {row: {f"eval_{k}": v for k, v in self._domain_metrics(model).items()} for row, model in named.items()}

    def extra_metrics(self, model, dataset) -> dict:
        """The student's per-domain metrics (kept for the table printed with the teacher report)."""
        metrics = self._domain_metrics(self.ctx.accelerator.unwrap_model(model))
        self.student_domains = {f"eval_{k}": v for k, v in metrics.items()}
        return {k: v for k, v in metrics.items() if any(k.startswith(f"{d}_") for d in self.ctx.domain_names)}

    def teacher_report(self) -> dict:
        """The meta-teacher's row (per domain). Also prints the per-domain table of every model of the run
        (the task-trained all-domain teacher, the meta-teacher, the baseline students, the Meta-KD
        student) and writes it to ``output_dir/domain_results.json`` (called once, on the main process,
        after the student's final evaluation)."""
        from kdengine.train.reporting import format_table  # noqa: PLC0415

        ctx = self.ctx
        table = self._domain_rows({"teacher": ctx.teacher}) if ctx.teacher is not None else {}
        table.update(self.report)
        for name in BASELINE_ROWS:
            directory = os.path.join(ctx.output_dir, "baselines", name)
            if os.path.isfile(os.path.join(directory, "train_results.json")):
                model, _ = models.load_for_task(directory, ctx.task, ctx.label_names, what=name)
                table.update(self._domain_rows({f"{name}_student": model.to(ctx.device)}))
        if self.student_domains is not None:
            table[f"{self.name}_student"] = self.student_domains
        metric = ctx.args.best_metric_name()
        columns = [f"{d}_{metric}" for d in ctx.domain_names] + [metric]
        write_json(os.path.join(ctx.output_dir, "domain_results.json"),
                   {"target_domain": self.options.target_domain, "rows": table})
        lines = [{"model": row, **{c: values.get(f"eval_{c}") for c in columns}} for row, values in table.items()]
        ctx.log(f"\n[meta_kd] per-domain validation {metric} (student target domain: {self.options.target_domain})\n"
                + format_table(lines, ["model", *columns]))
        return dict(self.report)
