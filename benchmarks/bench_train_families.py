"""One training step of Qwen3-0.6B (or Llama 3.2 1B) as ch05/14_ch05_with_other_llms runs it on the-verdict
(float32, AdamW, the book's batch of 2 windows of 256 tokens): gptjax's jitted train step against torch eager on
the same model (transformers' Qwen3ForCausalLM / LlamaForCausalLM, which the book's Qwen3Model and Llama3Model
match to 1e-5, tests/test_families.py), in one run.

    python benchmarks/bench_train_families.py [--models qwen3-0.6b] [--batch-size 2] [--context 256] [--steps 3]

Each side runs one untimed step (gptjax compiles), then --steps timed ones; the median is reported. torch uses
every CPU (torch.get_num_threads()); gptjax XLA's default. ~10 GB per side at Qwen3-0.6B, one side at a time.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gptjax  # noqa: E402
from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from gptjax.presets import model_preset  # noqa: E402
from gptjax.training import TrainConfig, init_opt_state, make_optimizer, make_train_step  # noqa: E402
from gptjax.weights import hf_gqa  # noqa: E402


def timed_steps(step, n: int) -> tuple[float, list[float]]:
    step()  # compiles (gptjax) / warms the allocator (torch)
    runs = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), runs


def gptjax_step(cfg, batch: np.ndarray, n: int) -> tuple[float, list[float]]:
    import jax

    params = gptjax.init_params(cfg, seed=0)
    optimizer = make_optimizer(TrainConfig(lr=4e-4, weight_decay=0.1), 100)
    state = [params, init_opt_state(optimizer, params)]
    train_step = make_train_step(cfg, optimizer)
    key = jax.random.key(0)

    def step():
        state[0], state[1], metrics = train_step(state[0], state[1], (batch[:, :-1], batch[:, 1:]), key)
        jax.block_until_ready(metrics["loss"])

    return timed_steps(step, n)


def torch_step(cfg, batch: np.ndarray, n: int) -> tuple[float, list[float]]:
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(hf_gqa.config_file(None, cfg)[1])
        config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    x = torch.as_tensor(batch[:, :-1], dtype=torch.long)
    y = torch.as_tensor(batch[:, 1:], dtype=torch.long)

    def step():
        optimizer.zero_grad()
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()

    return timed_steps(step, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_families.json"))
    args = p.parse_args()
    rows = []
    for name in args.models:
        cfg = model_preset(name, context_length=args.context)
        batch = np.random.default_rng(0).integers(0, 50000, (args.batch_size, args.context + 1)).astype(np.int32)
        ours, ours_runs = gptjax_step(cfg, batch, args.steps)
        gc.collect()
        theirs, theirs_runs = torch_step(cfg, batch, args.steps)
        gc.collect()
        rows.append({"model": name, "batch": args.batch_size, "context": args.context, "gptjax_s": ours,
                     "torch_eager_s": theirs, "speedup": theirs / ours, "gptjax_runs_s": ours_runs,
                     "torch_runs_s": theirs_runs})
        print(f"{name}: gptjax {ours:.2f} s/step, torch eager {theirs:.2f} s/step", flush=True)
    print_table(rows, [("model", "model", ""), ("batch", "batch", "d"), ("context", "context", "d"),
                       ("gptjax_s", "gptjax s/step", ".2f"), ("torch_eager_s", "torch eager s/step", ".2f"),
                       ("speedup", "gptjax speed-up", ".2f")])
    write_json(args.out, {"machine": machine_info(), "settings": vars(args), "results": rows})


if __name__ == "__main__":
    main()
