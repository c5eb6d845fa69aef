"""bench/gpu_check.py (issue 24's GPU check) runs end to end on CPU in its quick mode, with the
bucketed static-buffer path the GPU captures as CUDA graphs (emulated here), so the one device
run a GPU session gets is not spent on a broken script."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_cpu_in_quick_mode(tmp_path):
    folder, out = tmp_path / "smollm2", tmp_path / "gpu.json"
    script = str(ROOT / "bench" / "gpu_check.py")
    subprocess.run([sys.executable, script, "--write-folder", str(folder)], check=True, timeout=300)
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    assert not list(folder.glob("*.safetensors")), "the folder carries no weights"
    env = {**os.environ, "LLMSITE_CUDA_GRAPHS": "emulate", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, script, str(folder), str(out), "--quick"], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"] is True
    assert report["gqa_decode"] == "pack_gqa", "the pinned transformers packs a decode step's grouped heads itself"
    assert report["fp32_batched_equals_single"] == 16
    assert report["abort_others_whole"] == 7 and report["abort_running_after"] == 0
    assert 3 <= report["abort_victim_tokens"] < 32 and report["abort_victim_finish"] == "cancelled"
    assert not [key for key in report if key.endswith("_error")], report
    assert report["engine_warnings"] == [], "nothing went wrong in the engine"
    for name in ("135M", "1B"):
        entry = report[name]
        assert entry["decode_mode"] == "slots, static buffers (CUDA graphs emulated), one step ahead"
        # every batch bucket up to 64 at load (the load check's among them), none while timed
        assert entry["graph_captures_at_load"] == 9 and entry["graph_capture_failures"] == 0
        assert entry["graph_captures"] == entry["graph_captures_at_load"]
        assert entry["graph_captures_timed_1"] == 0 and entry["graph_captures_timed_8"] == 0
        for key in ("engine_tok_s_1", "engine_tok_s_8", "engine_tok_s_1_not_ahead", "generate_tok_s_1", "generate_tok_s_8"):
            assert entry[key] > 0, key
        for key in ("generate_batch_tok_s_1", "generate_batch_tok_s_8"):
            assert isinstance(entry[key], float) or entry[key].startswith("failed: "), entry[key]
        assert entry["engine_8_vs_1"] > 0 and entry["weight_bytes"] > 0
        assert entry["replay_ms_1"] > 0 and entry["replay_ms_8"] > 0, "a captured step, replayed alone"
        assert entry["graph_captures_long"] > 0, "a request past 256 columns widened the buffers"
        assert entry["engine_ms_per_step_8"] > 0
        assert entry["fused_linears"] == 2 * 2, "query/key/value and gate/up, in each of the quick run's two layers"
    for name in ("135M compiled", "1B compiled"):  # LLMSITE_COMPILE=1: graphs compiled at load, none later
        entry = report[name]
        assert entry["decode_mode"] == "slots, static buffers (CUDA graphs emulated), compiled, one step ahead"
        assert 1 <= entry["compiles_at_load"] <= 2 and entry["compiled_at_end"] is True
        assert entry["compiles"] == entry["compiles_after_long"] == entry["compiles_at_load"], "compiled while serving"
        assert entry["graph_captures_long"] > 0 and entry["graph_capture_failures"] == 0
        assert entry["graph_captures_at_load"] == 8 and entry["graph_captures"] == 8, "buckets from 2 to 64"
        assert entry["engine_tok_s_1"] > 0 and entry["engine_tok_s_8"] > 0
    for name in ("135M", "1B"):  # the profiler's count of a step's kernels (operators, on CPU): fused when compiled
        plain, compiled = report[name]["kernels_per_step_1"], report[f"{name} compiled"]["kernels_per_step_1"]
        assert 0 < compiled < plain, (plain, compiled)
    assert report["targets_compiled"]["fp32_16_of_16_equal"] is True
    assert report["checks_compiled"]["fp32_single_equals_uncompiled"] == 16
    assert report["targets_compiled"]["abort_leaves_others_whole_and_frees_row"] is True
    assert report["targets"]["fp32_16_of_16_equal"] is True
    assert report["targets"]["abort_leaves_others_whole_and_frees_row"] is True


def test_gpu_check_keeps_what_the_engine_warned_of_with_its_exception():
    import logging

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_check import EngineWarnings
    finally:
        sys.path.remove(str(ROOT / "bench"))
    kept, log = EngineWarnings(keep=2), logging.getLogger("workers.engines.graphs")
    log.addHandler(kept)
    try:
        log.info("not kept")
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            log.exception("CUDA graph capture failed")
        log.warning("slot decoding off: %s", "why")
        log.warning("past the two kept")
    finally:
        log.removeHandler(kept)
    assert kept.seen == [
        "workers.engines.graphs: CUDA graph capture failed (RuntimeError: operation not permitted when stream is capturing)",
        "workers.engines.graphs: slot decoding off: why",
    ]
