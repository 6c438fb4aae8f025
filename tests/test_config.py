import pytest

from gptjax import GPT_CONFIG_124M, PRESETS, GPTConfig, get_config


def test_book_training_config():
    c = GPT_CONFIG_124M
    assert (c.vocab_size, c.context_length, c.emb_dim, c.n_layers, c.n_heads) == (50257, 256, 768, 12, 12)
    assert c.drop_rate == 0.1 and c.qkv_bias is False


@pytest.mark.parametrize(
    "alias,dims",
    [("124M", (768, 12, 12)), ("355M", (1024, 24, 16)), ("774M", (1280, 36, 20)), ("1558M", (1600, 48, 25))],
)
def test_gpt2_sizes_by_alias(alias, dims):
    c = get_config(alias)
    assert (c.emb_dim, c.n_layers, c.n_heads) == dims
    assert c.context_length == 1024 and c.qkv_bias is True
    assert c in PRESETS.values()


def test_full_names_and_overrides():
    assert get_config("gpt2-medium (355M)") == get_config("gpt2-medium")
    assert get_config("124M", context_length=256).context_length == 256


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(emb_dim=100, n_heads=3), "divisible by n_heads"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(vocab_size=-1), "vocab_size must be a positive integer"),
        (dict(drop_rate=1.0), "drop_rate"),
        (dict(drop_rate=-0.1), "drop_rate"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("gpt5")


def test_roundtrip_dict():
    c = get_config("355M")
    assert GPTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**c.to_dict(), "n_embd": 3})
