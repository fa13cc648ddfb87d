# One entry point for people and CI. `make demo` and `make test` install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

# Headless Chromium for the report test (Debian's package works offline; playwright's download does not).
# Installed once, as root on CI's clean clone; skipped when the browser is already there.
CHROMIUM := /usr/bin/chromium-headless-shell

# Rebuild the venv only when the project's dependency declaration changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The scene demo first, so the last screen is the pre-labelling one: where the exports and previews are.
demo: install
	$(BIN)/segbatch demo --scene
	$(BIN)/segbatch demo

$(CHROMIUM):
	@if command -v chromium-headless-shell >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium-headless-shell

test: install $(CHROMIUM)
	$(BIN)/python -m pytest

# A few minutes on a laptop CPU; each script prints one JSON line (see benchmarks/README.md).
bench: install
	$(BIN)/python benchmarks/stages.py --images 16
	$(BIN)/python benchmarks/pipeline_efficiency.py --images 128 --batch-size 1
	$(BIN)/python benchmarks/memory_flat.py --small 100 --large 1000
	$(BIN)/python benchmarks/export_scale.py --rows 20000 --formats coco cvat
	PYTHONPATH=. $(BIN)/python benchmarks/scene_memory.py --sides 2500 5000
	PYTHONPATH=. $(BIN)/python benchmarks/scene_throughput.py --side 2048

clean:
	rm -rf $(VENV) build *.egg-info
