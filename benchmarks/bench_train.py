"""Training-step throughput (tokens/s) and MFU: gptjax against the book's torch model, same device and run.

    python benchmarks/bench_train.py [--cases book gpt2-1024] [--dtypes float32 bfloat16] [--steps 5]
                                     [--large-batch N] [--torch eager compile] [--out benchmarks/results/train.json]

Cases (random weights and tokens; the same batch for every implementation):
  book       GPT_CONFIG_124M, batch 2 x 256, dropout 0.1: the book's chapter 5 setting
  gpt2-1024  gpt2-small (124M, qkv bias) at T=1024, batch --large-batch (default 1 on CPU, 16 on an
             accelerator), dropout 0 as in GPT-2 pretraining runs (so attention can take the fused path)

Implementations: gptjax (gptjax.training.make_train_step, the step the training CLI runs: value_and_grad
of the mean cross-entropy, AdamW from gptjax.training.make_optimizer with the book's settings, the
loss and gradient norm as metrics), and tests/torch_reference.GPTModel with
torch.optim.AdamW (lr 4e-4, weight decay 0.1), eager and torch.compile'd. bfloat16 means gptjax's
mixed precision (make_train_step(..., dtype=jnp.bfloat16), the CLI's --dtype bfloat16) and torch.autocast(bfloat16) for torch.

Timing: one implementation at a time (each alone in memory); compile time is reported separately
(jax: lower + compile; torch.compile: first step minus the median step); --warmup steps are excluded;
then --steps steps, each waiting for its result (block_until_ready / synchronize). tokens/s uses the
median step; cpu_s is the process CPU time of a step, which other processes on a busy CPU inflate
much less than wall time (on an idle machine it is about threads x step time). MFU counts
6N + 12 L H Q T FLOPs per token (N: parameters without the position embedding; L layers, H heads,
Q head size, T sequence length) against the peak of a large float32 matmul measured by this script
(and, on GPU/TPU, the datasheet's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# JAX must not grab most of an accelerator's memory up front: torch runs beside it. torch.compile's
# compile time must be a real compile, not a hit in inductor's on-disk cache from an earlier run.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gptjax  # noqa: E402
from benchmarks.common import (  # noqa: E402
    datasheet_flops,
    machine_info,
    measure_matmul_flops,
    median,
    print_table,
    timed,
    write_json,
)
from gptjax.training import TrainConfig, init_opt_state, make_optimizer, make_train_step  # noqa: E402

CASES = ("book", "gpt2-1024")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "fast" is the book's own faster training setup (its chapter 5 speed-up bonus material): PyTorch's fused
# scaled_dot_product_attention (flash attention on a GPU) in place of the book's attention, fused AdamW on
# CUDA, and torch.compile.
TORCH_MODES = ("eager", "compile", "fast")


def case_setup(name: str, large_batch: int) -> tuple[gptjax.GPTConfig, int, bool]:
    """(model config, batch size, dropout on) of a benchmark case."""
    if name == "book":
        return gptjax.GPT_CONFIG_124M, 2, True
    return gptjax.get_config("gpt2-small", drop_rate=0.0), large_batch, False


def flops_per_token(cfg: gptjax.GPTConfig, seq_len: int) -> int:
    """6N + 12 L H Q T: forward and backward matmuls, attention scores and mixing included."""
    n = gptjax.param_count(gptjax.abstract_params(cfg)) - cfg.context_length * cfg.emb_dim
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


class JaxRunner:
    """gptjax.training.make_train_step on a fixed batch: the step `python -m gptjax.train` runs (loss,
    gradients, AdamW with the book's settings, metrics), with the model's compute options. Parameters and
    optimizer state are donated and carried from step to step."""

    def __init__(self, cfg, inputs, targets, dtype, remat):
        self.name = "gptjax" + ("+remat" if remat else "")
        optimizer = make_optimizer(TrainConfig(), total_steps=1000)
        self.params = gptjax.init_params(cfg, seed=0)
        self.opt_state = init_opt_state(optimizer, self.params)
        self.batch = (jnp.asarray(inputs), jnp.asarray(targets))
        self.key = jax.random.key(0)
        start = time.perf_counter()
        self.step_fn = make_train_step(cfg, optimizer, dtype=dtype, remat=remat).lower(
            self.params, self.opt_state, self.batch, self.key).compile()
        self.compile_s = time.perf_counter() - start
        self.steps = 0
        self.first_s = None

    def step(self) -> None:
        self.steps += 1
        key = jax.random.fold_in(self.key, self.steps)
        self.params, self.opt_state, metrics = self.step_fn(self.params, self.opt_state, self.batch, key)
        jax.block_until_ready((self.params, metrics))


class TorchRunner:
    """The book's torch model and AdamW; ``mode`` "compile" wraps the model in torch.compile."""

    def __init__(self, cfg, inputs, targets, dtype_name, mode, device):
        import torch

        from tests.torch_reference import GPTModel

        self.torch, self.device, self.name = torch, device, f"torch-{mode}"
        torch.manual_seed(0)
        model = GPTModel(cfg.to_dict()).to(device)
        model.train()
        fast = mode == "fast"
        if fast:
            for block in model.trf_blocks:
                block.att.forward = _sdpa_forward(block.att)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1,
                                           fused=fast and device.startswith("cuda"))
        self.model = torch.compile(model) if mode in ("compile", "fast") else model
        self.bf16 = dtype_name == "bfloat16"
        self.x = torch.as_tensor(np.asarray(inputs, np.int64), device=device)
        self.y = torch.as_tensor(np.asarray(targets, np.int64), device=device)
        # torch.compile compiles during the first step: its compile time is that step minus a normal one.
        self.first_s = timed(self.step) if mode in ("compile", "fast") else None
        self.compile_s = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    def step(self) -> None:
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(self.x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.y.flatten())
        loss.backward()
        self.optimizer.step()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        else:
            loss.item()


def _sdpa_forward(att):
    """The book's MultiHeadAttention.forward with torch's fused causal attention (dropout included)."""
    import torch.nn.functional as F

    def forward(x):
        b, t, _ = x.shape
        q, k, v = (layer(x).view(b, t, att.num_heads, att.head_dim).transpose(1, 2)
                   for layer in (att.W_query, att.W_key, att.W_value))
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=att.dropout.p if att.training else 0.0,
                                                 is_causal=True)
        return att.out_proj(context.transpose(1, 2).reshape(b, t, att.d_out))

    return forward


def torch_device() -> str | None:
    """torch's device matching jax's backend, or None when torch cannot run there (e.g. TPU)."""
    import torch

    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if backend == "gpu" and torch.cuda.is_available():
        return "cuda"
    return None


def measure(runner, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of ``steps`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        runner.step()
    wall, cpu = [], []
    for _ in range(steps):
        cpu_start = time.process_time()
        wall.append(timed(runner.step))
        cpu.append(time.process_time() - cpu_start)
    return wall, cpu


def run_case(name, args, peak_fp32, peak_datasheet) -> dict:
    cfg, batch, dropout = case_setup(name, args.large_batch)
    seq = cfg.context_length
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
    targets = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
    fpt = flops_per_token(cfg, seq)
    print(f"\n== {name}: {cfg.n_layers} layers, emb {cfg.emb_dim}, vocab {cfg.vocab_size}, batch {batch} x {seq}, "
          f"dropout {cfg.drop_rate}; {fpt / 1e9:.3f} GFLOP/token", flush=True)

    rows = []
    for dtype_name in args.dtypes:
        specs = [("gptjax", False)] + ([("gptjax", True)] if args.remat else [])
        specs += [("torch", mode) for mode in args.torch] if args.torch_device else []
        for kind, option in specs:
            # One implementation at a time: each gets the whole device (and its memory) to itself.
            row = dict(case=name, impl=kind if kind == "gptjax" else f"torch-{option}", dtype=dtype_name,
                       batch=batch, seq_len=seq)
            rows.append(row)
            try:
                if kind == "gptjax":
                    runner = JaxRunner(cfg, inputs, targets, DTYPES[dtype_name], remat=option)
                else:
                    runner = TorchRunner(cfg, inputs, targets, dtype_name, option, args.torch_device)
                wall, cpu = measure(runner, args.steps, args.warmup)
            except Exception as exc:  # noqa: BLE001 -- a failing implementation is a result: recorded in the JSON
                row["error"] = f"{type(exc).__name__}: {exc}"
                print(f"  {row['impl']} {dtype_name}: FAILED ({row['error'][:300]})", flush=True)
                continue
            step_s = median(wall)
            tokens_per_s = batch * seq / step_s
            row.update(
                impl=runner.name,
                # torch.compile compiles inside its first step: that step minus a normal one
                compile_s=runner.compile_s if runner.first_s is None else max(runner.first_s - step_s, 0.0),
                step_s=step_s,
                step_s_min=min(wall),
                cpu_s=median(cpu),
                step_times_s=[round(t, 4) for t in wall],
                tokens_per_s=tokens_per_s,
                tflops=tokens_per_s * fpt / 1e12,
                mfu_measured=tokens_per_s * fpt / peak_fp32,
                mfu_datasheet=None if peak_datasheet is None else tokens_per_s * fpt / peak_datasheet,
            )
            compiled = "" if row["compile_s"] is None else f", compile {row['compile_s']:.1f} s"
            print(f"  {row['impl']} {dtype_name}: {tokens_per_s:,.0f} tokens/s, step {step_s:.3f} s "
                  f"(cpu {row['cpu_s']:.2f} s){compiled}", flush=True)
            del runner
            gc.collect()

    for dtype_name in args.dtypes:
        base = next((r for r in rows if r["impl"] == "torch-eager" and r["dtype"] == dtype_name and "step_s" in r),
                    None)
        for r in rows:
            if base is not None and r["dtype"] == dtype_name and "step_s" in r:
                r["vs_torch_eager"] = r["tokens_per_s"] / base["tokens_per_s"]
    return dict(case=name, config=cfg.to_dict(), batch=batch, seq_len=seq, dropout=dropout,
                flops_per_token=fpt, rows=rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="compute dtypes (default: float32 on CPU, float32 and bfloat16 elsewhere)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--large-batch", type=int, default=None,
                        help="batch of the gpt2-1024 case (default: 1 on CPU, 16 on an accelerator)")
    parser.add_argument("--torch", nargs="*", choices=TORCH_MODES, default=["eager", "compile"],
                        help="torch variants to run (default: eager compile; none: jax only)")
    parser.add_argument("--remat", action="store_true", help="also time gptjax with remat=True")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads on CPU")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="datasheet peak (TFLOP/s) to use instead of the built-in table")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    # Compile times must be real compiles, not hits in a persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)
    on_cpu = jax.default_backend() == "cpu"
    args.dtypes = args.dtypes or (["float32"] if on_cpu else ["float32", "bfloat16"])
    args.large_batch = args.large_batch or (1 if on_cpu else 16)
    args.torch_device = torch_device() if args.torch else None
    machine = machine_info()
    if args.torch_device is not None:
        import torch

        if on_cpu:
            torch.set_num_threads(args.threads)
        machine.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), torch_device=args.torch_device)

    peak_fp32 = measure_matmul_flops(jnp.float32, n=4096 if on_cpu else 8192)
    peak_bf16 = measure_matmul_flops(jnp.bfloat16, n=4096 if on_cpu else 8192)
    peak_datasheet = None if on_cpu else (
        args.peak_tflops * 1e12 if args.peak_tflops else datasheet_flops(machine["device_kind"]))
    print(f"{machine['device_kind']} ({machine['backend']}), {machine['cpus']} CPUs; measured matmul peak: "
          f"{peak_fp32 / 1e12:.3f} TFLOP/s float32, {peak_bf16 / 1e12:.3f} bfloat16"
          + ("" if peak_datasheet is None else f"; datasheet {peak_datasheet / 1e12:.0f} TFLOP/s bf16"), flush=True)

    cases = [run_case(name, args, peak_fp32, peak_datasheet) for name in args.cases]
    if hasattr(os, "getloadavg"):
        machine["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)

    columns = [("case", "case", ""), ("impl", "impl", ""), ("dtype", "dtype", ""), ("batch", "B", "d"),
               ("seq_len", "T", "d"), ("tokens_per_s", "tokens/s", ",.0f"), ("step_s", "step s", ".3f"),
               ("cpu_s", "cpu s", ".2f"), ("compile_s", "compile s", ".1f"), ("mfu_measured", "MFU(meas)", ".1%"),
               ("mfu_datasheet", "MFU(sheet)", ".1%"), ("vs_torch_eager", "vs torch", ".2f")]
    print()
    print_table([r for c in cases for r in c["rows"] if "step_s" in r], columns)
    for r in (r for c in cases for r in c["rows"] if "error" in r):
        print(f"{r['case']} {r['impl']} {r['dtype']}: {r['error'][:300]}")
    result = dict(
        benchmark="train_step",
        machine=machine,
        peak=dict(measured_fp32_tflops=peak_fp32 / 1e12, measured_bf16_tflops=peak_bf16 / 1e12,
                  datasheet_bf16_tflops=None if peak_datasheet is None else peak_datasheet / 1e12),
        settings=dict(steps=args.steps, warmup=args.warmup, optimizer="AdamW lr 4e-4, weight decay 0.1"),
        cases=cases,
    )
    print(f"\nwrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
