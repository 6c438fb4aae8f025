"""Training data: the book's sliding-window dataset and a seeded, resumable batch loader.

Text corpora are tokenized in memory (the book's ``create_dataloader_v1``). Corpora larger than memory are
tokenized once by ``scripts/prepare_corpus.py`` into flat uint16 token files that are read through a numpy
memmap: ``GPTDataset`` only ever slices the windows it is asked for, so the file is never loaded whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tiktoken

from gptjax.atomic import atomic_file
from gptjax.tokenizer import ENDOFTEXT, get_tokenizer

# Token files are raw little-endian uint16 (GPT-2's 50,257 ids fit), as in nanoGPT: no header, so any tool
# can read them and the token count is the file size / 2.
TOKEN_DTYPE = np.dtype("<u2")

Batch = tuple[np.ndarray, np.ndarray]


def read_corpus(path: str | os.PathLike) -> str:
    """The whole text of a UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {path} is not UTF-8 text (bad byte at offset {e.start}); "
                         "convert it, e.g. with iconv -t UTF-8") from None


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """(train, validation) text: the first ``train_ratio`` of the characters and the rest, as the book."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be between 0 and 1 (exclusive), got {train_ratio}")
    split_idx = int(train_ratio * len(text))
    train, val = text[:split_idx], text[split_idx:]
    if not train or not val:
        part = "training" if not train else "validation"
        raise ValueError(f"the {part} split is empty: the text has only {len(text)} characters "
                         f"(train_ratio {train_ratio}); use a longer text")
    return train, val


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class GPTDataset:
    """The book's GPTDatasetV1: windows of ``max_length`` tokens and the same windows shifted by one as targets.

    Windows start every ``stride`` tokens at ``range(0, len(ids) - max_length, stride)``. A numpy array (a
    memmap included) is kept as is, not copied: each item slices its window only.
    """

    def __init__(self, token_ids: np.ndarray | Sequence[int], max_length: int, stride: int):
        _check_positive(max_length=max_length, stride=stride)
        ids = token_ids if isinstance(token_ids, np.ndarray) else np.asarray(token_ids)
        if ids.ndim == 2 and ids.shape[0] == 1:  # text_to_token_ids' [1, n]
            ids = ids[0]
        if ids.ndim != 1:
            raise ValueError(f"token ids must be one sequence of shape [n], got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        if len(ids) < max_length + 1:
            raise ValueError(f"the corpus has {len(ids)} tokens but one window needs at least max_length + 1 = "
                             f"{max_length + 1}; use more text or a smaller context length (max_length)")
        self.token_ids = ids
        self.max_length = max_length
        self.stride = stride
        self.starts = range(0, len(ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Batch:
        s = self.starts[i]  # range indexing: negative indices work, out of range raises IndexError
        chunk = np.asarray(self.token_ids[s : s + self.max_length + 1], dtype=np.int32)
        return chunk[:-1], chunk[1:]


class DataLoader:
    """Batches of a dataset as int32 numpy ``(inputs, targets)`` of shape [batch_size, max_length].

    The shuffle order of an epoch depends only on ``(seed, epoch)``, so any epoch can be replayed, and
    ``batches(epoch, start)`` resumes exactly at batch ``start``. ``drop_last`` drops a last partial batch.
    """

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = False, drop_last: bool = False, seed: int = 0):
        _check_positive(batch_size=batch_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int = 0) -> np.ndarray:
        """Dataset indices in the order epoch ``epoch`` visits them."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """The batches of epoch ``epoch``, from batch index ``start`` on."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be a batch index between 0 and {len(self)}, got {start}")
        order = self.order(epoch)
        for b in range(start, len(self)):
            items = [self.dataset[int(i)] for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
            yield np.stack([x for x, _ in items]), np.stack([y for _, y in items])

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0)


def create_dataloader(
    text_or_ids: str | np.ndarray | Sequence[int],
    *,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    tokenizer: tiktoken.Encoding | None = None,
) -> DataLoader:
    """The book's create_dataloader_v1: a text (tokenized, ``<|endoftext|>`` allowed) or token ids -> DataLoader."""
    _check_positive(batch_size=batch_size, max_length=max_length, stride=stride)
    if isinstance(text_or_ids, str):
        if not text_or_ids:
            raise ValueError("the text is empty (0 characters), so there is nothing to make windows from")
        tokenizer = tokenizer or get_tokenizer()
        ids = np.asarray(tokenizer.encode(text_or_ids, allowed_special={ENDOFTEXT}), dtype=np.int32)
    else:
        ids = text_or_ids
    dataset = GPTDataset(ids, max_length=max_length, stride=stride)
    return DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)


def write_token_file(path: str | os.PathLike, ids: np.ndarray | Sequence[int]) -> None:
    """Write token ids as a raw uint16 file, atomically."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"token ids must be one sequence of shape [n], got shape {ids.shape}")
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(f"token ids must be integers in [0, 65535] to fit a uint16 token file, "
                         f"got dtype {ids.dtype} with range [{ids.min()}, {ids.max()}]")
    with atomic_file(path) as tmp:
        ids.astype(TOKEN_DTYPE, copy=False).tofile(tmp)


def load_token_file(path: str | os.PathLike) -> np.memmap:
    """A uint16 token file as a read-only memmap: nothing is read until sliced."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} not found; make it with scripts/prepare_corpus.py")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"token file {path} is empty; remake it with scripts/prepare_corpus.py from more text")
    if size % TOKEN_DTYPE.itemsize:
        raise ValueError(f"{path} is not a uint16 token file (its size, {size} bytes, is odd); "
                         "make it with scripts/prepare_corpus.py")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
