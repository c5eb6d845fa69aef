"""KV rows kept between requests: what two prompts share (`_common_length`, `_shareable`) and the
finished requests' rows kept in memory (`SavedPrompts`)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


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
