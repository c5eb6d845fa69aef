"""The llama.cpp engine's scheduler: continuous batching over one decoding context (and a prefill
context for prompts), one llama_decode call per step for every running request."""

from __future__ import annotations

import contextlib
import functools
import heapq
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from workers.engines.llamacpp.config import BATCH_TOKENS, FILL_GAP_MAX, FINAL_ROWS, TILED_ROWS
from workers.engines.llamacpp.model import LlamaCppModel
from workers.engines.llamacpp.prefix import KeptRows
from workers.engines.llamacpp.saved import SavedPrompts
from workers.engines.scheduling import NOT_A_NUMBER, BatchRequest, Scheduler


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
    broken: bool = False  # its logits were not numbers (NOT_A_NUMBER): its rows are not kept


class LlamaCppScheduler(KeptRows, Scheduler):
    """Continuous batching over llama.cpp contexts (`Scheduler`'s thread, queueing, abort and emit
    logic). Each step: one decode call for the next token of every running request,
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
        self._sampler = None  # the sampled rows' draw (_torch_sampler), made when a request first samples
        super().__init__(max_batch_size=max_batch_size, name=name)

    @property
    def running(self) -> int:
        return len(self._running)

    def kv_cache_usage(self) -> float:
        """The decoding context's cells that running requests hold (their positions so far), as a
        share of all of them (each request has its own stream of LLAMACPP_SEQ_TOKENS cells)."""
        used = sum(s.pos for s in list(self._running))  # a copy: the engine thread changes the list
        return min(1.0, used / max(1, self.llama.kv_tokens))

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
            if save and not sequence.broken:
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
                if not request.greedy:
                    _start_sampling(request)
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
                greedy = _greedy(logits) if any(s.request.greedy for s in decoding) else None
                drawn = self._draw_sampled(decoding, logits)
                for row, sequence in enumerate(decoding):
                    sequence.pos += 1
                    if sequence.request.greedy and sequence.request.policy is None:
                        self._take(sequence, greedy[row], finished)
                    elif row in drawn:
                        self._take(sequence, drawn[row], finished)
                    else:
                        self._next(sequence, logits[row], finished)
            self._prefill_chunk(finished)
        for sequence in finished:
            self._release(sequence)
        self.steps += 1

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
            token = self._sample(sequence.request, self.prefill.logits(row))
            kept = token != NOT_A_NUMBER  # a prompt whose logits are not numbers: its rows serve nobody
            if self.prefill is not self.llama:
                if kept:
                    self._keep_prefix(sequence)
                kv_rows = self.prefill.move(sequence.seq, self.llama)
                if kept and self._saved is not None and sequence.in_order:  # rows out of order would round differently
                    self._saved.put(sequence.request.prompt_ids, kv_rows, sequence.request.cache_scope)
            with self._wake:
                self._prefill_reserved -= sequence.prefill_cells
            self._take(sequence, token, finished)

    def _next(self, sequence: _Sequence, logits: np.ndarray, finished: list[_Sequence]) -> None:
        self._take(sequence, self._sample(sequence.request, logits), finished)

    def _draw_sampled(self, decoding: list[_Sequence], logits: np.ndarray) -> dict[int, int]:
        """The tokens of the sampled rows with no TokenPolicy, by row, drawn in one batch."""
        rows = [row for row, s in enumerate(decoding) if not s.request.greedy and s.request.policy is None]
        if not rows:
            return {}
        if self._sampler is None:
            self._sampler = _torch_sampler()
        return dict(zip(rows, self._sampler([decoding[row].request for row in rows], logits[rows])))

    def _take(self, sequence: _Sequence, token: int, finished: list[_Sequence]) -> None:
        if token == NOT_A_NUMBER:  # its request ends with an error (_emit)
            sequence.broken = True
        else:
            sequence.last_token = token
            sequence.answer.append(token)
        if self._emit(sequence.request, token):
            finished.append(sequence)

    def _sample(self, request: BatchRequest, logits: np.ndarray) -> int:
        best = int(np.argmax(logits))  # torch.argmax's choice too: the first of equal maxima
        if not np.isfinite(logits[best]):  # a NaN (np.argmax's pick where there is one), or no finite best
            return NOT_A_NUMBER
        draw = None if request.greedy else functools.partial(_sample_with_torch, request)
        if request.policy is not None:  # penalties, logit_bias, logprobs, a grammar (sampling.py)
            return request.policy.choose(logits, draw)
        return best if draw is None else draw(logits)

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


def _greedy(logits: np.ndarray) -> list[int]:
    """Each row's argmax (the first of equal maxima), or NOT_A_NUMBER where that best logit is not
    finite: a NaN, which np.argmax picks where a row has one, or no logit above -inf."""
    tokens = np.argmax(logits, axis=1)
    best = logits[np.arange(len(tokens)), tokens]
    return np.where(np.isfinite(best), tokens, NOT_A_NUMBER).tolist()


# Sampled (not greedy) requests draw their tokens as the transformers engine's do, with torch
# (workers/engines/batch_sampling.py): a batch's rows together, one row where its TokenPolicy chose
# the scores. So torch is imported here only, where a request samples; greedy requests never import it.


def _start_sampling(request: BatchRequest) -> None:
    """The request's generator (seeded where it names a seed), as it joins."""
    from workers.engines.batch_sampling import start_sampling

    start_sampling(request, "cpu")


def _torch_sampler():
    """A draw of sampled rows' tokens ([rows, vocab] logits to a list), with a generator for rows
    that name no seed and the rows' settings kept from step to step."""
    import torch

    from workers.engines.batch_sampling import RowSettings, choose_rows

    generator, settings = torch.Generator(), RowSettings()
    generator.seed()
    return lambda requests, logits: choose_rows(requests, torch.from_numpy(logits), generator, settings).tolist()


def _sample_with_torch(request: BatchRequest, logits: np.ndarray) -> int:
    import torch

    from workers.engines.batch_sampling import sample_token

    return sample_token(request, torch.from_numpy(logits))  # a view of llama.cpp's logits
