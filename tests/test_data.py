"""Data pipeline: the book's windows and batch counts, seeded/resumable shuffling, token files, llm.c shards and --data-dir folders."""


import numpy as np
import pytest

from gptjax.data import (
    DataLoader,
    GPTDataset,
    create_dataloader,
    TokenShards,
    load_data_dir,
    load_shard,
    load_token_file,
    read_corpus,
    split_text,
    write_shard,
    write_token_file,
)
from gptjax.tokenizer import ENDOFTEXT, get_tokenizer, load_default_corpus


@pytest.fixture(scope="module")
def verdict_splits():
    return split_text(load_default_corpus(), train_ratio=0.9)


def book_windows(ids, max_length, stride):
    """GPTDatasetV1's construction, written out independently with list slicing."""
    inputs, targets = [], []
    for i in range(0, len(ids) - max_length, stride):
        inputs.append(ids[i : i + max_length])
        targets.append(ids[i + 1 : i + max_length + 1])
    return inputs, targets


# ---- the book's setup on the-verdict ----


def test_book_split_and_batch_counts(verdict_splits):
    text = load_default_corpus()
    train_text, val_text = verdict_splits
    split_idx = int(0.9 * len(text))
    assert (train_text, val_text) == (text[:split_idx], text[split_idx:])

    train = create_dataloader(train_text, batch_size=2, max_length=256, stride=256, shuffle=True, drop_last=True)
    val = create_dataloader(val_text, batch_size=2, max_length=256, stride=256, shuffle=False, drop_last=False)
    assert (len(train), len(val)) == (9, 1)
    train_batches, val_batches = list(train), list(val)
    assert (len(train_batches), len(val_batches)) == (9, 1)
    for x, y in train_batches + val_batches:
        assert x.shape == y.shape == (2, 256) and x.dtype == y.dtype == np.int32
    # The book prints 4608 training and 512 validation tokens for these loaders.
    assert sum(x.size for x, _ in train_batches) == 4608
    assert sum(x.size for x, _ in val_batches) == 512


@pytest.mark.parametrize("max_length,stride", [(256, 256), (4, 1), (8, 5)])
def test_windows_equal_the_books(verdict_splits, max_length, stride):
    train_text, _ = verdict_splits
    ids = get_tokenizer().encode(train_text, allowed_special={ENDOFTEXT})
    want_x, want_y = book_windows(ids, max_length, stride)
    loader = create_dataloader(train_text, batch_size=3, max_length=max_length, stride=stride, shuffle=False,
                               drop_last=False)
    assert len(loader.dataset) == len(want_x)
    got_x = np.concatenate([x for x, _ in loader])
    got_y = np.concatenate([y for _, y in loader])
    np.testing.assert_array_equal(got_x, np.array(want_x))
    np.testing.assert_array_equal(got_y, np.array(want_y))
    assert len(loader) == -(-len(want_x) // 3)  # drop_last=False keeps the last partial batch


def test_drop_last_and_partial_batch():
    ds = GPTDataset(np.arange(11), max_length=2, stride=1)  # 9 windows
    assert len(ds) == 9
    assert len(DataLoader(ds, 4, drop_last=True)) == 2
    kept = list(DataLoader(ds, 4, drop_last=False))
    assert [x.shape[0] for x, _ in kept] == [4, 4, 1]
    np.testing.assert_array_equal(kept[-1][0], [[8, 9]])
    np.testing.assert_array_equal(kept[-1][1], [[9, 10]])


def test_accepts_a_book_style_1_by_n_array_and_a_list():
    ds = GPTDataset(np.arange(6)[None, :], max_length=2, stride=2)
    x, y = ds[1]
    np.testing.assert_array_equal(x, [2, 3])
    np.testing.assert_array_equal(y, [3, 4])
    assert len(GPTDataset(list(range(6)), max_length=2, stride=2)) == 2


# ---- shuffling and resume ----


def _loader(seed=0, shuffle=True, drop_last=True):
    return DataLoader(GPTDataset(np.arange(203), max_length=4, stride=3), 5, shuffle=shuffle, drop_last=drop_last,
                      seed=seed)


def _epoch(loader, epoch, start=0):
    return [np.concatenate([x, y]) for x, y in loader.batches(epoch, start)]


def test_shuffle_is_reproducible_per_seed_and_epoch():
    a, b = _loader(seed=7), _loader(seed=7)
    for epoch in (0, 3):
        for p, q in zip(_epoch(a, epoch), _epoch(b, epoch), strict=True):
            np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(a.order(2), b.order(2))
    # a permutation of all windows, not a sample
    assert sorted(a.order(0).tolist()) == list(range(len(a.dataset)))
    # __iter__ is epoch 0
    for p, q in zip([np.concatenate(xy) for xy in a], _epoch(a, 0), strict=True):
        np.testing.assert_array_equal(p, q)


def test_shuffle_differs_across_epochs_and_seeds():
    loader = _loader(seed=7)
    assert not np.array_equal(loader.order(0), loader.order(1))
    assert not np.array_equal(loader.order(0), _loader(seed=8).order(0))
    assert not np.array_equal(loader.order(0), np.arange(len(loader.dataset)))
    np.testing.assert_array_equal(_loader(shuffle=False).order(5), np.arange(len(loader.dataset)))


@pytest.mark.parametrize("shuffle,drop_last", [(True, True), (False, False), (True, False)])
def test_resume_mid_epoch_equals_the_tail_of_the_epoch(shuffle, drop_last):
    loader = _loader(seed=3, shuffle=shuffle, drop_last=drop_last)
    full = _epoch(loader, 2)
    assert len(full) == len(loader)
    for start in (0, 4, len(loader) - 1, len(loader)):
        tail = _epoch(loader, 2, start)
        assert len(tail) == len(full) - start
        for p, q in zip(tail, full[start:], strict=True):
            np.testing.assert_array_equal(p, q)


# ---- token files ----


def test_token_file_roundtrip(tmp_path):
    ids = np.array([0, 1, 50256, 65535, 1234], dtype=np.int64)
    path = tmp_path / "t.bin"
    write_token_file(path, ids)
    assert path.stat().st_size == 2 * len(ids)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    mm = load_token_file(path)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    np.testing.assert_array_equal(mm, ids)
    write_token_file(path, [7, 8])  # replaces the old file
    np.testing.assert_array_equal(load_token_file(path), [7, 8])


def test_dataset_over_a_memmap_is_lazy_and_equals_in_memory(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50257, size=10_000)
    path = tmp_path / "train.bin"
    write_token_file(path, ids)
    mm = load_token_file(path)
    ds = GPTDataset(mm, max_length=64, stride=50)
    assert ds.token_ids is mm  # kept as the memmap, not copied into memory
    ref = GPTDataset(ids, max_length=64, stride=50)
    assert len(ds) == len(ref) == len(range(0, 10_000 - 64, 50))
    for i in (0, 17, len(ds) - 1):
        for a, b in zip(ds[i], ref[i]):
            assert a.dtype == np.int32
            np.testing.assert_array_equal(a, b)
    loader = create_dataloader(mm, batch_size=4, max_length=64, stride=50, shuffle=True, seed=1)
    x, y = next(iter(loader))
    assert x.shape == (4, 64) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_write_token_file_rejects_ids_outside_uint16(tmp_path):
    for bad in ([1, 70000], [-1, 2]):
        with pytest.raises(ValueError, match="uint16"):
            write_token_file(tmp_path / "t.bin", bad)
    assert list(tmp_path.iterdir()) == []


def test_load_token_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gptjax.prepare"):
        load_token_file(tmp_path / "missing.bin")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="odd"):
        load_token_file(tmp_path / "odd.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_token_file(tmp_path / "empty.bin")


# ---- llm.c shards and --data-dir ----


def test_shards_read_as_one_sequence_across_boundaries(tmp_path):
    parts = [np.arange(0, 7), np.arange(7, 10), np.arange(10, 30)]
    write_shard(tmp_path / "c_val_000000.bin", [5, 6, 7])
    for i, part in enumerate(parts, 1):
        write_shard(tmp_path / f"c_train_{i:06d}.bin", part)
    raw = (tmp_path / "c_train_000001.bin").read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")  # as llm.c reads it
    assert (header[0], header[1], header[2]) == (20240520, 1, 7) and not header[3:].any()
    assert len(raw) == 1024 + 2 * 7
    train, val = load_data_dir(tmp_path)
    np.testing.assert_array_equal(val, [5, 6, 7])
    assert isinstance(train, TokenShards) and len(train) == 30
    for a, b in ((0, 30), (5, 12), (6, 7), (7, 10), (9, 11), (29, 30), (3, 3)):
        np.testing.assert_array_equal(train[a:b], np.arange(a, b))
    ds = GPTDataset(train, max_length=4, stride=3)  # windows span the shards
    ref = GPTDataset(np.arange(30), max_length=4, stride=3)
    assert len(ds) == len(ref)
    for i in range(len(ds)):
        for x, y in zip(ds[i], ref[i]):
            np.testing.assert_array_equal(x, y)


def test_data_dir_reads_nanogpts_headerless_files(tmp_path):
    write_token_file(tmp_path / "train.bin", np.arange(100))
    write_token_file(tmp_path / "val.bin", np.arange(10))
    train, val = load_data_dir(tmp_path)
    np.testing.assert_array_equal(train, np.arange(100))
    np.testing.assert_array_equal(val, np.arange(10))


def test_bad_shards_are_one_error_naming_the_file(tmp_path):
    good = tmp_path / "x_val_000000.bin"
    write_shard(good, np.arange(50))
    raw = good.read_bytes()
    cases = {
        "magic": raw[:0] + np.int32(12345).tobytes() + raw[4:],
        "version 7": raw[:4] + np.int32(7).tobytes() + raw[8:],
        "truncated": raw[:-2],
        "header": raw[:100],
    }
    for message, data in cases.items():
        bad = tmp_path / "x_train_000001.bin"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=message) as e:
            load_data_dir(tmp_path)
        assert str(bad) in str(e.value)
    bad.unlink()
    with pytest.raises(ValueError, match="no \\*_train_\\*.bin"):
        load_data_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="data_dir .*nothing is not a folder; make it with python -m gptjax"):
        load_data_dir(tmp_path / "nothing")
    np.testing.assert_array_equal(load_shard(good), np.arange(50))


# ---- error cases ----


def test_read_corpus(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo", encoding="utf-8")
    assert read_corpus(path) == "héllo"
    with pytest.raises(FileNotFoundError, match="not found"):
        read_corpus(tmp_path / "nope.txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_corpus(tmp_path / "b.txt")


def test_corpus_too_short_for_one_window():
    with pytest.raises(ValueError, match=r"has 5 tokens .* max_length \+ 1 = 6.*smaller context length"):
        GPTDataset(np.arange(5), max_length=5, stride=1)
    assert len(GPTDataset(np.arange(6), max_length=5, stride=1)) == 1  # exactly max_length + 1 is enough
    with pytest.raises(ValueError, match="needs at least max_length"):
        create_dataloader("Too short.", max_length=256)


def test_empty_text_and_empty_splits():
    with pytest.raises(ValueError, match="empty"):
        create_dataloader("", max_length=4)
    assert split_text("abcdefg", train_ratio=0.9) == ("abcdef", "g")
    with pytest.raises(ValueError, match="training split is empty: the text has only 1 characters"):
        split_text("a", train_ratio=0.9)
    with pytest.raises(ValueError, match="has only 0 characters"):
        split_text("", train_ratio=0.5)
    with pytest.raises(ValueError, match="train_ratio"):
        split_text("abc" * 10, train_ratio=1.0)


@pytest.mark.parametrize("kwargs,name", [
    (dict(batch_size=0), "batch_size"), (dict(stride=0), "stride"), (dict(max_length=-3), "max_length"),
    (dict(batch_size=1.5), "batch_size"),
])
def test_invalid_sizes(kwargs, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        create_dataloader(np.arange(100), **{"batch_size": 2, "max_length": 4, "stride": 4, **kwargs})


def test_invalid_loader_arguments():
    ds = GPTDataset(np.arange(20), max_length=4, stride=4)
    with pytest.raises(ValueError, match="start must be"):
        next(DataLoader(ds, 2).batches(0, start=len(DataLoader(ds, 2)) + 1))
    with pytest.raises(ValueError, match="epoch"):
        DataLoader(ds, 2, shuffle=True).order(-1)
    with pytest.raises(ValueError, match="seed"):
        DataLoader(ds, 2, seed=-1)
    with pytest.raises(ValueError, match="shape"):
        GPTDataset(np.zeros((2, 10), dtype=np.int32), max_length=4, stride=4)
