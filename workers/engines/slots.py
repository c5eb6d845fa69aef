"""The decode step of the transformers engine over a KV cache with one row (slot) per running
request, written in place, and on a CUDA GPU replayed as a captured CUDA graph.

Each running request owns row `slot` of every layer's key and value buffers and writes its next
key/value at its own column (its length so far): nothing is copied per step, and requests of any
length join without padding the others. The buffers (slot_cache.py) grow (rows and columns, by
doubling) when a step needs more, between steps.

On CUDA a decode step of a small model is bound by the host launching kernels (one step of
SmolLM2-135M: ~16 ms of launches against ~0.06 ms of weight reads on an H200). There the step is
captured once per (batch bucket, width bucket) as a CUDA graph over static input buffers and
replayed: one copy in, one replay, and the sampled tokens' one copy out, which the host reads
only after launching the next step (slot_batch.py). Buckets bound the captures: every batch
bucket at the first width is captured at load (`warm`), over buffers as tall as the engine's
batch; when a request outgrows that width the buffers widen and keep the rows that fit in the
bytes they had (at least the rows in use: slot_cache.py). A
(batch bucket, width bucket) met after that is captured when first met and again only after the
buffers grow (by doubling), never once per new sequence length. A step that cannot be captured
runs eagerly from then on (logged, counted). With `compile` the captured step is torch.compile's
(step_setup.py: one graph for every bucket and width, compiled at load).

On CPU the same step runs eagerly with exact shapes (no buckets: padded rows and columns would
cost real arithmetic there). `graphs="emulate"` runs the bucketed, static-buffer path on any device
without capturing, which is how the tests check its bookkeeping without a GPU.
"""

from __future__ import annotations

import logging

import torch

from workers.engines.graphs import Ring, Tokens, capture, synchronize
from workers.engines.slot_cache import SlotCache
from workers.engines.step_setup import CompiledStep

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_WIDTH = 256  # widths round up to powers of two from here (graphs) or to multiples of 16 (eager)


def batch_bucket(rows: int, most: int) -> int:
    """The captured batch size that holds `rows` rows: the next bucket, or `most` past the last one below it."""
    for size in BATCH_BUCKETS:
        if size >= rows:
            return min(size, max(most, rows))
    return rows


def width_bucket(width: int) -> int:
    """The captured number of key columns that holds `width`: a power of two, at least MIN_WIDTH."""
    size = MIN_WIDTH
    while size < width:
        size *= 2
    return size


class SlotDecoder:
    """One decode step of the running rows over a SlotCache: eager with exact shapes, or
    bucketed over static buffers and replayed as CUDA graphs (see the module's docstring).

    On the static path a row's input id comes either from the host (a joining row, or any row
    after a step whose tokens the host chose) or from the device: `hand_off` feeds a step's
    sampled tokens straight into the next step's inputs, so the next step can be launched before
    the host has read them (the scheduler's one step ahead)."""

    def __init__(self, model, *, cache_arg: str, last_only: dict, max_rows: int, graphs: bool | str = False, compile: bool = False):
        self.model = model
        self.last_only = last_only  # {"logits_to_keep": 1} where the forward takes it
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = SlotCache(model, self.device, self.dtype)
        self.cache_arg = cache_arg
        self.max_rows = max_rows
        self.graphs = graphs  # False, True (capture on CUDA) or "emulate"
        self.captures = 0  # graphs captured (or, emulated, recorded) in this engine's life
        self.capture_failures = 0
        # torch.compile's step (static path only), whose batch buckets start at 2: a batch of one
        # would be compiled apart (a size of 1 is always specialised)
        self.compiled = CompiledStep(model, cache_arg) if compile and graphs else None
        self._least = 2 if self.compiled else 1
        self._graphs: dict[tuple[int, int, int], object] = {}
        self._graphs_generation = -1
        self._inputs = None  # [3, rows] on the device: positions, ids from the host, 1 where the id is the host's
        self._next_ids = None  # [rows] on the device: the last step's sampled tokens (hand_off)
        self._host_inputs = self._host_tokens = None  # pinned host buffers, two of each (Ring)
        self._pool = None
        self._rows_index = torch.arange(max_rows, device=self.device)  # 0..rows-1: the rows a step writes
        self._mask_value = torch.finfo(self.dtype).min

    # --- the step ------------------------------------------------------------------------
    def decode(self, ids: list[int], positions: list[int], from_device: list[bool] | None = None) -> torch.Tensor:
        """The logits [rows, vocab] of each row's next token; row i's input is ids[i] at
        position positions[i] (its key is written at that column). On the static path, rows
        with from_device[i] take the token `hand_off` left on the device instead of ids[i]."""
        rows, width = len(ids), max(positions) + 1
        if not self.graphs:
            columns = -(-width // 16) * 16
            self.cache.ensure(rows, columns)
            inputs = torch.tensor([ids, positions], device=self.device)
            return self._forward(inputs[0], inputs[1], rows, columns)
        size, columns = self.bucket(rows), width_bucket(width)
        self._prepare(size, columns)
        host = self._host_inputs.take()
        view = host.numpy()
        view[0, :rows], view[1, :rows] = positions, ids
        view[2, :rows] = 1 if from_device is None else [not known for known in from_device]
        view[:, rows:] = 0  # padding rows write column 0 of slots nobody holds
        view[2, rows:] = 1
        self._inputs.copy_(host, non_blocking=True)
        self._host_inputs.used()
        key = (size, columns, self.cache.generation)
        replay = self._graphs.get(key)
        if replay is None:  # the captures' warm-up steps write the same keys the replay will
            replay = self._graphs[key] = self._capture(size, columns)
        return replay()[:rows]

    def hand_off(self, tokens: torch.Tensor) -> "Tokens":
        """A static step's sampled tokens ([rows] on the device): into the next step's inputs (for
        rows decoded with from_device), and copied to the host without waiting (read them with
        `.get()`)."""
        rows = tokens.shape[0]
        torch.clamp(tokens, min=0, out=self._next_ids[:rows])  # NOT_A_NUMBER (a broken row, ending) is never an input
        out = self._host_tokens.take()
        out[:rows].copy_(tokens, non_blocking=True)
        return Tokens(out, rows, self._host_tokens.used())

    @torch.inference_mode()
    def warm(self) -> None:
        """Capture every batch bucket up to max_rows at the first width now, over buffers already
        as tall as max_rows needs, so that serving captures nothing until a request outgrows the
        first width (below it, no number of rows voids the graphs)."""
        if not self.graphs:
            return
        size = self.bucket(self.max_rows)
        self._prepare(size, MIN_WIDTH)
        self._inputs.zero_()
        self._inputs[2] = 1
        for bucket in sorted({self.bucket(rows) for rows in range(1, size + 1)}):
            key = (bucket, MIN_WIDTH, self.cache.generation)
            if key not in self._graphs:
                self._graphs[key] = self._capture(bucket, MIN_WIDTH)
            if not self.graphs:  # a capture failed: this decoder runs eagerly, nothing more to capture
                return
        if self.compiled is not None:
            self._compile_wider()
        if self.compiled is not None:  # every graph it needs is compiled: none may be while serving
            self.compiled.freeze()

    def _compile_wider(self) -> None:
        """The compiled step once over buffers wider than the columns it reads, as they are after
        a long request: a second graph (the columns read are then not contiguous), compiled now
        and not while serving. It runs over two rows of scratch buffers, and is not captured."""
        serving, self.cache = self.cache, SlotCache(self.model, self.device, self.dtype)
        try:
            self.cache.ensure(2, 2 * MIN_WIDTH)
            self._static_step(2, MIN_WIDTH)  # the inputs warm() left: ids and positions 0
        except Exception:  # the captured steps keep theirs; steps captured later run uncompiled
            log.exception("the compiled decode step failed over wider buffers; later captures run uncompiled")
            self.compiled = None
        finally:
            self.cache = serving

    def close(self) -> None:
        """Give back the buffers and graphs of a decoder that will not be used."""
        self._graphs.clear()
        self.cache.release()

    @torch.inference_mode()
    def move(self, source: int, target: int, length: int) -> None:
        """Slot `source` to slot `target`: its first `length` columns, and its id on the device."""
        self.cache.move(source, target, length)
        if self._next_ids is not None:
            self._next_ids[target] = self._next_ids[source]

    def check(self, prompt_ids: list[int]) -> float:
        """The largest difference between this step's logits and the model's plain forward with a
        DynamicCache, for two tokens after `prompt_ids`, relative to the largest logit (at least 1):
        a load-time check of the slot path on the real weights (on CUDA: of the captured graph)."""
        from transformers import DynamicCache

        with torch.inference_mode():
            if self.graphs:  # the buffers warm() needs, first: its captures then include this one
                self.reserve(self.max_rows, MIN_WIDTH)
            reference_cache = DynamicCache()
            ids = torch.tensor([prompt_ids], device=self.device)
            self.model(input_ids=ids, use_cache=True, **{self.cache_arg: reference_cache})
            self.store(0, reference_cache, 0, 0, len(prompt_ids))
            worst = 0.0
            for step, token in enumerate((prompt_ids[-1], prompt_ids[0])):
                position = len(prompt_ids) + step
                expected = self.model(
                    input_ids=torch.tensor([[token]], device=self.device),
                    position_ids=torch.tensor([[position]], device=self.device),
                    use_cache=True, **{self.cache_arg: reference_cache},
                ).logits[0, -1].float()
                got = self.decode([token], [position])[0].float()
                worst = max(worst, float((got - expected).abs().max()) / max(1.0, float(expected.abs().max())))
        return worst

    def bucket(self, rows: int) -> int:
        """The batch bucket a static step of `rows` rows runs in (from 2 when compiled)."""
        return batch_bucket(max(rows, self._least), self.max_rows)

    def reserve(self, rows: int, columns: int) -> None:
        """Buffers that hold `rows` running rows (on the static path: their batch bucket) and
        `columns` columns: a group joining at once grows them once, not a doubling per request."""
        self.cache.ensure(self.bucket(rows) if self.graphs else rows, columns)

    def store(self, slot: int, cache, row: int, start: int, end: int) -> None:
        """Columns [start, end) of `row` of a prefill's DynamicCache into `slot`, from column 0."""
        self.reserve(slot + 1, end - start + 1)
        for layer, part in enumerate(cache.layers):
            self.cache.store(slot, layer, part.keys[row, :, start:end], part.values[row, :, start:end])

    # --- eager and captured steps ---------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, rows: int, columns: int, model=None) -> torch.Tensor:
        """`model`'s forward (by default the step's: compiled or not) over the first `rows` rows
        (ids, positions: [>= rows]) and `columns` columns."""
        ids, positions = ids[:rows].unsqueeze(1), positions[:rows].unsqueeze(1)
        visible = torch.arange(columns, device=self.device).unsqueeze(0) <= positions  # [rows, columns]
        mask = torch.zeros(visible.shape, device=self.device, dtype=self.dtype).masked_fill_(~visible, self._mask_value)
        mask = mask[:, None, None, :]
        self.cache.bind(self._rows_index[:rows], positions[:, 0], mask)
        if model is None:
            model = self.compiled if self.compiled is not None and self.graphs else self.model
        output = model(
            input_ids=ids, position_ids=positions, attention_mask=mask,
            use_cache=True, **self.last_only, **{self.cache_arg: self.cache},
        )
        return output.logits[:, -1, :]

    def _static_step(self, rows: int, columns: int, model=None) -> torch.Tensor:
        """The step over the static buffers: each row's id from the host or from the last step."""
        inputs = self._inputs
        ids = torch.where(inputs[2, :rows] != 0, inputs[1, :rows], self._next_ids[:rows])
        return self._forward(ids, inputs[0], rows, columns, model)  # positions first: a view at offset 0

    def _prepare(self, size: int, columns: int) -> None:
        """Buffers that hold `size` rows x `columns`; graphs over moved buffers are dropped (after
        the device has finished any step launched over them)."""
        self.cache.ensure(size, columns)
        if self._graphs_generation != self.cache.generation:  # the buffers moved (here or in store)
            synchronize(self.device)
            self._graphs.clear()
            self._graphs_generation = self.cache.generation
        rows = self.cache.rows
        if self._inputs is not None and self._inputs.shape[1] >= rows:
            return
        synchronize(self.device)
        self._inputs = torch.zeros((3, rows), dtype=torch.long, device=self.device)
        next_ids = torch.zeros(rows, dtype=torch.long, device=self.device)
        if self._next_ids is not None:
            next_ids[: self._next_ids.shape[0]] = self._next_ids
        self._next_ids = next_ids
        self._host_inputs, self._host_tokens = Ring((3, rows), self.device), Ring((rows,), self.device)
        self._rows_index = torch.arange(max(rows, self.max_rows), device=self.device)
        self._graphs.clear()  # they read the old static buffers

    def compiled_graphs(self) -> tuple[int, int]:
        """How many of the graphs held now replay the compiled step, and how many are held."""
        held = list(self._graphs.values())
        return sum(getattr(replay, "compiled", False) for replay in held), len(held)

    def _capture(self, rows: int, columns: int):
        """A replayable step for `rows` x `columns` over the static buffers (`compiled`: whether it
        replays the compiled step)."""
        self.captures += 1
        model = self.compiled if self.compiled is not None else self.model  # what the graph replays

        def eager():
            return self._static_step(rows, columns, model)

        if self.graphs == "emulate" or self.device.type != "cuda":
            replay = _warm_up(eager)  # as a capture's warm-up runs it: where that fails, so do the tests
        else:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            replay = capture(eager, self.device, self._pool)
        if replay is None and self.compiled is not None:  # the compiled step failed: the plain one
            log.error("the compiled decode step failed for %d rows x %d columns; it runs uncompiled", rows, columns)
            self.compiled = None
            self._pool = None  # a fresh pool: the failed capture's may hold its allocations
            return self._capture(rows, columns)
        if replay is None:  # an op that cannot be captured: this decoder runs eagerly from now on
            self.capture_failures += 1
            self.graphs = False
            log.error("CUDA graph capture failed for %d rows x %d columns; decode steps run eagerly", rows, columns)
            return eager
        replay.compiled = model is self.compiled
        return replay


def _warm_up(eager):
    """The emulated capture: `eager` run twice, as a capture's warm-up runs it (a step that does
    not give the same result twice over the same inputs fails the tests), then `eager` is the
    replay; None (logged) where it fails, as a capture would be."""
    try:
        for _ in range(2):
            eager()
    except Exception:
        log.exception("the emulated capture's step failed")
        return None
    return eager
