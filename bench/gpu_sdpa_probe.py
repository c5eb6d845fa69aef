"""Milliseconds per decode step on CUDA, by precision and attention kernel, for the model whose
config.json is in FOLDER (random weights; the GPU machine has no model hub):

    python bench/gpu_sdpa_probe.py FOLDER

fp32 and bf16, each with SDPA (cuDNN's attention allowed, then not) and eager attention, at batch 1
and 32, then the kernels of a bf16 step with cuDNN allowed. This found why bf16 ran slower than
fp32 in the transformers engine (see batching.py's `_setup_model`).
"""

import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

cfg = AutoConfig.from_pretrained(sys.argv[1])
print("torch", torch.__version__, "cudnn_sdp", torch.backends.cuda.cudnn_sdp_enabled(), flush=True)


def run(m, batch, steps=40):
    ids = torch.randint(0, 1000, (batch, 40), device="cuda")
    mask = torch.ones(batch, 40, dtype=torch.long, device="cuda")
    mask[1:, :5] = 0
    cache = DynamicCache()
    out = m(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize(); t = time.perf_counter()
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long, device="cuda")], 1)
        out = m(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / steps


with torch.inference_mode():
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg).to("cuda", dtype).eval()
        for attn, cudnn in (("sdpa", True), ("sdpa", False), ("eager", False)):
            m.config._attn_implementation = attn
            for layer in m.model.layers:
                layer.self_attn.config._attn_implementation = attn
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            r = {b: round(run(m, b), 2) for b in (1, 32)}
            print(f"{str(dtype):15} {attn:5} cudnn={str(cudnn):5} ms/step batch1={r[1]} batch32={r[32]}", flush=True)
    torch.backends.cuda.enable_cudnn_sdp(True)
    m.config._attn_implementation = "sdpa"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(m, 1, steps=5)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
