"""Packaging: the Triton package installs as ``kdengine.kernels``, never as a top-level ``kernels``.

A copy of the project (so the working tree gets no build/ or egg-info) is installed with
``pip install --no-deps --no-build-isolation`` into temporary folders, once as a wheel
(``--target``) and once editable (``--prefix``). A probe then runs with ``python -S`` from an
empty temporary cwd, with only that install on sys.path (``site.addsitedir`` also runs the
editable install's .pth finder): ``import kdengine.kernels`` must work and
``importlib.util.find_spec("kernels")`` must be None. The CUDA switch of setup.py is checked on
this CPU torch: ``KDENGINE_BUILD_CUDA=1`` fails loudly with the reason, unset succeeds and says
why the extension was skipped. Run from a checkout's root (on sys.path under ``python -m``),
``import kernels`` must still reach an installed PyPI ``kernels``, or look uninstalled to
transformers' probe when there is none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_FILES = ("pyproject.toml", "setup.py", "README.md", "kdengine", "kernels", "csrc")

PROBE = """
import importlib.util, json, site, sys
site.addsitedir(sys.argv[1])
import kdengine.kernels
print(json.dumps({
    "kernels_file": kdengine.kernels.__file__,
    "kd_loss_module": importlib.util.find_spec("kdengine.kernels.kd_loss") is not None,
    "top_level_kernels": importlib.util.find_spec("kernels") is not None,
    "triton_imported": "triton" in sys.modules,
}))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the files a build needs (no .git, tests, build outputs)."""
    root = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o"))
        elif os.path.exists(src):
            shutil.copy2(src, root / name)
    return root


def pip_install(project, *args, build_cuda: str | None = None):
    """pip install into a temporary location. ``--ignore-installed`` is essential: without it pip
    uninstalls the kdengine of the running environment when installing with ``--prefix``."""
    env = {k: v for k, v in os.environ.items() if k not in ("KDENGINE_BUILD_CUDA", "PYTHONPATH")}
    if build_cuda is not None:
        env["KDENGINE_BUILD_CUDA"] = build_cuda
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--ignore-installed", "--disable-pip-version-check", "-v", *args]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False)


def probe(site_dir, cwd) -> dict:
    done = subprocess.run([sys.executable, "-S", "-c", PROBE, str(site_dir)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False, env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_wheel_install_has_kdengine_kernels_only(project, tmp_path):
    target = tmp_path / "target"
    done = pip_install(project, "--target", str(target), ".")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    state = probe(target, tmp_path)
    assert state["kernels_file"].startswith(str(target)), state
    assert state["kd_loss_module"], state
    assert not state["top_level_kernels"], state
    assert not state["triton_imported"], state
    assert not (target / "kernels").exists()


def test_editable_install_has_kdengine_kernels_only(project, tmp_path):
    prefix = tmp_path / "prefix"
    done = pip_install(project, "--prefix", str(prefix), "-e", ".")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    site_dir = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    assert any(name.endswith(".pth") for name in os.listdir(site_dir)), os.listdir(site_dir)
    state = probe(site_dir, tmp_path)
    assert state["kernels_file"] == str(project / "kernels" / "__init__.py"), state
    assert state["kd_loss_module"], state
    assert not state["top_level_kernels"], state
    still = subprocess.run([sys.executable, "-c", "import kdengine; print(kdengine.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, check=False)
    assert still.returncode == 0 and still.stdout.strip() != "", "the environment's kdengine was uninstalled"


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the behaviour with a CPU torch")
def test_cuda_switch_on_cpu_torch(project, tmp_path):
    required = pip_install(project, "--target", str(tmp_path / "required"), ".", build_cuda="1")
    output = required.stdout + required.stderr
    assert required.returncode != 0, output[-4000:]
    assert "KDENGINE_BUILD_CUDA=1 but the CUDA extension cannot be built" in output, output[-4000:]
    assert "is a CPU build" in output, output[-4000:]

    auto = pip_install(project, "--target", str(tmp_path / "auto"), ".")
    output = auto.stdout + auto.stderr
    assert auto.returncode == 0, output[-4000:]
    assert "skipping the CUDA extension (the installed torch" in output, output[-4000:]
    assert "is a CPU build" in output, output[-4000:]


SHADOW_PROBE = """
import json, sys
from transformers.utils.import_utils import is_kernels_available
import kernels
print(json.dumps({"file": getattr(kernels, "__file__", None), "marker": getattr(kernels, "MARKER", None),
                  "transformers_sees_kernels": is_kernels_available(), "cwd_first": sys.path[0] == ""}))
"""


def shadow_probe(pythonpath: str) -> dict:
    """SHADOW_PROBE run with ``-c`` (sys.path[0] = the cwd = the repository root)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-c", SHADOW_PROBE], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_checkout_root_does_not_shadow_installed_kernels(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('MARKER = "pypi kernels"\n')
    state = shadow_probe(str(tmp_path / "site"))
    assert state["cwd_first"], state
    assert state["marker"] == "pypi kernels" and state["file"] == str(fake / "__init__.py"), state


def test_checkout_root_kernels_reads_as_not_installed(tmp_path):
    state = shadow_probe("")
    if state["marker"] is not None or (state["file"] or "").startswith(sys.prefix):
        pytest.skip("a PyPI kernels is installed in this environment")
    assert state["file"] is None, state
    assert state["transformers_sees_kernels"] is False, state
