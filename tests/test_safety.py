"""Nothing lost, nothing overwritten (issue #12): writers that keep what they did not write, per-file configs,
training that survives SIGINT/SIGTERM, ordinary file modes, and errors in the words of the flags."""

import argparse
import importlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

import gptjax
from gptjax import GPTConfig, load_weights, save_weights
from gptjax.checkpoint import latest_step
from gptjax.cli.convert import main as convert_main
from gptjax.cli.train import main as train_main
from gptjax.training import TrainConfig
from tests.test_train_cli import STORY, TINY, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
CFG = GPTConfig(vocab_size=300, context_length=8, emb_dim=64, n_layers=1, n_heads=4, qkv_bias=False)
TIMING = {"tokens_per_sec", "mfu"}  # wall-clock figures: the only fields an interrupted run may change


@pytest.fixture(scope="module")
def params():
    return gptjax.init_params(CFG, seed=0)


def same(a, b):
    a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def tied(p):
    """OpenAI's format ties the output head to the token embedding."""
    return {**p, "out_head": {"kernel": p["tok_emb"]["embedding"].T}}


def listing(folder):
    """Every path under ``folder``, but not inside orbax's ``params/`` (whose file names are content hashes)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if "params" not in p.parent.parts)


# ---------------------------------------------------------------------------------------------
# 1. Writers never delete what they did not write


@pytest.mark.parametrize("fmt,name", [("gptjax", "out"), ("hf", "out"), ("openai", "out"), ("torch", "out.pth")])
def test_save_into_an_existing_destination_needs_overwrite_and_keeps_other_files(fmt, name, params, tmp_path):
    p1, p2 = tied(params), tied(gptjax.init_params(CFG, seed=1))
    dest = tmp_path / name
    save_weights(p1, CFG, dest, format=fmt)
    if dest.is_dir():  # the user's own files beside the weights
        (dest / "tokenizer.json").write_text("{}")
        (dest / "notes").mkdir()
        (dest / "notes" / "a.txt").write_text("mine")
    before = listing(tmp_path)
    with pytest.raises(ValueError, match=r"already exists; pass overwrite=True to replace it"):
        save_weights(p2, CFG, dest, format=fmt)
    assert listing(tmp_path) == before and same(load_weights(dest)[0], p1)
    save_weights(p2, CFG, dest, format=fmt, overwrite=True)
    assert listing(tmp_path) == before  # the same files: only the weights and their config were replaced
    assert same(load_weights(dest)[0], p2)
    if dest.is_dir():
        assert (dest / "tokenizer.json").read_text() == "{}" and (dest / "notes" / "a.txt").read_text() == "mine"


def test_convert_refuses_an_existing_destination_in_one_line(params, tmp_path, capsys):
    save_weights(params, CFG, tmp_path / "a.pth")
    hf = tmp_path / "existing_hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text("{}")
    (hf / "sub").mkdir()
    save_weights(gptjax.init_params(CFG, seed=1), CFG, hf, format="hf", overwrite=True)
    capsys.readouterr()
    for dst, fmt in ((hf, ["--format", "hf"]), (tmp_path / "a.pth", [])):
        assert convert_main([str(tmp_path / "a.pth"), str(dst), *fmt]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {dst} already exists; pass --overwrite to replace it\n"  # the library's terms, as flags
    assert convert_main([str(tmp_path / "a.pth"), str(hf), "--format", "hf", "--overwrite"]) == 0
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors", "sub", "tokenizer.json"]
    assert same(load_weights(hf)[0], params)


# ---------------------------------------------------------------------------------------------
# 2. A config file that belongs to one weights file


def test_each_pth_has_its_own_config(params, tmp_path):
    other = CFG.replace(n_heads=2)
    save_weights(params, CFG, tmp_path / "a.pth")
    save_weights(params, other, tmp_path / "b.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.config.json", "a.pth", "b.config.json", "b.pth"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no head count assumed: each file has its config
        assert load_weights(tmp_path / "a.pth")[1] == CFG
        assert load_weights(tmp_path / "b.pth")[1] == other


def test_plain_config_json_is_read_only_when_it_matches(params, tmp_path):
    from gptjax.weights.mapping import AssumedHeadsWarning

    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pth"
    torch.save(gptjax.to_torch_state_dict(params, CFG), path)
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_dict()))  # the book's GPT_CONFIG dict, by hand
    assert load_weights(path)[1] == CFG
    # Another model's config.json (a different context length) is not this file's: 64-wide heads, one notice.
    (tmp_path / "config.json").write_text(json.dumps(CFG.replace(context_length=32).to_dict()))
    with pytest.warns(AssumedHeadsWarning) as caught:
        assert load_weights(path)[1] == CFG.replace(n_heads=1)
    assert len(caught) == 1
    assert str(caught[0].message) == (f"torch checkpoint {path} holds no head count: assuming 1 head of 64 (GPT-2's "
                                      "head size); if that is wrong, pass the head count as cfg.n_heads")
    assert load_weights(path, cfg=CFG)[1] == CFG  # cfg= overrides it, without a notice


def test_own_config_contradicting_the_tensors_is_named(params, tmp_path):
    save_weights(params, CFG, tmp_path / "model.pth")
    (tmp_path / "model.config.json").write_text(json.dumps({"format": "gptjax",
                                                            "model": CFG.replace(context_length=32).to_dict()}))
    with pytest.raises(ValueError, match=r"its config file .*model.config.json says context_length=32, but the "
                                         r"tensors have context_length=8; that config belongs to other weights"):
        load_weights(tmp_path / "model.pth")


def test_n_heads_flag_completes_a_pth_without_config(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    cfg = CFG.replace(emb_dim=48, n_heads=3)  # no multiple of 64: nothing can be assumed
    params = gptjax.init_params(cfg, seed=0)
    torch.save(gptjax.to_torch_state_dict(params, cfg), tmp_path / "m.pth")
    assert convert_main([str(tmp_path / "m.pth"), str(tmp_path / "out")]) == 2
    assert "is not a multiple of GPT-2's head size 64; pass the head count as --n-heads" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "m.pth"), str(tmp_path / "out"), "--n-heads", "3"]) == 0
    assert load_weights(tmp_path / "out")[1] == cfg
    save_weights(params, cfg, tmp_path / "with_config.pth")
    assert convert_main([str(tmp_path / "with_config.pth"), str(tmp_path / "x"), "--n-heads", "4"]) == 2
    assert "--n-heads 4 does not match SRC" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 3. Training survives interruption

RUN_FLAGS = [*TINY, "--epochs", "3", "--eval-freq", "7", "--eval-iter", "1"]


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "long.txt"
    path.write_text(STORY * 20, encoding="utf-8")  # 15 steps per epoch of 2 x 16 tokens
    return path


@pytest.fixture(scope="module")
def reference_run(long_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert train_main([*RUN_FLAGS, "--corpus", str(long_corpus), "--out", str(out)]) == 0
    return out


def without_timing(path):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(path)]


def assert_same_run(a, b):
    assert without_timing(a / "metrics.jsonl") == without_timing(b / "metrics.jsonl")
    assert (a / "samples.txt").read_text() == (b / "samples.txt").read_text()


def test_sigint_and_sigterm_save_and_resume_exactly(reference_run, long_corpus, tmp_path, capsys):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".cache" / "jax"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    rng = random.Random()
    runs = {}
    for signum in (signal.SIGINT, signal.SIGTERM):  # both at once: the compiles overlap
        out = tmp_path / signum.name
        argv = [sys.executable, "-m", "gptjax.train", *RUN_FLAGS, "--corpus", str(long_corpus), "--out", str(out)]
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[signum] = (out, proc, rng.randint(2, 20))
    total = len([r for r in read_jsonl(reference_run / "metrics.jsonl") if "loss" in r])
    pending = dict(runs)
    deadline = time.monotonic() + 240
    while pending and time.monotonic() < deadline:
        for signum, (out, proc, k) in list(pending.items()):
            lines = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").exists() else 0
            if lines >= k or proc.poll() is not None:
                proc.send_signal(signum)
                del pending[signum]
        time.sleep(0.01)
    for signum, (out, proc, k) in runs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 128 + signum, err
        saved = latest_step(out)
        steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
        assert 0 < saved < total and len(steps) == saved  # it stopped after the step under way, and saved it
        assert err.splitlines()[-1] == (f"stopped by {signum.name} after step {saved}, with a checkpoint there; "
                                        f"continue with: python -m gptjax.train --resume {out}")
        assert train_main(["--resume", str(out), "--no-progress"]) == 0
        assert_same_run(out, reference_run)


def test_a_second_signal_aborts_at_once():
    from gptjax.runs import StopSignals

    previous = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGINT)
        assert signals.signum == signal.SIGINT  # the first only asks the loop to stop
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_run_without_a_checkpoint_resumes_from_step_0(reference_run, tmp_path):
    # As a kill -9 before the first save leaves it: the settings and a few log lines, no checkpoint.
    out = tmp_path / "killed"
    out.mkdir()
    shutil.copy(reference_run / "config.json", out / "config.json")
    (out / "metrics.jsonl").write_text("".join((reference_run / "metrics.jsonl").read_text().splitlines(True)[:5]))
    assert train_main([*TINY, "--out", str(out)]) == 2  # a new run may not go there ...
    assert train_main(["--resume", str(out), "--no-progress"]) == 0  # ... but it resumes, from step 0
    assert_same_run(out, reference_run)


def test_periodic_saves_by_time_bounded_by_keep(long_corpus, tmp_path):
    assert TrainConfig().save_minutes == 10  # the default run saves at least every ten minutes
    out = tmp_path / "run"
    assert train_main([*TINY, "--corpus", str(long_corpus), "--start-context", "", "--max-steps", "6",
                       "--save-minutes", "0.000001", "--keep", "2", "--out", str(out)]) == 0
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [5, 6]  # a save after every step
    assert train_main([*TINY, "--corpus", str(long_corpus), "--save-minutes", "-1", "--out", str(tmp_path / "b")]) == 2


# ---------------------------------------------------------------------------------------------
# 4. --out naming a folder that is not a run


def test_out_folder_with_other_files_is_refused(long_corpus, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"meow")
    assert train_main([*TINY, "--corpus", str(long_corpus), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: --out {out} is a folder with other files in it, not a gptjax run; "
                                       "give a new or empty folder (a run writes several files there)\n")
    assert listing(out) == ["cat.jpg"]


# ---------------------------------------------------------------------------------------------
# 5. Ordinary, umask-respecting modes


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_files_and_folders_get_ordinary_modes(umask, params, long_corpus, tmp_path):
    old = os.umask(umask)
    try:
        for fmt, name in (("gptjax", "g"), ("hf", "h"), ("openai", "o"), ("torch", "t.pth")):
            save_weights(tied(params), CFG, tmp_path / "w" / name, format=fmt)
        assert train_main([*TINY, "--corpus", str(long_corpus), "--max-steps", "2", "--start-context", "",
                           "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    for root in (tmp_path / "w", tmp_path / "run"):
        for p in [root, *root.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(p.stat().st_mode) == want, f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))}"


# ---------------------------------------------------------------------------------------------
# 7. Errors name the flags; every flag says its default


def test_training_errors_name_the_flag(long_corpus, tmp_path, capsys):
    for flags, message in ((["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                           (["--eval-iter", "0"], "--eval-iter must be at least 1, got 0"),
                           (["--min-lr", "1"], "--min-lr must be between 0 and --lr (0.0004), got 1.0"),
                           (["--context-length", "0"], "--context-length must be a positive integer, got 0")):
        assert train_main([*TINY, "--corpus", str(long_corpus), *flags, "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["gptjax.cli.convert", "gptjax.cli.download", "gptjax.cli.evaluate",
                                  "gptjax.cli.generate", "gptjax.cli.train"])
def test_every_flag_has_help_with_its_default(name):
    parser = importlib.import_module(name).build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        text = action.help or ""
        assert "default" in text or "required" in text, f"{name} {action.option_strings[0]}: {text!r}"


# ---------------------------------------------------------------------------------------------
# 8. The README says what the disk holds and where runs go


def test_training_docs_cover_disk_use_and_run_names():
    # The training section moved from the README to docs/training.md (#19).
    readme = (ROOT / "docs" / "training.md").read_text()
    assert "## Disk use" in readme and "--keep" in readme and "--save-minutes" in readme
    # Every run folder an example reads was made by an example before it.
    for line in readme.splitlines():
        if "--weights runs/" in line:
            run = line.split("--weights ")[1].split()[0]
            assert f"--out {run}" in readme[: readme.index(line)], line
