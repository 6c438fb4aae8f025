"""``python -m gptjax.prepare``: tokenize a corpus into llm.c's token shards, with many processes.

    python -m gptjax.prepare books/ --out data/books --val-tokens 1000000
    python -m gptjax.prepare fineweb.parquet --out data/fineweb --workers 8
    python -m gptjax.prepare --hf-dataset HuggingFaceFW/fineweb --hf-config sample-10BT --out data/fineweb

Each document is encoded once with GPT-2's tokenizer (its text as plain text: a literal ``<|endoftext|>`` in it
is not the special token, as llm.c and nanoGPT encode), and ``<|endoftext|>`` goes between documents. The first
``--val-tokens`` tokens form ``NAME_val_000000.bin``, the rest ``NAME_train_000001.bin``, ... of
``--shard-tokens`` each (documents are cut across shards, as llm.c does). The output is the same bytes whatever
``--workers``. After each shard, ``NAME.prepare.json`` records how far the input was read, so ``--resume``
continues an interrupted run to the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
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

from gptjax import cli
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
    """Bad input or settings, in the user's terms (the flag or file)."""


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


def check_source(source: Source, args: argparse.Namespace) -> None:
    """Fail now, before the slow work, if a source cannot give the documents' text."""
    field = args.text_field
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
                               "--text-field")
    else:
        ds = _dataset(source, args)
        names = list(ds.column_names or [])
        if names and field not in names:
            raise PrepareError(f"{_dataset_name(source)} has no column {field!r} (its columns: {', '.join(names)}); "
                               "pass --text-field")


def _read_or_fail(f: io.TextIOBase, n: int, path: str) -> str:
    try:
        return f.read(n)
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text ({e.reason} near byte {e.start} of a block); convert it, "
                           "e.g. with iconv -t UTF-8") from None
    except (OSError, EOFError) as e:
        raise PrepareError(f"{path} cannot be read: {e}") from None


def _dataset_name(source: Source) -> str:
    return f"--hf-dataset {source.path}" if source.kind == "hub" else source.path


def _dataset(source: Source, args: argparse.Namespace):
    """The split to read: from a save_to_disk folder, else through datasets.load_dataset (the local cache
    offline, streamed when online)."""
    datasets = _import("datasets", _dataset_name(source))
    split = args.split
    if source.kind == "saved":
        ds = datasets.load_from_disk(source.path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PrepareError(f"{source.path} has no split {split!r} (its splits: {', '.join(ds)}); pass --split")
            ds = ds[split]
        return ds
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    try:
        return datasets.load_dataset(source.path, args.hf_config, split=split, streaming=not offline)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        where = "in the local cache (offline)" if offline else "on the Hub"
        raise PrepareError(f"--hf-dataset {source.path} (--hf-config {args.hf_config}, --split {split}) cannot be "
                           f"loaded {where}: {' '.join(str(e).split())[:300]}") from None


def read_chunks(sources: list[Source], args: argparse.Namespace, text_block: int = TEXT_BLOCK) -> Iterator[Chunk]:
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
                column = pf.read_row_group(group, columns=[args.text_field]).column(0)
                yield from _arrow_chunks(column, source.path)
        else:
            ds = _dataset(source, args)
            for batch in ds.iter(batch_size=1000):
                texts = batch[args.text_field]
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
        raise PrepareError(f"{path} line {number} has no {field!r} field (it has: {fields}); pass --text-field")
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


def _settings(sources: list[Source], args: argparse.Namespace) -> dict:
    """What decides the output's bytes: a resumed run must have the same."""
    return {"version": MANIFEST_VERSION, "tokenizer": "gpt2", "name": args.name, "sources": [s.describe() for s in sources],
            "text_field": args.text_field, "hf_config": args.hf_config, "split": args.split,
            "shard_tokens": args.shard_tokens, "val_tokens": args.val_tokens}


def _write_manifest(path: Path, manifest: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")


def _own_files(out: Path, name: str) -> list[Path]:
    """What a run of this name writes into ``out``: its shards, its manifest, and temp files of killed runs."""
    shards = [p for p in out.glob(f"{name}_*_*.bin") if p.name.startswith((f"{name}_val_", f"{name}_train_"))]
    temps = list(out.glob(f".{name}_*.bin.*.tmp")) + list(out.glob(f".{name}.prepare.json.*.tmp"))
    manifest = manifest_path(out, name)
    return shards + temps + ([manifest] if manifest.exists() else [])


def prepare(args: argparse.Namespace) -> dict:
    """Tokenize the inputs into shards in ``args.out``; returns the final manifest."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file; give a folder")
    if args.name is None:
        args.name = out.absolute().name
    for flag, value in (("--shard-tokens", args.shard_tokens), ("--val-tokens", args.val_tokens),
                        ("--workers", args.workers)):
        if value is None or value < 1:
            raise PrepareError(f"{flag} must be a positive integer, got {value}")
    if args.shard_tokens >= 2**31 or args.val_tokens >= 2**31:
        raise PrepareError("--shard-tokens and --val-tokens must be below 2**31 (the shard header's int32 count)")
    if args.hf_dataset and args.inputs:
        raise PrepareError("give input files or --hf-dataset, not both")
    if not args.hf_dataset and not args.inputs:
        raise PrepareError("no input given; pass files or folders, or --hf-dataset NAME")
    if args.resume and args.overwrite:
        raise PrepareError("--resume continues the shards in --out and --overwrite replaces them: give one")
    sources = [Source("hub", args.hf_dataset)] if args.hf_dataset else find_sources(args.inputs)
    for source in sources:
        check_source(source, args)
    settings = _settings(sources, args)
    mpath = manifest_path(out, args.name)

    state = {"settings": settings, "shards": [], "pieces": 0, "skip": 1, "documents": 0, "complete": False}
    if args.resume:
        if not mpath.is_file():
            raise PrepareError(f"--resume: {out} has no {mpath.name} (from an earlier run with --name "
                               f"{args.name}); run without --resume")
        state = json.loads(mpath.read_text())
        if state.get("settings") != settings:
            changed = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
            raise PrepareError(f"--resume: the inputs or settings differ from the run that wrote {mpath} "
                               f"({', '.join(changed)}); run it as it was, or with --overwrite to start again")
        if state["complete"]:
            return state
    elif out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise PrepareError(f"--out {out} already exists and is not empty; {OVERWRITE_HINT} (only its "
                               f"{args.name}_*.bin shards and {mpath.name} are replaced), or --resume")
    out.mkdir(parents=True, exist_ok=True)
    for p in _own_files(out, args.name):
        # Overwrite: the old shards go (a shorter corpus must not leave stale ones); resume: shards past the
        # manifest (finished before its update) are written again, identically.
        if not args.resume or (p != mpath and p.name not in {s["file"] for s in state["shards"]}):
            p.unlink()

    tokens_done = sum(s["tokens"] for s in state["shards"])
    bar = tqdm(desc=f"{args.name}", unit=" docs", initial=state["documents"], disable=not args.progress,
               dynamic_ncols=True)
    shard: _ShardFile | None = None
    started, written_now = time.perf_counter(), 0
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ctx.Pool(args.workers, initializer=_init_worker)
    try:
        chunks = _skip_pieces(read_chunks(sources, args), state["pieces"])
        in_flight: deque = deque()  # (result, index of the chunk's first piece), in input order
        next_first = state["pieces"]

        def submit() -> None:
            nonlocal next_first
            chunk = next(chunks, None)
            if chunk is not None:
                in_flight.append((pool.apply_async(encode_chunk, (chunk, args.text_field)), next_first))
                next_first += len(chunk)

        # At most 2 tasks per worker in flight: the input is read only as fast as it is tokenized.
        for _ in range(2 * args.workers):
            submit()
        skip = state["skip"]
        while in_flight:
            result, first = in_flight.popleft()
            tokens, lengths, is_doc = result.get()
            submit()
            cum = np.concatenate([[0], np.cumsum(lengths)])
            docs_before = state["documents"]
            pos = min(skip, len(tokens))
            skip -= pos
            while pos < len(tokens):
                if shard is None:
                    index = len(state["shards"])
                    shard = _ShardFile(out / shard_name(args.name, index),
                                       args.val_tokens if index == 0 else args.shard_tokens)
                take = min(shard.room, len(tokens) - pos)
                shard.write(tokens[pos : pos + take])
                pos += take
                written_now += take
                if shard.room == 0:
                    # The next shard starts in piece first + k, after its first pos - cum[k] tokens.
                    k = int(np.searchsorted(cum, pos, side="right")) - 1
                    shard.commit()
                    state["shards"].append({"file": shard.path.name, "tokens": shard.n})
                    state.update(pieces=first + k, skip=int(pos - cum[k]),
                                 documents=docs_before + int(is_doc[:k].sum()))
                    shard = None
                    _write_manifest(mpath, state)
            state["documents"] = docs_before + int(is_doc.sum())
            bar.update(int(is_doc.sum()))
            rate = written_now / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix({"tokens": f"{tokens_done + written_now:,}", "tok/s": f"{rate:,.0f}"}, refresh=False)
        if shard is not None and len(state["shards"]) == 0:
            n = shard.n
            shard.discard()
            shard = None
            raise PrepareError(f"the inputs have only {n:,} tokens, all of them within --val-tokens "
                               f"{args.val_tokens:,}: no training shard; lower --val-tokens")
        if shard is not None:
            shard.commit()
            state["shards"].append({"file": shard.path.name, "tokens": shard.n})
            shard = None
        elif not state["shards"]:
            raise PrepareError("the inputs hold no text: no tokens to write")
        state.update(complete=True, pieces=None, skip=None)
        _write_manifest(mpath, state)
    finally:
        if shard is not None:
            shard.discard()
        pool.terminate()
        pool.join()
        bar.close()
    return state


def _skip_pieces(chunks: Iterator[Chunk], n: int) -> Iterator[Chunk]:
    """The chunks after the first ``n`` pieces (already in finished shards)."""
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk.tail(n) if n else chunk
        n = 0


# ---------------------------------------------------------------------------------------------
# Command line


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptjax.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files (.txt, .jsonl, .parquet; .txt and .jsonl also "
                   ".gz or .zst) and folders (their files of those kinds, or a Hugging Face dataset saved with "
                   "save_to_disk); a .txt file is one document, a jsonl line or parquet row one document")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards (new or empty, else "
                   "--overwrite or --resume)")
    p.add_argument("--name", metavar="NAME", help="shard file prefix: NAME_val_000000.bin, NAME_train_000001.bin, ... "
                   "(default: the --out folder's name)")
    p.add_argument("--text-field", default="text", metavar="FIELD", help="the jsonl field or parquet / dataset "
                   "column holding the text (default: text)")
    p.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face dataset, through the datasets library: from "
                   "its local cache when HF_HUB_OFFLINE=1, else streamed from the Hub (default: none)")
    p.add_argument("--hf-config", metavar="C", help="the dataset's configuration, e.g. sample-10BT (default: none)")
    p.add_argument("--split", default="train", metavar="S", help="the dataset split to read (default: train)")
    p.add_argument("--workers", type=int, default=_cpu_count(), metavar="N",
                   help=f"tokenizing processes (default: the CPU count, {_cpu_count()} here)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="tokens per training shard, the last one holds the rest (default: 100,000,000, as llm.c)")
    p.add_argument("--val-tokens", type=int, default=None, metavar="N",
                   help="tokens of the validation shard, the first of the corpus (default: --shard-tokens, as llm.c)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out after its finished "
                   "shards, with the same inputs and settings")
    p.add_argument("--overwrite", action="store_true", help="replace the NAME shards (and NAME.prepare.json) in "
                   "--out; its other files stay")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.val_tokens is None:
        args.val_tokens = args.shard_tokens
    try:
        state = prepare(args)
    except (ValueError, OSError) as e:
        print(f"error: {cli.error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the finished shards in {args.out} are kept; continue with the same command and "
              "--resume", file=sys.stderr)
        return 130
    total = sum(s["tokens"] for s in state["shards"])
    print(f"{state['documents']:,} documents, {total:,} tokens: {len(state['shards'])} shards in {args.out} "
          f"(validation {state['shards'][0]['tokens']:,} tokens, training {total - state['shards'][0]['tokens']:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
