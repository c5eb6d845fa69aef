"""How the transformers engine's decode step is set up for a model: on slots or not
(`slot_support`), as CUDA graphs or not (`cuda_graphs_wanted`), and compiled by torch.compile
inside those graphs or not (`compile_wanted`, `CompiledStep`).

Compiling (LLMSITE_COMPILE=1; on the static path only, so CUDA or emulated) fuses the step's
small element-wise kernels (RMS norms, rotary embeddings, the MLP's activation) that a captured
step otherwise replays one by one: a decode step of a small model at one stream is bound by
their number, not by reading the weights. One compiled graph serves every batch bucket and
width (the rows and columns of the inputs, the mask and the KV buffers are dynamic), so the
compiles all happen at load (`SlotDecoder.warm`), not while serving; `compiles` counts them.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading

import torch

_OFF = ("0", "false", "no", "off")


def text_config(model):
    """The config of the model's language part (the model's own where it has no other part)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def forward_arguments(model) -> tuple[str, dict]:
    """What a decode step passes the model's forward: the name of its cache argument (transformers
    5.24 renamed `past_key_values` to `cache`; remote-code models keep the old name), and
    `logits_to_keep=1` where the forward takes it."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values", {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def slot_support(model) -> str | None:
    """Why `model` cannot run on slots (None: it can). The forward must be transformers' own
    (remote code keeps its own cache format), with full attention in every layer (a sliding window
    needs its own mask) and an attention that takes a 4D mask (sdpa or eager). `SlotDecoder.check`
    then compares the slot step with the plain one on the real weights."""
    if not type(model).__module__.startswith("transformers.models."):
        return "its modelling code ships with the model"
    config = text_config(model)
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "sliding-window or mixed attention layers"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"a sliding window of {config.sliding_window}"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r}"
    if getattr(config, "num_hidden_layers", None) is None or getattr(config, "num_attention_heads", None) is None:
        return "its config names no layer or head counts"
    return None


def cuda_graphs_wanted(device: torch.device, model=None) -> bool | str:
    """CUDA graphs on a CUDA device unless LLMSITE_CUDA_GRAPHS=0 or the model's rotary embedding
    reads the positions on the host (dynamic and longrope scaling); LLMSITE_CUDA_GRAPHS=emulate runs
    the bucketed static path without capturing (any device)."""
    setting = os.environ.get("LLMSITE_CUDA_GRAPHS", "1").strip().lower()
    if setting == "emulate":
        return "emulate"
    if model is not None:
        config = text_config(model)
        rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
        kind = str(rope.get("rope_type", rope.get("type", ""))) if isinstance(rope, dict) else ""
        if "dynamic" in kind or kind == "longrope":
            return False
    return device.type == "cuda" and setting not in _OFF


def compile_wanted() -> bool:
    """Whether the static decode step is compiled by torch.compile (LLMSITE_COMPILE, off by default)."""
    return os.environ.get("LLMSITE_COMPILE", "0").strip().lower() not in _OFF + ("",)


def fuse_rms_norms(model) -> int:
    """Every RMS norm of `model` whose forward is transformers' Llama one (eight operators: to
    float32, pow, mean, add, rsqrt, two multiplies and back; Llama, Qwen2/3, Mistral and about 140
    others) computed by torch's `rms_norm` instead, which CUDA runs as one kernel
    (`_fused_rms_norm`): a captured decode step of SmolLM2-135M would replay about 14 fewer
    kernels per layer (counted on CPU, where torch's rms_norm is itself composite, as if it were
    one kernel there too). Results: bit for bit the same in float32 on CPU
    (within float32 rounding on CUDA, which reduces in another order), within one rounding in bf16.
    Norms of other forwards (Gemma's 1 + weight, say) keep theirs. Returns how many it took."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    fused = 0
    for module in model.modules():
        same = _same_code(type(module).forward, LlamaRMSNorm.forward)
        if same and "forward" not in vars(module) and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.forward = _fused_rms_norm.__get__(module)
            fused += 1
    return fused


def plain_rms_norms(model) -> None:
    """Undo `fuse_rms_norms` (the GPU bench measures transformers' own loops on the same model)."""
    for module in model.modules():
        if getattr(vars(module).get("forward"), "__func__", None) is _fused_rms_norm:
            del module.forward


def _fused_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype or self.weight.dim() != 1:  # as transformers computes it
        return type(self).forward(self, hidden_states)
    return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


_PLAIN_ROTARY: dict[str, object] = {}  # modeling module -> its own apply_rotary_pos_emb, while fused
_ROTARY = threading.Lock()  # engines load in threads of their own


def fuse_rotary(model) -> list[str]:
    """Every modeling module of `model` whose `apply_rotary_pos_emb` and `rotate_half` are
    transformers' Llama ones (Llama, Qwen2/3, Mistral and most others) made to rotate the query
    and key heads together (`_fused_rotary`): six kernels a layer instead of ten, bit for bit the
    same. transformers' attention calls the function of its module by name, so this is process
    wide: every model of those modules, in this process, from now on (`plain_rotary` undoes it).
    Returns the modules' names."""
    import sys

    from transformers.models.llama import modeling_llama

    fused = []
    with _ROTARY:
        reference = _llama_rotary()
        for name in sorted({type(module).__module__ for module in model.modules()}):
            source = sys.modules.get(name)
            own = getattr(source, "apply_rotary_pos_emb", None)
            if own is _fused_rotary:
                fused.append(name)
            elif _same_code(own, reference) and _same_code(getattr(source, "rotate_half", None), modeling_llama.rotate_half):
                _PLAIN_ROTARY[name] = own
                source.apply_rotary_pos_emb = _fused_rotary
                fused.append(name)
    return fused


def plain_rotary() -> None:
    """Undo `fuse_rotary` everywhere (the GPU bench measures transformers' own loops). A compiled
    step frozen after load (CompiledStep) traced the fused function: it would refuse to compile
    again, and run its plain step instead."""
    import sys

    with _ROTARY:
        for name, own in _PLAIN_ROTARY.items():
            sys.modules[name].apply_rotary_pos_emb = own
        _PLAIN_ROTARY.clear()


def _llama_rotary():
    """transformers' own Llama `apply_rotary_pos_emb`, fused or not (every fused module's is the same code)."""
    from transformers.models.llama import modeling_llama

    return _PLAIN_ROTARY.get(modeling_llama.__name__, modeling_llama.apply_rotary_pos_emb)


def _same_code(function, reference) -> bool:
    """Whether `function` is `reference` but for where it was defined: the same bytecode, names,
    constants, arguments and defaults."""
    code, plain = getattr(function, "__code__", None), reference.__code__
    fields = ("co_code", "co_consts", "co_names", "co_varnames", "co_argcount", "co_kwonlyargcount")
    return code is not None and all(getattr(code, f) == getattr(plain, f) for f in fields) and function.__defaults__ == reference.__defaults__


def _fused_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' Llama `apply_rotary_pos_emb` (x * cos + rotate_half(x) * sin) over the query
    and key heads at once: one concatenation along the axis cos and sin are broadcast over (the
    heads'), then each operator once for both (the same arithmetic, element by element); the
    results are views of one tensor. Anything else (tensors of other ranks or dtypes, another
    axis) is computed as transformers does."""
    axis = unsqueeze_dim % (cos.dim() + 1)
    same = q.dtype == k.dtype and q.dim() == k.dim() == cos.dim() + 1 and axis != q.dim() - 1
    if not same or q.shape[:axis] != k.shape[:axis] or q.shape[axis + 1 :] != k.shape[axis + 1 :]:
        return _llama_rotary()(q, k, cos, sin, unsqueeze_dim)
    both = torch.cat((q, k), dim=axis)
    half = both.shape[-1] // 2
    rotated = torch.cat((-both[..., half:], both[..., :half]), dim=-1)
    out = (both * cos.unsqueeze(unsqueeze_dim)) + (rotated * sin.unsqueeze(unsqueeze_dim))
    return out.split((q.shape[axis], k.shape[axis]), dim=axis)


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, except that a one-token query attends grouped key/value
    heads with its query heads packed over them ([rows, kv heads, group, dim]), as transformers
    5.24 does eagerly: its own `repeat_kv` (what 5.24 falls back to under torch.compile, and
    5.17 always) copies the keys and values once per head group, which at 64 streams of a 1B
    model moves more bytes a step than the weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1
    plain = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None  # transformers' own handles (or refuses) these
    if groups == 1 or query.shape[2] != 1 or not shared_mask or plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, heads // groups, groups, dim), key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
    )
    return out.reshape(out.shape[0], heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_packed_sdpa() -> None:
    """`packed_sdpa` as every model's "sdpa" attention in this process (it defers to
    transformers' own for everything but a grouped one-token query)."""
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa", packed_sdpa)


class CompiledStep:
    """The model's forward for a decode step over a SlotCache, compiled by torch.compile (inductor,
    no CUDA graphs of its own: the caller captures the compiled step). Called as the model is.

    Whatever cannot be compiled raises, so that the caller captures the plain step instead: a
    graph break (`fullgraph`: eager code left between graphs could synchronise inside a
    capture), the process's limit of graphs per function (transformers wraps every model's
    forward in one function, so models share it), and, once `freeze` is called after load, any
    new compile at all (a compile inside a CUDA graph capture fails, and while serving it would
    stall every stream)."""

    def __init__(self, model, cache_arg: str):
        _configure()
        self.model, self.cache_arg = model, cache_arg
        self.compiles = 0  # graphs compiled for this step (Dynamo's count, read around each call)
        self.frozen = False
        self._compiled = torch.compile(model, fullgraph=True)

    def freeze(self) -> None:
        """From now on a call that would compile raises instead."""
        self.frozen = True

    def __call__(self, **inputs):
        from torch._dynamo.utils import counters

        cache = inputs[self.cache_arg]
        for rows in (inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"], *cache.bound()):
            _dynamic(rows, 0)
        _dynamic(inputs["attention_mask"], 3)  # the columns a step reads
        for buffer in cache.keys + cache.values:  # their rows and columns
            _dynamic(buffer, 0)
            _dynamic(buffer, 2)
        stance = torch.compiler.set_stance("fail_on_recompile") if self.frozen else contextlib.nullcontext()
        with _COMPILING, stance:  # one engine compiles at a time: the count is this step's
            before = counters["stats"]["unique_graphs"]
            output = self._compiled(**inputs)
            self.compiles += counters["stats"]["unique_graphs"] - before
        return output


_COMPILING = threading.Lock()


def _configure() -> None:
    """This process's settings for compiling decode steps (the only compiles a worker makes)."""
    use_packed_sdpa()
    dynamo = torch._dynamo.config
    dynamo.fail_on_recompile_limit_hit = True  # not a silent fall back to an uncompiled step
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)  # two per model, models share it
    # no "duck sizing": sizes that happen to be equal when a graph is compiled (buffer rows and a
    # batch bucket, say) must not become one size, guarded, and compiled again while serving
    from torch.fx.experimental import _config

    _config.use_duck_shape = False


def _dynamic(tensor: torch.Tensor, dim: int) -> None:
    torch._dynamo.maybe_mark_dynamic(tensor, dim)
