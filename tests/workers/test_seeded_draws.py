"""Seeded rows take their uniform numbers from ones drawn ahead on the host (batch_sampling.DRAWS
at a time): a seeded request's answer is the same alone or beside other rows, past a refill,
through settings kept from step to step or made again, or one row at a time (`sample_token`, as
a row with a TokenPolicy draws); and a step draws for all seeded rows at once, with the same
operators for two of them as for forty (one kernel launch a seeded row before)."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from workers.engines.batch_sampling import DRAWS, RowSettings, choose_rows, sample_token, start_sampling
from workers.engines.scheduling import BatchRequest

VOCAB = 40
STEPS = DRAWS + 60  # one refill of the numbers drawn ahead, and well past it
LOGITS = torch.linspace(0.0, -3.0, VOCAB)  # flat enough that the draws vary


def row(**settings) -> BatchRequest:
    request = BatchRequest(id="r", prompt_ids=[1], max_new_tokens=STEPS, greedy=False, **settings)
    start_sampling(request, "cpu")
    return request


def mine() -> BatchRequest:
    return row(seed=17, top_k=30, temperature=0.8)


def steps(rows: list[BatchRequest | None], *, kept: bool = True, count: int = STEPS) -> list[int]:
    """Row 0's token at each step, the rows drawn together."""
    settings, generator = RowSettings(), torch.Generator().manual_seed(len(rows))
    logits = LOGITS.repeat(len(rows), 1)
    return [int(choose_rows(rows, logits, generator, settings if kept else None)[0]) for _ in range(count)]


def test_a_seeded_answer_is_the_same_alone_beside_others_and_past_a_refill():
    alone = steps([mine()])
    assert len(set(alone)) > 5, "the draws vary from step to step"
    neighbours = [row(seed=3), row(), None, row(top_p=0.7), row(seed=17, top_k=30, temperature=0.8)]
    assert steps([mine(), *neighbours]) == alone
    assert steps([mine(), *neighbours], kept=False) == alone
    request = mine()
    assert [sample_token(request, LOGITS) for _ in range(STEPS)] == alone
    assert request.drawn == STEPS - DRAWS


def test_settings_kept_from_step_to_step_notice_a_row_drawn_elsewhere_meanwhile():
    """A request drawn outside the kept settings (one step on its own, as a prefill's first token
    is) moves on in its numbers: the kept settings must not draw its old place again."""
    alone = steps([mine()])
    request, other = mine(), row(seed=5)
    settings, generator = RowSettings(), torch.Generator()
    rows, logits = [request, other], LOGITS.repeat(2, 1)
    tokens = [int(choose_rows(rows, logits, generator, settings)[0]) for _ in range(100)]
    tokens += [sample_token(request, LOGITS) for _ in range(10)]
    tokens += [int(choose_rows(rows, logits, generator, settings)[0]) for _ in range(STEPS - 110)]
    assert tokens == alone


def test_two_seeded_rows_or_forty_draw_with_the_same_operators_and_refill_together():
    def operators(seeded: int) -> tuple[Counter, Counter]:
        rows = [row(top_k=20), row()] + [row(seed=i, top_k=20 if i % 2 else 0) for i in range(seeded)]
        settings, generator, logits = RowSettings(), torch.Generator(), LOGITS.repeat(len(rows), 1)
        choose_rows(rows, logits, generator, settings)  # the settings made (copies a row), then kept
        with Counting() as step:
            choose_rows(rows, logits, generator, settings)
        for _ in range(DRAWS - 3):
            choose_rows(rows, logits, generator, settings)
        with Counting() as refill:  # every seeded row's DRAWS-th number: all draw the next ones
            choose_rows(rows, logits, generator, settings)
        assert all(r.drawn == 0 for r in rows[2:])
        return step.calls, refill.calls - HOST_DRAWS

    (two, two_refill), (forty, forty_refill) = operators(2), operators(40)
    assert two == forty, (two, forty)
    assert two["aten.gather.default"] >= 1  # the seeded rows' numbers, in one gather
    assert two_refill == forty_refill, (two_refill, forty_refill)


HOST_DRAWS = Counter({"aten.rand.generator": 10**6})  # each refilled row's next numbers, drawn on the host


class Counting(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))
