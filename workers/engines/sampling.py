"""How one request chooses its next token beyond plain greedy or sampled decoding (contract v3's
decoding fields), the same in the llama.cpp and transformers engines, with numpy (no torch):

raw logits -> the raw log-probabilities (`logprobs` / `top_logprobs`, before anything changes
them, as vLLM reports them by default) -> repetition_penalty (prompt and answer tokens,
transformers' RepetitionPenaltyLogitsProcessor) -> frequency and presence penalties (answer tokens,
OpenAI's) -> logit_bias -> the grammar's token mask (llguidance) -> the engine's temperature /
top-k / top-p and its seeded draw, or the argmax; then the grammar's matcher takes the token.

A request that uses none of these has no policy (`build_policy` gives None) and keeps the engines'
fast paths.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

_TOKENIZER_LOCK = threading.Lock()


class PolicyError(ValueError):
    """A request's decoding fields the engine cannot take (a grammar that does not build, a token
    id out of the vocabulary); `param` names the client's field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def uses_policy(params) -> bool:
    return bool(
        params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
        or params.logit_bias or params.logprobs or params.grammar
    )


def build_policy(engine, params, prompt_ids: list[int]) -> TokenPolicy | None:
    """The request's policy, or None where it needs none. Raises PolicyError for fields that
    cannot apply (in the caller's thread, before the request reaches the engine)."""
    if not uses_policy(params):
        return None
    width = engine.vocab_width()
    bias = {}
    for key, value in params.logit_bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise PolicyError(f"logit_bias: {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < width:
            raise PolicyError(f"logit_bias: token id {token} is not in the vocabulary (0 to {width - 1})", "logit_bias")
        bias[token] = float(value)
    matcher = _matcher(engine, params.grammar) if params.grammar else None
    vocab = grammar_tokenizer(engine).vocab_size if matcher is not None else width
    return TokenPolicy(params, prompt_ids, width, bias, matcher, vocab)


def grammar_tokenizer(engine):
    """llguidance's view of the engine's tokenizer (built once per engine: about a second)."""
    with _TOKENIZER_LOCK:
        if getattr(engine, "_ll_tokenizer", None) is None:
            import llguidance.hf

            eos = engine.tokenizer.eos_token_id
            engine._ll_tokenizer = llguidance.hf.from_tokenizer(engine.tokenizer, eos_token=eos)
        return engine._ll_tokenizer


def _matcher(engine, grammar: str):
    import llguidance

    matcher = llguidance.LLMatcher(grammar_tokenizer(engine), grammar, log_level=0)
    if matcher.is_error():
        raise PolicyError(f"response_format: the grammar cannot be used: {matcher.get_error()}", "response_format")
    return matcher


class TokenPolicy:
    """One request's token choice (see the module's docstring); used by the engine's thread only,
    but `entries` is read by the request's stream (each entry is appended before its token goes)."""

    def __init__(self, params, prompt_ids: list[int], width: int, bias: dict[int, float], matcher=None, vocab_size: int = 0):
        self.repetition = params.repetition_penalty
        self.frequency, self.presence = params.frequency_penalty, params.presence_penalty
        self.top = params.top_logprobs if params.logprobs else 0
        self.logprobs = params.logprobs
        self.bias_ids = np.array(list(bias), dtype=np.int64)
        self.bias_values = np.array(list(bias.values()), dtype=np.float32)
        self.matcher, self.vocab_size = matcher, vocab_size or width
        self.seen = np.zeros(width, dtype=bool)  # prompt and answer tokens (repetition_penalty)
        if self.repetition != 1.0:
            self.seen[[t for t in prompt_ids if 0 <= t < width]] = True
        self.counts = np.zeros(width, dtype=np.float32)  # answer tokens (frequency / presence)
        self.bitmask = None
        self.entries: list[tuple[int, float, list[tuple[int, float]]]] = []  # (token, logprob, top)
        self.ended = False  # the grammar is complete with the last token: the answer ends there

    def choose(self, logits: np.ndarray, draw: Callable[[np.ndarray], int] | None) -> int:
        """The next token from a row of raw logits (not changed): `draw` samples from processed
        logits with the request's temperature / top-k / top-p and generator; None: greedy."""
        raw = np.asarray(logits, dtype=np.float32)
        scores = raw.copy()
        self._penalize(scores)
        if self.bias_ids.size:
            scores[self.bias_ids] += self.bias_values
        if self.matcher is not None:
            self._mask(scores)
        token = int(np.argmax(scores)) if draw is None else draw(scores)
        if self.logprobs:
            self.entries.append(self._logprobs(raw, token))
        self._accept(token)
        return token

    def _penalize(self, scores: np.ndarray) -> None:
        if self.repetition != 1.0:
            seen = scores[self.seen]
            scores[self.seen] = np.where(seen > 0, seen / self.repetition, seen * self.repetition)
        if self.frequency or self.presence:
            scores -= self.counts * self.frequency + (self.counts > 0) * self.presence

    def _mask(self, scores: np.ndarray) -> None:
        import llguidance.numpy as llnp

        if self.bitmask is None:  # as wide as the tokenizer's vocabulary (the logits may be wider)
            self.bitmask = llnp.allocate_token_bitmask(1, self.vocab_size)
        llnp.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        allowed = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[: scores.shape[0]]
        scores[: allowed.shape[0]][allowed == 0] = -np.inf
        scores[allowed.shape[0] :] = -np.inf  # the logits' padding past the tokenizer's vocabulary

    def _logprobs(self, raw: np.ndarray, token: int) -> tuple[int, float, list[tuple[int, float]]]:
        shifted = raw.astype(np.float64) - raw.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        top: list[tuple[int, float]] = []
        if self.top:
            best = np.argpartition(-logprobs, self.top)[: self.top]
            best = best[np.argsort(-logprobs[best], kind="stable")]
            top = [(int(t), float(logprobs[t])) for t in best]
        return token, float(logprobs[token]), top

    def _accept(self, token: int) -> None:
        if 0 <= token < self.counts.shape[0]:
            self.counts[token] += 1
            self.seen[token] = True
        if self.matcher is not None:
            self.matcher.consume_token(token)
            self.ended = self.matcher.is_stopped() or self.matcher.is_error()


def logprob_entry(engine, entry: tuple[int, float, list[tuple[int, float]]]) -> dict:
    """One token's entry as OpenAI's chat logprobs write it (token text, its bytes)."""
    token, logprob, top = entry
    return {**_token(engine, token, logprob), "top_logprobs": [_token(engine, t, lp) for t, lp in top]}


def _token(engine, token: int, logprob: float) -> dict:
    data = grammar_tokenizer(engine).decode_bytes([token])
    return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}
