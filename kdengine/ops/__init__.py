"""Public kernels. This package is the only place that chooses a backend (see ``_backends``).

Ops (each: reference + Triton + CUDA + autograd + dispatch, same name everywhere):

* :func:`kd_loss` — temperature softmax + divergence, forward and backward.
* :func:`linear_kd_loss` — LM head(s) fused with kd_loss chunk by chunk.
* :func:`fuse_experts`, :func:`fused_experts_kd_loss` — uncertainty-weighted fusion of K experts.
* :func:`expert_batch_embed` — the K-expert batched prompt input.
* :func:`sparse_kd_loss` — kd_loss against a teacher's top-k log-probs (offline teacher cache).

The op modules import only torch at module level (Triton kernels and the compiled extension
are imported when a backend is first selected), so ``import kdengine.ops`` stays cheap.
"""

from kdengine.ops._backends import BackendUnavailable, availability
from kdengine.ops.expert_batch_embed import expert_batch_embed
from kdengine.ops.fuse_experts import fuse_experts, fused_experts_kd_loss
from kdengine.ops.kd_loss import kd_loss
from kdengine.ops.linear_kd_loss import linear_kd_loss
from kdengine.ops.sparse_kd_loss import sparse_kd_loss

__all__ = [
    "BackendUnavailable",
    "availability",
    "expert_batch_embed",
    "fuse_experts",
    "fused_experts_kd_loss",
    "kd_loss",
    "linear_kd_loss",
    "sparse_kd_loss",
]
