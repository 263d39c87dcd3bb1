"""Distillation methods: each is one module that plugs into the trainer (see ``base.Method``).

The registry maps the ``method`` option to a module; modules are imported on use.
"""

import importlib

REGISTRY = {
    "no_kd": "kdengine.methods.baselines:NoKD",
    "vanilla_kd": "kdengine.methods.baselines:VanillaKD",
    "pee_kd": "kdengine.methods.pee_kd:PEEKD",
}


def get_method_class(name: str):
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
