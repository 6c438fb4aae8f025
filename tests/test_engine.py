"""The continuous-batching engine (gptjax.engine): greedy and seeded sampled answers equal gptjax.generate
whatever shares the batch, requests join and leave a running batch, long prompts are prefilled in chunks,
slots are reused, cancels free a slot."""

import threading
import time

import numpy as np
import pytest

import gptjax
import gptjax.engine
from gptjax.engine import BURST_STEPS, Engine, Request
from gptjax import generate

CFG = gptjax.get_config("GPT_CONFIG_124M", context_length=64, emb_dim=32, n_layers=2, n_heads=2)


@pytest.fixture(scope="module")
def params():
    return gptjax.init_params(CFG, seed=1)


@pytest.fixture(scope="module")
def engine(params):
    eng = Engine(params, CFG, max_batch=4)
    eng.warm_up()
    eng.start()
    yield eng
    eng.stop()


def run_all(engine: Engine, requests: list[dict]) -> list[tuple[list[int], str]]:
    """Submit every request at once (more than the slots: some wait for a free one); their tokens and
    finish reasons."""
    outs = [[] for _ in requests]
    reasons = [None] * len(requests)
    done = threading.Semaphore(0)

    def finish(i, reason):
        reasons[i] = reason
        done.release()

    for i, kw in enumerate(requests):
        engine.submit(Request(on_token=lambda t, lp, i=i: outs[i].append(t), on_finish=lambda r, i=i: finish(i, r),
                              **kw))
    for _ in requests:
        assert done.acquire(timeout=120)
    return list(zip(outs, reasons))


PROMPTS = [[1, 2, 3], [5] * 20, [7, 8, 9, 10, 11], [100] * 40, [3, 4], [9] * 9, [42], [6, 7] * 7]


def test_greedy_equals_generate_whatever_shares_the_batch(engine, params):
    requests = [dict(prompt=p, max_tokens=12, temperature=0.0 if i % 2 == 0 else 1.0, top_k=5 * (i % 3),
                     top_p=0.9 if i == 3 else 1.0, seed=i) for i, p in enumerate(PROMPTS)]
    results = run_all(engine, requests)
    for i, (p, (tokens, reason)) in enumerate(zip(PROMPTS, results)):
        assert reason in ("length", "stop"), reason
        if i % 2 == 0:
            ref = generate(params, CFG, np.array([p]), 12, eos_id=50256)[0, len(p):].tolist()
            assert tokens == ref, (i, tokens, ref)
        assert len(tokens) == 12 or reason == "stop"


SAMPLED = [dict(temperature=0.8, top_k=50), dict(temperature=0.8, top_p=0.95), dict(temperature=1.0),
           dict(temperature=0.7, top_k=3, top_p=0.5)]


def test_seeded_sampled_requests_equal_generate_under_concurrency(engine, params):
    """Each sampled request draws what row 0 of generate(rng=seed) draws, alone or among others (candidate
    draws and whole-vocabulary ones), and greedy neighbours still match generate."""
    requests = [dict(prompt=p, max_tokens=10, seed=30 + i, **SAMPLED[i % len(SAMPLED)]) for i, p in enumerate(PROMPTS)]
    requests += [dict(prompt=p, max_tokens=7) for p in PROMPTS[:3]]
    results = run_all(engine, requests)
    for kw, (tokens, _) in zip(requests, results):
        settings = {k: kw[k] for k in ("temperature", "top_k", "top_p") if k in kw}
        ref = generate(params, CFG, np.array([kw["prompt"]]), kw["max_tokens"], eos_id=50256,
                       rng=kw.get("seed") if settings else None, **settings)[0, len(kw["prompt"]):].tolist()
        assert tokens == [t for t in ref if t != 50256][: len(tokens)] and len(tokens) > 0, (kw, tokens, ref)


def test_log_probs_only_for_the_requests_that_ask(engine, params):
    """A batch where some requests want log-probs and some do not computes them for every row; each request
    hears only its own (None without logprobs), and all still get generate's greedy tokens."""
    heard = [[] for _ in PROMPTS[:6]]
    outs, reasons, done = [[] for _ in heard], [None] * len(heard), threading.Semaphore(0)
    for i, p in enumerate(PROMPTS[:6]):
        def on_token(t, lp, i=i):
            outs[i].append(t)
            heard[i].append(lp)

        def on_finish(reason, i=i):
            reasons[i] = reason
            done.release()

        engine.submit(Request(p, 8, logprobs=2 if i % 2 else None, on_token=on_token, on_finish=on_finish))
    for _ in heard:
        assert done.acquire(timeout=120)
    for i, p in enumerate(PROMPTS[:6]):
        assert reasons[i] in ("length", "stop") and outs[i] == generate(
            params, CFG, np.array([p]), 8, eos_id=50256)[0, len(p):].tolist()[: len(outs[i])]
        if i % 2:
            assert all(lp is not None and len(lp[1]) == 2 for lp in heard[i])
        else:
            assert heard[i] == [None] * len(outs[i])


def test_a_failing_callback_ends_its_request_not_the_engine(engine, params):
    def broken(token, lp):
        raise RuntimeError("the client's handler broke")

    failed = threading.Event()
    reason = []
    engine.submit(Request([1, 2, 3], 5, on_token=broken, on_finish=lambda r: (reason.append(r), failed.set())))
    assert failed.wait(60) and reason == ["error: the client's handler broke"]
    (tokens, why), = run_all(engine, [dict(prompt=[1, 2, 3], max_tokens=5)])
    assert why in ("length", "stop") and tokens == generate(params, CFG, np.array([[1, 2, 3]]), 5,
                                                            eos_id=50256)[0, 3:].tolist()[: len(tokens)]


def test_one_stream_decodes_in_bursts_and_ends_at_its_length(engine, params, monkeypatch):
    """Alone, a request is decoded BURST_STEPS tokens per dispatch while that many remain, then a step at a
    time: its tokens are still generate's, it ends at exactly max_tokens, and at most one step is wasted."""
    steps = []
    real = gptjax.engine._decode_steps
    monkeypatch.setattr(gptjax.engine, "_decode_steps", lambda *a, **kw: (steps.append(kw["steps"]), real(*a, **kw))[1])
    (tokens, reason), = run_all(engine, [dict(prompt=[1, 2, 3], max_tokens=23, ignore_eos=True)])
    assert reason == "length" and tokens == generate(params, CFG, np.array([[1, 2, 3]]), 23)[0, 3:].tolist()
    assert steps.count(BURST_STEPS) >= 4 and 22 <= sum(steps) <= 23, steps  # the first token is prefill's


def test_after_warm_up_serving_compiles_nothing(params):
    """Every shape a request can hit is compiled by warm_up (a compile mid-request stalls every stream for
    its duration): prompts of each prefill width, one to max_batch rows decoding, bursts, log-probs."""
    import jax.monitoring

    eng = Engine(params, CFG, max_batch=4, prefill_chunk=16)
    eng.warm_up()
    compiles = []

    def listen(event: str, seconds: float, **kw) -> None:
        if event.startswith("/jax/core/compile/"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    eng.start()
    try:
        run_all(eng, [dict(prompt=[1, 2, 3], max_tokens=9, ignore_eos=True)])  # alone: bursts
        run_all(eng, [dict(prompt=p, max_tokens=6, temperature=0.5 * (i % 2), logprobs=1 if i == 2 else None, seed=i)
                      for i, p in enumerate(PROMPTS)])
    finally:
        eng.stop()
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []


def test_requests_join_and_leave_a_running_batch(params):
    """Requests of different lengths submitted at different times: the batch grows and shrinks through its
    compiled sizes (1, 2, 4) while rows keep their slots, and every greedy answer is generate's."""
    eng = Engine(params, CFG, max_batch=4)
    eng.start()
    try:
        outs, finished = {}, threading.Semaphore(0)
        sizes = []
        eng.on_step = lambda active, waiting: sizes.append(active)

        def submit(i, prompt, n):
            outs[i] = []
            eng.submit(Request(prompt, n, on_token=lambda t, lp: outs[i].append(t),
                               on_finish=lambda r: finished.release()))

        plan = [(PROMPTS[i], min(20 + 4 * i, CFG.context_length - len(PROMPTS[i]))) for i in range(6)]
        submit(0, *plan[0])
        for i in range(1, 6):
            deadline = time.time() + 60
            while len(outs[i - 1]) < 2 and time.time() < deadline:  # the previous one is decoding
                time.sleep(0.001)
            submit(i, *plan[i])
        for _ in plan:
            assert finished.acquire(timeout=120)
    finally:
        eng.stop()
    for i, (prompt, n) in enumerate(plan):
        assert outs[i] == generate(params, CFG, np.array([prompt]), n, eos_id=50256)[0, len(prompt):].tolist()[: len(outs[i])]
        assert len(outs[i]) == n or outs[i][-1:] != [50256]
    assert max(sizes) >= 3 and sizes[-1] == 0 and eng.idle()


def test_a_long_prompt_is_prefilled_in_chunks_and_others_keep_decoding(params):
    """A prompt four chunks long (prefill_chunk 16) beside a running stream: the stream gets tokens between
    the long prompt's chunks, and both answers are generate's."""
    eng = Engine(params, CFG, max_batch=2, prefill_chunk=16)
    eng.start()
    try:
        events, done = [], threading.Semaphore(0)
        short, long = [1, 2, 3], list(range(100, 160))
        eng.submit(Request(short, 40, on_token=lambda t, lp: events.append(("short", t)),
                           on_finish=lambda r: done.release()))
        while not events:
            time.sleep(0.001)
        mark = len(events)
        eng.submit(Request(long, 3, on_token=lambda t, lp: events.append(("long", t)),
                           on_finish=lambda r: done.release()))
        assert done.acquire(timeout=120) and done.acquire(timeout=120)
    finally:
        eng.stop()
    got = {name: [t for n, t in events if n == name] for name in ("short", "long")}
    for name, prompt, n in (("short", short, 40), ("long", long, 3)):
        assert got[name] == generate(params, CFG, np.array([prompt]), n, eos_id=50256)[0, len(prompt):].tolist()[: len(got[name])]
    first_long = [n for n, _ in events].index("long")
    assert len(got["short"]) == 40 and first_long - mark >= 3  # one short token at least per long chunk


def test_sampled_tokens_depend_only_on_their_own_seed(engine):
    alone = run_all(engine, [dict(prompt=[5, 6, 7], max_tokens=10, temperature=1.0, top_k=20, seed=7)])[0][0]
    crowd = run_all(engine, [dict(prompt=[5, 6, 7], max_tokens=10, temperature=1.0, top_k=20, seed=7)]
                    + [dict(prompt=[9] * (3 + i), max_tokens=8, temperature=0.8, seed=100 + i) for i in range(5)])
    assert crowd[0][0] == alone
    other_seed = run_all(engine, [dict(prompt=[5, 6, 7], max_tokens=10, temperature=1.0, top_k=20, seed=8)])[0][0]
    assert other_seed != alone  # the seed matters (10 tokens from 20 candidates: equal by chance is negligible)


def test_a_cancel_while_steps_are_in_flight_ends_the_request_at_once(engine):
    """A request cancelled from its own token callback (the step after is already dispatched) gets no
    further token, and its slot serves the next request."""
    tokens, reasons, finished = [], [], threading.Event()
    r = Request([4, 5, 6], 30, on_finish=lambda why: (reasons.append(why), finished.set()))
    r.on_token = lambda t, lp: (tokens.append(t), len(tokens) == 3 and r.cancelled.set())
    engine.submit(r)
    assert finished.wait(60)
    assert reasons == ["cancelled"] and len(tokens) == 3
    assert all(len(t) == 3 for t, _ in run_all(engine, [dict(prompt=[3], max_tokens=3)] * engine.max_batch))


def test_a_cancelled_request_frees_its_slot(engine):
    started = threading.Event()
    finished = threading.Event()
    reasons = []
    long = Request([1, 2], 50, on_token=lambda t, lp: started.set(),
                   on_finish=lambda r: (reasons.append(r), finished.set()))
    engine.submit(long)
    assert started.wait(60)
    long.cancelled.set()
    assert finished.wait(60)
    assert reasons == ["cancelled"] and long.generated < 50
    # Every slot is free again: a full batch of new requests all finish.
    results = run_all(engine, [dict(prompt=[3], max_tokens=3) for _ in range(engine.max_batch)])
    assert all(len(tokens) == 3 for tokens, _ in results)


def test_int8_weights_greedy_equals_generate(params):
    """The engine's vmapped decode step through the compiled kernels (stored int8 weights): the tokens of
    generate from the same weights."""
    eng = Engine(params, CFG, max_batch=2, weights_dtype="int8")
    eng.start()
    try:
        results = run_all(eng, [dict(prompt=p, max_tokens=10, temperature=0.0) for p in PROMPTS[:3]])
    finally:
        eng.stop()
    for p, (tokens, _) in zip(PROMPTS[:3], results):
        assert tokens == generate(params, CFG, np.array([p]), 10, eos_id=50256, weights_dtype="int8")[0, len(p):].tolist()
