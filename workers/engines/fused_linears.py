"""One matrix product where a layer makes several of the same input: an attention's query, key
and value projections (q_proj, k_proj, v_proj) and an MLP's gate and up projections (gate_proj,
up_proj). A decode step of a small model replays its kernels one by one, so two products a layer
instead of five is three kernels fewer per layer in a captured step, compiled or not (inductor
leaves each product to the BLAS as a kernel of its own); and one wider product reads the same
weights as the narrow ones.

The modelling code is left as it is: the group's first projection computes the whole group's
output from one weight (the members' weights, concatenated; theirs become views of it, so no
weight is held twice) and hands the others their part, which they return when called with the
same input tensor, in the same step. Called with anything else (another input, another order),
a member computes its own product as before: the answers never depend on how the model calls
them (one that calls them otherwise pays for the parts computed in vain; a cross-attention, whose
keys and values are of another input, is left unfused). Several threads may run the model at once (a
part is handed out with its input, in one attribute). For serving: no gradient reaches the
members' weights.

Fuse a model once it is loaded and placed (the engine does, after moving it to its device).
Moving or casting it afterwards gives each weight and the group's tensor copies of their own:
the answers stay right, but the weights are held twice and a weight loaded later reaches the
member only; `fuse_linears` called again joins them once more. `plain_linears` undoes it (the
GPU bench measures transformers' own loops).
"""

from __future__ import annotations

import torch

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_STATE = ("forward", "_fused_next", "_fused_sizes", "_fused_part")  # what fusing sets on a member


def fuse_linears(model) -> int:
    """Fuse every group of `GROUPS` in `model` whose members are distinct plain `nn.Linear`
    layers of one input size, dtype and device, all with a bias or none, with plain weights of
    their own. A quantized, adapted or sharded layer (a subclass, or a weight of a tensor
    subclass), one whose forward is wrapped or hooked (accelerate's hooks, tensor parallelism),
    a weight shared with another layer, or one offloaded to the meta device keeps its own product.
    Returns how many groups it fused or joined again (0 when called again on an unmoved model)."""
    shared = _shared_weights(model)
    fused = 0
    for module in model.modules():
        if _cross_attention(module):
            continue
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if members[0] is not None and _is_fused(members[0]) and not _joined(members):
                _plain(members)  # moved or cast since: join the members' weights as they are now
            if _fusable(members, shared):
                _fuse(members)
                fused += 1
    return fused


def plain_linears(model) -> None:
    """Undo `fuse_linears`: each member's own product again (the weights stay views of one tensor)."""
    _plain([module for module in model.modules() if _is_fused(module)])


def _plain(members) -> None:
    for member in members:
        for name in _STATE:
            vars(member).pop(name, None)
        member._buffers.pop("fused_weight", None)
        member._buffers.pop("fused_bias", None)


def _shared_weights(model) -> set[int]:
    seen, shared = set(), set()
    for _, parameter in model.named_parameters(remove_duplicate=False):
        (shared if id(parameter) in seen else seen).add(id(parameter))
    return shared


def _cross_attention(module) -> bool:
    """An attention whose keys and values project another input than its queries (Mllama's text
    cross-attention layers, say): a fused group would make the queries' input's keys and values for nothing."""
    return "CrossAttention" in type(module).__name__ or getattr(module, "is_cross_attention", False) is True


def _fusable(members, shared: set[int]) -> bool:
    plain = all(
        type(m) is torch.nn.Linear and "forward" not in vars(m) and not m._forward_hooks and not m._forward_pre_hooks
        for m in members
    )
    if not plain or len({id(m) for m in members}) != len(members):
        return False
    tensors = [m.weight for m in members] + [m.bias for m in members if m.bias is not None]
    first = members[0].weight
    return (
        all(type(t) is torch.nn.Parameter and type(t.data) is torch.Tensor and id(t) not in shared for t in tensors)
        and first.device.type != "meta"  # offloaded: accelerate's hooks load each weight as it is called
        and all(t.dtype == first.dtype and t.device == first.device for t in tensors)
        and all(m.in_features == members[0].in_features for m in members)
        and len({m.bias is None for m in members}) == 1
    )


def _joined(members) -> bool:
    """Whether a fused group's weights are still views of its tensor."""
    group = members[0].fused_weight.untyped_storage().data_ptr()
    return all(m.weight.untyped_storage().data_ptr() == group for m in members)


def _fuse(members) -> None:
    first, rest = members[0], members[1:]
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in members])
        bias = torch.cat([m.bias.detach() for m in members]) if first.bias is not None else None
    start = 0
    for member in members:  # each weight a view of the group's: no weight held twice
        end = start + member.out_features
        member.weight = torch.nn.Parameter(weight[start:end], requires_grad=member.weight.requires_grad)
        if bias is not None:
            member.bias = torch.nn.Parameter(bias[start:end], requires_grad=member.bias.requires_grad)
        start = end
    # buffers, so that moving or casting the model moves the group's weight too (not saved)
    first.register_buffer("fused_weight", weight, persistent=False)
    first.register_buffer("fused_bias", bias, persistent=False)
    first.__dict__["_fused_next"] = rest  # not as submodules
    first.__dict__["_fused_sizes"] = [m.out_features for m in members]
    first.forward = _fused_first.__get__(first)
    for member in rest:
        member.__dict__["_fused_part"] = None
        member.forward = _fused_member.__get__(member)


def _is_fused(module) -> bool:
    function = getattr(vars(module).get("forward"), "__func__", None)
    return function is _fused_first or function is _fused_member


def _fused_first(self, x: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.linear(x, self.fused_weight, self.fused_bias)
    parts = out.split(self._fused_sizes, dim=-1)
    for member, part in zip(self._fused_next, parts[1:]):
        member._fused_part = (x, part)  # one attribute, set at once: never one input's with another's output
    return parts[0]


def _fused_member(self, x: torch.Tensor) -> torch.Tensor:
    pending, self._fused_part = self._fused_part, None  # held no longer than the step that made it
    if pending is not None and pending[0] is x:
        return pending[1]
    return torch.nn.functional.linear(x, self.weight, self.bias)
