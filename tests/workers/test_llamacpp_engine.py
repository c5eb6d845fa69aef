"""The llama.cpp engine (the default on CPUs for GGUF models), called in-process: the quality guard
against the fp32 transformers engine, continuous batching, abort and per-request sampling."""

import contextlib
import threading
import time
from pathlib import Path

import pytest

from llmsite.contract import SamplingParams
from chat.models import Deployment
from chat.prompting import render_prompt
from workers.engines.base import GenerationResult

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install builds it)")

TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text()
# (system prompt, question, the word a right answer contains): fp32 answers all of these
FACTS = [
    ("", "What is the capital of France?", "Paris"),
    ("", "What is the capital of Egypt?", "Cairo"),
    ("", "What is the capital of Russia?", "Moscow"),
    ("", "What is the capital of Canada?", "Ottawa"),
    ("You are concise.", "What is the capital of Japan?", "Tokyo"),
]
QUESTIONS = [
    f"What is the capital of {c}?"
    for c in ["France", "Egypt", "Canada", "Russia", "Germany", "Japan", "China", "India",
              "Brazil", "Kenya", "Peru", "Chile", "Cuba", "Greece", "Norway", "Poland"]
]


@pytest.fixture(scope="module")
def deployment(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        return Deployment.objects.get(name="default")


@pytest.fixture(scope="module")
def engine(deployment):
    from workers.engines.llamacpp.engine import LlamaCppEngine

    engine = LlamaCppEngine(deployment)
    yield engine
    engine.scheduler.stop()
    if not engine.scheduler._thread.is_alive():  # its contexts' memory back before the suite's later engines (vLLM) load
        for model in {id(m): m for m in (engine.scheduler.llama, engine.scheduler.prefill)}.values():
            model.close()


def greedy(n=24):
    return SamplingParams(max_new_tokens=n, temperature=0, top_k=0, top_p=1.0, do_sample=False)


def ask(engine, messages, params, deployment=None, cancelled=lambda: False, scope=""):
    # exactly as the predict API renders it: the deployment's chat template (or the model's own)
    prompt = render_prompt(
        engine.tokenizer, messages, deployment.chat_template if deployment else "", deployment.model_type if deployment else "auto"
    )
    result = GenerationResult()
    text = "".join(engine.stream(prompt, params, result, cancelled, cache_scope=scope))
    return text, result


def idle(engine, timeout=10):
    """True once no request is inside the engine (a finished one leaves just after its last event)."""
    deadline = time.monotonic() + timeout
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.scheduler.running == 0


def user(question):
    return [{"role": "user", "content": question}]


def test_the_default_deployment_on_a_cpu_runs_the_llamacpp_engine(deployment):
    assert deployment.engine == Deployment.Engine.LLAMACPP


@pytest.mark.parametrize("system,question,word", FACTS, ids=[q for _, q, _ in FACTS])
def test_quality_guard_factual_answers_stay_right(engine, deployment, system, question, word):
    messages = ([{"role": "system", "content": system}] if system else []) + user(question)
    text, _ = ask(engine, messages, greedy(), deployment)
    assert word in text, text


def test_quality_guard_perplexity_within_five_percent_of_fp32(engine, deployment):
    from workers.engines.transformers_engine import TransformersEngine

    fp32 = TransformersEngine(deployment)  # the same GGUF weights, de-quantized to fp32
    try:
        reference = fp32.perplexity(TEXT)
    finally:
        fp32.scheduler.stop()
    fast = engine.perplexity(TEXT)
    print(f"perplexity: fp32 transformers {reference:.3f}, llama.cpp {fast:.3f} ({fast / reference - 1:+.2%})")
    assert 1 < reference < 100  # a real measurement of a model that reads English
    assert abs(fast / reference - 1) <= 0.05


def test_sixteen_concurrent_streams_each_answer_their_own_question(engine):
    single = [ask(engine, user(q), greedy(12))[0] for q in QUESTIONS]
    answers = [None] * len(QUESTIONS)

    def run(i):
        answers[i] = ask(engine, user(QUESTIONS[i]), greedy(12))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(a is not None for a in answers)
    # llama.cpp's batched kernels round differently from one row at a time, so a near tie may
    # flip late in an answer; the start of each answer is its own question's.
    same = sum(text[:20] == s[:20] for (text, _), s in zip(answers, single))
    assert same >= 15, list(zip(single, [a for a, _ in answers]))
    assert idle(engine)


def test_an_aborted_request_frees_its_slot_and_the_others_finish(engine):
    stop = threading.Event()
    outcome = {}

    def victim():
        outcome["victim"] = ask(engine, user("Write a long story about a dragon."), greedy(400), cancelled=stop.is_set)

    thread = threading.Thread(target=victim)
    thread.start()
    deadline = time.monotonic() + 60
    while engine.scheduler.running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    others = [None] * 4

    def run(i):
        others[i] = ask(engine, user(QUESTIONS[i]), greedy(16))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    stop.set()
    thread.join(60)
    for t in threads:
        t.join(120)
    text, result = outcome["victim"]
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens < 400
    for text, result in others:
        assert result.finish_reason in ("stop", "length") and text
    assert idle(engine)


def test_sampling_settings_are_per_request(engine):
    def sample(seed):
        params = SamplingParams(max_new_tokens=16, temperature=1.3, top_k=50, top_p=0.95, do_sample=True, seed=seed)
        return ask(engine, user("Name an animal."), params)[0]

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again  # the same seed gives the same answer
    assert engine.scheduler._sampler is not None, "the decode steps' sampled rows were drawn together (batch_sampling)"
    greedy_answer = ask(engine, user("Name an animal."), greedy(16))[0]
    assert len({first, other, greedy_answer}) >= 2  # sampling is not greedy decoding


def test_a_slow_reader_gets_the_waiting_tokens_as_one_piece_and_the_same_text(engine):
    """The relay sends the tokens that queued up while its reader was busy as one piece of text
    (fewer messages when the streams outrun their relays); the text is the same as read at once."""
    prompt = render_prompt(engine.tokenizer, [{"role": "user", "content": "Write a short paragraph about owls."}])
    slow, result = [], GenerationResult()
    fast = list(engine.stream(prompt, greedy(48), GenerationResult(), lambda: False))
    for piece in engine.stream(prompt, greedy(48), result, lambda: False):
        slow.append(piece)
        time.sleep(0.15)  # a reader far slower than the engine
    assert "".join(slow) == "".join(fast)
    assert result.completion_tokens >= 24
    assert len(slow) < len(fast) and len(slow) < result.completion_tokens / 2


def test_with_an_interval_the_first_piece_goes_at_once_and_the_rest_waits_for_it(engine):
    """STREAM_INTERVAL_MS: after the first piece, text goes at most once per interval; with one
    longer than the answer takes, the answer is the first piece and the rest at the end."""
    prompt = render_prompt(engine.tokenizer, [{"role": "user", "content": "Write a short paragraph about owls."}])
    every = list(engine.stream(prompt, greedy(32), GenerationResult(), lambda: False))
    result = GenerationResult()
    pieces = list(engine.stream(prompt, greedy(32), result, lambda: False, interval=600.0))
    assert "".join(pieces) == "".join(every) and result.completion_tokens == 32
    assert len(every) > 2 and len(pieces) == 2  # the first text at once, the rest at the end


def test_each_request_has_its_own_kv_room(engine, deployment):
    """One KV stream per request (not one cache shared by all): the engine's context is a request's
    room, and every sequence id can hold a prompt of that room's size at once."""
    from workers.engines.llamacpp.config import DEFAULT_SEQ_TOKENS

    assert engine.model.streams == deployment.max_batch_size
    assert engine.context_length == min(DEFAULT_SEQ_TOKENS, engine.model.n_ctx_train)
    assert engine.model.kv_tokens == engine.context_length * deployment.max_batch_size
    assert engine.model.lib.llama_n_ctx_seq(engine.model.ctx) == engine.context_length  # llama.cpp's own split


def test_restream_readdresses_a_one_stream_kv_state():
    from workers.engines.llamacpp.model import STATE_HEADER_BYTES, one_stream, restream

    header, cells = b"\xd8\x3c\x14\xaf\x01\x00\x00\x00", b"\x05\x00\x00\x00" + b"kv-rows"
    state = header + (1).to_bytes(4, "little") + cells
    moved = restream(state, 4)
    assert moved[:STATE_HEADER_BYTES] == header
    assert int.from_bytes(moved[8:12], "little") == 4
    assert moved[12:] == cells + b"\x00" * 12  # the three other streams: empty
    assert restream(moved, 4) == moved
    with pytest.raises(RuntimeError, match="cannot move a KV state of 4 streams"):
        restream(moved, 8)
    # and back: a sequence's state from stream 2 of a 4-stream cache, as a one-stream cache saves it
    second = header + (4).to_bytes(4, "little") + b"\x00" * 8 + cells + b"\x00" * 4
    assert one_stream(second, 2, 4) == state
    with pytest.raises(RuntimeError, match="more than one stream"):
        one_stream(second, 1, 4)


def test_requests_leaving_mid_batch_leave_no_gap_in_the_decode_call(engine):
    """With one KV stream per request llama.cpp splits a decode call into runs of consecutive
    sequence ids, one pass over the weights each: the ids of requests that left get a throwaway row
    (forgotten after the call; a gap wider than FILL_GAP_MAX is a second pass), and the answers of
    the requests still running stay their own."""
    from workers.engines.llamacpp.config import FILL_GAP_MAX
    short, long = QUESTIONS[:4], QUESTIONS[4:8]
    single = {q: ask(engine, user(q), greedy(20))[0] for q in long}
    calls, decode = [], engine.model.decode

    def spy(rows):
        calls.append([(seq, wants_logits) for _, _, seq, wants_logits in rows])
        decode(rows)

    answers = {}

    def run(question, n):
        answers[question] = ask(engine, user(question), greedy(n))[0]

    engine.model.decode = spy
    try:
        # short and long questions alternate, so the short ones leave holes between the long ones
        threads = [threading.Thread(target=run, args=(q, n)) for pair in zip(short, long) for q, n in zip(pair, (2, 20))]
        for t in threads:
            t.start()
            time.sleep(0.02)  # joins in this order: the ids alternate too
        for t in threads:
            t.join(300)
    finally:
        del engine.model.decode
    assert idle(engine)
    for ids in ([seq for seq, _ in call] for call in calls):  # runs of consecutive ids, or wide gaps
        assert all(b - a == 1 or b - a > FILL_GAP_MAX + 1 for a, b in zip(ids, ids[1:])), calls
    assert any(not wants for call in calls for _, wants in call), calls  # the holes were filled
    for question in long:
        assert answers[question][:20] == single[question][:20], (question, answers[question], single[question])
    lib, memory = engine.model.lib, engine.model.memory
    left = {seq: lib.llama_memory_seq_pos_max(memory, seq) for seq in range(engine.model.streams)}
    assert all(pos == -1 for pos in left.values()), left  # no leftovers


class Recorder:
    """Records, as the engine reads them, the prompt-processing calls of the prefill context (rows
    per call) and the log-probabilities the answer's first tokens were chosen from: the prompt's
    last row, then the decoding context's first steps (one request running)."""

    def __init__(self, engine):
        self.engine, self.prefilled, self.steps = engine, [], []

    def __enter__(self):
        prefill, decoding = self.engine.prefill_model, self.engine.model
        decode, logits, all_logits = prefill.decode, prefill.logits, decoding.all_logits

        def spy_decode(rows):
            self.prefilled.append(len(rows))
            decode(rows)

        def spy_logits(row):
            self.steps.append(log_softmax(logits(row)))
            return logits(row)

        def spy_all_logits(rows):
            self.steps.append(log_softmax(all_logits(rows)[0]))
            return all_logits(rows)

        prefill.decode, prefill.logits, decoding.all_logits = spy_decode, spy_logits, spy_all_logits
        return self

    def __exit__(self, *exc):
        del self.engine.prefill_model.decode, self.engine.prefill_model.logits, self.engine.model.all_logits


def log_softmax(row):
    import numpy as np

    row = row.astype(np.float64)
    return row - row.max() - np.log(np.exp(row - row.max()).sum())


def assert_same_choices(steps, reference):
    """The same log-probabilities at every step, bit for bit. (Rounding alone moves them: 0.15-0.3
    nats on the decoding steps where a prompt's last row came from a one-row call, 0.01-0.03 on the
    prompt's last row where its cells came before the kept prefix's, see the engine's TWO_ROWS and
    _lay_prefix_first; wrong KV rows move them by 0.05 to whole nats.)"""
    import numpy as np

    assert len(steps) == len(reference)
    for step, (got, want) in enumerate(zip(steps, reference)):
        assert np.array_equal(got, want), (step, float(np.abs(got - want).max()))


@contextlib.contextmanager
def without_saved_prompts(engine):
    """The engine with only its kept prefix (no whole prompts saved in memory) meanwhile."""
    saved, engine.scheduler._saved = engine.scheduler._saved, None
    try:
        yield
    finally:
        engine.scheduler._saved = saved


def forget_kept_rows(engine):
    """Nothing kept: no prefix in the prefill context, no saved prompt (the engine idle)."""
    from workers.engines.llamacpp.saved import SavedPrompts

    assert idle(engine)
    scheduler = engine.scheduler
    if scheduler._saved is None:
        pytest.skip("saved prompts are off (LLAMACPP_PROMPT_CACHE_MIB=0)")
    scheduler._drop_prefix()
    scheduler._last_prompt = []
    scheduler._saved = SavedPrompts(scheduler._saved.budget)


def test_a_prompt_prefix_shared_with_the_last_prompt_is_not_computed_again(engine):
    """The prefill context keeps the KV rows of the prefix consecutive prompts shared (here the
    system prompt, the template's header and "What is the capital of"): a prompt that starts with
    it prefills only what follows, and its answer is chosen from the same probabilities as with
    nothing kept, in the prefill context and after its rows moved to the decoding context."""
    with without_saved_prompts(engine):
        check_the_kept_prefix(engine)


def check_the_kept_prefix(engine):
    other = [{"role": "system", "content": "You are terse."}]
    ask(engine, other + user("Name a fruit."), greedy(1))
    ask(engine, other + user("Name a tree."), greedy(1))  # kept now: that system prompt's header
    system = [{"role": "system", "content": "Answer briefly."}]
    canada = system + user("What is the capital of Canada?")
    prompt = engine.count_tokens(render_prompt(engine.tokenizer, canada))
    with Recorder(engine) as reference:  # shares next to nothing with earlier prompts
        ask(engine, canada, greedy(3))
    assert sum(reference.prefilled) == prompt, (reference.prefilled, prompt)
    # now the part France shares with Canada is kept, the header before it dropped: the cells in
    # front of the kept prefix are free, and a prompt's rows would go there (_lay_prefix_first)
    ask(engine, system + user("What is the capital of France?"), greedy(1))
    with Recorder(engine) as shared:
        ask(engine, canada, greedy(3))
    assert 0 < sum(shared.prefilled) <= prompt - 15, (shared.prefilled, prompt)
    assert_same_choices(shared.steps, reference.steps)
    ask(engine, canada, greedy(1))  # asked twice in a row: all but its last token kept
    with Recorder(engine) as again:  # its last two tokens are computed (TWO_ROWS in the engine)
        ask(engine, canada, greedy(3))
    assert again.prefilled == [2]
    assert_same_choices(again.steps, reference.steps)
    assert idle(engine)


def test_the_next_turn_of_a_conversation_prefills_only_what_is_new(engine, deployment):
    """A conversation's next prompt starts with the whole prompt and answer of the turn before:
    their rows come back from the saved ones (even after another prompt came in between and replaced
    the kept prefix), and only the end of the answer's turn and the new question are prefilled. The
    answer's rows were computed while it was generated (Q8_0 weights, not the prompt's f16), so the
    next answer's probabilities differ from a whole prefill by rounding only."""
    import numpy as np

    system = [{"role": "system", "content": "You are a travel guide."}]
    first = system + user("Name a city in France.")
    answer, _ = ask(engine, first, greedy(12), deployment)
    ask(engine, user("Name a fruit."), greedy(1), deployment)  # another user in between
    second = first + [{"role": "assistant", "content": answer}] + user("What to eat there?")
    ids = [prompt_ids(engine, deployment, m) for m in (first, second)]
    question = ids[1][len(ids[0]) :]  # the answer, the end of its turn, the new question
    answered = ids[0] + engine.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert ids[1][: len(answered)] == answered  # the template renders the answer as generated
    with Recorder(engine) as turn:
        ask(engine, second, greedy(4), deployment)
    assert 2 <= sum(turn.prefilled) <= len(ids[1]) - len(answered) + 2 < len(question), (turn.prefilled, len(question))
    forget_kept_rows(engine)
    with without_saved_prompts(engine), Recorder(engine) as whole:
        ask(engine, second, greedy(4), deployment)
    assert sum(whole.prefilled) == len(ids[1]), (whole.prefilled, len(ids))
    got, want = turn.steps[0], whole.steps[0]
    top = np.argsort(-want)[:5]
    assert np.argmax(got) == np.argmax(want) and np.abs(got[top] - want[top]).max() < 0.1, np.abs(got[top] - want[top])
    assert idle(engine)


def test_the_turn_after_a_stopped_answer_prefills_only_what_is_new(engine, deployment):
    """Stop keeps the part of the answer that was shown in the conversation: its rows are saved
    as a whole answer's are, and the next turn gets them back."""
    first = user("Tell me a long story about a lighthouse keeper.")
    shown = []

    def stopped():  # Stop pressed once a few pieces were shown
        return len(shown) >= 6

    result = GenerationResult()
    prompt = render_prompt(engine.tokenizer, first, deployment.chat_template, deployment.model_type)
    for piece in engine.stream(prompt, greedy(200), result, stopped):
        shown.append(piece)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 200
    assert idle(engine)
    ask(engine, user("Name a fruit."), greedy(1), deployment)  # another prompt replaces the kept prefix
    second = first + [{"role": "assistant", "content": "".join(shown)}] + user("Go on.")
    ids = [prompt_ids(engine, deployment, m) for m in (first, second)]
    _, after = ask(engine, second, greedy(2), deployment)
    # the prompt and the answer's shown tokens but the last (its row may not have been decoded)
    assert after.cached_tokens >= len(ids[0]) + len(shown) - 1, (after.cached_tokens, len(ids[0]), len(shown))
    assert after.cached_tokens < len(ids[1])
    assert idle(engine)


def test_a_long_prompt_asked_again_gets_the_same_answer_from_its_saved_rows(engine, deployment):
    """Regenerate: a prompt asked again, after others, prefills only its last two tokens, and its
    answer's probabilities are the same bit for bit as the first time, for a prompt longer than
    llama.cpp's tiled attention threshold too (its last rows go in a small call, TILED_ROWS)."""
    from workers.engines.llamacpp.config import TILED_ROWS

    story = user("Summarise this story: " + " ".join(["A fox met an owl by the river and they talked."] * 30))
    length = len(prompt_ids(engine, deployment, story))
    assert length > 4 * TILED_ROWS, length
    with Recorder(engine) as first:
        ask(engine, story, greedy(4), deployment)
    assert sum(first.prefilled) >= length - 40 and first.prefilled[-1] < TILED_ROWS, first.prefilled
    ask(engine, user("Name a tree."), greedy(1), deployment)
    with Recorder(engine) as again:
        ask(engine, story, greedy(4), deployment)
    assert again.prefilled == [2]
    assert_same_choices(again.steps, first.steps)
    assert idle(engine)


def test_kept_rows_serve_only_requests_of_their_cache_scope(engine, deployment):
    """KV rows one user's requests left (the kept prefix, saved prompts) are not another's: the
    same prompt from another cache scope is prefilled whole, and from the first scope again it
    prefills only its last two tokens."""
    system = [{"role": "system", "content": "You keep secrets."}]
    secret = system + user("My locker code is 4711. Remember it.")
    ask(engine, secret, greedy(4), deployment, scope="user:1")
    ask(engine, secret, greedy(1), deployment, scope="user:1")  # kept now too: all but its last token
    length = len(prompt_ids(engine, deployment, secret))
    with Recorder(engine) as other:
        _, result = ask(engine, secret, greedy(1), deployment, scope="user:2")
    assert sum(other.prefilled) == length and result.cached_tokens == 0, (other.prefilled, result.cached_tokens)
    with Recorder(engine) as own:
        _, result = ask(engine, secret, greedy(1), deployment, scope="user:1")
    assert own.prefilled == [2] and result.cached_tokens == length - 2, (own.prefilled, result.cached_tokens)
    assert idle(engine)


def test_a_prefix_is_kept_only_from_prompts_of_one_cache_scope(engine, deployment):
    """The kept prefix is what a prompt shares with the prompt before it: where that one was
    another scope's, nothing is kept (else its length would show the overlap with another user's
    prompt), and the same prompt asked again by the second scope is prefilled whole."""
    secret = [{"role": "system", "content": "You keep other secrets."}] + user("My door code is 1234.")
    forget_kept_rows(engine)
    with without_saved_prompts(engine):
        ask(engine, secret, greedy(1), deployment, scope="user:1")
        ask(engine, secret, greedy(1), deployment, scope="user:2")
        with Recorder(engine) as again:
            _, result = ask(engine, secret, greedy(1), deployment, scope="user:2")
    assert sum(again.prefilled) == len(prompt_ids(engine, deployment, secret)) and result.cached_tokens == 0, again.prefilled
    assert idle(engine)


def prompt_ids(engine, deployment, messages):
    return engine.tokenizer(render_prompt(engine.tokenizer, messages, deployment.chat_template, deployment.model_type), add_special_tokens=False)["input_ids"]


def test_saved_prompts_stay_within_their_budget_least_recently_used_out_first():
    from workers.engines.llamacpp.saved import SavedPrompts

    saved = SavedPrompts(budget=30)
    saved.put([1, 2, 3], b"a" * 10)
    saved.put([1, 2, 3, 4, 5], b"b" * 10)  # covers [1, 2, 3]: that one goes
    assert len(saved) == 1 and saved.size == 10
    saved.put([7, 8], b"c" * 10)
    assert saved.match([1, 2, 3, 4, 9]) == (4, ("", (1, 2, 3, 4, 5)))
    assert saved.match([1, 2]) == (2, ("", (1, 2, 3, 4, 5)))
    assert saved.match([9]) == (0, None)
    assert saved.match([1, 2, 3, 4, 9], "user:7") == (0, None)  # another cache scope's rows are not its
    assert saved.take(("", (1, 2, 3, 4, 5))) == b"b" * 10  # now the most recently used
    saved.put([6], b"d" * 10)
    saved.put([5], b"e" * 10)  # over the budget: [7, 8] goes, the least recently used
    assert saved.match([7, 8]) == (0, None) and saved.match([1, 2, 3])[0] == 3
    assert saved.size == 30
    saved.put([4], b"f" * 31)  # larger than the whole budget: not saved, nothing else lost
    assert len(saved) == 3 and saved.match([4]) == (0, None)


def ask_together(engine, conversations, new_tokens):
    """Ask these so that they queue in this order while the scheduler waits between two steps (a
    long answer keeps it stepping, `exclusive` holds it), then let them in: they join in one step.
    Returns their (text, result) and the Recorder of the calls from then on (the long answer's
    prompt is in before, so its rows are not counted)."""
    stop = threading.Event()
    blocker = threading.Thread(target=ask, args=(engine, user("Write a long story about a dragon."), greedy(400), None, stop.is_set))
    blocker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        engine.scheduler._running and not any(s.pending for s in engine.scheduler._running)
    ):
        time.sleep(0.01)
    results = [None] * len(conversations)

    def run(i):
        results[i] = ask(engine, conversations[i], greedy(new_tokens))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(conversations))]
    with Recorder(engine) as calls:
        with engine.scheduler.exclusive():
            for i, t in enumerate(threads):
                t.start()
                while len(engine.scheduler._waiting) <= i and time.monotonic() < deadline:
                    time.sleep(0.005)
            assert len(engine.scheduler._waiting) == len(conversations)
        for t in threads:
            t.join(120)
        stop.set()
        blocker.join(60)
    return results, calls


def test_a_burst_of_prompts_computes_their_shared_prefix_once(engine):
    """Prompts that join in the same step and share a system prompt nothing kept covers yet: the
    first is prefilled whole, the others wait for it (a step) and prefill only what follows."""
    system = [{"role": "system", "content": "You are a geography teacher."}]
    burst = [system + user(f"What is the capital of {c}?") for c in ("Spain", "Italy", "Sweden", "Mexico")]
    lengths = [engine.count_tokens(render_prompt(engine.tokenizer, m)) for m in burst]
    results, calls = ask_together(engine, burst, 6)
    assert all(r is not None and r[1].completion_tokens >= 1 for r in results), results
    assert sum(calls.prefilled) <= max(lengths) + 3 * (max(lengths) - 15), (calls.prefilled, lengths)
    assert idle(engine)


def test_a_burst_of_unrelated_prompts_is_prefilled_a_whole_prompt_at_a_time(engine):
    """Prompts of 30-60 tokens that join together and share nothing: a prefill call takes the
    whole rest of as many as fit (fewer than TILED_ROWS rows), never part of one beside another
    that ends and moves out (its later rows would go into the cells freed before its earlier ones):
    every one of them has its rows in order, and is saved with its answer."""
    from workers.engines.llamacpp.config import TILED_ROWS

    if engine.scheduler._saved is None:
        pytest.skip("saved prompts are off (LLAMACPP_PROMPT_CACHE_MIB=0)")
    names = ["Alpha", "Bravo", "Charlie", "Delta"]
    burst = [[{"role": "system", "content": f"{n} is your name; you answer questions about {n.lower()} waves."}]
             + user(f"Tell {n} what the word {n.lower()} means, in one sentence, please.") for n in names]
    ids = [engine.tokenizer(render_prompt(engine.tokenizer, m), add_special_tokens=False)["input_ids"] for m in burst]
    assert all(30 <= len(i) < TILED_ROWS for i in ids) and sum(map(len, ids)) > 2 * TILED_ROWS, [len(i) for i in ids]
    results, calls = ask_together(engine, burst, 3)
    assert all(r is not None and r[1].completion_tokens >= 1 for r in results), results
    assert max(calls.prefilled) < TILED_ROWS and sum(calls.prefilled) == sum(map(len, ids)), calls.prefilled
    assert idle(engine)  # first: the last answer is saved by the engine's thread as it leaves
    assert [engine.scheduler._saved.match(i)[0] for i in ids] == [len(i) for i in ids]


def test_rows_of_a_prompt_prefilled_while_others_left_are_not_kept(engine):
    """A long prompt goes in over several steps. Where rows leave the prefill context in between
    (here another sequence id's, forgotten just after its first call, in the scheduler's thread),
    its later rows may go into cells before its earlier ones, where they round differently: it is
    not kept for the prompt that waits to share it, which then prefills whole."""
    from workers.engines.llamacpp.config import BATCH_TOKENS

    words = [{"role": "system", "content": "You repeat words."}]
    long = words + user("Repeat after me:" + " word" * (3 * BATCH_TOKENS))
    follower = words + user("Repeat after me: one two three.")
    long_ids = engine.tokenizer(render_prompt(engine.tokenizer, long), add_special_tokens=False)["input_ids"]
    scheduler, prefill, deadline = engine.scheduler, engine.prefill_model, time.monotonic() + 60

    with without_saved_prompts(engine), Recorder(engine) as calls:
        recorded = prefill.decode

        def first_call_then_rows_leave(rows):
            recorded(rows)
            if len(calls.prefilled) == 1:
                prefill.forget(scheduler._prefill_filler)  # rows leave (none there, but it counts)

        prefill.decode = first_call_then_rows_leave
        asked = [threading.Thread(target=ask, args=(engine, m, greedy(1))) for m in (long, follower)]
        asked[0].start()
        while not any(s.request.prompt_ids == long_ids for s in scheduler._running) and time.monotonic() < deadline:
            time.sleep(0.002)
        asked[1].start()  # it waits to share the long prompt's rows (_follows_a_joining_prompt)
        for t in asked:
            t.join(120)
        prefill.decode = recorded
    follower_length = engine.count_tokens(render_prompt(engine.tokenizer, follower))
    assert len(calls.prefilled) >= 3, calls.prefilled
    assert calls.prefilled[-1] == follower_length and sum(calls.prefilled) == len(long_ids) + follower_length, calls.prefilled
    assert idle(engine)


def test_a_prompt_that_needs_the_whole_room_pushes_the_kept_prefix_out(engine):
    """The kept prefix's rows take room in the prefill context: a prompt that shares only part of
    it and needs the whole room gets that room (the prefix goes), not a full-cache failure."""
    system = [{"role": "system", "content": "Answer briefly."}]
    ask(engine, system + user("What is the capital of Peru?"), greedy(1))
    ask(engine, system + user("What is the capital of Chile?"), greedy(1))  # kept: up to "capital of"
    assert engine.scheduler._prefix

    def prompt_of(words: int) -> list[dict]:
        return system + user("What is the meaning of" + " word" * words + "?")

    target, words = engine.context_length - 1, engine.context_length  # room for the answer token
    for _ in range(4):  # " word" is one token here, but count rather than assume
        words += target - engine.count_tokens(render_prompt(engine.tokenizer, prompt_of(words)))
    long = prompt_of(words)
    assert engine.count_tokens(render_prompt(engine.tokenizer, long)) == target
    text, result = ask(engine, long, greedy(1))
    assert result.finish_reason in ("stop", "length") and result.completion_tokens == 1
    assert idle(engine)


def test_no_prompt_ends_with_a_prefill_call_of_one_row(engine):
    """A one-row call rounds differently from longer ones (TWO_ROWS in the engine): a prompt one
    token longer than a prefill chunk ends in two rows, a one-token prompt gets a throwaway row."""
    from workers.engines.llamacpp.config import BATCH_TOKENS

    def prompt_of(words: int) -> str:
        return render_prompt(engine.tokenizer, user("Repeat after me:" + " word" * words))

    words = BATCH_TOKENS
    for _ in range(4):  # count rather than assume one token a word
        words += BATCH_TOKENS + 1 - engine.count_tokens(prompt_of(words))
    assert engine.count_tokens(prompt_of(words)) == BATCH_TOKENS + 1
    with Recorder(engine) as calls:
        result = GenerationResult()
        list(engine.stream(prompt_of(words), greedy(4), result, lambda: False))
    assert len(calls.prefilled) >= 2 and min(calls.prefilled) >= 2, calls.prefilled
    assert result.finish_reason in ("stop", "length") and result.completion_tokens >= 1
    assert engine.count_tokens("Hello") == 1
    with Recorder(engine) as calls:
        list(engine.stream("Hello", greedy(2), GenerationResult(), lambda: False))
    assert calls.prefilled == [2]
    assert idle(engine)


def test_decode_rows_fill_narrow_gaps_and_leave_wide_ones_to_a_second_pass(engine):
    from workers.engines.llamacpp.config import FILL_GAP_MAX
    from workers.engines.llamacpp.scheduler import _Sequence

    wide = 3 + FILL_GAP_MAX + 2  # FILL_GAP_MAX + 1 free ids before it
    running = [_Sequence(request=None, seq=seq, last_token=7, pos=5) for seq in (0, 2, 3, wide)]
    rows, fillers = engine.scheduler._decode_rows(running)
    assert fillers == [1]
    assert [(seq, wants) for _, _, seq, wants in rows] == [(0, True), (1, False), (2, True), (3, True), (wide, True)]


def test_a_request_whose_logits_turn_nan_ends_with_an_error_and_none_of_its_rows_is_kept(engine, monkeypatch):
    # the model's logits made NaN at the first token (the prefill's), then mid-stream (a decode
    # step's); tests/workers/test_broken_logits.py has the transformers engine's cases
    from tests.workers.test_broken_logits import BROKEN, nan_after, request, run

    scheduler = engine.scheduler
    prompt = engine.tokenizer("The capital of France is")["input_ids"]
    kept, saved = [], []  # the rows it keeps for later requests, by way of these (spied, not replaced)
    for name, calls in (("_keep_prefix", kept), ("_save_answer", saved)):
        original = getattr(scheduler, name)
        monkeypatch.setattr(scheduler, name, lambda sequence, original=original, calls=calls: calls.append(sequence.request.id) or original(sequence))
    healthy = run(scheduler, [request("healthy", prompt)])[0]
    assert len(healthy[0]) == 10 and "healthy" in saved
    for name, target in (("first", scheduler.prefill), ("middle", scheduler.llama)):
        method = "logits" if name == "first" else "all_logits"
        original, calls = getattr(target, method), []
        monkeypatch.setattr(target, method, lambda *a, original=original, calls=calls: nan_after(original(*a), calls, 3 if name == "middle" else 0))
        tokens, end = run(scheduler, [request(name, prompt)])[0]
        monkeypatch.setattr(target, method, original)
        assert end == BROKEN and tokens == (healthy[0][:4] if name == "middle" else []), name
        assert name not in saved, name  # its answer's rows
        assert (name in kept) == (name == "middle"), name  # its prompt's rows, where they were numbers
    assert run(scheduler, [request("again", prompt)])[0] == healthy  # and it serves on
