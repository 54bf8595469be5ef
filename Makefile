# Two entry points: `make demo` (the main job) and `make test`. Both install what they need.
#
# They install into a virtual environment, never into the system Python: a Debian or Ubuntu
# python3 refuses `pip install` (PEP 668, "externally managed"), and elsewhere it would write into
# the system site-packages (as root, when run so).
#   - A virtual environment that is already active (VIRTUAL_ENV set) is used as it is.
#   - Otherwise the project's own .venv, made once from the `python3` first on PATH: with `uv venv`
#     when uv is installed, else the standard library's venv.
TORCH_VERSION := 2.13.0

VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
UV := $(shell command -v uv 2>/dev/null)
# uv installs the same requirements much faster; without it, the environment's own pip.
INSTALL := $(if $(UV),$(UV) pip install --quiet --python $(PYTHON),$(PYTHON) -m pip install -q)

# Every recipe sees the environment's bin first, as after `activate`: `lmspec`, and the `ruff` that
# formats generated code, are the environment's own, not whatever else is on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo demo-checkpoint test test-slow lint bench

# The environment's python marks that it exists: made on first use, reused after.
$(PYTHON):
	$(if $(UV),$(UV) venv --quiet --python python3 $(VENV),python3 -m venv $(VENV))

# torch first, pinned: the CPU build comes from local disk and no later dependency can pull a CUDA build.
install: $(PYTHON)
	$(INSTALL) "torch==$(TORCH_VERSION)"
	$(INSTALL) -e ".[test]"

demo: install
	lmspec check examples/mimo_v2_flash.yaml
	lmspec stats examples/mimo_v2_flash.yaml
	# The demo's run directory is its own: start it afresh each time.
	lmspec train examples/mimo_v2_flash_tiny.yaml --out runs/demo --overwrite

# Two pytest workers (pytest-xdist; `make test TEST_WORKERS=8` on a bigger machine), each test file on one
# worker so that a file's module-scoped runs train once; every test already runs torch on one intra-op
# thread (tests/conftest.py).
TEST_WORKERS ?= 2
PYTEST := $(PYTHON) -m pytest -q --durations=25 --numprocesses $(TEST_WORKERS) --dist loadfile

test: install
	$(PYTEST)

test-slow: install
	$(PYTEST) -m slow

# The checkpoint the decode benchmark reads: the demo's run directory, trained by the demo's own command
# when it holds no checkpoint yet (a clean checkout), left as it is when it does.
DEMO_RUN := runs/demo
demo-checkpoint: install
	@if $(PYTHON) -c "import sys; from lmspec.runtime.checkpoint import latest_checkpoint; \
		sys.exit(latest_checkpoint('$(DEMO_RUN)') is None)"; then \
		echo "$(DEMO_RUN): has a checkpoint, not retraining"; \
	else \
		echo "$(DEMO_RUN): no checkpoint; training the demo first (about 5 minutes on 2 cores)"; \
		lmspec train examples/mimo_v2_flash_tiny.yaml --out $(DEMO_RUN) --overwrite; \
	fi

# Training (3 configs vs transformers at 2 threads, eager and compiled, MTP rows, profiler, activation
# checkpointing), CPU ops and decode benchmarks into benchmarks/results/*.json, then their tables into
# docs/performance.md. About 40 minutes on 2 cores, plus the demo's training on a clean checkout; run it
# on a quiet machine (the figures are same-run ratios, not absolutes).
bench: install demo-checkpoint
	$(PYTHON) benchmarks/train_throughput.py --threads 2 --memory --compile
	$(PYTHON) benchmarks/cpu_kernels.py
	$(PYTHON) benchmarks/decode.py --checkpoint $(DEMO_RUN) --json benchmarks/results/decode.json
	$(PYTHON) benchmarks/report.py

lint: install
	$(PYTHON) -m ruff check lmspec tests benchmarks
	$(PYTHON) -m ruff format --check lmspec tests benchmarks
