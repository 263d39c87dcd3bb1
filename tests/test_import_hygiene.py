"""Importing kdengine stays cheap: no triton, no compiled extension, no CUDA initialisation (checked
in a fresh interpreter, since this test process has imported triton already); and the kernel
layers keep their order (kernels/ never import kdengine/ops; one IGNORE_INDEX)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from kdengine.ops._backends import BACKENDS

_PROBE = """
import importlib, json, sys
imported, missing = [], []
for name in ("kdengine", "kdengine.ops", "kdengine.losses"):
    try:
        importlib.import_module(name)
        imported.append(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        missing.append(name)
import torch
print(json.dumps({"imported": imported, "missing": missing,
                  "triton": "triton" in sys.modules, "ext": "kdengine._C" in sys.modules,
                  "cuda_initialized": torch.cuda.is_initialized()}))
"""


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KDENGINE_BACKEND")}


def test_import_loads_no_triton_no_extension_no_cuda():
    done = subprocess.run([sys.executable, "-c", _PROBE], env=_clean_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"kdengine", "kdengine.ops"} <= set(state["imported"]), state
    assert set(state["missing"]) <= {"kdengine.losses"}, state
    assert state["triton"] is False, "importing kdengine imported triton"
    assert state["ext"] is False, "importing kdengine imported kdengine._C"
    assert state["cuda_initialized"] is False, "importing kdengine initialised CUDA"


def test_info_reports_every_backend():
    done = subprocess.run([sys.executable, "-m", "kdengine.info"], env=_clean_env(), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    for name in BACKENDS:
        assert any(line.split()[:1] == [name] and "available" in line for line in lines), (name, done.stdout)


# ------------------------------------------------------------------------------------------------
# Layering: kernels/ sit below kdengine/ops (never import it); IGNORE_INDEX is defined once
# ------------------------------------------------------------------------------------------------
_ROOT = Path(__file__).resolve().parent.parent
_LOWER_LAYERS = [_ROOT / "kernels", _ROOT / "kdengine" / "ops", _ROOT / "kdengine" / "reference"]


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_kernels_never_import_ops():
    for path in sorted((_ROOT / "kernels").glob("*.py")):
        bad = sorted(m for m in _imported_modules(path) if m == "kdengine.ops" or m.startswith("kdengine.ops."))
        assert not bad, f"{path.name} imports {bad}: kernels/ must not depend on kdengine/ops"


def test_ignore_index_is_defined_once():
    """No literal -100 in kernels/, kdengine/ops/ or kdengine/reference/: they use
    kdengine.constants.IGNORE_INDEX, a leaf module that imports nothing."""
    from kdengine import constants

    assert constants.IGNORE_INDEX == -100
    assert not _imported_modules(Path(constants.__file__))
    for folder in _LOWER_LAYERS:
        for path in sorted(folder.glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                        and isinstance(node.operand, ast.Constant) and node.operand.value == 100):
                    raise AssertionError(f"{path.relative_to(_ROOT)}:{node.lineno}: literal -100; "
                                         "use kdengine.constants.IGNORE_INDEX")
