# Set-up and everyday commands. The first target that needs the environment creates it.
#   make demo    train on a generated BraTS-like dataset (CPU, a few minutes)
#   make test    run the test suite
#   make notebook  execute the inspection notebook against the demo's checkpoint
#   make bench   run the benchmark suite (make bench QUICK=1: a smoke run in seconds)
# CUDA users: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.medseg-installed

.PHONY: install demo test test-fast test-ddp test-gpu notebook bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so that the CPU build (or the one TORCH names) is used rather than a default CUDA build.
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m medseg.train +experiment=demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Only the tests of the CUDA paths (bf16/fp16 steps, channels_last, torch.compile, GPU stitching); they skip without CUDA.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

# Only the multi-process tests: DDP, torchrun, simulated SLURM jobs, multirun (2 CPU processes, gloo).
test-ddp: $(STAMP)
	$(BIN)/python -m pytest tests/test_ddp.py tests/test_distributed.py $(PYTEST_ARGS)

# Execute notebooks/inspect_predictions.ipynb headless against the newest demo checkpoint (run make demo first);
# the executed copy is written to outputs/notebooks/.
notebook: $(STAMP)
	$(BIN)/python -m medseg.run_notebook notebooks/inspect_predictions.ipynb --out outputs/notebooks

# Side-by-side benchmarks (medseg.bench): a table of ratios and outputs/bench/bench.json. QUICK=1: tiny sizes.
# Timings mean something only on an otherwise idle machine, e.g. make bench BENCH_ARGS="--threads 1".
bench: $(STAMP)
	$(BIN)/python -m medseg.bench $(if $(QUICK),--quick) $(BENCH_ARGS)

clean:
	rm -rf outputs .pytest_cache
