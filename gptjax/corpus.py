"""Corpora to llm.c's token shards, tokenized by many processes: what ``python -m gptjax.prepare`` runs.

Each document is encoded once with GPT-2's tokenizer (its text as plain text: a literal ``<|endoftext|>`` in it
is not the special token, as llm.c and nanoGPT encode), and ``<|endoftext|>`` goes between documents. The first
``val_tokens`` tokens form ``NAME_val_000000.bin``, the rest ``NAME_train_000001.bin``, ... of ``shard_tokens``
each (documents are cut across shards, as llm.c does). The output is the same bytes whatever the number of
workers. After each shard, ``NAME.prepare.json`` records how far the input was read, so a resumed run continues
an interrupted one to the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib
import io
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptjax.atomic import OVERWRITE_HINT, atomic_file
from gptjax.data import TOKEN_DTYPE, shard_header
from gptjax.tokenizer import ENDOFTEXT_ID, get_tokenizer

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
COMPRESSED = (".gz", ".zst")
MANIFEST_VERSION = 1
# Text per task sent to a worker: large enough that the per-task cost (pickling, a round trip) is small next
# to tokenizing it, small enough that 2 x workers of them in flight stay a few tens of MB.
CHUNK_CHARS = 1 << 20
# Plain text is read in blocks of this many characters and cut at a newline between two non-space characters:
# GPT-2's pre-tokenizer never joins a lone "\n" to its neighbours there, so the pieces encode to exactly the
# tokens of the whole text, and a 10 GB file never needs 10 GB of memory.
TEXT_BLOCK = 1 << 20
DATA_EXTRA = "pip install 'gptjax[data]'"


class PrepareError(ValueError):
    """Bad input or settings: the file, or the PrepareConfig field, and the fix."""


def cpu_count() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class PrepareConfig:
    """What to tokenize and where: ``inputs`` (files and folders) or ``hf_dataset`` (a Hugging Face dataset,
    ``hf_config`` and ``split``), the column or field ``text_field``, into ``out`` as ``name``'s shards (None:
    the folder's name) of ``shard_tokens`` tokens after a validation shard of ``val_tokens`` (None: as
    ``shard_tokens``), by ``workers`` processes (None: one per CPU). ``resume`` continues an interrupted run;
    ``overwrite`` replaces an earlier run's shards of the same name (and nothing else in ``out``)."""

    out: str
    inputs: tuple[str, ...] = ()
    name: str | None = None
    text_field: str = "text"
    hf_dataset: str | None = None
    hf_config: str | None = None
    split: str = "train"
    workers: int | None = None
    shard_tokens: int = 100_000_000
    val_tokens: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(map(str, self.inputs)))
        for name in ("shard_tokens", "val_tokens", "workers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PrepareError(f"PrepareConfig.{name} must be a positive integer, got {value}")
        if max(self.shard_tokens, self.val_tokens or 0) >= 2**31:
            raise PrepareError("PrepareConfig.shard_tokens and PrepareConfig.val_tokens must be below 2**31 (the "
                               "shard header's int32 count)")
        if self.hf_dataset and self.inputs:
            raise PrepareError("give input files or PrepareConfig.hf_dataset, not both")
        if not self.hf_dataset and not self.inputs:
            raise PrepareError("no input given; pass files or folders, or PrepareConfig.hf_dataset")
        if self.resume and self.overwrite:
            raise PrepareError("PrepareConfig.resume continues the shards in PrepareConfig.out and "
                               "PrepareConfig.overwrite replaces them: give one")

    def resolved(self) -> "PrepareConfig":
        """The defaults that depend on the rest filled in."""
        return dataclasses.replace(self, name=self.name or Path(self.out).absolute().name,
                                   val_tokens=self.val_tokens or self.shard_tokens, workers=self.workers or cpu_count())


# ---------------------------------------------------------------------------------------------
# Reading: the input as a stream of chunks of "pieces" (a document, or part of a long plain-text one)


@dataclass
class Chunk:
    """Consecutive pieces of the input. ``kind`` says how a worker gets their text: "text" (strings),
    "lines" (jsonl lines as bytes, parsed in the worker) or "arrow" (a pyarrow string array)."""

    kind: str
    data: Any
    starts: list[bool] | None = None  # "text" only: does the piece start a document (else it continues one)?
    source: str = ""  # file named in errors
    first_line: int = 1  # "lines": the line number of data[0]

    def __len__(self) -> int:
        return len(self.data)

    def tail(self, k: int) -> "Chunk":
        """The chunk without its first ``k`` pieces."""
        return Chunk(self.kind, self.data[k:], None if self.starts is None else self.starts[k:], self.source,
                     self.first_line + k)


@dataclass(frozen=True)
class Source:
    """One input: a file of a known kind, a saved Hugging Face dataset, or a dataset of the Hub."""

    kind: str  # "text", "jsonl", "parquet", "saved", "hub"
    path: str

    def describe(self) -> list:
        if self.kind == "hub":
            return [self.kind, self.path]
        p = Path(self.path)
        return [self.kind, self.path, p.stat().st_size if p.is_file() else None]


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".zst":
        zstandard = _import("zstandard", path)
        return io.TextIOWrapper(zstandard.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _open_binary(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        # zstandard's reader has no readline: buffer it
        return io.BufferedReader(_import("zstandard", path).open(path, "rb"))
    return open(path, "rb")


def _import(module: str, what: Any):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PrepareError(f"reading {what} needs the {module} package: {DATA_EXTRA}") from None


def _base_suffix(path: Path) -> str:
    """.txt / .jsonl / .parquet, under a .gz or .zst if any."""
    return path.with_suffix("").suffix if path.suffix in COMPRESSED else path.suffix


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def find_sources(inputs: list[str]) -> list[Source]:
    """The inputs as sources, folders expanded (a saved dataset, or its files of known kinds, sorted)."""
    sources: list[Source] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise PrepareError(f"input {given} not found")
        if path.is_dir():
            if _is_saved_dataset(path):
                sources.append(Source("saved", str(path.absolute())))
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
            if not files:
                raise PrepareError(f"input folder {given} holds no .txt, .jsonl or .parquet files (nor a Hugging "
                                   "Face dataset saved with save_to_disk)")
            sources.extend(Source(_kind(p), str(p.absolute())) for p in files)
            continue
        kind = _kind(path)
        if kind is None:
            raise PrepareError(f"input {given}: unknown file type; give .txt, .jsonl or .parquet files (.txt and "
                               ".jsonl also as .gz or .zst), or a folder")
        sources.append(Source(kind, str(path.absolute())))
    return sources


def _kind(path: Path) -> str | None:
    base = _base_suffix(path)
    if base in TEXT_SUFFIXES:
        return "text"
    if base in JSONL_SUFFIXES:
        return "jsonl"
    if base == ".parquet" and path.suffix == ".parquet":
        return "parquet"
    return None


def check_source(source: Source, cfg: PrepareConfig) -> None:
    """Fail now, before the slow work, if a source cannot give the documents' text."""
    field = cfg.text_field
    if source.kind == "text":
        with _open_text(Path(source.path)) as f:
            _read_or_fail(f, 4096, source.path)
    elif source.kind == "jsonl":
        with _open_binary(Path(source.path)) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    _text_of_line(line, field, source.path, number)
                    break
    elif source.kind == "parquet":
        pq = _import("pyarrow.parquet", source.path)
        names = pq.ParquetFile(source.path).schema_arrow.names
        if field not in names:
            raise PrepareError(f"{source.path} has no column {field!r} (its columns: {', '.join(names)}); pass "
                               "PrepareConfig.text_field")
    else:
        ds = _dataset(source, cfg)
        names = list(ds.column_names or [])
        if names and field not in names:
            raise PrepareError(f"{_dataset_name(source)} has no column {field!r} (its columns: {', '.join(names)}); "
                               "pass PrepareConfig.text_field")


def _read_or_fail(f: io.TextIOBase, n: int, path: str) -> str:
    try:
        return f.read(n)
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text ({e.reason} near byte {e.start} of a block); convert it, "
                           "e.g. with iconv -t UTF-8") from None
    except (OSError, EOFError) as e:
        raise PrepareError(f"{path} cannot be read: {e}") from None


def _dataset_name(source: Source) -> str:
    return f"PrepareConfig.hf_dataset {source.path}" if source.kind == "hub" else source.path


def _dataset(source: Source, cfg: PrepareConfig):
    """The split to read: from a save_to_disk folder, else through datasets.load_dataset (the local cache
    offline, streamed when online)."""
    datasets = _import("datasets", _dataset_name(source))
    split = cfg.split
    if source.kind == "saved":
        ds = datasets.load_from_disk(source.path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PrepareError(f"{source.path} has no split {split!r} (its splits: {', '.join(ds)}); pass "
                                   "PrepareConfig.split")
            ds = ds[split]
        return ds
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    try:
        return datasets.load_dataset(source.path, cfg.hf_config, split=split, streaming=not offline)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        where = "in the local cache (offline)" if offline else "on the Hub"
        raise PrepareError(f"PrepareConfig.hf_dataset {source.path} (PrepareConfig.hf_config {cfg.hf_config}, "
                           f"PrepareConfig.split {split}) cannot be loaded {where}: "
                           f"{' '.join(str(e).split())[:300]}") from None


def read_chunks(sources: list[Source], cfg: PrepareConfig, text_block: int = TEXT_BLOCK) -> Iterator[Chunk]:
    """Every piece of every source, in order, as chunks of about CHUNK_CHARS characters."""
    for source in sources:
        if source.kind == "text":
            yield from _text_chunks(source.path, text_block)
        elif source.kind == "jsonl":
            yield from _jsonl_chunks(source.path)
        elif source.kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(source.path)
            for group in range(pf.num_row_groups):  # one row group in memory at a time
                column = pf.read_row_group(group, columns=[cfg.text_field]).column(0)
                yield from _arrow_chunks(column, source.path)
        else:
            ds = _dataset(source, cfg)
            for batch in ds.iter(batch_size=1000):
                texts = batch[cfg.text_field]
                yield Chunk("text", texts, [True] * len(texts), _dataset_name(source))


def _arrow_chunks(column, path: str) -> Iterator[Chunk]:
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        raise PrepareError(f"{path}: {column.null_count} rows have no text (null) in the text column")
    n = len(column)
    if n == 0:
        return
    per_row = max(1, column.nbytes // n)
    step = max(1, CHUNK_CHARS // per_row)
    for i in range(0, n, step):
        # A slice pickles with its whole row group's buffers (so every chunk would carry them all to a
        # worker); concat_arrays copies just the slice's rows.
        yield Chunk("arrow", pa.concat_arrays([column.slice(i, step)]), source=path)


def _jsonl_chunks(path: str) -> Iterator[Chunk]:
    line_no = 1
    try:
        with _open_binary(Path(path)) as f:
            while lines := f.readlines(CHUNK_CHARS):
                yield Chunk("lines", lines, source=path, first_line=line_no)
                line_no += len(lines)
    except (OSError, EOFError) as e:
        raise PrepareError(f"{path} cannot be read: {e}") from None


def _text_chunks(path: str, block: int) -> Iterator[Chunk]:
    """One file's pieces, batched: whole small files go together, a large one is cut at safe newlines."""
    pieces: list[str] = []
    starts: list[bool] = []
    size = 0
    with _open_text(Path(path)) as f:
        pending, start = "", True
        while True:
            data = _read_or_fail(f, block, path)
            pending += data
            if not data:
                break
            cut = _safe_cut(pending)
            if cut:
                pieces.append(pending[:cut])
                starts.append(start)
                size += cut
                pending, start = pending[cut:], False
                if size >= CHUNK_CHARS:
                    yield Chunk("text", pieces, starts, path)
                    pieces, starts, size = [], [], 0
        if pending or start:  # the rest, or an empty file (an empty document)
            pieces.append(pending)
            starts.append(start)
    yield Chunk("text", pieces, starts, path)


def _safe_cut(text: str) -> int:
    """The end of the text's last "\\n" between two non-space characters (0: none, keep reading)."""
    i = text.rfind("\n", 1, len(text) - 1)
    while i > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 1, i)
    return 0


def _text_of_line(line: bytes, field: str, path: str, number: int) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise PrepareError(f"{path} line {number} is not JSON ({e})") from None
    if not isinstance(record, dict) or field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise PrepareError(f"{path} line {number} has no {field!r} field (it has: {fields}); pass "
                           "PrepareConfig.text_field")
    text = record[field]
    if not isinstance(text, str):
        raise PrepareError(f"{path} line {number}: {field!r} is a {type(text).__name__}, not text")
    return text


# ---------------------------------------------------------------------------------------------
# Tokenizing (in the workers)

_EOT = np.array([ENDOFTEXT_ID], np.uint32)


def encode_chunk(chunk: Chunk, field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint16 tokens, tokens per piece, which pieces start a document) of a chunk: each document is
    ``<|endoftext|>`` and its tokens (the stream's first token, that of the first document, is dropped by the
    writer)."""
    if chunk.kind == "lines":
        texts, starts = [], []
        for number, line in enumerate(chunk.data, chunk.first_line):
            if line.strip():
                texts.append(_text_of_line(line, field, chunk.source, number))
                starts.append(True)
            else:  # a blank line is no document: no tokens, no separator
                texts.append("")
                starts.append(None)
    elif chunk.kind == "arrow":
        texts = chunk.data.to_pylist()
        starts = [True] * len(texts)
    else:
        texts, starts = chunk.data, chunk.starts
        if any(not isinstance(t, str) for t in texts):
            raise PrepareError(f"{chunk.source}: a document's {field!r} is not text")
    # encode_to_numpy hands tiktoken's token buffer over as an array, where encode_ordinary_batch builds a
    # Python int per token that would then be copied into an array (20 MB of documents, one thread: 16.4
    # against 13.2 MB/s). No special tokens allowed or refused: a literal "<|endoftext|>" is plain text, as
    # encode_ordinary reads it.
    tokenizer = get_tokenizer()
    parts: list[np.ndarray] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, (text, start) in enumerate(zip(texts, starts)):
        ids = tokenizer.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        if start:
            parts.append(_EOT)
        parts.append(ids)
        lengths[i] = len(ids) + (1 if start else 0)
    tokens = np.concatenate(parts).astype(TOKEN_DTYPE) if parts else np.empty(0, TOKEN_DTYPE)
    return tokens, lengths, np.array([bool(s) for s in starts])


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    get_tokenizer()  # built once per process (inherited as it is when forked)


# ---------------------------------------------------------------------------------------------
# Writing shards


def shard_name(name: str, index: int) -> str:
    return f"{name}_{'val' if index == 0 else 'train'}_{index:06d}.bin"


def manifest_path(out: Path, name: str) -> Path:
    return out / f"{name}.prepare.json"


class _ShardFile:
    """One shard being written: a temp file beside it (header first, counted when done), renamed when full."""

    def __init__(self, path: Path, capacity: int):
        self.path, self.capacity, self.n = path, capacity, 0
        self._atomic = atomic_file(path)
        self._file = open(self._atomic.__enter__(), "wb")
        self._file.write(shard_header(0))

    @property
    def room(self) -> int:
        return self.capacity - self.n

    def write(self, tokens: np.ndarray) -> None:
        tokens.tofile(self._file)
        self.n += len(tokens)

    def commit(self) -> None:
        self._file.seek(0)
        self._file.write(shard_header(self.n))
        self._file.close()
        self._atomic.__exit__(None, None, None)

    def discard(self) -> None:
        self._file.close()
        with contextlib.suppress(RuntimeError):
            self._atomic.__exit__(RuntimeError, RuntimeError("discarded"), None)


def _settings(sources: list[Source], cfg: PrepareConfig) -> dict:
    """What decides the output's bytes: a resumed run must have the same."""
    return {"version": MANIFEST_VERSION, "tokenizer": "gpt2", "name": cfg.name,
            "sources": [s.describe() for s in sources],
            "text_field": cfg.text_field, "hf_config": cfg.hf_config, "split": cfg.split,
            "shard_tokens": cfg.shard_tokens, "val_tokens": cfg.val_tokens}


def _write_manifest(path: Path, manifest: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")


def _own_files(out: Path, name: str) -> list[Path]:
    """What a run of this name writes into ``out``: its shards, its manifest, and temp files of killed runs."""
    shards = [p for p in out.glob(f"{name}_*_*.bin") if p.name.startswith((f"{name}_val_", f"{name}_train_"))]
    temps = list(out.glob(f".{name}_*.bin.*.tmp")) + list(out.glob(f".{name}.prepare.json.*.tmp"))
    manifest = manifest_path(out, name)
    return shards + temps + ([manifest] if manifest.exists() else [])


def prepare(cfg: PrepareConfig) -> dict:
    """Tokenize the inputs into shards in ``cfg.out``; returns the final manifest (its "shards", each a file
    and its token count, and "documents")."""
    cfg = cfg.resolved()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"PrepareConfig.out {out} is a file; give a folder")
    sources = [Source("hub", cfg.hf_dataset)] if cfg.hf_dataset else find_sources(list(cfg.inputs))
    for source in sources:
        check_source(source, cfg)
    state = _starting_state(cfg, _settings(sources, cfg))
    if state["complete"]:
        return state
    out.mkdir(parents=True, exist_ok=True)
    mpath = manifest_path(out, cfg.name)
    for p in _own_files(out, cfg.name):
        # Overwrite: the old shards go (a shorter corpus must not leave stale ones); resume: shards past the
        # manifest (finished before its update) are written again, identically.
        if not cfg.resume or (p != mpath and p.name not in {s["file"] for s in state["shards"]}):
            p.unlink()
    writer = _ShardWriter(cfg, state)
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ctx.Pool(cfg.workers, initializer=_init_worker)
    try:
        for first, (tokens, lengths, is_doc) in _encoded(pool, read_chunks(sources, cfg), state["pieces"], cfg):
            writer.add(first, tokens, lengths, is_doc)
        return writer.finish()
    finally:
        writer.close()
        pool.terminate()
        pool.join()


def _starting_state(cfg: PrepareConfig, settings: dict) -> dict:
    """Where the run starts: the manifest of the run it resumes (checked to have the same settings), else
    nothing written yet (``cfg.out`` checked to be new, empty or to be overwritten)."""
    out, mpath = Path(cfg.out), manifest_path(Path(cfg.out), cfg.name)
    if cfg.resume:
        if not mpath.is_file():
            raise PrepareError(f"PrepareConfig.resume: {out} has no {mpath.name} (from an earlier run with "
                               f"PrepareConfig.name {cfg.name}); run without PrepareConfig.resume")
        state = json.loads(mpath.read_text())
        if state.get("settings") != settings:
            changed = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
            raise PrepareError(f"PrepareConfig.resume: the inputs or settings differ from the run that wrote {mpath} "
                               f"({', '.join(changed)}); run it as it was, or with overwrite=True to start again")
        return state
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise PrepareError(f"PrepareConfig.out {out} already exists and is not empty; {OVERWRITE_HINT} (only its "
                           f"{cfg.name}_*.bin shards and {mpath.name} are replaced), or PrepareConfig.resume")
    return {"settings": settings, "shards": [], "pieces": 0, "skip": 1, "documents": 0, "complete": False}


def _encoded(pool, chunks: Iterator[Chunk], skip: int,
             cfg: PrepareConfig) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(index of the chunk's first piece, its encoding) of each chunk after the first ``skip`` pieces, in input
    order. At most 2 tasks per worker are in flight: the input is read only as fast as it is tokenized."""
    chunks = _skip_pieces(chunks, skip)
    in_flight: deque = deque()
    next_first = skip

    def submit() -> None:
        nonlocal next_first
        chunk = next(chunks, None)
        if chunk is not None:
            in_flight.append((pool.apply_async(encode_chunk, (chunk, cfg.text_field)), next_first))
            next_first += len(chunk)

    for _ in range(2 * cfg.workers):
        submit()
    while in_flight:
        result, first = in_flight.popleft()
        encoding = result.get()
        submit()
        yield first, encoding


class _ShardWriter:
    """Cuts the token stream into shards, and after each one records in the manifest how far the input was read
    (the piece the next shard starts in, and how many of its tokens the finished shards hold)."""

    def __init__(self, cfg: PrepareConfig, state: dict):
        self.cfg, self.state = cfg, state
        self.out, self.mpath = Path(cfg.out), manifest_path(Path(cfg.out), cfg.name)
        self.skip, self.shard = state["skip"], None
        self.tokens_before = sum(s["tokens"] for s in state["shards"])
        self.written, self.started = 0, time.perf_counter()
        self.bar = tqdm(desc=cfg.name, unit=" docs", initial=state["documents"], disable=not cfg.progress,
                        dynamic_ncols=True)

    def add(self, first: int, tokens: np.ndarray, lengths: np.ndarray, is_doc: np.ndarray) -> None:
        """The tokens of the pieces from index ``first`` on (``lengths`` tokens each; ``is_doc``: starts one)."""
        state, cum = self.state, np.concatenate([[0], np.cumsum(lengths)])
        docs_before = state["documents"]
        pos = min(self.skip, len(tokens))
        self.skip -= pos
        while pos < len(tokens):
            if self.shard is None:
                index = len(state["shards"])
                self.shard = _ShardFile(self.out / shard_name(self.cfg.name, index),
                                        self.cfg.val_tokens if index == 0 else self.cfg.shard_tokens)
            take = min(self.shard.room, len(tokens) - pos)
            self.shard.write(tokens[pos : pos + take])
            pos += take
            self.written += take
            if self.shard.room == 0:
                # The next shard starts in piece first + k, after its first pos - cum[k] tokens.
                k = int(np.searchsorted(cum, pos, side="right")) - 1
                self._commit()
                state.update(pieces=first + k, skip=int(pos - cum[k]), documents=docs_before + int(is_doc[:k].sum()))
                _write_manifest(self.mpath, state)
        state["documents"] = docs_before + int(is_doc.sum())
        self.bar.update(int(is_doc.sum()))
        rate = self.written / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix({"tokens": f"{self.tokens_before + self.written:,}", "tok/s": f"{rate:,.0f}"},
                             refresh=False)

    def finish(self) -> dict:
        """Commit the last shard and mark the manifest complete; returns it."""
        if self.shard is not None and not self.state["shards"]:
            n = self.shard.n
            raise PrepareError(f"the inputs have only {n:,} tokens, all of them within PrepareConfig.val_tokens "
                               f"{self.cfg.val_tokens:,}: no training shard; lower PrepareConfig.val_tokens")
        if self.shard is not None:
            self._commit()
        elif not self.state["shards"]:
            raise PrepareError("the inputs hold no text: no tokens to write")
        self.state.update(complete=True, pieces=None, skip=None)
        _write_manifest(self.mpath, self.state)
        return self.state

    def _commit(self) -> None:
        self.shard.commit()
        self.state["shards"].append({"file": self.shard.path.name, "tokens": self.shard.n})
        self.shard = None

    def close(self) -> None:
        """Drop a shard left unfinished (by an error or an interrupt): the manifest says where to resume."""
        if self.shard is not None:
            self.shard.discard()
            self.shard = None
        self.bar.close()


def _skip_pieces(chunks: Iterator[Chunk], n: int) -> Iterator[Chunk]:
    """The chunks after the first ``n`` pieces (already in finished shards)."""
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk.tail(n) if n else chunk
        n = 0


