"""csrc/ compiles on a machine without a GPU (nothing here runs a kernel).

* every csrc/*.cu compiles with nvcc for sm_90 (when nvcc is on PATH), without a warning from our
  own sources, and defines the ``extern "C"`` launchers that csrc/launchers.h declares;
* csrc/bindings.cpp (the only torch-facing file) passes ``g++ -fsyntax-only`` against the
  installed torch headers (when g++, the torch headers and Python.h exist);
* the option codes of kdengine/ops/_cuda.py equal the enums of csrc/launchers.h.

The compiles run once per session, two at a time (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kdengine.ops import _cuda

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
NM = shutil.which("nm")
TORCH_INCLUDE = Path(torch.__file__).resolve().parent / "include"
PY_INCLUDE = Path(sysconfig.get_paths()["include"])
COMPILE_TIMEOUT_S = 600


def _nvcc_cmd(source: Path, out: Path) -> list[str]:
    return [NVCC, "-c", str(source), "-o", str(out), "-O3", "-std=c++17",
            "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC"]


def _gxx_cmd() -> list[str]:
    return [GXX, "-fsyntax-only", "-std=c++17", str(CSRC / "bindings.cpp"), f"-I{TORCH_INCLUDE}",
            f"-I{TORCH_INCLUDE / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{PY_INCLUDE}"]


def _bindings_skip_reason() -> str | None:
    if GXX is None:
        return "g++ is not on PATH"
    if not (TORCH_INCLUDE / "torch" / "extension.h").exists():
        return f"the installed torch has no C++ headers ({TORCH_INCLUDE})"
    if not (PY_INCLUDE / "Python.h").exists():
        return f"Python.h not found in {PY_INCLUDE}"
    return None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, returncode=124, stdout="", stderr=f"timed out: {exc}")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{"<file>.cu" | "bindings.cpp": (CompletedProcess, object path | None)}: all compiles, 2 jobs."""
    out_dir = tmp_path_factory.mktemp("csrc_build")
    jobs = {}
    if NVCC is not None:
        for name in CU_FILES:
            obj = out_dir / (name + ".o")
            jobs[name] = (_nvcc_cmd(CSRC / name, obj), obj)
    if _bindings_skip_reason() is None:
        jobs["bindings.cpp"] = (_gxx_cmd(), None)
    # Longest first (the bindings parse all of torch's headers).
    order = sorted(jobs, key=lambda n: (n != "bindings.cpp", n))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, jobs[name][0]) for name in order}
        return {name: (futures[name].result(), jobs[name][1]) for name in order}


def _our_warnings(stderr: str, source: str) -> list[str]:
    return [line for line in stderr.splitlines() if source in line and "warning" in line]


def _declared_launchers() -> list[str]:
    text = (CSRC / "launchers.h").read_text()
    block = text[text.index('extern "C" {'):]
    return re.findall(r"const char\* (kdengine_\w+)\(", block[:block.index("}")])


def test_csrc_has_the_three_kernels():
    assert {"expert_batch_embed.cu", "fuse_experts.cu", "kd_loss.cu"} <= set(CU_FILES)
    launchers = {"kdengine_kd_loss_rows", "kdengine_fuse_experts", "kdengine_fused_experts_kd_rows",
                 "kdengine_expert_batch_embed", "kdengine_expert_batch_embed_backward"}
    assert launchers <= set(_declared_launchers())


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_compiles_for_sm90(compiled, name):
    result, obj = compiled[name]
    assert result.returncode == 0, f"nvcc failed on csrc/{name}:\n{result.stderr[-4000:]}"
    assert obj.exists() and obj.stat().st_size > 0
    assert not _our_warnings(result.stderr, name), "\n".join(_our_warnings(result.stderr, name))


@pytest.mark.skipif(NVCC is None or NM is None, reason="nvcc or nm is not on PATH")
def test_every_launcher_is_defined_once(compiled):
    defined = {}
    for name in CU_FILES:
        result, obj = compiled[name]
        assert result.returncode == 0, f"csrc/{name} did not compile"
        symbols = subprocess.run([NM, "--defined-only", str(obj)], capture_output=True, text=True,
                                 check=True).stdout
        for line in symbols.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "T" and parts[2].startswith("kdengine_"):
                defined.setdefault(parts[2], []).append(name)
    declared = _declared_launchers()
    assert sorted(defined) == sorted(declared), f"declared {declared}, defined {defined}"
    assert all(len(files) == 1 for files in defined.values()), defined


def test_bindings_syntax(compiled):
    reason = _bindings_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    result, _ = compiled["bindings.cpp"]
    assert result.returncode == 0, f"g++ -fsyntax-only failed on csrc/bindings.cpp:\n{result.stderr[-4000:]}"
    warnings = _our_warnings(result.stderr, "bindings.cpp:")
    assert not warnings, "\n".join(warnings)


def _enum(name: str) -> dict[str, int]:
    text = (CSRC / "launchers.h").read_text()
    body = re.search(r"enum " + name + r" : int \{([^}]*)\}", text).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(","))}


@pytest.mark.parametrize("enum, codes, names", [
    ("Divergence", _cuda.DIVERGENCE_CODES,
     {"forward_kl": "kForwardKL", "reverse_kl": "kReverseKL", "soft_ce": "kSoftCE", "jsd": "kJSD",
      "tvd": "kTVD", "mse": "kMSE"}),
    ("Weighting", _cuda.WEIGHTING_CODES,
     {"uniform": "kUniform", "entropy": "kEntropy", "confidence": "kConfidence"}),
    ("FusionSpace", _cuda.SPACE_CODES, {"logit": "kLogitSpace", "prob": "kProbSpace"}),
    ("Placement", _cuda.PLACEMENT_CODES, {"prepend": "kPrepend", "append": "kAppend"}),
])
def test_python_codes_match_launchers_h(enum, codes, names):
    values = _enum(enum)
    assert {key: values[names[key]] for key in codes} == codes
    assert len(values) == len(codes)


def test_codes_cover_every_option():
    from kdengine.reference.expert_batch_embed import PLACEMENTS
    from kdengine.reference.fuse_experts import SPACES, WEIGHTINGS
    from kdengine.reference.kd_loss import DIVERGENCES

    assert set(_cuda.DIVERGENCE_CODES) == set(DIVERGENCES)
    assert set(_cuda.WEIGHTING_CODES) == set(WEIGHTINGS)
    assert set(_cuda.SPACE_CODES) == set(SPACES)
    assert set(_cuda.PLACEMENT_CODES) == set(PLACEMENTS)


def test_cuda_module_loads_without_the_extension():
    """Importing kdengine.ops._cuda must not import kdengine._C (built or not)."""
    code = ("import sys, kdengine.ops._cuda; "
            "assert 'kdengine._C' not in sys.modules and 'triton' not in sys.modules")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
