"""Continuous batching for Hugging Face causal LMs: one forward pass per decode step for every
running request; requests join (after their prefill) and leave between steps.

Joining requests with short prompts are prefilled together in one padded pass; a long prompt is
prefilled alone, a chunk per step, so it never stalls the running streams for long. Then the
request's KV rows join the running ones, in one of two layouts:

- slots (slots.py, slot_batch.py; transformers' own models with full attention): one row per
  request, written in place at the request's own column; the decode step is a CUDA graph on a
  GPU, launched one step ahead of the host's reading of tokens. A request that leaves hands its
  row to the last one.
- a shared left-padded `DynamicCache` (models with their own modelling code or a sliding window):
  the new rows are padded on the left and stacked onto the batch's; a request that leaves is
  marked dead and compacted away later with others (a compaction copies the cache).

Each request keeps its own sampling settings, random generator and stop conditions. Greedy and
top-k/top-p rows are chosen together on the device with one copy of the tokens to the host per
step (`choose_rows`); rows with penalties, logit_bias, logprobs or a grammar go through their
TokenPolicy (sampling.py) on the host.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from workers.engines.batch_sampling import RowSettings, choose_rows, sample_token, start_sampling
from workers.engines.fused_linears import fuse_linears
from workers.engines.graphs import to_device
from workers.engines.scheduling import NOT_A_NUMBER, BatchRequest, Rows, Scheduler
from workers.engines.slot_batch import SlotBatch
from workers.engines.slots import SlotDecoder
from workers.engines.step_setup import compile_wanted, cuda_graphs_wanted, forward_arguments, fuse_rms_norms, fuse_rotary, slot_support, text_config

__all__ = ["BatchRequest", "BatchingScheduler"]

log = logging.getLogger(__name__)


class _Batch(Rows):
    """The running requests and their shared, left-padded KV cache.

    A finished row is only marked dead (None) and compacted away later, several at a time:
    every compaction copies the whole cache, which costs more than decoding a few idle rows.
    """

    def __init__(self):
        self.requests: list[BatchRequest | None] = []
        self.cache: DynamicCache | None = None
        self.pads: list[int] = []  # left padding of each row
        self.last_tokens: list[int] = []

    @property
    def width(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def add_group(self, cache: DynamicCache, pads: list[int], requests: list[BatchRequest], first_tokens: list[int]) -> None:
        """Stack a prefilled group (its own left-padded cache) under the running rows."""
        self.compact()
        if self.cache is None:
            self.cache, self.requests, self.pads, self.last_tokens = cache, list(requests), list(pads), list(first_tokens)
            return
        width, length = self.width, cache.get_seq_length()
        target = max(width, length)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, target - width), _pad_left(theirs.keys, target - length)])
            mine.values = torch.cat([_pad_left(mine.values, target - width), _pad_left(theirs.values, target - length)])
        self.pads = [p + target - width for p in self.pads] + [p + target - length for p in pads]
        self.requests += requests
        self.last_tokens += first_tokens

    def compact(self) -> None:
        """Drop dead rows, and columns that are padding in every remaining row."""
        if not self.dead:
            return
        keep = [i for i, r in enumerate(self.requests) if r is not None]
        if not keep:
            self.__init__()
            return
        index = torch.tensor(keep, device=self.cache.layers[0].keys.device)
        trim = min(self.pads[i] for i in keep)
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, trim:, :]
            layer.values = layer.values[index, :, trim:, :]
        self.requests = [self.requests[i] for i in keep]
        self.pads = [self.pads[i] - trim for i in keep]
        self.last_tokens = [self.last_tokens[i] for i in keep]


def _pad_left(tensor: torch.Tensor, amount: int) -> torch.Tensor:
    return F.pad(tensor, (0, 0, amount, 0)) if amount else tensor


class BatchingScheduler(Scheduler):
    """Continuous batching of a transformers model (the thread and queueing are `Scheduler`'s)."""

    def __init__(self, model, *, max_batch_size: int = 32, prefill_chunk: int = 256, name: str = "engine"):
        self.prefill_chunk = prefill_chunk
        self._prefilling: BatchRequest | None = None
        self._setup_model(model, max_batch_size)
        self._batch = self._new_batch()
        super().__init__(max_batch_size=max_batch_size, name=name)

    def _new_batch(self):
        return SlotBatch(self.decoder) if self.decoder is not None else _Batch()

    def release(self) -> None:
        """Once the loop has stopped (its engine closed): let go of the model and the slot
        decoder, whose KV cache and CUDA graphs hold device memory."""
        self.model = self.decoder = None
        self._batch = _Batch()

    @property
    def decode_mode(self) -> str:
        """How decode steps run, for the deployment's status and the GPU bench."""
        if self.decoder is None:
            return f"padded cache ({self.slot_note})"
        graphs = {True: ", CUDA graphs", "emulate": ", static buffers (CUDA graphs emulated)"}.get(self.decoder.graphs, "")
        done, held = self.decoder.compiled_graphs()
        compiled = ", compiled" if self.decoder.compiled is not None and graphs else ""
        if done and graphs and not compiled:  # the compiled step failed after these graphs were captured
            compiled = f", compiled in {done} of {held} graphs"
        ahead = ", one step ahead" if graphs and self.run_ahead else ""
        return f"slots{graphs}{compiled}{ahead}"

    def _setup_model(self, model, max_batch_size: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self._cache_arg, self._last_only = forward_arguments(model)
        if self.device.type == "cuda":
            # PyTorch prefers cuDNN's attention for bf16/fp16 on recent GPUs, and cuDNN builds a
            # graph for every new key length: a decode step grows the cache by one column, so every
            # step built 30 new graphs (bf16 ran 4x slower than fp32). Flash and memory-efficient
            # attention take any length.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.fused_norms = fuse_rms_norms(model)  # one kernel each on CUDA, not eight
        self.fused_rotary = fuse_rotary(model)  # six kernels a layer, not ten
        self.fused_linears = fuse_linears(model)  # two matrix products a layer, not five
        self._unseeded = torch.Generator(device=self.device)  # for sampled rows that name no seed
        self._unseeded.seed()
        self._row_settings = RowSettings()  # the decode steps' sampled rows (a prefill's are its own)
        # the static path launches step N+1 before reading step N's tokens (slot_batch.py)
        self.run_ahead = os.environ.get("LLMSITE_DECODE_AHEAD", "1").strip().lower() not in ("0", "false", "no", "off")
        self.decoder, self.slot_note = None, slot_support(model)
        if os.environ.get("LLMSITE_SLOTS", "1").strip().lower() in ("0", "false", "no", "off"):
            self.slot_note = "LLMSITE_SLOTS=0"
        if self.slot_note is None:
            self.decoder = self._checked_decoder(model, max_batch_size)

    def _checked_decoder(self, model, max_batch_size: int, compile: bool | None = None) -> SlotDecoder | None:
        """The slot decoder, if its step gives the plain forward's logits on these weights (a
        compiled step that does not: the uncompiled one, checked in turn)."""
        dtype = next(model.parameters()).dtype
        decoder = SlotDecoder(
            model, cache_arg=self._cache_arg, last_only=self._last_only, max_rows=max_batch_size,
            graphs=cuda_graphs_wanted(self.device, model), compile=compile_wanted() if compile is None else compile,
        )
        vocab = text_config(model).vocab_size
        probe = [(7 * i + 3) % vocab for i in range(1, 12)]
        try:
            difference = decoder.check(probe)
            allowed = 1e-3 if dtype == torch.float32 else 5e-2
            if not difference <= allowed and decoder.compiled is not None:
                log.warning("the compiled slot step's logits differ from the plain forward's by %.3g; checking it uncompiled", difference)
                decoder.close()
                return self._checked_decoder(model, max_batch_size, compile=False)
            if not difference <= allowed:
                self.slot_note = f"the slot step's logits differ from the plain forward's by {difference:.3g} (allowed {allowed})"
                log.warning("slot decoding off: %s", self.slot_note)
                return None
            decoder.warm()  # every batch bucket captured now, not while serving
        except Exception as exc:  # a forward the slot cache does not fit: the padded cache serves it
            log.warning("slot decoding off: its check or warm-up failed", exc_info=True)
            decoder.close()  # its buffers go now, not when the decoder is collected
            self.slot_note = f"the slot step's check or warm-up failed: {type(exc).__name__}: {exc}"
            return None
        return decoder

    @property
    def running(self) -> int:
        return self._batch.alive + (self._prefilling is not None)

    # --- the engine thread ---------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._waiting or self._batch.alive or self._prefilling is not None)

    def _remaining(self) -> list[BatchRequest]:
        """The requests inside the engine (not waiting), told "cancelled" when it stops."""
        return [r for r in self._batch.requests if r is not None] + ([self._prefilling] if self._prefilling else [])

    def _drop_aborted(self, aborted: set[str]) -> None:
        if not aborted:
            return
        self._drop_waiting(aborted)
        if self._prefilling is not None and self._prefilling.id in aborted:
            self._prefilling.out.put(("done", "cancelled"))
            self._prefilling = None
        gone = [i for i, r in enumerate(self._batch.requests) if r is not None and r.id in aborted]
        for i in gone:
            self._batch.requests[i].out.put(("done", "cancelled"))
        self._batch.finish(gone)

    def step(self) -> None:
        """One iteration: prefill for joining requests (a group of short prompts in one pass, or a
        chunk of one long prompt), then one decode step for every running request."""
        if self._prefilling is not None:
            self._prefill_long(self._prefilling)
        else:
            group = self._take_group()
            if group:
                self._prefill_group(group)
        batch = self._batch
        if batch.dead and (not batch.alive or batch.dead * 4 >= len(batch.requests)):
            batch.compact()
        if batch.alive:
            self._decode()
        self.steps += 1

    def _take_group(self) -> list[BatchRequest]:
        """Waiting requests that fit the batch, short prompts together up to the chunk budget."""
        room = self.max_batch_size - self._batch.alive
        group, budget = [], self.prefill_chunk * 4
        with self._wake:
            while self._waiting and room > len(group):
                request = self._waiting[0]
                if len(request.prompt_ids) > self.prefill_chunk:
                    if not group:  # a long prompt goes alone, a chunk per step
                        self._prefilling = self._waiting.popleft()
                    break
                if len(request.prompt_ids) > budget:
                    break
                budget -= len(request.prompt_ids)
                group.append(self._waiting.popleft())
        return group

    def _start(self, request: BatchRequest) -> None:
        start_sampling(request, self.device)

    @torch.inference_mode()
    def _prefill_group(self, group: list[BatchRequest]) -> None:
        for request in group:
            self._start(request)
        width = max(len(r.prompt_ids) for r in group)
        pads = [width - len(r.prompt_ids) for r in group]
        # to_device: a plain copy would wait for the decode step running ahead (slot_batch.py)
        ids = to_device(self.device, [[0] * pad + r.prompt_ids for r, pad in zip(group, pads)])
        mask = to_device(self.device, [[0] * pad + [1] * len(r.prompt_ids) for r, pad in zip(group, pads)])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
            **{self._cache_arg: cache}, **self._last_only,
        ).logits[:, -1, :]
        self._join(cache, pads, group, logits)

    @torch.inference_mode()
    def _prefill_long(self, request: BatchRequest) -> None:
        if request.cache is None:
            request.cache = DynamicCache()
            self._start(request)
        start = request.prefilled
        chunk = request.prompt_ids[start : start + self.prefill_chunk]
        ids = to_device(self.device, [chunk])
        positions = torch.arange(start, start + len(chunk), device=self.device).unsqueeze(0)
        logits = self.model(
            input_ids=ids, position_ids=positions, use_cache=True, **{self._cache_arg: request.cache}, **self._last_only
        ).logits
        request.prefilled += len(chunk)
        if request.prefilled < len(request.prompt_ids):
            return
        self._prefilling = None
        cache, request.cache = request.cache, None
        self._join(cache, [0], [request], logits[:, -1, :])

    def _join(self, cache, pads, group, logits) -> None:
        first = self._sample_rows(group, logits)
        self._batch.add_group(cache, pads, group, first)
        offset = len(self._batch.requests) - len(group)
        self._batch.finish([offset + i for i, (r, t) in enumerate(zip(group, first)) if self._emit(r, t)])

    @torch.inference_mode()
    def _decode(self) -> None:
        batch = self._batch
        if isinstance(batch, SlotBatch):
            self._decode_slots(batch)
            return
        logits = self._decode_padded(batch)
        finished = []
        tokens = self._sample_rows(batch.requests, logits, self._row_settings)
        for row, (request, token) in enumerate(zip(batch.requests, tokens)):
            if request is None:
                continue
            batch.last_tokens[row] = token
            if self._emit(request, token):
                finished.append(row)
        batch.finish(finished)

    def _decode_slots(self, batch: SlotBatch) -> None:
        """A step on slots: one step ahead where it may (slot_batch.py), else read at once."""
        if not (self.run_ahead and batch.can_run_ahead()):
            batch.settle(self._emit)  # the step launched ahead first: its tokens are the inputs
            logits = batch.decode()
            requests = list(batch.requests)  # after decode's compaction: the logits' rows
            batch.deliver(requests, self._sample_rows(requests, logits, self._row_settings), self._emit)
            return
        logits = batch.decode(ahead=True)
        requests = list(batch.requests)
        launched = (requests, batch.decoder.hand_off(choose_rows(requests, logits, self._unseeded, self._row_settings)))
        batch.settle(self._emit)  # the last step's tokens, read while the device runs this one
        batch.pending = launched

    def _decode_padded(self, batch: _Batch) -> torch.Tensor:
        width = batch.width
        # a dead row is decoded until compacted: its NOT_A_NUMBER (a broken row's end) goes in as 0
        ids = torch.tensor([max(token, 0) for token in batch.last_tokens], device=self.device).unsqueeze(1)
        # Built in one piece: on a GPU every small op is a kernel launch, and a decode step of a
        # small model is bound by launches, not by the GPU's arithmetic.
        pads = torch.tensor(batch.pads, device=self.device).unsqueeze(1)
        mask = (torch.arange(width + 1, device=self.device) >= pads).long()
        positions = width - pads
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_arg: batch.cache}
        ).logits[:, -1, :]

    def _sample_rows(self, requests: list[BatchRequest | None], logits: torch.Tensor, settings: RowSettings | None = None) -> list[int]:
        """The next token of every row: greedy and top-k/top-p rows on the device with one copy to
        the host (choose_rows); rows with a TokenPolicy then each on the host (where their logits
        are numbers)."""
        tokens = choose_rows(requests, logits, self._unseeded, settings).tolist()
        for row, request in enumerate(requests):
            if request is not None and request.policy is not None and tokens[row] != NOT_A_NUMBER:
                tokens[row] = self._sample(request, logits[row])
        return tokens

    def _sample(self, request: BatchRequest, logits: torch.Tensor) -> int:
        if request.policy is not None:  # penalties, logit_bias, logprobs, a grammar (sampling.py)
            draw = None if request.greedy else lambda scores: sample_token(request, torch.from_numpy(scores).to(logits.device))
            return request.policy.choose(logits.float().cpu().numpy(), draw)
        if request.greedy:
            return int(torch.argmax(logits))
        return sample_token(request, logits)

    def _fail_all(self, message: str) -> None:
        for request in [r for r in self._batch.requests if r is not None] + ([self._prefilling] if self._prefilling else []):
            request.out.put(("error", message))
        self._batch = self._new_batch()
        self._prefilling = None
