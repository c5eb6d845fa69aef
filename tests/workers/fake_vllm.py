"""A stand-in for exactly the part of vLLM's API that workers/engines/vllm_engine.py calls.

It "generates" the words of a fixed text, one token per step, with vLLM's output shapes
(cumulative `outputs[0].text`, `token_ids`, `finished`, `finish_reason`), so the adapter's
streaming, usage, sampling mapping and abort handling are tested where vLLM cannot be installed.
"""

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TypedDict

WORDS = "Paris is the capital and largest city of France .".split()

__version__ = "0.11.0"


class TextPrompt(TypedDict, total=False):  # the adapter sends a cache salt where the prompt type has one (0.9 on)
    prompt: str
    cache_salt: str


calls: list[tuple] = []


@dataclass
class AsyncEngineArgs:
    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int = 256
    trust_remote_code: bool = False
    enforce_eager: bool = False
    load_format: str = "auto"
    kv_cache_memory_bytes: int | None = None


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict | None = None
    logprobs: int | None = None
    structured_outputs: object = None
    stop: list | None = None
    stop_token_ids: list | None = None


@dataclass
class StructuredOutputsParams:  # vllm.sampling_params.StructuredOutputsParams (0.12 on), the fields the adapter sets
    json: object = None
    grammar: str | None = None


sampling_params = SimpleNamespace(StructuredOutputsParams=StructuredOutputsParams)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class _Completion:
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list | None = None  # where asked: per position {token id: Logprob}, the top ones and the chosen one


class AsyncLLMEngine:
    def __init__(self, args):
        self.args = args
        self.aborted: set[str] = set()
        self.unfinished: set[str] = set()

    @property
    def output_processor(self):  # vLLM 0.32: the adapter counts the requests its front end has not finished
        return SimpleNamespace(get_num_unfinished_requests=lambda: len(self.unfinished))

    @classmethod
    def from_engine_args(cls, args):
        calls.append(("from_engine_args", args))
        return cls(args)

    @property
    def model_config(self):  # vLLM 0.32: an attribute of AsyncLLM
        return SimpleNamespace(max_model_len=self.args.max_model_len or 2048)

    async def generate(self, prompt, sampling_params, request_id):
        self.unfinished.add(request_id)
        try:
            async for output in self._generate(prompt, sampling_params, request_id):
                yield output
        finally:
            self.unfinished.discard(request_id)

    async def _generate(self, prompt, sampling_params, request_id):
        calls.append(("generate", prompt, sampling_params, request_id))
        completion = _Completion()
        words = WORDS * 100
        for i in range(sampling_params.max_tokens):
            await asyncio.sleep(0.02)
            if request_id in self.aborted:  # vLLM ends an aborted request with an output, without raising
                completion.finish_reason = "abort"
                yield SimpleNamespace(request_id=request_id, prompt_token_ids=[1, 2, 3], outputs=[completion], finished=True)
                return
            completion.token_ids.append(i)
            completion.text += ("" if i == 0 else " ") + words[i]
            if sampling_params.logprobs is not None:  # the chosen word ranks 2nd: rank 1 is another
                top = {1000 + r: Logprob(-0.5 * r, r, f"w{r}") for r in range(1, sampling_params.logprobs + 2) if r != 2}
                completion.logprobs = (completion.logprobs or []) + [{**top, i: Logprob(-1.0, 2, words[i])}]
            last = i + 1 == sampling_params.max_tokens or ("natural" in prompt and i + 1 == len(WORDS))
            if last:
                completion.finish_reason = "length" if i + 1 == sampling_params.max_tokens else "stop"
            # a snapshot per step, as vLLM's outputs are: a slow reader must not see later text early
            snapshot = _Completion(completion.text, list(completion.token_ids), completion.finish_reason, completion.logprobs)
            yield SimpleNamespace(request_id=request_id, prompt_token_ids=[1, 2, 3], outputs=[snapshot], finished=last)
            if last:
                return

    def shutdown(self, timeout=None):
        calls.append(("shutdown",))

    async def abort(self, request_id):
        calls.append(("abort", request_id))
        self.aborted.add(request_id)
