"""Tokenize text files into uint16 token files for pretraining on corpora larger than memory.

    python scripts/prepare_corpus.py books/*.txt --out data/books [--val-ratio 0.1]

The files are joined by ``<|endoftext|>``; the last ``--val-ratio`` of the tokens becomes ``DIR/val.bin`` and the
rest ``DIR/train.bin``. Tokens stream to disk file by file, so only one input file is in memory at a time.
Train on them with ``python -m gptjax.train --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptjax.atomic import atomic_file
from gptjax.data import TOKEN_DTYPE, read_corpus
from gptjax.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, get_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="UTF-8 text files")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for train.bin and val.bin (created)")
    p.add_argument("--val-ratio", type=float, default=0.1,
                   help="fraction of the tokens, at the end, for validation (default: 0.1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def prepare_corpus(inputs: list[str], out: str, val_ratio: float = 0.1, progress: bool = True) -> tuple[int, int]:
    """Write ``out/train.bin`` and ``out/val.bin``; returns their token counts."""
    if not inputs:
        raise ValueError("no input files given; pass one or more text files")
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    if not 0.0 < val_ratio < 1.0:
        raise ValueError(f"--val-ratio must be between 0 and 1 (exclusive), got {val_ratio}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer()

    with contextlib.ExitStack() as stack:
        train_tmp = stack.enter_context(atomic_file(out_dir / "train.bin"))
        n_total = 0
        with open(train_tmp, "wb") as f:
            for i, path in enumerate(tqdm(paths, desc="tokenizing", unit="file", disable=not progress)):
                ids = tokenizer.encode(read_corpus(path), allowed_special={ENDOFTEXT})
                if i:
                    np.asarray([ENDOFTEXT_ID], dtype=TOKEN_DTYPE).tofile(f)
                    n_total += 1
                np.asarray(ids, dtype=TOKEN_DTYPE).tofile(f)
                n_total += len(ids)
        n_train = int(n_total * (1.0 - val_ratio))
        n_val = n_total - n_train
        if n_train == 0 or n_val == 0:
            part = "training" if n_train == 0 else "validation"
            raise ValueError(f"the {part} split would be empty: the inputs have {n_total} tokens "
                             f"(--val-ratio {val_ratio}); add text or change --val-ratio")
        # The validation tail is copied out, then the temp file is cut down to the training head; both files
        # replace their old versions only once everything has succeeded.
        val_tmp = stack.enter_context(atomic_file(out_dir / "val.bin"))
        tokens = np.memmap(train_tmp, dtype=TOKEN_DTYPE, mode="r")
        tokens[n_train:].tofile(val_tmp)
        del tokens
        with open(train_tmp, "r+b") as f:
            f.truncate(n_train * TOKEN_DTYPE.itemsize)
    return n_train, n_val


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        n_train, n_val = prepare_corpus(args.inputs, args.out, args.val_ratio, args.progress)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"{len(args.inputs)} files, {n_train + n_val:,} tokens: {out / 'train.bin'} has {n_train:,} tokens, "
          f"{out / 'val.bin'} has {n_val:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
