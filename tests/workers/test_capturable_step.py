"""The decode step a CUDA GPU captures as a graph (workers/engines/slots.py) does nothing a
capture refuses, checked without a GPU: the step runs on PyTorch's meta device (shapes, no data),
where reading a value on the host (`.item()`, `bool(t)`, `nonzero`: a synchronisation on CUDA)
raises, and every op is watched for a tensor made on the host and copied in (a copy from the
host's memory inside a capture fails, or is frozen into the graph with the value it had).

A capture that fails costs the engine its graphs (it decodes eagerly from then on), so a
transformers release whose modelling code reads a value back in the decode step would show here
first, not on the GPU machine."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.workers.test_slots import _tiny
from workers.engines.fused_linears import fuse_linears
from workers.engines.slot_cache import SlotCache
from workers.engines.slots import MIN_WIDTH, SlotDecoder
from workers.engines.step_setup import forward_arguments, fuse_rms_norms, fuse_rotary, packed_sdpa, slot_support

# ops that read a tensor's value on the host, or whose output's size depends on its values
READ_BACK = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


class Watch(TorchDispatchMode):
    """Every op's name where it reads back a value or takes or makes a tensor on the host."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in READ_BACK:
            self.found.append(f"{func} reads a value back")
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        # a 0-d tensor on the host is a scalar argument (passed by value, as a Python number is)
        if any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.found.append(f"{func} takes or makes a tensor on the host")
        return out


def _meta_decoder(architecture: str, attention: str = "sdpa", **extra) -> SlotDecoder:
    """A tiny model of `architecture` set up as the engine sets up its step (fused norms, rotary
    and projections), then moved to the meta device, and its static-buffer decoder."""
    model = _tiny(architecture, **extra)
    assert slot_support(model) is None, architecture
    fuse_rms_norms(model)
    fuse_rotary(model)
    assert fuse_linears(model), architecture  # the fused products run on meta once fused
    model.config._attn_implementation = attention
    model.to("meta")
    cache_arg, last_only = forward_arguments(model)
    return SlotDecoder(model, cache_arg=cache_arg, last_only=last_only, max_rows=4, graphs="emulate")


def _captured_step(decoder: SlotDecoder, rows: int) -> tuple[torch.Tensor, list[str]]:
    """What a capture records for `rows` rows (the step `_capture` hands the graph), watched."""
    with torch.inference_mode():
        decoder._prepare(rows, MIN_WIDTH)
        watch = Watch()
        with watch:
            logits = decoder._static_step(rows, MIN_WIDTH)
    return logits, watch.found


ARCHITECTURES = {"llama": {}, "qwen2": {}, "qwen3": {}, "mistral": {"sliding_window": None}, "granite": {}, "gemma": {}}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_captured_step_reads_nothing_back_and_copies_nothing_from_the_host(architecture):
    decoder = _meta_decoder(architecture, **ARCHITECTURES[architecture])
    for rows in (1, 4):
        logits, found = _captured_step(decoder, rows)
        assert logits.device.type == "meta" and logits.shape == (rows, 300)
        assert found == [], (architecture, rows, found)


def test_the_captured_step_with_packed_grouped_heads_reads_nothing_back(monkeypatch):
    # the attention the compiled step (and bench/gpu_check.py on transformers before 5.24) uses
    from transformers import AttentionInterface

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return packed_sdpa(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "packed_probe", counted)
    logits, found = _captured_step(_meta_decoder("llama", attention="packed_probe"), 4)
    assert logits.shape == (4, 300) and found == []
    assert len(calls) == 2, "one call a layer"


def test_a_step_that_reads_a_value_back_or_copies_from_the_host_is_caught(monkeypatch):
    """The check itself: a cache whose update branches on a value, or adds a host tensor."""
    original = SlotCache.update

    def branching(self, keys, values, layer, *args, **kwargs):
        if keys.sum() > 0:  # bool(): a value read back (on meta it cannot be: it raises)
            keys = keys + 1
        return original(self, keys, values, layer, *args, **kwargs)

    def host_copy(self, keys, values, layer, *args, **kwargs):
        return original(self, keys + torch.zeros(keys.shape[-1]).to(keys.device), values, layer, *args, **kwargs)

    decoder = _meta_decoder("llama")
    monkeypatch.setattr(SlotCache, "update", branching)
    with pytest.raises(RuntimeError, match="meta"):
        _captured_step(decoder, 4)
    monkeypatch.setattr(SlotCache, "update", host_copy)
    _, found = _captured_step(decoder, 4)
    assert found and all("host" in line for line in found), found
