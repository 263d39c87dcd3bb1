"""kdengine: knowledge distillation for language models, on fused Triton/CUDA kernels.

Importing kdengine is cheap: it never imports Triton or the compiled extension and never
queries a GPU. Kernels live in :mod:`kdengine.ops` (one dispatcher for the "cuda", "triton"
and "torch" backends); run ``python -m kdengine.info`` to see which backends can run here.
"""

__version__ = "0.1.0"
