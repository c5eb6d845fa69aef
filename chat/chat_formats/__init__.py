"""Chat formats per model family: one Jinja chat template each, rendered by the tokenizer's own
`apply_chat_template`, and the family's stop strings.

A deployment's `model_type` picks one; `auto` keeps the tokenizer's own template. Templates come
from the family's published tokenizer_config.json where it ships one for a conversation with a
system prompt, otherwise from FastChat's conversation templates (each file says which).
"""

from dataclasses import dataclass
from functools import cache
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
AUTO = "auto"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    label: str
    # Stop strings: single tokens of the model's vocabulary stop generation as token ids; any
    # others are cut from the answer text.
    stop: tuple[str, ...] = ()

    @property
    def template(self) -> str:
        return _read(self.name)


@cache
def _read(name: str) -> str:
    return (FOLDER / f"{name}.jinja").read_text(encoding="utf-8").rstrip("\n")


FORMATS = {
    f.name: f
    for f in [
        ChatFormat("qwen", "Qwen, Qwen1.5, Qwen2 (ChatML)", ("<|im_end|>", "<|endoftext|>", "<|im_start|>")),
        ChatFormat("llama2", "Llama-2 chat ([INST] <<SYS>>)", ("</s>",)),
        ChatFormat("mistral", "Mistral-7B-Instruct ([INST])", ("</s>",)),
        ChatFormat("chatglm", "ChatGLM-6B ([Round n] 问/答)"),
        ChatFormat("chatglm2", "ChatGLM2-6B ([Round n] 问/答)"),
        ChatFormat("chatglm3", "ChatGLM3-6B (<|user|>/<|assistant|>)", ("<|user|>", "<|observation|>", "</s>")),
        ChatFormat("baichuan", "Baichuan-13B-Chat (<reserved_102>/<reserved_103>)", ("</s>",)),
        ChatFormat("baichuan2", "Baichuan2-7B/13B-Chat (<reserved_106>/<reserved_107>)", ("</s>",)),
        ChatFormat("yi", "Yi-6B/34B-Chat (ChatML)", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>")),
        ChatFormat("falcon", "Falcon-7B/40B-instruct (User:/Assistant:)", ("\nUser", "<|endoftext|>")),
    ]
}

# Templates kept for their tool formats, not model types of their own (a Qwen2.5 deployment's
# tokenizer ships this template: `auto` renders with it): the tests render tools through them.
# qwen2.5.jinja is the chat_template of Qwen/Qwen2.5-0.5B-Instruct's published tokenizer_config.json
# (the same in every Qwen2.5 Instruct size), byte for byte.
VENDORED = ("qwen2.5",)


def vendored_template(name: str) -> str:
    if name not in VENDORED:
        raise KeyError(name)
    return _read(name)


MODEL_TYPE_CHOICES = [(AUTO, "auto: the tokenizer's own chat template")] + [(f.name, f.label) for f in FORMATS.values()]
MODEL_TYPES = [name for name, _ in MODEL_TYPE_CHOICES]


def template_for(model_type: str = AUTO, chat_template: str = "") -> str | None:
    """The Jinja template a deployment renders with: its own override, its family's, or None
    (the tokenizer's own)."""
    if chat_template:
        return chat_template
    family = FORMATS.get(model_type or AUTO)
    return family.template if family else None


def stop_strings(model_type: str = AUTO) -> tuple[str, ...]:
    family = FORMATS.get(model_type or AUTO)
    return family.stop if family else ()
