"""The llama.cpp engine: GGUF models on CPUs, at llama.cpp's own speed, with continuous batching.

One scheduler thread owns a llama.cpp context with room for up to `max_batch_size` sequences (one
sequence id per request, each with its own stream of the KV cache, LLAMACPP_SEQ_TOKENS or the
deployment's context_length long, within LLAMACPP_KV_MIB). Each step sends ONE batch to `llama_decode`: the next
token of every running request plus a chunk of the prompts that are joining, so requests join and
leave between steps and a long prompt never stalls the running streams for long. Sampling, stop
tokens and the token/text stream are the same as the transformers engine's (`QueuedEngine`), and
so is the tokenizer (transformers' tokenizer read from the same GGUF file), so prompts, token
counts and chat templates do not depend on the engine.

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

The prefill context keeps the KV rows of the prompt prefix that consecutive prompts shared (the
chat template's header and a system prompt, or the earlier turns of one conversation) under a
sequence id of its own: a prompt that starts with it gets those rows by reference
(`llama_memory_seq_cp`, no arithmetic) and prefills only the rest (LLAMACPP_PREFIX_CACHE=0: off).
Finished requests' KV rows (prompt and answer) are also kept in memory, up to
LLAMACPP_PROMPT_CACHE_MIB (`SavedPrompts`): the next turn of a conversation starts with the whole
of the turn before, and gets those rows back by a copy instead of prefilling the conversation again.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import logging
import os
import struct
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.engines.base import LoadError, cached_copy
from workers.engines.batching import BatchRequest, BatchingScheduler
from workers.engines.queued import QueuedEngine

log = logging.getLogger(__name__)

DEFAULT_SEQ_TOKENS = 2048  # each request's room in the KV cache (prompt + answer), unless the deployment sets context_length
DEFAULT_KV_MIB = 4096  # at most this much KV cache: fewer sequences run at once where it would take more
# TWO_ROWS: a llama_decode call of one row takes llama.cpp's matrix-vector path, which rounds
# differently from the matrix-matrix path of longer calls (any rows: chunks of a prompt, other
# prompts'): the prompt's last KV row comes out different at f16 rounding, and decoding on Q8_0
# weights turns that into 0.2-0.3 nats on the next tokens (measured), enough to flip an answer's
# near tie. So no prompt ends with a call of one row, and a prompt's answer does not depend on how
# it was chunked (in calls of fewer than TILED_ROWS rows) or what it shared with a kept prefix: the
# same bit for bit (tested).
# TILED_ROWS: llama.cpp's CPU flash attention computes a call of 64 query rows or more (all
# sequences' rows together; GGML_FA_TILE_Q) in a tiled way (f32, 64-cell KV tiles), a smaller call
# row by row (f16): the same row rounds differently in a large call and a small one, by 0.02-0.05
# nats on a prompt's last row (measured). A prompt asked again gets all but its last two rows back
# from the kept or saved rows and computes those two in a small call, so every prompt's last rows
# go in a call of fewer than TILED_ROWS rows (its last FINAL_ROWS at least, where it is longer), and
# a greedy answer asked twice (Regenerate) stays the same however long its prompt, while its rows
# are kept or saved.
TILED_ROWS = 64
FINAL_ROWS = 16
PREFIX_MIN_TOKENS = 8  # a shorter shared prompt prefix is not worth keeping
FILL_GAP_MAX = 3  # free sequence ids between running ones given throwaway rows (LlamaCppScheduler._decode_rows)
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ; the prefill context takes two more than the requests
BATCH_TOKENS = 512  # tokens sent to one llama_decode call (running rows first, then prompt chunks)
DEFAULT_PROMPT_CACHE_MIB = 256  # finished requests' KV rows kept in memory (SavedPrompts)

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


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return max(1, int(value)) if value else default


def default_threads() -> int:
    """LLAMACPP_THREADS, else every core this process may use. Measured with `make bench` on an
    otherwise idle 2-core machine (the web tier, Redis and the worker sharing it): 2 threads give
    60 tok/s through the predict API for one stream and 119 for 32, 1 thread 44 and 56. llama.cpp's
    threads spin at every barrier, so on a machine crowded with other work 1 thread can be faster
    (seen under a load average of 9: 21.6 tok/s with 1 thread, 2.7 with 2)."""
    return env_int("LLAMACPP_THREADS", len(os.sched_getaffinity(0)))


class LlamaCppEngine(QueuedEngine):
    def __init__(self, deployment):
        from transformers import AutoTokenizer

        from workers.engines.transformers_engine import family_stop_ids, resolve_source

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
        seq_tokens = min(deployment.context_length or env_int("LLAMACPP_SEQ_TOKENS", DEFAULT_SEQ_TOKENS), max(train_context, 256))
        seq_tokens = max(256, seq_tokens // 256 * 256)  # llama.cpp sizes its cache in steps of 256
        budget = env_int("LLAMACPP_KV_MIB", DEFAULT_KV_MIB) * 2**20
        size = max(1, min(deployment.max_batch_size, budget // (seq_tokens * kv_bytes), MAX_SEQUENCES - 2))
        self.load_notes = [f"llama.cpp KV cache: {size} sequences x {seq_tokens} tokens ({size * seq_tokens * kv_bytes / 2**30:.2f} GiB)"]
        if size < deployment.max_batch_size:
            self.load_notes.append(
                f"max_batch_size {deployment.max_batch_size} cut to {size} by LLAMACPP_KV_MIB or llama.cpp's {MAX_SEQUENCES} sequences"
            )
        decode_format = os.environ.get("LLAMACPP_DECODE", "q8_0")
        # decode with a converted copy of a quantized file (see the module's docstring)
        decode_path = converted_copy(path, decode_format) if quantized and decode_format in CONVERSIONS else path
        # One KV stream per sequence (kv_unified off): each request attends to its own rows only.
        # In one shared cache every row of a step attends over every request's cells (masked), which
        # costs more than the weights at 32 streams.
        self.model = LlamaCppModel(decode_path, kv_tokens=seq_tokens * size, max_sequences=size, unified=False)
        self.context_length = seq_tokens
        self.prefill_model = None
        prefill_format = os.environ.get("LLAMACPP_PREFILL", "f16")
        if quantized and prefill_format in CONVERSIONS:
            # prompts only, briefly: one shared cache the size of one request's room
            # two more sequence ids: the kept prompt prefix's and a throwaway row's (TWO_ROWS)
            self.prefill_model = LlamaCppModel(converted_copy(path, prefill_format), kv_tokens=seq_tokens, max_sequences=size + 2)
        stop = set(self.model.end_of_generation_ids()) | set(family_stop_ids(self.tokenizer, deployment.model_type))
        if self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        self.stop_ids = frozenset(stop)
        prefix_cache = os.environ.get("LLAMACPP_PREFIX_CACHE", "1") != "0"
        saved_mib = int(os.environ.get("LLAMACPP_PROMPT_CACHE_MIB", DEFAULT_PROMPT_CACHE_MIB))
        saved = SavedPrompts(saved_mib * 2**20) if prefix_cache and self.prefill_model and saved_mib > 0 else None
        if saved is not None:
            self.load_notes.append(f"saved prompts: up to {saved_mib} MiB of finished requests' KV rows ({saved_mib * 2**20 // kv_bytes} tokens)")
        self.scheduler = LlamaCppScheduler(
            self.model,
            prefill=self.prefill_model,
            max_batch_size=size,
            name=f"engine-{deployment.name}",
            prefix_cache=prefix_cache,
            saved=saved,
        )

    def token_logprobs(self, ids: list[int]) -> list[float]:
        with self.scheduler.exclusive() as seq:
            return self.model.token_logprobs(ids, seq)


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


def _common_length(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _shareable(prompt: list[int], other: list[int]) -> int:
    """How many of the prompt's first tokens may come from `other`'s rows: what they have in common,
    less the prompt's last two (the last is computed for its logits, and no prompt ends with a call
    of one row, TWO_ROWS)."""
    return min(_common_length(prompt, other), len(prompt) - 2)


class SavedPrompts:
    """KV rows of whole prompts, and of prompts with their answers, keyed by their tokens, as a
    one-stream context saves them (llama_state_seq_get_data); least recently used out first, within
    a budget of bytes. A conversation's next turn starts with the whole of the turn before (and a
    Regenerate repeats its prompt): those rows come back by a copy instead of a prefill."""

    def __init__(self, budget: int):
        self.budget = budget
        self.size = 0
        # (cache scope, tokens) -> (tokens as an array, rows); a prompt matches its own scope's only
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], tuple[np.ndarray, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _common(self, tokens: np.ndarray, scope: str) -> list[tuple[tuple, int]]:
        """Each saved prompt of `scope`: its key and how many first tokens it shares with `tokens`."""
        out = []
        for saved, (array, _) in self._entries.items():
            if saved[0] != scope:
                continue
            n = min(len(array), len(tokens))
            same = array[:n] == tokens[:n]
            out.append((saved, n if same.all() else int(np.argmin(same))))
        return out

    def match(self, prompt: list[int], scope: str = "") -> tuple[int, tuple | None]:
        """The longest number of first tokens the prompt shares with a saved one of its scope, and
        that one's key."""
        best, key = 0, None
        for saved, common in self._common(np.asarray(prompt, dtype=np.int64), scope):
            if common > best:
                best, key = common, saved
        return best, key

    def take(self, key: tuple) -> bytes:
        """A saved prompt's rows (now the most recently used)."""
        self._entries.move_to_end(key)
        return self._entries[key][1]

    def put(self, prompt: list[int], rows: bytes, scope: str = "") -> None:
        """Save a prompt's rows. Where a saved prompt starts with this one, it gives the same rows:
        it is the one used now, and nothing more is saved. Saved prompts this one starts with go (it
        covers them), then the least recently used ones until the rest fits."""
        tokens = np.asarray(prompt, dtype=np.int64)
        common = self._common(tokens, scope)
        for saved, shared in common:
            if shared == len(tokens):
                self._entries.move_to_end(saved)
                return
        if len(rows) > self.budget:
            return
        for saved, shared in common:
            if shared == len(saved[1]):
                self._drop(saved)
        while self._entries and self.size + len(rows) > self.budget:
            self._drop(next(iter(self._entries)))
        self._entries[(scope, tuple(prompt))] = (tokens, rows)
        self.size += len(rows)

    def forget(self, key: tuple) -> None:
        if key in self._entries:
            self._drop(key)

    def _drop(self, key: tuple) -> None:
        self.size -= len(self._entries.pop(key)[1])


@dataclass
class _Sequence:
    request: BatchRequest
    seq: int
    pending: deque = field(default_factory=deque)  # prompt tokens not yet sent
    pos: int = 0
    last_token: int = -1
    reserved: int = 0  # KV tokens this request may grow to
    prefill_cells: int = 0  # prompt tokens it adds to the prefill context (those not shared)
    shared: int = 0  # prompt tokens whose KV rows it shares with the kept prefix
    in_order: bool = True  # its rows sit in the prefill context's cells in position order (_keep_prefix)
    frees_seen: int | None = None  # the prefill context's free count when its first rows went in
    answer: list[int] = field(default_factory=list)  # the tokens it generated


class LlamaCppScheduler(BatchingScheduler):
    """Continuous batching over llama.cpp contexts (the transformers scheduler's thread, queueing,
    abort and emit logic). Each step: one decode call for the next token of every running request,
    then one prefill call for a chunk of the joining requests' prompts (into `prefill`'s context
    when there is one, whose KV rows move to the decoding context once a prompt is done)."""

    def __init__(
        self,
        model: LlamaCppModel,
        *,
        prefill: LlamaCppModel | None = None,
        max_batch_size: int = 32,
        name: str = "engine",
        prefix_cache: bool = True,
        saved: SavedPrompts | None = None,
    ):
        self.llama = model
        self.prefill = prefill or model
        self.lock = model.lock  # one thread at a time on the contexts
        self._free_seqs = list(range(max_batch_size))  # a heap: joiners take the lowest free ids
        self._running: list[_Sequence] = []
        self._reserved = 0
        self._prefill_reserved = 0
        # The kept prompt prefix (tokens whose KV rows the prefill context keeps under a sequence id
        # one past the requests'), and the last prompt, to find what consecutive prompts share.
        self._prefix_seq = max_batch_size if prefix_cache and prefill is not None and prefill is not model else None
        self._prefix: list[int] = []
        self._prefix_in_place = True  # its rows fill the prefill context's first cells (_lay_prefix_first)
        self._last_prompt: list[int] = []
        self._prefix_scope = self._last_scope = ""  # whose requests may share them (BatchRequest.cache_scope)
        self._prefill_filler = max_batch_size + 1  # the prefill context's throwaway row's id (TWO_ROWS)
        self._saved = saved if self._prefix_seq is not None else None  # whole prompts' rows, in memory
        super().__init__(None, max_batch_size=max_batch_size, name=name)

    def _setup_model(self, model) -> None:
        self.device = "cpu"  # the base class's transformers set-up does not apply

    @property
    def running(self) -> int:
        return len(self._running)

    @contextlib.contextmanager
    def exclusive(self):
        """A free sequence id and the decoding context to oneself between two steps (scoring text;
        the prefill context is the scheduler thread's alone)."""
        with self._wake:
            while not self._free_seqs:
                self._wake.wait(0.1)
            seq = heapq.heappop(self._free_seqs)
        try:
            with self.lock:
                yield seq
        finally:
            with self._wake:
                heapq.heappush(self._free_seqs, seq)

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def _remaining(self) -> list[BatchRequest]:
        return [s.request for s in self._running]

    def _drop_aborted(self, aborted: set[str]) -> None:
        if not aborted:
            return
        self._drop_waiting(aborted)
        for sequence in [s for s in self._running if s.request.id in aborted]:
            sequence.request.out.put(("done", "cancelled"))
            self._release(sequence)

    def _release(self, sequence: _Sequence, save: bool = True) -> None:
        """A request leaves: its rows are saved (finished or stopped, its conversation keeps the
        answer, and the next turn starts with it) unless `save` is off, then freed."""
        with self.lock:
            if save:
                self._save_answer(sequence)
            self.llama.forget(sequence.seq)
            if sequence.pending and self.prefill is not self.llama:
                self.prefill.forget(sequence.seq)
        self._running.remove(sequence)  # after its KV rows are gone: `running` 0 means a clean cache
        with self._wake:
            heapq.heappush(self._free_seqs, sequence.seq)
            self._reserved -= sequence.reserved
            if sequence.pending:
                self._prefill_reserved -= sequence.prefill_cells

    def _admit(self) -> None:
        """Waiting requests join while a sequence id and their KV room (prompt + answer) are free."""
        with self._wake:
            while self._waiting and self._free_seqs:
                request = self._waiting[0]
                need = len(request.prompt_ids) + request.max_new_tokens
                shared = self._shared_prefix(request)
                if self._follows_a_joining_prompt(request, shared):
                    break  # a step or so: then it gets the rows it shares with that prompt
                restored, saved = self._saved_match(request, shared)
                if saved and any(s.pending for s in self._running):
                    if restored >= shared + TILED_ROWS:
                        break  # worth waiting for: the saved rows go in once no prompt is being prefilled
                    restored, saved = 0, None
                if saved:
                    shared = 0  # all its rows are its own: copies of the saved prompt's, then the rest
                prompt = len(request.prompt_ids) - shared
                room = self.prefill.kv_tokens - 1  # one cell for a throwaway row (TWO_ROWS)
                if not saved and self._prefix and self._prefill_reserved + len(self._prefix) + prompt > room and self._prefix_may_go(request):
                    self._drop_prefix()  # its rows make room for the prompt
                    shared, prompt = 0, len(request.prompt_ids)
                if self._running and (
                    self._reserved + need > self.llama.kv_tokens or self._prefill_reserved + len(self._prefix) + prompt > room
                ):
                    break  # waits for running requests to leave
                self._waiting.popleft()
                self._start(request)
                seq = heapq.heappop(self._free_seqs)
                # only this thread uses the prefill context: no lock
                start = shared
                if saved:
                    start = restored if self._restore_saved(seq, saved, restored, len(request.prompt_ids)) else 0
                elif shared:
                    self.prefill.share(self._prefix_seq, seq, shared)
                request.cached_tokens = start
                sequence = _Sequence(
                    request, seq, deque(request.prompt_ids[start:]), pos=start, reserved=need, prefill_cells=prompt, shared=shared,
                    in_order=bool(saved) or not shared or self._prefix_in_place,  # after the prefix's rows only if those come first
                    frees_seen=self.prefill.frees if saved else None,  # its first rows are in
                )
                self._reserved += need
                self._prefill_reserved += prompt
                self._running.append(sequence)

    def _saved_match(self, request: BatchRequest, shared: int) -> tuple[int, tuple | None]:
        """How many of the prompt's first tokens a saved prompt's rows give it (see _shareable), and
        that prompt's key: where they give more than the kept prefix, and fit in the prefill context
        whole (before the prompt's share is cut from them)."""
        if not self._saved:
            return 0, None
        prompt = request.prompt_ids
        common, key = self._saved.match(prompt, request.cache_scope)
        common = min(common, len(prompt) - 2)
        if key is None or common < shared + PREFIX_MIN_TOKENS or max(len(key[1]), len(prompt)) > self.prefill.kv_tokens - 1:
            return 0, None
        return common, key

    def _restore_saved(self, seq: int, key: tuple, keep: int, prompt: int) -> bool:
        """Give sequence `seq` the saved prompt's rows for its first `keep` positions, in a context
        laid out again: the kept prefix's rows in the first cells, then these, then the free cells
        where the rest of its `prompt` tokens go, all in position order (_lay_prefix_first). The
        kept prefix goes where both do not fit. Only while no prompt is being prefilled. False where
        llama.cpp refused the rows: the context is empty then, and the prompt is prefilled whole."""
        try:
            if len(self._prefix) + max(len(key[1]), prompt) > self.prefill.kv_tokens - 1:
                self._drop_prefix()
            self._clear_but_prefix()
            self.prefill.restore(seq, self._saved.take(key))
            self.prefill.truncate(seq, keep)
            return True
        except Exception:
            log.exception("a saved prompt's KV rows could not be restored; the prompt is prefilled whole")
            self._saved.forget(key)
            self.prefill.clear()
            self._prefix = []
            return False

    def _prefix_may_go(self, request: BatchRequest) -> bool:
        """Whether dropping the kept prefix gives a prompt its room: no joining prompt holds its
        rows too (they would stay), and without it the prompt fits."""
        if not self._running:
            return True
        if any(s.pending and s.shared for s in self._running):
            return False
        return self._prefill_reserved + len(request.prompt_ids) <= self.prefill.kv_tokens - 1

    def _shared_prefix(self, request: BatchRequest) -> int:
        """How many of the prompt's first tokens the kept prefix covers (see _shareable): none where
        it was kept for requests of another cache scope."""
        if request.cache_scope != self._prefix_scope:
            return 0
        shared = _shareable(request.prompt_ids, self._prefix)
        return shared if shared >= PREFIX_MIN_TOKENS else 0

    def _follows_a_joining_prompt(self, request: BatchRequest, shared: int) -> bool:
        """Whether a prompt shares more with one being prefilled now than with the kept prefix: then
        it waits for that prefill to end, and shares those rows instead of computing them again (in
        a burst of requests, the chat template's header and system prompt are computed once)."""
        if self._prefix_seq is None:
            return False
        return any(
            s.pending and s.request.cache_scope == request.cache_scope and _shareable(request.prompt_ids, s.request.prompt_ids) >= shared + PREFIX_MIN_TOKENS
            for s in self._running
        )

    def _keep_prefix(self, sequence: _Sequence) -> None:
        """Once a prompt is prefilled (before its rows move): keep the part it shares with the prompt
        before it or the next one waiting, whichever is longer, where that differs from the prefix
        kept now (the rows are shared, not copied)."""
        if self._prefix_seq is None:
            return
        prompt, scope = sequence.request.prompt_ids, sequence.request.cache_scope
        last = self._last_prompt if self._last_scope == scope else []  # only its own scope's
        self._last_prompt, self._last_scope = prompt, scope
        if not sequence.in_order:
            return  # its rows would round differently from a prompt's own, and so would every sharer's
        with self._wake:
            following = self._waiting[0].prompt_ids if self._waiting and self._waiting[0].cache_scope == scope else []
        common = min(max(_common_length(prompt, last), _common_length(prompt, following)), len(prompt) - 1)
        if common < PREFIX_MIN_TOKENS or (prompt[:common] == self._prefix and scope == self._prefix_scope):
            return
        self._drop_prefix()
        self.prefill.share(sequence.seq, self._prefix_seq, common)
        self._prefix, self._prefix_scope = prompt[:common], scope
        self._prefix_in_place = False

    def _lay_prefix_first(self) -> None:
        """Put the kept prefix's rows in the prefill context's first cells, once no prompt is being
        prefilled (and only the prefix is left there).

        llama.cpp's attention on CPU adds V rows up in f16 in the order of the cache's cells, and a
        new prompt's rows go into the first free cells: after the prefix moved on, a prompt's rows
        could come before the prefix's and its answer change by rounding (a greedy answer asked
        twice could differ). With the prefix first, a prompt's cells follow it in position order,
        and its answer is the same bit for bit with or without the kept prefix (unless other rows
        left the context between two of its prefill calls: such a prompt's rows are not kept, see
        `in_order`)."""
        if self._prefix_in_place or not self._prefix or any(s.pending for s in self._running):
            return
        self._clear_but_prefix()

    def _clear_but_prefix(self) -> None:
        """Empty the prefill context but for the kept prefix, laid into its first cells (no prompt
        may be being prefilled)."""
        rows = self.prefill.state(self._prefix_seq) if self._prefix else None
        self.prefill.clear()
        if rows is not None:
            self.prefill.restore(self._prefix_seq, rows)
        self._prefix_in_place = True

    def _drop_prefix(self) -> None:
        if not self._prefix:
            return
        self.prefill.forget(self._prefix_seq)
        self._prefix = []
        with self._wake:  # the rows a joining prompt shared with it are that prompt's alone now
            for sequence in self._running:
                if sequence.pending and sequence.shared:
                    sequence.prefill_cells += sequence.shared
                    self._prefill_reserved += sequence.shared
                    sequence.shared = 0

    def step(self) -> None:
        self._lay_prefix_first()  # before a new prompt's rows go in
        self._admit()
        finished: list[_Sequence] = []
        decoding = sorted((s for s in self._running if not s.pending), key=lambda s: s.seq)
        with self.lock:
            if decoding:
                rows, fillers = self._decode_rows(decoding)
                self.llama.decode(rows)
                logits = self.llama.all_logits(len(decoding))
                for seq in fillers:
                    self.llama.forget(seq)
                # Greedy rows in one numpy call: per-row work here is Python holding the GIL that
                # every stream's thread wants too, once per token.
                greedy = np.argmax(logits, axis=1).tolist() if any(s.request.greedy for s in decoding) else None
                for row, sequence in enumerate(decoding):
                    sequence.pos += 1
                    if sequence.request.greedy:
                        self._take(sequence, greedy[row], finished)
                    else:
                        self._next(sequence, logits[row], finished)
            self._prefill_chunk(finished)
        for sequence in finished:
            self._release(sequence)
        self.steps += 1

    def _save_answer(self, sequence: _Sequence) -> None:
        """Save a finished or stopped request's rows, prompt and answer, from the decoding context: the next
        turn of its conversation starts with both (the answer as the chat template renders it,
        which is the generated tokens, but for the end-of-turn token that was never decoded)."""
        prompt = sequence.request.prompt_ids
        if self._saved is None or sequence.pending or not sequence.in_order or sequence.pos == len(prompt):
            return  # (no answer rows: its prompt's were saved as it moved)
        tokens = prompt + sequence.answer[: sequence.pos - len(prompt)]  # those with KV rows
        try:
            rows = self.llama.state(sequence.seq)
            if self.llama.streams > 1:
                rows = one_stream(rows, sequence.seq, self.llama.streams)
            self._saved.put(tokens, rows, sequence.request.cache_scope)
        except Exception:  # a cache: failing to fill it must not fail the requests running
            log.exception("a finished request's KV rows could not be saved")

    def _decode_rows(self, decoding: list[_Sequence]) -> tuple[list[tuple[int, int, int, bool]], list[int]]:
        """The decode call's rows, in sequence-id order, and the ids given a throwaway row.

        With one KV stream per request llama.cpp splits a batch into runs of consecutive sequence
        ids, one pass over the weights each: a batch of 28 requests with gaps cost 1.4x a full one
        of 32. Free ids in a narrow gap get a row without logits, forgotten after the call; a wide
        gap (the last few requests of a burst) is cheaper as a second pass."""
        rows, fillers = [], []
        # a joining request's prompt may sit in this very context: its id cannot take a row
        busy = {s.seq for s in self._running if s.pending} if self.prefill is self.llama else set()
        for sequence in decoding:
            gap = range(rows[-1][2] + 1, sequence.seq) if rows else range(0)
            # a filler row costs a few ms, a pass over the weights about one single-row step
            if self.llama.streams > 1 and len(gap) <= FILL_GAP_MAX:
                for seq in gap:
                    if seq not in busy:
                        rows.append((0, 0, seq, False))
                        fillers.append(seq)
            rows.append((sequence.last_token, sequence.pos, sequence.seq, True))
        return rows, fillers

    def _prefill_chunk(self, finished: list[_Sequence]) -> None:
        """The joining requests' prompt tokens for this step, oldest first: where the oldest has
        TILED_ROWS or more left, a call of its tokens alone, up to BATCH_TOKENS but for its last
        FINAL_ROWS; then, once it has fewer left, a call of the whole rest of as many prompts as fit
        in fewer than TILED_ROWS rows (its own first). So every prompt's last rows go in a small call
        (TILED_ROWS), and no prompt is prefilled partly around another's move out of the context
        (its later rows would go into the cells freed before its earlier ones, see `in_order`)."""
        joining = [s for s in self._running if s.pending]
        if not joining:
            return
        oldest = joining[0]
        if len(oldest.pending) >= TILED_ROWS:
            self._prefill_call([(oldest, min(BATCH_TOKENS, len(oldest.pending) - FINAL_ROWS))], finished)
            if len(oldest.pending) >= TILED_ROWS:
                return  # more of it next step: the running requests decode in between
        takes, rows = [], 0
        for sequence in joining:
            if rows + len(sequence.pending) < TILED_ROWS:
                takes.append((sequence, len(sequence.pending)))
                rows += len(sequence.pending)
        self._prefill_call(takes, finished)

    def _prefill_call(self, takes: list[tuple[_Sequence, int]], finished: list[_Sequence]) -> None:
        """One prefill call: `take` tokens of each sequence's prompt (at least two where that ends
        it, TWO_ROWS: a kept prefix leaves two, FINAL_ROWS more)."""
        rows, done = [], []
        for sequence, take in takes:
            if sequence.frees_seen is None:
                sequence.frees_seen = self.prefill.frees
            elif sequence.frees_seen != self.prefill.frees:
                sequence.in_order = False  # rows left since its first ones went in: these may go before them
            for i in range(take):
                last = len(sequence.pending) == 1
                rows.append((sequence.pending.popleft(), sequence.pos + i, sequence.seq, last))
                if last:
                    done.append((len(rows) - 1, sequence))
            sequence.pos += take
        if not rows:
            return
        lone = len(rows) == 1 and self.prefill is not self.llama  # a one-token prompt (TWO_ROWS)
        if lone:
            rows.append((rows[0][0], 0, self._prefill_filler, False))  # a throwaway second row
        self.prefill.decode(rows)
        if lone:
            self.prefill.forget(self._prefill_filler)
        for row, sequence in done:
            logits = self.prefill.logits(row)
            if self.prefill is not self.llama:
                self._keep_prefix(sequence)
                kv_rows = self.prefill.move(sequence.seq, self.llama)
                if self._saved is not None and sequence.in_order:  # rows out of order would round differently
                    self._saved.put(sequence.request.prompt_ids, kv_rows, sequence.request.cache_scope)
            with self._wake:
                self._prefill_reserved -= sequence.prefill_cells
            self._next(sequence, logits, finished)

    def _next(self, sequence: _Sequence, logits: np.ndarray, finished: list[_Sequence]) -> None:
        self._take(sequence, self._sample(sequence.request, logits), finished)

    def _take(self, sequence: _Sequence, token: int, finished: list[_Sequence]) -> None:
        sequence.last_token = token
        sequence.answer.append(token)
        if self._emit(sequence.request, token):
            finished.append(sequence)

    def _sample(self, request: BatchRequest, logits: np.ndarray) -> int:
        return super()._sample(request, torch.from_numpy(logits))  # a view of llama.cpp's logits

    def _fail_all(self, message: str) -> None:
        for sequence in list(self._running):
            sequence.request.out.put(("error", message))
            self._release(sequence, save=False)  # rows a failed call left are not worth keeping
        with self.lock:
            self.llama.forget(-1)  # whatever a failed call left behind
            self.prefill.forget(-1)
        self._prefix, self._last_prompt = [], []
        with self._wake:
            self._reserved = self._prefill_reserved = 0
