"""Qwen3 and Llama 3.2 through GGUF: llama.cpp's greedy tokens on gptjax's export against gptjax's own.

For each model, transformers builds it from the config gptjax writes for it (transformers' random
initialisation, spread 0.1 rather than its 0.02 so that attention and positions matter, RMSNorm scales made
to matter) and saves it as a Hugging Face folder, with a small byte-level BPE tokenizer beside it (trained on
the-verdict, with the family's special tokens); ``gptjax.load_weights`` reads the folder and
``gptjax.save_weights(..., format="gguf", tokenizer=folder)`` exports it, f32 and f16. llama.cpp's
``llama-server`` (built separately; not a gptjax dependency) then continues token-id prompts greedily, and
``gptjax.generate`` continues the same prompts with temperature 0:

- f32: llama.cpp with a float32 KV cache, against gptjax in float32; every token must agree (the script
  exits with status 1 otherwise, after writing its results).
- f16: against gptjax on the same weights rounded to float16 (the matrices; norms stay float32, as in the
  file). llama.cpp also rounds the activations to float16 for these matmuls and gptjax does not, so a random
  model's near-tie may go either way: a difference is recorded, not an error.

Where tokens differ, the record holds gptjax's logit gap at that step between its token and llama.cpp's; the
smallest top-1/top-2 gap over all steps says how close the race was. llama-server stops at an end-of-generation
token, and random weights pick one now and then: the script then continues with the same prompt plus
everything decoded (the server reuses its KV cache), which is greedy decoding past it, as gptjax does.

    python benchmarks/check_families_gguf.py     # -> benchmarks/results/families_gguf.json

By default: three tiny models (Qwen3, Llama 3.2 tied and untied; about a minute) and Qwen3 0.6B's published
shape (16 minutes on this project's 2-core machine); ``--models llama-3.2-1b`` runs Llama 3.2 1B's, twice the
parameters (not run for the recorded results).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, write_json  # noqa: E402

import gptjax  # noqa: E402
from gptjax.llama3 import LLAMA3_CONFIGS, Llama3Config  # noqa: E402
from gptjax.qwen3 import QWEN3_CONFIGS, Qwen3Config  # noqa: E402
from gptjax.tokenizer import load_default_corpus  # noqa: E402
from gptjax.weights import hf_gqa, save_weights  # noqa: E402

LLAMA_SERVER = Path("/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server")
BPE_SIZE = 1000
SPECIALS = {"qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]}
EOS = {"qwen3": "<|im_end|>", "llama3": "<|eot_id|>"}
# transformers' default spread (0.02) leaves Llama's attention almost uniform (q.k / sqrt(d) ~ 0.1) and the logits
# within ~1e-4 of each other, where even queries and keys in the wrong RoPE order decode the same tokens. At 0.1
# attention is peaked and positions matter; Qwen3's RMSNorm on queries and keys peaks it either way.
INIT_STD = 0.1
SERVER_CONTEXT = 512  # llama.cpp's KV cache: the longest prompt and its continuation fit
# Tiny but not trivial: several layers, grouped-query attention, Qwen3's head size other than emb_dim / n_heads,
# Llama 3's RoPE scaling with wavelengths on all sides of its band; the vocabulary is the tokenizer's. The
# published shapes keep their own vocabulary: rows past the tokenizer's ids become unused tokens, as in Qwen3.
TINY = dict(context_length=SERVER_CONTEXT, emb_dim=256, n_heads=8, n_layers=4, hidden_dim=768)
MODELS: dict[str, tuple[str, Callable[[int], Any]]] = {  # name -> (family, config for a tokenizer of n tokens)
    "qwen3-tiny": ("qwen3", lambda n: Qwen3Config(**TINY, vocab_size=n, head_dim=64, n_kv_groups=4)),
    "llama3.2-tiny": ("llama3", lambda n: Llama3Config(**TINY, vocab_size=n, n_kv_groups=2,
                                                       rope_original_context_length=64)),
    "llama3.2-tiny-untied": ("llama3", lambda n: Llama3Config(**TINY, vocab_size=n, n_kv_groups=2,
                                                              rope_original_context_length=64, tie_embeddings=False)),
    "qwen3-0.6b": ("qwen3", lambda n: QWEN3_CONFIGS["qwen3-0.6b"]),
    "llama-3.2-1b": ("llama3", lambda n: LLAMA3_CONFIGS["llama-3.2-1b"]),
}
TINY_MODELS = ("qwen3-tiny", "llama3.2-tiny", "llama3.2-tiny-untied")


def write_tokenizer(folder: Path, family: str) -> int:
    """A family-style tokenizer.json and tokenizer_config.json in ``folder``; its token count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([load_default_corpus()], trainer)
    tok.add_special_tokens(SPECIALS[family])
    config = {"eos_token": EOS[family], "bos_token": SPECIALS[family][0] if family == "llama3" else None}
    if family == "llama3":
        bos = tok.token_to_id(SPECIALS[family][0])
        tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[family][0]} $A",
                                                           special_tokens=[(SPECIALS[family][0], bos)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size(with_added_tokens=True)


def hf_folder(cfg: Any, folder: Path, seed: int) -> None:
    """transformers' model for ``cfg`` with its own random init, its spread :data:`INIT_STD`, saved in
    ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(hf_gqa.config_file(None, cfg)[1])
    (folder / "config.json").write_text(json.dumps({**config, "initializer_range": INIT_STD}))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    with torch.no_grad():  # RMSNorm scales start at one: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    del model
    gc.collect()


class LlamaServer:
    """llama-server on 127.0.0.1 at a free port for one GGUF file, stopped on leaving the block."""

    def __init__(self, binary: Path, model: Path, log: Path, kv_type: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                        "-c", str(SERVER_CONTEXT), "-np", "1", "-t", str(os.cpu_count()), "-ctk", kv_type,
                        "-ctv", kv_type, "-fa", "off"]
        self.log = log

    def __enter__(self) -> LlamaServer:
        self.log_file = open(self.log, "w")
        self.process = subprocess.Popen(self.command, stdout=self.log_file, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(timeout=300)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass  # still loading (503) or not listening yet
            time.sleep(0.5)
        raise RuntimeError(f"llama-server did not become ready in {timeout:.0f} s; see {self.log}")

    def __exit__(self, *exc: Any) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], int]:
        """``n`` greedy tokens after ``prompt``, and how often an end-of-generation token stopped the server
        (each time, the request goes on with the prompt plus the tokens so far)."""
        tokens: list[int] = []
        stops = 0
        while len(tokens) < n:
            body = {"prompt": prompt + tokens, "n_predict": n - len(tokens), "temperature": 0.0, "top_k": 1,
                    "repeat_penalty": 1.0, "dry_multiplier": 0.0, "return_tokens": True, "cache_prompt": True}
            request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion",
                                             data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as r:
                reply = json.loads(r.read())
            if not reply["tokens"]:
                raise RuntimeError(f"llama-server returned no tokens: {reply}")
            tokens += reply["tokens"]
            stops += len(tokens) < n
        return tokens, stops


def f16_rounded(params: Any) -> Any:
    """The weights as the f16 file holds them: matrices rounded to float16, vectors (norms) kept."""
    return jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32) if x.ndim > 1 else x, params)


def compare(params: Any, cfg: Any, server: LlamaServer, prompts: list[list[int]], n: int) -> dict:
    rows, compared, equal, stops, min_gap = [], 0, 0, 0, np.inf
    for k, prompt in enumerate(prompts):
        ours = [int(t) for t in gptjax.generate(params, cfg, np.asarray([prompt]), n, temperature=0.0)[0, len(prompt):]]
        theirs, stopped = server.greedy(prompt, n)
        stops += stopped
        # gptjax's logits at every step of its own continuation: position len(prompt) - 1 + j predicts token j.
        logits = np.asarray(gptjax.apply(params, cfg, np.asarray([prompt + ours[:-1]])))[0, len(prompt) - 1:]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        min_gap = min(min_gap, float((top2[:, 1] - top2[:, 0]).min()))
        same = [a == b for a, b in zip(ours, theirs)]
        compared, equal = compared + n, equal + sum(same)
        if not all(same):
            j = same.index(False)  # after the first difference the two continue different texts
            rows.append({"prompt": k, "step": j, "gptjax_token": ours[j], "llama_cpp_token": theirs[j],
                         "gptjax_logit_gap": float(logits[j, ours[j]] - logits[j, theirs[j]]),
                         "gptjax": ours, "llama_cpp": theirs})
    return {"tokens_compared": compared, "tokens_equal": equal, "all_equal": equal == compared,
            "first_differences": rows, "min_top2_logit_gap": min_gap, "end_of_generation_restarts": stops}


def check(name: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    family, make_config = MODELS[name]
    folder = workdir / name
    folder.mkdir()
    n_tokens = write_tokenizer(folder, family)
    cfg = make_config(n_tokens)
    real = name not in TINY_MODELS
    start = time.perf_counter()
    hf_folder(cfg, folder, seed=0)
    params, loaded = gptjax.load_weights(folder)
    assert loaded == cfg, (loaded, cfg)
    rng = np.random.default_rng(1)
    lengths = (5, 23) if real else (4, 9, 17, 33)
    prompts = [[int(t) for t in rng.integers(0, n_tokens, size=length)] for length in lengths]
    n = args.real_tokens if real else args.tokens
    out = []
    for gguf_type, kv_type in (("f32", "f32"), ("f16", "f16")):
        path = folder / f"{name}-{gguf_type}.gguf"
        save_weights(params, cfg, path, format="gguf", gguf_type=gguf_type, tokenizer=folder)
        reference = params if gguf_type == "f32" else f16_rounded(params)
        with LlamaServer(args.llama_server, path, workdir / f"{name}-{gguf_type}.log", kv_type) as server:
            result = compare(reference, cfg, server, prompts, n)
        out.append({"model": name, "family": family, "parameters": gptjax.param_count(params),
                    "tied_head": cfg.tie_embeddings, "init_std": INIT_STD, "vocab_size": cfg.vocab_size, "tokenizer_tokens": n_tokens,
                    "gguf_type": gguf_type, "llama_cpp_kv_cache": kv_type,
                    "gptjax_weights": "float32" if gguf_type == "f32" else "float32, matrices rounded to float16",
                    "gguf_mb": round(path.stat().st_size / 2**20, 1), "prompt_lengths": list(lengths),
                    "new_tokens_per_prompt": n, **result})
        path.unlink()
        print(json.dumps({k: v for k, v in out[-1].items() if k != "first_differences"}), flush=True)
        for row in result["first_differences"]:
            print(f"  differs: prompt {row['prompt']} step {row['step']}: gptjax {row['gptjax_token']}, llama.cpp "
                  f"{row['llama_cpp_token']}, gptjax's logit gap {row['gptjax_logit_gap']:.3g}", flush=True)
    print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def lscpu_model() -> str | None:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=[*TINY_MODELS, "qwen3-0.6b"], choices=sorted(MODELS))
    p.add_argument("--tokens", type=int, default=32, help="new tokens per prompt, tiny models")
    p.add_argument("--real-tokens", type=int, default=16, help="new tokens per prompt, published shapes")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "families_gguf.json"))
    args = p.parse_args()
    if not args.llama_server.is_file():
        p.error(f"--llama-server {args.llama_server}: no such file (build llama.cpp's llama-server)")
    version = subprocess.run([str(args.llama_server), "--version"], capture_output=True, text=True).stderr.strip()
    info = {"machine": {**machine_info(), "lscpu_model_name": lscpu_model()},
            "llama_cpp": {"llama_server": str(args.llama_server), "version": version}}
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            rows += check(name, args, Path(workdir))
    write_json(args.out, {**info, "results": rows})
    failed = [f"{r['model']} f32" for r in rows if r["gguf_type"] == "f32" and not r["all_equal"]]
    if failed:
        sys.exit(f"llama.cpp's greedy tokens differ from gptjax's on the f32 export of: {', '.join(failed)}")


if __name__ == "__main__":
    main()
