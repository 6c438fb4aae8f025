"""``python -m gptjax.train`` end to end on a tiny model: the run directory, exact resume, errors."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import gptjax.training
from gptjax.checkpoint import latest_step, load_params, save_params
from gptjax.config import GPT_CONFIG_124M, GPTConfig
from gptjax.presets import config_from_dict
from gptjax.cli.train import build_parser, main
from gptjax.runs import RunSettings, resume_run, start_run
from gptjax.training import TrainConfig, calc_loss_batch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--emb-dim", "32", "--n-layers", "1", "--n-heads", "2", "--context-length", "16", "--batch-size", "2",
        "--no-progress"]
STORY = (
    "Every effort moves you a little closer to the picture you meant to paint. The studio was quiet, and the "
    "light fell across the unfinished canvas while Gisburn looked at it for a long time without a word. "
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "story.txt"
    path.write_text(STORY * 5, encoding="utf-8")  # 1,150 characters: 6 training batches of 2 x 16 tokens
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


TIMING = ("tokens_per_sec", "mfu")  # measured, so never the same twice


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def train_cli(*args):
    return main([*TINY, *map(str, args)])


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    assert train_cli("--corpus", corpus, "--epochs", 2, "--eval-freq", 3, "--eval-iter", 2, "--save-every", 4,
                     "--out", out, "--peak-tflops", 0.001) == 0
    return out


def test_run_directory_has_every_file(full_run, corpus):
    config = json.loads((full_run / "config.json").read_text())
    assert config_from_dict(config["model"]) == GPT_CONFIG_124M.replace(
        emb_dim=32, n_layers=1, n_heads=2, context_length=16)
    train = TrainConfig.from_dict(config["train"])
    assert (train.epochs, train.batch_size, train.stride, train.lr, train.weight_decay) == (2, 2, 16, 4e-4, 0.1)
    assert config["data"]["corpus"] == str(corpus)
    n = config["steps_per_epoch"]
    assert n == 6

    records = read_jsonl(full_run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(2 * n))
    assert set(steps[0]) == {"step", "epoch", "loss", "tokens_seen", "lr", "grad_norm", *TIMING}
    assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] for r in steps)  # against --peak-tflops
    assert [r["epoch"] for r in steps] == [1] * n + [2] * n
    assert [r["tokens_seen"] for r in steps] == [32 * (s + 1) for s in range(2 * n)]
    assert all(r["lr"] == pytest.approx(4e-4) for r in steps)
    assert [r["step"] for r in evals] == [0, 3, 6, 9]
    assert set(evals[0]) == {"step", "epoch", "tokens_seen", "train_loss", "val_loss"}
    assert steps[-1]["loss"] < steps[0]["loss"]

    samples = (full_run / "samples.txt").read_text().splitlines()
    assert len(samples) == 2
    assert samples[0].startswith(f"Ep 1 (Step {n - 1:06d}): Every effort moves you")
    assert samples[1].startswith(f"Ep 2 (Step {2 * n - 1:06d}): Every effort moves you")

    assert (full_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(int(p.name) for p in (full_run / "checkpoints").iterdir()) == [4, 8, 12]  # every 4, the end
    params, cfg = load_params(full_run)
    assert cfg.emb_dim == 32 and params["tok_emb"]["embedding"].shape == (50257, 32)


def test_stop_and_resume_is_bitwise_identical(full_run, corpus, tmp_path, capsys):
    out = tmp_path / "stopped"
    assert train_cli("--corpus", corpus, "--epochs", 2, "--eval-freq", 3, "--eval-iter", 2, "--save-every", 4,
                     "--out", out, "--max-steps", 6) == 0
    assert latest_step(out) == 6
    # As if the process had died after step 5 (the end of epoch 1), before its save: resuming from
    # step 4 must redo steps 4 and 5 and the epoch's sample without repeating their lines.
    import shutil

    shutil.rmtree(out / "checkpoints" / "6")
    assert max(r["step"] for r in read_jsonl(out / "metrics.jsonl")) == 5
    assert len((out / "samples.txt").read_text().splitlines()) == 1
    capsys.readouterr()
    assert main(["--resume", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resuming" in printed and "tokens/s on average" in printed.splitlines()[-1]
    assert all(r["mfu"] is None for r in read_jsonl(out / "metrics.jsonl") if "loss" in r)  # no peak known for a CPU
    assert without_timing(read_jsonl(out / "metrics.jsonl")) == without_timing(read_jsonl(full_run / "metrics.jsonl"))
    assert (out / "samples.txt").read_text() == (full_run / "samples.txt").read_text()
    for a, b in zip(jax.tree_util.tree_leaves(load_params(out)[0]), jax.tree_util.tree_leaves(load_params(full_run)[0])):
        np.testing.assert_array_equal(a, b)


def test_the_library_runs_and_resumes_what_the_command_line_does(full_run, tmp_path):
    """gptjax.runs is the command line's run without the flags: the full run's recorded settings, started with
    start_run, stopped by max_steps and continued with resume_run, give the command line's records."""
    settings = RunSettings.from_config(json.loads((full_run / "config.json").read_text()))
    out = start_run(dataclasses.replace(settings, tcfg=settings.tcfg.replace(max_steps=5)), out_dir=tmp_path / "lib",
                    progress=False)
    assert latest_step(out) == 5
    with pytest.raises(ValueError, match="already holds a run"):
        start_run(settings, out_dir=out)
    assert resume_run(out, progress=False) == out
    assert without_timing(read_jsonl(out / "metrics.jsonl")) == without_timing(read_jsonl(full_run / "metrics.jsonl"))
    assert (out / "samples.txt").read_text() == (full_run / "samples.txt").read_text()


@pytest.mark.parametrize("fmt", ["gptjax", "torch"])
def test_init_from_weights_takes_their_config(fmt, corpus, tmp_path):
    cfg = GPTConfig(context_length=16, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.1)
    params = gptjax.init_params(cfg, seed=5)
    if fmt == "gptjax":
        weights, arch = tmp_path / "weights", []
        save_params(params, cfg, weights)
    else:  # the book's torch.save(model.state_dict()); the head count is not in the shapes: give it
        import torch

        weights = tmp_path / "model.pth"
        torch.save(gptjax.to_torch_state_dict(params, cfg), weights)
        arch = ["--context-length", "16", "--emb-dim", "32", "--n-layers", "1", "--n-heads", "2"]
    out = tmp_path / "run"
    assert main(["--init-from", str(weights), *arch, "--drop-rate", "0", "--no-shuffle", "--corpus", str(corpus),
                 "--batch-size", "2", "--max-steps", "1", "--start-context", "", "--out", str(out),
                 "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config_from_dict(config["model"]) == cfg.replace(drop_rate=0.0)
    assert config["data"]["init_from"] == str(weights)
    train_loader, _ = RunSettings.from_config(config).loaders()
    x, y = next(iter(train_loader))
    first = read_jsonl(out / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(float(calc_loss_batch(params, cfg, x, y)), abs=1e-6)


def test_dtype_and_remat_flags_reach_the_train_step(corpus, tmp_path, monkeypatch):
    seen = []
    real = gptjax.training.make_train_step

    def recording_factory(*args, **kwargs):
        seen.append((kwargs["dtype"], kwargs["remat"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(gptjax.training, "make_train_step", recording_factory)
    out = tmp_path / "run"
    assert train_cli("--corpus", corpus, "--dtype", "bfloat16", "--remat", "--max-steps", 2, "--start-context", "",
                     "--out", out) == 0
    assert seen == [(jax.numpy.bfloat16, True)]
    train = TrainConfig.from_dict(json.loads((out / "config.json").read_text())["train"])
    assert (train.dtype, train.remat) == ("bfloat16", True)  # and so a resumed run keeps them
    assert all(np.isfinite(r["loss"]) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    real = gptjax.training.make_train_step

    def poisoned_factory(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def poisoned(params, opt_state, batch, key):
            calls.append(1)
            if len(calls) == 6:  # step 5 runs on NaN parameters
                params = jax.tree_util.tree_map(lambda a: a * np.nan, params)
            return step(params, opt_state, batch, key)

        return poisoned

    monkeypatch.setattr(gptjax.training, "make_train_step", poisoned_factory)
    out = tmp_path / "run"
    assert train_cli("--corpus", corpus, "--save-every", 2, "--out", out) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the loss is nan") and "step 5" in err and "\n" not in err
    assert latest_step(out) == 4
    assert max(r["step"] for r in read_jsonl(out / "metrics.jsonl")) == 4


def run_error(capsys, *argv):
    code = main([*map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_a_one_line_error(corpus, full_run, tmp_path, capsys):
    assert "not found" in run_error(capsys, *TINY, "--corpus", tmp_path / "missing.txt", "--out", tmp_path / "a")
    short = tmp_path / "short.txt"
    short.write_text("Every effort moves you.")
    err = run_error(capsys, *TINY, "--corpus", short, "--out", tmp_path / "b")
    assert "training split" in err and "smaller --context-length" in err and "_length" not in err
    assert "validation split" in run_error(capsys, *TINY, "--corpus", corpus, "--train-ratio", "0.99",
                                           "--out", tmp_path / "c")
    assert "--batch-size" in run_error(capsys, *TINY, "--corpus", corpus, "--batch-size", "64", "--out", tmp_path / "d")
    assert "unknown preset" in run_error(capsys, "--preset", "gpt5", "--out", tmp_path / "e")
    assert "divisible" in run_error(capsys, *TINY, "--n-heads", "3", "--out", tmp_path / "f")
    assert "--resume" in run_error(capsys, *TINY, "--corpus", corpus, "--out", full_run)
    assert "--lr cannot change" in run_error(capsys, "--resume", full_run, "--lr", "0.1")
    assert "not a gptjax run directory" in run_error(capsys, "--resume", tmp_path)
    # The library names its parameter (data_dir); the command line says the flag the user typed.
    assert f"--data-dir {tmp_path} holds neither" in run_error(capsys, *TINY, "--data-dir", tmp_path, "--out",
                                                               tmp_path / "g")
    assert "--peak-tflops" in run_error(capsys, *TINY, "--corpus", corpus, "--peak-tflops", "0", "--out", tmp_path / "h")
    assert not (tmp_path / "h").exists()
    assert "--train-tokens" in run_error(capsys, *TINY, "--train-tokens", tmp_path / "x.bin", "--out", tmp_path / "h")


def test_defaults_are_the_books_experiment():
    assert build_parser().parse_args([]).__dict__ == {}  # nothing given: every setting takes its default
    d = TrainConfig()
    assert (d.batch_size, d.train_ratio, d.epochs, d.lr, d.weight_decay) == (2, 0.9, 10, 4e-4, 0.1)
    assert (d.eval_freq, d.eval_iter, d.start_context, d.seed, d.shuffle) == (5, 5, "Every effort moves you", 123, True)
    assert d.stride is None  # = context length


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "gptjax.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--corpus", "--preset", "--context-length", "--emb-dim", "--n-layers", "--n-heads", "--drop-rate",
                 "--qkv-bias", "--batch-size", "--stride", "--train-ratio", "--epochs", "--max-steps", "--lr",
                 "--weight-decay", "--warmup-steps", "--min-lr", "--grad-clip", "--grad-accum", "--eval-freq",
                 "--eval-iter", "--start-context", "--seed", "--no-shuffle", "--out", "--save-every", "--keep",
                 "--resume", "--init-from", "--train-tokens", "--val-tokens", "--data-dir", "--dtype", "--remat"):
        assert flag in out
