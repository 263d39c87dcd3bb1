"""The kdengine trainer: ``python -m kdengine.train`` (see :mod:`kdengine.train.__main__`).

Modules: ``trainer`` (the one loop on accelerate, for every stage of every method), ``stages``
(running a method's stage: resumable, atomic output), ``teacher`` (teacher preparation),
``checkpoint`` (atomic checkpoints and resume), ``state_file`` (optimizer, scheduler and RNG states
as safetensors + JSON: nothing is unpickled), ``reporting`` (metrics.jsonl, TensorBoard, result
JSONs, the comparison table). Options live in :mod:`kdengine.config`, the method contract in
:mod:`kdengine.methods.base`.
"""
