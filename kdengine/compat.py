"""The one place that knows how the installed transformers passes key/value caches.

transformers 5.24 renamed the model forward argument ``past_key_values`` to ``cache`` (BERT-family
encoders accept only the new name; GPT-2 and Llama still take the old one with a deprecation
warning) and moved the returned attribute with it. Older releases know only ``past_key_values``.
Every kdengine caller that hands a model a cache or reads one back goes through this module:

* :func:`cache_argument` — the keyword a model class's forward takes its cache by, resolved once per
  class from its signature (a task model whose forward only forwards ``**kwargs`` is resolved
  through its ``base_model``); :func:`cache_kwargs` builds ``{name: cache}``.
* :func:`returned_cache` — the cache a model output carries, under whichever name the output class
  declares, resolved once per output class.
* :func:`new_cache` — an empty ``DynamicCache`` for a model config.

A model that takes no cache at all (DistilBERT, say) gets a ``ValueError`` naming the model.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch

# Newest spelling first: a forward that names both takes the new one without a warning.
CACHE_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _named_cache_argument(cls: type) -> str | None:
    """The cache keyword ``cls.forward`` declares by name, or None."""
    parameters = inspect.signature(cls.forward).parameters
    return next((name for name in CACHE_NAMES if name in parameters), None)


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword ``model``'s forward takes a key/value cache by: ``"cache"`` or ``"past_key_values"``.

    Resolved from the signature of ``type(model).forward`` (cached per class); a task model whose
    forward declares neither (it passes ``**kwargs`` through) takes its ``base_model``'s name.
    Raises ValueError when neither the model nor its base model declares one.
    """
    name = _named_cache_argument(type(model))
    if name is not None:
        return name
    base = getattr(model, "base_model", model)
    if base is not model:
        name = _named_cache_argument(type(base))
        if name is not None:
            return name
    kind = getattr(getattr(model, "config", None), "model_type", "?")
    raise ValueError(
        f"{type(model).__name__} ({kind}) cannot take a key/value cache: its forward has neither "
        f"of {' / '.join(CACHE_NAMES)}"
    )


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{cache_argument(model): cache}``, to splat into ``model(...)``."""
    return {cache_argument(model): cache}


@functools.lru_cache(maxsize=None)
def _output_cache_field(cls: type) -> str:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for name in CACHE_NAMES:
        if name in names:
            return name
    raise ValueError(f"{cls.__name__} carries no key/value cache (no field among {', '.join(CACHE_NAMES)}); "
                     "call the model with use_cache=True")


def returned_cache(output):
    """The key/value cache in a transformers model output (``output.cache`` or
    ``output.past_key_values``, by the output class's declared fields, cached per class)."""
    return getattr(output, _output_cache_field(type(output)))


def new_cache(config):
    """An empty ``transformers.DynamicCache`` for ``config`` (layer types from the config)."""
    from transformers import DynamicCache  # noqa: PLC0415

    return DynamicCache(config=config)


def cache_layer(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` [B, kv_heads, T, head_dim] of one layer of a ``DynamicCache``."""
    entry = cache.layers[layer]
    return entry.keys, entry.values
