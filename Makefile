# One entry point for people and CI. `make demo` and `make test` install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

# Rebuild the venv only when the project's dependency declaration changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/segbatch demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/pipeline_efficiency.py

clean:
	rm -rf $(VENV) build *.egg-info
