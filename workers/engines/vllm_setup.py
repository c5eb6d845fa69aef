"""What the vLLM engine is built from: the model as a folder vLLM reads, its engine arguments from
the deployment, and, on a machine without a CUDA GPU, vLLM's CPU settings (its KV cache space and
the cores its threads are bound to) from the deployment and the machine. Never imports vLLM."""

import json
import logging
import math
import os
import re
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# vLLM's CPU settings as the worker's environment gave them: an operator's choice wins over ours.
OPERATOR_ENV = {name: os.environ.get(name) for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")}
KV_CACHE_MEMORY_SHARE = 0.5  # at most this share of the machine's memory goes to one model's KV cache


def model_folder(source: str) -> str:
    """The folder (or hub id) vLLM loads: a GGUF file becomes a plain safetensors folder, made once
    in the model cache (as the transformers engine's copy: the same folder serves both)."""
    from workers.engines.transformers_engine import TransformersEngine, resolve_source

    folder, gguf_file = resolve_source(source)
    if gguf_file:
        folder, _ = TransformersEngine._dequantized(folder, gguf_file)
    return folder


def engine_args(deployment, folder: str) -> dict:
    """vLLM's AsyncEngineArgs for a deployment. Compilation is skipped (`enforce_eager`) where
    settings.VLLM_ENFORCE_EAGER says so: tiny models in tests, where it costs more than it gains."""
    from django.conf import settings

    return dict(
        model=folder,
        dtype=DTYPES[deployment.precision],
        tensor_parallel_size=gpu_count(),
        max_model_len=deployment.context_length or None,
        max_num_seqs=deployment.max_batch_size,
        trust_remote_code=bool(getattr(deployment, "trust_remote_code", False)),
        enforce_eager=bool(getattr(settings, "VLLM_ENFORCE_EAGER", False)),
    )


def cpu_environment(deployment, folder: str, dtype: str) -> list[str]:
    """Set vLLM's CPU variables for the engine about to start (where no CUDA GPU is); the notes say
    what was chosen. VLLM_CPU_KVCACHE_SPACE (GiB): room for the deployment's max_batch_size
    sequences of its context, capped at half the machine's memory (vLLM's default reserves far
    more). VLLM_CPU_OMP_THREADS_BIND: every core this worker may use (vLLM's `auto` leaves one out)."""
    if gpu_count(cuda_only=True):
        return []
    notes = []
    space = OPERATOR_ENV["VLLM_CPU_KVCACHE_SPACE"]
    if space is None:
        space = str(kv_cache_gib(folder, dtype, deployment.max_batch_size, deployment.context_length))
        notes.append(f"vLLM on CPU: KV cache {space} GiB for {deployment.max_batch_size} sequences")
    cores = OPERATOR_ENV["VLLM_CPU_OMP_THREADS_BIND"] or ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    os.environ.update(VLLM_CPU_KVCACHE_SPACE=space, VLLM_CPU_OMP_THREADS_BIND=cores)
    log.info("%s: VLLM_CPU_KVCACHE_SPACE=%s VLLM_CPU_OMP_THREADS_BIND=%s", deployment.name, space, cores)
    return notes


def kv_cache_gib(folder: str, dtype: str, sequences: int, context: int | None) -> int:
    """Whole GiB of KV cache for `sequences` full contexts of the model in `folder` (at least 1)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        config = config.get("text_config", config)
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        per_token = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim
        context = context or config.get("max_position_embeddings") or 2048
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 4  # vLLM's own CPU default, where the config does not tell
    need = per_token * DTYPE_BYTES.get(dtype, 2) * sequences * context
    cap = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * KV_CACHE_MEMORY_SHARE
    return max(1, math.ceil(min(need, cap) / 2**30))


def gpu_count(cuda_only: bool = False) -> int:
    """The node's CUDA GPUs (tensor parallelism spans them all); at least 1 unless `cuda_only`."""
    try:
        import torch

        count = torch.cuda.device_count()
    except ImportError:
        count = 0
    return count if cuda_only else max(1, count)


class StderrTail:
    """While vLLM starts its engine (`with StderrTail() as tail:`), what this process and the
    processes it starts write to stderr goes through a pipe: passed on unchanged to the real stderr
    for as long as they live, with the last lines kept. vLLM's engine processes report why they
    could not start only there; `reason()` finds it."""

    def __init__(self, lines: int = 400):
        self.lines: deque[str] = deque(maxlen=lines)

    def __enter__(self) -> "StderrTail":
        import sys
        import threading

        sys.stderr.flush()
        read_end, write_end = os.pipe()
        self._out = os.dup(2)  # the real stderr, written by the pump until the last writer exits
        self._saved = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        threading.Thread(target=self._pump, args=(read_end,), name="vllm-stderr", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)  # this process writes to the real stderr again; vLLM's keep the pipe
        os.close(self._saved)

    def _pump(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                os.write(self._out, chunk)
                *complete, pending = (pending + chunk).split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in complete)
        os.close(self._out)

    def reason(self) -> str:
        """The first error a traceback ended with, vLLM's log prefix removed ("" where none)."""
        for line in list(self.lines):
            text = ERROR_LINE.search(line)
            if text and not any(generic in text.group(1) for generic in GENERIC_ERRORS):
                return text.group(1).strip()
        return ""


ERROR_LINE = re.compile(r"(?:^|\] )((?:[A-Za-z_][\w.]*)(?:Error|Exception): .+)$")
# vLLM's own wrappers, which point at the real reason instead of saying it
GENERIC_ERRORS = ("See stack trace", "See root cause", "initialization failed", "EngineDeadError")
