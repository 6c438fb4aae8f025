"""gptjax logits agree with the book's torch GPTModel carrying the same weights, both ways."""

import jax
import numpy as np
import pytest
import torch

import gptjax
from gptjax import GPTConfig, get_config
from tests.torch_reference import GPTModel as TorchGPTModel
from tests.torch_reference import randomize_

TOL = 1e-4

SMALL = dict(vocab_size=257, context_length=32, emb_dim=48, n_layers=2, drop_rate=0.1)
CONFIGS = {
    "no-qkv-bias": GPTConfig(**SMALL, n_heads=4, qkv_bias=False),
    "qkv-bias": GPTConfig(**SMALL, n_heads=4, qkv_bias=True),
    "3-heads-of-16": GPTConfig(**SMALL, n_heads=3, qkv_bias=True),
}


def torch_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).numpy()


def random_ids(cfg, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, seq), dtype=np.int32)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch,seq", [(1, 5), (3, 32)])
def test_torch_to_gptjax(name, batch, seq):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ref = randomize_(TorchGPTModel(cfg.to_dict()), seed=1)
    params = gptjax.from_torch_state_dict(ref.state_dict(), cfg)
    ids = random_ids(cfg, batch, seq)
    got = np.asarray(gptjax.apply(params, cfg, ids))
    want = torch_logits(ref, ids)
    assert got.shape == (batch, seq, cfg.vocab_size) and got.dtype == np.float32
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gptjax_to_torch(name):
    cfg = CONFIGS[name]
    params = gptjax.init_params(cfg, seed=3)
    ref = TorchGPTModel(cfg.to_dict())
    ref.load_state_dict(gptjax.to_torch_state_dict(params, cfg), strict=True)
    ids = random_ids(cfg, 2, cfg.context_length, seed=4)
    got = np.asarray(gptjax.apply(params, cfg, ids))
    assert np.abs(got - torch_logits(ref, ids)).max() <= TOL


def test_state_dict_without_mask_buffers_and_roundtrip_is_exact():
    cfg = CONFIGS["qkv-bias"]
    ref = randomize_(TorchGPTModel(cfg.to_dict()), seed=5)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("att.mask")}
    params = gptjax.from_torch_state_dict(sd, cfg)
    back = gptjax.to_torch_state_dict(params, cfg)
    for k, v in ref.state_dict().items():
        assert torch.equal(back[k], v), k


def test_full_124m_shape():
    cfg = gptjax.GPT_CONFIG_124M
    torch.manual_seed(0)
    ref = randomize_(TorchGPTModel(cfg.to_dict()), seed=2)
    params = gptjax.from_torch_state_dict(ref.state_dict(), cfg)
    ids = random_ids(cfg, 2, cfg.context_length, seed=6)
    got = np.asarray(gptjax.apply(params, cfg, ids))
    assert np.abs(got - torch_logits(ref, ids)).max() <= TOL
    assert gptjax.param_count(params) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("preset", sorted(gptjax.PRESETS))
def test_param_count_matches_torch(preset):
    cfg = get_config(preset)
    with torch.device("meta"):
        ref = TorchGPTModel(cfg.to_dict())
    assert gptjax.param_count(gptjax.abstract_params(cfg)) == sum(p.numel() for p in ref.parameters())


def test_bad_inputs_raise_clear_errors():
    cfg = CONFIGS["no-qkv-bias"]
    params = gptjax.init_params(cfg)
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        gptjax.apply(params, cfg, np.zeros((1, cfg.context_length + 1), np.int32))
    with pytest.raises(ValueError, match="needs rng"):
        gptjax.apply(params, cfg, np.zeros((1, 4), np.int32), train=True)
    sd = gptjax.to_torch_state_dict(params, cfg)
    del sd["trf_blocks.1.ff.layers.2.bias"]
    with pytest.raises(ValueError, match=r"missing tensor 'trf_blocks.1.ff.layers.2.bias'"):
        gptjax.from_torch_state_dict(sd, cfg)
    sd = gptjax.to_torch_state_dict(params, cfg)
    with pytest.raises(ValueError, match=r"'tok_emb.weight' has shape \(257, 48\), expected \(300, 48\)"):
        gptjax.from_torch_state_dict(sd, cfg.replace(vocab_size=300))
    with pytest.raises(ValueError, match=r"unexpected tensor 'trf_blocks.0.att.W_query.bias'"):
        biased = CONFIGS["qkv-bias"]
        gptjax.from_torch_state_dict(gptjax.to_torch_state_dict(gptjax.init_params(biased), biased), cfg)


def test_dropout_is_active_only_in_training():
    cfg = CONFIGS["no-qkv-bias"]
    params = gptjax.init_params(cfg)
    ids = random_ids(cfg, 2, 8)
    eval_a, eval_b = gptjax.apply(params, cfg, ids), gptjax.apply(params, cfg, ids)
    np.testing.assert_array_equal(eval_a, eval_b)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    t1 = gptjax.apply(params, cfg, ids, train=True, rng=k1)
    assert not np.allclose(t1, eval_a)
    np.testing.assert_array_equal(t1, gptjax.apply(params, cfg, ids, train=True, rng=k1))
    assert not np.allclose(t1, gptjax.apply(params, cfg, ids, train=True, rng=k2))
