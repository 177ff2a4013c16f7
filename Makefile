# Two entry points for a fresh machine: `make demo` (the whole Real-Fake loop on CPU) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SYSTEM_PACKAGES := libnss-wrapper munge slurmctld slurmd slurm-client

.PHONY: demo test lint clean

# torch and torchvision are pinned first, as a pair that imports together: torchvision 0.29.1 needs torch 2.14.1
# (PyPI's torchvision fails to import beside the torch 2.13.0 CPU build this machine type also caches); both are
# served from this machine type's package cache. open-clip-torch is installed without its dependencies: only its
# CLIP BPE vocabulary file is used; imagecorruptions too (pyproject lists what it imports, with OpenCV's headless
# build). Fashion-MNIST comes from Debian's dataset-fashion-mnist (idx files).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check 'torch==2.14.1' 'torchvision==0.29.1'
	$(BIN)/pip install -q --disable-pip-version-check -e '.[server,cpu,openvino,test]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps 'open-clip-torch>=2.20' 'imagecorruptions>=1.1.2'
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  (command -v apt-get >/dev/null && (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null))) || \
	  echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); the demo needs it"
	@# what the deployment tests run for real: nss_wrapper (a DNS name over several loopback servers), munge + Slurm
	@# (a single-node cluster for deploy/slurm), and kubectl (renders deploy/k8s; this machine type ships it)
	@dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
	  (command -v apt-get >/dev/null && (apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null))) || \
	  echo "note: not installed: $(SYSTEM_PACKAGES); the deployment tests that need them skip, saying so"
	@command -v kubectl >/dev/null || echo "note: no kubectl: the deploy/k8s rendering tests skip, saying so"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rf-demo --out out/realfake-demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check core client export serving training bench tests && $(BIN)/ruff format --check core client export serving training bench tests

clean:
	rm -rf $(VENV) out
