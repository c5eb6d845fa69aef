"""The decode step's set-up for a model: torch's fused RMS norm in place of transformers' Llama one
(one kernel on CUDA instead of about seven)."""

import torch
from torch.profiler import profile

from tests.workers.test_slots import _tiny
from workers.engines.batching import BatchingScheduler
from workers.engines.step_setup import fuse_rms_norms, plain_rms_norms

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


def _logits_and_ops(model) -> tuple[torch.Tensor, set[str]]:
    with torch.inference_mode(), profile() as prof:
        logits = model(input_ids=IDS).logits
    return logits, {event.name for event in prof.events()}


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


def test_the_engine_fuses_the_norms_of_the_model_it_serves():
    scheduler = BatchingScheduler(_tiny("llama"), max_batch_size=2)
    try:
        assert scheduler.fused_norms == 5
        assert scheduler.decode_mode == "slots"
    finally:
        scheduler.stop()
