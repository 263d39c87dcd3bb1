"""Compile Triton kernels for the GPU target (sm_90) on a CPU machine; the interpreter checks none of
what only the compiler sees (types, constexpr branches, layouts)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def check_compiles(script: str, timeout: int = 900) -> None:
    """Run ``script`` in a fresh interpreter without TRITON_INTERPRET; it prints "OK" after compiling,
    or "SKIP: <reason>" when this triton has no NVIDIA backend (then the test is skipped)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    assert done.stdout.strip().endswith("OK")
