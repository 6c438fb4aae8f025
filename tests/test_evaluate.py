"""`python -m gptjax.evaluate` on a tiny .pth, checked against the book's torch model and loss by hand."""

import math
import re

import numpy as np
import pytest
import torch

from gptjax import GPTConfig, get_tokenizer
from gptjax.cli.evaluate import main
from gptjax.tokenizer import load_default_corpus
from tests.torch_reference import GPTModel as TorchGPTModel
from tests.torch_reference import randomize_

# GPT-2's vocabulary (the corpus is GPT-2 tokens), all else tiny; 64-wide heads, so no config file needed.
CFG = GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_layers=1, n_heads=1, qkv_bias=True)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = randomize_(TorchGPTModel(CFG.to_dict()), seed=5).eval()
    path = tmp_path_factory.mktemp("eval") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return model, path


def book_loss(model, text, context, drop_last, batch_size=2):
    """The book's calc_loss_loader over stride=context windows in order, written out with torch."""
    ids = get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})
    starts = range(0, len(ids) - context, context)
    windows = np.array([ids[s : s + context + 1] for s in starts])
    n = len(windows) // batch_size * batch_size if drop_last else len(windows)
    windows = torch.as_tensor(windows[:n], dtype=torch.long)
    with torch.no_grad():  # one forward pass for all windows, then the loss batch by batch
        token_losses = torch.nn.functional.cross_entropy(
            model(windows[:, :-1]).transpose(1, 2), windows[:, 1:], reduction="none"
        )
    batch_losses = [token_losses[b : b + batch_size].mean().item() for b in range(0, n, batch_size)]
    return sum(batch_losses) / len(batch_losses)


def printed(out):
    return {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(train|val) +loss (\S+) +perplexity (\S+)$", out, re.M)}


@pytest.mark.parametrize("corpus,context", [(None, None), ("part", 16)])
def test_losses_match_the_book(weights, corpus, context, tmp_path, capsys):
    model, path = weights
    text = load_default_corpus()
    argv = ["--weights", str(path)]
    if corpus:  # a shorter text (the 50,257-way output layer makes the torch reference slow on CPU)
        text = text[:3000]
        (tmp_path / "part.txt").write_text(text, encoding="utf-8")
        argv += ["--corpus", str(tmp_path / "part.txt")]
    if context:
        argv += ["--context-length", str(context)]
    assert main(argv) == 0
    got = printed(capsys.readouterr().out)
    split = int(0.9 * len(text))
    for name, part, drop_last in (("train", text[:split], True), ("val", text[split:], False)):
        want = book_loss(model, part, context or CFG.context_length, drop_last)
        loss, ppl = got[name]
        assert abs(loss - want) <= 6e-4, name
        assert abs(ppl - math.exp(want)) <= 0.01 * math.exp(want), name


def test_bad_settings(weights, tmp_path, capsys):
    _, path = weights
    assert main(["--weights", str(path), "--context-length", "64"]) == 2
    assert "--context-length must be between 1 and the model's 32, got 64" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("Every effort moves you forward. " * 12)
    assert main(["--weights", str(path), "--corpus", str(short)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: the validation split of {short} has ") and "smaller --context-length" in err
    assert "max_length" not in err and "context_length" not in err
    assert main(["--weights", str(tmp_path / "none.pth")]) == 2
    assert "none.pth" in capsys.readouterr().err
    # Settings are checked in the flags' words before the weights load (a missing file would be found later).
    missing = str(tmp_path / "none.pth")
    for flags, message in ((["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                           (["--train-ratio", "1.5"], "--train-ratio must be between 0 and 1"),
                           (["--context-length", "0"], "--context-length must be at least 1, got 0")):
        assert main(["--weights", missing, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_says_which_checkpoint_step_it_evaluated(tmp_path, capsys):
    import jax

    from gptjax.checkpoint import checkpoint_manager, save_checkpoint
    from gptjax.model import init_params
    from gptjax.training import Position, TrainConfig, init_opt_state, make_optimizer

    cfg = CFG.replace(qkv_bias=False)
    params = init_params(cfg, seed=0)
    opt_state = init_opt_state(make_optimizer(TrainConfig(), 10), params)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    manager = checkpoint_manager(tmp_path / "run")
    for step in (3, 7):
        save_checkpoint(manager, Position(step=step), params, opt_state, jax.random.key(0), cfg)
    manager.close()
    corpus = tmp_path / "c.txt"
    corpus.write_text(load_default_corpus()[:3000])
    assert main(["--weights", str(tmp_path / "run"), "--corpus", str(corpus), "--context-length", "16"]) == 0
    assert "(checkpoint at step 7)" in capsys.readouterr().out
    step3 = tmp_path / "run" / "checkpoints" / "3"
    assert main(["--weights", str(step3), "--corpus", str(corpus), "--context-length", "16"]) == 0
    assert "(checkpoint at step 3)" in capsys.readouterr().out
