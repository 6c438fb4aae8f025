"""Training data: the book's sliding-window dataset and a seeded, resumable batch loader.

Text corpora are tokenized in memory (the book's ``create_dataloader_v1``). Corpora larger than memory are
tokenized once by ``python -m gptjax.prepare`` into llm.c's token shards (a 256 x int32 header, then uint16
tokens), read through numpy memmaps: ``GPTDataset`` only ever slices the windows it is asked for, so no file
is ever loaded whole. :func:`load_data_dir` also reads llm.c's and modded-nanogpt's shard folders and nanoGPT's
headerless train.bin / val.bin.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from gptjax.atomic import atomic_file
from gptjax.tokenizer import ENDOFTEXT, get_tokenizer, load_default_corpus

# Token files are raw little-endian uint16 (GPT-2's 50,257 ids fit), as in nanoGPT: no header, so any tool
# can read them and the token count is the file size / 2.
TOKEN_DTYPE = np.dtype("<u2")
# llm.c's token shards (dev/data/data_common.py write_datafile): 256 int32s (magic, version, token count, then
# zeros), then the tokens; version 1 is GPT-2's uint16 tokens.
SHARD_MAGIC, SHARD_VERSION = 20240520, 1
HEADER_DTYPE = np.dtype("<i4")
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * HEADER_DTYPE.itemsize
PREPARE_HINT = "make it with python -m gptjax.prepare"

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


class TooFewTokensError(ValueError):
    """Fewer tokens than one window of ``max_length`` inputs and its shifted targets."""

    def __init__(self, n_tokens: int, needed: int):
        super().__init__(f"the corpus has {n_tokens} tokens but one window needs at least max_length + 1 = "
                         f"{needed}; use more text or a smaller context length (max_length)")
        self.n_tokens, self.needed = n_tokens, needed


class GPTDataset:
    """The book's GPTDatasetV1: windows of ``max_length`` tokens and the same windows shifted by one as targets.

    Windows start every ``stride`` tokens at ``range(0, len(ids) - max_length, stride)``. A numpy array (a
    memmap included) is kept as is, not copied: each item slices its window only.
    """

    def __init__(self, token_ids: np.ndarray | Sequence[int], max_length: int, stride: int):
        _check_positive(max_length=max_length, stride=stride)
        ids = token_ids if isinstance(token_ids, (np.ndarray, TokenShards)) else np.asarray(token_ids)
        if ids.ndim == 2 and ids.shape[0] == 1:  # text_to_token_ids' [1, n]
            ids = ids[0]
        if ids.ndim != 1:
            raise ValueError(f"token ids must be one sequence of shape [n], got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        if len(ids) < max_length + 1:
            raise TooFewTokensError(len(ids), max_length + 1)
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


def as_tokens(ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """Token ids as uint16, checked to fit."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"token ids must be one sequence of shape [n], got shape {ids.shape}")
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(f"token ids must be integers in [0, 65535] to fit a uint16 token file, "
                         f"got dtype {ids.dtype} with range [{ids.min()}, {ids.max()}]")
    return ids.astype(TOKEN_DTYPE, copy=False)


def write_token_file(path: str | os.PathLike, ids: np.ndarray | Sequence[int]) -> None:
    """Write token ids as a raw uint16 file, atomically."""
    ids = as_tokens(ids)
    with atomic_file(path) as tmp:
        ids.tofile(tmp)


def load_token_file(path: str | os.PathLike) -> np.memmap:
    """A uint16 token file as a read-only memmap: nothing is read until sliced."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} not found; {PREPARE_HINT}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"token file {path} is empty; remake it with python -m gptjax.prepare from more text")
    if size % TOKEN_DTYPE.itemsize:
        raise ValueError(f"{path} is not a uint16 token file (its size, {size} bytes, is odd); "
                         f"{PREPARE_HINT}")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


# ---------------------------------------------------------------------------------------------
# llm.c token shards


def shard_header(n_tokens: int) -> bytes:
    """The 1,024-byte header of a shard of ``n_tokens`` GPT-2 tokens."""
    if not 0 <= n_tokens < 2**31:
        raise ValueError(f"a shard holds 0 to 2**31 - 1 tokens (the header's int32 count), got {n_tokens}")
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, n_tokens
    return header.tobytes()


def write_shard(path: str | os.PathLike, ids: np.ndarray | Sequence[int]) -> None:
    """Write token ids as an llm.c shard, atomically."""
    ids = as_tokens(ids)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(shard_header(len(ids)))
        ids.tofile(f)


def load_shard(path: str | os.PathLike) -> np.memmap:
    """An llm.c shard's tokens as a read-only memmap, its header checked (magic, version, token count)."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"token shard {path} is truncated: {size} bytes, less than its {HEADER_BYTES}-byte header; "
                         f"remake it ({PREPARE_HINT})")
    magic, version, n = np.fromfile(path, dtype=HEADER_DTYPE, count=3)
    if magic != SHARD_MAGIC:
        raise ValueError(f"{path} is not an llm.c token shard: its header starts with {magic}, not the magic "
                         f"{SHARD_MAGIC}; {PREPARE_HINT}")
    if version != SHARD_VERSION:
        raise ValueError(f"token shard {path} has version {version}; gptjax reads version {SHARD_VERSION} (GPT-2's "
                         "uint16 tokens; version 7 is llama-3's uint32 tokens)")
    want = HEADER_BYTES + int(n) * TOKEN_DTYPE.itemsize
    if n <= 0 or size != want:
        raise ValueError(f"token shard {path} is truncated or damaged: its header counts {n} tokens ({want} bytes) "
                         f"but the file has {size} bytes; remake it ({PREPARE_HINT})")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(int(n),))


class TokenShards:
    """Token files read as one sequence, the shards one after another (llm.c cuts documents across shards, so
    a window may span two). Slicing reads only the shards the slice touches."""

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts:
            raise ValueError("TokenShards needs at least one token file")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype, self.ndim = TOKEN_DTYPE, 1
        self.size = int(self.offsets[-1])
        self.shape = (self.size,)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenShards supports contiguous slices only, e.g. tokens[a:b]")
        start, stop, _ = key.indices(self.size)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        i = first
        while start < stop:
            lo = start - int(self.offsets[i])
            take = min(stop - start, len(self.parts[i]) - lo)
            pieces.append(self.parts[i][lo : lo + take])
            start, i = start + take, i + 1
        return np.concatenate(pieces) if pieces else np.empty(0, TOKEN_DTYPE)


def shard_paths(data_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The (train, val) llm.c shards of a folder, in name order (their index is zero-padded)."""
    d = Path(data_dir)
    return sorted(d.glob("*_train_*.bin")), sorted(d.glob("*_val_*.bin"))


def load_data_dir(data_dir: str | os.PathLike) -> tuple[np.ndarray | TokenShards, np.ndarray | TokenShards]:
    """(train, val) tokens of a folder: llm.c / modded-nanogpt shards (``*_train_*.bin``, ``*_val_*.bin``, the
    files of each split read as one sequence), else nanoGPT's (and gptjax's earlier) headerless train.bin and
    val.bin. Every header is checked here, before any training."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"data_dir {d} is not a folder; {PREPARE_HINT}")
    train, val = shard_paths(d)
    if train or val:
        if not (train and val):
            have, lack = ("train", "val") if train else ("val", "train")
            raise ValueError(f"data_dir {d} has *_{have}_*.bin shards but no *_{lack}_*.bin shard; both splits "
                             "are needed")
        return tuple(p[0] if len(p) == 1 else TokenShards(p)
                     for p in ([load_shard(f) for f in train], [load_shard(f) for f in val]))
    if not (d / "train.bin").exists() and not (d / "val.bin").exists():
        raise FileNotFoundError(f"data_dir {d} holds neither llm.c shards (*_train_*.bin, *_val_*.bin) nor "
                                f"train.bin and val.bin; {PREPARE_HINT}")
    return load_token_file(d / "train.bin"), load_token_file(d / "val.bin")


@dataclass(frozen=True)
class DataSource:
    """Where a run's tokens come from, one of: a folder of shards (``data_dir``), a pair of token files
    (``train_tokens`` and ``val_tokens``), or a UTF-8 text split by ``train_ratio`` (``corpus``; None: the
    bundled the-verdict.txt). A run directory records it (config.json's "data"), paths made absolute."""

    corpus: str | None = None
    train_tokens: str | None = None
    val_tokens: str | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.data_dir is not None and (self.corpus, self.train_tokens, self.val_tokens) != (None, None, None):
            raise ValueError("data_dir cannot be combined with corpus, train_tokens or val_tokens")
        if (self.train_tokens, self.val_tokens) != (None, None) and (
                self.corpus is not None or None in (self.train_tokens, self.val_tokens)):
            raise ValueError("token files need both train_tokens and val_tokens, and no corpus")

    def absolute(self) -> "DataSource":
        """The same source with absolute paths, so that a run resumes from any working directory."""
        return DataSource(**{k: None if v is None else str(Path(v).absolute()) for k, v in self.to_dict().items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSource":
        """From config.json's "data" (which also records the run's starting weights, not a data setting)."""
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    def splits(self, train_ratio: float) -> tuple[tuple[np.ndarray | TokenShards | str, str], ...]:
        """((train tokens or text, its name in messages), (validation ..., name))."""
        if self.data_dir is not None:
            return tuple(zip(load_data_dir(self.data_dir), (f"the training tokens of {self.data_dir}",
                                                             f"the validation tokens of {self.data_dir}")))
        if self.train_tokens is not None:
            for path in (self.train_tokens, self.val_tokens):
                if not Path(path).is_file():
                    raise FileNotFoundError(f"token file {path} not found; {PREPARE_HINT}")
            return tuple((load_token_file(p), p) for p in (self.train_tokens, self.val_tokens))
        if self.corpus is not None:
            text = read_corpus(self.corpus)
        else:
            text = load_default_corpus()
        source = self.corpus or "the bundled the-verdict.txt"
        return tuple(zip(split_text(text, train_ratio), (f"the training split of {source}",
                                                          f"the validation split of {source}")))


def build_loaders(source: DataSource, *, context_length: int, batch_size: int, stride: int | None = None,
                  train_ratio: float = 0.9, shuffle: bool = True, seed: int = 123,
                  tokenizer: Any = None) -> tuple[DataLoader, DataLoader]:
    """The book's loaders over ``source``: training batches shuffled every epoch (last partial batch dropped),
    validation batches in order; each checked to give at least one batch, before any training. A text corpus
    is tokenized with ``tokenizer`` (None: GPT-2's); token files and shards hold GPT-2 tokens, so a model with a
    tokenizer of its own trains on text."""
    if tokenizer is not None and source.corpus is None and (source.data_dir or source.train_tokens):
        raise ValueError("data_dir, train_tokens and val_tokens hold GPT-2 tokens; a model with other tokens "
                         "trains on a text corpus")
    return loaders_of_splits(source.splits(train_ratio), context_length=context_length, batch_size=batch_size,
                             stride=stride, shuffle=shuffle, seed=seed, tokenizer=tokenizer)


def loaders_of_splits(splits: tuple[tuple[np.ndarray | TokenShards | str, str], ...], *, context_length: int,
                      batch_size: int, stride: int | None = None, shuffle: bool = True,
                      seed: int = 123, tokenizer: Any = None) -> tuple[DataLoader, DataLoader]:
    """:func:`build_loaders` over splits already read (:meth:`DataSource.splits`), e.g. before slower work
    that decides the context length."""
    loaders = []
    for (tokens, name), train in zip(splits, (True, False)):
        try:
            loader = create_dataloader(tokens, batch_size=batch_size, max_length=context_length,
                                       stride=stride or context_length, shuffle=train and shuffle, drop_last=train,
                                       seed=seed, tokenizer=tokenizer)
        except TooFewTokensError as e:
            raise ValueError(f"{name} has {e.n_tokens} tokens, fewer than one window of context_length + 1 = "
                             f"{e.needed}; use more data or a smaller context_length") from None
        if len(loader) == 0:
            raise ValueError(f"{name} gives no full batch of {batch_size} windows of {context_length} tokens; "
                             "lower batch_size or context_length, or use more data")
        loaders.append(loader)
    return tuple(loaders)
