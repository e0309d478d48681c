# Two commands set up a fresh machine: `make demo` (the main job) and `make test` (the suite).
# When torch is absent, torch==2.13.0 is installed first from pip's configured index. On Linux x86-64, PyPI's
# wheel is the CUDA build (about 530 MB plus its nvidia/cuda-toolkit wheels); for the CPU build pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu. A torch already installed is kept as it is.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_INDEX ?=

.PHONY: install demo test lint bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'

demo: install
	$(PYTHON) examples/train_tiny_llama.py --steps 200

test: install
	pytest -q -n auto --dist worksteal

lint:
	ruff check .

bench: install
	$(PYTHON) bench/step_memory.py
