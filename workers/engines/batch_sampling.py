"""How the transformers engine picks each running row's next token with torch, on the model's
device: greedy and sampled rows (temperature, top-k, top-p) of a batch together, with one copy
of the tokens to the host per step (`sample_rows`), and one row's draw with transformers' own
logits warpers for rows whose TokenPolicy (sampling.py) chose the scores (`sample_token`)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from workers.engines.graphs import to_device
from workers.engines.scheduling import BatchRequest

__all__ = ["RowSettings", "choose_rows", "sample_rows", "sample_token", "start_sampling"]


def sample_rows(requests: list[BatchRequest | None], logits: torch.Tensor, generator: torch.Generator) -> list[int]:
    """`choose_rows`, copied to the host."""
    return choose_rows(requests, logits, generator).tolist()


def choose_rows(requests: list[BatchRequest | None], logits: torch.Tensor, generator: torch.Generator, settings: RowSettings | None = None) -> torch.Tensor:
    """The next token of every row ([rows] on the device, nothing waited for): the argmax for
    greedy rows, and for sampled rows (temperature, top-k, top-p, each its own) one draw in one
    batch: the exponential race argmax(p / E), E ~ Exp(1), which picks token t with probability
    p[t]. A row with a seed draws its E from its own generator (its answer does not depend on its
    neighbours); the others share `generator`. Rows with a TokenPolicy (or None) get the argmax
    here; the caller redoes them. `settings`: the sampled rows' settings kept from step to step
    (by default made for this call)."""
    tokens = logits.argmax(-1)
    rows = [i for i, r in enumerate(requests) if r is not None and not r.greedy and r.policy is None]
    if rows:
        sampled = [requests[i] for i in rows]
        index, *kept = (settings or RowSettings()).of(rows, sampled, logits)
        tokens.index_copy_(0, index, _draw(sampled, logits.index_select(0, index), generator, *kept))
    return tokens


class RowSettings:
    """The sampled rows' settings on the device (their row index, temperature, top-k, top-p),
    kept while a step's sampled rows are the last step's requests in the same rows: on a GPU each
    is a copy to the device, made again only when a request joins, leaves or moves."""

    def __init__(self):
        self._rows: list[int] = []
        self._requests: list[BatchRequest] = []
        self._vocab = 0
        self._tensors: tuple | None = None

    def of(self, rows: list[int], requests: list[BatchRequest], logits: torch.Tensor) -> tuple:
        """(index, temperature, top_k, top_p, columns) for `requests` in `rows` of `logits`; top_k,
        top_p and columns are None where no row filters."""
        device, vocab = logits.device, logits.shape[-1]
        same = rows == self._rows and len(requests) == len(self._requests) and all(a is b for a, b in zip(requests, self._requests))
        if same and vocab == self._vocab and self._tensors[0].device == device:
            return self._tensors
        index = to_device(device, rows)
        temperature = to_device(device, [r.temperature or 1.0 for r in requests], torch.float32).unsqueeze(1)
        top_k = top_p = columns = None
        if any(0 < r.top_k < vocab or r.top_p < 1.0 for r in requests):
            top_k = to_device(device, [r.top_k if 0 < r.top_k < vocab else vocab for r in requests]).unsqueeze(1)
            top_p = to_device(device, [r.top_p if r.top_p < 1.0 else 2.0 for r in requests], torch.float32).unsqueeze(1)
            columns = torch.arange(vocab, device=device)
        self._rows, self._requests, self._vocab = list(rows), list(requests), vocab
        self._tensors = (index, temperature, top_k, top_p, columns)
        return self._tensors


def _draw(requests: list[BatchRequest], logits: torch.Tensor, generator: torch.Generator, temperature, top_k, top_p, columns) -> torch.Tensor:
    scores = logits.float() / temperature
    order = None
    if top_k is not None:
        scores, order = scores.sort(dim=-1, descending=True)
        scores = scores.masked_fill(columns >= top_k, float("-inf"))
        probs = scores.softmax(-1)
        # keep the fewest best tokens whose mass reaches top_p (the best one always)
        scores = scores.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    probs = scores.softmax(-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    for row, request in enumerate(requests):
        if request.seed is not None:
            race[row].exponential_(generator=request.generator)
    choice = (probs / race.clamp_(min=1e-20)).argmax(-1)
    return choice if order is None else order.gather(1, choice.unsqueeze(1)).squeeze(1)


def start_sampling(request: BatchRequest, device) -> None:
    """The request's random generator (seeded where it names a seed) and its sampling settings."""
    request.generator = torch.Generator(device=device)
    if request.seed is not None:
        request.generator.manual_seed(request.seed)
    else:
        request.generator.seed()
    request.processors = _processors(request)


def sample_token(request: BatchRequest, logits: torch.Tensor) -> int:
    """One token drawn from a row of logits with the request's settings and generator (start_sampling)."""
    scores = request.processors(None, logits.float().unsqueeze(0))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=request.generator))


def _processors(request: BatchRequest) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if request.temperature and request.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(request.temperature))
    if request.top_k:
        processors.append(TopKLogitsWarper(request.top_k))
    if request.top_p < 1.0:
        processors.append(TopPLogitsWarper(request.top_p))
    return processors
