"""The llama.cpp engine: its tokenizer, its llama.cpp contexts and its scheduler, sized from the
deployment and the LLAMACPP_* settings.

Mixed precision, chosen by measurement (README, "Fast CPU engine"): with a 4-bit file, llama.cpp
rounds activations to 8 bits inside every matrix product, and that flips near ties: SmolLM2's
first answer token to "What is the capital of France?" is "The" at -1.88 and "L" at -1.97 nats in
fp32, and the 4-bit path answers "L'Étoile, la Marseillaise…". So prompts are prefilled by an f16
copy of the same weights (made once from the file, kept in the model cache): the prompt's KV
cache and the first token come out at f16 precision, and the KV rows are then moved into the
decoding context, which runs every following token on an 8-bit (Q8_0) copy: on 2 cores llama.cpp
is compute-bound for such a small model, and its batched Q8_0 kernels run 32 streams about 1.3x
faster than the 4-bit file's at the same single-stream speed (README, "Fast CPU engine").
LLAMACPP_PREFILL and LLAMACPP_DECODE (`f16`, `q8_0`, or `file`) choose otherwise.
"""

from __future__ import annotations

import os

from workers.engines.base import LoadError, family_stops
from workers.engines.llamacpp.config import MAX_SEQUENCES, count_setting, setting
from workers.engines.llamacpp.model import CONVERSIONS, LlamaCppModel, converted_copy
from workers.engines.llamacpp.saved import SavedPrompts
from workers.engines.llamacpp.scheduler import LlamaCppScheduler
from workers.engines.queued import QueuedEngine


class LlamaCppEngine(QueuedEngine):
    def __init__(self, deployment):
        from transformers import AutoTokenizer

        from workers.engines.transformers_engine import resolve_source

        folder, gguf_file = resolve_source(deployment.model_source)
        if not gguf_file:
            raise LoadError(
                f"the llamacpp engine runs GGUF model files; {deployment.model_source} is not one "
                "(choose the transformers engine for it)"
            )
        path = os.path.join(folder, gguf_file)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise LoadError(f"cannot read the tokenizer of {path}: {exc}") from exc
        probe = LlamaCppModel(path, kv_tokens=256, max_sequences=1)  # what the file holds
        quantized, train_context, kv_bytes = probe.quantized, probe.n_ctx_train, probe.kv_bytes_per_token()
        probe.close()
        seq_tokens, size = self._kv_room(deployment, train_context, kv_bytes)
        self._load_contexts(path, quantized, seq_tokens, size)
        stop = set(self.model.end_of_generation_ids()) | set(family_stops(self.tokenizer, deployment.model_type)[0])
        if self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        self.stop_ids = frozenset(stop)
        self.n_vocab = self.model.n_vocab  # asked of a closed engine too (a late request's policy)
        prefix_cache = setting("LLAMACPP_PREFIX_CACHE")
        saved = self._saved_prompts(prefix_cache, kv_bytes)
        self.scheduler = LlamaCppScheduler(
            self.model,
            prefill=self.prefill_model,
            max_batch_size=size,
            name=f"engine-{deployment.name}",
            prefix_cache=prefix_cache,
            saved=saved,
        )

    def _kv_room(self, deployment, train_context: int, kv_bytes: int) -> tuple[int, int]:
        """Each request's room in the KV cache (tokens), and how many requests run at once."""
        seq_tokens = min(deployment.context_length or count_setting("LLAMACPP_SEQ_TOKENS"), max(train_context, 256))
        seq_tokens = max(256, seq_tokens // 256 * 256)  # llama.cpp sizes its cache in steps of 256
        budget = count_setting("LLAMACPP_KV_MIB") * 2**20
        size = max(1, min(deployment.max_batch_size, budget // (seq_tokens * kv_bytes), MAX_SEQUENCES - 2))
        self.load_notes = [f"llama.cpp KV cache: {size} sequences x {seq_tokens} tokens ({size * seq_tokens * kv_bytes / 2**30:.2f} GiB)"]
        if size < deployment.max_batch_size:
            self.load_notes.append(
                f"max_batch_size {deployment.max_batch_size} cut to {size} by LLAMACPP_KV_MIB or llama.cpp's {MAX_SEQUENCES} sequences"
            )
        return seq_tokens, size

    def _load_contexts(self, path: str, quantized: bool, seq_tokens: int, size: int) -> None:
        """The decoding context (`model`) and, for a quantized file, the prefill context (`prefill_model`)."""
        decode_format = setting("LLAMACPP_DECODE")
        # decode with a converted copy of a quantized file (see the module's docstring)
        decode_path = converted_copy(path, decode_format) if quantized and decode_format in CONVERSIONS else path
        # One KV stream per sequence (kv_unified off): each request attends to its own rows only.
        # In one shared cache every row of a step attends over every request's cells (masked), which
        # costs more than the weights at 32 streams.
        self.model = LlamaCppModel(decode_path, kv_tokens=seq_tokens * size, max_sequences=size, unified=False)
        self.context_length = seq_tokens
        self.prefill_model = None
        prefill_format = setting("LLAMACPP_PREFILL")
        if quantized and prefill_format in CONVERSIONS:
            # prompts only, briefly: one shared cache the size of one request's room
            # two more sequence ids: the kept prompt prefix's and a throwaway row's (TWO_ROWS)
            self.prefill_model = LlamaCppModel(converted_copy(path, prefill_format), kv_tokens=seq_tokens, max_sequences=size + 2)

    def _saved_prompts(self, prefix_cache: bool, kv_bytes: int) -> SavedPrompts | None:
        """Memory for finished requests' KV rows (LLAMACPP_PROMPT_CACHE_MIB), where prompts have a prefill context."""
        saved_mib = setting("LLAMACPP_PROMPT_CACHE_MIB")
        saved = SavedPrompts(saved_mib * 2**20) if prefix_cache and self.prefill_model and saved_mib > 0 else None
        if saved is not None:
            self.load_notes.append(f"saved prompts: up to {saved_mib} MiB of finished requests' KV rows ({saved_mib * 2**20 // kv_bytes} tokens)")
        return saved

    def vocab_width(self) -> int:
        return self.n_vocab

    def close(self, timeout: float) -> bool:
        if not self.scheduler.retire(timeout):  # its thread first: it decodes with these contexts
            return False
        with self.scheduler.lock:  # and text being scored (token_logprobs) to its end
            for model in (self.model, self.prefill_model):
                if model is not None:
                    model.close()
            self.model = self.prefill_model = None
        return True

    def token_logprobs(self, ids: list[int]) -> list[float]:
        with self.scheduler.exclusive() as seq:
            return self.model.token_logprobs(ids, seq)
