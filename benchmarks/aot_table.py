"""Size the real train step on accelerators with ``python -m gptjax.aot``: one compile per case, each in
its own process, results appended to a JSON file (cases already there are skipped, so an interrupted run
continues). The README's accelerator table comes from ``benchmarks/results/aot.json``.

    python benchmarks/aot_table.py                   # every case below
    python benchmarks/aot_table.py --only xl         # cases whose name contains "xl"
    python benchmarks/aot_table.py --only qwen3      # Qwen3-0.6B's cases
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "aot.json"

# name -> python -m gptjax.aot flags; GPT-2 at its context of 1024, Qwen3 and Llama 3.2 at 4096 (their presets'
# 40,960 and 131,072 are long-context limits, not training windows) with 2 rows per device: the 8,192 tokens per
# device of GPT-2's batch-8 rows.
CASES = {
    "small-v5e-2x2-bf16-b8": "--target tpu-v5e:2x2 --preset gpt2-small --batch-size 8 --mesh fsdp=4 --dtype bfloat16",
    "small-h200x4-bf16-b8": "--target gpu-h200:4 --preset gpt2-small --batch-size 8 --mesh fsdp=4 --dtype bfloat16",
    "xl-v5e-2x4-fsdp-bf16-b8-remat": "--target tpu-v5e:2x4 --preset gpt2-xl --batch-size 8 --mesh fsdp=8 --dtype bfloat16 --remat",
    "xl-h100-bf16-b8": "--target gpu-h100:1 --preset gpt2-xl --batch-size 8 --dtype bfloat16",
    "small-h100-bf16-b8": "--target gpu-h100:1 --preset gpt2-small --batch-size 8 --dtype bfloat16",
    "medium-h100-bf16-b8": "--target gpu-h100:1 --preset gpt2-medium --batch-size 8 --dtype bfloat16",
    "large-h100-bf16-b8": "--target gpu-h100:1 --preset gpt2-large --batch-size 8 --dtype bfloat16",
    "small-h100-f32-b8": "--target gpu-h100:1 --preset gpt2-small --batch-size 8",
    "xl-h100-bf16-b8-remat": "--target gpu-h100:1 --preset gpt2-xl --batch-size 8 --dtype bfloat16 --remat",
    "xl-h200-f32-b8": "--target gpu-h200:1 --preset gpt2-xl --batch-size 8",
    "xl-v5e-2x4-fsdp-bf16-b16-remat": "--target tpu-v5e:2x4 --preset gpt2-xl --batch-size 16 --mesh fsdp=8 --dtype bfloat16 --remat",
    "xl-h100x8-fsdp-bf16-b64": "--target gpu-h100:8 --preset gpt2-xl --batch-size 64 --mesh fsdp=8 --dtype bfloat16",
    "xl-h100x8-fsdp-bf16-b64-remat": "--target gpu-h100:8 --preset gpt2-xl --batch-size 64 --mesh fsdp=8 --dtype bfloat16 --remat",
    "qwen3-0.6b-h100-bf16-b2-t4096-remat": "--target gpu-h100:1 --preset qwen3-0.6b --context-length 4096 --batch-size 2 --dtype bfloat16 --remat",
    "qwen3-0.6b-h100-bf16-b2-t4096": "--target gpu-h100:1 --preset qwen3-0.6b --context-length 4096 --batch-size 2 --dtype bfloat16",
    "qwen3-0.6b-h100x8-fsdp-bf16-b16-t4096-remat": "--target gpu-h100:8 --preset qwen3-0.6b --context-length 4096 --batch-size 16 --mesh fsdp=8 --dtype bfloat16 --remat",
    "qwen3-0.6b-v5e-2x4-fsdp-bf16-b16-t4096-remat": "--target tpu-v5e:2x4 --preset qwen3-0.6b --context-length 4096 --batch-size 16 --mesh fsdp=8 --dtype bfloat16 --remat",
    "llama-3.2-1b-h100-bf16-b2-t4096-remat": "--target gpu-h100:1 --preset llama-3.2-1b --context-length 4096 --batch-size 2 --dtype bfloat16 --remat",
    "llama-3.2-1b-h100-bf16-b2-t4096": "--target gpu-h100:1 --preset llama-3.2-1b --context-length 4096 --batch-size 2 --dtype bfloat16",
    "llama-3.2-1b-h100x8-fsdp-bf16-b16-t4096-remat": "--target gpu-h100:8 --preset llama-3.2-1b --context-length 4096 --batch-size 16 --mesh fsdp=8 --dtype bfloat16 --remat",
    "llama-3.2-1b-v5e-2x4-fsdp-bf16-b16-t4096-remat": "--target tpu-v5e:2x4 --preset llama-3.2-1b --context-length 4096 --batch-size 16 --mesh fsdp=8 --dtype bfloat16 --remat",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run (or with --markdown, print) only the cases whose name contains "
                   "this (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file of results (default: {RESULTS})")
    p.add_argument("--markdown", action="store_true", help="print the results as the README's table, compile nothing")
    args = p.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.markdown:
        print(markdown({name: r for name, r in results.items() if args.only in name}))
        return 0
    for name, flags in CASES.items():
        if args.only not in name or name in results:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "r.json"
            proc = subprocess.run([sys.executable, "-m", "gptjax.aot", *flags.split(), "--json", str(report)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            results[name] = {"flags": flags, **json.loads(report.read_text())}
        r = results[name]
        print(f"{name}: peak {r['per_device_bytes']['peak'] / 2**30:.2f} GiB of "
              f"{(r['usable_memory_bytes'] or 0) / 2**30:.2f}, fits {r['fits']}, compile {r['compile_s']} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = args.out.with_suffix(".tmp")
        tmp_out.write_text(json.dumps(results, indent=1) + "\n")
        tmp_out.replace(args.out)
    return 0


def markdown(results: dict) -> str:
    rows = ["| target | model | dtype | batch (per device) | mesh | remat | peak per device | of usable | fits | compile |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        b = r["per_device_bytes"]
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "one device"
        preset = r["flags"].split("--preset ")[1].split()[0]
        params = f"{preset} ({r['parameters'] / 1e6:,.0f}M)"
        usable = r["usable_memory_bytes"]
        rows.append(f"| {r['target']} | {params}, T={r['model']['context_length']} | {r['dtype']} | "
                    f"{r['batch_size']} ({r['batch_size'] // r['devices']}) | {mesh} | {'yes' if r['remat'] else 'no'} | "
                    f"{b['peak'] / 2**30:.1f} GiB | {b['peak'] / usable:.0%} of {usable / 2**30:.1f} GiB | "
                    f"{'yes' if r['fits'] else '**no**'} | {r['compile_s']:.0f} s |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
