# Two entry points for a fresh machine: `make demo` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean

# torch is pinned to the 2.13.0 CPU build first: that release is what this machine type caches, and the
# unpinned resolver would otherwise pull a multi-GB CUDA build. open-clip-torch is installed without its
# dependencies: only its CLIP BPE vocabulary file is used (its torchvision dependency would force another torch).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check 'torch==2.13.0'
	$(BIN)/pip install -q --disable-pip-version-check -e '.[server,test]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps 'open-clip-torch>=2.20'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rf-client generate --classes cifar10 --per-class 8 --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check client export serving training tests && $(BIN)/ruff format --check client export serving training tests

clean:
	rm -rf $(VENV) out
