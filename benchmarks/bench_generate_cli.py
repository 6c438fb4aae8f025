"""Whole-process decoding speed of ``python -m gptjax.generate``: what a user timing the command gets, against
the warm in-process rate, on the first run (empty compilation cache) and the second (the cache the first
filled).

    python benchmarks/bench_generate_cli.py [--config gpt2-small] [--weights-dtypes float32 bfloat16 int8]
        [--new-tokens 310] [--repeats 3]

Random weights of --config are saved once as a gptjax checkpoint. For each weights dtype, every round runs
the command four times, greedy (--temperature 0): with --max-new-tokens 10 and N (default 310), each first
with a fresh, empty --compile-cache folder ("first run") and then again with the folder that run filled
("second run"). Start-up, weight loading and the prompt cost the same in a pair, so the whole-process rate
is (N - 10) / (seconds of the N run - seconds of the 10 run). The warm in-process rate is
gptjax.sampling.generate's on the same weights and prompt in this process after a warm-up call, measured in
the same rounds; a row reports medians over the rounds and the ratio of each whole-process rate to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gptjax  # noqa: E402
from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from gptjax.quantize import WEIGHTS_DTYPES  # noqa: E402
from gptjax.sampling import generate  # noqa: E402
from gptjax.tokenizer import get_tokenizer  # noqa: E402

PROMPT = "Every effort moves you"
SHORT = 10


def run_command(weights: Path, dtype: str, new_tokens: int, cache: Path) -> float:
    """Seconds of one whole `python -m gptjax.generate` process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "GPTJAX_COMPILE"))}
    command = [sys.executable, "-m", "gptjax.generate", "--weights", str(weights), "--prompt", PROMPT,
               "--max-new-tokens", str(new_tokens), "--temperature", "0", "--weights-dtype", dtype,
               "--compile-cache", str(cache)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpt2-small", help="gptjax preset name or alias (default: gpt2-small)")
    parser.add_argument("--weights-dtypes", nargs="+", choices=WEIGHTS_DTYPES, default=list(WEIGHTS_DTYPES))
    parser.add_argument("--new-tokens", type=int, default=310, help=f"the long run's tokens (the short run's: {SHORT})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate_cli.json"))
    args = parser.parse_args(argv)
    if args.new_tokens <= SHORT:
        parser.error(f"--new-tokens must be above {SHORT}, the short run's")

    info = machine_info()
    cfg = gptjax.get_config(args.config)
    params = gptjax.init_params(cfg, seed=0)
    prompt = np.array([get_tokenizer().encode(PROMPT)], np.int32)
    n = args.new_tokens - SHORT
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"
        gptjax.save_weights(params, cfg, weights)
        runs = {dtype: {"first": [], "second": [], "in_process": []} for dtype in args.weights_dtypes}
        for dtype in args.weights_dtypes:  # compiles the in-process programs
            generate(params, cfg, prompt, args.new_tokens, weights_dtype=dtype)
        for r in range(args.repeats):
            for dtype in args.weights_dtypes:
                seconds = {}
                for new_tokens in (SHORT, args.new_tokens):
                    cache = Path(tmp) / f"cache-{dtype}-{new_tokens}-{r}"
                    seconds[new_tokens] = (run_command(weights, dtype, new_tokens, cache),
                                           run_command(weights, dtype, new_tokens, cache))
                for i, which in enumerate(("first", "second")):
                    runs[dtype][which].append(n / (seconds[args.new_tokens][i] - seconds[SHORT][i]))
                start = time.perf_counter()
                generate(params, cfg, prompt, args.new_tokens, weights_dtype=dtype)
                long_s = time.perf_counter() - start
                start = time.perf_counter()
                generate(params, cfg, prompt, SHORT, weights_dtype=dtype)
                runs[dtype]["in_process"].append(n / (long_s - (time.perf_counter() - start)))
            print(f"  round {r + 1}/{args.repeats} done", flush=True)

    for dtype, r in runs.items():
        warm = statistics.median(r["in_process"])
        row = dict(config=args.config, weights_dtype=dtype, tokens=n, in_process_tokens_per_s=round(warm, 2))
        for which in ("first", "second"):
            row[f"{which}_run_tokens_per_s"] = round(statistics.median(r[which]), 2)
            row[f"{which}_run_rounds"] = [round(x, 2) for x in r[which]]
            row[f"{which}_run_vs_in_process"] = round(statistics.median(a / b for a, b in zip(r[which], r["in_process"])), 3)
        row["in_process_rounds"] = [round(x, 2) for x in r["in_process"]]
        rows.append(row)

    print(f"\n{args.config}, greedy, ({args.new_tokens} - {SHORT}) new tokens, {args.repeats} rounds; "
          f"{info['cpus']} CPUs, load average at start {info.get('load_average_1m_at_start')}")
    print_table(rows, [("weights_dtype", "weights", ""), ("in_process_tokens_per_s", "in-process tokens/s", ".2f"),
                       ("first_run_tokens_per_s", "first run", ".2f"), ("first_run_vs_in_process", "vs in-process", ".2f"),
                       ("second_run_tokens_per_s", "second run", ".2f"),
                       ("second_run_vs_in_process", "vs in-process", ".2f")])
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    out = write_json(args.out, dict(benchmark="generate_cli", prompt=PROMPT, short_new_tokens=SHORT,
                                    long_new_tokens=args.new_tokens, repeats=args.repeats, machine=info,
                                    results=rows))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
