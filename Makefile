# Two commands do all the set-up on a fresh clone:  make demo   /   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
export MAX_JOBS ?= 2
# Every file under csrc/ (any depth): a change to any of them rebuilds the extension.
SOURCES := setup.py $(shell find csrc -type f | LC_ALL=C sort)
DEMO_ARGS ?=

.PHONY: demo test test-pinned test-oldest gpu-check-dry test-install bench install clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The extension is built in place against the venv's torch (no build isolation).
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

# The main job (fpn_fast/demo/): a whole detector on the photos bundled with scikit-image; report and
# numbers in $(DEMO_OUT).
DEMO_OUT ?= build/demo
demo: install
	mkdir -p $(DEMO_OUT)
	$(PY) -m fpn_fast --json $(DEMO_OUT)/result.json --report $(DEMO_OUT)/report.png $(DEMO_ARGS)

# Everything CI checks (.ci/run): the suite on the pinned torch, the oldest supported torch's
# suites, the GPU check's dry run (every step on CPU at tiny sizes), and the install checks.
test: test-pinned test-oldest gpu-check-dry test-install

test-pinned: install
	$(PY) -m pytest -q -p no:cacheprovider tests

# The oldest torch of the supported range (requirements-oldest.txt) in a venv of its own. The
# extension is built (CPU kernels) in a copy of the tree, so the pinned venv's in-place build
# stays; the suites below (ops, modules, convert, optimize_for_inference, deploy) run there.
OLDEST_VENV ?= .venv-oldest
OLDEST_PY   := $(abspath $(OLDEST_VENV))/bin/python
OLDEST_SRC  := build/oldest-torch
OLDEST_TESTS ?= tests/ops tests/modules tests/inference tests/integration/test_deploy.py tests/integration/test_compile.py

$(OLDEST_VENV)/.deps: requirements-oldest.txt
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q -r requirements-oldest.txt
	touch $@

test-oldest: $(OLDEST_VENV)/.deps
	mkdir -p $(OLDEST_SRC)
	find $(OLDEST_SRC) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(OLDEST_SRC)
	cd $(OLDEST_SRC) && FPN_FAST_CUDA=0 $(OLDEST_PY) -m pip install -q --no-build-isolation --no-deps -e .
	cd $(OLDEST_SRC) && $(OLDEST_PY) -c 'import torch; print("oldest supported torch:", torch.__version__)' \
		&& $(OLDEST_PY) -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

# benchmarks/gpu_check.sh with GPU_CHECK_DRY=1: its every step on CPU at tiny sizes, so the
# script cannot break unseen between the sessions that have a GPU.
gpu-check-dry: install
	GPU_CHECK_DRY=1 PYTHON=$(PY) OUT=build/gpu_check_dry bash benchmarks/gpu_check.sh

# The four ways users install fpn_fast (sdist, wheel, checkout, editable), each into a fresh venv
# that has only torch (hard links of $(VENV)'s install of the pinned wheels), then used from there
# (tests/integration/install_check.py, docs/install.md). CPU kernels only (FPN_FAST_CUDA=0) to keep
# it to minutes; logs, venvs and the checkout copy's build cache in build/install-check.
test-install: $(VENV)/.deps
	FPN_FAST_CUDA=$${FPN_FAST_CUDA:-0} $(PY) tests/integration/install_check.py --work build/install-check

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-columns=median,iqr,min,max,rounds --benchmark-sort=name

clean:
	rm -rf build *.egg-info fpn_fast/*.so $(OLDEST_VENV)
