"""The transformers engine: any Hugging Face causal LM (hub id, local folder or GGUF file), CPU or GPU."""

import hashlib
import os
import importlib.util
import logging
import queue
import shutil
import time
import uuid
from pathlib import Path

import torch
from django.conf import settings
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.engines.base import Engine, GenerationResult, LoadError
from workers.engines.batching import BatchingScheduler, BatchRequest

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.1  # how often a waiting request looks at its cancel flag

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_source(source: str) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for a deployment's model source."""
    source = source.strip()
    if source.startswith("pkg:"):
        package, _, relative = source[4:].partition("/")
        spec = importlib.util.find_spec(package)  # finds the files without running the package
        if spec is None or not spec.submodule_search_locations:
            raise LoadError(f"the package '{package}' is not installed (model source {source})")
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if not path.exists():
            raise LoadError(f"{path} does not exist (model source {source})")
        source = str(path)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise LoadError(f"{path} is a file but not a .gguf model file")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return str(path), ggufs[0].name
            raise LoadError(f"the folder {path} has neither config.json nor a .gguf file")
        return str(path), None
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise LoadError(f"no such model folder or file: {source}")
    return source, None  # a hub id


class TransformersEngine(Engine):
    def __init__(self, deployment):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = DTYPES[deployment.precision]
        if self.device == "cpu" and dtype == torch.float16:
            log.warning("fp16 is slow or unsupported on CPUs; using bf16 for %s", deployment.name)
            dtype = torch.bfloat16
        folder, gguf_file = resolve_source(deployment.model_source)
        if gguf_file:
            folder, gguf_file = self._dequantized(folder, gguf_file)
        log.info("loading %s (%s) on %s in %s", deployment.model_source, deployment.name, self.device, dtype)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise LoadError(f"cannot load {deployment.model_source}: {exc}") from exc
        self.model.to(self.device).eval()
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.eos_token_ids = self.model.generation_config.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            eos = self.eos_token_ids
            self.pad_token_id = eos[0] if isinstance(eos, list) else eos
        stop = list(self.eos_token_ids) if isinstance(self.eos_token_ids, list) else [self.eos_token_ids]
        if self.tokenizer.eos_token_id is not None:
            stop.append(self.tokenizer.eos_token_id)
        self.stop_ids = frozenset(t for t in stop if t is not None)
        self.scheduler = BatchingScheduler(
            self.model, max_batch_size=deployment.max_batch_size, name=f"engine-{deployment.name}"
        )

    @staticmethod
    def _dequantized(folder: str, gguf_file: str) -> tuple[str, str | None]:
        """GGUF files are de-quantized on every load (slow): keep the result as safetensors once."""
        path = Path(folder) / gguf_file
        stat = path.stat()
        key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        cache = Path(settings.MODEL_CACHE_DIR) / f"{path.stem}-{key}"
        if (cache / "config.json").exists():
            return str(cache), None
        log.info("de-quantizing %s (once; kept in %s)", path, cache)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        partial = cache.with_name(f"{cache.name}.partial-{os.getpid()}")
        # The weights are plain tensors now; drop the GGUF marker that forbids saving them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        try:
            partial.rename(cache)
        except OSError:  # another worker finished first
            shutil.rmtree(partial, ignore_errors=True)
        return str(cache), None

    def stream(self, prompt, params, result: GenerationResult, cancelled):
        """Submit to the batching scheduler; yield text as tokens arrive; abort when cancelled."""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        result.prompt_tokens = len(prompt_ids)
        max_new = params.max_new_tokens
        if self.context_length:
            max_new = min(max_new, self.context_length - len(prompt_ids))
        request = BatchRequest(
            id=uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            greedy=params.greedy,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
            stop_ids=self.stop_ids,
        )
        self.scheduler.submit(request)
        detok = IncrementalDecoder(self.tokenizer)
        last_check = time.monotonic()
        try:
            while True:
                try:
                    kind, value = request.out.get(timeout=CANCEL_POLL_SECONDS)
                except queue.Empty:
                    kind = None
                if time.monotonic() - last_check >= CANCEL_POLL_SECONDS or kind is None:
                    last_check = time.monotonic()
                    if cancelled():
                        self.scheduler.abort(request.id)
                if kind == "token":
                    result.completion_tokens += 1
                    text = detok.add(value)
                    if text:
                        yield text
                elif kind == "done":
                    if value == "stop":
                        result.completion_tokens += 1  # the end-of-turn token was generated too
                    result.finish_reason = value
                    tail = detok.flush()
                    if tail:
                        yield tail
                    return
                elif kind == "error":
                    raise RuntimeError(value)
        finally:
            if not result.finish_reason:  # the consumer stopped early: free the slot
                self.scheduler.abort(request.id)


class IncrementalDecoder:
    """Turns token ids into text pieces without splitting a multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = text[len(self.sent) :], text
        return delta
