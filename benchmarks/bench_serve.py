"""Aggregate tokens/s, time to first token and inter-token latency of ``python -m gptjax.serve`` under 1, 4, 8
and 16 concurrent streaming clients (bounded requests, 127.0.0.1 only).

A randomly initialised model of the 124M shape (GPT_CONFIG_124M: context 256) is saved to a temporary
folder and served in a subprocess with its default ``--max-batch 8``; each client sends ``--requests``
streaming completions one after another (a short prompt, ``--max-tokens`` new tokens, greedy, no early
stop), and every chunk's arrival time is recorded. The clients run on the same 2 cores as the server, so
the figures include their cost.

    python benchmarks/bench_serve.py                                  # 124M shape: some 10 minutes on 2 cores
    python benchmarks/bench_serve.py --quick                          # tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, write_json  # noqa: E402

import gptjax  # noqa: E402
from gptjax import GPT_CONFIG_124M, GPTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming request: its submission time, each text chunk's arrival, and the completion tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, arrivals, tokens = time.perf_counter(), [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals, "tokens": tokens}


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            r = stream_one(url, f"Every effort moves you {i} {j}", max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    generated = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "generated_tokens": generated, "seconds": wall,
            "tokens_s": generated / wall,
            "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)), "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
            "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)), "itl_p99_ms": 1e3 * float(np.percentile(itl, 99))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model and few tokens: checks the script runs")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client (default: 2)")
    p.add_argument("--max-tokens", type=int, default=100, help="new tokens per request (default: 100)")
    p.add_argument("--max-batch", type=int, default=8, help="the server's decode slots (default: 8, its default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = p.parse_args()
    cfg = (GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=2) if args.quick
           else GPT_CONFIG_124M)
    max_tokens = 16 if args.quick else args.max_tokens

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model"
        gptjax.save_weights(gptjax.init_params(cfg, seed=0), cfg, weights)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "gptjax.serve", "--weights", str(weights), "--port", str(port),
                                 "--max-batch", str(args.max_batch), "--max-queue", "256"],
                                cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ})
        try:
            line = proc.stdout.readline()
            assert "serving on" in line, line
            url = f"http://127.0.0.1:{port}"
            stream_one(url, "warm", 4)
            rows = [run_level(url, c, args.requests, max_tokens) for c in args.clients]
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    by = {r["clients"]: r["tokens_s"] for r in rows}
    ratio = by[8] / by[1] if 8 in by and 1 in by else None
    print_table(rows, [("clients", "clients", "d"), ("requests", "requests", "d"), ("tokens_s", "tokens/s", ".1f"),
                       ("ttft_p50_ms", "TTFT p50 ms", ".0f"), ("ttft_p99_ms", "TTFT p99 ms", ".0f"),
                       ("itl_p50_ms", "ITL p50 ms", ".1f"), ("itl_p99_ms", "ITL p99 ms", ".1f")])
    if ratio:
        print(f"8 concurrent / 1 concurrent aggregate tokens/s: {ratio:.2f}x")
    write_json(args.out, {"machine": machine_info(), "config": "tiny" if args.quick else "GPT_CONFIG_124M",
                          "max_batch": args.max_batch, "max_tokens": max_tokens, "rows": rows,
                          "ratio_8_over_1": ratio})


if __name__ == "__main__":
    main()
