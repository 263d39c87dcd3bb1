"""K soft-prompt experts on one frozen transformers backbone, run as one batched forward.

``PromptExperts`` wraps a sequence-classification, token-classification or causal-LM model:

* ``kind="prompt"``: the experts are ``[K, P, H]`` input embeddings, built into the batch by
  :func:`kdengine.ops.expert_batch_embed` (prepended: positions 0..P-1, then the text; or
  appended right after each example's last real token).
* ``kind="prefix"``: P-tuning v2 deep prompts as in the PEE-KD code, a ``[K, P, layers·2·kv]``
  parameter viewed as per-layer keys/values (``kv`` = key/value heads × head dim) and passed as a
  ``DynamicCache``; dropout on the prefix key/values in train mode only. Keys/values are shaped
  and dropped out once per forward for the K experts, then indexed per row, so all rows of one
  expert share a dropout mask (PEE-KD drew one per example). On encoders the text keeps
  position ids 0..L-1 (transformers, and so P-tuning v2, would start them at P: a shift a
  fine-tuned encoder has never seen; on the synthetic task it cost a 0.89-accuracy teacher 20
  points before any training); causal LMs continue at P.

Sequence classification uses the model's own pooling on the full sequence: with a prepended
prompt, BERT's pooler reads position 0, the first prompt vector (as P-tuning does); with a
prefix or an appended prompt the text's [CLS] stays first. Token-level and LM logits (and hidden
states) are aligned to the original input tokens: prompt positions are removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from kdengine import compat, models
from kdengine.ops.expert_batch_embed import check_values, expert_batch_embed, source_positions, text_positions
from kdengine.reference.expert_batch_embed import insert_offsets, row_tables

KINDS = ("prompt", "prefix")
TASKS = {
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",
}
HEAD_NAMES = ("classifier", "score")


@dataclass
class PromptExpertsOutput(ModelOutput):
    """``logits``: [K, B, ...] (all experts), [B, ...] (experts [B]) or [B, k, ...] (experts [B, k]);
    ``hidden_states``: a tuple of [rows..., L, H] with prompt positions removed, when requested."""

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def model_task(model) -> str:
    """The task family of a transformers model, from its class name (ValueError when unsupported)."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model; PromptExperts wraps encoders (sequence/token "
            "classification) and decoder-only causal LMs"
        )
    for suffix, task in TASKS.items():
        if name.endswith(suffix):
            return task
    raise ValueError(
        f"{name} is not supported: PromptExperts wraps *ForSequenceClassification, "
        "*ForTokenClassification and causal LMs (*ForCausalLM / *LMHeadModel)"
    )


def attention_geometry(config) -> tuple[int, int, int]:
    """``(layers, key/value heads, head dim)`` of a decoder or encoder config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


class PromptExperts(torch.nn.Module):
    """K prompt experts sharing one frozen backbone (and one task head).

    Args:
        model: a transformers ``*ForSequenceClassification``, ``*ForTokenClassification`` or causal
            LM. Its parameters are frozen (``requires_grad=False``) except the head when trained.
        num_experts: K >= 1.
        num_virtual_tokens: P >= 1 prompt vectors per expert.
        kind: ``prompt`` (input embeddings) or ``prefix`` (per-layer key/values, P-tuning v2).
        placement: ``prepend`` or ``append`` (``kind="prompt"`` only).
        init: ``vocab`` (embeddings of random vocabulary tokens; for ``prefix``: the backbone's own
            key/values of random vocabulary tokens), ``random`` (normal with the embedding
            table's std; for ``prefix``: N(0, 1) as P-tuning v2's nn.Embedding), or an init text
            (``kind="prompt"``, needs ``tokenizer``): its token embeddings, cycled/truncated to P,
            initialise every expert.
        tokenizer: tokenizer of the backbone, for a text ``init``.
        train_head: keep the task head (``classifier``/``score``) trainable and shared by the
            experts. Default True for classification models, False for causal LMs.
        shared_input: causal LM + ``append`` + ``prompt`` only (default True there): run the
            experts through ``kdengine.experts.shared_input.shared_input_forward`` (x computed once).
        prefix_dropout: dropout probability on the prefix key/values (default the backbone's
            ``hidden_dropout_prob``, else 0).
        seed: seeds the initialisation (a private generator); None uses the global RNG.
        backend: backend of ``expert_batch_embed``.
    """

    def __init__(
        self,
        model,
        num_experts: int,
        num_virtual_tokens: int,
        *,
        kind: str = "prompt",
        placement: str = "prepend",
        init: str = "vocab",
        tokenizer=None,
        train_head: bool | None = None,
        shared_input: bool | None = None,
        prefix_dropout: float | None = None,
        seed: int | None = None,
        backend: str | None = "auto",
    ):
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if (
            isinstance(num_virtual_tokens, bool)
            or not isinstance(num_virtual_tokens, int)
            or num_virtual_tokens < 1
        ):
            raise ValueError(f"num_virtual_tokens must be an int >= 1, got {num_virtual_tokens!r}")
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        if placement not in ("prepend", "append"):
            raise ValueError(f"unknown placement {placement!r}; expected 'prepend' or 'append'")
        if kind == "prefix" and placement != "prepend":
            raise ValueError(
                "kind='prefix' puts key/values in front of every layer; placement must be 'prepend'"
            )
        if not isinstance(init, str) or not init:
            raise ValueError("init must be 'vocab', 'random' or a non-empty init text")
        self.task = model_task(model)
        self.model = model
        self.kind, self.placement, self.backend = kind, placement, backend
        self.init, self.init_text = init, None
        self.tokenizer_name = getattr(tokenizer, "name_or_path", None) or None
        self.train_head = self.task != "causal_lm" if train_head is None else bool(train_head)
        appended_lm = self.task == "causal_lm" and placement == "append" and kind == "prompt"
        if shared_input and not appended_lm:
            raise ValueError(
                "shared_input=True needs a causal LM with kind='prompt' and placement='append' "
                "(the input x is shared only when the prompt comes after it)"
            )
        self.shared_input = appended_lm if shared_input is None else bool(shared_input)
        self.head = self._find_head() if self.train_head else None
        for p in model.parameters():
            p.requires_grad_(False)
        if self.head is not None:
            for p in self.head.parameters():
                p.requires_grad_(True)

        config = model.config
        self.hidden_size = model.get_input_embeddings().weight.shape[1]
        self.num_layers, self.kv_heads, self.head_dim = attention_geometry(config)
        if kind == "prefix":
            self._check_prefix_support()
            p = getattr(config, "hidden_dropout_prob", 0.0) if prefix_dropout is None else prefix_dropout
            self.prefix_dropout = torch.nn.Dropout(float(p))
            width = self.num_layers * 2 * self.kv_heads * self.head_dim
        else:
            self.prefix_dropout = None
            width = self.hidden_size
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        weight = model.get_input_embeddings().weight
        prompts = self._initial_prompts(
            init, tokenizer, weight.detach(), num_experts, num_virtual_tokens, width, generator
        )
        # Trainable prompts stay fp32 on a half-precision backbone (float64 on a float64 one).
        master = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.prompts = torch.nn.Parameter(prompts.to(device=weight.device, dtype=master))

    # ---- construction helpers ----
    def _find_head(self):
        if self.task == "causal_lm":
            head = self.model.get_output_embeddings()
            if head is None:
                raise ValueError(f"{type(self.model).__name__} has no output embeddings to train")
            return head
        for name in HEAD_NAMES:
            head = getattr(self.model, name, None)
            if isinstance(head, torch.nn.Module):
                return head
        raise ValueError(
            f"{type(self.model).__name__} has no task head named {' or '.join(HEAD_NAMES)}; "
            "pass train_head=False"
        )

    def _check_prefix_support(self) -> None:
        try:
            compat.cache_argument(self.model)
        except ValueError as exc:
            raise ValueError(f"{exc}, so it cannot take prefix key/values; use kind='prompt'") from None

    def _initial_prompts(self, init, tokenizer, weight, k, plen, width, generator) -> torch.Tensor:
        if self.kind == "prefix":
            if init not in ("vocab", "random"):
                raise ValueError(
                    "kind='prefix' supports init='vocab' (the backbone's own key/values of random "
                    "vocabulary tokens) or 'random' (N(0, 1), as P-tuning v2); an init text needs "
                    "kind='prompt'"
                )
            if init == "random":
                return torch.randn(k, plen, width, generator=generator)
            return self._vocab_prefix(weight.shape[0], k, plen, generator)
        if init == "vocab":
            ids = torch.randint(0, weight.shape[0], (k, plen), generator=generator)
            return weight[ids.to(weight.device)].float()
        if init == "random":
            return torch.randn(k, plen, width, generator=generator) * weight.float().std().item()
        if tokenizer is None:
            raise ValueError(
                f"init={init!r} is an init text: pass tokenizer= to tokenize it (or use init='vocab' "
                "or 'random')"
            )
        ids = tokenizer(init, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"init text {init!r} tokenizes to no tokens")
        ids = (ids * math.ceil(plen / len(ids)))[:plen]
        self.init_text = init
        return weight[torch.tensor(ids, device=weight.device)].float().unsqueeze(0).repeat(k, 1, 1)

    @torch.no_grad()
    def _vocab_prefix(self, vocab: int, k: int, plen: int, generator) -> torch.Tensor:
        """Prefix init from the frozen backbone itself: the per-layer key/values it computes for
        P random vocabulary tokens (one draw per expert). Unlike N(0, 1) these are in the
        distribution the attention layers were trained on, so a fresh expert starts close to the
        backbone's own behaviour. Layout [K, P, layers·2·kv_heads·head_dim] as prefix_key_values."""
        device = self.model.get_input_embeddings().weight.device
        ids = torch.randint(0, vocab, (k, plen), generator=generator).to(device)
        cache = compat.new_cache(self.model.config)
        base = self.model.base_model
        was_training = self.model.training
        self.model.eval()
        base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **compat.cache_kwargs(base, cache))
        self.model.train(was_training)
        layers = [compat.cache_layer(cache, i) for i in range(self.num_layers)]
        kv = torch.stack([t for pair in layers for t in pair])          # [2·layers, K, heads, P, dim]
        return kv.permute(1, 3, 0, 2, 4).reshape(k, plen, -1).float().cpu()

    # ---- public API ----
    @property
    def num_experts(self) -> int:
        return self.prompts.shape[0]

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompts.shape[1]

    def prompt_parameters(self) -> list[torch.nn.Parameter]:
        return [self.prompts]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        head = [] if self.head is None else [p for p in self.head.parameters() if p.requires_grad]
        return [self.prompts, *head]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        experts: torch.Tensor | None = None,
        *,
        response_ids: torch.Tensor | None = None,
        response_attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
        **model_kwargs,
    ) -> PromptExpertsOutput:
        """Run the experts on a batch.

        Args:
            input_ids: [B, L] token ids; attention_mask: [B, L] 0/1 (right padding for ``append``).
            experts: None (all K experts: logits [K, B, ...]), [B] integer (one expert per example:
                [B, ...]) or [B, k] ([B, k, ...]).
            response_ids, response_attention_mask, last_only: causal LM with ``placement="append"``:
                the sequence is [x; P_k; y]; logits cover x's and y's positions ([..., Lx+Ly, V]) or,
                with ``last_only``, the last real response token (the last prompt position when there
                is no response): [..., V].
            model_kwargs: passed to the backbone (``token_type_ids`` [B, L] is expanded to the rows;
                ``output_hidden_states=True`` returns hidden states with prompt positions removed).
        """
        self._check_forward_args(
            input_ids, attention_mask, experts, response_ids, response_attention_mask, last_only, model_kwargs
        )
        if self.task == "causal_lm" and self.placement == "append":
            return self._appended_lm_forward(
                input_ids, attention_mask, experts, response_ids, response_attention_mask, last_only
            )
        if self.kind == "prefix":
            return self._prefix_forward(input_ids, attention_mask, experts, model_kwargs)
        return self._prompt_forward(input_ids, attention_mask, experts, model_kwargs)

    # ---- forward paths ----
    def _check_forward_args(
        self, input_ids, attention_mask, experts, response_ids, response_mask, last_only, model_kwargs
    ) -> None:
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype.is_floating_point
        ):
            raise ValueError("input_ids must be an integer tensor [B, L]")
        for key in ("inputs_embeds", "labels", *compat.CACHE_NAMES):
            if key in model_kwargs:
                raise ValueError(
                    f"{key} is not accepted by PromptExperts.forward: it builds the inputs itself "
                    "(compute losses from the returned logits)"
                )
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}"
            )
        if experts is not None:
            if (
                not isinstance(experts, torch.Tensor)
                or experts.dtype.is_floating_point
                or experts.dtype == torch.bool
            ):
                raise ValueError("experts must be an integer tensor [B] or [B, k]")
            if experts.dim() not in (1, 2) or experts.shape[0] != input_ids.shape[0] or experts.numel() == 0:
                raise ValueError(
                    f"experts must have shape [B]=[{input_ids.shape[0]}] or [B, k], got "
                    f"{tuple(experts.shape)}"
                )
            if int(experts.min()) < 0 or int(experts.max()) >= self.num_experts:
                raise ValueError(
                    f"experts must lie in [0, {self.num_experts}), got "
                    f"[{int(experts.min())}, {int(experts.max())}]"
                )
        appended_lm = self.task == "causal_lm" and self.placement == "append"
        if (response_ids is not None or response_mask is not None or last_only) and not appended_lm:
            raise ValueError(
                "response_ids / response_attention_mask / last_only need a causal LM with placement='append'"
            )
        if response_ids is not None:
            if response_ids.dim() != 2 or response_ids.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"response_ids must be [B={input_ids.shape[0]}, Ly], got {tuple(response_ids.shape)}"
                )
            if response_mask is not None and tuple(response_mask.shape) != tuple(response_ids.shape):
                raise ValueError("response_attention_mask must have the shape of response_ids")
        elif response_mask is not None:
            raise ValueError("response_attention_mask given without response_ids")
        if appended_lm and model_kwargs:
            raise ValueError(
                f"the appended causal-LM path takes no extra model arguments, got {sorted(model_kwargs)}"
            )
        if self.kind == "prompt":  # input prompts take positions; a deep prefix adds keys/values only
            positions = models.text_positions(self.model.config)
            tokens = input_ids.shape[1] + (0 if response_ids is None else response_ids.shape[1])
            if positions is not None and tokens + self.num_virtual_tokens > positions:
                raise ValueError(
                    f"{tokens} input tokens and {self.num_virtual_tokens} prompt tokens need "
                    f"{tokens + self.num_virtual_tokens} positions but {type(self.model).__name__} has {positions}: "
                    f"shorten the inputs to {positions - self.num_virtual_tokens} tokens, or use kind='prefix'"
                )
        else:  # the prompt path checks ids in expert_batch_embed; the prefix path embeds them directly
            vocab = self.model.get_input_embeddings().num_embeddings
            check_values(input_ids, vocab, None, None, self.num_experts, "prepend")

    def _rows(self, batch, experts, device):
        return row_tables(batch, self.num_experts, experts, device)

    def _unflatten(self, x: torch.Tensor, batch: int, experts) -> torch.Tensor:
        """[R, ...] rows -> [K, B, ...] / [B, ...] / [B, k, ...]."""
        if experts is None:
            return x.reshape(self.num_experts, batch, *x.shape[1:])
        if experts.dim() == 2:
            return x.reshape(batch, experts.shape[1], *x.shape[1:])
        return x

    def _row_kwargs(self, model_kwargs, row_example, is_prompt=None, token_pos=None) -> dict:
        """Expand per-example backbone arguments to the rows (token_type_ids: 0 on prompt slots)."""
        kwargs = dict(model_kwargs)
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            token_types = token_types[row_example]
            if is_prompt is not None:
                token_types = torch.where(
                    is_prompt, torch.zeros_like(token_pos), token_types.gather(1, token_pos)
                )
            kwargs["token_type_ids"] = token_types
        return kwargs

    def _prompt_forward(self, input_ids, attention_mask, experts, model_kwargs) -> PromptExpertsOutput:
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, mask = expert_batch_embed(
            input_ids,
            self.model.get_input_embeddings().weight,
            self.prompts,
            attention_mask=attention_mask,
            experts=experts,
            placement=self.placement,
            backend=self.backend,
        )
        row_example, _ = self._rows(batch, experts, input_ids.device)
        insert = insert_offsets(attention_mask, row_example, self.placement)
        is_prompt, token_pos = source_positions(length, self.num_virtual_tokens, insert)
        kwargs = self._row_kwargs(model_kwargs, row_example, is_prompt, token_pos)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        text = text_positions(length, self.num_virtual_tokens, insert)

        def strip(x):
            return x.gather(1, text.view(*text.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))

        logits = out.logits if self.task == "sequence_classification" else strip(out.logits)
        hidden = getattr(out, "hidden_states", None)
        if hidden is not None:
            hidden = tuple(self._unflatten(strip(h), batch, experts) for h in hidden)
        return PromptExpertsOutput(logits=self._unflatten(logits, batch, experts), hidden_states=hidden)

    def prefix_key_values(self, row_expert: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(key, value)`` [R, kv_heads, P, head_dim] of each row's expert.

        The K experts' key/values are viewed and dropped out once, then indexed per row.
        """
        k, plen, _ = self.prompts.shape
        dtype = self.model.get_input_embeddings().weight.dtype
        kv = self.prompts.to(dtype).view(k, plen, 2 * self.num_layers, self.kv_heads, self.head_dim)
        kv = self.prefix_dropout(kv).permute(2, 0, 3, 1, 4)[:, row_expert]  # [2·layers, R, heads, P, dim]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]

    def _prefix_cache(self, row_expert):
        cache = compat.new_cache(self.model.config)
        for layer, (key, value) in enumerate(self.prefix_key_values(row_expert)):
            cache.update(key, value, layer)
        return cache

    def _prefix_forward(self, input_ids, attention_mask, experts, model_kwargs) -> PromptExpertsOutput:
        batch, _ = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        row_example, row_expert = self._rows(batch, experts, input_ids.device)
        mask = attention_mask[row_example]
        mask = torch.cat(
            [torch.ones(mask.shape[0], self.num_virtual_tokens, dtype=mask.dtype, device=mask.device), mask],
            dim=1,
        )
        kwargs = self._row_kwargs(model_kwargs, row_example)
        if self.task != "causal_lm" and "position_ids" not in kwargs:
            # An encoder prefix is key/value only: the text keeps positions 0..L-1 (transformers
            # would offset them by P, which a fine-tuned encoder does not expect).
            kwargs["position_ids"] = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        out = self.model(
            input_ids=input_ids[row_example],
            attention_mask=mask,
            **compat.cache_kwargs(self.model, self._prefix_cache(row_expert)),
            **kwargs,
        )
        hidden = getattr(out, "hidden_states", None)
        if hidden is not None:
            hidden = tuple(self._unflatten(h, batch, experts) for h in hidden)
        return PromptExpertsOutput(logits=self._unflatten(out.logits, batch, experts), hidden_states=hidden)

    def _appended_lm_forward(
        self, input_ids, attention_mask, experts, response_ids, response_mask, last_only
    ) -> PromptExpertsOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if response_ids is not None and response_mask is None:
            response_mask = torch.ones_like(response_ids)
        if self.shared_input:
            from kdengine.experts.shared_input import shared_input_forward  # noqa: PLC0415

            logits = shared_input_forward(
                self.model,
                self.prompts,
                input_ids,
                attention_mask,
                experts=experts,
                response_ids=response_ids,
                response_attention_mask=response_mask,
                last_only=last_only,
            )
            return PromptExpertsOutput(logits=logits)
        return PromptExpertsOutput(
            logits=self._naive_appended_logits(
                input_ids, attention_mask, experts, response_ids, response_mask, last_only
            )
        )

    def _naive_appended_logits(
        self, input_ids, attention_mask, experts, response_ids, response_mask, last_only
    ):
        """[x; P_k; y] rows through the whole model; positions from the cumulative attention mask."""
        batch, length = input_ids.shape
        plen = self.num_virtual_tokens
        weight = self.model.get_input_embeddings().weight
        embeds, mask = expert_batch_embed(
            input_ids,
            weight,
            self.prompts,
            attention_mask=attention_mask,
            experts=experts,
            placement="append",
            backend=self.backend,
        )
        row_example, _ = self._rows(batch, experts, input_ids.device)
        insert = insert_offsets(attention_mask, row_example, "append")
        resp_len = 0 if response_ids is None else response_ids.shape[1]
        if resp_len:
            embeds = torch.cat(
                [embeds, torch.nn.functional.embedding(response_ids, weight)[row_example]], dim=1
            )
            mask = torch.cat([mask, response_mask[row_example].to(mask.dtype)], dim=1)
        position_ids = (mask.long().cumsum(1) - 1).clamp_min(0)
        logits = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
        device = input_ids.device
        if last_only:
            last = insert + plen - 1
            if resp_len:
                n_resp = response_mask.long().sum(1)[row_example]
                last = torch.where(n_resp > 0, length + plen + n_resp - 1, last)
            picked = logits[torch.arange(logits.shape[0], device=device), last]
            return self._unflatten(picked, batch, experts)
        text = text_positions(length, plen, insert)
        resp = (length + plen + torch.arange(resp_len, device=device)).unsqueeze(0).expand(text.shape[0], -1)
        index = torch.cat([text, resp], dim=1)
        picked = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return self._unflatten(picked, batch, experts)

    # ---- persistence ----
    def save_pretrained(self, directory: str) -> None:
        """Write the experts (and the trained head) to ``directory`` atomically: safetensors + JSON."""
        from kdengine.experts.serialization import save_experts  # noqa: PLC0415

        save_experts(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, model, **kwargs) -> PromptExperts:
        """Load experts saved by :meth:`save_pretrained` onto ``model`` (a fresh copy of the backbone).

        ``kwargs`` override constructor options that are not stored (``backend``, ``shared_input``).
        """
        from kdengine.experts.serialization import load_experts  # noqa: PLC0415

        return load_experts(cls, directory, model, **kwargs)
