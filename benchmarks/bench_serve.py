"""``python -m gptjax.serve`` under 1, 4, 8 and 16 concurrent streaming clients, beside gptjax's own decoder
and llama.cpp's ``llama-server`` on the same weights, in one run (bounded requests, 127.0.0.1 only).

A randomly initialised model (default gpt2-small: the 124M shape at GPT-2's context of 1024) is saved and
served in a subprocess with ``--max-batch 8``; each client sends ``--requests`` streaming completions one
after another (a short prompt, ``--max-tokens`` new tokens, no early stop: end of text is ignored where
the server allows it and rare on random weights), and every chunk's arrival is recorded. Rows: aggregate
tokens/s, time to first token and inter-token latency p50 / p99, per server x sampler x client count.
Samplers: greedy, and temperature 0.8 with top-k 40 (``--top-k``).

Baselines, measured first in this process with no server running: ``gptjax.generate`` at batch 1 and 8,
greedy and sampled, from each weights dtype served. Servers (``--servers``):
  gptjax:float32, gptjax:int8   python -m gptjax.serve --weights-dtype ...
  llama:f32, llama:q8_0         llama-server on gptjax.convert's GGUF export of the same weights
                                (--parallel 8, continuous batching, a context of 8 x 1024, every core)

Building llama-server (once, ~10 minutes on 2 cores; the benchmark's job, never CI's): the llama.cpp
vendored in llama-cpp-python 0.3.36's source package,

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
    cmake --build build --target llama-server -j2          # then --llama-server build/bin/llama-server

``--long-prompt``: 7 greedy streams decoding while a 900-token prompt arrives; the 7 streams' inter-token
latency p50 / p99 during its prefill, against the same without it.

``--soak N``: instead of the table, N requests over about ``--soak-minutes`` from 8 client threads against
gptjax.serve (float32): mixed prompt and answer lengths, greedy and sampled, streamed or not, some clients
disconnecting mid-stream and some requests malformed. Reported: every finished greedy answer against
``gptjax.generate``'s, the active slots at the end (``/metrics``), the server's resident memory growth, and
any traceback in its log (``results/serve_soak.json``).

    python benchmarks/bench_serve.py --llama-server PATH                 # the issue's table: ~25 minutes
    python benchmarks/bench_serve.py --soak 2000 --soak-minutes 10       # the soak run
    python benchmarks/bench_serve.py --quick                             # a tiny model, gptjax only: seconds
"""

from __future__ import annotations

import argparse
import collections
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
from gptjax import GPTConfig  # noqa: E402
from gptjax.sampling import generate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = GPTConfig(vocab_size=50257, context_length=256, emb_dim=32, n_layers=2, n_heads=2)  # --config tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(url: str, prompt, max_tokens: int, sampler: dict, seed: int) -> dict:
    """One streaming request: its submission time, each text chunk's arrival, and the completion tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "seed": seed,
            "stream_options": {"include_usage": True}, "ignore_eos": True, **sampler}
    start, arrivals, tokens = time.perf_counter(), [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals, "tokens": tokens if tokens is not None else len(arrivals)}


def latency_stats(results: list[dict]) -> dict:
    ttft = [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    pct = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {"ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
            "itl_p99_ms": pct(itl, 99)}


def run_level(url: str, clients: int, requests: int, max_tokens: int, sampler: dict) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            r = stream_one(url, f"Every effort moves you {i} {j}", max_tokens, sampler, seed=1000 * i + j)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    generated = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "generated_tokens": generated, "seconds": wall,
            "tokens_s": generated / wall, **latency_stats(results)}


def long_prompt_case(url: str, max_tokens: int, prompt_len: int) -> dict:
    """7 greedy streams; once they decode, a ``prompt_len``-token prompt arrives: their inter-token latency
    while it is prefilled (from its arrival to its first token) against before it."""
    greedy = {"temperature": 0}
    results: list[dict] = []
    started = threading.Barrier(8)

    def stream(i):
        started.wait()
        results.append(stream_one(url, f"Every effort moves you {i}", max_tokens, greedy, seed=i))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(2.0)
    ids = np.random.default_rng(0).integers(0, 50000, prompt_len).tolist()
    long = stream_one(url, ids, 4, greedy, seed=99)
    for t in threads:
        t.join()
    window = (long["start"], long["arrivals"][0])
    during = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:]) if window[0] <= b <= window[1]
              or a <= window[0] <= b]
    before = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:]) if b < window[0]]
    pct = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {"prompt_tokens": prompt_len, "prefill_ttft_ms": 1e3 * (window[1] - window[0]),
            "itl_before_p50_ms": pct(before, 50), "itl_before_p99_ms": pct(before, 99),
            "itl_during_p50_ms": pct(during, 50), "itl_during_p99_ms": pct(during, 99),
            "itl_during_max_ms": 1e3 * max(during) if during else None}


def soak(url: str, proc: subprocess.Popen, params, cfg: GPTConfig, total: int, minutes: float) -> dict:
    """``total`` requests spread over ``minutes`` from 8 threads; see the module docstring."""
    rng = np.random.default_rng(0)
    tok = gptjax.get_tokenizer()
    greedy_pool = [(f"Soak prompt {i}: " + "every effort " * int(rng.integers(1, 40)), int(rng.integers(1, 60)))
                   for i in range(24)]
    expected = {}
    for prompt, n in greedy_pool:
        ids = tok.encode(prompt)
        out = generate(params, cfg, np.array([ids]), n, eos_id=50256)[0, len(ids):].tolist()
        expected[(prompt, n)] = tok.decode(out[: out.index(50256)] if 50256 in out else out)
    rss = lambda: int(next(line.split()[1] for line in open(f"/proc/{proc.pid}/status")  # noqa: E731
                           if line.startswith("VmRSS"))) * 1024
    rss_start, counts, mismatches, lock = rss(), collections.Counter(), [], threading.Lock()
    interval = 60 * minutes / total * 8

    def one(i: int, rng: np.random.Generator) -> None:
        kind = rng.choice(["greedy", "sampled", "disconnect", "malformed"], p=[0.5, 0.3, 0.1, 0.1])
        if kind == "malformed":
            body = rng.choice([b"{not json", json.dumps({"prompt": "x", "max_tokens": -3}).encode(),
                               json.dumps({"prompt": "x", "temperature": "hot"}).encode()])
            status = httpx.post(url + "/v1/completions", content=body, timeout=60).status_code
            with lock:
                counts["malformed_" + ("400" if status == 400 else str(status))] += 1
            return
        if kind == "greedy":
            prompt, n = greedy_pool[int(rng.integers(len(greedy_pool)))]
            stream = bool(rng.integers(2))
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}
            if stream:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
                    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
                text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            else:
                text = httpx.post(url + "/v1/completions", json=body, timeout=600).json()["choices"][0]["text"]
            with lock:
                counts["greedy"] += 1
                if text != expected[(prompt, n)]:
                    mismatches.append({"prompt": prompt, "max_tokens": n, "got": text,
                                       "expected": expected[(prompt, n)]})
            return
        body = {"prompt": "Sampled " * int(rng.integers(1, 100)), "max_tokens": int(rng.integers(1, 120)),
                "temperature": float(rng.uniform(0.3, 1.5)), "top_k": int(rng.integers(0, 100)),
                "top_p": float(rng.uniform(0.5, 1.0)), "seed": i, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            for k, _ in enumerate(r.iter_lines()):
                if kind == "disconnect" and k >= 3:
                    break  # the client goes away mid-stream
        with lock:
            counts[kind] += 1

    def worker(w: int) -> None:
        rng = np.random.default_rng(1 + w)  # a generator per thread: they are not thread-safe
        for i in range(w, total, 8):
            start = time.perf_counter()
            one(i, rng)
            time.sleep(max(0.0, interval * float(rng.uniform(0, 2)) - (time.perf_counter() - start)))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    time.sleep(2)
    metrics = httpx.get(url + "/metrics", timeout=30).text
    active = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("gptjax_active_slots")))
    return {"requests": total, "seconds": seconds, "by_kind": dict(counts), "greedy_mismatches": mismatches,
            "active_slots_at_end": active, "rss_start_bytes": rss_start, "rss_end_bytes": rss(),
            "rss_growth_bytes": rss() - rss_start}


def start_server(kind: str, variant: str, weights: Path, cfg: GPTConfig, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "gptjax":
        cmd = [sys.executable, "-m", "gptjax.serve", "--weights", str(weights), "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", "256", "--weights-dtype", variant]
    else:
        gguf = weights.parent / f"model-{variant}.gguf"
        if not gguf.exists():
            gptjax.save_weights(gptjax.load_weights(weights)[0], cfg, gguf, format="gguf", gguf_type=variant)
        cmd = [args.llama_server, "-m", str(gguf), "--port", str(port), "-np", str(args.max_batch), "-cb",
               "-c", str(args.max_batch * cfg.context_length), "-t", str(os.cpu_count()), "--no-webui",
               "--log-disable"]
    log = open(weights.parent / f"{kind}-{variant}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def generate_baselines(params, cfg, dtypes: list[str], samplers: dict, max_tokens: int) -> list[dict]:
    """gptjax.generate's tokens/s at batch 1 and 8: the median of 3 runs after a compiling one (a best-of
    figure would set a lucky run against the servers' single aggregate; runs here vary by ~10%)."""
    rows = []
    for dtype in dtypes:
        for name, sampler in samplers.items():
            kw = {} if sampler.get("temperature", 0) == 0 else dict(temperature=sampler["temperature"],
                                                                     top_k=sampler.get("top_k"), rng=0)
            for batch in (1, 8):
                ids = np.random.default_rng(0).integers(0, 50000, (batch, 8))
                generate(params, cfg, ids, max_tokens, weights_dtype=dtype, **kw)
                runs = [_timed(lambda: generate(params, cfg, ids, max_tokens, weights_dtype=dtype, **kw))
                        for _ in range(3)]
                rows.append({"weights_dtype": dtype, "sampler": name, "batch": batch,
                             "tokens_s": batch * max_tokens / float(np.median(runs)),
                             "tokens_s_runs": [batch * max_tokens / t for t in runs]})
                print(rows[-1], flush=True)
    return rows


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model and few tokens: checks the script runs")
    p.add_argument("--config", default="gpt2-small", help="the served shape: a gptjax preset, or tiny (2 layers, "
                   "width 32, context 256) (default: gpt2-small)")
    p.add_argument("--servers", nargs="+", default=["gptjax:float32", "gptjax:int8", "llama:f32", "llama:q8_0"])
    p.add_argument("--samplers", nargs="+", choices=["greedy", "top-k"], default=["greedy", "top-k"])
    p.add_argument("--top-k", type=int, default=40, help="the sampled rows' top-k, at temperature 0.8 (default 40)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client (default: 2)")
    p.add_argument("--max-tokens", type=int, default=100, help="new tokens per request (default: 100)")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots of every server (default: 8)")
    p.add_argument("--long-prompt", type=int, default=900, metavar="N",
                   help="the long-prompt case's prompt length (0: skip it; default: 900)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), metavar="PATH",
                   help="the llama-server binary (default: $LLAMA_SERVER); llama rows are skipped without it")
    p.add_argument("--soak", type=int, default=0, metavar="N", help="run the soak test with N requests instead")
    p.add_argument("--soak-minutes", type=float, default=10.0)
    p.add_argument("--out", default=None, help="results JSON (default: results/serve.json, or serve_soak.json)")
    args = p.parse_args()
    out = args.out or str(ROOT / "benchmarks" / "results" / ("serve_soak.json" if args.soak else "serve.json"))
    if args.quick:
        args.config, args.servers, args.max_tokens, args.long_prompt = "tiny", ["gptjax:float32"], 16, 200
    cfg = TINY if args.config == "tiny" else gptjax.get_config(args.config)
    servers = [s.split(":") for s in args.servers if not (s.startswith("llama") and not args.llama_server)]
    samplers = {"greedy": {"temperature": 0}, "top-k": {"temperature": 0.8, "top_k": args.top_k}}
    samplers = {name: samplers[name] for name in args.samplers}

    params = gptjax.init_params(cfg, seed=0)
    if args.soak:
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "model"
            gptjax.save_weights(params, cfg, weights)
            proc, url = start_server("gptjax", "float32", weights, cfg, args)
            try:
                result = soak(url, proc, params, cfg, args.soak, args.soak_minutes)
            finally:
                proc.terminate()
                proc.wait(timeout=120)
            log = (Path(tmp) / "gptjax-float32.log").read_text()
        result["log_errors"] = [line for line in log.splitlines() if "Traceback" in line or "ERROR" in line]
        print(json.dumps({k: v for k, v in result.items() if k != "greedy_mismatches"}, indent=1),
              f"greedy mismatches: {len(result['greedy_mismatches'])}")
        write_json(out, {"machine": machine_info(), "config": args.config, **result})
        return
    dtypes = sorted({v for k, v in servers if k == "gptjax"})
    baselines = generate_baselines(params, cfg, dtypes, samplers, args.max_tokens)
    rows, long_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model"
        gptjax.save_weights(params, cfg, weights)
        for kind, variant in servers:
            proc, url = start_server(kind, variant, weights, cfg, args)
            try:
                stream_one(url, "warm", 4, {"temperature": 0}, seed=0)
                for name, sampler in samplers.items():
                    for clients in args.clients:
                        row = {"server": kind, "weights": variant, "sampler": name,
                               **run_level(url, clients, args.requests, args.max_tokens, sampler)}
                        rows.append(row)
                        print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                if args.long_prompt and variant in ("float32", "f32"):
                    long_rows.append({"server": kind, "weights": variant,
                                      **long_prompt_case(url, args.max_tokens * 2, args.long_prompt)})
                    print(long_rows[-1], flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    print_table(rows, [("server", "server", "s"), ("weights", "weights", "s"), ("sampler", "sampler", "s"),
                       ("clients", "clients", "d"), ("tokens_s", "tokens/s", ".1f"),
                       ("ttft_p50_ms", "TTFT p50 ms", ".0f"), ("ttft_p99_ms", "TTFT p99 ms", ".0f"),
                       ("itl_p50_ms", "ITL p50 ms", ".1f"), ("itl_p99_ms", "ITL p99 ms", ".1f")])
    write_json(out, {"machine": machine_info(), "config": args.config,
                          "max_batch": args.max_batch, "max_tokens": args.max_tokens, "top_k": args.top_k,
                          "generate": baselines, "rows": rows, "long_prompt": long_rows})


if __name__ == "__main__":
    main()
