# `make demo`, `make test` and `make docs` build .venv on first use (CPU torch first, then hf_trak[dev]).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test test-fast docs quality style bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/hf-trak demo

quality: install
	$(BIN)/ruff check hf_trak tests benchmarks examples
	$(BIN)/ruff format --check hf_trak tests benchmarks examples

style: install
	$(BIN)/ruff check --fix hf_trak tests benchmarks examples
	$(BIN)/ruff format hf_trak tests benchmarks examples

docs: install  # the documentation site, into site/: a broken link, page or API reference fails the build
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

test: quality
	$(BIN)/python -m pytest

test-fast: quality  # the tests not marked slow (no subprocesses, no retraining): about 2 minutes
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python -m pip install -q --no-deps "traker==0.3.2" "kronfluence==1.0.1"
	$(BIN)/python -m pip install -q einops einconv opt-einsum
	$(BIN)/python benchmarks/featurize.py
	$(BIN)/python benchmarks/lds_digits.py
	$(BIN)/python benchmarks/factored.py
	$(BIN)/python benchmarks/lds_text.py
	$(BIN)/python benchmarks/store.py
	$(BIN)/python benchmarks/peft_lora.py
	$(BIN)/python benchmarks/precision.py --threads 2
	$(BIN)/python benchmarks/query.py
	$(BIN)/python benchmarks/explore.py
	$(BIN)/python benchmarks/lds.py
	$(BIN)/python benchmarks/estimator_cost.py
	$(BIN)/python benchmarks/exit_race.py
