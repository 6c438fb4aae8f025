"""Causal self-attention alone, forward and forward+backward: XLA's (what the CPU ran before) against
gptjax.attention's blocked attention, interleaved in one process so that a busy machine slows both alike.

    python benchmarks/bench_attention.py [--batch 1 4] [--seq 1024] [--blocks 128 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gptjax import platform  # noqa: E402
from gptjax.attention import BLOCK, blocked_causal_attention  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--blocks", type=int, nargs="+", default=[BLOCK])
    parser.add_argument("--rounds", type=int, default=7, help="timed calls of each variant (median reported)")
    args = parser.parse_args(argv)
    variants = {"xla": platform.xla_attention}
    variants.update({f"blocked{b}": functools.partial(blocked_causal_attention, block=b) for b in args.blocks})
    for batch in args.batch:
        shape = (batch, args.seq, args.heads, args.head_dim)
        q, k, v, g = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 4))
        calls = {}
        for name, attention in variants.items():
            forward = jax.jit(attention)
            both = jax.jit(jax.grad(lambda q, k, v, a=attention: jnp.vdot(a(q, k, v), g), argnums=(0, 1, 2)))
            jax.block_until_ready((forward(q, k, v), both(q, k, v)))
            calls[name] = (forward, both)
        times = {name: ([], []) for name in calls}
        for _ in range(args.rounds):
            for name, fns in calls.items():
                for fn, out in zip(fns, times[name]):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(q, k, v))
                    out.append(time.perf_counter() - start)
        print(f"{list(shape)} float32, load average {os.getloadavg()[0]:.2f}")
        for name, (fwd, both) in times.items():
            print(f"  {name:12s} forward {1e3 * statistics.median(fwd):7.1f} ms   "
                  f"forward+backward {1e3 * statistics.median(both):7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
