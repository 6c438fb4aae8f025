"""The decode loop's KV cache grows in buckets: the same tokens as the book's loop across every bucket
boundary and into the sliding window, and a short continuation never touches a full-context cache."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gptjax
from gptjax import GPTConfig
from gptjax.sampling import _decode, _kv_buckets, _prefill, generate
from tests.torch_reference import GPTModel as TorchGPTModel
from tests.torch_reference import generate_text_simple, randomize_

# Context 256 so that a continuation crosses the 64 -> 128 -> 256 cache buckets; tiny otherwise.
CFG = GPTConfig(vocab_size=97, context_length=256, emb_dim=32, n_layers=2, n_heads=4, drop_rate=0.0, qkv_bias=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    ref = randomize_(TorchGPTModel(CFG.to_dict()), seed=2).eval()
    return ref, gptjax.from_torch_state_dict(ref.state_dict(), CFG)


def test_kv_buckets():
    assert _kv_buckets(16, 32, 1024) == [64]  # short continuations: one small cache
    assert _kv_buckets(16, 512, 1024) == [64, 128, 256, 512]
    assert _kv_buckets(16, 2048, 1024) == [64, 128, 256, 512, 1024]  # past the context: the window slides
    assert _kv_buckets(128, 256, 1024) == [128, 256]  # the padded prompt's length is the first bucket
    assert _kv_buckets(16, 64, 32) == [32]  # contexts below the smallest bucket
    assert _kv_buckets(16, 1024, 200) == [64, 128, 200]  # a context that is not a power of two ends the list


@pytest.mark.parametrize("prompt_len,new", [(70, 20), (3, 150)], ids=["prompt-past-64", "every-bucket"])
def test_greedy_across_cache_buckets_matches_torch(model, prompt_len, new):
    ref, params = model
    ids = np.random.default_rng(prompt_len).integers(0, CFG.vocab_size, (2, prompt_len), dtype=np.int32)
    got = generate(params, CFG, ids, new)
    want = generate_text_simple(ref, torch.as_tensor(ids, dtype=torch.long), new, CFG.context_length).numpy()
    np.testing.assert_array_equal(got, want)


def test_short_continuation_at_long_context_reads_a_short_cache():
    """At context 1024 a 20-token continuation compiles to loops over a 64-slot cache: no array with
    1024 slots appears in the decode program, so a step's cache traffic follows the filled length."""
    cfg = CFG.replace(context_length=1024)
    params = gptjax.abstract_params(cfg)
    prompt_bucket, buffer = 16, 32  # what generate pads a 4-token prompt + 20 new tokens to
    slots = _kv_buckets(prompt_bucket, buffer, cfg.context_length)[0]
    _, cache = jax.eval_shape(lambda p, t: _prefill(p, cfg, t, jnp.int32(4), slots=slots),
                              params, jax.ShapeDtypeStruct((1, prompt_bucket), jnp.int32))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    hlo = _decode.lower(params, cfg, jax.ShapeDtypeStruct((1, buffer), jnp.int32), cache,
                        jax.ShapeDtypeStruct((1, cfg.vocab_size), jnp.float32), scalar, scalar, scalar,
                        jax.random.key(0), jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32),
                        greedy=True, top_k=None, use_top_p=False).as_text()
    head_dim = cfg.head_dim
    cache_shapes = set(re.findall(rf"tensor<1x{cfg.n_heads}x(\d+)x{head_dim}xf32>", hlo))
    assert max(map(int, cache_shapes)) == 64, cache_shapes  # (the other one: the new token's keys)


def test_cache_of_fewer_slots_gives_the_same_logits(model):
    """apply_with_cache over a cache of just the positions used equals the full-context cache."""
    _, params = model
    ids = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 12), dtype=np.int32)
    step = jax.jit(gptjax.apply_with_cache, static_argnames="cfg")
    short, _ = step(params, CFG, ids, gptjax.init_cache(CFG, 2, slots=16), 0)
    full, _ = step(params, CFG, ids, gptjax.init_cache(CFG, 2), 0)
    np.testing.assert_allclose(short, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"slots must be in \[1, context_length=256\]"):
        gptjax.init_cache(CFG, 1, slots=257)
