"""``python -m gptjax.prepare``: jsonl, parquet, saved datasets and text into llm.c shards; workers, resume, errors;
and training on a shard folder through ``python -m gptjax.train --data-dir``."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

import gptjax.cli.prepare as prepare_cli
import gptjax.corpus as prepare
from gptjax.data import load_data_dir
from gptjax.tokenizer import ENDOFTEXT_ID, get_tokenizer

# Forking after jax started its threads warns; the workers use only tiktoken and numpy.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

DOCS = [f"Document {i}. " + "Every effort moves you, <|endoftext|> said Gisburn.\n\nThe  end.\n" * (i % 4)
        for i in range(120)] + ["", "last"]


def llmc_shard(path):
    """An llm.c shard read as llm.c's own loader checks it (dev/data/data_common.py's format)."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520, path
    assert header[1] == 1, path
    tokens = np.fromfile(path, dtype=np.uint16, offset=256 * 4)
    assert len(tokens) == header[2], path
    return tokens


def reference(docs):
    """tiktoken's GPT-2 encoding of the documents joined by <|endoftext|>."""
    enc = get_tokenizer()
    ids = []
    for i, d in enumerate(docs):
        ids += ([ENDOFTEXT_ID] if i else []) + enc.encode_ordinary(d)
    return np.array(ids)


def all_tokens(out):
    files = sorted(Path(out).glob("*_val_*.bin")) + sorted(Path(out).glob("*_train_*.bin"))
    return np.concatenate([llmc_shard(f) for f in files]), [f.name for f in files]


def run(*args):
    return prepare_cli.main([*map(str, args), "--no-progress"])


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 700)  # many tasks, so the order across workers is exercised


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
            if i == 3:
                f.write("\n")  # a blank line is no document


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_becomes_llmc_shards_equal_to_tiktoken(tmp_path, small_chunks, suffix, capsys):
    path = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl.zst":
        import zstandard

        write_jsonl(path, DOCS, lambda p, mode, encoding: zstandard.open(p, mode, encoding=encoding))
    else:
        write_jsonl(path, DOCS, gzip.open if suffix.endswith(".gz") else open)
    out = tmp_path / "out"
    assert run(path, "--out", out, "--name", "corpus", "--shard-tokens", 900, "--val-tokens", 300, "--workers", 2) == 0
    tokens, names = all_tokens(out)
    want = reference(DOCS)
    np.testing.assert_array_equal(tokens, want)
    assert names[0] == "corpus_val_000000.bin" and names[1:] == [f"corpus_train_{i:06d}.bin"
                                                                  for i in range(1, len(names))]
    sizes = [len(llmc_shard(out / n)) for n in names]
    assert sizes[0] == 300 and all(s == 900 for s in sizes[1:-1]) and 0 < sizes[-1] <= 900
    assert f"{len(DOCS):,} documents, {len(want):,} tokens" in capsys.readouterr().out
    # gptjax reads them back as one sequence per split
    train, val = load_data_dir(out)
    np.testing.assert_array_equal(np.concatenate([val[:], train[:]]), want)


def test_parquet_and_saved_dataset(tmp_path, small_chunks):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": DOCS, "n": list(range(len(DOCS)))}), path, row_group_size=17)
    assert run(path, "--out", tmp_path / "pq", "--text-field", "content", "--shard-tokens", 1000,
               "--val-tokens", 200, "--workers", 2) == 0
    np.testing.assert_array_equal(all_tokens(tmp_path / "pq")[0], reference(DOCS))

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS}),
                          "test": datasets.Dataset.from_dict({"text": DOCS[:5]})}).save_to_disk(saved)
    assert run(saved, "--out", tmp_path / "hf", "--shard-tokens", 1000, "--val-tokens", 200, "--workers", 1) == 0
    np.testing.assert_array_equal(all_tokens(tmp_path / "hf")[0], reference(DOCS))
    assert run(saved, "--split", "test", "--out", tmp_path / "hf_test", "--val-tokens", 10) == 0
    np.testing.assert_array_equal(all_tokens(tmp_path / "hf_test")[0], reference(DOCS[:5]))


def test_text_folder_large_file_cut_at_safe_newlines(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TEXT_BLOCK", 50)  # a "book" read in many small blocks
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 200)
    books = tmp_path / "books"
    books.mkdir()
    texts = ["Chapter 1\n\n  It was a dark night.\n\tNo one came.\nThe end \n" * 30, "Tiny book.", "A\nb\n\n\nc " * 40]
    for i, t in enumerate(texts):
        (books / f"b{i}.txt").write_text(t, encoding="utf-8")
    (books / "notes.md").write_text("not a book")
    assert run(books, "--out", tmp_path / "out", "--val-tokens", 50, "--workers", 2) == 0
    np.testing.assert_array_equal(all_tokens(tmp_path / "out")[0], reference(texts))


def test_one_and_two_workers_write_identical_bytes(tmp_path, small_chunks):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, DOCS)
    for w in (1, 2):
        assert run(path, "--out", tmp_path / f"w{w}", "--name", "c", "--shard-tokens", 700, "--val-tokens", 100,
                   "--workers", w) == 0
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir()) and len(files) > 4
    for name in files:
        if name.endswith(".bin"):
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_the_library_prepares_from_a_config_and_names_its_fields(tmp_path, small_chunks):
    """gptjax.corpus is the command line without argparse: a PrepareConfig writes the same shards, and its
    errors name the config's fields (the command line shows them as its flags)."""
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, DOCS)
    state = prepare.prepare(prepare.PrepareConfig(out=str(tmp_path / "lib"), inputs=(str(path),), shard_tokens=700,
                                                  val_tokens=100, workers=2, progress=False))
    assert run(path, "--out", tmp_path / "cli", "--name", "lib", "--shard-tokens", 700, "--val-tokens", 100) == 0
    assert [s["file"] for s in state["shards"]] == all_tokens(tmp_path / "cli")[1]
    for s in state["shards"]:
        assert (tmp_path / "lib" / s["file"]).read_bytes() == (tmp_path / "cli" / s["file"]).read_bytes()
    with pytest.raises(ValueError, match=r"PrepareConfig.workers must be a positive integer, got 0"):
        prepare.PrepareConfig(out=str(tmp_path / "x"), inputs=(str(path),), workers=0)


def test_interrupted_run_resumes_to_identical_bytes(tmp_path, small_chunks, monkeypatch):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, DOCS)
    common = ["--name", "c", "--shard-tokens", 650, "--val-tokens", 333, "--workers", 2]
    assert run(path, "--out", tmp_path / "full", *common) == 0
    full = {p.name: p.read_bytes() for p in (tmp_path / "full").glob("*.bin")}

    real, calls = prepare._write_manifest, []

    def dies_after_the_third_shard(mpath, state):
        real(mpath, state)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_write_manifest", dies_after_the_third_shard)
    out = tmp_path / "cut"
    assert run(path, "--out", out, *common) == 130
    kept = sorted(p.name for p in out.iterdir())
    assert kept == ["c.prepare.json", "c_train_000001.bin", "c_train_000002.bin", "c_val_000000.bin"]  # no temp
    monkeypatch.setattr(prepare, "_write_manifest", real)
    assert "already exists" in run_error(path, "--out", out, *common)
    assert run(path, "--out", out, *common, "--resume") == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.bin")} == full
    # a resumed run with other settings is refused
    assert "shard_tokens" in run_error(path, "--out", out, "--name", "c", "--shard-tokens", 651, "--val-tokens", 333,
                                       "--resume")


def test_overwrite_replaces_only_shards(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, DOCS)
    out = tmp_path / "out"
    assert run(path, "--out", out, "--name", "c", "--shard-tokens", 500, "--val-tokens", 100) == 0
    (out / "README.txt").write_text("mine")
    (out / "other_train_000001.bin").write_bytes(b"another corpus")
    write_jsonl(path, DOCS[:30])
    assert run(path, "--out", out, "--name", "c", "--shard-tokens", 500, "--val-tokens", 100, "--overwrite") == 0
    assert (out / "README.txt").read_text() == "mine"
    assert (out / "other_train_000001.bin").read_bytes() == b"another corpus"
    ours = sorted(out.glob("c_*.bin"))
    np.testing.assert_array_equal(np.concatenate([llmc_shard(f) for f in ours[-1:] + ours[:-1]]),
                                  reference(DOCS[:30]))  # no stale shard of the longer corpus


def run_error(*args, capsys=None):
    import io
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run(*args) == 2
    text = err.getvalue()
    assert text.startswith("error: ") and text.count("\n") == 1, text
    assert "PrepareConfig" not in text, text  # the library's field names, shown as the flags
    return text


def test_bad_input_is_one_line_naming_the_file_or_flag(tmp_path):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, DOCS[:5])
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    (tmp_path / "data.csv").write_text("a,b")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    out = tmp_path / "out"
    assert str(tmp_path / "missing.jsonl") in run_error(tmp_path / "missing.jsonl", "--out", out)
    err = run_error(good, nofield, "--out", out)
    assert str(nofield) in err and "'text'" in err and "body" in err and "--text-field" in err
    assert "data.csv" in run_error(tmp_path / "data.csv", "--out", out)
    assert "not UTF-8" in run_error(latin, "--out", out)
    assert "--workers" in run_error(good, "--out", out, "--workers", 0)
    assert "no input" in run_error("--out", out)
    assert "lower --val-tokens" in run_error(good, "--out", out)  # 100M default: nothing left to train on
    assert "--resume" in run_error(good, "--out", out, "--resume")
    assert not out.exists() or not any(out.glob("*.bin"))  # nothing half-written


# ---- training on shards ----

TINY = ["--emb-dim", "32", "--n-layers", "1", "--n-heads", "2", "--context-length", "16", "--batch-size", "2",
        "--no-progress", "--eval-freq", "2", "--eval-iter", "1", "--start-context", ""]


def test_llmc_shard_folder_trains_and_resumes_exactly(tmp_path):
    import jax
    from gptjax.checkpoint import load_params
    from gptjax.data import write_shard
    from gptjax.cli.train import main as train

    rng = np.random.default_rng(0)
    shards = tmp_path / "fineweb10B"
    write_shard(shards / "fineweb_val_000000.bin", rng.integers(0, 50257, 200))
    for i in (1, 2, 3):  # as llm.c's fineweb.py names them, windows crossing the shards
        write_shard(shards / f"fineweb_train_{i:06d}.bin", rng.integers(0, 50257, 150))
    args = [*TINY, "--data-dir", str(shards), "--epochs", "2", "--save-every", "3"]
    assert train([*args, "--out", str(tmp_path / "full")]) == 0
    assert train([*args, "--out", str(tmp_path / "cut"), "--max-steps", "3"]) == 0
    assert train(["--resume", str(tmp_path / "cut"), "--no-progress"]) == 0

    def records(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(l).items() if k not in ("tokens_per_sec", "mfu")} for l in lines]

    assert records("cut") == records("full")
    assert max(r["step"] for r in records("full")) == 2 * (len(range(0, 450 - 16, 16)) // 2) - 1  # 2 epochs
    for a, b in zip(jax.tree_util.tree_leaves(load_params(tmp_path / "cut")[0]),
                    jax.tree_util.tree_leaves(load_params(tmp_path / "full")[0])):
        np.testing.assert_array_equal(a, b)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["data"]["data_dir"] == str(shards)
