"""The transformers engine: any Hugging Face causal LM (hub id, local folder or GGUF file), CPU or GPU."""

import os
import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.engines.base import LoadError, cached_copy, cpu_has_bf16, family_stops
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


def check_loadable(folder: str, *, trust_remote_code: bool) -> None:
    """Refuse, with the reason, a local model whose architecture transformers cannot build here:
    one that needs the modelling code shipped with it while remote code is off, or an unknown one."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return  # a hub id (or GGUF): transformers reports these itself
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot read {config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise LoadError(f"{config_path} is not a JSON object")
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return  # transformers implements it: loaded natively, whatever auto_map says
    if config.get("auto_map"):
        if not trust_remote_code:
            code = ", ".join(sorted({str(v) for v in config["auto_map"].values()}))
            raise LoadError(
                f"remote code not allowed: {folder} needs the Python modelling code that ships with it "
                f"(config.json auto_map: {code}) and this deployment's trust_remote_code is off. "
                "Turn 'Trust remote code' on in the deployment's admin page only if you trust that code."
            )
        return
    import transformers

    raise LoadError(
        f"unknown architecture: {config_path} says model_type {model_type!r} "
        f"(architectures {config.get('architectures')}), which transformers {transformers.__version__} "
        "does not implement, and the folder ships no modelling code (no auto_map in config.json)"
    )


def weight_bytes(deployment) -> int | None:
    """What the deployment's model weighs at its precision, counted from its safetensors files'
    headers (no weight is read) where the files are here: a local folder, or a hub id already in
    the hub cache. None where that cannot be told: a GGUF file, .bin weights, a model not
    downloaded yet."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    try:
        folder, gguf_file = resolve_source(deployment.model_source)
        if gguf_file:
            return None
        if not Path(folder).is_dir():
            folder = snapshot_download(folder, local_files_only=True)
        index = Path(folder) / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():  # shards, as transformers loads them (not a consolidated copy beside them)
            files = sorted({Path(folder) / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = [Path(folder) / SAFE_WEIGHTS_NAME]
        count = 0
        for path in files:
            with safe_open(path, "pt") as weights:
                count += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    except Exception:  # not here, not safetensors, unreadable: not known
        log.debug("cannot tell what %s weighs", deployment.model_source, exc_info=True)
        return None
    return count * DTYPES[deployment.precision].itemsize


def cpu_dtype_for_fp16() -> torch.dtype:
    """What a CPU runs instead of fp16: bf16 where it has bf16 instructions, else fp32."""
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text or "can't allocate memory" in text


class TransformersEngine(QueuedEngine):
    def __init__(self, deployment):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.load_notes: list[str] = []  # shown with the deployment's status in the admin
        dtype = DTYPES[deployment.precision]
        if self.device == "cpu" and dtype == torch.float16:
            dtype = cpu_dtype_for_fp16()
            note = f"fp16 asked, but CPUs run it slowly or not at all: running {str(dtype).removeprefix('torch.')}"
            log.warning("%s: %s", deployment.name, note)
            self.load_notes.append(note)
        trust = bool(getattr(deployment, "trust_remote_code", False))
        folder, gguf_file = resolve_source(deployment.model_source)
        if not gguf_file:
            check_loadable(folder, trust_remote_code=trust)
        if gguf_file:
            folder, gguf_file = self._dequantized(folder, gguf_file)
        # A model larger than one GPU: accelerate spreads its layers over all of the node's GPUs.
        spread = self.device == "cuda" and torch.cuda.device_count() > 1
        log.info("loading %s (%s) on %s in %s", deployment.model_source, deployment.name, "all GPUs" if spread else self.device, dtype)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if trust:
            kwargs["trust_remote_code"] = True
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            if spread:
                kwargs["device_map"] = "auto"
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
            if not spread:
                self.model.to(self.device)
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise LoadError(f"out of memory loading {deployment.model_source} in {dtype} on {self.device}: {exc}") from exc
            if isinstance(exc, (OSError, ValueError, KeyError, ImportError)):
                raise LoadError(f"cannot load {deployment.model_source}: {exc}") from exc
            raise
        self.model.eval()
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.eos_token_ids = self.model.generation_config.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            eos = self.eos_token_ids
            self.pad_token_id = eos[0] if isinstance(eos, list) else eos
        stop = list(self.eos_token_ids) if isinstance(self.eos_token_ids, list) else [self.eos_token_ids]
        if self.tokenizer.eos_token_id is not None:
            stop.append(self.tokenizer.eos_token_id)
        stop += family_stops(self.tokenizer, deployment.model_type)[0]
        self.stop_ids = frozenset(t for t in stop if t is not None)
        self.scheduler = BatchingScheduler(
            self.model, max_batch_size=deployment.max_batch_size, name=f"engine-{deployment.name}"
        )
        self.load_notes.append(f"decode steps: {self.scheduler.decode_mode}")

    def room_beside(self, deployment) -> bool:
        """On CUDA: whether the GPUs' free memory holds the deployment's new model's weights (where
        its files do not tell, another copy of this one's; never a vLLM engine's share; always a
        llama.cpp model, which the CPUs run). The KV cache, which grows with use, comes on top; a
        load that runs out still closes this one first."""
        if self.device != "cuda" or deployment.engine == "llamacpp":  # llama.cpp loads into the machine's memory
            return True
        if deployment.engine == "vllm":  # switched to vLLM, which takes 90% of every GPU's memory at its start
            return False
        free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return free > (weight_bytes(deployment) or self.model.get_memory_footprint())

    def close(self, timeout: float) -> bool:
        """The scheduler stopped, then the model and what holds it (the slot decoder's KV cache and
        CUDA graphs) let go: their memory goes even while a request thread still holds the engine."""
        if not super().close(timeout):
            return False
        self.scheduler.release()
        self.model = None
        return True

    def vocab_width(self) -> int:
        head = self.model.get_output_embeddings()
        return head.weight.shape[0] if head is not None else self.model.config.vocab_size

    @torch.inference_mode()
    def token_logprobs(self, ids: list[int]) -> list[float]:
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1].float()
        picked = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:], device=self.device).unsqueeze(1))
        return picked.squeeze(1).tolist()

    @staticmethod
    def _dequantized(folder: str, gguf_file: str) -> tuple[str, str | None]:
        """GGUF files are de-quantized on every load (slow): keep the result as safetensors once."""
        path = Path(folder) / gguf_file
        cache = cached_copy(path)
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
