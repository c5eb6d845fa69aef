"""The transformers engine: any Hugging Face causal LM (hub id, local folder or GGUF file), CPU or GPU."""

import hashlib
import os
import importlib.util
import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.engines.base import LoadError
from workers.engines.batching import BatchingScheduler
from workers.engines.queued import QueuedEngine

log = logging.getLogger(__name__)

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


class TransformersEngine(QueuedEngine):
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

    @torch.inference_mode()
    def token_logprobs(self, ids: list[int]) -> list[float]:
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1].float()
        picked = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:], device=self.device).unsqueeze(1))
        return picked.squeeze(1).tolist()

    @staticmethod
    def _dequantized(folder: str, gguf_file: str) -> tuple[str, str | None]:
        """GGUF files are de-quantized on every load (slow): keep the result as safetensors once."""
        from django.conf import settings  # here only: the engine itself runs without Django (bench/gpu_check.py)

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
