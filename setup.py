"""Build script: decides one thing, whether to compile the optional CUDA extension kdengine._C.

KDENGINE_BUILD_CUDA=0      never build it (pure-Python install).
KDENGINE_BUILD_CUDA=1      must build it; any reason it cannot is an error.
unset                      build it when an installed CUDA torch and nvcc are found, else skip
                           and say why. Installing without the extension is always valid: the
                           Triton and PyTorch backends still work.

The extension needs torch at build time, so build it with `pip install --no-build-isolation`.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (e.g. "9.0" for an H200), MAX_JOBS caps ninja.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"kdengine setup: {msg}", file=sys.stderr)


def cuda_extension():
    """Return (ext_modules, cmdclass) for kdengine._C, or ([], {}) with the reason printed."""
    mode = os.environ.get("KDENGINE_BUILD_CUDA", "auto").strip().lower()
    if mode not in {"0", "1", "auto"}:
        raise SystemExit(f"KDENGINE_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        _say("KDENGINE_BUILD_CUDA=0: skipping the CUDA extension")
        return [], {}

    def skip(reason: str):
        if mode == "1":
            raise SystemExit(f"KDENGINE_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"skipping the CUDA extension ({reason}); the Triton and PyTorch backends still work. "
             "Set KDENGINE_BUILD_CUDA=1 to require it.")
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return skip(f"torch is not importable at build time ({exc}); install torch first and "
                    "use pip install --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"the installed torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None:
        return skip("nvcc / CUDA_HOME not found")

    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/*.cu"))
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
    ext = CUDAExtension(
        name="kdengine._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )
    _say(f"building the CUDA extension from {len(sources)} sources (torch {torch.__version__}, "
         f"CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    packages=find_packages(include=["kdengine", "kdengine.*"]) + ["kdengine.kernels"],
    package_dir={"kdengine": "kdengine", "kdengine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
