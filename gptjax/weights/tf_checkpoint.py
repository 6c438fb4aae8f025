"""TensorFlow's V2 checkpoint bundle (``PREFIX.index`` + ``PREFIX.data-0000N-of-0000M``), read without TensorFlow.

The ``.index`` file is a LevelDB-style sorted table: blocks of prefix-compressed ``key -> value`` records,
each block followed by a compression byte and the masked crc32c of both; an index block pointing at the
data blocks; a 48-byte footer ending in a magic number. Key ``""`` holds a ``BundleHeaderProto`` (shard
count, endianness), every other key is a tensor name whose value is a ``BundleEntryProto`` (dtype, shape,
shard, offset, size, masked crc32c of the bytes). The data files hold the raw little-endian tensor bytes.

No library reads this format without TensorFlow itself, so it is written here (and tested bitwise against
``tf.train.load_checkpoint`` on files TensorFlow wrote); the checksums use the google-crc32c package.

As a container of weights: :func:`read_folder` reads a folder with TensorFlow's ``checkpoint`` state file
naming its bundle (OpenAI's GPT-2 release is one), whatever names the variables have; :func:`write_folder`
writes one, through TensorFlow (``pip install gptjax[tf]``): writing is where this reader's tests need it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import ml_dtypes
import numpy as np

from gptjax.weights.files import NamedTensors, one_line
from gptjax.weights.lazy import LazyTensors

STATE_FILE = "checkpoint"  # names the folder's bundle, as tf.train.Saver writes it
DEFAULT_PREFIX = "model.ckpt"  # tf.train.Saver's usual name (OpenAI's): the bundle when there is no state file

_FOOTER = 48  # two block handles padded to 40 bytes, then the 8-byte magic number
_MAGIC = 0xDB4775248B80FB57
_TRAILER = 5  # after each block: compression type (1 byte) and masked crc32c (4 bytes)
_CRC_CHUNK = 1 << 24  # google_crc32c takes bytes, so a tensor's checksum is taken 16 MiB at a time

# tensorflow/core/framework/types.proto DataType -> numpy (the numeric types; strings are not weights)
_DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
    10: np.bool_, 14: ml_dtypes.bfloat16, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64,
}


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt or not a TensorFlow V2 bundle."""


@dataclass(frozen=True)
class Entry:
    dtype: np.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # unmasked


def data_file(prefix: str | os.PathLike, shard: int, num_shards: int) -> Path:
    return Path(f"{os.fspath(prefix)}.data-{shard:05d}-of-{num_shards:05d}")


def read_index(prefix: str | os.PathLike) -> tuple[dict[str, Entry], int]:
    """The tensor entries of ``PREFIX.index`` by name, and the number of data shards."""
    path = Path(f"{os.fspath(prefix)}.index")
    data = path.read_bytes()
    try:
        records = dict(_table(data))
        if b"" not in records:
            raise ValueError("no bundle header; it is not a TensorFlow V2 checkpoint index")
        header = {field: v for field, _, v in _fields(records.pop(b""))}
        if header.get(2, 0) != 0:
            raise ValueError("a big-endian checkpoint; gptjax reads little-endian ones only")
        num_shards = header.get(1, 1)
        entries = {}
        for key, value in records.items():
            name = key.decode("utf-8", "replace")
            entries[name] = _entry(value, name, num_shards)
    except (IndexError, ValueError) as e:  # any damage or oddity, named after the file
        raise CheckpointError(f"{path}: {e}") from None
    return entries, num_shards


def read_bundle(prefix: str | os.PathLike) -> LazyTensors:
    """Every tensor of the checkpoint ``prefix``, each memory-mapped from its data file when asked for
    (and unmapped once dropped) and checked against its stored crc32c."""
    entries, num_shards = read_index(prefix)
    for shard in range(num_shards):
        file = data_file(prefix, shard, num_shards)
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; the checkpoint is incomplete")
        need = max((e.offset + e.size for e in entries.values() if e.shard == shard), default=0)
        if file.stat().st_size < need:
            raise CheckpointError(
                f"{file} is truncated: {file.stat().st_size} bytes, the index needs {need}"
            )

    def read(name: str) -> np.ndarray:
        e = entries[name]
        if e.size == 0:
            return np.zeros(e.shape, e.dtype)
        file = data_file(prefix, e.shard, num_shards)
        raw = np.memmap(file, dtype=np.uint8, mode="r", offset=e.offset, shape=(e.size,))
        crc = 0
        for start in range(0, e.size, _CRC_CHUNK):
            crc = google_crc32c.extend(crc, raw[start : start + _CRC_CHUNK].tobytes())
        if crc != e.crc32c:
            raise CheckpointError(f"{file}: tensor {name!r} does not match its checksum; the file is corrupt")
        return raw.view(e.dtype).reshape(e.shape)

    return LazyTensors({name: e.shape for name, e in entries.items()}, read)


def is_checkpoint_folder(path: Path) -> bool:
    return (path / STATE_FILE).is_file() or Path(f"{path / DEFAULT_PREFIX}.index").is_file()


def checkpoint_prefix(folder: str | os.PathLike) -> Path:
    """The checkpoint the folder's ``checkpoint`` file names (OpenAI's: model.ckpt), looked for in this
    folder whatever the path recorded there (sometimes an absolute one from when it was written)."""
    folder = Path(folder)
    name = DEFAULT_PREFIX
    state = folder / STATE_FILE
    if state.is_file():
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', state.read_text(errors="replace"), re.MULTILINE)
        if not m:
            raise ValueError(f"cannot read {state}: no model_checkpoint_path; delete it or download it again")
        name = Path(m.group(1).replace("\\\\", "/")).name
    prefix = folder / name
    if not Path(f"{prefix}.index").is_file():
        raise FileNotFoundError(
            f"no TensorFlow checkpoint in {folder} ({name}.index is missing); download the model again"
        )
    return prefix


def read_folder(folder: Path) -> NamedTensors:
    """Every variable of the folder's TensorFlow checkpoint, under its full name, unsqueezed, each read
    (memory-mapped and checksummed) when looked up."""
    prefix = checkpoint_prefix(folder)

    def failure(e: CheckpointError) -> ValueError:
        return ValueError(f"cannot read the TensorFlow checkpoint {prefix}: {one_line(e)}; download the model again")

    try:
        bundle = read_bundle(prefix)
    except CheckpointError as e:
        raise failure(e) from None

    def read(name: str) -> np.ndarray:
        try:
            return bundle[name]
        except CheckpointError as e:  # a tensor's checksum, checked as it is read
            raise failure(e) from None

    return NamedTensors(LazyTensors(bundle.shapes, read), prefix, f"TensorFlow checkpoint {folder}")


def write_folder(folder: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """``tensors`` as the bundle ``folder/model.ckpt.*`` with the ``checkpoint`` state file naming it (the caller
    makes the folder atomic), written by TensorFlow's own SaveV2."""
    tf = _import_tf()
    tf.raw_ops.SaveV2(prefix=str(folder / DEFAULT_PREFIX), tensor_names=list(tensors),
                      shape_and_slices=[""] * len(tensors), tensors=[tf.constant(v) for v in tensors.values()])
    (folder / STATE_FILE).write_text(f'model_checkpoint_path: "{DEFAULT_PREFIX}"\n'
                                     f'all_model_checkpoint_paths: "{DEFAULT_PREFIX}"\n')


def written_files() -> tuple[str, ...]:
    """The files :func:`write_folder` writes into a folder (TensorFlow writes one data shard)."""
    return STATE_FILE, f"{DEFAULT_PREFIX}.index", data_file(DEFAULT_PREFIX, 0, 1).name


def _import_tf():
    # TensorFlow's start-up chatter; its oneDNN kernels are moot here, where it only reads and writes files.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
    except ImportError:
        raise ValueError("writing OpenAI's TensorFlow checkpoints needs TensorFlow: pip install gptjax[tf]") from None
    return tf


# ---------------------------------------------------------------------------------------------
# The table


def _table(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(data) < _FOOTER or int.from_bytes(data[-8:], "little") != _MAGIC:
        raise ValueError("truncated or not a TensorFlow checkpoint index (no table footer)")
    footer = data[-_FOOTER:]
    _, pos = _varint(footer, 0)  # the metaindex block (empty in checkpoints)
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    for _, handle in _block_records(_block(data, index_offset, index_size)):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        yield from _block_records(_block(data, offset, size))


def _block(data: bytes, offset: int, size: int) -> bytes:
    end = offset + size + _TRAILER
    if end > len(data) - _FOOTER:
        raise ValueError(f"truncated: a block ends at byte {end} of {len(data) - _FOOTER}")
    stored = int.from_bytes(data[offset + size + 1 : end], "little")
    if _unmask(stored) != google_crc32c.value(data[offset : offset + size + 1]):
        raise ValueError(f"corrupt: the block at byte {offset} does not match its checksum")
    if data[offset + size] != 0:
        raise ValueError(f"the block at byte {offset} is compressed (type {data[offset + size]}); unsupported")
    return data[offset : offset + size]


def _block_records(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 * (1 + num_restarts)
    if limit < 0:
        raise ValueError("a block's restart array is larger than the block")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + size > limit:
            raise ValueError(f"a record at byte {pos} runs past its block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + size]
        pos += size


def _unmask(crc: int) -> int:
    """LevelDB stores crc32c values rotated and offset ("masked") so that a crc of data holding crcs differs."""
    rot = (crc - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Protocol buffers: the two messages need a handful of scalar fields, so a wire-format decoder is shorter
# than generating classes (their .proto files live in TensorFlow)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("a varint runs past the end of its record")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a serialized message: ints, or bytes for length-delimited fields."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos : pos + n], "little"), pos + n
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("a protobuf field runs past the end of its record")
        yield field, wire, value


def _entry(value: bytes, name: str, num_shards: int) -> Entry:
    """A BundleEntryProto: dtype 1, shape 2 (TensorShapeProto: dim 2 {size 1}), shard_id 3, offset 4,
    size 5, crc32c 6, slices 7."""
    f: dict[int, int | bytes] = {}
    dims: list[int] = []
    for field, _, v in _fields(value):
        if field == 2:
            dims += [dict((g, w) for g, _, w in _fields(dim)).get(1, 0) for d, _, dim in _fields(v) if d == 2]
        f[field] = v
    if 7 in f:
        raise ValueError(f"tensor {name!r} is saved in slices (a partitioned variable); unsupported")
    dtype_id = f.get(1, 0)
    if dtype_id not in _DTYPES:
        raise ValueError(f"tensor {name!r} has TensorFlow dtype {dtype_id}, not a numeric type gptjax reads")
    e = Entry(np.dtype(_DTYPES[dtype_id]), tuple(dims), f.get(3, 0), f.get(4, 0), f.get(5, 0), _unmask(f.get(6, 0)))
    if e.shard >= num_shards or e.size != int(np.prod(e.shape, dtype=np.int64)) * e.dtype.itemsize:
        raise ValueError(f"tensor {name!r} has an inconsistent entry (shape {e.shape}, {e.size} bytes)")
    return e
