"""Which of the contract's decoding fields (llmsite.contract.SamplingParams, version 3) each
engine honours, so the web tier refuses a request an engine cannot answer (a 400 naming the field
and the engine) before anything is queued. Standard library only: the web tier reads it without
importing workers/.

Today every engine honours every field: the llama.cpp and transformers engines through one token
policy (workers/engines/sampling.py), vLLM through its own SamplingParams and structured outputs
(workers/engines/vllm_engine.py). vLLM takes a grammar only as one JSON schema or one Lark grammar
(what StructuredOutputsParams' `json` / `grammar` carry), which is all the web tier compiles.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass

# The decoding fields, with the value that means "not used" (a request that leaves a field at it
# needs nothing of the engine). `n` and `seed` are honoured by the worker for every engine (n
# engine requests, seeds seed, seed + 1, ...).
DECODING_FIELDS: dict[str, object] = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "logit_bias": {},
    "logprobs": False,
    "top_logprobs": 0,
    "n": 1,
    "seed": None,
    "grammar": "",
}

ENGINE_FEATURES: dict[str, frozenset[str]] = {
    "llamacpp": frozenset(DECODING_FIELDS),
    "transformers": frozenset(DECODING_FIELDS),
    "vllm": frozenset(DECODING_FIELDS),
}


def supports(engine: str, name: str) -> bool:
    """Whether `engine` (a Deployment.engine value) honours the decoding field `name`."""
    return name in ENGINE_FEATURES.get(engine, frozenset())


def unsupported(engine: str, sampling) -> str | None:
    """The first decoding field `sampling` (a SamplingParams or its dict) uses that `engine`
    cannot honour; None where it honours all of them."""
    values = asdict(sampling) if is_dataclass(sampling) else dict(sampling)
    for name, unused in DECODING_FIELDS.items():
        if name in values and values[name] != unused and not supports(engine, name):
            return name
    return None
