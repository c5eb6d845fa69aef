"""A layer's projections of one input (query, key and value; gate and up) made as one matrix
product: two products a layer instead of five, the same answers however the model calls them."""

import copy
from collections import Counter

import torch
from torch.profiler import profile

from tests.workers.test_slots import _tiny
from workers.engines.batching import BatchingScheduler
from workers.engines.fused_linears import fuse_linears, plain_linears

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])


def _logits_and_products(model) -> tuple[torch.Tensor, int]:
    with torch.inference_mode(), profile() as prof:
        logits = model(input_ids=IDS).logits
    return logits, Counter(event.name for event in prof.events())["aten::linear"]


def test_llama_and_qwen2_make_four_products_a_layer_not_seven_with_the_same_logits():
    for architecture in ("llama", "qwen2"):  # Qwen2's query, key and value have a bias
        model = _tiny(architecture)
        names = sorted(model.state_dict())
        plain, products = _logits_and_products(model)
        assert products == 2 * 7 + 1, architecture  # seven a layer and the output's
        assert fuse_linears(model) == 2 * 2, architecture  # two groups a layer
        assert fuse_linears(model) == 0, architecture  # once only
        fused, products = _logits_and_products(model)
        assert products == 2 * 4 + 1, architecture
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
        assert sorted(model.state_dict()) == names, "the group's weight is not saved with the model"
        plain_linears(model)
        again, products = _logits_and_products(model)
        assert products == 2 * 7 + 1 and torch.equal(again, plain), architecture


def test_the_members_weights_are_views_of_the_groups_so_none_is_held_twice():
    model = _tiny("qwen2")
    before = sum(p.numel() for p in model.parameters())
    fuse_linears(model)
    attention = model.model.layers[0].self_attn
    group = attention.q_proj.fused_weight.untyped_storage().data_ptr()
    for member in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert member.weight.untyped_storage().data_ptr() == group
        assert member.bias.untyped_storage().data_ptr() == attention.q_proj.fused_bias.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before
    with torch.no_grad():  # loading weights into a member loads them into the group
        attention.k_proj.weight.fill_(0.5)
    assert torch.all(attention.q_proj.fused_weight[attention.q_proj.out_features :][: attention.k_proj.out_features] == 0.5)


def test_a_member_called_with_another_input_or_first_makes_its_own_product():
    model = _tiny("llama")
    fuse_linears(model)
    attention = model.model.layers[0].self_attn
    x = torch.randn(3, 1, 64)
    same_values = x.clone()  # equal, but another tensor: the group's part is not handed out for it
    with torch.inference_mode():
        own = [torch.nn.functional.linear(x, m.weight) for m in (attention.q_proj, attention.k_proj, attention.v_proj)]
        assert torch.equal(attention.k_proj(x), own[1])  # first: nothing from the group
        query = attention.q_proj(x)
        key = attention.k_proj(same_values)
        value = attention.v_proj(x)  # the group's part, a view of the one product
        assert value.untyped_storage().data_ptr() == query.untyped_storage().data_ptr()
        assert key.untyped_storage().data_ptr() != query.untyped_storage().data_ptr()
        for got, expected in zip((query, key, value), own):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert attention.v_proj._fused_part is None and attention.k_proj._fused_part is None  # held no longer
        assert torch.equal(attention.v_proj(x), own[2])  # a second call: its own product again


def test_a_group_with_an_adapted_member_keeps_its_own_products():
    class Adapted(torch.nn.Linear):  # as a quantized or LoRA layer would be
        pass

    model = _tiny("llama")
    for layer in model.model.layers:
        old = layer.self_attn.v_proj
        layer.self_attn.v_proj = Adapted(old.in_features, old.out_features, bias=False)
    assert fuse_linears(model) == 2  # the MLPs only
    assert "forward" not in vars(model.model.layers[0].self_attn.q_proj)


def test_hooked_shared_or_repeated_members_keep_their_own_products():
    model = _tiny("llama")
    first, second = (layer.self_attn for layer in model.model.layers)
    first.k_proj.register_forward_hook(lambda module, args, out: None)  # as tensor parallelism hooks a layer
    second.v_proj.weight = second.k_proj.weight  # a weight shared with another layer
    mlp = model.model.layers[1].mlp
    mlp.up_proj = mlp.gate_proj  # one module twice in a group
    assert fuse_linears(model) == 1  # the first layer's MLP only
    assert "forward" in vars(model.model.layers[0].mlp.gate_proj)


def test_a_model_cast_after_fusing_answers_as_one_cast_without_and_fusing_again_joins_the_weights():
    model = _tiny("llama")
    reference = copy.deepcopy(model).to(torch.bfloat16)
    fuse_linears(model)
    model.to(torch.bfloat16)  # the group's weight is a buffer: cast with the members'
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.fused_weight.dtype == torch.bfloat16
    assert torch.equal(_logits_and_products(model)[0], _logits_and_products(reference)[0])
    group = mlp.gate_proj.fused_weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() != group, "cast apart: held twice"
    assert fuse_linears(model) == 4  # joined again, from the members' weights as they are
    group = mlp.gate_proj.fused_weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == group
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():  # a weight loaded now reaches the group's product
        for target in (model, reference):
            target.model.layers[0].mlp.up_proj.weight.mul_(2)
    assert torch.equal(_logits_and_products(model)[0], _logits_and_products(reference)[0])


def test_the_engine_fuses_the_projections_of_the_model_it_serves():
    scheduler = BatchingScheduler(_tiny("llama"), max_batch_size=2)
    try:
        assert scheduler.fused_linears == 4
    finally:
        scheduler.stop()


def test_offloaded_weights_are_left_to_the_hooks_that_load_them():
    with torch.device("meta"):  # as accelerate keeps an offloaded layer's weights until it runs
        model = _tiny("llama")
    assert fuse_linears(model) == 0


def test_a_cross_attention_keeps_its_own_products():
    """Its keys and values project another input than its queries: fused, each call with the
    queries' input would make keys and values for nothing."""

    class TextCrossAttention(torch.nn.Module):  # as Mllama's text cross-attention layers are named
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))

    model = torch.nn.Module()
    model.cross, model.flagged = TextCrossAttention(), copy.deepcopy(TextCrossAttention())
    model.flagged.__class__ = type("Attention", (torch.nn.Module,), {})
    model.flagged.is_cross_attention = True  # as some models mark theirs
    model.plain = type("Attention", (torch.nn.Module,), {})()
    model.plain.q_proj, model.plain.k_proj, model.plain.v_proj = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))
    assert fuse_linears(model) == 1  # the plain attention only
    assert "forward" not in vars(model.cross.k_proj) and "forward" not in vars(model.flagged.k_proj)
