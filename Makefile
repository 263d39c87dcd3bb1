# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv if missing, install kdengine, run the main job
#   make test   same set-up, then the test suite
# torch: an already importable torch is kept (the venv sees system packages); otherwise
# `pip install torch==$(TORCH_VERSION)` (a local CPU wheel on our machines) is installed
# before anything else, so no dependency can pull a CUDA torch onto a CPU machine.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdengine-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23.1" "setuptools>=64" wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m kdengine.train

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.bench_kd_loss

clean:
	rm -rf $(VENV) build *.egg-info
