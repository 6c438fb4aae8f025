"""Greedy decode throughput of the chapter-5 bonus models (Qwen3, Llama 3.2) at their real shapes: gptjax's
KV-cached ``generate`` from bfloat16 and int8 weights against llama.cpp on the GGUF export of the same weights
(f16 and q8_0, the counterparts), batch 1 and 8, in one run.

    python benchmarks/bench_decode_families.py [--models qwen3-0.6b] [--batch-sizes 1 8] [--new-tokens 128]
        [--prompt-len 32] [--repeats 3] [--llama-bin DIR]

Random weights (N(0, 0.02), transformers' initialisation), a prompt of --prompt-len random tokens, no end ids.
gptjax's decode rate is batch x (new - 1) tokens over the time of generate(new) minus generate(1), each the
median of --repeats timed runs after one untimed (compile) run: the prefill and the first token cancel out.
llama.cpp's is llama-batched-bench's text-generation speed (S_TG) for the same prompt length, new tokens and
batch (``-npl``: that many sequences decoded together), threads = every CPU. The GGUF files carry a small
stand-in tokenizer (tests/family_files.py; llama.cpp needs one, the speed does not depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gptjax  # noqa: E402
from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from gptjax.presets import model_preset  # noqa: E402
from gptjax.quantize import quantize_params  # noqa: E402
from gptjax.weights.gguf import save_gguf  # noqa: E402
from tests.family_files import write_qwen_tokenizer  # noqa: E402

LLAMA_BIN = Path("/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin")
PAIRS = (("bfloat16", "f16"), ("int8", "q8_0"))  # gptjax weights, the GGUF type llama.cpp decodes


def random_params(cfg) -> gptjax.model.Params:
    params = gptjax.init_params(cfg, seed=0)
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_unflatten(tree, [np.ones_like(x) if x.ndim == 1 else
                                               (0.02 * rng.standard_normal(x.shape)).astype(np.float32)
                                               for x in leaves])


def gptjax_rate(weights, cfg, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    prompt = np.random.default_rng(1).integers(0, 1000, (batch, prompt_len)).astype(np.int32)

    def timed(n):
        gptjax.generate(weights, cfg, prompt, n)  # compiles
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            gptjax.generate(weights, cfg, prompt, n)
            runs.append(time.perf_counter() - t)
        return statistics.median(runs), runs

    full, full_runs = timed(new)
    first, _ = timed(1)
    return {"tokens_per_s": batch * (new - 1) / (full - first), "generate_s": full, "generate_runs_s": full_runs,
            "first_token_s": first}


def llama_rate(gguf: Path, batch: int, prompt_len: int, new: int, llama_bin: Path) -> dict:
    cmd = [str(llama_bin / "llama-batched-bench"), "-m", str(gguf), "-c", str(batch * (prompt_len + new) + 64),
           "-npp", str(prompt_len), "-ntg", str(new), "-npl", str(batch), "-t", str(os.cpu_count()),
           "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return {"tokens_per_s": row["speed_tg"], "row": row}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--llama-bin", type=Path, default=LLAMA_BIN)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_families.json"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            cfg = model_preset(name, context_length=1024)
            folder = Path(tmp) / name
            write_qwen_tokenizer(folder)
            params = random_params(cfg)
            for dtype, gguf_type in PAIRS:
                path = folder / f"model-{gguf_type}.gguf"
                save_gguf(params, cfg, path, gguf_type=gguf_type, tokenizer=folder)
                weights = quantize_params(params, dtype)
                for batch in args.batch_sizes:
                    ours = gptjax_rate(weights, cfg, batch, args.prompt_len, args.new_tokens, args.repeats)
                    theirs = llama_rate(path, batch, args.prompt_len, args.new_tokens, args.llama_bin)
                    rows.append({"model": name, "batch": batch, "gptjax_weights": dtype, "gguf_type": gguf_type,
                                 "gptjax_tokens_per_s": ours["tokens_per_s"],
                                 "llama_cpp_tokens_per_s": theirs["tokens_per_s"],
                                 "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"], "gptjax": ours,
                                 "llama_cpp": theirs["row"]})
                    print(f"{name} batch {batch} {dtype}/{gguf_type}: gptjax {ours['tokens_per_s']:.1f} tok/s, "
                          f"llama.cpp {theirs['tokens_per_s']:.1f} tok/s", flush=True)
                path.unlink()
                del weights
    print_table(rows, [("model", "model", ""), ("batch", "batch", "d"), ("gptjax_weights", "gptjax", ""),
                       ("gguf_type", "llama.cpp", ""), ("gptjax_tokens_per_s", "gptjax tok/s", ".1f"),
                       ("llama_cpp_tokens_per_s", "llama.cpp tok/s", ".1f"), ("ratio", "ratio", ".2f")])
    write_json(args.out, {"machine": machine_info(), "settings": vars(args) | {"llama_bin": str(args.llama_bin)},
                          "results": rows})


if __name__ == "__main__":
    main()
