"""Plain, differentiable PyTorch versions of every kernel: the CPU path's math and the test oracle.

Nothing here is fused; call it on float64 copies to get the ground truth the Triton and CUDA
kernels are tested against.
"""

from kdengine.reference.expert_batch_embed import expert_batch_embed_reference
from kdengine.reference.fuse_experts import fuse_experts_reference, fused_experts_kd_loss_reference
from kdengine.reference.kd_loss import kd_loss_reference, kd_loss_rows

__all__ = [
    "expert_batch_embed_reference",
    "fuse_experts_reference",
    "fused_experts_kd_loss_reference",
    "kd_loss_reference",
    "kd_loss_rows",
]
