"""One matrix product where a layer makes several of the same input: an attention's query, key
and value projections (q_proj, k_proj, v_proj) and an MLP's gate and up projections (gate_proj,
up_proj). A decode step of a small model replays its kernels one by one, so three products a
layer instead of five is two kernels fewer per layer in a captured step, compiled or not
(inductor leaves each product to the BLAS as a kernel of its own); and one wider product reads
the same weights as the narrow ones.

The modelling code is left as it is: the group's first projection computes the whole group's
output from one weight (the members' weights, concatenated; theirs become views of it, so no
weight is held twice) and hands the others their part, which they return when called with the
same input tensor, in the same step. Called with anything else (another input, another order),
a member computes its own product as before: the answers never depend on how the model calls
them. `plain_linears` undoes it (the GPU bench measures transformers' own loops).
"""

from __future__ import annotations

import torch

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_linears(model) -> int:
    """Fuse every group of `GROUPS` in `model` whose members are plain `nn.Linear` layers of one
    input size, dtype and device, all with a bias or none (a quantized or adapted layer keeps its
    own). Returns how many groups it fused (0 when called again)."""
    fused = 0
    for module in model.modules():
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if _fusable(members):
                _fuse(members)
                fused += 1
    return fused


def plain_linears(model) -> None:
    """Undo `fuse_linears`: each member's own product again (the weights stay views of one tensor)."""
    for module in model.modules():
        if _is_fused(module):
            for name in ("forward", "_fused_next", "_fused_input", "_fused_output"):
                vars(module).pop(name, None)
            module._buffers.pop("fused_weight", None)
            module._buffers.pop("fused_bias", None)


def _fusable(members) -> bool:
    if not all(type(m) is torch.nn.Linear and "forward" not in vars(m) for m in members):
        return False
    first = members[0]
    weights = [m.weight for m in members]
    return (
        all(w.dtype == first.weight.dtype and w.device == first.weight.device for w in weights)
        and all(m.in_features == first.in_features for m in members)
        and len({m.bias is None for m in members}) == 1
    )


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
    first.__dict__["_fused_next"] = rest
    first.forward = _fused_first.__get__(first)
    for member in rest:
        member.__dict__.update(_fused_input=None, _fused_output=None)
        member.forward = _fused_member.__get__(member)


def _is_fused(module) -> bool:
    function = getattr(vars(module).get("forward"), "__func__", None)
    return function is _fused_first or function is _fused_member


def _fused_first(self, x: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.linear(x, self.fused_weight, self.fused_bias)
    sizes = [self.out_features] + [m.out_features for m in self._fused_next]
    parts = out.split(sizes, dim=-1)
    for member, part in zip(self._fused_next, parts[1:]):
        member._fused_input, member._fused_output = x, part
    return parts[0]


def _fused_member(self, x: torch.Tensor) -> torch.Tensor:
    given, output = self._fused_input, self._fused_output
    self._fused_input = self._fused_output = None  # held no longer than the step that made it
    if given is x:
        return output
    return torch.nn.functional.linear(x, self.weight, self.bias)
