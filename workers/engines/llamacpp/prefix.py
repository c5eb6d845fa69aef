"""The KV rows the llama.cpp scheduler keeps between requests in its prefill context: the prompt
prefix that consecutive prompts shared (under a sequence id of its own; a prompt that starts with
it gets those rows by reference and prefills only the rest), and finished requests' rows
(`SavedPrompts`), given back by a copy to a prompt that starts with them."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from workers.engines.llamacpp.config import PREFIX_MIN_TOKENS
from workers.engines.llamacpp.model import one_stream
from workers.engines.llamacpp.saved import _common_length, _shareable
from workers.engines.scheduling import BatchRequest

if TYPE_CHECKING:
    from workers.engines.llamacpp.scheduler import _Sequence

log = logging.getLogger(__name__)


class KeptRows:
    """LlamaCppScheduler's kept prefix and saved prompts (its state: `llama`, `prefill`, `_prefix`,
    `_prefix_seq`, `_prefix_scope`, `_prefix_in_place`, `_last_prompt`, `_last_scope`, `_saved`,
    set up in its __init__)."""

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
