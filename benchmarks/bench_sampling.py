"""What sampling costs ``gptjax.generate`` against greedy decoding: tokens/s at batch 1 and 8 for greedy,
temperature 0.8 with top-k 50, and temperature 0.8 with top-p 0.95, on the 124M shape at GPT-2's context.

Each case is compiled once, then the cases are timed in turn ``--repeats`` times (interleaved, so a slow
spell of the machine falls on all of them) and each reports its median; the ratio is the sampled median over
the greedy one at the same batch and weights dtype.

    python benchmarks/bench_sampling.py                       # results/sampling.json
    python benchmarks/bench_sampling.py --weights-dtype int8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, timed, write_json  # noqa: E402

import gptjax  # noqa: E402
from gptjax import generate  # noqa: E402

SAMPLERS = {"greedy": {}, "top-k 50": dict(temperature=0.8, top_k=50, rng=0),
            "top-p 0.95": dict(temperature=0.8, top_p=0.95, rng=0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gpt2-small")
    p.add_argument("--weights-dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "int8"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "sampling.json"))
    args = p.parse_args()
    cfg = gptjax.get_config(args.config)
    params = gptjax.init_params(cfg, seed=0)
    cases = [(dtype, batch, name) for dtype in args.weights_dtype for batch in args.batches for name in SAMPLERS]
    prompts = {b: np.random.default_rng(0).integers(0, 50000, (b, 8)) for b in args.batches}

    def run(dtype, batch, name):
        out = generate(params, cfg, prompts[batch], args.max_tokens, weights_dtype=dtype, **SAMPLERS[name])
        return np.asarray(out)

    for case in cases:
        run(*case)  # compile
    times = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case in cases:
            times[case].append(timed(lambda: run(*case)))
    rows = []
    for dtype, batch, name in cases:
        tokens_s = batch * args.max_tokens / float(np.median(times[(dtype, batch, name)]))
        greedy = batch * args.max_tokens / float(np.median(times[(dtype, batch, "greedy")]))
        rows.append({"weights_dtype": dtype, "batch": batch, "sampler": name, "tokens_s": tokens_s,
                     "vs_greedy": tokens_s / greedy,
                     "tokens_s_runs": [batch * args.max_tokens / t for t in times[(dtype, batch, name)]]})
    print_table(rows, [("weights_dtype", "weights", "s"), ("batch", "batch", "d"), ("sampler", "sampler", "s"),
                       ("tokens_s", "tokens/s", ".1f"), ("vs_greedy", "vs greedy", ".2f")])
    write_json(args.out, {"machine": machine_info(), "config": args.config, "max_tokens": args.max_tokens,
                          "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
