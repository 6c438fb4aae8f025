"""The chapter-5 run on a Qwen3 model folder, as ch05-qwen3.ipynb continues pretraining on the-verdict:
``python -m gptjax.train --weights FOLDER``, on the model's own tokenizer, resumed exactly, with a run directory
that generate reads (its tokenizer copied in)."""

import json

import jax
import numpy as np
import pytest

import gptjax
from gptjax.chat import model_text
from gptjax.cli.generate import main as generate_main
from gptjax.cli.train import main as train_main
from gptjax.data import DataSource, build_loaders
from gptjax.qwen3 import Qwen3Config
from gptjax.tokenizer import load_tokenizer
from gptjax.weights import load_weights
from tests.family_files import write_qwen_tokenizer

COMMON = ["--context-length", "32", "--batch-size", "2", "--eval-freq", "2", "--eval-iter", "1", "--no-progress",
          "--start-context", "Every effort moves you", "--lr", "1e-3", "--train-ratio", "0.05"]  # a 6-step epoch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-weights")
    vocab = write_qwen_tokenizer(folder)
    cfg = Qwen3Config(vocab_size=vocab, context_length=128, emb_dim=32, n_heads=4, n_kv_groups=2, head_dim=8,
                      n_layers=2, hidden_dim=48)
    gptjax.save_weights(gptjax.init_params(cfg, seed=1), cfg, folder, format="hf", overwrite=True)
    return folder


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    """The same run straight to step 6, and stopped at 3 then resumed."""
    base = tmp_path_factory.mktemp("runs")
    whole, parts = base / "whole", base / "parts"
    assert train_main(["--weights", str(folder), *COMMON, "--max-steps", "6", "--out", str(whole)]) == 0
    assert train_main(["--weights", str(folder), *COMMON, "--max-steps", "3", "--out", str(parts)]) == 0
    assert train_main(["--resume", str(parts), "--max-steps", "6", "--no-progress"]) == 0
    return whole, parts


def test_trains_on_the_models_own_tokens(folder, runs):
    whole, _ = runs
    config = json.loads((whole / "config.json").read_text())
    assert config["model"]["family"] == "qwen3" and config["model"]["context_length"] == 32
    assert config["data"]["tokenizer"] == str((whole / "tokenizer").absolute())
    assert sorted(p.name for p in (whole / "tokenizer").iterdir()) == [
        "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    # The batches are the-verdict in Qwen's tokens (not GPT-2's, which would give other counts).
    split = dict(context_length=32, batch_size=2, train_ratio=0.05)
    train, val = build_loaders(DataSource(), **split, tokenizer=load_tokenizer(folder))
    assert (config["train_batches"], config["val_batches"]) == (len(train), len(val)) and len(train) == 6
    assert len(build_loaders(DataSource(), **split)[1]) != len(val)
    losses = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train_loss"] for r in losses if "train_loss" in r]
    assert len(train_losses) >= 3 and all(np.isfinite(train_losses)) and train_losses[-1] < train_losses[0]
    # The epoch's greedy sample, decoded by the model's tokenizer.
    assert "Every effort moves you" in (whole / "samples.txt").read_text()
    assert (whole / "samples.txt").read_text() == (runs[1] / "samples.txt").read_text()


def test_resumes_exactly(runs):
    whole, parts = runs
    a, _ = load_weights(whole)
    b, _ = load_weights(parts)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_generate_reads_the_run(runs, capsys):
    whole, _ = runs
    assert generate_main(["--weights", str(whole), "--prompt", "I HAD always", "--temperature", "0",
                          "--max-new-tokens", "5"]) == 0
    params, cfg = load_weights(whole)
    tokenizer, _ = model_text(cfg, whole / "tokenizer")
    ids = tokenizer.encode("I HAD always")
    want = gptjax.generate(params, cfg, np.asarray([ids]), 5)[0]
    assert capsys.readouterr().out == tokenizer.decode(want) + "\n"


@pytest.mark.parametrize("extra,message", [
    (["--drop-rate", "0.1"], "Qwen3Config has no --drop-rate setting (the model has no such part)"),
    (["--context-length", "4096"], "--context-length must be in 1..128"),
    (["--data-dir", "."], "--data-dir, --train-tokens and --val-tokens hold GPT-2 tokens"),
])
def test_bad_settings_for_a_family_model(folder, tmp_path, capsys, extra, message):
    assert train_main(["--weights", str(folder), "--max-steps", "1", "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def test_a_family_preset_needs_a_tokenizer(tmp_path, capsys):
    assert train_main(["--model", "qwen3-0.6b", "--max-steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert "a qwen3 model trains on its own tokenizer's tokens: give --tokenizer DIR" in capsys.readouterr().err


def test_evaluate_scores_the_run_on_its_own_tokens(runs, capsys):
    from gptjax.cli.evaluate import main as evaluate_main
    from gptjax.training import calc_loss_loader

    whole, _ = runs
    assert evaluate_main(["--weights", str(whole), "--train-ratio", "0.05", "--batch-size", "2"]) == 0
    params, cfg = load_weights(whole)
    _, val = build_loaders(DataSource(), context_length=32, batch_size=2, train_ratio=0.05, shuffle=False,
                           tokenizer=load_tokenizer(whole / "tokenizer"))
    assert f"val   loss {calc_loss_loader(params, cfg, val):.3f}" in capsys.readouterr().out
