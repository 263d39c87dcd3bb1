"""kdengine.compat: both transformers API generations for key/value caches, with one installed version.

transformers < 5.24 takes and returns ``past_key_values``; 5.24 renamed both to ``cache``. Tiny real
models of the installed version cover the installed generation; ``respell`` turns any of them into
a model whose forward (task model and base model) accepts **only** one spelling, rejects the other
with a TypeError, and returns its cache under that spelling, so both generations are exercised
whichever one is installed. Prefix experts (forward and the vocab init), the shared-input path and
the compat functions themselves must give the same results under either spelling.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.utils import ModelOutput

from kdengine import compat
from kdengine.experts import PromptExperts
from kdengine.experts.shared_input import shared_input_forward
from tests.tolerances import assert_close

F64 = torch.float64
VOCAB, K, P = 97, 3, 4
SPELLINGS = compat.CACHE_NAMES
ARCHS = ("bert_seq", "bert_tok", "roberta", "bert_2layer_student", "gpt2", "llama")
_INSIDE = contextvars.ContextVar("inside_respelled_forward", default=False)


def make_model(arch: str):
    torch.manual_seed(0)
    encoder = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                   max_position_embeddings=64, num_labels=3)
    if arch == "bert_seq":
        model = BertForSequenceClassification(BertConfig(num_hidden_layers=2, **encoder))
    elif arch == "bert_tok":
        model = BertForTokenClassification(BertConfig(num_hidden_layers=2, **encoder))
    elif arch == "bert_2layer_student":  # a DistilBERT-style layer-reduced BERT (student_num_layers)
        model = BertForSequenceClassification(BertConfig(num_hidden_layers=1, **encoder))
    elif arch == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(num_hidden_layers=2, pad_token_id=1, **encoder))
    elif arch == "gpt2":
        model = AutoModelForCausalLM.from_config(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                       eos_token_id=2))
    else:
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return model.to(F64).eval()


# ---------------------------------------------------------------- the spelling wrappers
@functools.lru_cache(maxsize=None)
def _respelled_output_class(cls: type, old: str, new: str) -> type:
    """A plain dataclass with ``cls``'s fields, ``old`` renamed ``new``. Not a ModelOutput: on 5.24+
    ModelOutput maps a ``past_key_values`` keyword and attribute onto ``cache`` by itself."""
    fields = [(new if f.name == old else f.name, f.type, dataclasses.field(default=None))
              for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(cls.__name__, fields)


def _respell_output(out, old: str, new: str):
    if old == new or not dataclasses.is_dataclass(out) or old not in {f.name for f in dataclasses.fields(out)}:
        return out
    values = {(new if f.name == old else f.name): getattr(out, f.name) for f in dataclasses.fields(out)}
    return _respelled_output_class(type(out), old, new)(**values)


def _respelled_class(cls: type, spelling: str, installed: str) -> type:
    """A subclass of ``cls`` whose forward takes the cache only as ``spelling`` and returns it so."""
    other = next(name for name in SPELLINGS if name != spelling)
    original = cls.forward

    def forward(self, *args, **kwargs):
        if _INSIDE.get():  # the wrapped task model calling its base model: the installed API
            return original(self, *args, **kwargs)
        if other in kwargs:
            raise TypeError(f"{cls.__name__}.forward() got an unexpected keyword argument '{other}'")
        if spelling in kwargs:
            kwargs[installed] = kwargs.pop(spelling)
        token = _INSIDE.set(True)
        try:
            out = original(self, *args, **kwargs)
        finally:
            _INSIDE.reset(token)
        return _respell_output(out, installed, spelling)

    params = [p.replace(name=spelling) if p.name == installed else p
              for p in inspect.signature(original).parameters.values() if p.name != other or installed == other]
    forward.__signature__ = inspect.Signature(params)
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


def respell(model, spelling: str):
    """``model`` (in place) with a forward that accepts the cache only as ``spelling``."""
    installed = compat.cache_argument(model)
    for module in {id(m): m for m in (model, model.base_model)}.values():
        module.__class__ = _respelled_class(type(module), spelling, installed)
    return model


# ---------------------------------------------------------------- resolution
@pytest.mark.parametrize("arch", ARCHS)
def test_installed_models_resolve_to_a_spelling_their_base_declares(arch):
    model = make_model(arch)
    name = compat.cache_argument(model)
    assert name in SPELLINGS
    assert name in inspect.signature(type(model.base_model).forward).parameters
    assert compat.cache_argument(model.base_model) == name


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_wrappers_resolve_to_their_spelling(arch, spelling):
    model = respell(make_model(arch), spelling)
    assert compat.cache_argument(model) == spelling
    assert compat.cache_argument(model.base_model) == spelling
    other = next(name for name in SPELLINGS if name != spelling)
    with pytest.raises(TypeError, match=other):  # the wrapper really refuses the other spelling
        model.base_model(input_ids=torch.ones(1, 2, dtype=torch.long), **{other: None})


def test_a_model_without_cache_gets_a_clear_error():
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=48, max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"DistilBertForSequenceClassification \(distilbert\) cannot take a "
                                         r"key/value cache"):
        compat.cache_argument(model)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_returned_cache_reads_either_field(spelling):
    model = respell(make_model("gpt2"), spelling)
    out = model.base_model(input_ids=torch.randint(0, VOCAB, (2, 5)), use_cache=True)
    assert spelling in {f.name for f in dataclasses.fields(out)}
    keys, values = compat.cache_layer(compat.returned_cache(out), 0)
    assert keys.shape == values.shape == (2, 4, 5, 8)


def test_returned_cache_error_names_the_output_class():
    @dataclasses.dataclass
    class NoCacheOutput(ModelOutput):
        logits: torch.Tensor | None = None

    with pytest.raises(ValueError, match="NoCacheOutput carries no key/value cache"):
        compat.returned_cache(NoCacheOutput(logits=torch.zeros(1)))


# ---------------------------------------------------------------- the callers match across spellings
def _prefix_logits(model, ids, mask):
    experts = PromptExperts(model, K, P, kind="prefix", init="vocab", seed=5)
    with torch.no_grad():
        experts.prompts.add_(0.1 * torch.randn(experts.prompts.shape, dtype=F64,
                                               generator=torch.Generator().manual_seed(3)))
    return experts(ids, mask).logits, experts.prompts.detach().clone()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_experts_match_across_spellings(arch):
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB, (3, 6), generator=gen)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    want, want_init = _prefix_logits(make_model(arch), ids, mask)
    assert torch.isfinite(want).all()
    for spelling in SPELLINGS:
        got, got_init = _prefix_logits(respell(make_model(arch), spelling), ids, mask)
        assert_close(got_init, want_init, F64, msg=f"vocab-init prefix, {spelling}")
        assert_close(got, want, F64, msg=f"prefix expert logits, {spelling}")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_input_matches_across_spellings(arch):
    gen = torch.Generator().manual_seed(4)
    prompts = torch.randn(K, P, 32, generator=gen, dtype=F64)
    x = torch.randint(0, VOCAB, (2, 5), generator=gen)
    x_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    y = torch.randint(0, VOCAB, (2, 3), generator=gen)
    want = shared_input_forward(make_model(arch), prompts, x, x_mask, response_ids=y)
    for spelling in SPELLINGS:
        got = shared_input_forward(respell(make_model(arch), spelling), prompts, x, x_mask, response_ids=y)
        assert_close(got, want, F64, msg=f"shared-input logits, {spelling}")


def test_prefix_experts_use_the_current_spelling_without_deprecation_warnings():
    model = make_model("gpt2")
    experts = PromptExperts(model, K, P, kind="prefix")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        experts(torch.randint(0, VOCAB, (2, 4)))
