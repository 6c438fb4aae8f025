"""Greedy decode throughput at the 124M shape: gptjax's KV-cached generate against full recompute
and the book's torch generate_text_simple, in one run.

    python benchmarks/bench_decode.py [--batch-sizes 1 8] [--new-tokens 200] [--out benchmarks/results/decode.json]

Methods (random weights, float32, prompt of --prompt-len random tokens, no eos):
  kv-cache         gptjax.sampling.generate: prefill + a jitted lax.while_loop decode, no host sync per token
  kv-cache-pyloop  the same cached step driven by a Python loop (one dispatch per token): the design alternative
  full-recompute   jitted forward over the whole sequence each token (lengths bucketed to powers of two)
  torch            tests/torch_reference.generate_text_simple, the book's loop

Every JAX method runs once untimed first (compiles; reported as compile_s = first run - timed run).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gptjax  # noqa: E402
from gptjax.sampling import _bucket, _prefill, generate  # noqa: E402

METHODS = ("kv-cache", "kv-cache-pyloop", "full-recompute", "torch")


def kv_cache(params, cfg, prompt, new_tokens):
    return generate(params, cfg, prompt, new_tokens)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _cached_step(params, cfg, token, cache, pos):
    logits, cache = gptjax.apply_with_cache(params, cfg, token[:, None], cache, pos)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def kv_cache_pyloop(params, cfg, prompt, new_tokens):
    prompt_len = prompt.shape[1]
    padded = np.zeros((prompt.shape[0], _bucket(prompt_len, cap=cfg.context_length)), np.int32)
    padded[:, :prompt_len] = prompt
    logits, cache = _prefill(params, cfg, padded, np.int32(prompt_len))
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = [token]
    for pos in range(prompt_len, prompt_len + new_tokens - 1):
        token, cache = _cached_step(params, cfg, token, cache, np.int32(pos))
        out.append(token)
    return np.concatenate([prompt, np.stack([np.asarray(t) for t in out], axis=1)], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "width"), donate_argnames=("tokens",))
def _full_step(params, cfg, tokens, length, width):
    logits = gptjax.apply(params, cfg, tokens[:, :width])
    next_id = jnp.argmax(jnp.take(logits, length - 1, axis=1), axis=-1).astype(jnp.int32)
    return jax.lax.dynamic_update_slice(tokens, next_id[:, None], (0, length))


def full_recompute(params, cfg, prompt, new_tokens):
    total = prompt.shape[1] + new_tokens
    if total > cfg.context_length:
        raise ValueError("the full-recompute baseline does not slide the window; keep prompt + new tokens <= context")
    tokens = np.zeros((prompt.shape[0], _bucket(total)), np.int32)
    tokens[:, : prompt.shape[1]] = prompt
    tokens = jnp.asarray(tokens)
    for length in range(prompt.shape[1], total):
        width = min(_bucket(length), tokens.shape[1])
        tokens = _full_step(params, cfg, tokens, np.int32(length), width)
    return np.asarray(tokens)[:, :total]


def torch_reference(model, cfg, prompt, new_tokens):
    import torch

    from tests.torch_reference import generate_text_simple

    out = generate_text_simple(model, torch.as_tensor(prompt, dtype=torch.long), new_tokens, cfg.context_length)
    return out.numpy()


def timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="GPT_CONFIG_124M", help="a gptjax preset name or alias")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    args = parser.parse_args(argv)

    cfg = gptjax.get_config(args.config)
    params = gptjax.init_params(cfg, seed=0)
    torch_model = None
    if "torch" in args.methods:
        import torch

        from tests.torch_reference import GPTModel

        torch_model = GPTModel(cfg.to_dict()).eval()
        torch_model.load_state_dict(gptjax.to_torch_state_dict(params, cfg), strict=True)

    runners = {
        "kv-cache": (kv_cache, params),
        "kv-cache-pyloop": (kv_cache_pyloop, params),
        "full-recompute": (full_recompute, params),
        "torch": (torch_reference, torch_model),
    }
    rows = []
    for batch in args.batch_sizes:
        prompt = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args.prompt_len), dtype=np.int32)
        outputs = {}
        for method in args.methods:
            fn, weights = runners[method]
            first_s = timed(fn, weights, cfg, prompt, args.new_tokens)[0] if method != "torch" else None
            seconds, outputs[method] = timed(fn, weights, cfg, prompt, args.new_tokens)
            rows.append(
                dict(
                    method=method,
                    batch=batch,
                    seconds=round(seconds, 3),
                    tokens_per_s=round(batch * args.new_tokens / seconds, 2),
                    compile_s=None if first_s is None else round(max(first_s - seconds, 0.0), 2),
                )
            )
            print(f"  {method:16s} batch {batch}: {rows[-1]['tokens_per_s']:8.2f} tokens/s", flush=True)
        # Same weights, greedy: every method must produce the same tokens (float ties aside).
        reference = next(iter(outputs.values()))
        for row in rows[-len(outputs):]:
            row["same_tokens_as_" + args.methods[0]] = bool(np.array_equal(outputs[row["method"]], reference))

    torch_speed = {r["batch"]: r["tokens_per_s"] for r in rows if r["method"] == "torch"}
    for row in rows:
        if row["batch"] in torch_speed:
            row["speedup_vs_torch"] = round(row["tokens_per_s"] / torch_speed[row["batch"]], 2)

    print(f"\n{cfg.n_layers} layers, emb {cfg.emb_dim}, vocab {cfg.vocab_size}, float32; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy; {os.cpu_count()} CPUs, {jax.devices()[0].platform}")
    header = f"{'method':16s} {'batch':>5s} {'tokens/s':>9s} {'seconds':>8s} {'compile_s':>9s} {'vs torch':>8s} {'same':>5s}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        speedup = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-"
        same = r["same_tokens_as_" + args.methods[0]]
        print(f"{r['method']:16s} {r['batch']:5d} {r['tokens_per_s']:9.2f} {r['seconds']:8.2f} {compile_s:>9s} "
              f"{speedup:>8s} {str(same):>5s}")

    result = dict(
        benchmark="decode",
        config=cfg.to_dict(),
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        dtype="float32",
        machine=dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine(),
                     backend=jax.devices()[0].platform, jax=jax.__version__, python=platform.python_version()),
        results=rows,
    )
    if torch_model is not None:
        import torch

        result["machine"].update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
