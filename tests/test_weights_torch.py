"""The book's torch files as torch writes them: state dicts of torch.compile'd and DistributedDataParallel
models (key prefixes), the book's checkpoint dicts, and its published converted GPT-2 files."""

import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from gptjax import GPTConfig
from gptjax.weights import load_weights
from gptjax.weights.mapping import AssumedHeadsWarning
from tests.test_weights import CFG, TOL, assert_same_params, jax_logits, torch_logits
from tests.test_weights_hf import assert_owns_its_memory
from tests.torch_reference import GPTModel as TorchGPTModel
from tests.torch_reference import randomize_


@pytest.fixture(scope="module")
def book_model():
    return randomize_(TorchGPTModel(CFG.to_dict()), seed=8).eval()


@pytest.fixture(scope="module")
def reference(book_model):
    import gptjax

    return gptjax.from_torch_state_dict(book_model.state_dict(), CFG)


@pytest.fixture(scope="module")
def ddp_model(book_model, tmp_path_factory):
    """The book model wrapped in a real DistributedDataParallel (one gloo process on the CPU)."""
    store = tmp_path_factory.mktemp("ddp") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield torch.nn.parallel.DistributedDataParallel(book_model)
    finally:
        dist.destroy_process_group()


def test_compiled_model_state_dict(book_model, reference, tmp_path):
    compiled = torch.compile(book_model)  # wraps only: nothing is compiled until it is called
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    torch.save(state, tmp_path / "compiled.pth")
    params, cfg = load_weights(tmp_path / "compiled.pth", cfg=CFG)
    assert np.abs(jax_logits(params, cfg) - torch_logits(book_model)).max() <= TOL
    assert_same_params(params, reference)
    assert_owns_its_memory(params, [tmp_path / "compiled.pth"])  # read through a memory map, copied out
    # the book's checkpoint dict, saved from the compiled model during training
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=4e-4)
    torch.save({"model_state_dict": state, "optimizer_state_dict": optimizer.state_dict()}, tmp_path / "ckpt.pth")
    assert_same_params(load_weights(tmp_path / "ckpt.pth", cfg=CFG)[0], reference)


def test_ddp_and_compiled_ddp_state_dicts(ddp_model, book_model, reference, tmp_path):
    state = ddp_model.state_dict()
    assert all(k.startswith("module.") for k in state)
    torch.save(state, tmp_path / "ddp.pth")
    params, cfg = load_weights(tmp_path / "ddp.pth", cfg=CFG)
    assert np.abs(jax_logits(params, cfg) - torch_logits(book_model)).max() <= TOL
    assert_same_params(params, reference)
    both = torch.compile(ddp_model).state_dict()  # "_orig_mod.module.": the two wrappers stacked
    assert all(k.startswith("_orig_mod.module.") for k in both)
    torch.save(both, tmp_path / "both.pth")
    assert_same_params(load_weights(tmp_path / "both.pth", cfg=CFG)[0], reference)


@pytest.mark.parametrize("name, emb_dim, n_heads", [("gpt2-small-124M", 768, 12), ("gpt2-xl-1558M", 1600, 25)])
def test_books_published_gpt2_files(name, emb_dim, n_heads, tmp_path):
    # as the book converts OpenAI's weights: qkv bias, context 1024, GPT-2 widths (here 1 layer, a small vocabulary)
    cfg = GPTConfig(vocab_size=64, context_length=1024, emb_dim=emb_dim, n_layers=1, n_heads=n_heads, qkv_bias=True)
    model = randomize_(TorchGPTModel(cfg.to_dict()), seed=9).eval()
    torch.save(model.state_dict(), tmp_path / f"{name}.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssumedHeadsWarning)  # the name tells the head count: nothing assumed
        params, got = load_weights(tmp_path / f"{name}.pth")
    assert got == cfg
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 16), dtype=np.int32)
    assert np.abs(jax_logits(params, got, ids) - torch_logits(model, ids)).max() <= TOL
    # under another name the head count is an assumption, and said to be one
    (tmp_path / f"{name}.pth").rename(tmp_path / "weights.pth")
    with pytest.warns(AssumedHeadsWarning, match=f"assuming {n_heads} heads of 64"):
        assert load_weights(tmp_path / "weights.pth")[1] == cfg
