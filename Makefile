# hybridpar: set-up, book, tests.  `make book` and `make test` each do all set-up themselves.
#
# Torch handling (never pulls CUDA wheels onto a CPU machine, never replaces an installed torch):
#   1. If $(PY) can already import torch (Colab, a cluster module), the venv is created with
#      --system-site-packages and that torch is used as it is.
#   2. Otherwise torch==$(TORCH_VERSION) is installed: first from a local wheel if pip's
#      find-links has one (offline), else from the PyTorch CPU index when no NVIDIA GPU is
#      present, else from the default index (CUDA build, on GPU machines only).
PY            ?= python3
VENV          ?= .venv
BIN           := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS        ?= test,book
STAMP         := $(VENV)/.hybridpar-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: venv book test demo labs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "[hybridpar] using the torch already installed for $(PY)"; \
	    $(PY) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PY) -m venv $(VENV); \
	  fi; \
	fi
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if $(BIN)/pip install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then \
	    echo "[hybridpar] installed torch $(TORCH_VERSION) from a local wheel"; \
	    $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	  elif command -v nvidia-smi >/dev/null 2>&1; then \
	    $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	  else \
	    echo "[hybridpar] no GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
	    $(BIN)/pip install -q "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
	  fi; \
	fi
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@touch $@

## The main job: build the rendered book (chapters executed, labs rendered from stored outputs).
book: venv
	$(BIN)/python -m hybridpar.book build

## The whole test suite (unit, multi-rank gloo, notebooks via nbval, the built book in headless Chromium).
test: venv
	$(BIN)/python -m pytest

## Re-execute the labs and store their outputs and widget state (refuses GPU labs on CPU machines).
labs: venv
	$(BIN)/python -m hybridpar.book.run_labs labs/*.ipynb

## Tensor-parallel layers on 2 gloo ranks versus the unsharded layers.
demo: venv
	$(BIN)/python -m hybridpar.demos.tp_layers --tp 2

clean:
	rm -rf _build .pytest_cache
