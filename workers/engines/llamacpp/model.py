"""llama.cpp through llama-cpp-python's C API bindings: a GGUF model with one context
(`LlamaCppModel`), converted copies of a GGUF file, and a sequence's saved KV rows re-addressed
between caches of one stream and of one stream per sequence."""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading

import numpy as np

from workers.engines.base import LoadError, cached_copy
from workers.engines.llamacpp.config import BATCH_TOKENS, default_threads

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False


def _llama():
    """Import llama-cpp-python (only where this engine is used) and start its backend once."""
    global _backend_ready
    try:
        import llama_cpp
    except ImportError as exc:
        raise LoadError(f"the llamacpp engine needs llama-cpp-python: {exc}") from exc
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


CONVERSIONS = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def converted_copy(path: str, kind: str) -> str:
    """The GGUF file's weights as `kind` (llama.cpp's own converter), made once, kept in the model cache."""
    target = cached_copy(path, f".{kind}.gguf")
    if target.exists():
        return str(target)
    lib = _llama()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, CONVERSIONS[kind])
    params.allow_requantize = True
    params.nthread = default_threads()
    log.info("writing a %s copy of %s (once; kept in %s)", kind, path, target)
    if lib.llama_model_quantize(path.encode(), str(partial).encode(), params) != 0:
        partial.unlink(missing_ok=True)
        raise LoadError(f"llama.cpp cannot convert {path} to {kind}")
    partial.rename(target)
    return str(target)


class LlamaCppModel:
    """A GGUF model and one llama.cpp context, driven through llama-cpp-python's C API bindings."""

    def __init__(self, path: str, *, kv_tokens: int, max_sequences: int, unified: bool = True, threads: int | None = None):
        self.lib = lib = _llama()
        _quiet(lib)
        params = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise LoadError(f"llama.cpp cannot load {path} (not a GGUF model it supports?)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.model)
        # under 1.5 bytes a weight: a quantized file (f16 and bf16 take 2, f32 4)
        self.quantized = lib.llama_model_size(self.model) < 1.5 * lib.llama_model_n_params(self.model)
        self.threads = threads or default_threads()
        self.kv_tokens = min(kv_tokens, max(self.n_ctx_train, 256) * max_sequences)
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = self.kv_tokens
        ctx_params.n_batch = BATCH_TOKENS
        ctx_params.n_ubatch = BATCH_TOKENS
        ctx_params.n_seq_max = max_sequences
        ctx_params.n_threads = self.threads
        ctx_params.n_threads_batch = self.threads
        ctx_params.kv_unified = unified  # else the cache is split evenly, one stream per sequence
        self.streams = 1 if unified else max_sequences
        ctx_params.flash_attn_type = 1  # llama.cpp's flash attention (on CPU too): faster batched decode
        ctx_params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LoadError(f"llama.cpp cannot create a context of {self.kv_tokens} tokens for {path}")
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.lock = threading.Lock()  # one llama.cpp call at a time on this context
        # How often rows left the cache: new rows go into the first free cells from the cache's
        # head, so rows that left between two calls for a sequence may put its later rows in cells
        # before its earlier ones (LlamaCppScheduler._keep_prefix).
        self.frees = 0

    def kv_bytes_per_token(self) -> int:
        """Bytes of f16 keys and values one token takes in the cache, over all layers."""
        lib, model = self.lib, self.model
        head_dim = lib.llama_model_n_embd(model) // max(lib.llama_model_n_head(model), 1)
        return 2 * 2 * lib.llama_model_n_layer(model) * lib.llama_model_n_head_kv(model) * head_dim

    def end_of_generation_ids(self) -> list[int]:
        """The vocabulary's end-of-generation tokens (a scan of the whole vocabulary: call once)."""
        return [t for t in range(self.n_vocab) if self.lib.llama_vocab_is_eog(self.vocab, t)]

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode call over (token, position, sequence id, wants logits) rows."""
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(rows)
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}" + (" (the KV cache is full)" if code == 1 else ""))

    def all_logits(self, rows: int) -> np.ndarray:
        """The logits of the last decode's first `rows` outputs, one row each (a view)."""
        pointer = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self.n_vocab))

    def logits(self, row: int) -> np.ndarray:
        """The logits of batch row `row` of the last decode (a view, valid until the next one)."""
        pointer = self.lib.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def forget(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.frees += 1

    def clear(self) -> None:
        """Forget every sequence; new rows go into the first cells again."""
        self.lib.llama_memory_clear(self.memory, False)
        self.frees += 1

    def share(self, source: int, target: int, tokens: int) -> None:
        """Give sequence `target` the KV rows of `source`'s first `tokens` positions (in a unified
        cache the rows are shared, not copied)."""
        self.lib.llama_memory_seq_cp(self.memory, source, target, 0, tokens)

    def move(self, seq: int, other: "LlamaCppModel") -> bytes:
        """Move a sequence's KV rows into another context of the same architecture (f16 cache,
        flash attention on in both, so the rows' types and layout match). Returns them as saved
        from this context."""
        rows = self.state(seq)
        other.restore(seq, restream(rows, other.streams))
        self.forget(seq)
        return rows

    def truncate(self, seq: int, keep: int) -> None:
        """Forget a sequence's rows from position `keep` on."""
        self.lib.llama_memory_seq_rm(self.memory, seq, keep, -1)
        self.frees += 1

    def state(self, seq: int) -> bytes:
        """A sequence's KV rows as llama.cpp saves them (its cells in the cache's order)."""
        size = self.lib.llama_state_seq_get_size(self.ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = self.lib.llama_state_seq_get_data(self.ctx, buffer, size, seq)
        if not written:
            raise RuntimeError("llama.cpp could not save a sequence's KV cache")
        return ctypes.string_at(buffer, written)  # one copy (slicing the array makes a list: 24 ms for 35 tokens)

    def restore(self, seq: int, data: bytes) -> None:
        """Put saved KV rows back as sequence `seq` (what it held before goes), in the first free
        cells from the cache's head, in the order saved."""
        self.forget(seq)
        rows = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if self.lib.llama_state_seq_set_data(self.ctx, rows, len(data), seq) != len(data):
            raise RuntimeError("llama.cpp could not restore a sequence's KV cache")

    def token_logprobs(self, ids: list[int], seq: int = 0) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1 on sequence `seq`, which no request may be using
        (the caller holds `lock`; see LlamaCppScheduler.exclusive)."""
        out = []
        self.forget(seq)
        try:
            for start in range(0, len(ids), BATCH_TOKENS):
                chunk = ids[start : start + BATCH_TOKENS]
                self.decode([(t, start + i, seq, True) for i, t in enumerate(chunk)])
                for i in range(len(chunk)):
                    target = start + i + 1
                    if target < len(ids):
                        row = self.logits(i).astype(np.float64)
                        top = row.max()
                        out.append(float(row[ids[target]] - top - np.log(np.exp(row - top).sum())))
        finally:
            self.forget(seq)  # a failed call leaves nothing behind for the next user of the id
        return out


STATE_HEADER_BYTES = 8  # llama.cpp's sequence state begins with a magic number and a version


def restream(state: bytes, streams: int) -> bytes:
    """One sequence's saved KV state, re-addressed to a cache of `streams` streams.

    llama.cpp writes a sequence's state as a header (magic, version: 8 bytes), its cache's stream
    count (uint32), then per stream a cell count and that stream's cells; it refuses a state whose
    stream count differs from its own, and reads every non-empty entry into the sequence's own
    stream. A state from a one-stream (unified) cache thus becomes a `streams`-stream one by its
    count and empty entries after it. (llama.cpp's format as of llama-cpp-python 0.3.36; `move`
    checks that llama.cpp takes every byte, and the engine's tests move real prompts.)
    """
    (count,) = struct.unpack_from("<I", state, STATE_HEADER_BYTES)
    if count == streams:
        return state
    if count != 1:
        raise RuntimeError(f"cannot move a KV state of {count} streams into a cache of {streams}")
    head, body = state[:STATE_HEADER_BYTES], state[STATE_HEADER_BYTES + 4 :]
    return head + struct.pack("<I", streams) + body + struct.pack("<I", 0) * (streams - 1)


def one_stream(state: bytes, stream: int, streams: int) -> bytes:
    """The saved KV state of a sequence of a `streams`-stream cache (its rows in stream `stream`,
    every other stream's entry empty), as a one-stream (unified) cache saves it: `restream` the
    other way."""
    (count,) = struct.unpack_from("<I", state, STATE_HEADER_BYTES)
    if count != streams:
        raise RuntimeError(f"a KV state of {count} streams, not {streams}")
    view = memoryview(state)
    start, end = STATE_HEADER_BYTES + 4 + 4 * stream, len(state) - 4 * (streams - stream - 1)
    if any(view[STATE_HEADER_BYTES + 4 : start]) or any(view[end:]):
        raise RuntimeError("a KV state with rows in more than one stream")
    return b"".join((view[:STATE_HEADER_BYTES], struct.pack("<I", 1), view[start:end]))


def _quiet(lib) -> None:
    """Send llama.cpp's own log lines to Python logging at debug level instead of stderr."""
    global _log_callback
    if _log_callback is None:

        @lib.llama_log_callback
        def forward(level, text, user_data):
            log.debug("llama.cpp: %s", text.decode(errors="replace").rstrip())

        _log_callback = forward
        lib.llama_log_set(_log_callback, ctypes.c_void_p(0))


_log_callback = None
