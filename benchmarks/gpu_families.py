"""Qwen3-0.6B and Llama 3.2 1B on one GPU: the bf16 train step that ``python -m gptjax.aot`` sized ahead of time
(docs/performance.md's rows, T=4096, 2 rows, with and without remat), run for real, its peak device memory
beside the compiled plan's, its step time and MFU; then KV-cached bf16 decode at batch 1 and 8.

    python benchmarks/gpu_families.py [--out FILE.json] [--models qwen3-0.6b llama-3.2-1b] [--steps 3]
        [--decode-models qwen3-0.6b]

Each train case runs in a process of its own, so that the device's peak memory is that case's alone (each
compiles for ~40 s on an H200's host); the JSON is rewritten after every row. Run by
benchmarks/device_check.sh on a machine with an NVIDIA GPU; on a CPU, --context 32 tries it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gptjax  # noqa: E402
from benchmarks.bench_decode_families import gptjax_rate, random_params  # noqa: E402
from benchmarks.common import datasheet_flops, machine_info, print_table, write_json  # noqa: E402
from gptjax.aot_compile import planned_sizes  # noqa: E402
from gptjax.flops import flops_per_token  # noqa: E402
from gptjax.presets import model_preset  # noqa: E402
from gptjax.training import TrainConfig, init_opt_state, make_optimizer, make_train_step  # noqa: E402


def train_case(model: str, remat: bool, batch: int, context: int, steps: int) -> dict:
    """One bf16 AdamW step of ``model``, compiled, then ``steps`` timed; the device's peak memory."""
    cfg = model_preset(model)
    params = gptjax.init_params(cfg, seed=0)
    optimizer = make_optimizer(TrainConfig(lr=4e-4, weight_decay=0.1), 100)
    step = make_train_step(cfg, optimizer, dtype=jnp.bfloat16, remat=remat)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, context + 1)).astype(np.int32)
    x, y = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
    state = [params, init_opt_state(optimizer, params)]
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = step.lower(*state, (x, y), key).compile()
    compile_s = time.perf_counter() - start

    def run() -> float:
        start = time.perf_counter()
        state[0], state[1], metrics = compiled(state[0], state[1], (x, y), key)
        float(metrics["loss"])
        return time.perf_counter() - start

    first_s = run()
    times = sorted(run() for _ in range(steps))
    step_s = times[len(times) // 2]
    tokens_per_s = batch * context / step_s
    peak = datasheet_flops(jax.devices()[0].device_kind)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(model=model, remat=remat, batch=batch, context=context, compile_s=compile_s, first_step_s=first_s,
                step_s=step_s, step_runs_s=times, tokens_per_s=tokens_per_s,
                mfu=None if peak is None else tokens_per_s * flops_per_token(cfg, context) / peak,
                peak_device_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                planned_gib=planned_sizes(compiled)["peak"] / 2**30)


def decode_cases(model: str, new: int, repeats: int):
    """bf16 KV-cached greedy decode rows of ``model`` at batch 1 and 8, one at a time."""
    cfg = model_preset(model)
    weights, cfg = gptjax.sampling.decoding_weights(random_params(cfg), cfg, "bfloat16")
    for batch in (1, 8):
        yield dict(model=model, batch=batch, weights="bfloat16", new_tokens=new,
                   **gptjax_rate(weights, cfg, batch, 32, new, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen3-0.6b", "llama-3.2-1b"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--decode-models", nargs="*", default=["qwen3-0.6b"])
    parser.add_argument("--out", default="benchmarks/results/gpu_families.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # MODEL:REMAT, run in a child process
    args = parser.parse_args()
    if args.case:
        model, remat = args.case.split(":")
        print(json.dumps(train_case(model, remat == "1", args.batch_size, args.context, args.steps)))
        return
    train, decode = [], []

    def save() -> None:  # after every row: a run stopped by its time limit keeps what it measured
        write_json(args.out, dict(machine=machine_info(), train=train, decode=decode))

    for model in args.models:
        for remat in (True, False):
            cmd = [sys.executable, __file__, "--case", f"{model}:{int(remat)}", "--batch-size", str(args.batch_size),
                   "--context", str(args.context), "--steps", str(args.steps)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            row = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                   dict(model=model, remat=remat, error=(done.stderr.strip().splitlines() or ["?"])[-1][:300]))
            print(row, flush=True)
            train.append(row)
            save()
    for model in args.decode_models:
        for row in decode_cases(model, args.new_tokens, 3):
            print(row, flush=True)
            decode.append(row)
            save()
    print_table(train, [("model", "model", "s"), ("remat", "remat", ""), ("step_s", "step s", ".3f"),
                        ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"),
                        ("peak_device_gib", "peak GiB", ".1f"), ("planned_gib", "planned GiB", ".1f"),
                        ("error", "error", "s")])
    print_table(decode, [("model", "model", "s"), ("batch", "batch", "d"), ("weights", "weights", "s"),
                         ("tokens_per_s", "tokens/s", ".1f"), ("first_token_s", "first token s", ".3f")])


if __name__ == "__main__":
    main()
