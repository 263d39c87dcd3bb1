"""Importing kdengine stays cheap: no triton, no compiled extension, no CUDA initialisation.
Checked in a fresh interpreter, since this test process has imported triton already."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
