"""gptjax.quantize: int8 per-channel rounding against a numpy reference, the tree it rewrites, and the quality
of bfloat16 / int8 weights on a checkpoint trained on the-verdict (greedy text, logits, validation perplexity)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gptjax
from gptjax import GPTConfig, cpu_kernels
from gptjax.data import create_dataloader, split_text
from gptjax.cli.generate import main
from gptjax.quantize import (
    QuantizedKernel,
    dequantize_params,
    quantize_kernel,
    quantize_params,
    weights_nbytes,
)
from gptjax import sampling
from gptjax.sampling import generate
from gptjax.tokenizer import load_default_corpus
from gptjax.training import TrainConfig, calc_loss_loader, make_optimizer, make_train_step
from tests.torch_reference import GPTModel as TorchGPTModel
from tests.torch_reference import randomize_

CFG = GPTConfig(context_length=64, emb_dim=64, n_layers=2, n_heads=4, drop_rate=0.0, qkv_bias=True)
TRAIN_STEPS = 150
GREEDY_TOKENS = 100


def test_int8_kernel_matches_a_numpy_reference():
    w = np.random.default_rng(0).normal(size=(48, 20)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel stays exactly zero
    q = quantize_kernel(w)
    scale = np.abs(w).max(axis=0) / 127
    scale[3] = 1.0
    np.testing.assert_allclose(q.scale, scale, rtol=1e-6)
    np.testing.assert_array_equal(q.values, np.clip(np.round(w / scale), -127, 127).astype(np.int8))
    assert q.values.dtype == np.int8 and q.scale.dtype == np.float32
    # round to nearest: every weight within half a step of its channel's grid
    assert np.all(np.abs(np.asarray(q.dequantize()) - w) <= scale / 2 * (1 + 1e-5))
    assert np.all(np.asarray(q.dequantize())[:, 3] == 0)


def test_only_matmul_kernels_change():
    params = gptjax.init_params(CFG.replace(vocab_size=101), seed=0)
    for weights_dtype in ("bfloat16", "int8"):
        tree = quantize_params(params, weights_dtype)
        flat = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedKernel))[0])
        got = dict(jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QuantizedKernel))[0])
        assert flat.keys() == got.keys()
        for path, leaf in got.items():
            is_kernel = path[-1].key == "kernel"
            if weights_dtype == "int8" and is_kernel:
                assert isinstance(leaf, QuantizedKernel)
            else:
                assert leaf.dtype == ("bfloat16" if is_kernel else "float32"), path
        # dequantized, the tree has the float32 tree's structure and close values
        back = dequantize_params(tree)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
        for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
            assert a.dtype == np.float32
            np.testing.assert_allclose(a, b, atol=0.02 * float(np.abs(b).max()) + 1e-7)
    assert quantize_params(params, "float32") is params
    kernels = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if p[-1].key == "kernel")
    assert weights_nbytes(params) - weights_nbytes(quantize_params(params, "bfloat16")) == 2 * kernels
    assert weights_nbytes(params) - weights_nbytes(quantize_params(params, "int8")) > 2.9 * kernels


def test_unknown_weights_dtype_is_refused():
    params = gptjax.init_params(CFG.replace(vocab_size=101), seed=0)
    with pytest.raises(ValueError, match="weights_dtype must be one of float32, bfloat16, int8, got 'int4'"):
        generate(params, CFG.replace(vocab_size=101), np.zeros((1, 3), np.int32), 2, weights_dtype="int4")


def compiled_decode(cfg, params, batch):
    """The compiled program of the first 64-slot bucket of a decode (gptjax.sampling)."""
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    sampler = sampling._sampler_shapes(batch)
    return sampling._decode_bucket_in_place.lower(params, cfg, sampling._state_shapes(cfg, batch, 64), i32, sampler, slots=64,
                                         greedy=True).compile().as_text()


def test_decode_steps_read_the_stored_weights():
    """At one row and at more than bfloat16's MAX_STORED_ROWS, every matmul of a CPU decode step reads the
    int8 kernels where they lie (the compiled kernel): no float32 copy of out_head exists in the program."""
    cfg = CFG.replace(vocab_size=101)
    params = jax.eval_shape(lambda p: quantize_params(p, "int8"), gptjax.abstract_params(cfg))
    for batch in (1, cpu_kernels.MAX_STORED_ROWS + 1):
        hlo = compiled_decode(cfg, params, batch=batch)
        head = f"[{cfg.emb_dim},{cfg.vocab_size}]"
        assert "s8" + head in hlo and "f32" + head not in hlo
        assert "gptjax_matmul_int8" in hlo


def test_widened_decode_steps_widen_inside_the_loop():
    """Past MAX_STORED_ROWS rows each step widens the bfloat16 kernels for XLA's dot; no float32 copy of a
    kernel is made outside the decode loops (XLA would hoist it there and keep it for the whole decode): the
    compiled program's entry holds out_head only as bfloat16."""
    cfg = CFG.replace(vocab_size=101)
    params = jax.eval_shape(lambda p: quantize_params(p, "bfloat16"), gptjax.abstract_params(cfg))
    hlo = compiled_decode(cfg, params, batch=cpu_kernels.MAX_STORED_ROWS + 1)
    entry = hlo[hlo.index("\nENTRY"):]
    head = f"[{cfg.emb_dim},{cfg.vocab_size}]"
    assert "bf16" + head in entry and "f32" + head not in entry
    assert "f32" + head in hlo  # ... and widened inside the loop
    assert "gptjax_matmul" not in hlo


# --- quality on a trained checkpoint -------------------------------------------------------------


def train_on_the_verdict(steps: int = TRAIN_STEPS):
    """A small GPT trained on the-verdict's training split until it predicts it well; its validation loader
    the GPT-2 ids of its vocabulary and the story's first 8 tokens (renumbered). The story uses ~1,100 distinct GPT-2 tokens: renumbering them
    keeps the output layer small, so training takes seconds, while every weight matrix is still trained."""
    tokenizer = gptjax.get_tokenizer()
    train_ids, val_ids = (np.array(tokenizer.encode(t)) for t in split_text(load_default_corpus(), 0.9))
    vocab, renumbered = np.unique(np.concatenate([train_ids, val_ids]), return_inverse=True)
    train_ids, val_ids = renumbered[: len(train_ids)], renumbered[len(train_ids):]
    cfg = CFG.replace(vocab_size=len(vocab))
    loader = create_dataloader(train_ids, batch_size=8, max_length=cfg.context_length, stride=cfg.context_length,
                               shuffle=True, drop_last=True, seed=0)
    optimizer = make_optimizer(TrainConfig(lr=2e-3, weight_decay=0.0), steps)
    step = make_train_step(cfg, optimizer)
    params = gptjax.init_params(cfg, seed=0)
    opt_state = optimizer.init(params)
    n = 0
    for epoch in range(steps):
        for batch in loader.batches(epoch=epoch):
            params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(n))
            n += 1
            if n == steps:
                val = create_dataloader(val_ids, batch_size=4, max_length=cfg.context_length,
                                        stride=cfg.context_length, shuffle=False, drop_last=False)
                return params, cfg, val, float(metrics["loss"]), vocab, train_ids[:8]
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def trained():
    return train_on_the_verdict()


def greedy_texts(params, cfg, prompt, new_tokens=GREEDY_TOKENS):
    """Greedy continuations of ``prompt`` (the story's first tokens) for each weights dtype."""
    return {wd: generate(params, cfg, prompt[None], new_tokens, weights_dtype=wd)[0][len(prompt):]
            for wd in ("float32", "bfloat16", "int8")}


def quality(params, cfg, val, weights_dtype):
    """Largest logit error on the first validation batch and the validation perplexity, float32 and quantized."""
    quantized = quantize_params(params, weights_dtype)
    inputs, _ = next(iter(val))
    reference, got = gptjax.apply(params, cfg, inputs), gptjax.apply(quantized, cfg, inputs)
    logit_err = float(np.abs(np.asarray(got) - np.asarray(reference)).max())
    return logit_err, float(np.exp(calc_loss_loader(params, cfg, val))), float(np.exp(calc_loss_loader(quantized, cfg, val)))


def test_trained_checkpoint_greedy_text(trained):
    params, cfg, _, train_loss, _, prompt = trained
    assert train_loss < 2.5  # it has learned the text: greedy decoding is not a coin toss between ties
    texts = greedy_texts(params, cfg, prompt)
    np.testing.assert_array_equal(texts["bfloat16"], texts["float32"], err_msg="bfloat16 greedy text differs")
    differs = np.flatnonzero(texts["int8"] != texts["float32"])
    first = GREEDY_TOKENS if len(differs) == 0 else int(differs[0])
    # int8 steps are 16x coarser than bfloat16's: a late divergence is allowed, not one in the first 20 tokens
    assert first >= 20, f"int8 greedy text diverges at new token {first}"


@pytest.mark.parametrize("weights_dtype,max_logit_err,max_ppl_change", [("bfloat16", 0.05, 0.001), ("int8", 0.2, 0.01)])
def test_trained_checkpoint_logits_and_validation_perplexity(trained, weights_dtype, max_logit_err, max_ppl_change):
    params, cfg, val, _, _, _ = trained
    logit_err, ppl, ppl_q = quality(params, cfg, val, weights_dtype)
    assert logit_err <= max_logit_err, logit_err
    assert abs(ppl_q / ppl - 1) <= max_ppl_change, (ppl, ppl_q)


# --- the command line ----------------------------------------------------------------------------


def test_generate_cli_weights_dtype(tmp_path, capsys):
    cfg = GPTConfig(context_length=32, emb_dim=64, n_layers=1, n_heads=1, qkv_bias=False)
    model = randomize_(TorchGPTModel(cfg.to_dict()), seed=0).eval()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    params = gptjax.from_torch_state_dict(model.state_dict(), cfg)
    ids = gptjax.text_to_token_ids("Every effort moves you", gptjax.get_tokenizer())
    for weights_dtype in ("bfloat16", "int8"):
        assert main(["--weights", str(tmp_path / "model.pth"), "--prompt", "Every effort moves you", "--temperature",
                     "0", "--max-new-tokens", "6", "--weights-dtype", weights_dtype]) == 0
        want = gptjax.token_ids_to_text(generate(params, cfg, ids, 6, weights_dtype=weights_dtype)[0])
        assert capsys.readouterr().out == want + "\n"
    with pytest.raises(SystemExit):
        main(["--weights", str(tmp_path / "model.pth"), "--prompt", "x", "--weights-dtype", "int4"])
    assert "argument --weights-dtype: invalid choice: 'int4'" in capsys.readouterr().err
