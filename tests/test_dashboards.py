"""A run's dashboards: TensorBoard event files read back with tensorboard's own reader hold every metric of
metrics.jsonl (also across a resume), --no-tensorboard writes none, and --wandb logs offline."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from gptjax.dashboard import POSITION
from gptjax.cli.train import main
from tests.test_train_cli import STORY, TINY, read_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "story.txt"
    path.write_text(STORY * 5, encoding="utf-8")  # 6 training batches of 2 x 16 tokens
    return path


def train(corpus, *args):
    return main([*TINY, "--corpus", str(corpus), "--eval-freq", "3", "--eval-iter", "1", *map(str, args)])


def event_files(run_dir):
    return sorted(Path(run_dir).glob("events.out.tfevents.*"))


TEXT = "/text_summary"  # the tag suffix of tensorboardX's text summaries


def accumulator(run_dir):
    """tensorboard's reader as its server uses it (every summary a tensor; restarts purge them all)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]


def texts(acc, tag):
    return [(e.step, make_ndarray(e.tensor_proto).item().decode()) for e in acc.Tensors(tag + TEXT)]


def expected_scalars(records):
    """{tag: {step: value}} as the run logs them: the step records with their position, the others without."""
    want = {}
    for r in records:
        for k, v in r.items():
            if k == "step" or v is None or ("loss" not in r and k in POSITION):
                continue
            assert r["step"] not in want.setdefault(k, {}), (k, r["step"])
            want[k][r["step"]] = v
    return want


@pytest.fixture(scope="module")
def resumed_run(corpus, tmp_path_factory):
    """Two epochs, stopped at step 6, its last checkpoint then lost (as in a crash after step 5), resumed."""
    out = tmp_path_factory.mktemp("runs") / "resumed"
    assert train(corpus, "--epochs", 2, "--save-every", 4, "--max-steps", 6, "--out", out) == 0
    shutil.rmtree(out / "checkpoints" / "6")  # steps 4 and 5, their sample and logs must be done again
    assert main(["--resume", str(out), "--no-progress"]) == 0
    return out


def test_tensorboard_holds_every_metric_once(resumed_run):
    assert len(event_files(resumed_run)) == 2  # the resumed run appended a file of its own
    records = read_jsonl(resumed_run / "metrics.jsonl")
    assert max(r["step"] for r in records) == 11
    acc = accumulator(resumed_run)
    want = expected_scalars(records)
    assert set(want) >= {"loss", "lr", "grad_norm", "tokens_per_sec", "epoch", "tokens_seen", "train_loss", "val_loss"}
    assert {t for t in acc.Tags()["tensors"] if not t.endswith(TEXT)} == set(want)
    for tag, by_step in want.items():
        events = scalars(acc, tag)
        # The restart marker makes the reader drop what the lost attempt logged at steps 4 and 5.
        assert [step for step, _ in events] == sorted(by_step), tag
        got = np.float32([value for _, value in events])
        np.testing.assert_array_equal(got, np.float32([by_step[s] for s in sorted(by_step)]), err_msg=tag)


def test_tensorboard_holds_the_samples_and_settings(resumed_run):
    acc = accumulator(resumed_run)
    samples = texts(acc, "sample")
    lines = (resumed_run / "samples.txt").read_text().splitlines()
    assert [step for step, _ in samples] == [5, 11]
    assert [f"Ep {i + 1} (Step {step:06d}): {text}" for i, (step, text) in enumerate(samples)] == lines
    settings = texts(acc, "settings")
    config = json.loads((resumed_run / "config.json").read_text())
    assert [step for step, _ in settings] == [0, 4]  # written again by the resumed run, from where it resumed
    assert json.loads(settings[-1][1].strip("`\n")) == config


def test_no_tensorboard_writes_no_event_file(corpus, tmp_path):
    out = tmp_path / "run"
    assert train(corpus, "--max-steps", 2, "--start-context", "", "--no-tensorboard", "--out", out) == 0
    assert read_jsonl(out / "metrics.jsonl") and event_files(out) == []
    assert json.loads((out / "config.json").read_text())["monitoring"]["tensorboard"] is False


def wandb_history(run_dir):
    """The history rows of the offline W&B run under ``run_dir``, read from its .wandb file: wandb's header,
    then LevelDB-log records (32 KiB blocks of 7-byte-headed chunks) of wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunk, rows = path.read_bytes(), 7, b"", []
    block = 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # the zero padding of a block
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert train(corpus, "--max-steps", 4, "--start-context", "", "--wandb", "gptjax-test", "--out", out) == 0
    monitoring = json.loads((out / "config.json").read_text())["monitoring"]
    assert monitoring["wandb"] == "gptjax-test" and monitoring["wandb_id"]
    rows = {row["_step"]: row for row in wandb_history(out)}
    want = expected_scalars(read_jsonl(out / "metrics.jsonl"))
    assert sorted(rows) == [0, 1, 2, 3]
    for tag, by_step in want.items():
        for step, value in by_step.items():
            assert rows[step][tag] == pytest.approx(value, rel=1e-12), (tag, step)
