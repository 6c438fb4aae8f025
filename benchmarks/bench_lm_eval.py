"""Scoring throughput of lm-evaluation-harness through ``python -m gptjax.serve`` (``local-completions``)
against lm_eval's own ``hf`` backend on the same weights, same machine, one run; the two must agree.

A randomly initialised model (default gpt2-small) is saved as gptjax weights and as a Hugging Face folder
(with GPT-2's tokenizer files); a multiple-choice task of ``--docs`` questions (sentences of the-verdict cut
in two, the true ending and 3 others as choices) is written as YAML over JSONL. lm_eval runs it with each
backend (``--batch-size`` requests per batch; the server with ``num_concurrent``), and the row reports the
prompt tokens scored per second (every choice's context and continuation), the wall time, and the largest
difference between the two backends' per-choice log-likelihoods and accuracies.

    python benchmarks/bench_lm_eval.py                 # gpt2-small, 100 questions: a few minutes on 2 cores
    python benchmarks/bench_lm_eval.py --quick         # a tiny model, 10 questions
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

import gptjax  # noqa: E402
from gptjax import GPTConfig  # noqa: E402
from gptjax.tokenizer import load_default_corpus  # noqa: E402
from gptjax.weights.gguf import gpt2_tokens_and_merges  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def write_task(folder: Path, docs: int) -> None:
    rng = np.random.default_rng(0)
    sentences = [s.strip() for s in load_default_corpus().replace("\n", " ").split(".") if len(s.split()) >= 8]
    rows = []
    for s in sentences[:docs]:
        words = s.split()
        cut = len(words) // 2
        others = [" " + " ".join(o.split()[len(o.split()) // 2:]) for o in rng.choice(sentences, 3)]
        rows.append({"question": " ".join(words[:cut]), "choices": [" " + " ".join(words[cut:])] + others,
                     "answer": 0})
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mc.yaml").write_text(textwrap.dedent(f"""\
        task: bench_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / "mc.jsonl"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """))


def write_hf(params, cfg: GPTConfig, folder: Path) -> None:
    gptjax.save_weights(params, cfg, folder, format="hf")
    tokens, merges = gpt2_tokens_and_merges()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                               "eos_token": tokens[-1], "bos_token": tokens[-1]}))


def run(model: str, model_args: str, tasks: Path, batch_size: int) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["bench_mc"], batch_size=batch_size,
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--config", default="gpt2-small")
    p.add_argument("--docs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-concurrent", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_eval.json"))
    args = p.parse_args()
    cfg = (GPTConfig(vocab_size=50257, context_length=256, emb_dim=32, n_layers=2, n_heads=2) if args.quick
           else gptjax.get_config(args.config))
    docs = 10 if args.quick else args.docs
    tok = gptjax.get_tokenizer()
    params = gptjax.init_params(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_task(tmp, docs)
        gptjax.save_weights(params, cfg, tmp / "model")
        write_hf(params, cfg, tmp / "hf")
        rows = [json.loads(line) for line in (tmp / "mc.jsonl").read_text().splitlines()]
        scored = sum(len(tok.encode(r["question"] + c)) for r in rows for c in r["choices"])

        hf, hf_s = run("hf", f"pretrained={tmp / 'hf'},dtype=float32,device=cpu,max_length={cfg.context_length}",
                       tmp, args.batch_size)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "gptjax.serve", "--weights", str(tmp / "model"), "--port",
                                 str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ})
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            # The scoring passes compile on first use: warm every padded width and row count the task can hit.
            for n in (16, 32, 64):
                for count in (1, 2, 4, 8, 16):
                    httpx.post(url + "/v1/completions", json={"prompt": [[0] * n] * count, "echo": True,
                                                              "logprobs": 1, "max_tokens": 0}, timeout=600)
            served, served_s = run("local-completions", f"model=model,base_url={url}/v1/completions,"
                                   f"max_length={cfg.context_length},tokenizer_backend=remote,"
                                   f"num_concurrent={args.num_concurrent}", tmp, args.batch_size)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    diffs = [abs(a[0][0] - b[0][0]) for x, y in zip(served["samples"]["bench_mc"], hf["samples"]["bench_mc"])
             for a, b in zip(x["resps"], y["resps"])]
    result = {"machine": machine_info(), "config": "tiny" if args.quick else args.config, "docs": docs,
              "choices": sum(len(r["choices"]) for r in rows), "prompt_tokens": scored,
              "batch_size": args.batch_size, "num_concurrent": args.num_concurrent,
              "hf": {"seconds": hf_s, "tokens_s": scored / hf_s, "acc": hf["results"]["bench_mc"]["acc,none"]},
              "gptjax_serve": {"seconds": served_s, "tokens_s": scored / served_s,
                               "acc": served["results"]["bench_mc"]["acc,none"]},
              "max_loglik_difference": max(diffs)}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
