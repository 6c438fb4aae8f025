import pytest

from gptjax import GPT_CONFIG_124M, PRESETS, GPTConfig, get_config
from gptjax.presets import config_from_dict, config_to_dict, family_of, model_preset


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


@pytest.mark.parametrize("name", ["355M", "GPT_CONFIG_124M", "qwen3-0.6b", "qwen3-8b", "llama-3.2-1b"])
def test_every_family_stores_its_config_and_reads_it_back(name):
    cfg = model_preset(name)
    stored = config_to_dict(cfg)
    assert stored["family"] == family_of(cfg) and config_from_dict(stored) == cfg
    assert type(config_from_dict(stored)) is type(cfg)


def test_stored_configs_from_before_families_are_gpt2s():
    c = get_config("355M")
    assert config_from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown model family 'mamba'"):
        config_from_dict({"family": "mamba", **c.to_dict()})


def test_model_preset_names_every_family():
    assert model_preset("124M") == get_config("124M")
    assert model_preset("qwen3-0.6b", context_length=512).context_length == 512
    with pytest.raises(ValueError, match="unknown preset 'qwen9'.*llama-3.2-1b.*qwen3-0.6b"):
        model_preset("qwen9")
