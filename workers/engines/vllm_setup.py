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
        load_format="dummy" if random_weights(folder) else "auto",
    )


def cpu_dtype(dtype: str) -> tuple[str, str | None]:
    """The dtype vLLM runs a deployment's precision in, and a note where it is not the one asked:
    on a CPU, fp16 runs as bf16 where the CPU has bf16 instructions and bf16 or fp16 as fp32 where
    it has none (as the transformers engine does); a CUDA GPU runs what was asked."""
    from workers.engines.base import cpu_has_bf16

    if dtype == "float32" or gpu_count(cuda_only=True):
        return dtype, None
    runs = "bfloat16" if cpu_has_bf16() else "float32"
    if runs == dtype:
        return dtype, None
    return runs, f"{dtype} asked, but this CPU has {'no bf16 instructions' if runs == 'float32' else 'no fast float16'}: vLLM runs {runs}"


def random_weights(folder: str) -> bool:
    """Whether the folder's config.json asks for random weights (`"llmsite_random_weights": true`,
    vLLM's load_format "dummy"): tiny test models of an architecture whose weights nobody needs."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("llmsite_random_weights") is True
    except (OSError, ValueError, AttributeError):
        return False


def cpu_settings(deployment, folder: str, dtype: str) -> tuple[dict, list[str]]:
    """vLLM's CPU settings for the engine about to start (where no CUDA GPU is): more engine
    arguments, and notes saying what was chosen. Its KV cache (`kv_cache_memory_bytes`, what the
    VLLM_CPU_KVCACHE_SPACE variable sets in GiB): room for the deployment's max_batch_size sequences
    of its context, capped at half the machine's memory (vLLM's own default reserves far more);
    VLLM_CPU_KVCACHE_SPACE in the worker's environment wins. VLLM_CPU_OMP_THREADS_BIND: every core
    this worker may use (vLLM's `auto` leaves one out), unless the environment sets it."""
    if gpu_count(cuda_only=True):
        return {}, []
    extra, notes = {}, []
    if not OPERATOR_ENV["VLLM_CPU_KVCACHE_SPACE"]:
        size = kv_cache_bytes(folder, dtype, deployment.max_batch_size, deployment.context_length)
        extra["kv_cache_memory_bytes"] = size
        notes.append(f"vLLM on CPU: KV cache {size / 2**30:.2f} GiB for {deployment.max_batch_size} sequences")
    cores = OPERATOR_ENV["VLLM_CPU_OMP_THREADS_BIND"] or ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores
    log.info("%s: vLLM KV cache %s, VLLM_CPU_OMP_THREADS_BIND=%s", deployment.name, extra.get("kv_cache_memory_bytes", "from VLLM_CPU_KVCACHE_SPACE"), cores)
    return extra, notes


def kv_cache_bytes(folder: str, dtype: str, sequences: int, context: int | None) -> int:
    """Bytes of KV cache for `sequences` full contexts of the model in `folder` (whole MiB)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        config = config.get("text_config", config)
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config.get("kv_channels") or config["hidden_size"] // heads
        layers = config.get("num_hidden_layers") or config["num_layers"]  # num_layers: ChatGLM's name
        grouped = config.get("multi_query_group_num") if config.get("multi_query_attention") else None
        per_token = 2 * layers * (config.get("num_key_value_heads") or grouped or heads) * head_dim
        context = context or config.get("max_position_embeddings") or config.get("seq_length") or 2048
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 4 * 2**30  # vLLM's old CPU default, where the config does not tell
    need = per_token * DTYPE_BYTES.get(dtype, 2) * sequences * context
    cap = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * KV_CACHE_MEMORY_SHARE
    return math.ceil(min(need, cap) / 2**20) * 2**20


def gpu_count(cuda_only: bool = False) -> int:
    """The node's CUDA GPUs (tensor parallelism spans them all); at least 1 unless `cuda_only`."""
    try:
        import torch

        count = torch.cuda.device_count()
    except ImportError:
        count = 0
    return count if cuda_only else max(1, count)


class OutputTail:
    """While vLLM starts its engine (`with OutputTail() as tail:`), what this process and the
    processes it starts write to stdout and stderr goes through pipes: passed on unchanged to the
    real ones for as long as they live, with the last lines kept. vLLM's engine processes report
    why they could not start only there (its log lines on stdout, tracebacks on stderr);
    `reason()` finds it."""

    FDS = (1, 2)

    def __init__(self, lines: int = 400):
        self.lines: deque[str] = deque(maxlen=lines)
        self._saved: dict[int, int] = {}

    def __enter__(self) -> "OutputTail":
        import threading

        _flush()
        for fd in self.FDS:
            read_end, write_end = os.pipe()
            real = os.dup(fd)  # written by the pump until the last writer of the pipe exits
            self._saved[fd] = os.dup(fd)
            os.dup2(write_end, fd)
            os.close(write_end)
            threading.Thread(target=self._pump, args=(read_end, real), name=f"vllm-output-{fd}", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        _flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # this process writes to the real one again; vLLM's processes keep the pipe
            os.close(saved)

    def _pump(self, read_end: int, real: int) -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                os.write(real, chunk)
                *complete, pending = (pending + chunk).split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in complete)
        os.close(real)

    def reason(self) -> str:
        """The first error a traceback or log line ended with, vLLM's log prefix removed ("" where none)."""
        for line in list(self.lines):
            text = ERROR_LINE.search(line)
            if text and not any(generic in text.group(1) for generic in GENERIC_ERRORS):
                return text.group(1).strip()
        return ""


def _flush() -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass


ERROR_LINE = re.compile(r"(?:^|\] )((?:[A-Za-z_][\w.]*)(?:Error|Exception): .+)$")
# vLLM's own wrappers, which point at the real reason instead of saying it
GENERIC_ERRORS = ("See stack trace", "See root cause", "initialization failed", "EngineDeadError")
