# Two entry points: `make demo` (the main job) and `make test`. Both install what they need.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION := 2.13.0

.PHONY: install demo test test-slow lint

# torch first, pinned: the CPU build comes from local disk and no later dependency can pull a CUDA build.
install:
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[test]"

demo: install
	lmspec check examples/mimo_v2_flash.yaml
	lmspec stats examples/mimo_v2_flash.yaml
	# The demo's run directory is its own: start it afresh each time.
	rm -rf runs/demo
	lmspec train examples/mimo_v2_flash_tiny.yaml --out runs/demo

test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

lint:
	ruff check lmspec tests benchmarks
