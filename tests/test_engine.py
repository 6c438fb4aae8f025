"""The continuous-batching engine (gptjax.engine): greedy answers equal gptjax.generate whatever shares the
batch, sampled ones depend only on their own seed and settings, slots are reused, cancels free a slot."""

import threading

import numpy as np
import pytest

import gptjax
from gptjax.engine import Engine, Request
from gptjax.sampling import generate  # not gptjax.generate: importing the CLI module gptjax.generate shadows it

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


def test_sampled_tokens_depend_only_on_their_own_seed(engine):
    alone = run_all(engine, [dict(prompt=[5, 6, 7], max_tokens=10, temperature=1.0, top_k=20, seed=7)])[0][0]
    crowd = run_all(engine, [dict(prompt=[5, 6, 7], max_tokens=10, temperature=1.0, top_k=20, seed=7)]
                    + [dict(prompt=[9] * (3 + i), max_tokens=8, temperature=0.8, seed=100 + i) for i in range(5)])
    assert crowd[0][0] == alone
    other_seed = run_all(engine, [dict(prompt=[5, 6, 7], max_tokens=10, temperature=1.0, top_k=20, seed=8)])[0][0]
    assert other_seed != alone  # the seed matters (10 tokens from 20 candidates: equal by chance is negligible)


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
