"""gptjax.sampling: greedy parity with the book's torch loop, sampled distributions, eos, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import gptjax
from gptjax import GPTConfig, sampling
from gptjax.sampling import (
    _prefill,
    apply_temperature,
    generate,
    sample_rows,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from tests.torch_reference import GPTModel as TorchGPTModel
from tests.torch_reference import generate_text_simple, randomize_

CFG = GPTConfig(vocab_size=257, context_length=32, emb_dim=48, n_layers=2, n_heads=4, drop_rate=0.1, qkv_bias=True)
# The book's toy vocabulary "closer every effort forward inches moves pizza toward you".
TOY_LOGITS = np.array([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79], np.float32)
DRAWS = 20_000


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    ref = randomize_(TorchGPTModel(CFG.to_dict()), seed=1).eval()
    return ref, gptjax.from_torch_state_dict(ref.state_dict(), CFG)


def prompt(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=(batch, length), dtype=np.int32)


# --- greedy parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "prompt_len,new",
    [(5, 10), (5, 40), (40, 6)],
    ids=["within-context", "window-slides", "prompt-longer-than-context"],
)
def test_greedy_matches_torch_generate_text_simple(model, batch, prompt_len, new):
    ref, params = model
    ids = prompt(batch, prompt_len, seed=prompt_len)
    got = generate(params, CFG, ids, new)
    want = generate_text_simple(ref, torch.as_tensor(ids, dtype=torch.long), new, CFG.context_length).numpy()
    assert got.shape == (batch, prompt_len + new) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_prompt_lengths_share_compiles(model):
    _, params = model
    generate(params, CFG, prompt(2, 3), 4)  # compile the bucket once
    before = _prefill._cache_size(), len(sampling._COMPILED)
    for length in (5, 7, 11):
        assert generate(params, CFG, prompt(2, length), 4).shape == (2, length + 4)
    assert (_prefill._cache_size(), len(sampling._COMPILED)) == before


def test_zero_new_tokens_returns_the_prompt(model):
    _, params = model
    ids = prompt(2, 6)
    np.testing.assert_array_equal(generate(params, CFG, ids, 0), ids)


# --- sampling ------------------------------------------------------------------------------------


def expected_distribution(logits, temperature, top_k=None, top_p=None):
    """Independent float64 reference for the filter order top-k, temperature, top-p."""
    logits = logits.astype(np.float64)
    if top_k is not None:
        logits = np.where(logits < np.sort(logits)[-top_k], -np.inf, logits)
    logits = logits / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        keep = np.zeros_like(probs, bool)
        keep[order[mass_before < top_p]] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return probs


def sample_counts(logits, temperature, top_k=None, top_p=None, seed=0):
    draw = jax.jit(jax.vmap(lambda key: sample_next(logits, key, temperature, top_k, top_p)))
    tokens = np.asarray(draw(jax.random.split(jax.random.key(seed), DRAWS)))
    return np.bincount(tokens, minlength=logits.shape[-1])


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, None, None), (0.1, None, None), (5.0, None, None), (1.0, 3, None), (2.0, None, 0.9), (5.0, 6, 0.8)],
)
def test_sampled_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
    counts = sample_counts(TOY_LOGITS, temperature, top_k, top_p)
    probs = expected_distribution(TOY_LOGITS, temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
    # Chi-square over bins expected to hold >= 5 draws; the rare rest pooled into one bin.
    expected = probs * DRAWS
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    observed, expected = observed[expected > 0], expected[expected > 0]
    if len(expected) > 1:
        assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected.round(1))
    else:
        assert observed[0] == DRAWS


# A 300-token vocabulary: wider than the sampler's candidate set, so both of its draws run.
WIDE_LOGITS = np.asarray(jax.random.normal(jax.random.key(5), (300,)) * 2.0, np.float32)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.8, 10, None), (0.8, 50, 0.5), (1.5, None, 0.3),  # the candidates hold the answer
     (1.0, None, None), (0.8, 100, None), (1.0, 200, 0.9), (0.5, None, 0.999)],  # the whole vocabulary's draw
)
def test_sample_rows_draws_the_filtered_distribution(temperature, top_k, top_p):
    """The per-row sampler of generate and the server draws what the book's filters define, on both paths."""
    n = 20000
    draw = jax.jit(lambda keys: sample_rows(jnp.broadcast_to(WIDE_LOGITS, (n, 300)), keys, jnp.full(n, temperature),
                                            jnp.full(n, top_k or 0, jnp.int32), jnp.full(n, top_p or 1.0)))
    counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(9), n))), minlength=300)
    probs = expected_distribution(WIDE_LOGITS, temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
    big = probs * n >= 5
    observed, expected = np.append(counts[big], counts[~big].sum()), np.append(probs[big], probs[~big].sum()) * n
    keep = expected > 0
    assert chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue > 1e-3


def test_sample_rows_gives_each_row_its_own_answer():
    """A row's token depends on its logits, settings and key alone: the same row in batches of other rows
    (greedy, sampled on either path) draws the same token; greedy rows are the argmax."""
    logits = jnp.asarray(np.stack([WIDE_LOGITS, WIDE_LOGITS[::-1], WIDE_LOGITS * 0.1, WIDE_LOGITS]))
    keys = jax.random.split(jax.random.key(2), 4)
    temperature, top_k, top_p = jnp.array([0.9, 0.0, 1.0, 0.7]), jnp.array([20, 0, 0, 0]), jnp.array([1.0, 1.0, 0.9, 1.0])
    together = np.asarray(jax.jit(sample_rows)(logits, keys, temperature, top_k, top_p))
    for i in range(4):
        alone = sample_rows(logits[i:i + 1], keys[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1])
        assert int(alone[0]) == together[i]
    assert together[1] == int(np.argmax(WIDE_LOGITS[::-1]))


def test_filters_on_known_logits():
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], np.float32))
    inf = -np.inf
    np.testing.assert_allclose(top_k_filter(logits, 2), [[logits[0, 0], logits[0, 1], inf], [inf, logits[1, 1], logits[1, 2]]])
    # Ties with the k-th largest stay, as in the book's torch.where(logits < min_val, ...).
    np.testing.assert_array_equal(top_k_filter(np.array([1.0, 2.0, 2.0, 0.0]), 1), [inf, 2.0, 2.0, inf])
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))  # noqa: E731
    np.testing.assert_array_equal(kept(0.45), [[True, False, False], [False, True, False]])
    np.testing.assert_array_equal(kept(0.7), [[True, True, False], [False, True, True]])
    np.testing.assert_array_equal(kept(1.0), np.ones((2, 3), bool))
    np.testing.assert_allclose(apply_temperature(logits, 2.0), logits / 2.0)
    np.testing.assert_array_equal(sample_next(logits, None), [0, 1])


def test_top_k_1_is_greedy(model):
    _, params = model
    ids = prompt(3, 4)
    sampled = generate(params, CFG, ids, 12, temperature=1.5, top_k=1, rng=jax.random.key(7))
    np.testing.assert_array_equal(sampled, generate(params, CFG, ids, 12))


def test_seeds(model):
    _, params = model
    ids = prompt(2, 4)
    run = lambda seed: generate(params, CFG, ids, 16, temperature=1.0, top_k=50, top_p=0.95, rng=seed)  # noqa: E731
    np.testing.assert_array_equal(run(1), run(1))
    np.testing.assert_array_equal(run(jax.random.key(1)), run(1))
    assert not np.array_equal(run(1), run(2))


# --- eos -----------------------------------------------------------------------------------------


def stop_at_eos(tokens, prompt_len, eos_ids):
    """What eos handling must turn an eos-free run into: each row frozen at the first of its eos ids,
    the array cut after the step at which the last row stopped."""
    out, ends = tokens.copy(), []
    for row in out:
        hits = np.flatnonzero(np.isin(row[prompt_len:], eos_ids))
        if len(hits):
            row[prompt_len + hits[0] :] = row[prompt_len + hits[0]]
            ends.append(prompt_len + hits[0] + 1)
        else:
            ends.append(len(row))
    return out[:, : max(ends)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_eos_stops_each_row(model, temperature):
    _, params = model
    ids, new = prompt(3, 5, seed=3), 20
    kwargs = dict(temperature=temperature, rng=jax.random.key(3))
    free = generate(params, CFG, ids, new, **kwargs)
    eos_id = int(free[0, 5 + 2])  # row 0 stops after 3 new tokens at the latest
    got = generate(params, CFG, ids, new, eos_id=eos_id, **kwargs)
    np.testing.assert_array_equal(got, stop_at_eos(free, 5, eos_id))
    assert got[0, 5:8].tolist().count(eos_id) >= 1 and np.all(got[0, 8:] == eos_id)


def test_several_eos_ids_stop_a_row_at_the_first_it_emits(model):
    """Llama 3 and Qwen3 end a turn at any of several ids (end of turn, end of text)."""
    _, params = model
    ids, new = prompt(3, 5, seed=3), 20
    free = generate(params, CFG, ids, new)
    eos_ids = {int(free[1, 5 + 1]), int(free[2, 5 + 4])}
    got = generate(params, CFG, ids, new, eos_id=eos_ids)
    np.testing.assert_array_equal(got, stop_at_eos(free, 5, sorted(eos_ids)))
    assert got[1, 5 + 1] in eos_ids and len(set(got[1, 5 + 1:])) == 1


def test_eos_returns_early_once_every_row_stopped(model):
    _, params = model
    ids = prompt(1, 5, seed=4)
    free = generate(params, CFG, ids, 30)
    eos_id = int(free[0, 5 + 3])
    got = generate(params, CFG, ids, 30, eos_id=eos_id)
    first = int(np.flatnonzero(free[0, 5:] == eos_id)[0])
    assert got.shape == (1, 5 + first + 1) and got[0, -1] == eos_id
    np.testing.assert_array_equal(got, free[:, : 5 + first + 1])


# --- invalid settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids,new,kwargs,match",
    [
        (prompt(1, 4), 5, dict(temperature=-0.5), "temperature must be >= 0"),
        (prompt(1, 4), 5, dict(temperature=1.0, top_k=0, rng=0), r"top_k must be an integer in \[1, 257\]"),
        (prompt(1, 4), 5, dict(temperature=1.0, top_k=258, rng=0), r"top_k must be an integer in \[1, 257\]"),
        (prompt(1, 4), 5, dict(temperature=1.0, top_p=0.0, rng=0), r"top_p must be in \(0, 1\]"),
        (prompt(1, 4), 5, dict(temperature=1.0, top_p=1.5, rng=0), r"top_p must be in \(0, 1\]"),
        (np.zeros((1, 0), np.int32), 5, {}, "non-empty prompt"),
        (prompt(1, 4), -1, {}, "max_new_tokens must be an integer >= 0"),
        (prompt(1, 4), 5, dict(temperature=0.7), "needs rng="),
        (prompt(1, 4), 5, dict(eos_id=300), "eos_id must be a token id"),
        (prompt(1, 4), 5, dict(eos_id=[]), "a non-empty collection"),
        (np.array([[1, 2, 999]]), 5, {}, r"token ids must lie in \[0, 257\)"),
    ],
    ids=["temperature<0", "top_k<1", "top_k>vocab", "top_p=0", "top_p>1", "empty-prompt", "max_new<0",
         "no-rng", "eos-outside-vocab", "no-eos-ids", "id-outside-vocab"],
)
def test_invalid_settings(model, ids, new, kwargs, match):
    _, params = model
    with pytest.raises(ValueError, match=match):
        generate(params, CFG, ids, new, **kwargs)


def test_sample_next_errors():
    with pytest.raises(ValueError, match="needs a key"):
        sample_next(TOY_LOGITS, None, temperature=1.0)
    with pytest.raises(ValueError, match="temperature > 0"):
        apply_temperature(TOY_LOGITS, 0.0)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 9\]"):
        top_k_filter(TOY_LOGITS, 10)
