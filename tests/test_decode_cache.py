"""The decode loop's KV cache: grown in buckets (GPU, TPU, CPU without the compiled attention), the same
tokens as the book's loop across every bucket boundary and into the sliding window, and a short
continuation never touches a full-context cache; on CPU one whole-context cache and one program."""

import re

import jax
import numpy as np
import pytest
import torch

import gptjax
from gptjax import GPTConfig
from gptjax import cpu_kernels, platform, sampling
from gptjax.sampling import _kv_buckets, generate
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
    assert _kv_buckets(16, 512, 1024, grow=False) == [1024]
    # A long context (Qwen3's 40,960): a cache of what the call needs, at least the whole-cache size.
    assert _kv_buckets(16, 512, 40960, grow=False) == [4096]
    assert _kv_buckets(16, 8192, 40960, grow=False) == [8192]


@pytest.mark.parametrize("grow", [True, False], ids=["grown", "whole-context"])
@pytest.mark.parametrize("prompt_len,new", [(70, 20), (3, 150)], ids=["prompt-past-64", "every-bucket"])
def test_greedy_across_cache_buckets_matches_torch(model, prompt_len, new, grow, monkeypatch):
    monkeypatch.setattr(platform, "decode_cache_grows", lambda params: grow)
    ref, params = model
    ids = np.random.default_rng(prompt_len).integers(0, CFG.vocab_size, (2, prompt_len), dtype=np.int32)
    got = generate(params, CFG, ids, new)
    want = generate_text_simple(ref, torch.as_tensor(ids, dtype=torch.long), new, CFG.context_length).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.fixture
def grown(monkeypatch):
    """Decoding as on a GPU or TPU: the cache grown in buckets (gptjax.platform.decode_cache_grows)."""
    monkeypatch.setattr(platform, "decode_cache_grows", lambda params: True)


def new_programs(fn):
    before = set(sampling._COMPILED)
    fn()
    return sorted(key[:4] for key in set(sampling._COMPILED) - before)


def test_short_continuation_at_long_context_reads_a_short_cache(grown):
    """Grown in buckets, at context 1024 a 20-token continuation runs one program, a loop over a 64-slot
    cache: no array with 1024 slots appears in it, so a step's cache traffic follows the filled length."""
    cfg = CFG.replace(context_length=1024, n_layers=1)
    params = gptjax.init_params(cfg, seed=0)
    programs = new_programs(lambda: generate(params, cfg, np.array([[1, 2, 3, 4]]), 20))
    assert programs == [("bucket", 1, 64, 64)], programs
    (key,) = [key for key in sampling._COMPILED if key[:4] == programs[0] and key[4] == cfg]
    cache_shapes = set(re.findall(rf"f32\[1,{cfg.n_heads},(\d+),{cfg.head_dim}\]", sampling._COMPILED[key].as_text()))
    assert max(map(int, cache_shapes)) == 64, cache_shapes


def test_grown_buckets_are_shared_by_short_and_long_continuations(grown, model):
    """A bucket's program depends on the batch and the bucket, not on how long the continuation is: a
    150-token continuation adds the programs of the buckets past the first, and reuses that one."""
    _, params = model
    generate(params, CFG, np.array([[1, 2, 3]]), 5)
    assert new_programs(lambda: generate(params, CFG, np.array([[1, 2, 3]]), 150)) == [("bucket", 1, 64, 128),
                                                                                       ("bucket", 1, 128, 256)]


def test_cpu_decodes_with_one_program_whatever_the_length(model):
    """On CPU the compiled attention reads only the filled slots, so the cache is the whole context from the
    start and a long continuation compiles nothing a short one did not (with the same tokens)."""
    ref, params = model
    assert not platform.decode_cache_grows(params)
    programs = new_programs(lambda: generate(params, CFG, np.array([[4, 5, 6]]), 5))
    assert all(key[2:4] == (CFG.context_length, CFG.context_length) for key in programs), programs
    ids = np.array([[4, 5, 6]])
    assert new_programs(lambda: generate(params, CFG, ids, 150)) == []
    want = generate_text_simple(ref, torch.as_tensor(ids, dtype=torch.long), 150, CFG.context_length).numpy()
    np.testing.assert_array_equal(generate(params, CFG, ids, 150), want)


def test_without_the_compiled_attention_the_cache_grows(monkeypatch):
    params = gptjax.init_params(CFG.replace(n_layers=1), seed=0)
    assert not platform.decode_cache_grows(params)
    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "not built")
    assert platform.decode_cache_grows(params)


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
