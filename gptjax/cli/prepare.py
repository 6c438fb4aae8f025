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
import dataclasses
import sys

from gptjax import cli
from gptjax.corpus import PrepareConfig, cpu_count, prepare


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
    p.add_argument("--workers", type=int, default=cpu_count(), metavar="N",
                   help=f"tokenizing processes (default: the CPU count, {cpu_count()} here)")
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
    args = vars(build_parser().parse_args(argv))
    try:
        state = prepare(PrepareConfig(**{f.name: args[f.name] for f in dataclasses.fields(PrepareConfig)}))
    except (ValueError, OSError) as e:
        return cli.fail(e)
    except KeyboardInterrupt:
        print(f"interrupted: the finished shards in {args['out']} are kept; continue with the same command and "
              "--resume", file=sys.stderr)
        return 130
    total = sum(s["tokens"] for s in state["shards"])
    print(f"{state['documents']:,} documents, {total:,} tokens: {len(state['shards'])} shards in {args['out']} "
          f"(validation {state['shards'][0]['tokens']:,} tokens, training {total - state['shards'][0]['tokens']:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
