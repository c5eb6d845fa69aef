"""The running requests of the transformers engine on slots (slots.py), and its decode step one
step ahead: on the static path (CUDA graphs) step N+1 is launched from the tokens step N left on
the device, and only then are step N's tokens read and handed to their requests, so the host's
work of a step (reading tokens, stop checks, handing them on, the next step's inputs) runs while
the device computes the next one.

A request that finishes at step N (a stop token, its length, an abort) was already in step N+1;
that row's work is thrown away and its token never reaches anyone. Rows whose tokens the host
chooses (a TokenPolicy: penalties, logit_bias, logprobs, a grammar) need step N's token before
step N+1, so while one runs every step waits for its tokens (as on CPU, where nothing runs ahead).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from workers.engines.scheduling import BatchRequest, Rows
from workers.engines.slots import SlotDecoder


class SlotBatch(Rows):
    """The running requests on slots: row i of the decoder's SlotCache belongs to requests[i],
    whose next input token (last_tokens[i], or where on_device[i] the one its last step left on
    the device) goes at column positions[i] (its length so far)."""

    def __init__(self, decoder: SlotDecoder):
        self.decoder = decoder
        self.requests: list[BatchRequest | None] = []
        self.positions: list[int] = []
        self.last_tokens: list[int] = []
        self.on_device: list[bool] = []
        self.pending = None  # (the rows' requests, their Tokens) of a step launched ahead, not read yet

    def add_group(self, cache: DynamicCache, pads: list[int], requests: list[BatchRequest], first_tokens: list[int]) -> None:
        """A prefilled group (its own left-padded cache): each request's rows into the next slot."""
        self.compact()
        width = cache.get_seq_length()
        self.decoder.reserve(len(self.requests) + len(requests), width + 1)
        for row, (request, pad, first) in enumerate(zip(requests, pads, first_tokens)):
            self.decoder.store(len(self.requests), cache, row, pad, width)
            self.requests.append(request)
            self.positions.append(width - pad)
            self.last_tokens.append(first)
            self.on_device.append(False)

    def finish(self, rows: list[int]) -> None:
        super().finish(rows)
        if rows and not self.alive:
            self.compact()

    def compact(self) -> None:
        """Fill each finished row with the last running one (one row's copy each), so the running
        rows stay 0..n-1 (the rows a decode step, and its batch bucket, covers)."""
        while True:
            while self.requests and self.requests[-1] is None:
                self._pop()
            if None not in self.requests:
                if not self.requests and not self.decoder.graphs:
                    self.decoder.cache.release()  # idle: the memory goes back (it grows again by doubling)
                return
            hole, last = self.requests.index(None), len(self.requests) - 1
            self.decoder.move(last, hole, self.positions[last])
            for column in (self.requests, self.positions, self.last_tokens, self.on_device):
                column[hole] = column[last]
            self._pop()

    def _pop(self) -> None:
        for column in (self.requests, self.positions, self.last_tokens, self.on_device):
            column.pop()

    def can_run_ahead(self) -> bool:
        """Whether the next step may start before the host reads this one's tokens: on the static
        path, with no row whose token the host chooses."""
        return bool(self.decoder.graphs) and all(r is None or r.policy is None for r in self.requests)

    def decode(self, ahead: bool = False) -> torch.Tensor:
        """One step of every running row: their logits [rows, vocab]. `ahead`: rows whose last
        token was handed off on the device take it from there (their last_tokens may not be read
        yet); the caller hands this step's tokens off too (SlotDecoder.hand_off)."""
        self.compact()
        positions = self.positions
        if ahead:  # a row whose pending token is its last by length only computes what is thrown
            # away: it writes at column 0 (its cache is done with), not one past what it needs,
            # which at a width's edge would widen the buffers and capture a step for nothing
            positions = [
                0 if known and r is not None and r.generated + 1 >= r.max_new_tokens else p
                for r, p, known in zip(self.requests, positions, self.on_device)
            ]
        logits = self.decoder.decode(self.last_tokens, positions, self.on_device if ahead else None)
        self.positions = [p + 1 for p in self.positions]
        self.on_device = [ahead] * len(self.requests)
        return logits

    def deliver(self, requests: list[BatchRequest | None], tokens: list[int], emit) -> None:
        """Each request's token of a step whose rows were `requests` (rows may have moved or
        finished since): `emit(request, token)` for those still running (True: it finished)."""
        row_of = {id(r): i for i, r in enumerate(self.requests) if r is not None}
        finished = []
        for request, token in zip(requests, tokens):
            row = row_of.get(id(request)) if request is not None else None
            if row is None:
                continue
            self.last_tokens[row] = token  # NOT_A_NUMBER ends its request: decode() compacts the row away first
            if emit(request, token):
                finished.append(row)
        self.finish(finished)

    def settle(self, emit) -> None:
        """Read the step launched ahead, if any, and deliver its tokens."""
        if self.pending is not None:
            (requests, tokens), self.pending = self.pending, None
            self.deliver(requests, tokens.get(), emit)
