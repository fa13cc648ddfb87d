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
	$(BIN)/segbatch demo --scene

test: install
	$(BIN)/python -m pytest

# A few minutes on a laptop CPU; each script prints one JSON line (see benchmarks/README.md).
bench: install
	$(BIN)/python benchmarks/stages.py --images 16
	$(BIN)/python benchmarks/pipeline_efficiency.py --images 128 --batch-size 1
	$(BIN)/python benchmarks/memory_flat.py --small 100 --large 1000
	PYTHONPATH=. $(BIN)/python benchmarks/scene_memory.py --sides 2500 5000
	PYTHONPATH=. $(BIN)/python benchmarks/scene_throughput.py --side 2048

clean:
	rm -rf $(VENV) build *.egg-info
