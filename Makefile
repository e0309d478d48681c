# Two commands set up a fresh machine: `make demo` (the main job) and `make test` (the suite).
# torch is installed first from the pinned CPU build when absent, so pip never pulls a CUDA build.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test lint bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'

demo: install
	$(PYTHON) examples/train_tiny_llama.py --steps 200

test: install
	pytest -q -n auto --dist worksteal

lint:
	ruff check .

bench: install
	$(PYTHON) bench/step_memory.py
