"""PromptKD (Kim, Jang, Yang; EMNLP 2024 Findings): a student-guided soft prompt on a frozen causal-LM
teacher, on-policy reverse-KL distillation. Spec: ``../shared/docs/methods.md`` §3 (the reference
``gmkim-ai/PromptKD``, ``train_promptkd.py``).

Stages: ``sft`` (optional, ``sft_num_train_epochs`` > 0: the student on the reference responses,
cross-entropy; the reference starts PromptKD from an SFT'd student) then ``student``, whose modules
are the student and ``teacher_prompt`` (:class:`~kdengine.experts.PromptExperts` with one expert:
``prompt_length`` input embeddings prepended to the task-trained teacher, initialised from the
token embeddings of ``prompt_init_text``; the backbone stays frozen). Each micro-batch
(:meth:`PromptKD.training_step`), as the reference:

1. the student (eval mode, no grad) samples a response to each prompt of the batch
   (:func:`kdengine.generation.sample_responses`: KV cache, temperature, top-p, top-k off, cut after
   the first eos); ``[prompt; response]`` is right-padded, the prompt out of the loss;
2. the prompt is updated (``step.update(..., "teacher_prompt")``) with
   ``L_T = w_s · KL(p_θ ‖ p_0) + KL(p_θ ‖ q_S)``: p_θ the prompted teacher (train mode, with grad),
   p_0 the teacher without prompt and q_S the student (eval mode, no grad), w_s = ``base_weight`` ·
   (1 − s/S) fading linearly to 0 over the stage's S optimizer steps;
3. the student is updated with ``kd_divergence`` (default reverse KL, KL(q_S ‖ p_θ)) to the
   *updated* prompted teacher (eval mode, no grad).

``prompt_length 0`` drops the prompt and step 2: the student distils the teacher itself on its own
samples (TRL's GKD with lmbda 1: always on-policy), the on-policy baseline of PromptKD.

Every term is a pooled mean over the batch's response tokens (the eos included) at T = 1, through
:func:`kdengine.ops.linear_kd_loss` on the final hidden states and LM-head weights, so no [N, V]
logits are kept for the losses. ``linear_kd_loss`` gives gradients to either side: the prompted
teacher is its first ("student") argument in step 2, so the reverse KL reaches the prompt.
The prompted teacher's own forward still computes its full logits (PromptExperts runs the whole
model); the student's forward keeps one position (``logits_to_keep=1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdengine import generation, models
from kdengine.constants import IGNORE_INDEX
from kdengine.methods.base import STUDENT, OptimizerSpec, Stage
from kdengine.methods.baselines import NoKD
from kdengine.ops.linear_kd_loss import linear_kd_loss
from kdengine.options import ConfigError, MethodOptions, option

SFT = "sft"
TEACHER_PROMPT = "teacher_prompt"
STUDENT_DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
ONE_LOGIT = {"logits_to_keep": 1}       # a causal LM's forward computes one position's logits only
# Config fields of models whose logits are not final hidden states @ LM head (Gemma 2, Cohere).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale")


@dataclass
class PromptKDOptions(MethodOptions):
    """PromptKD's options; defaults are the reference scripts' (``scripts/*/promptkd/*.sh``;
    ``max_new_tokens``: its 512-token sequences less 256 prompt tokens), but for the sft stage,
    which the reference runs as a separate script."""

    prompt_length: int = option(7, "soft prompt tokens prepended to the frozen teacher (0: no prompt, the student "
                                   "distils the teacher itself on its own samples, as TRL's GKD with lmbda 1)")
    prompt_init_text: str = option("Suppose you are a student.", "text whose token embeddings (cycled or cut to "
                                                                 "prompt_length) initialise the teacher prompt")
    max_new_tokens: int = option(256, "most tokens the student samples per response (prompt + response are also "
                                      "kept within max_seq_length)")
    temperature: float = option(1.0, "sampling temperature of the student's responses")
    top_p: float = option(1.0, "nucleus sampling of the student's responses (1: off)")
    base_weight: float = option(1.0, "initial weight of the regulariser KL(prompted teacher || teacher without "
                                     "prompt); it fades linearly to 0 over the student stage (0: off)")
    kd_divergence: str = option("reverse_kl", "student loss against the prompted teacher: reverse_kl (PromptKD), "
                                              "forward_kl, or jsd (TRL GKD's generalised JSD with jsd_beta)",
                                STUDENT_DIVERGENCES)
    jsd_beta: float = option(0.5, "generalised JSD beta (TRL semantics: 0 forward KL, 1 reverse KL)")
    teacher_prompt_learning_rate: float | None = option(None, "learning rate of the teacher prompt (default: "
                                                              "learning_rate, as the reference)")
    sft_num_train_epochs: float = option(1.0, "epochs of the sft stage (cross-entropy on the reference responses) "
                                              "before PromptKD; 0 when the student is already fine-tuned")

    def validate(self) -> None:
        super().validate()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0 (0: no prompt), got {self.prompt_length}")
        if not self.prompt_init_text.strip():
            raise ValueError("prompt_init_text must not be empty")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("base_weight", "sft_num_train_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.teacher_prompt_learning_rate is not None and self.teacher_prompt_learning_rate <= 0:
            raise ValueError(f"teacher_prompt_learning_rate must be > 0, got {self.teacher_prompt_learning_rate}")


def base_weight_at(base_weight: float, global_step: int, total_steps: int) -> float:
    """The regulariser's weight after ``global_step`` of ``total_steps`` optimizer steps: linear to 0."""
    return base_weight * (1.0 - global_step / total_steps)


def response_hidden(model, inputs: dict, rows: torch.Tensor, **kwargs) -> torch.Tensor:
    """[N, H] final hidden states (after the last norm: what the LM head reads) of ``model(**inputs,
    **kwargs)`` at the N positions where ``rows`` (bool [B, L]) is True. A causal LM gets
    ``logits_to_keep=1`` (only one position's logits computed); the prompted teacher its expert."""
    return model(**inputs, output_hidden_states=True, **kwargs).hidden_states[-1][rows]


def lm_head(model) -> torch.Tensor:
    """[V, H] the LM-head weight of a causal LM."""
    return model.get_output_embeddings().weight


def pooled_kl(trained: torch.Tensor, trained_weight: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor,
              *, divergence: str = "reverse_kl", jsd_beta: float = 0.5, backend: str = "auto") -> torch.Tensor:
    """Mean over N response tokens of the divergence at T = 1, ``trained`` in ``kd_loss``'s student
    place: reverse_kl KL(trained ‖ target), forward_kl KL(target ‖ trained), jsd TRL's generalised
    JSD (β weighting the target).

    Args:
        trained: [N, H] hidden states of the side that gets gradients; trained_weight: [V, H] its LM head.
        target: [N, H'] hidden states of the other side; target_weight: [V, H'] its LM head (both
            detached: no gradient reaches the target, e.g. the student's head from the prompt's loss).
    Returns:
        fp32 scalar.
    """
    dtype = trained.dtype
    return linear_kd_loss(trained, trained_weight.to(dtype), teacher_hidden=target.detach().to(dtype),
                          teacher_weight=target_weight.detach().to(dtype), divergence=divergence, temperature=1.0,
                          jsd_beta=jsd_beta, backend=backend)


class PromptKD(NoKD):
    """PromptKD on ``causal_lm``: teacher prompt and student updated in turn on the student's samples."""

    name = "prompt_kd"
    options_class = PromptKDOptions
    uses_teacher = True
    tasks = ("causal_lm",)

    @classmethod
    def stage_names(cls, options) -> tuple[str, ...]:
        return (SFT, STUDENT) if options.sft_num_train_epochs > 0 else (STUDENT,)

    @classmethod
    def check_run(cls, run) -> None:
        """One teacher sharing the student's vocabulary, logits that are hidden states @ LM head, and room
        for the prompt beside max_seq_length."""
        if len(run.teacher_sources) != 1:
            raise ConfigError(f"prompt_kd distils one teacher, got {len(run.teacher_sources)}: "
                              f"{', '.join(run.teacher_sources)}")
        teacher, student = run.teacher_configs[0], run.student_config
        if teacher.vocab_size != student.vocab_size:
            raise ConfigError(f"prompt_kd needs one vocabulary: the teacher {run.teacher_sources[0]!r} has "
                              f"vocab_size {teacher.vocab_size} but the student has {student.vocab_size}")
        for role, config in (("teacher", teacher), ("student", student)):
            changed = [k for k in LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
            if changed:
                raise ConfigError(f"prompt_kd computes logits as final hidden states @ LM head, but the {role}'s "
                                  f"config transforms them ({', '.join(changed)}); such models are not supported")
        positions = models.text_positions(teacher)
        needed = run.args.max_seq_length + run.options.prompt_length
        if positions is not None and needed > positions:
            raise ConfigError(f"prompt_length={run.options.prompt_length} prompt tokens beside max_seq_length="
                              f"{run.args.max_seq_length} tokens need {needed} positions, but the teacher "
                              f"{run.teacher_sources[0]!r} has {positions}; lower max_seq_length to "
                              f"{positions - run.options.prompt_length} (or prompt_length)")

    # ------------------------------------------------------------------ stages
    def build_stage(self, name: str, student) -> Stage:
        args, opts = self.ctx.args, self.options
        if name == SFT:
            return Stage(SFT, {STUDENT: student}, args.learning_rate, opts.sft_num_train_epochs)
        for role, model in (("teacher", self.ctx.teacher), ("student", student)):
            if getattr(model.get_output_embeddings(), "bias", None) is not None:
                raise ValueError(f"prompt_kd computes logits as final hidden states @ LM head weight, but the "
                                 f"{role}'s LM head has a bias; such models are not supported")
        stage = super().build_stage(name, student)
        stage.schedule = "constant"
        if opts.prompt_length == 0:
            return stage
        from kdengine.experts import PromptExperts  # noqa: PLC0415

        stage.modules[TEACHER_PROMPT] = PromptExperts(self.ctx.teacher, 1, opts.prompt_length, kind="prompt",
                                                      placement="prepend", init=opts.prompt_init_text,
                                                      tokenizer=self.ctx.tokenizer, backend=args.kernel_backend)
        stage.optimizers = [OptimizerSpec(TEACHER_PROMPT, (TEACHER_PROMPT,), opts.teacher_prompt_learning_rate),
                            OptimizerSpec(STUDENT, (STUDENT,))]
        return stage

    # ------------------------------------------------------------------ one step
    def training_step(self, step, batch):
        if step.stage.name == SFT:
            return super().training_step(step, batch)
        opts, teacher = self.options, self.ctx.teacher
        inputs, rows = self._sample(step, batch)
        teacher.eval()
        logs = {"response_tokens": rows.sum(1).float().mean()}
        if TEACHER_PROMPT in step.modules:
            logs.update(self._update_prompt(step, inputs, rows))
            target_model, target_kwargs = step.modules[TEACHER_PROMPT].eval(), {"experts": _first_expert(rows)}
        else:                                      # prompt_length 0: on-policy KD from the teacher itself (GKD)
            target_model, target_kwargs = teacher, ONE_LOGIT
        with torch.no_grad(), step.accelerator.autocast():
            target = response_hidden(target_model, inputs, rows, **target_kwargs)
        # (3) the student toward the (updated prompted) teacher
        student = step.model.train()
        with step.accelerator.autocast():
            trained = response_hidden(student, inputs, rows, **ONE_LOGIT)
            loss = pooled_kl(trained, lm_head(step.accelerator.unwrap_model(student)), target, lm_head(teacher),
                             divergence=opts.kd_divergence, jsd_beta=opts.jsd_beta,
                             backend=self.ctx.args.kernel_backend)
        return loss, logs

    def _sample(self, step, batch) -> tuple[dict, torch.Tensor]:
        """(1) The student (eval mode, no grad) samples a response to each prompt of the batch.

        Returns ({"input_ids", "attention_mask"} [B, L'] of [prompt; response] right-padded, the
        bool [B, L'] positions whose next token is a response token, eos included)."""
        ctx, opts = self.ctx, self.options
        eos, pad = generation.eos_token_id(ctx.tokenizer), ctx.tokenizer.pad_token_id
        prompt_ids, prompt_mask, _ = generation.prompt_batch(batch["input_ids"], batch["labels"], pad)
        max_new = min(opts.max_new_tokens, ctx.args.max_seq_length - prompt_ids.shape[1])
        step.model.eval()
        with step.accelerator.autocast():
            response, keep = generation.sample_responses(step.accelerator.unwrap_model(step.model), prompt_ids,
                                                         prompt_mask, max_new_tokens=max_new,
                                                         temperature=opts.temperature, top_p=opts.top_p,
                                                         eos_token_id=eos, pad_token_id=pad)
        sampled = generation.response_batch(prompt_ids, prompt_mask, response, keep, pad)
        return ({"input_ids": sampled["input_ids"], "attention_mask": sampled["attention_mask"]},
                sampled["labels"] != IGNORE_INDEX)

    def _update_prompt(self, step, inputs: dict, rows: torch.Tensor) -> dict:
        """(2) One update of the teacher prompt: KL(p_θ ‖ q_S) + w · KL(p_θ ‖ p_0); returns its logs."""
        opts, teacher, backend = self.options, self.ctx.teacher, self.ctx.args.kernel_backend
        prompted = step.modules[TEACHER_PROMPT]
        with torch.no_grad(), step.accelerator.autocast():
            h_student = response_hidden(step.model, inputs, rows, **ONE_LOGIT)
            h_plain = response_hidden(teacher, inputs, rows, **ONE_LOGIT)
        prompted.train()
        with step.accelerator.autocast():
            h_prompted = response_hidden(prompted, inputs, rows, experts=_first_expert(rows))
            w_teacher = lm_head(teacher)
            prompt_kl = pooled_kl(h_prompted, w_teacher, h_student, lm_head(step.accelerator.unwrap_model(step.model)),
                                  backend=backend)
            weight = base_weight_at(opts.base_weight, step.global_step, step.total_steps)
            base_kl = pooled_kl(h_prompted, w_teacher, h_plain, w_teacher, backend=backend) if weight > 0 \
                else torch.zeros((), device=h_prompted.device)
            teacher_loss = prompt_kl + weight * base_kl
        step.update(teacher_loss, TEACHER_PROMPT)
        return {"teacher_loss": teacher_loss.detach(), "prompt_kl": prompt_kl.detach(), "base_kl": base_kl.detach(),
                "base_weight": torch.tensor(weight, device=rows.device)}


def _first_expert(rows: torch.Tensor) -> torch.Tensor:
    """[B] int64 zeros: every row runs the one prompt of the teacher's PromptExperts."""
    return torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
