"""Plain, differentiable PyTorch versions of every kernel: the CPU path's math and the test oracle.

Nothing here is chunked or fused; call it on float64 copies to get the ground truth the Triton
and CUDA kernels are tested against.
"""

from kdengine.reference.kd_loss import kd_loss_reference, kd_loss_rows

__all__ = ["kd_loss_reference", "kd_loss_rows"]
