# heatmark — set-up, tests, benchmarks.
#   make setup                 create .venv with torch pinned, install heatmark (editable) + dev extras
#   make demo                  setup, then `heatmark demo`: fetch AFIDs MR data, train a 3D model on CPU
#                              (about 10 minutes on 2 cores; faster on a GPU), evaluate, predict
#   make test                  setup, then run the test suite (one process per core: TEST_WORKERS=1 for one)
#   make bench                 setup, then the speed/memory benchmarks in bench/ (about 15 min on 2 cores)
#   make bench-isbi            setup, then the ISBI 2015 accuracy runs of the README (about 100 min on 2 cores)
# Override the torch pin:      make test TORCH=torch==2.9.1
# torch is installed first and then used as a pip constraint, so no later install can replace it
# (a plain `torch` requirement would pull several GB of CUDA wheels on a CPU machine).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.heatmark-setup
CONSTRAINTS := $(VENV)/constraints.txt
PYTEST_ARGS ?=
# test processes (pytest-xdist; one torch thread each, whole test files per process): auto = one per CPU core
TEST_WORKERS ?= auto

.PHONY: setup demo test bench bench-isbi clean
DEMO_ARGS ?=

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	echo "$(TORCH)" > $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	$(PY) -c "import torch, monai, heatmark, heatmark.transforms, heatmark.networks; print('heatmark', heatmark.__version__, '| torch', torch.__version__, '| monai', monai.__version__)"
	touch $(STAMP)

demo: setup
	$(PY) -m heatmark demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(PY) bench/heatmaps.py
	$(PY) bench/network_params.py
	$(PY) bench/pipeline_overhead.py
	$(PY) bench/predict_throughput.py --cases 150
	$(PY) bench/predict_throughput.py --skip-2d --cpu-overlay --volumes 12
	$(PY) bench/mixed_precision.py

bench-isbi: setup
	$(PY) bench/isbi2015.py --minutes 15 --runs scn baseline unet downsampling
	$(PY) bench/isbi2015.py --minutes 5 --runs scn_10 unet_10
	$(PY) bench/isbi2015.py --minutes 45 --runs scn

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
