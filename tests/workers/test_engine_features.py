"""llmsite/engine_features.py: the web tier's table of which engine honours which decoding field."""

import dataclasses

from chat.models import Deployment
from llmsite import engine_features
from llmsite.contract import SamplingParams


def plain(**fields):
    return SamplingParams(max_new_tokens=4, temperature=0, top_k=0, top_p=1.0, do_sample=False, **fields)


def test_the_table_names_every_engine_and_every_decoding_field_of_the_contract():
    assert set(engine_features.ENGINE_FEATURES) == set(Deployment.Engine.values)
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default) for f in dataclasses.fields(SamplingParams)}
    for name, unused in engine_features.DECODING_FIELDS.items():
        assert defaults[name] == unused, name


def test_every_engine_honours_every_field_today_and_an_unknown_engine_none():
    used = plain(logprobs=True, top_logprobs=3, n=2, seed=1, grammar="g", logit_bias={"1": 2}, frequency_penalty=0.5)
    for engine in Deployment.Engine.values:
        assert engine_features.unsupported(engine, used) is None
        assert engine_features.unsupported(engine, dataclasses.asdict(used)) is None
    assert engine_features.unsupported("tpu", plain()) is None  # nothing asked, nothing missing
    assert engine_features.unsupported("tpu", plain(presence_penalty=0.1)) == "presence_penalty"
