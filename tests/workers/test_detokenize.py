"""The engines' incremental detokenizer: pieces that join into exactly the whole decoded text."""

import pytest
from django.conf import settings

from workers.engines.queued import IncrementalDecoder

TEXTS = [
    "The capital of France is Paris.",
    "  Leading spaces, double  spaces,\nnew lines\n\nand tabs\tstay.",
    "Accents: café, naïve, Ærøskøbing; CJK: 北京是中国的首都。 Emoji: 🦉🚂🍞 done.",
    "Code: def f(x):\n    return x ** 2  # squared\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from workers.engines.transformers_engine import resolve_source

    folder, gguf_file = resolve_source(settings.DEFAULT_MODEL_SOURCE)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_into_the_whole_decoded_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(token) for token in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)  # no half of a multi-byte character


def test_special_tokens_add_no_text(tokenizer):
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.add(t) for t in ids) + decoder.flush() == "Hello"
