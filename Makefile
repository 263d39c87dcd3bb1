# Two commands do all the set-up on a fresh machine:
#   make demo         create .venv if missing, install kdengine on the tested stack, run the main job
#   make test         same set-up, then the test suite
# And for contributors:
#   make test-latest  a second venv ($(LATEST_VENV)) with the newest release of every dependency, the
#                     whole suite, and the versions it got. `.ci/run` runs `make test`, then this.
#   make constraints  rewrite constraints.txt from $(LATEST_VENV) (run it after test-latest passed)
#   make fresh-check  what CI does: clone the committed tree into a temporary folder, run .ci/run there
#
# The venvs do not see the system's site-packages, so what passes here passes on a fresh machine.
# torch goes in first, `torch==$(TORCH_VERSION)` (the version in constraints.txt; on our machines a
# local CPU wheel), and stays pinned while the dependencies install, so no dependency can pull a
# multi-GB CUDA torch. SYSTEM_SITE_PACKAGES=1 lets the venv see the system's packages instead, to
# reuse an installed torch (e.g. a CUDA build): that torch is then kept and pinned.
# Dependencies install with pip's normal build isolation (seqeval builds from an sdist); only
# kdengine itself, whose setup.py imports torch to decide on the CUDA extension, is installed with
# --no-build-isolation, and with --no-deps.

PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
SYSTEM_SITE_PACKAGES ?= 0
CONSTRAINTS := constraints.txt
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' $(CONSTRAINTS))
EXTRAS := dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdengine-installed
PIP := -m pip --disable-pip-version-check
VENV_FLAGS := $(if $(filter 1,$(SYSTEM_SITE_PACKAGES)),--system-site-packages)
# Prints torch==<installed version> (fails when there is none), without importing torch.
TORCH_PIN := import importlib.metadata as m; print('torch==' + m.version('torch'))
SEES_SYSTEM := $(if $(filter 1,$(SYSTEM_SITE_PACKAGES)),true,false)

.PHONY: demo test test-latest constraints fresh-check install bench clean

# $(call setup_venv,DIR,CONSTRAINTS_OR_EMPTY,EXTRA_PIP_FLAGS): venv, pip, torch, dependencies, kdengine.
# A venv made with the other SYSTEM_SITE_PACKAGES setting (or an older Makefile) is made anew.
# DIR/pins.txt = the installed torch (exact) + the constraints; without constraints (test-latest)
# only torch is pinned and every other package takes its newest release.
define setup_venv
	grep -qx "include-system-site-packages = $(SEES_SYSTEM)" $(1)/pyvenv.cfg 2>/dev/null || rm -rf $(1)
	test -x $(1)/bin/python || $(PYTHON) -m venv $(VENV_FLAGS) $(1)
	$(1)/bin/python $(PIP) install -q $(3) $(if $(2),-c $(2)) pip setuptools wheel
	$(1)/bin/python -c "$(TORCH_PIN)" >/dev/null 2>&1 || \
	  $(1)/bin/python $(PIP) install -q $(if $(2),-c $(2)) torch==$(TORCH_VERSION)
	$(1)/bin/python -c "$(TORCH_PIN)" > $(1)/pins.txt
	$(if $(2),grep -v '^torch==' $(2) >> $(1)/pins.txt)
	$(1)/bin/python .ci/requirements.py $(EXTRAS) > $(1)/requirements.txt
	$(1)/bin/python $(PIP) install -q $(3) -c $(1)/pins.txt -r $(1)/requirements.txt
	$(1)/bin/python $(PIP) install -q --no-build-isolation --no-deps -e .
	$(1)/bin/python $(PIP) check
endef

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS) .ci/requirements.py
	$(call setup_venv,$(VENV),$(CONSTRAINTS),)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m kdengine.train

test: $(STAMP)
	$(PY) -m kdengine.info
	$(PY) -m pytest -q

test-latest:
	$(call setup_venv,$(LATEST_VENV),,--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python -m kdengine.info
	$(LATEST_VENV)/bin/python -m pytest -q

constraints:
	test -x $(LATEST_VENV)/bin/python || { echo "run make test-latest first"; exit 2; }
	{ echo "# The tested stack: exact versions the whole suite passed with (make test-latest on"; \
	  echo "# Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version())'),\
	 $$(uname -m), $$(date -u +%Y-%m-%d)). make test and make demo install these; refresh"; \
	  echo "# with make constraints after make test-latest passed. torch's line also sets TORCH_VERSION."; \
	  $(LATEST_VENV)/bin/python $(PIP) freeze --all --exclude-editable | sed 's/^torch==\([^+]*\)+.*/torch==\1/'; \
	} > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

fresh-check:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  git clone -q "$(CURDIR)" "$$tmp/kdengine" && echo "fresh clone of HEAD in $$tmp/kdengine" && \
	  cd "$$tmp/kdengine" && env -u PYTHONPATH -u VIRTUAL_ENV PYTHONNOUSERSITE=1 ./.ci/run

bench: $(STAMP)
	$(PY) -m benchmarks.bench_kd_loss

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
