"""Build csrc/ (the real kernels and csrc/bindings.cpp) as a CPU torch extension on the emulator.

The .cu files are compiled as C++ against the fake CUDA headers of ``include/`` (what is and is not
emulated: ``include/cuda_runtime.h``). Two mechanical rewrites make plain C++ of them, written to
``<build_dir>/src`` with ``#line`` directives so that compiler errors point at csrc/:

* every ``kernel<<<grid, block, smem, stream>>>(args)`` launch becomes
  ``kdemu::launch(kernel, kdemu::LaunchConfig(grid, block, smem, stream), args)``;
* in bindings.cpp, ``CHECK_CUDA`` accepts CPU tensors (the emulated device memory) instead of CUDA
  ones; every other check of the bindings runs unchanged.

A rewrite that no longer matches csrc/ raises ``EmulatorBuildError`` naming what changed, rather
than building something else. The module keeps the name ``_C`` because bindings.cpp declares
``PYBIND11_MODULE(_C, m)``; torch loads it from ``build_dir`` by path, so it never shadows a real
``kdengine._C``. Generated sources are rewritten only when their text changes, so ninja rebuilds
nothing when csrc/ and ``include/`` are unchanged (a warm build directory costs about a second).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
CSRC = HERE.parent.parent / "csrc"
SELFTEST = HERE / "selftest.cu"
EXTENSION_NAME = "_C"
CFLAGS = ["-O1"]

_LAUNCH = re.compile(r"(?P<kernel>\w+(?:<[^;{}()]*?>)?)\s*<<<(?P<config>.*?)>>>\s*\(", re.DOTALL)
_CHECK_CUDA = "#define CHECK_CUDA(x) TORCH_CHECK_VALUE((x).is_cuda(),"
_CHECK_EMULATED = "#define CHECK_CUDA(x) TORCH_CHECK_VALUE((x).is_cpu(),"


class EmulatorBuildError(RuntimeError):
    """csrc/ no longer matches what the emulator's source rewrites expect."""


def toolchain_skip_reason() -> str | None:
    """Why the emulated extension cannot be built on this machine, or None when it can."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not available (pip install ninja)"
    torch_include = Path(torch.__file__).resolve().parent / "include" / "torch" / "extension.h"
    if not torch_include.exists():
        return f"the installed torch has no C++ headers ({torch_include} is missing)"
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not python_h.exists():
        return f"Python.h not found ({python_h}); install the Python development headers"
    return None


def translate_kernels(text: str, origin: Path) -> str:
    """A csrc/*.cu file as emulator C++: CUDA mode on, launches through ``kdemu::launch``."""
    expected = text.count("<<<")

    def launch(match: re.Match) -> str:
        return f"kdemu::launch({match['kernel']}, kdemu::LaunchConfig({match['config']}), "

    body, rewritten = _LAUNCH.subn(launch, text)
    if rewritten != expected or "<<<" in body:
        raise EmulatorBuildError(f"{origin}: {expected} kernel launches but {rewritten} matched the rewrite "
                                 f"`kernel<<<config>>>(args)`; update tests/cuda_emulator/build.py")
    # The rewrite keeps every newline, so #line maps errors onto the original file.
    return f'#define __CUDACC__ 1\n#include <cuda_runtime.h>\n#line 1 "{origin}"\n{body}'


def translate_bindings(text: str, origin: Path) -> str:
    """csrc/bindings.cpp with CHECK_CUDA requiring CPU tensors (the emulated device)."""
    if text.count(_CHECK_CUDA) != 1:
        raise EmulatorBuildError(f"{origin}: expected one `{_CHECK_CUDA} ...` line to point at CPU tensors; "
                                 f"update tests/cuda_emulator/build.py")
    return f'#line 1 "{origin}"\n' + text.replace(_CHECK_CUDA, _CHECK_EMULATED)


def _write_if_changed(path: Path, text: str) -> Path:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def generate_sources(build_dir: Path) -> list[Path]:
    """Write the translated bindings.cpp and csrc/*.cu to ``build_dir/src``; returns their paths."""
    src = build_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    bindings = CSRC / "bindings.cpp"
    sources = [_write_if_changed(src / "bindings.cpp", translate_bindings(bindings.read_text(), bindings))]
    for cu in sorted(CSRC.glob("*.cu")):
        sources.append(_write_if_changed(src / f"{cu.stem}_emu.cpp", translate_kernels(cu.read_text(), cu)))
    return sources


def build_emulated_extension(build_dir: Path, *, verbose: bool = False):
    """Compile (incrementally, with ninja) and import csrc/ on the emulator; returns the module.

    The module has the functions of kdengine._C (csrc/bindings.cpp) and takes CPU tensors.
    """
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = generate_sources(build_dir)
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(INCLUDE), str(CSRC)],
        extra_cflags=CFLAGS,
        build_directory=str(build_dir),
        with_cuda=False,
        verbose=verbose,
    )


def build_selftest(build_dir: Path) -> Path:
    """Compile selftest.cu (plain C++ on the emulator, no torch) into ``build_dir``; returns the program."""
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    text = translate_kernels(SELFTEST.read_text(), SELFTEST)
    source = _write_if_changed(build_dir / "selftest_emu.cpp", text)
    program = build_dir / "selftest"
    result = subprocess.run([os.environ.get("CXX", "c++"), "-std=c++17", *CFLAGS, f"-I{INCLUDE}", str(source),
                             "-o", str(program)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EmulatorBuildError(f"{SELFTEST} did not compile:\n{result.stderr[-4000:]}")
    return program
