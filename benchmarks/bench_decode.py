"""Greedy decode throughput: gptjax's KV-cached generate at the book's context (256) and GPT-2's (1024), from
float32, bfloat16 and int8 weights, against llama.cpp on the GGUF export of the same weights, Hugging Face
``generate``, the book's torch loop and full recompute, all in one run.

    python benchmarks/bench_decode.py [--configs GPT_CONFIG_124M gpt2-small] [--batch-sizes 1 8]
        [--new-tokens 300] [--weights-dtypes float32 bfloat16 int8] [--methods kv-cache hf] [--repeats 3]

Methods (random weights, prompt of --prompt-len random tokens, no eos):
  kv-cache         gptjax.sampling.generate (prefill + jitted lax.while_loops over a cache grown in buckets),
                   once per --weights-dtypes entry
  kv-cache-pyloop  the same cached step driven by a Python loop over a full-context cache (one dispatch per token)
  full-recompute   jitted forward over the whole sequence each token (lengths bucketed to powers of two)
  torch            tests/torch_reference.generate_text_simple, the book's loop (no cache)
  hf               transformers GPT2LMHeadModel.generate(do_sample=False, use_cache=True) on the same weights
  llama.cpp        llama-cpp-python's Llama.generate (greedy sampler) on the weights exported by gptjax's GGUF
                   writer, once per --gguf-types entry (f32 / f16 / q8_0, the counterparts of float32 / bfloat16 /
                   int8), batch 1 only, llama.cpp's defaults otherwise (threads: every CPU). Before any timing, a
                   llama.cpp instance with a float32 KV cache decodes the f32 export and must give gptjax's
                   float32 greedy tokens (the run stops otherwise). Needs `pip install llama-cpp-python` (it
                   builds llama.cpp from source: ~20 minutes on 2 cores); not a gptjax dependency.

Each config decodes min(--new-tokens, context_length - --prompt-len) tokens, so that no method slides the
window (GPT_CONFIG_124M: 252 of 300). Every case runs once untimed (compiles; compile_s = that run minus the
median), then --repeats rounds in which every case runs once, interleaved, so that a busy machine slows all of
them alike; a row reports the median and every round. Ratios are computed per round, then the median taken.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gptjax  # noqa: E402
from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from gptjax import cpu_kernels  # noqa: E402
from gptjax.quantize import WEIGHTS_DTYPES, quantize_params, weights_nbytes  # noqa: E402
from gptjax.buckets import length_bucket  # noqa: E402
from gptjax.sampling import generate  # noqa: E402

METHODS = ("kv-cache", "kv-cache-pyloop", "full-recompute", "torch", "hf", "llama.cpp")
GGUF_TYPES = ("f32", "f16", "q8_0")


def kv_cache(weights, cfg, prompt, new_tokens):
    return generate(weights, cfg, prompt, new_tokens)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _cached_step(params, cfg, token, cache, pos):
    logits, cache = gptjax.apply_with_cache(params, cfg, token[:, None], cache, pos)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def _cached_prefill(params, cfg, padded, cache):
    return gptjax.apply_with_cache(params, cfg, padded, cache, 0)


def kv_cache_pyloop(params, cfg, prompt, new_tokens):
    prompt_len = prompt.shape[1]
    padded = np.zeros((prompt.shape[0], length_bucket(prompt_len, cap=cfg.context_length)), np.int32)
    padded[:, :prompt_len] = prompt
    logits, cache = _cached_prefill(params, cfg, padded, gptjax.init_cache(cfg, prompt.shape[0]))
    token = jnp.argmax(logits[:, prompt_len - 1], axis=-1).astype(jnp.int32)
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
    tokens = np.zeros((prompt.shape[0], length_bucket(total)), np.int32)
    tokens[:, : prompt.shape[1]] = prompt
    tokens = jnp.asarray(tokens)
    for length in range(prompt.shape[1], total):
        width = min(length_bucket(length), tokens.shape[1])
        tokens = _full_step(params, cfg, tokens, np.int32(length), width)
    return np.asarray(tokens)[:, :total]


def torch_reference(model, cfg, prompt, new_tokens):
    import torch

    from tests.torch_reference import generate_text_simple

    out = generate_text_simple(model, torch.as_tensor(prompt, dtype=torch.long), new_tokens, cfg.context_length)
    return out.numpy()


def hf_generate(model, cfg, prompt, new_tokens):
    import torch

    ids = torch.as_tensor(prompt, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return out.numpy()


def torch_model(params, cfg):
    from tests.torch_reference import GPTModel

    model = GPTModel(cfg.to_dict()).eval()
    model.load_state_dict(gptjax.to_torch_state_dict(params, cfg), strict=True)
    return model


def hf_model(params, cfg):
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        gptjax.save_weights(params, cfg, Path(tmp) / "hf", format="hf")
        return GPT2LMHeadModel.from_pretrained(Path(tmp) / "hf").eval()


def llama_cpp_generate(llm, cfg, prompt, new_tokens):
    if prompt.shape[0] != 1:
        raise ValueError("llama.cpp decodes one sequence here (batch 1)")
    llm.reset()  # no reuse of the previous call's cache for the same prompt
    out = []
    for token in llm.generate(prompt[0].tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == new_tokens:
            break
    return np.concatenate([prompt, np.array([out], np.int32)], axis=1)


# llama.cpp's AMX buffer (its repack of q8_0 weights for Intel AMX, chosen wherever the CPU has AMX-INT8)
# segfaults in the first decode on this project's machine, also on the q8_0 file llama.cpp's own quantizer
# makes from the f32 export (whose q8_0 tensors are byte for byte gptjax's; a crash upstream reports too:
# ggml-org/llama.cpp#20824). For q8_0, llama.cpp runs without its extra buffer types (use_extra_bufts off:
# its plain AVX-512 VNNI q8_0 dot); f32 and f16 weights are never repacked, so they keep the defaults.
NO_EXTRA_BUFFERS = {"q8_0"}


def llama_cpp_model(params, cfg, gguf_type, folder, **options):
    import llama_cpp
    import llama_cpp.llama

    path = Path(folder) / f"{cfg.context_length}-{gguf_type}.gguf"
    if not path.exists():  # the check's f32 export is reused
        gptjax.save_weights(params, cfg, path, format="gguf", gguf_type=gguf_type)
    defaults = llama_cpp.llama_model_default_params

    def model_params():
        chosen = defaults()
        chosen.use_extra_bufts = gguf_type not in NO_EXTRA_BUFFERS
        return chosen

    llama_cpp.llama.llama_cpp.llama_model_default_params = model_params  # Llama() exposes no such option
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=cfg.context_length, n_threads=os.cpu_count(),
                               n_threads_batch=os.cpu_count(), verbose=False, **options)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = defaults


def check_llama_cpp_matches(params, cfg, folder, prompt, new_tokens) -> None:
    """llama.cpp's greedy continuation of the f32 export (float32 KV cache) is gptjax's float32 one."""
    import llama_cpp

    llm = llama_cpp_model(params, cfg, "f32", folder, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    theirs, ours = llama_cpp_generate(llm, cfg, prompt, new_tokens), generate(params, cfg, prompt, new_tokens)
    where = first_divergence(theirs, ours)
    if where is not None:
        sys.exit(f"llama.cpp's greedy tokens on the f32 GGUF export differ from gptjax's at new token {where}")
    print(f"  llama.cpp on the f32 export: the same {new_tokens} greedy tokens as gptjax", flush=True)
    llm.close()


def timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def first_divergence(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first new-token index at which two greedy outputs differ (None: identical)."""
    diff = np.flatnonzero((a != b).any(axis=0))
    return None if len(diff) == 0 else int(diff[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["GPT_CONFIG_124M", "gpt2-small"],
                        help="gptjax preset names or aliases (default: GPT_CONFIG_124M gpt2-small)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=300, help="capped per config to fit its context")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["kv-cache", "hf"])
    parser.add_argument("--weights-dtypes", nargs="+", choices=WEIGHTS_DTYPES, default=list(WEIGHTS_DTYPES),
                        help="weight formats for kv-cache (default: all three)")
    parser.add_argument("--gguf-types", nargs="+", choices=GGUF_TYPES, default=list(GGUF_TYPES),
                        help="GGUF exports llama.cpp decodes (default: all three)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (default 3)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    args = parser.parse_args(argv)
    if "llama.cpp" in args.methods:
        try:
            import llama_cpp
        except ImportError:
            parser.error("--methods llama.cpp needs llama-cpp-python: pip install llama-cpp-python")

    info = machine_info()
    # bfloat16/int8 decode steps run through the compiled CPU kernel only where it was built
    info["cpu_kernels"] = cpu_kernels.unavailable() or "built"
    if "llama.cpp" in args.methods:
        info.update(llama_cpp_python=llama_cpp.__version__,
                    llama_cpp_system_info=llama_cpp.llama_print_system_info().decode().strip(),
                    llama_cpp_without_extra_buffer_types=sorted(NO_EXTRA_BUFFERS))
    folder = tempfile.TemporaryDirectory()  # the GGUF exports, for the whole run
    cases = []  # (config name, cfg, batch, method, weights dtype, runner, weights, prompt, new tokens)
    for name in args.configs:
        cfg = gptjax.get_config(name)
        new_tokens = min(args.new_tokens, cfg.context_length - args.prompt_len)
        params = gptjax.init_params(cfg, seed=0)
        weights = {}
        for method in args.methods:
            if method == "kv-cache":
                for wd in args.weights_dtypes:
                    weights[(method, wd)] = (kv_cache, quantize_params(params, wd))
            elif method == "llama.cpp":
                prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, args.prompt_len), dtype=np.int32)
                check_llama_cpp_matches(params, cfg, folder.name, prompt, new_tokens)
                for gguf_type in args.gguf_types:
                    weights[(method, gguf_type)] = (llama_cpp_generate, llama_cpp_model(params, cfg, gguf_type,
                                                                                        folder.name))
            else:
                builders = {"kv-cache-pyloop": (kv_cache_pyloop, lambda: params),
                            "full-recompute": (full_recompute, lambda: params),
                            "torch": (torch_reference, lambda: torch_model(params, cfg)),
                            "hf": (hf_generate, lambda: hf_model(params, cfg))}
                fn, build = builders[method]
                weights[(method, "float32")] = (fn, build())
        for batch in args.batch_sizes:
            prompt = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args.prompt_len), dtype=np.int32)
            for (method, wd), (fn, w) in weights.items():
                if method == "llama.cpp" and batch != 1:
                    continue
                cases.append(dict(config=name, cfg=cfg, batch=batch, method=method, weights_dtype=wd, fn=fn, w=w,
                                  prompt=prompt, new_tokens=new_tokens))

    for case in cases:
        first_s, case["out"] = timed(case["fn"], case["w"], case["cfg"], case["prompt"], case["new_tokens"])
        case["first_s"] = first_s
        print(f"  warm-up {case['config']} b{case['batch']} {case['method']} {case['weights_dtype']}: {first_s:.1f} s",
              flush=True)
    for r in range(args.repeats):
        for case in cases:
            seconds, _ = timed(case["fn"], case["w"], case["cfg"], case["prompt"], case["new_tokens"])
            case.setdefault("runs", []).append(case["batch"] * case["new_tokens"] / seconds)
        print(f"  round {r + 1}/{args.repeats} done", flush=True)

    def key(c):
        return (c["config"], c["batch"], c["method"], c["weights_dtype"])

    by_key = {key(c): c for c in cases}
    rows = []
    for c in cases:
        median = statistics.median(c["runs"])
        ref = by_key.get((c["config"], c["batch"], "kv-cache", "float32")) or by_key[key(c)]
        row = dict(config=c["config"], context_length=c["cfg"].context_length, batch=c["batch"], method=c["method"],
                   weights_dtype=c["weights_dtype"], new_tokens=c["new_tokens"], tokens_per_s=round(median, 2),
                   tokens_per_s_rounds=[round(x, 2) for x in c["runs"]],
                   compile_s=round(max(c["first_s"] - c["batch"] * c["new_tokens"] / median, 0.0), 2),
                   first_divergence_from_kv_cache_float32=first_divergence(c["out"], ref["out"]))
        if c["method"] == "kv-cache":
            row["weights_bytes"] = weights_nbytes(c["w"])
        counterpart = dict(zip(WEIGHTS_DTYPES, GGUF_TYPES)).get(c["weights_dtype"])
        for other, dtype, label in (("kv-cache", "float32", "vs_kv_cache_float32"), ("hf", "float32", "vs_hf"),
                                    ("llama.cpp", counterpart, "vs_llama_cpp")):
            base = by_key.get((c["config"], c["batch"], other, dtype))
            if base is not None and base is not c and (label != "vs_llama_cpp" or c["method"] == "kv-cache"):
                row[label] = round(statistics.median(a / b for a, b in zip(c["runs"], base["runs"])), 3)
        rows.append(row)

    # Decoding at GPT-2's context against the book's: the same model size, kv-cache float32.
    context_ratio = []
    if len(args.configs) >= 2 and "kv-cache" in args.methods and "float32" in args.weights_dtypes:
        short, long_ = args.configs[0], args.configs[1]
        for batch in args.batch_sizes:
            a, b = by_key[(long_, batch, "kv-cache", "float32")], by_key[(short, batch, "kv-cache", "float32")]
            context_ratio.append(dict(batch=batch, config=long_, over=short,
                                      ratio=round(statistics.median(x / y for x, y in zip(a["runs"], b["runs"])), 3)))

    print(f"\nprompt {args.prompt_len}, greedy, {args.repeats} interleaved rounds; {info['cpus']} CPUs, {info['backend']}, "
          f"load average at start {info.get('load_average_1m_at_start')}")
    print_table(rows, [("config", "config", ""), ("batch", "batch", "d"), ("method", "method", ""),
                       ("weights_dtype", "weights", ""), ("new_tokens", "new", "d"), ("tokens_per_s", "tokens/s", ".2f"),
                       ("compile_s", "compile s", ".1f"), ("vs_kv_cache_float32", "vs f32", ".2f"),
                       ("vs_hf", "vs hf", ".2f"), ("vs_llama_cpp", "vs llama.cpp", ".2f"), ("first_divergence_from_kv_cache_float32", "diverges at", "")])
    for r in context_ratio:
        print(f"{r['config']} over {r['over']} kv-cache float32 tokens/s, batch {r['batch']}: {r['ratio']:.3f}")

    if {"torch", "hf"} & set(args.methods):
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    if "hf" in args.methods:
        import transformers

        info["transformers"] = transformers.__version__
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    folder.cleanup()
    out = write_json(args.out, dict(benchmark="decode", prompt_len=args.prompt_len, repeats=args.repeats,
                                    machine=info, results=rows, context_ratio=context_ratio))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
