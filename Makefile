# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use; the stamp file makes the second run install nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-gpu lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull the multi-GB CUDA build.
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m spion_fx.demo $(ARGS)

# One pytest-xdist worker per core: most of a test's time is Dynamo/inductor compiling in one
# Python thread (20 min -> 12 min on 2 cores); tests/conftest.py splits torch's threads among them.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal tests

bench: $(STAMP)
	$(PY) benchmarks/run_cpu.py

# The GPU suite (~6 min on one GPU; says so and exits 0 without CUDA). It runs on the machine's
# own Python: a GPU machine brings its torch/triton, and the suite needs nothing else.
bench-gpu:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_suite.py $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check spion_fx tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
