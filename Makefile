# ckreg developer entry points. `make demo` runs the main job; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ckreg-installed

.PHONY: install system-deps test lint demo demo-lm serve ui clean bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	bash infra/dev/system-deps.sh

## test: install everything, then lint, type-check, layer contracts and the full pytest suite
test: install system-deps lint
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet -d "$$(mktemp -d)"

## demo: the main job — embedded registry, model zoo, automatic merges, results table
demo: install
	$(PY) -m bench.merge_quality --embedded

## demo-lm: the same job on the language-model zoo (HF Llama dirs + LoRA adapters; ~15+ min)
demo-lm: install
	$(PY) -m bench.merge_quality --embedded --zoo lm --seed 0

serve: install
	$(VENV)/bin/ckreg serve

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.ckreg/demo/mlflow.db --port 5000

clean:
	rm -rf .ckreg bench/out
