# Two commands do everything: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := data/demo
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: venv demo test test-fast clean

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

test: venv
	$(BIN)/python -m pytest -q

# everything but the tests that run Ray Train jobs (marked `ray`): about a minute and a half on 2 cores
test-fast: venv
	$(BIN)/python -m pytest -q -m "not ray"

clean:
	rm -rf $(DEMO) runs mlflow.db mlartifacts
