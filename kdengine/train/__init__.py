"""The kdengine trainer: ``python -m kdengine.train`` (see :mod:`kdengine.train.__main__`).

Modules: ``trainer`` (the loop on accelerate), ``teacher`` (teacher preparation),
``checkpoint`` (atomic checkpoints and resume), ``reporting`` (metrics.jsonl, TensorBoard,
result JSONs, the comparison table). Options live in :mod:`kdengine.config`.
"""
