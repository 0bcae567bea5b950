# Quick start: `make serve` (set up, then run the main job) and `make test` (set up, then the tests).
# Each creates its own virtual environment from nothing but Python 3 and PyPI.
PYTHON  ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
# `make test-min`: a second environment with the declared minimum versions.
MIN_VENV ?= .venv-min
ARGS    ?=

.PHONY: serve test lint typecheck test-min bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The server, and awkward + uproot so that the same environment reads real events (README).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server,awkward]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/arrowinfer serve $(ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy with the configuration in pyproject.toml ([tool.mypy]).
typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

test: lint typecheck $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(ARGS)

# The floors in pyproject.toml stay true: install exactly the lowest declared versions of
# the client, fallback, server and awkward requirements (as wheels: .ci/floors.py pins them),
# then run the fast tests. The environment is rebuilt whenever pyproject.toml changes.
$(MIN_VENV)/.installed: pyproject.toml .ci/floors.py Makefile
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/python .ci/floors.py server awkward > $(MIN_VENV)/floors.txt
	$(MIN_VENV)/bin/python -m pip install --quiet --only-binary :all: \
	    -r $(MIN_VENV)/floors.txt 'pytest>=8' 'pytest-timeout>=2.2' 'hypothesis>=6.90' pandas \
	    'tritonclient[http]'  # the HTTP conformance tests' client, at the pinned tritonclient
	$(MIN_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(pyarrow|numpy|onnx|onnxruntime|protobuf|grpcio|tritonclient|awkward)='
	$(MIN_VENV)/bin/python -m pytest -m "not slow" -p no:cacheprovider $(ARGS)

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@ $(VENV)/.installed

bench: $(VENV)/.installed-bench
	$(BIN)/arrowinfer bench --out benchmarks/results --update-readme README.md $(ARGS)

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache .ruff_cache .mypy_cache
