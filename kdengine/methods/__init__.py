"""Distillation methods: each is one module with a :class:`~kdengine.methods.base.Method` subclass.

``REGISTRY`` is the one list of the built-in methods (short name -> ``module:Class``, imported on
use). :func:`resolve_method` also accepts ``package.module:ClassName``, so a method can live
outside the package (``--method examples.custom_method:HiddenStateKD``).
"""

from __future__ import annotations

import difflib
import importlib

from kdengine.options import ConfigError

REGISTRY = {
    "no_kd": "kdengine.methods.baselines:NoKD",
    "vanilla_kd": "kdengine.methods.baselines:VanillaKD",
    "pee_kd": "kdengine.methods.pee_kd:PEEKD",
    "mt_bert": "kdengine.methods.mt_bert:MTBERT",
    "meta_kd": "kdengine.methods.meta_kd:MetaKD",
    "prompt_kd": "kdengine.methods.prompt_kd:PromptKD",
    "sft": "kdengine.methods.baselines:NoKD",       # no_kd under its causal-LM name
}


def resolve_method(name: str) -> type:
    """The Method class of ``name``: a key of ``REGISTRY`` or ``package.module:ClassName``.

    Raises ConfigError: an unknown short name (closest names suggested), a module that does not
    import, a missing class, or a class that is not a Method subclass.
    """
    from kdengine.methods.base import Method  # noqa: PLC0415

    if ":" in name:
        module_name, _, class_name = name.partition(":")
    elif name in REGISTRY:
        module_name, class_name = REGISTRY[name].split(":")
    else:
        close = difflib.get_close_matches(name, REGISTRY, n=2, cutoff=0.5)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint}; built-in methods: {', '.join(REGISTRY)}, or pass "
                          f"package.module:ClassName of your own Method subclass")
    if not module_name or not class_name or "." in class_name:
        raise ConfigError(f"method {name!r}: expected package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"method {name!r}: module {module_name!r} does not import ({type(exc).__name__}: "
                          f"{exc}); is its directory on PYTHONPATH (the current directory for python -m)?") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"method {name!r}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls is Method:
        raise ConfigError(f"method {name!r}: {module_name}.{class_name} is not a kdengine.methods.base.Method "
                          f"subclass")
    return cls


def builtin_methods() -> dict[str, type]:
    """{short name: Method class} of every built-in method."""
    return {name: resolve_method(name) for name in REGISTRY}
