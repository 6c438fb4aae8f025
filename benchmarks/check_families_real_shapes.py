"""Llama 3.2 1B and Qwen3 0.6B at their real shapes: gptjax's logits against transformers', float32.

Each model is built by transformers from the config gptjax writes for it (transformers' own random
initialisation), saved as a safetensors folder, read back by ``gptjax.load_weights`` and run on the same
tokens; the largest absolute difference of the logits is recorded beside their scale. The tiny configs are
tested in tests/test_families.py; these shapes need ~15 GB and minutes, so they are a script:

    python benchmarks/check_families_real_shapes.py      # -> benchmarks/results/families_real_shapes.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, write_json  # noqa: E402

import gptjax  # noqa: E402
from gptjax.llama3 import LLAMA3_CONFIGS  # noqa: E402
from gptjax.qwen3 import QWEN3_CONFIGS  # noqa: E402
from gptjax.weights import hf_gqa  # noqa: E402

CONFIGS = {**QWEN3_CONFIGS, **LLAMA3_CONFIGS}


def compare(name: str, tokens: int, seed: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = CONFIGS[name]
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(2, tokens))
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(hf_gqa.config_file(None, cfg)[1])
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
        model.save_pretrained(folder)
        with torch.no_grad():
            want = model(torch.as_tensor(ids)).logits.numpy()
        del model
        gc.collect()
        start = time.perf_counter()
        params, loaded = gptjax.load_weights(folder)
        load_s = time.perf_counter() - start
        got = np.asarray(gptjax.apply(params, loaded, ids))
    assert loaded == cfg, (loaded, cfg)
    return {"model": name, "parameters": gptjax.param_count(params), "tokens": list(ids.shape),
            "max_abs_diff": float(np.abs(got - want).max()), "logits_abs_max": float(np.abs(want).max()),
            "greedy_equal": bool((got.argmax(-1) == want.argmax(-1)).all()), "load_s": round(load_s, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b", "llama-3.2-1b"], choices=sorted(CONFIGS))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "families_real_shapes.json"))
    args = p.parse_args()
    rows = []
    for name in args.models:
        rows.append(compare(name, args.tokens, seed=0))
        print(rows[-1], flush=True)
    write_json(args.out, {"machine": machine_info(), "results": rows})


if __name__ == "__main__":
    main()
