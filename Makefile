# Two commands do all the set-up on a fresh clone:  make demo   /   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
export MAX_JOBS ?= 2
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cpp)
DEMO_ARGS ?=

.PHONY: demo test bench install clean

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

# The main job: a whole detector on the photos bundled with scikit-image; report and numbers in $(DEMO_OUT).
DEMO_OUT ?= build/demo
demo: install
	mkdir -p $(DEMO_OUT)
	$(PY) -m fpn_fast --json $(DEMO_OUT)/result.json --report $(DEMO_OUT)/report.png $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-columns=median,iqr,min,max,rounds --benchmark-sort=name

clean:
	rm -rf build *.egg-info fpn_fast/*.so
