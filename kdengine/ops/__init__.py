"""Public kernels. This package is the only place that chooses a backend (see ``_backends``).

Ops (each: reference + Triton + CUDA + autograd + dispatch, same name everywhere):

* :func:`kd_loss` — temperature softmax + divergence, forward and backward.
* :func:`linear_kd_loss` — LM head(s) fused with kd_loss chunk by chunk.
* :func:`fuse_experts`, :func:`fused_experts_kd_loss` — uncertainty-weighted fusion of K experts.
* :func:`expert_batch_embed` — the K-expert batched prompt input.

Attributes are imported on first use, so ``import kdengine.ops`` stays cheap.
"""

import importlib

from kdengine.ops._backends import BackendUnavailable, availability

_LAZY = {
    "kd_loss": "kdengine.ops.kd_loss",
    "linear_kd_loss": "kdengine.ops.linear_kd_loss",
    "fuse_experts": "kdengine.ops.fuse_experts",
    "fused_experts_kd_loss": "kdengine.ops.fuse_experts",
    "expert_batch_embed": "kdengine.ops.expert_batch_embed",
}

__all__ = ["BackendUnavailable", "availability", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdengine.ops' has no attribute {name!r}")
