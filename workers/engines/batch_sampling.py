"""How the engines pick each running row's next token with torch (the transformers engine on its
model's device, the llama.cpp engine on CPU): greedy and sampled rows (temperature, top-k,
top-p) of a batch together, with one copy of the tokens to the host per step (`sample_rows`),
and the same draw for one row whose TokenPolicy (sampling.py) chose the scores (`sample_token`).

A batch's sampled rows draw by inverse transform sampling (one uniform number a row), and on CPU
a top-k/top-p row among its best CANDIDATES tokens first: sorting every token of 64 rows of a
49,152-token vocabulary took about 130 ms a step there, and drawing an exponential number for
each of them about 70 ms (bench/sampling_cpu.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from workers.engines.graphs import to_device
from workers.engines.scheduling import NOT_A_NUMBER, BatchRequest

__all__ = ["RowSettings", "choose_rows", "sample_rows", "sample_token", "start_sampling"]


def sample_rows(requests: list[BatchRequest | None], logits: torch.Tensor, generator: torch.Generator) -> list[int]:
    """`choose_rows`, copied to the host."""
    return choose_rows(requests, logits, generator).tolist()


CANDIDATES = 256  # on CPU, the best tokens a top-k/top-p row is drawn among first (a sort of the whole row is slow there)


def choose_rows(
    requests: list[BatchRequest | None], logits: torch.Tensor, generator: torch.Generator, settings: RowSettings | None = None
) -> torch.Tensor:
    """The next token of every row ([rows] on the device, nothing waited for on a GPU): the
    argmax for greedy rows, and for sampled rows (temperature, top-k, top-p, each its own) one
    draw in one batch (`_draw`); NOT_A_NUMBER for any row whose best logit is not finite (a NaN
    anywhere in it, or none above -inf). Rows with a TokenPolicy (or None) get the argmax here;
    the caller redoes them. `settings`: the sampled rows' settings kept from step to step (by
    default made for this call)."""
    best, tokens = logits.max(-1)  # the argmax (the first of equal maxima), and its value
    rows = [i for i, r in enumerate(requests) if r is not None and not r.greedy and r.policy is None]
    if rows:
        sampled = [requests[i] for i in rows]
        kept = (settings or RowSettings()).of(rows, sampled, logits)
        tokens.index_copy_(0, kept.index, _draw(sampled, logits.index_select(0, kept.index), generator, kept))
    return torch.where(best.isfinite(), tokens, NOT_A_NUMBER)  # two kernels (a masked_fill_ of ~ takes three)


class RowSettings:
    """The sampled rows' settings on the device, kept while a step's sampled rows are the last
    step's requests in the same rows: on a GPU each is a copy to the device, made again only when
    a request joins, leaves or moves. `of` gives them as attributes: index (their rows in the
    batch), temperature ([rows, 1]); plain and filtered: which of them keep every token and which
    filter (top-k, top-p), each an index, all of them (slice(None)) or None (none); and for the
    filtered ones top_k and top_p ([filtered, 1]: the vocabulary's size and 2.0 where a row has
    none) and columns (0..vocab-1); seeded (an index, as plain) and seeded_requests, and where
    there are any, draws ([seeded, DRAWS], their numbers drawn ahead), drawn ([seeded, 1], how
    many each has used) and host_drawn (the same counts on the host, with the blocks they count
    in: `_in_step`)."""

    def __init__(self):
        self._rows: list[int] = []
        self._requests: list[BatchRequest] = []
        self._vocab = 0
        self._kept = None

    def of(self, rows: list[int], requests: list[BatchRequest], logits: torch.Tensor):
        device, vocab = logits.device, logits.shape[-1]
        same = rows == self._rows and len(requests) == len(self._requests) and all(a is b for a, b in zip(requests, self._requests))
        if same and vocab == self._vocab and self._kept.index.device == device and _in_step(self._kept):
            return self._kept
        filtering = [i for i, r in enumerate(requests) if 0 < r.top_k < vocab or r.top_p < 1.0]
        seeded = [i for i, r in enumerate(requests) if r.seed is not None]
        kept = SimpleNamespace(
            index=to_device(device, rows),
            temperature=to_device(device, [r.temperature or 1.0 for r in requests], torch.float32).unsqueeze(1),
            plain=_part(device, sorted(set(range(len(requests))) - set(filtering)), len(requests)),
            filtered=_part(device, filtering, len(requests)),
            top_k=None, top_p=None, columns=None,
            seeded=_part(device, seeded, len(requests)),
            seeded_requests=[requests[i] for i in seeded],
        )
        if seeded:  # their numbers drawn ahead, and how many each has used (_seeded_draws)
            kept.draws = to_device(device, torch.stack([r.draws for r in kept.seeded_requests]))
            kept.drawn = to_device(device, [r.drawn for r in kept.seeded_requests]).unsqueeze(1)
            kept.host_drawn = [(r.drawn, r.draws) for r in kept.seeded_requests]
        if filtering:
            chosen = [requests[i] for i in filtering]
            kept.top_k = to_device(device, [r.top_k if 0 < r.top_k < vocab else vocab for r in chosen]).unsqueeze(1)
            kept.top_p = to_device(device, [r.top_p if r.top_p < 1.0 else 2.0 for r in chosen], torch.float32).unsqueeze(1)
            kept.columns = torch.arange(vocab, device=device)
        self._rows, self._requests, self._vocab, self._kept = list(rows), list(requests), vocab, kept
        return kept


def _part(device, rows: list[int], total: int):
    """`rows` of `total` as an index: None where there are none, slice(None) where they are all."""
    if not rows:
        return None
    return slice(None) if len(rows) == total else to_device(device, rows)


def _draw(requests: list[BatchRequest], logits: torch.Tensor, generator: torch.Generator, kept) -> torch.Tensor:
    """Each row's token by inverse transform sampling: one uniform number per row, and the first
    token whose cumulative probability passes it. A row with a seed draws its number from its own
    generator, and nothing else about its draw depends on other rows (its answer does not depend
    on its neighbours); the others share `generator`. A row that filters (top-k, top-p) draws
    from the best tokens: on CPU its best CANDIDATES first, and only where its kept tokens do not
    all lie among them (a top-k past them, or a top-p mass they do not reach) again from its best
    top_k, or its whole row sorted where it has no top-k or one past a third of the row."""
    scores = logits.float() / kept.temperature
    # float64: a float32 number could never fall on a token of probability under about 3e-8
    if isinstance(kept.seeded, slice):  # every row seeded
        uniform = _seeded_draws(kept)
    else:
        uniform = torch.rand((len(requests), 1), generator=generator, device=logits.device, dtype=torch.float64)
        if kept.seeded is not None:
            uniform.index_copy_(0, kept.seeded, _seeded_draws(kept))
    choice = torch.empty(len(requests), dtype=torch.long, device=logits.device)
    if kept.plain is not None:
        choice[kept.plain] = _pick(scores[kept.plain].softmax(-1), uniform[kept.plain])
    if kept.filtered is None:
        return choice
    scores, uniform = scores[kept.filtered], uniform[kept.filtered]
    vocab = scores.shape[-1]
    width = min(CANDIDATES, vocab) if logits.device.type == "cpu" else vocab  # a GPU sorts fast, and this waits for nothing
    drawn, exact = _filtered(scores, uniform, kept.top_k, kept.top_p, kept.columns[:width])
    if width < vocab and not bool(exact.all()):  # on CPU (nothing to wait for): those rows again, wider
        redo = (~exact).nonzero().squeeze(1)
        # their top-k sets bound what they keep (the vocabulary where a row has none): a partial
        # sort (topk) of that many is cheaper than a whole one up to about a third of the row
        wide = int(kept.top_k[redo].max())
        columns = kept.columns[:wide] if 3 * wide < vocab else kept.columns
        drawn[redo], _ = _filtered(scores[redo], uniform[redo], kept.top_k[redo], kept.top_p[redo], columns)
    choice[kept.filtered] = drawn
    return choice


def _filtered(scores, uniform, top_k, top_p, columns):
    """The token of each row drawn from its best len(columns) tokens under its top-k and top-p,
    and whether that is exact: its kept tokens all lie among them (its top-k set, or the fewest
    best tokens whose mass reaches top_p)."""
    width, vocab = columns.shape[0], scores.shape[-1]
    if width < vocab:
        values, order = scores.topk(width, dim=-1)
    else:
        values, order = scores.sort(dim=-1, descending=True)
    values = values.masked_fill(columns >= top_k, float("-inf"))
    inside = top_k <= width  # a top-k set all among them: its probabilities are over it
    norm = values.logsumexp(-1, keepdim=True)
    if width < vocab:  # rows with no top-k: over the whole row
        norm = torch.where(inside, norm, scores.logsumexp(-1, keepdim=True))
    probs = (values - norm).exp()
    mass = probs.cumsum(-1)
    # keep the fewest best tokens whose mass reaches top_p (the best one always)
    values = values.masked_fill((mass - probs >= top_p) & (columns > 0), float("-inf"))
    exact = (inside | ((top_k >= vocab) & (mass[:, -1:] >= top_p))).squeeze(1)
    return order.gather(1, _pick(values.softmax(-1), uniform).unsqueeze(1)).squeeze(1), exact


def _pick(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The first column of each row whose cumulative probability (float64) passes the row's
    uniform number, and never a token of probability 0: where rounding lands on one (a GPU's
    parallel sum need not rise only where a probability is above 0; the number may fall at the
    sum itself) the likeliest token instead."""
    mass = probs.cumsum(-1, dtype=torch.float64)
    choice = torch.searchsorted(mass, uniform * mass[:, -1:], right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)
    return torch.where(probs.gather(1, choice.unsqueeze(1)).squeeze(1) > 0, choice, probs.argmax(-1))


def _seeded_draws(kept) -> torch.Tensor:
    """The seeded rows' next uniform numbers ([seeded, 1], float64): one gather from the numbers
    they drew ahead, however many rows are seeded (a draw from each row's own generator was a
    kernel launch a row, each step). Rows that have used their DRAWS numbers draw the next ones
    on the host, copied into their places together without waiting for the device."""
    numbers = kept.draws.gather(1, kept.drawn)
    kept.drawn.add_(1)
    refill = []
    for row, request in enumerate(kept.seeded_requests):
        request.drawn += 1
        if request.drawn == DRAWS:
            _draw_ahead(request)
            refill.append(row)
        kept.host_drawn[row] = (request.drawn, request.draws)
    if refill:
        device = kept.draws.device
        rows = to_device(device, refill)
        kept.draws.index_copy_(0, rows, to_device(device, torch.stack([kept.seeded_requests[row].draws for row in refill])))
        kept.drawn.index_fill_(0, rows, 0)
    return numbers


def _in_step(kept) -> bool:
    """Whether the kept settings' seeded rows have used no numbers elsewhere since (their counts
    on the device are still theirs)."""
    held = getattr(kept, "host_drawn", ())
    return all(r.drawn == drawn and r.draws is block for r, (drawn, block) in zip(kept.seeded_requests, held))


DRAWS = 256  # the uniform numbers a seeded request draws ahead at a time


def _draw_ahead(request: BatchRequest) -> None:
    request.draws = torch.rand(DRAWS, generator=request.generator, dtype=torch.float64)
    request.drawn = 0


def start_sampling(request: BatchRequest, device) -> None:
    """The request's random generator: a seeded one on the host, drawing its numbers DRAWS at a
    time ahead (the same numbers on every device, whatever the request's neighbours), the others
    on `device`."""
    if request.seed is not None:
        request.generator = torch.Generator()
        request.generator.manual_seed(request.seed)
        _draw_ahead(request)
    else:
        request.generator = torch.Generator(device=device)
        request.generator.seed()


def sample_token(request: BatchRequest, logits: torch.Tensor) -> int:
    """One token drawn from a row of logits (a TokenPolicy's scores, say) with the request's
    settings and generator (start_sampling), as a batch's sampled rows draw theirs."""
    row = logits.float().unsqueeze(0)
    return int(_draw([request], row, request.generator, RowSettings().of([0], [request], row))[0])
