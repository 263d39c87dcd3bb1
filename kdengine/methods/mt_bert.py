"""MT-BERT (Wu, Wu, Huang; Findings of ACL 2021): co-finetuned teachers with a shared pooler and
head, then a student taught by a multi-teacher hidden loss and a confidence-weighted multi-teacher
distillation loss. The spec, with what is verified and what is not: ``../shared/docs/methods.md``
§4; the choices made here: docs/methods.md ("MT-BERT").

Stages, each on the shared loop (checkpoints, mid-stage resume, ``output_dir/<stage>/`` when
complete):

1. ``co_finetune``: the N teachers trained jointly, each starting from its task-fine-tuned copy
   (``ctx.teachers``; ``co_finetune_init: pretrained`` starts from ``teacher_model_name_or_path``
   as given). Teacher i's first-token state goes through its projection P_i (only when its width
   differs from ``shared_hidden_size``), then ONE shared pooler (dense + tanh) and ONE shared
   classifier: L_co = Σ_i CE(y, head(pool(P_i h_i))).
2. ``student``: hidden_weight · Σ_i hidden_state_loss(W_i,j h_S^(j), h_Ti^(g_i(j)))
   + kd_weight · L_MT-Dis + hard_weight · CE, where
   L_MT-Dis = (1 / rows) Σ_n Σ_i w_n,i · T² · D(p_i,n, q_n) and w_n,i is teacher i's confidence on
   the gold label of row n (``teacher_confidence``). With ``kd_divergence: soft_ce`` the K teachers
   go through ONE ``fused_experts_kd_loss`` call: SCE is linear in the teacher distribution, so
   Σ_i w_i SCE(p_i, q) = (Σ_i w_i) · SCE(Σ_i α_i p_i, q) with α = w / Σ w (a probability-space
   mixture with given per-row weights and row weight Σ_i w_i), exactly. Other divergences are not
   linear in p and run one ``kd_loss`` per teacher with that teacher's weights as row weights.
   With ``compare_fusions`` the same stage also trains the averaged-logits student (TextBrewer's
   multi-teacher distiller: kd_weight · KD(student, mean_i z_i) + hard_weight · CE, no hidden
   term), a copy of the initial student with its own optimizer (clipped and scheduled alone), on
   the same batches and the same teacher forward; it is saved as ``modules/mean_logits.safetensors``
   and evaluated with the student (``eval_mean_logits_*``, row ``mean_logits_student``).
   ``teacher_fusion: mean_logits`` makes the main student the averaged-logits one.
   ``student_head: shared`` starts the student (and the averaged-logits one) from the co-finetuned
   shared pooler and classifier instead of its own.

On the embedded synthetic task (one tiny teacher built by the trainer) the method adds the tiny
teachers of ``EMBEDDED_TEACHERS`` (same tokenizer, other sizes), fine-tuned alone like the
trainer's teacher so that each has its own row.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kdengine import models
from kdengine.constants import IGNORE_INDEX
from kdengine.losses import HIDDEN_LOSSES, hidden_state_loss
from kdengine.methods.base import STUDENT, OptimizerSpec, Stage
from kdengine.methods.baselines import KDLossOptions, VanillaKD, kd_option
from kdengine.metrics import compute_metrics
from kdengine.models import model_inputs
from kdengine.ops import fused_experts_kd_loss, kd_loss
from kdengine.options import ConfigError, option, parse_layer_map

CO_FINETUNE = "co_finetune"
MEAN_LOGITS = "mean_logits"
INITS = ("finetuned", "pretrained")
CONFIDENCES = ("inverse_ce", "softmax_neg_ce", "none")
FUSIONS = ("confidence", "mean_logits")
STUDENT_HEADS = ("own", "shared")
# Extra tiny teachers of the embedded run, beside the trainer's (4 layers, H=128): BertConfig fields.
EMBEDDED_TEACHERS = ({"num_hidden_layers": 2, "hidden_size": 96, "num_attention_heads": 4, "intermediate_size": 384},)


@dataclass
class MTBERTOptions(KDLossOptions):
    """MT-BERT's options. The logit-loss defaults follow the (unverified) spec: soft cross-entropy at
    T = 1, unit term weights."""

    kd_divergence: str = kd_option("kd_divergence", "soft_ce")
    kd_temperature: float = kd_option("kd_temperature", 1.0)
    kd_weight: float = kd_option("kd_weight", 1.0)
    hard_weight: float = kd_option("hard_weight", 1.0)
    teacher_fusion: str = option("confidence", "the student's teacher signal: MT-BERT's confidence-weighted "
                                               "per-teacher losses (+ hidden loss), or the teachers' averaged "
                                               "logits (TextBrewer)", FUSIONS)
    teacher_confidence: str = option("inverse_ce", "per-example weight of each teacher in the distillation loss: "
                                                   "1/(1+CE(y, teacher)), softmax over teachers of -CE, or 1",
                                     CONFIDENCES)
    compare_fusions: bool = option(True, "with teacher_fusion=confidence, also train the averaged-logits "
                                         "student beside the MT-BERT one (same batches, its own optimizer)")
    hidden_weight: float = option(1.0, "weight of the multi-teacher hidden loss (0: no projections, no hidden "
                                       "states needed)")
    hidden_loss: str = option("mse", "distance of a projected student layer to its teacher layer", HIDDEN_LOSSES)
    layer_map: str = option("uniform", "student layer -> teacher layer: uniform (j -> j*M//K, j = 1..K), or "
                                       "pairs 's:t,s:t' for every teacher, or one list per teacher separated "
                                       "by ';' (layer 0 = the embeddings)")
    shared_hidden_size: int | None = option(None, "width of the shared pooler and classifier (None: the first "
                                                  "teacher's hidden size)")
    co_finetune_learning_rate: float | None = option(None, "learning rate of the co-finetuning stage (None: "
                                                           "teacher_learning_rate)")
    co_finetune_init: str = option("finetuned", "co-finetuning starts from each teacher fine-tuned alone on the "
                                                "task, or from teacher_model_name_or_path as given", INITS)
    co_finetune_num_train_epochs: float = option(1.0, "epochs of the co-finetuning stage (from pretrained "
                                                      "teachers, about teacher_num_train_epochs)")
    student_head: str = option("own", "the student's initial pooler and classifier: its own (the first "
                                      "teacher's when cut with student_num_layers), or the co-finetuned shared "
                                      "ones (a BERT-style student of width shared_hidden_size)", STUDENT_HEADS)

    def validate(self) -> None:
        super().validate()
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.co_finetune_learning_rate is not None and self.co_finetune_learning_rate <= 0:
            raise ValueError(f"co_finetune_learning_rate must be > 0, got {self.co_finetune_learning_rate}")
        if self.co_finetune_num_train_epochs <= 0:
            raise ValueError(f"co_finetune_num_train_epochs must be > 0, got {self.co_finetune_num_train_epochs}")
        if self.shared_hidden_size is not None and self.shared_hidden_size < 1:
            raise ValueError(f"shared_hidden_size must be >= 1, got {self.shared_hidden_size}")
        parse_layer_map(self.layer_map)


def teacher_confidence_weights(teacher_logits: torch.Tensor, labels: torch.Tensor, confidence: str) -> torch.Tensor:
    """w [N, K] of K teachers' logits [K, N, C] on gold labels [N] (fp32, no gradient):
    ``inverse_ce`` 1/(1 + CE_k), ``softmax_neg_ce`` softmax_k(−CE_k), ``none`` 1. Rows labelled
    IGNORE_INDEX get CE 0 (they carry no loss anyway)."""
    with torch.no_grad():
        ce = torch.stack([F.cross_entropy(z.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
                          for z in teacher_logits], dim=-1)
        if confidence == "inverse_ce":
            return 1.0 / (1.0 + ce)
        if confidence == "softmax_neg_ce":
            return torch.softmax(-ce, dim=-1)
        if confidence == "none":
            return torch.ones_like(ce)
    raise ValueError(f"unknown teacher_confidence {confidence!r}; expected one of {', '.join(CONFIDENCES)}")


def multi_teacher_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                          labels: torch.Tensor, *, divergence: str, temperature: float, jsd_beta: float = 0.5,
                          backend: str | None = "auto") -> torch.Tensor:
    """(1 / valid rows) Σ_n Σ_k w_n,k · T² · D(p_k,n, q_n) of student logits [N, C], K teachers'
    logits [K, N, C] and weights [N, K]; one fused call for ``soft_ce`` (module docstring), one
    ``kd_loss`` per teacher otherwise."""
    common = dict(divergence=divergence, temperature=temperature, jsd_beta=jsd_beta, labels=labels,
                  ignore_index=IGNORE_INDEX, kd_weight=1.0, hard_weight=0.0, backend=backend)
    teachers = teacher_logits.to(student_logits.dtype)
    if divergence == "soft_ce":
        return fused_experts_kd_loss(student_logits, teachers, weights=weights, space="prob",
                                     row_weights=weights.sum(-1), **common)
    return sum(kd_loss(student_logits, teachers[k], row_weights=weights[:, k], **common)
               for k in range(teachers.shape[0]))


class CoFinetunedTeachers(nn.Module):
    """N teacher encoders sharing one pooler (dense + tanh over the first token) and one classifier.

    ``forward`` returns (logits [N, B, C], per teacher its ``hidden_states`` or None)."""

    def __init__(self, backbones: list[nn.Module], shared_hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.backbones = nn.ModuleList(backbones)
        self.projections = nn.ModuleList(
            nn.Identity() if b.config.hidden_size == shared_hidden_size else nn.Linear(b.config.hidden_size,
                                                                                      shared_hidden_size)
            for b in backbones)
        self.pooler = nn.Sequential(nn.Linear(shared_hidden_size, shared_hidden_size), nn.Tanh())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(shared_hidden_size, num_labels)

    def forward(self, output_hidden_states: bool = False, **inputs):
        logits, hidden = [], []
        for backbone, projection in zip(self.backbones, self.projections):
            out = backbone(**inputs, output_hidden_states=output_hidden_states)
            pooled = self.pooler(projection(out.last_hidden_state[:, 0]))
            logits.append(self.classifier(self.dropout(pooled)))
            hidden.append(out.hidden_states if output_hidden_states else None)
        return torch.stack(logits), hidden


class LayerProjections(nn.Module):
    """One learned linear map per (teacher, layer pair), from the student's width to that teacher's.

    ``forward(student hidden_states)`` returns, per teacher, the projected student states of its pairs."""

    def __init__(self, student_hidden_size: int, teacher_hidden_sizes: list[int],
                 layer_maps: list[list[tuple[int, int]]]):
        super().__init__()
        self.layer_maps = layer_maps
        self.maps = nn.ModuleList(nn.ModuleList(nn.Linear(student_hidden_size, size) for _ in pairs)
                                  for size, pairs in zip(teacher_hidden_sizes, layer_maps))

    def forward(self, hidden_states):
        return [[projection(hidden_states[s]) for projection, (s, _) in zip(maps, pairs)]
                for maps, pairs in zip(self.maps, self.layer_maps)]


def _head_layers(model: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """(pooler dense, classifier) of a BERT-style sequence classifier, or None for another layout."""
    dense = getattr(getattr(model.base_model, "pooler", None), "dense", None)
    classifier = getattr(model, "classifier", None)
    if isinstance(dense, nn.Linear) and isinstance(classifier, nn.Linear):
        return dense, classifier
    return None


def load_shared_head(co_teachers: CoFinetunedTeachers, student: nn.Module) -> None:
    """Copy the co-finetuned shared pooler (dense) and classifier into ``student``'s (checked to fit by
    ``MTBERT._check`` before any training)."""
    dense, classifier = _head_layers(student)
    with torch.no_grad():
        dense.load_state_dict(co_teachers.pooler[0].state_dict())
        classifier.load_state_dict(co_teachers.classifier.state_dict())


def _without_pooler(backbone: nn.Module) -> nn.Module:
    """An encoder without its own pooler (the shared one replaces it; no unused parameter under DDP)."""
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def _backbone(source: str, task: str, label_names: list[str]) -> nn.Module:
    """The encoder of a teacher checkpoint, without its pooler."""
    model, _ = models.load_for_task(source, task, label_names, what="teacher_model_name_or_path")
    return _without_pooler(model.base_model)


def check_teacher_count(sources: list[str], embedded: bool) -> bool:
    """Whether the run uses the embedded extra teachers (one tiny teacher on the embedded task);
    ConfigError for fewer than two teachers otherwise."""
    if len(sources) == 1 and embedded:
        return True
    if len(sources) < 2:
        raise ConfigError(f"method mt_bert distils several teachers; teacher_model_name_or_path gives "
                          f"{len(sources)}: pass two or more (a comma list, or a YAML list)")
    return False


def resolve_layer_maps(layer_map: str, student_layers: int, teacher_layers: list[int],
                       sources: list[str]) -> list[list[tuple[int, int]]]:
    """One list of (student layer, teacher layer) pairs per teacher (0 = embeddings): ``uniform``
    maps student layer j to teacher layer j·m // k; ConfigError for a layer a model does not have."""
    explicit = parse_layer_map(layer_map)
    n = len(teacher_layers)
    if explicit is None:
        return [[(j, j * m // student_layers) for j in range(1, student_layers + 1)] for m in teacher_layers]
    if len(explicit) not in (1, n):
        raise ConfigError(f"layer_map gives {len(explicit)} pair lists for {n} teachers; give one list for "
                          f"every teacher or one per teacher")
    maps = explicit * n if len(explicit) == 1 else explicit
    for i, (pairs, m) in enumerate(zip(maps, teacher_layers)):
        for s, t in pairs:
            if s > student_layers:
                raise ConfigError(f"layer_map pair {s}:{t} names student layer {s}, but the student has "
                                  f"{student_layers} layers (0 = embeddings)")
            if t > m:
                raise ConfigError(f"layer_map pair {s}:{t} names layer {t} of teacher {i} "
                                  f"({sources[i]}), which has {m} layers (0 = embeddings)")
    return maps


class MTBERT(VanillaKD):
    """MT-BERT (module docstring). Subclasses VanillaKD for the averaged-logits student's loss."""

    name = "mt_bert"
    options_class = MTBERTOptions
    tasks = ("sequence_classification",)

    stages = (CO_FINETUNE, STUDENT)

    @classmethod
    def check_run(cls, run) -> None:
        """Before any work: two or more teachers, and the layer map against the configs' depths."""
        if check_teacher_count(run.teacher_sources, run.embedded):
            return                  # the embedded extra teachers are built (and checked) by the method
        opts = run.options
        if opts.teacher_fusion == "confidence" and opts.hidden_weight != 0:
            resolve_layer_maps(opts.layer_map, run.student_config.num_hidden_layers,
                               [c.num_hidden_layers for c in run.teacher_configs], run.teacher_sources)

    def __init__(self, ctx):
        from kdengine.config import is_embedded  # noqa: PLC0415 (kdengine.config imports the registry)

        super().__init__(ctx)
        self.embedded = check_teacher_count(ctx.teacher_sources, is_embedded(ctx.args))
        self.sources = list(ctx.teacher_sources)
        self.teachers = list(ctx.teachers)      # each fine-tuned alone (frozen)
        self.co_teachers: CoFinetunedTeachers | None = None
        self.mean_logits_student: nn.Module | None = None
        self.layer_maps: list[list[tuple[int, int]]] | None = None
        self.sizes: tuple[int, list[int]] | None = None      # (student width, teacher widths)
        self.report: dict[str, dict] = {}

    # ------------------------------------------------------------------ checks
    def _probe(self, model: nn.Module, what: str) -> tuple[int, int]:
        """(layers, width) from one forward of ``model`` with ``output_hidden_states``."""
        batch = {k: v.to(self.ctx.device) for k, v in self.ctx.collate_fn([self.ctx.train_dataset[0]]).items()}
        training = model.training
        with torch.no_grad():       # in eval mode: no dropout draw moves the RNG
            states = getattr(model.eval()(**model_inputs(batch), output_hidden_states=True), "hidden_states", None)
        model.train(training)
        if not states or len(states) < 2:
            raise ConfigError(f"{what} returns no hidden states with output_hidden_states=True; MT-BERT's hidden "
                              f"loss matches them layer by layer (use an encoder that returns them, or set "
                              f"hidden_weight 0)")
        return len(states) - 1, states[-1].shape[-1]

    def _check(self, student: nn.Module | None, backbones: list[nn.Module]) -> None:
        """The student's head for ``student_head: shared``, hidden states and layer maps of the student and
        the teachers (ConfigError) before MT-BERT trains."""
        if student is not None and self.options.student_head == "shared":
            width = self.options.shared_hidden_size or backbones[0].config.hidden_size
            layers = _head_layers(student)
            if layers is None:
                raise ConfigError(f"student_head shared: the student ({type(student).__name__}) has no BERT-style "
                                  f"pooler.dense and classifier Linear layers to take the shared head; use "
                                  f"student_head own")
            shapes = (tuple(layers[0].weight.shape), layers[1].in_features)
            if shapes != ((width, width), width):
                raise ConfigError(f"student_head shared: the shared pooler and classifier are {width} wide but the "
                                  f"student's pooler is {shapes[0][1]} and its classifier takes {shapes[1]}; set "
                                  f"shared_hidden_size to the student's width or use student_head own")
        if self.options.teacher_fusion != "confidence" or self.options.hidden_weight == 0 or student is None:
            return
        layers, widths = zip(*(self._probe(b, f"teacher {i} ({s})")
                               for i, (b, s) in enumerate(zip(backbones, self.sources))))
        student_layers, student_width = self._probe(student, "the student")
        self.layer_maps = resolve_layer_maps(self.options.layer_map, student_layers, list(layers), self.sources)
        self.sizes = (student_width, list(widths))

    # ------------------------------------------------------------------ the embedded task's teachers
    def _embedded_sources(self) -> list[str]:
        """Write the ``EMBEDDED_TEACHERS`` (untrained) beside the trainer's tiny teacher; their paths."""
        from accelerate.state import PartialState  # noqa: PLC0415

        from kdengine.data.synthetic import synthetic_vocab  # noqa: PLC0415
        from kdengine.tiny_models import build_tiny_models  # noqa: PLC0415

        ctx, state, sources = self.ctx, PartialState(), []
        for index, shape in enumerate(EMBEDDED_TEACHERS, start=1):
            directory = os.path.join(os.path.dirname(self.sources[0]), f"mt_bert_{index}")
            if state.is_main_process and not os.path.isdir(directory):
                build_tiny_models(directory, task=ctx.task, label_names=ctx.label_names, vocab=synthetic_vocab(),
                                  teacher=shape, seed=ctx.args.seed + 2 * index)
            state.wait_for_everyone()
            sources.append(os.path.join(directory, "teacher"))
        return sources

    def _finetune_embedded_teachers(self) -> None:
        """Each embedded extra teacher fine-tuned alone, as the trainer does its teacher (row teacher_<i>)."""
        from kdengine.train.__main__ import TaskInputs  # noqa: PLC0415
        from kdengine.train.teacher import prepare_teacher, teacher_name, teacher_row  # noqa: PLC0415

        ctx = self.ctx
        inputs = TaskInputs(ctx.label_names, ctx.tokenizer, ctx.train_dataset, ctx.eval_dataset, ctx.collate_fn,
                            ctx.domain_names)
        for index in range(len(self.teachers), len(self.sources)):
            name = teacher_name(index)
            path = prepare_teacher(ctx.args, inputs, self.sources[index], name=name, needs_training=True,
                                   log=ctx.log)
            self.report[name] = teacher_row(ctx.args, inputs, path, log=ctx.log)
            model, _ = models.load_for_task(path, ctx.task, ctx.label_names, what="teacher")
            self.teachers.append(models.freeze(model).to(ctx.device))

    # ------------------------------------------------------------------ stages
    def build_stage(self, name: str, student) -> Stage:
        ctx, opts, args = self.ctx, self.options, self.ctx.args
        if name == CO_FINETUNE:
            if self.embedded and len(self.sources) == 1:
                self.sources += self._embedded_sources()
            backbones = [_backbone(s, ctx.task, ctx.label_names).to(ctx.device) for s in self.sources]
            self._check(student, backbones)                     # before any training of MT-BERT's
            self._finetune_embedded_teachers()
            if opts.co_finetune_init == "finetuned":
                backbones = [_without_pooler(copy.deepcopy(t.base_model).train().requires_grad_(True))
                             for t in self.teachers]
            width = opts.shared_hidden_size or backbones[0].config.hidden_size
            dropout = getattr(backbones[0].config, "hidden_dropout_prob", 0.1)
            module = CoFinetunedTeachers(backbones, width, ctx.num_labels, dropout)
            ctx.log(f"[mt_bert] co_finetune: {len(backbones)} teachers (hidden sizes "
                    f"{[b.config.hidden_size for b in backbones]}) with one shared pooler and classifier of width "
                    f"{width}")
            return Stage(CO_FINETUNE, {CO_FINETUNE: module.to(ctx.device)},
                         opts.co_finetune_learning_rate or args.teacher_learning_rate,
                         opts.co_finetune_num_train_epochs, evaluate=False)
        # a finished run evaluated again keeps its trained head
        if opts.student_head == "shared" and not os.path.isfile(os.path.join(ctx.output_dir, "train_results.json")):
            load_shared_head(self.co_teachers, student)
            ctx.log("[mt_bert] student: starts from the co-finetuned shared pooler and classifier")
        stage = super().build_stage(name, student)
        if opts.teacher_fusion == "confidence":
            path = ("one fused_experts_kd_loss call (probability mixture with given per-row weights)"
                    if opts.kd_divergence == "soft_ce" else f"one kd_loss per teacher ({opts.kd_divergence})")
            ctx.log(f"[mt_bert] student: {len(self.sources)} co-finetuned teachers weighted by "
                    f"{opts.teacher_confidence} through {path}; layer maps {self.layer_maps}")
        if self.layer_maps is not None:
            projections = LayerProjections(self.sizes[0], self.sizes[1], self.layer_maps)
            stage.modules["projections"] = projections.to(ctx.device)
        if opts.compare_fusions and opts.teacher_fusion == "confidence":
            self.mean_logits_student = copy.deepcopy(student)
            saved = os.path.join(ctx.output_dir, "modules", f"{MEAN_LOGITS}.safetensors")
            if os.path.isfile(saved):            # a finished run evaluated again
                models.load_trainable(self.mean_logits_student, saved)
            stage.modules[MEAN_LOGITS] = self.mean_logits_student
            stage.optimizers = [OptimizerSpec(STUDENT, tuple(m for m in stage.modules if m != MEAN_LOGITS)),
                                OptimizerSpec(MEAN_LOGITS, (MEAN_LOGITS,))]
        return stage

    def stage_finished(self, stage: Stage) -> None:
        self.co_teachers = stage.modules[CO_FINETUNE].eval().requires_grad_(False)
        names = [f"co_finetuned_teacher{'' if i == 0 else f'_{i}'}" for i in range(len(self.sources))]

        def forward(batch):
            logits, _ = self.co_teachers(**model_inputs(batch))
            return {**dict(zip(names, logits)), "co_finetuned_mean_logits": logits.mean(0)}

        self.report.update(self._evaluate(forward, self.ctx.eval_dataset))

    def extra_metrics(self, model, dataset) -> dict:
        """The averaged-logits student trained beside the MT-BERT one, on the same split."""
        if self.mean_logits_student is None:
            return {}
        student, training = self.mean_logits_student, self.mean_logits_student.training
        row = self._evaluate(lambda batch: {"mean_logits_student": student.eval()(**model_inputs(batch)).logits},
                             dataset)
        student.train(training)
        self.report.update(row)
        return {f"mean_logits_{k[len('eval_'):]}": v for k, v in row["mean_logits_student"].items()}

    @torch.no_grad()
    def _evaluate(self, forward, dataset) -> dict[str, dict]:
        """{row: metrics on ``dataset``} of the logits [B, C] ``forward(batch)`` returns by row name (every
        process takes part; predictions gathered as the trainer does)."""
        ctx = self.ctx
        if dataset is None:
            return {}
        loader = DataLoader(dataset, batch_size=ctx.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=ctx.collate_fn, num_workers=ctx.args.dataloader_num_workers,
                            generator=torch.Generator().manual_seed(ctx.args.seed))
        preds, losses, refs = {}, {}, []
        for batch in ctx.accelerator.prepare_data_loader(loader):
            labels = batch["labels"]
            for row, logits in forward(batch).items():
                ce = F.cross_entropy(logits.float(), labels, reduction="none")
                p, c = ctx.accelerator.gather_for_metrics((logits.argmax(-1), ce))
                preds.setdefault(row, []).append(p.cpu())
                losses.setdefault(row, []).append(c.cpu())
            refs.append(ctx.accelerator.gather_for_metrics(labels).cpu())
        references = torch.cat(refs).numpy()
        report = {}
        for row, chunks in preds.items():
            metrics = compute_metrics(ctx.task, torch.cat(chunks).numpy(), references, ctx.label_names)
            report[row] = {"eval_loss": float(torch.cat(losses[row]).mean()),
                           **{f"eval_{k}": v for k, v in metrics.items()}, "eval_samples": len(references)}
        return report

    def teacher_report(self) -> dict:
        return self.report

    # ------------------------------------------------------------------ training steps
    def teacher_outputs(self, batch: dict) -> dict:
        """The co-finetuned teachers' averaged logits (the mean_logits student's teacher, and the plot's)."""
        logits, _ = self.co_teachers(**model_inputs(batch))
        return {"logits": logits.mean(0)}

    def training_step(self, step, batch):
        name, opts = step.stage.name, self.options
        inputs, labels = model_inputs(batch), batch["labels"]
        if name == CO_FINETUNE:
            logits, _ = step.model(**inputs)
            ces = [F.cross_entropy(z.float(), labels, ignore_index=IGNORE_INDEX) for z in logits]
            return torch.stack(ces).sum(), {f"ce_teacher_{i}": ce.detach() for i, ce in enumerate(ces)}
        if opts.teacher_fusion == "mean_logits":
            return super().training_step(step, batch)
        hidden = self.layer_maps is not None
        with torch.no_grad(), step.accelerator.autocast():
            teacher_logits, teacher_states = self.co_teachers(**inputs, output_hidden_states=hidden)
        logs = {}
        if MEAN_LOGITS in step.modules:
            mean_loss, mean_logs = self.student_loss(step.modules[MEAN_LOGITS](**inputs), batch,
                                                     {"logits": teacher_logits.mean(0)})
            step.update(mean_loss, MEAN_LOGITS)
            logs = {f"mean_logits_{k}": v for k, v in mean_logs.items()}
        student = step.model(**inputs, output_hidden_states=hidden)
        weights = teacher_confidence_weights(teacher_logits, labels, opts.teacher_confidence)
        kd = multi_teacher_kd_loss(student.logits, teacher_logits, weights, labels, divergence=opts.kd_divergence,
                                   temperature=opts.kd_temperature, jsd_beta=opts.jsd_beta,
                                   backend=self.ctx.args.kernel_backend)
        ce = F.cross_entropy(student.logits.float(), labels, ignore_index=IGNORE_INDEX)
        loss = opts.kd_weight * kd + opts.hard_weight * ce
        logs.update({"kd_loss": kd.detach(), "ce_loss": ce.detach(),
                     **{f"teacher_weight_{i}": w for i, w in enumerate(weights.mean(0))}})
        if hidden:
            projected = step.modules["projections"](student.hidden_states)
            hid = sum(hidden_state_loss(own, states, [(p, t) for p, (_, t) in enumerate(pairs)],
                                        attention_mask=batch["attention_mask"], loss_type=opts.hidden_loss)
                      for own, states, pairs in zip(projected, teacher_states, self.layer_maps))
            loss = loss + opts.hidden_weight * hid
            logs["hidden_loss"] = hid.detach()
        return loss, logs
