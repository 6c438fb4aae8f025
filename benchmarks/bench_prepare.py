"""Text MB/s and tokens/s of ``python -m gptjax.prepare`` with 1 and N workers, on a generated corpus.

The corpus is documents of random words drawn from the bundled short story's vocabulary (English-like text
for GPT-2's tokenizer, a few KB each), written once as jsonl and as parquet. Each input is prepared with
``--workers 1`` and ``--workers N`` (best of ``--repeats``), shards to a temporary folder, and compared with
tiktoken's own ``encode_ordinary_batch`` over the same documents held in memory (its default thread count,
and one thread: the same CPU budget as one worker).

    python benchmarks/bench_prepare.py                    # ~200 MB of text: a few minutes on 2 cores
    python benchmarks/bench_prepare.py --mb 5 --repeats 1 # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402

from gptjax.cli import prepare  # noqa: E402
from gptjax.tokenizer import get_tokenizer, load_default_corpus  # noqa: E402


def make_documents(mb: float, seed: int = 0) -> list[str]:
    words = re.findall(r"\S+", load_default_corpus())
    rng = np.random.default_rng(seed)
    docs, size = [], 0
    while size < mb * 1e6:
        n = int(rng.integers(300, 1200))
        doc = " ".join(words[i] for i in rng.integers(0, len(words), n))
        docs.append(doc)
        size += len(doc.encode())
    return docs


def write_inputs(docs: list[str], folder: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = folder / "corpus.jsonl"
    with open(jsonl, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    parquet = folder / "corpus.parquet"
    pq.write_table(pa.table({"text": docs}), parquet, row_group_size=4096)
    return {"jsonl": jsonl, "parquet": parquet}


def time_prepare(src: Path, workers: int, out: Path, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        argv = [str(src), "--out", str(out), "--workers", str(workers), "--val-tokens", "100000",
                "--shard-tokens", "10000000", "--no-progress", "--overwrite"]
        start = time.perf_counter()
        assert prepare.main(argv) == 0
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200, help="MB of text to generate (default: 200)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="N (default: the CPU count)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting, the best kept (default: 2)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "prepare.json"))
    args = p.parse_args()

    docs = make_documents(args.mb)
    text_mb = sum(len(d.encode()) for d in docs) / 1e6
    enc = get_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = write_inputs(docs, tmp)
        for threads in (None, 1):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                ids = enc.encode_ordinary_batch(docs, **({} if threads is None else {"num_threads": threads}))
                best = min(best, time.perf_counter() - start)
            tokens = sum(len(x) for x in ids) + len(docs)  # + the <|endoftext|> between documents
            del ids
            rows.append({"method": f"tiktoken encode_ordinary_batch ({threads or 'default'} threads)",
                         "input": "memory", "workers": None, "seconds": best,
                         "text_mb_s": text_mb / best, "tokens_s": tokens / best})
        for kind, src in inputs.items():
            for workers in sorted({1, args.workers}):
                s = time_prepare(src, workers, tmp / f"out-{kind}", args.repeats)
                rows.append({"method": "gptjax.prepare", "input": kind, "workers": workers, "seconds": s,
                             "text_mb_s": text_mb / s, "tokens_s": tokens / s})
    by = {(r["input"], r["workers"]): r for r in rows}
    speedup = {kind: by[(kind, args.workers)]["text_mb_s"] / by[(kind, 1)]["text_mb_s"] for kind in inputs}
    print_table(rows, [("method", "method", "s"), ("input", "input", "s"), ("workers", "workers", "d"),
                       ("seconds", "s", ".1f"), ("text_mb_s", "MB/s", ".2f"), ("tokens_s", "tokens/s", ",.0f")])
    print(f"{args.workers} workers / 1 worker: " + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()))
    write_json(args.out, {"machine": machine_info(), "text_mb": text_mb, "documents": len(docs),
                          "tokens": tokens, "repeats": args.repeats, "rows": rows,
                          "speedup_n_over_1": speedup})


if __name__ == "__main__":
    main()
