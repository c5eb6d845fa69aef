"""Tiny models with random weights (2 layers, hidden 64) built from a config, saved as local folders
with the default model's tokenizer, for tests of loading and serving each architecture fast."""

import json
from pathlib import Path

# transformers architecture -> the model type (chat format) its chat models use
ARCHITECTURES = {"qwen2": "qwen", "llama": "llama2", "mistral": "mistral", "falcon": "falcon"}


def default_tokenizer_files() -> dict:
    """The tokenizer files the worker published for the default deployment (SmolLM2's)."""
    from chat.models import Deployment

    files = Deployment.objects.get(name="default").tokenizer_files
    assert files, "the default deployment has not published its tokenizer"
    return files


# vLLM's CPU attention has kernels for heads 32 wide and more (64 here), not for the 16 above
VLLM_SIZES = dict(hidden_size=128, num_attention_heads=2)


def tiny_config(folder: Path, architecture: str, tokenizer_files: dict, **sizes):
    """The tiny config of an architecture (transformers'), with the tokenizer files written beside
    it; `sizes` override the default sizes."""
    from transformers import AutoConfig, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files.items():
        (folder / name).write_text(text)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    defaults = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
    if architecture != "falcon":
        defaults.update(intermediate_size=128, num_key_value_heads=2)
    return AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**defaults, **sizes},
    )


def build_tiny_model(folder: Path, architecture: str, tokenizer_files: dict, **sizes) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(folder, architecture, tokenizer_files, **sizes)
    torch.manual_seed(0)  # the same weights every run
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def with_remote_code(folder: Path) -> Path:
    """Turn a tiny Llama folder into one whose architecture only its own shipped code implements."""
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="tinyremote",
        architectures=["TinyRemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tinyremote.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyRemoteConfig(LlamaConfig):\n    model_type = 'tinyremote'\n"
    )
    (folder / "modeling_tinyremote.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tinyremote import TinyRemoteConfig\n\n\n"
        "class TinyRemoteForCausalLM(LlamaForCausalLM):\n    config_class = TinyRemoteConfig\n"
    )
    return folder


def always_emitting(folder: Path, text: str) -> Path:
    """Rewrite a tiny Llama so that, whatever the prompt, greedy decoding emits the token of `text`:
    every token embeds to one vector, the layers add nothing, and only that token's output row is set."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        vector = torch.ones(model.config.hidden_size)
        model.model.embed_tokens.weight[:] = vector
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = vector
    model.save_pretrained(folder)
    return folder
