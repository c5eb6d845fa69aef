"""What a changed deployment's new model will weigh, told before it loads: counted from the
safetensors headers as transformers would load the files, at the deployment's precision; and the
rule a transformers engine on CUDA answers with when workers/reload.py asks whether the new model
fits beside it."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from chat.models import Deployment
from workers.engines.transformers_engine import weight_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama saved whole, and the same saved in shards with a consolidated copy beside them
    (as Mistral's repositories ship one) that transformers does not load."""
    root = tmp_path_factory.mktemp("weights")
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True,  # its output head is its embedding table: stored, and counted, once
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "whole")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    shutil.copy(root / "whole" / "model.safetensors", root / "sharded" / "consolidated.safetensors")
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(root / "whole").parameters())
    return root, params


@pytest.mark.parametrize("saved", ["whole", "sharded"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_local_model_weighs_its_parameters_at_the_deployments_precision(tiny, saved, precision):
    root, params = tiny
    if saved == "sharded":
        assert len(list((root / saved).glob("model-*.safetensors"))) > 1, "saved in several shards"
    size = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision].itemsize
    assert weight_bytes(Deployment(model_source=str(root / saved), precision=precision)) == params * size


@pytest.mark.parametrize("source", ["gguf", "not downloaded", "missing folder", "bin weights"])
def test_what_cannot_be_told_is_none(tiny, source):
    """The caller then takes the old model's size (and a load that runs out of memory still closes
    the old engine first)."""
    root, _ = tiny
    if source == "gguf":
        (root / "model.gguf").write_bytes(b"GGUF")  # what transformers de-quantizes: its size says little
        model_source = str(root / "model.gguf")
    elif source == "bin weights":
        folder = root / "bin"  # an older checkpoint's pickled weights (transformers 5 saves safetensors only)
        folder.mkdir(exist_ok=True)
        shutil.copy(root / "whole" / "config.json", folder / "config.json")
        torch.save(AutoModelForCausalLM.from_pretrained(root / "whole").state_dict(), folder / "pytorch_model.bin")
        model_source = str(folder)
    else:
        model_source = {"not downloaded": "nobody-here/no-such-model", "missing folder": str(root / "missing")}[source]
    assert weight_bytes(Deployment(model_source=model_source, precision="bf16")) is None


# (the new deployment, the GPU's free bytes from the new model's weights and the old model's footprint, fits)
ROOM = {
    "fp32 weights fit": ("fp32", lambda weights, footprint: weights + 1, True),
    "fp32 weights do not": ("fp32", lambda weights, footprint: weights - 1, False),
    "bf16 weights fit": ("bf16", lambda weights, footprint: weights // 2 + 1, True),
    "gguf: the old model's footprint fits": ("gguf", lambda weights, footprint: footprint + 1, True),
    "gguf: the old model's footprint does not": ("gguf", lambda weights, footprint: footprint - 1, False),
    "vllm takes 90% of every GPU": ("vllm", lambda weights, footprint: weights * 100, False),
    "llamacpp runs on the CPUs": ("llamacpp", lambda weights, footprint: 0, True),
}


@pytest.mark.parametrize("case", ROOM)
def test_on_a_gpu_the_new_model_fits_beside_where_its_weights_fit_in_the_free_memory(tiny, monkeypatch, case):
    """The rule an fp32 transformers engine on CUDA answers with (workers/reload.py's "auto"), the
    GPU's free memory played: these machines have no GPU."""
    from types import SimpleNamespace

    from workers.engines.transformers_engine import TransformersEngine

    new, free, fits = ROOM[case]
    root, params = tiny
    old = AutoModelForCausalLM.from_pretrained(root / "whole")
    (root / "new.gguf").write_bytes(b"GGUF")
    free_bytes = free(params * 4, old.get_memory_footprint())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 80 * 2**30))
    engine = SimpleNamespace(device="cuda", model=old)  # what room_beside reads of the engine
    deployment = Deployment(
        model_source=str(root / ("new.gguf" if new == "gguf" else "whole")),
        precision="bf16" if new == "bf16" else "fp32",
        engine=new if new in ("vllm", "llamacpp") else "transformers",
    )
    assert TransformersEngine.room_beside(engine, deployment) is fits
