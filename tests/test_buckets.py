"""gptjax.buckets: the one padding rule of generate, the serving engine and the HellaSwag scorer."""

import pytest

from gptjax import buckets


@pytest.mark.parametrize("n,cap,want", [(0, None, 16), (1, None, 16), (16, None, 16), (17, None, 32), (100, None, 128),
                                        (129, 256, 256), (300, 256, 256), (5, 8, 8), (1024, 1024, 1024)])
def test_length_bucket(n, cap, want):
    assert buckets.length_bucket(n, cap=cap) == want


@pytest.mark.parametrize("max_batch,want", [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])])
def test_batch_buckets(max_batch, want):
    assert buckets.batch_buckets(max_batch) == want


def test_one_rule_in_the_package():
    """No module keeps a padding rule of its own: the decoders and the scorer import this one."""
    from gptjax import engine, hellaswag, sampling

    assert engine.length_bucket is hellaswag.length_bucket is sampling.length_bucket is buckets.length_bucket
    assert not any(hasattr(m, "_bucket") for m in (engine, hellaswag, sampling))
