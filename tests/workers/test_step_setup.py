"""The decode step's set-up for a model: torch's fused RMS norm in place of transformers' Llama one
(one kernel on CUDA instead of about seven), and the rotary embedding of the query and key heads
computed together (six kernels a layer instead of ten), both the same arithmetic."""

from collections import Counter

import pytest
import torch
from torch.profiler import profile

from tests.workers.test_slots import _tiny
from workers.engines.batching import BatchingScheduler
from workers.engines.step_setup import _fused_rotary, fuse_rms_norms, fuse_rotary, plain_rms_norms, plain_rotary

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


def _logits_and_ops(model) -> tuple[torch.Tensor, set[str]]:
    logits, counted = _logits_and_counts(model)
    return logits, set(counted)


def _logits_and_counts(model) -> tuple[torch.Tensor, Counter]:
    with torch.inference_mode(), profile() as prof:
        logits = model(input_ids=IDS).logits
    return logits, Counter(event.name for event in prof.events())


def test_llama_and_qwen2_norms_run_as_torchs_rms_norm_with_the_same_float32_logits():
    for architecture in ("llama", "qwen2"):
        model = _tiny(architecture)
        plain, ops = _logits_and_ops(model)
        assert "aten::rms_norm" not in ops and "aten::rsqrt" in ops, architecture
        assert fuse_rms_norms(model) == 2 * 2 + 1, architecture  # two a layer and the last one
        assert fuse_rms_norms(model) == 0, architecture  # once only
        fused, ops = _logits_and_ops(model)
        assert "aten::rms_norm" in ops, architecture
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
        plain_rms_norms(model)
        again, ops = _logits_and_ops(model)
        assert "aten::rms_norm" not in ops, architecture
        assert torch.equal(again, plain), architecture


def test_in_bf16_a_fused_norm_is_within_one_rounding_of_transformers():
    model = _tiny("llama").to(torch.bfloat16)
    norm = model.model.norm
    norm.weight.data = torch.randn(norm.weight.shape).to(torch.bfloat16)
    hidden = (torch.randn(16, 1, norm.weight.shape[0]) * 3).to(torch.bfloat16)
    with torch.inference_mode():
        plain = norm(hidden)
        fuse_rms_norms(model)
        fused = norm(hidden)
    assert not torch.equal(fused, plain)  # computed otherwise (one rounding fewer)
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2**-7, atol=2**-7)


def test_a_norm_whose_weight_dtype_differs_from_its_input_keeps_transformers_arithmetic():
    model = _tiny("llama")  # float32 weights
    norm = model.model.norm
    hidden = torch.randn(4, 1, norm.weight.shape[0]).to(torch.bfloat16)
    with torch.inference_mode():
        plain = norm(hidden)
        fuse_rms_norms(model)
        fused = norm(hidden)
    assert fused.dtype == plain.dtype == torch.float32 and torch.equal(fused, plain)


def test_gemmas_norms_keep_their_own_forward():
    model = _tiny("gemma", head_dim=16)  # Gemma's norm scales by 1 + weight
    assert fuse_rms_norms(model) == 0
    _, ops = _logits_and_ops(model)
    assert "aten::rms_norm" not in ops


def test_the_engine_fuses_the_norms_and_the_rotary_of_the_model_it_serves():
    scheduler = BatchingScheduler(_tiny("llama"), max_batch_size=2)
    try:
        assert scheduler.fused_norms == 5
        assert scheduler.fused_rotary == ["transformers.models.llama.modeling_llama"]
        assert scheduler.decode_mode == "slots"
    finally:
        scheduler.stop()


def test_llama_and_qwen2_rotate_query_and_key_heads_together_with_the_same_logits():
    plain_rotary()  # the engines of earlier tests fused them: process wide
    for architecture in ("llama", "qwen2"):
        model = _tiny(architecture)
        plain, ops = _logits_and_counts(model)
        assert ops["aten::neg"] == 2 * 2, architecture  # rotate_half: once for the query, once for the key, each layer
        assert fuse_rotary(model) == [f"transformers.models.{architecture}.modeling_{architecture}"]
        fused, ops = _logits_and_counts(model)
        assert ops["aten::neg"] == 2, architecture
        assert torch.equal(fused, plain), architecture
        plain_rotary()
        again, ops = _logits_and_counts(model)
        assert ops["aten::neg"] == 2 * 2 and torch.equal(again, plain), architecture


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [1, 2])  # heads before the positions (transformers'), or after them
def test_the_fused_rotary_is_transformers_arithmetic_bit_for_bit(dtype, layout):
    from transformers.models.llama.modeling_llama import rotate_half

    torch.manual_seed(0)
    for rows, positions in ((1, 7), (16, 1)):
        shape = [rows, positions, 64]
        q, k = (torch.randn(shape[:layout] + [heads] + shape[layout:]).to(dtype) for heads in (8, 2))
        angles = torch.randn(rows, positions, 64)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        c, s = cos.unsqueeze(layout), sin.unsqueeze(layout)
        expected = (q * c + rotate_half(q) * s, k * c + rotate_half(k) * s)
        got = _fused_rotary(q, k, cos, sin, unsqueeze_dim=layout)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), (rows, positions)
    mixed = k.to(torch.float16)  # heads of another dtype than the query's: each on its own, as transformers does
    expected = k.to(torch.float16) * c + rotate_half(mixed) * s
    assert torch.equal(_fused_rotary(q, mixed, cos, sin, unsqueeze_dim=layout)[1], expected)


def test_shapes_the_fused_rotary_does_not_join_are_computed_as_transformers_does():
    from transformers.models.llama import modeling_llama

    plain_rotary()  # transformers' own, as the module has it
    torch.manual_seed(1)
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 4, 8)  # [batch, positions, heads, dim]
    angles = torch.randn(5, 8)
    cases = [
        (q, k, angles.cos(), angles.sin(), 1),  # cos of a lower rank (no batch axis): joining along axis 1 would mix positions
        (q, k, torch.randn(2, 5, 4), torch.randn(2, 5, 4), -1),  # broadcast over the last axis
    ]
    for case in cases:
        expected, got = modeling_llama.apply_rotary_pos_emb(*case), _fused_rotary(*case)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_model_of_another_rotary_arithmetic_keeps_its_own():
    model = _tiny("glm", head_dim=16, pad_token_id=0)  # interleaved rotate_half
    assert fuse_rotary(model) == []
