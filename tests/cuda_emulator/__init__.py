"""A CPU emulator of the CUDA runtime subset csrc/ uses, to run the real kernels in CI without a GPU.

``include/``: fake cuda_runtime.h / cuda_bf16.h / cuda_fp16.h (what is emulated and what is not:
the comment at the top of include/cuda_runtime.h). ``build.py``: compiles csrc/bindings.cpp and
csrc/*.cu against them as a CPU torch extension. Used by tests/test_csrc_emulated.py.
"""
