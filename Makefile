# Two commands do everything: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := data/demo
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: venv demo test test-fast test-numeric clean

venv: $(STAMP)

# torch/torchvision are pinned in pyproject.toml; pip takes them from the local wheel cache here.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: venv
	rm -rf $(DEMO) runs/demo
	$(BIN)/reid data synth --out $(DEMO)/raw --identities 200 --cameras 6 --seed 0
	$(BIN)/reid data pack market1501=$(DEMO)/raw --out $(DEMO)/shards --samples-per-shard 300
	$(BIN)/python jobs/train.py configs/demo.yaml

# the search page's test drives Debian's chromium (playwright downloads no browser here)
test: venv
	@command -v chromium >/dev/null || { echo "make test needs Debian's chromium package for the search page's test: apt-get install chromium"; exit 1; }
	$(BIN)/python -m pytest -q

# everything but the tests that run Ray Train jobs (marked `ray`): about a minute and a half on 2 cores
test-fast: venv
	$(BIN)/python -m pytest -q -m "not ray"

# the oracle tests (marked `numeric`) under each kernel set torch dispatches to on x86-64 (its default
# C++ kernels, AVX2, and this machine's own, AVX-512 where it has it) with 1 and 2 threads: users'
# CPUs differ, and a comparison that holds only for one CPU's kernels proves nothing. NUMERIC_RUNS
# lists CAPABILITY:THREADS pairs (.ci/run leaves out native:2, which `make test` has just run).
NUMERIC_RUNS ?= default:1 default:2 avx2:1 avx2:2 native:1 native:2
test-numeric: venv
	@for run in $(NUMERIC_RUNS); do capability=$${run%:*}; threads=$${run#*:}; \
		echo "numeric tier: ATEN_CPU_CAPABILITY=$$capability, $$threads threads"; \
		if [ $$capability = native ]; then unset ATEN_CPU_CAPABILITY; else export ATEN_CPU_CAPABILITY=$$capability; fi; \
		OMP_NUM_THREADS=$$threads MKL_NUM_THREADS=$$threads $(BIN)/python -m pytest -q -m "numeric and not ray" || exit 1; \
	done

clean:
	rm -rf $(DEMO) runs mlflow.db mlartifacts
