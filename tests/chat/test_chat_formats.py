"""Each model type renders a fixed conversation exactly as its family does: the family's published
chat template (tokenizer_config.json), or FastChat's conversation template (fastchat/conversation.py,
v0.2.36) for the families that publish none for a conversation with a system prompt. The expected
strings are written out by hand from those sources; FastChat's prompt is preceded by the BOS token
its tokenizer call adds where the family has one (mistral)."""

import uuid

import pytest
from django.core.exceptions import ValidationError
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from chat.chat_formats import MODEL_TYPES
from chat.generation import Conversation
from chat.models import Deployment, RequestLog
from chat.prompting import render_prompt

CONVERSATION = Conversation(
    system_prompt="You are a terse assistant.",
    history=[["What is 2+2?", "4."], ["And 3+3?", "6."]],
    prompt="And 4+4?",
)

EXPECTED = {
    # Qwen1.5-7B-Chat's tokenizer_config.json chat_template (ChatML).
    "qwen": (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n"
    ),
    # Yi-34B-Chat's tokenizer_config.json chat_template (ChatML, no default system prompt).
    "yi": (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n"
    ),
    # Llama-2-7b-chat-hf's tokenizer_config.json chat_template.
    "llama2": (
        "<s>[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s>"
        "<s>[INST] And 3+3? [/INST] 6. </s><s>[INST] And 4+4? [/INST]"
    ),
    # FastChat "mistral" (Mistral-7B-Instruct's own template has no system role).
    "mistral": "<s>[INST] You are a terse assistant.\nWhat is 2+2? [/INST] 4.</s>[INST] And 3+3? [/INST] 6.</s>[INST] And 4+4? [/INST]",
    # FastChat "chatglm" (chatglm-6b's build_prompt: rounds from 0, one newline).
    "chatglm": (
        "You are a terse assistant.\n[Round 0]\n问：What is 2+2?\n答：4.\n[Round 1]\n问：And 3+3?\n答：6.\n"
        "[Round 2]\n问：And 4+4?\n答："
    ),
    # FastChat "chatglm2" (chatglm2-6b's build_prompt: rounds from 1, blank lines).
    "chatglm2": (
        "You are a terse assistant.\n\n[Round 1]\n\n问：What is 2+2?\n\n答：4.\n\n[Round 2]\n\n问：And 3+3?\n\n"
        "答：6.\n\n[Round 3]\n\n问：And 4+4?\n\n答："
    ),
    # FastChat "chatglm3".
    "chatglm3": (
        "<|system|>\nYou are a terse assistant.<|user|>\nWhat is 2+2?<|assistant|>\n4.<|user|>\nAnd 3+3?"
        "<|assistant|>\n6.<|user|>\nAnd 4+4?<|assistant|>"
    ),
    # FastChat "baichuan-chat" (Baichuan-13B-Chat).
    "baichuan": (
        "You are a terse assistant.<reserved_102>What is 2+2?<reserved_103>4.<reserved_102>And 3+3?"
        "<reserved_103>6.<reserved_102>And 4+4?<reserved_103>"
    ),
    # FastChat "baichuan2-chat" (Baichuan2-7B/13B-Chat).
    "baichuan2": (
        "You are a terse assistant.<reserved_106>What is 2+2?<reserved_107>4.<reserved_106>And 3+3?"
        "<reserved_107>6.<reserved_106>And 4+4?<reserved_107>"
    ),
    # FastChat "falcon" (RWKV separator style; the system prompt runs straight into the first turn).
    "falcon": (
        "You are a terse assistant.User: What is 2+2?\n\nAssistant: 4.\n\nUser: And 3+3?\n\nAssistant: 6.\n\n"
        "User: And 4+4?\n\nAssistant:"
    ),
}

OWN_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def tokenizer():
    """A tokenizer with the BOS and EOS tokens of the Llama and Mistral families, and its own template."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = OWN_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_family_renders_the_conversation_in_its_own_format(tokenizer, model_type):
    assert render_prompt(tokenizer, CONVERSATION.messages(), model_type=model_type) == EXPECTED[model_type]


def test_every_model_type_but_auto_has_its_expected_format():
    assert sorted(EXPECTED) == sorted(t for t in MODEL_TYPES if t != "auto")


def test_auto_uses_the_tokenizers_own_template(tokenizer):
    expected = (
        "<system>You are a terse assistant.<user>What is 2+2?<assistant>4.<user>And 3+3?<assistant>6."
        "<user>And 4+4?<assistant>"
    )
    assert render_prompt(tokenizer, CONVERSATION.messages(), model_type="auto") == expected


def test_a_deployments_own_template_overrides_its_family(tokenizer):
    rendered = render_prompt(tokenizer, CONVERSATION.messages(), "{{ messages[-1]['content'] }}!", model_type="qwen")
    assert rendered == "And 4+4?!"


def test_qwen_without_a_system_prompt_gets_its_default_one(tokenizer):
    rendered = render_prompt(tokenizer, [{"role": "user", "content": "Hi"}], model_type="qwen")
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_an_unknown_model_type_is_refused_naming_the_field():
    deployment = Deployment(name="bad-type", model_source="x/y", model_type="gpt5")
    with pytest.raises(ValidationError) as refused:
        deployment.full_clean()
    assert "model_type" in refused.value.message_dict


def test_messages_that_break_a_familys_format_get_400_naming_the_field(stack, token):
    import requests

    default = Deployment.objects.get(name="default")
    strict = Deployment.objects.create(
        name=f"llama2-format-{uuid.uuid4().hex[:6]}",
        model_source=default.model_source,
        model_type="llama2",
        queue="default",
        tokenizer_files=default.tokenizer_files,
        model_context_length=default.model_context_length,
    )
    try:
        response = requests.post(
            f"{stack.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {token}"},
            json={"model": strict.name, "messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}]},
            timeout=60,
        )
    finally:
        Deployment.objects.filter(pk=strict.pk).update(enabled=False)  # no later test should load it
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and "alternate" in error["message"]
    assert not RequestLog.objects.filter(deployment=strict).exclude(status=RequestLog.Status.ERROR).exists()
