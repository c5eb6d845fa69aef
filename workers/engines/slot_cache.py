"""The key and value buffers of the transformers engine's slot decoding (slots.py): one row (slot)
per running request in every layer, written in place at each request's own column, grown by
doubling between steps, and read by the model's attention through the part of transformers'
Cache API a forward uses."""

from __future__ import annotations

import torch

from workers.engines.step_setup import text_config


class SlotCache:
    """The key and value buffers of every layer, [rows, kv heads, columns, head dim], read by the
    model's attention through `update` (the part of transformers' Cache API a forward uses)."""

    is_compileable = False

    def __init__(self, model, device: torch.device, dtype: torch.dtype):
        config = text_config(model)
        self.layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.device, self.dtype = device, dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = self.columns = 0
        self.generation = 0  # bumped when the buffers move: graphs captured over the old ones are void
        self._write_rows = self._write_at = self._mask = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @torch.inference_mode()
    def ensure(self, rows: int, columns: int) -> bool:
        """Grow the buffers (doubling) to hold `rows` x `columns`; True when they moved. Rows past
        `rows` hold no running request (the caller's rows are 0..rows-1), so when the columns grow
        only as many rows are kept as fit in the bytes the buffers had, and at least `rows`: one
        long request does not make every idle row as wide, and rows that join after it find room
        without the buffers moving (and the graphs over them being captured) again."""
        if rows <= self.rows and columns <= self.columns:
            return False
        new_rows, new_columns = max(self.rows, 1), max(self.columns, 16)
        while new_columns < columns:
            new_columns *= 2
        if columns > self.columns:
            new_rows = max(rows, 1, self.rows * self.columns // new_columns)
        while new_rows < rows:
            new_rows *= 2
        shape = (new_rows, self.kv_heads, new_columns, self.head_dim)
        self.generation += 1  # first: a failed allocation below must not leave graphs over freed buffers
        for buffers in (self.keys, self.values):
            for layer in range(self.layers):
                grown = torch.zeros(shape, device=self.device, dtype=self.dtype)
                if buffers[layer:]:
                    old = buffers[layer]
                    kept = min(old.shape[0], rows)  # rows past `rows` hold nobody's keys
                    grown[:kept, :, : old.shape[2]] = old[:kept]
                    buffers[layer] = grown
                    del old  # freed before the next layer's buffer is made
                else:
                    buffers.append(grown)
        self.rows, self.columns = new_rows, new_columns
        return True

    def release(self) -> None:
        """Give the buffers back (an idle CPU engine; graphs would hold their addresses)."""
        self.keys, self.values = [], []
        self.rows = self.columns = 0
        self.generation += 1

    @torch.inference_mode()
    def store(self, slot: int, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A prefilled request's rows ([kv heads, length, head dim]) into its slot, from column 0."""
        length = keys.shape[1]
        self.keys[layer][slot, :, :length] = keys
        self.values[layer][slot, :, :length] = values
        # masked columns must hold finite values (0 x inf is NaN in the attention's sum)
        self.keys[layer][slot, :, length:] = 0
        self.values[layer][slot, :, length:] = 0

    @torch.inference_mode()
    def move(self, source: int, target: int, length: int) -> None:
        """Slot `source`'s first `length` columns to slot `target` (a request moving down a row)."""
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target, :, :length] = layer[source, :, :length]
                layer[target, :, length:] = 0

    def bind(self, write_rows: torch.Tensor, write_at: torch.Tensor, mask: torch.Tensor) -> None:
        """What the next forward writes (row i's new key at column write_at[i]) and reads (as many
        columns as its 4D mask has: a size, not a number, so a compiled step reads any width)."""
        self._write_rows, self._write_at, self._mask = write_rows, write_at, mask

    def bound(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the next forward writes, and their columns (`bind`)."""
        return self._write_rows, self._write_at

    # --- what the model's forward calls -----------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = key_states.shape[0]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._write_rows, :, self._write_at] = key_states[:, :, -1]
        values[self._write_rows, :, self._write_at] = value_states[:, :, -1]
        width = self._mask.shape[-1]
        return keys[:rows, :, :width], values[:rows, :, :width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._mask is None else self._mask.shape[-1]

    def __len__(self) -> int:
        return self.layers
