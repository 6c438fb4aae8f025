"""Every tool that reads weights takes a Hugging Face model id as it takes a folder (issue 24).

A tiny GPT-2 is written as a Hugging Face folder and placed, as huggingface_hub lays it out, in a temporary
HF_HUB_CACHE; each tool then runs, with HF_HUB_OFFLINE=1, on the id, on the folder and on an id the cache
lacks. One subprocess runs every tool's ``main`` in turn (huggingface_hub reads HF_HUB_CACHE as it is
imported), so the environment is the user's and jax starts once.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import gptjax
from gptjax import GPTConfig, save_weights
from gptjax.checkpoint import load_params
from gptjax.qwen3 import Qwen3Config
from tests.family_files import write_qwen_tokenizer

ROOT = Path(__file__).resolve().parent.parent
# GPT-2's vocabulary (generate needs the tokenizer's), everything else tiny.
CFG = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.0)
MODEL_ID = "someone/tiny-gpt2"
QWEN_ID = "someone/tiny-qwen3"  # a family whose tokenizer files come with its weights
MISSING_ID = "someone/not-cached"
STORY = "Every effort moves you a little closer to the picture you meant to paint. " * 16

# Run in the child: each job is (tool module, argv); prints each one's exit code, stdout and stderr as JSON.
CHILD = """
import contextlib, importlib, io, json, sys
results = []
for module, argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = importlib.import_module(module).main(argv)
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def tools(weights: str, out: Path, corpus: Path) -> list:
    return [
        ("gptjax.cli.generate", ["--weights", weights, "--prompt", "Every effort", "--max-new-tokens", "3",
                                 "--temperature", "0"]),
        ("gptjax.cli.evaluate", ["--weights", weights, "--corpus", str(corpus)]),
        ("gptjax.cli.convert", [weights, str(out / "converted")]),
        ("gptjax.cli.train", ["--init-from", weights, "--corpus", str(corpus), "--batch-size", "2",
                              "--max-steps", "1", "--no-shuffle", "--start-context", "", "--no-progress",
                              "--out", str(out / "run")]),
    ]


NAMES = ["generate", "evaluate", "convert", "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    folder = tmp / "tiny-gpt2"
    save_weights(gptjax.init_params(CFG, seed=3), CFG, folder, format="hf")
    qwen = tmp / "tiny-qwen3"
    qwen_cfg = Qwen3Config(vocab_size=write_qwen_tokenizer(qwen), context_length=16, emb_dim=32, n_heads=2,
                           n_kv_groups=1, head_dim=16, n_layers=1, hidden_dim=48, tie_embeddings=False)
    save_weights(gptjax.init_params(qwen_cfg, seed=3), qwen_cfg, qwen, format="hf", overwrite=True)
    cache = tmp / "hf-cache"
    for model_id, source in ((MODEL_ID, folder), (QWEN_ID, qwen)):
        repo = cache / ("models--" + model_id.replace("/", "--"))
        shutil.copytree(source, repo / "snapshots" / "0123abcd")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abcd")
    corpus = tmp / "story.txt"
    corpus.write_text(STORY, encoding="utf-8")
    jobs, outs = [], {}
    for kind, weights in (("id", MODEL_ID), ("folder", str(folder)), ("missing", MISSING_ID)):
        outs[kind] = tmp / kind
        outs[kind].mkdir()
        jobs += tools(weights, outs[kind], corpus)
    jobs += [("gptjax.cli.generate", ["--weights", weights, "--prompt", "Every effort", "--max-new-tokens", "3",
                                      "--temperature", "0", "--eos"]) for weights in (QWEN_ID, str(qwen))]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    n = len(NAMES)
    by_kind = {kind: dict(zip(NAMES, results[i * n:(i + 1) * n])) for i, kind in enumerate(("id", "folder", "missing"))}
    by_kind["qwen3"] = dict(zip(("id", "folder"), results[3 * n:]))
    return by_kind, outs, cache, folder


def ok(result):
    assert result["code"] == 0, result["err"]
    return result


def test_generate_decodes_the_id_as_the_folder(runs):
    by_kind, *_ = runs
    got, want = ok(by_kind["id"]["generate"]), ok(by_kind["folder"]["generate"])
    assert got["out"].startswith("Every effort") and len(got["out"]) > len("Every effort\n")
    assert got["out"] == want["out"]


def test_a_qwen3_id_generates_as_its_folder_with_its_own_tokenizer(runs):
    by_kind, *_ = runs
    got, want = ok(by_kind["qwen3"]["id"]), ok(by_kind["qwen3"]["folder"])
    assert got["out"].startswith("Every effort") and got["out"] == want["out"]


def test_evaluate_gives_the_ids_losses_as_the_folders(runs):
    by_kind, _, _, folder = runs
    got, want = ok(by_kind["id"]["evaluate"]), ok(by_kind["folder"]["evaluate"])
    assert got["out"].startswith(f"weights {MODEL_ID}: ")
    assert got["out"].split(": ", 1)[1] == want["out"].split(": ", 1)[1]  # the config, context and losses
    assert "loss" in got["out"]


def test_convert_writes_the_ids_weights(runs):
    by_kind, outs, *_ = runs
    ok(by_kind["id"]["convert"]), ok(by_kind["folder"]["convert"])
    got, got_cfg = load_params(outs["id"] / "converted")
    want, want_cfg = load_params(outs["folder"] / "converted")
    assert got_cfg == want_cfg and got_cfg.replace(drop_rate=CFG.drop_rate) == CFG  # no format keeps drop_rate
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_init_from_the_id_starts_as_from_the_folder(runs):
    by_kind, outs, *_ = runs
    ok(by_kind["id"]["train"]), ok(by_kind["folder"]["train"])
    config = json.loads((outs["id"] / "run" / "config.json").read_text())
    assert config["data"]["init_from"] == MODEL_ID  # as typed: a resumed run resolves it through the cache again
    got = [json.loads(line) for line in (outs["id"] / "run" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (outs["folder"] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert got[0]["loss"] == want[0]["loss"]


@pytest.mark.parametrize("name", NAMES)
def test_an_uncached_id_is_one_line_naming_the_cache(runs, name):
    by_kind, outs, cache, _ = runs
    result = by_kind["missing"][name]
    assert result["code"] == 2 and result["out"] == ""
    lines = result["err"].splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {MISSING_ID}: ")
    assert str(cache) in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert list(outs["missing"].iterdir()) == []  # nothing half-written


def test_a_name_that_is_neither_a_path_nor_an_id_names_the_flag(tmp_path, monkeypatch):
    from gptjax.cli import is_hub_id_flag, load_weights_flag

    missing = tmp_path / "no-such-model.pth"
    with pytest.raises(FileNotFoundError, match=f"--init-from {missing}: no such file or directory, nor a "):
        load_weights_flag(str(missing), None, flag_name="--init-from")
    assert is_hub_id_flag("gpt2-xl") and is_hub_id_flag(MODEL_ID) and not is_hub_id_flag(str(missing))
    local = tmp_path / "owner" / "name"  # an existing path shaped like an id is the path
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id_flag("owner/name")
