"""What a changed deployment's new model will weigh, told before it loads (workers/reload.py asks
a transformers engine on CUDA whether it fits beside the old one): counted from the safetensors
headers as transformers would load the files, at the deployment's precision."""

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
    if source == "bin weights":
        folder = root / "bin"  # an older checkpoint's pickled weights (transformers 5 saves safetensors only)
        folder.mkdir(exist_ok=True)
        shutil.copy(root / "whole" / "config.json", folder / "config.json")
        torch.save(AutoModelForCausalLM.from_pretrained(root / "whole").state_dict(), folder / "pytorch_model.bin")
        model_source = str(folder)
    else:
        model_source = {
            "gguf": Deployment.objects.get(name="default").model_source,
            "not downloaded": "nobody-here/no-such-model",
            "missing folder": str(root / "missing"),
        }[source]
    assert weight_bytes(Deployment(model_source=model_source, precision="bf16")) is None
