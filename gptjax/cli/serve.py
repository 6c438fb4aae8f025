"""Serve a model over an OpenAI-compatible HTTP API, with continuous batching, streaming and a web page.

    python -m gptjax.serve --weights PATH [--host 127.0.0.1] [--port 8000] [--max-batch 8]
        [--weights-dtype {float32,bfloat16,int8}] [--dtype {float32,bfloat16}] [--api-key KEY]
        [--max-queue 64] [--grace-seconds 30] [--n-heads N] [--context-length N]

PATH is anything gptjax.weights.load_weights reads; a Llama 3 or Qwen3 model's tokenizer and chat template come
from the tokenizer files beside its weights (gptjax.weights.tokenizer_folder). Endpoints: POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /metrics (Prometheus), and the page at /. With --api-key (or GPTJAX_API_KEY)
every /v1 request needs ``Authorization: Bearer KEY``. SIGINT / SIGTERM stop accepting connections, let the
running requests finish for up to --grace-seconds, then exit 0. The engine is :mod:`gptjax.engine`.

The app (routes) is :mod:`gptjax.app`; this module parses the flags, loads the weights and runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import uvicorn

from gptjax import cli
from gptjax.app import Server, create_app
from gptjax.quantize import WEIGHTS_DTYPES

SERVE_CONTEXT = 4096  # a rotary model's default longest request: the KV cache holds max_batch of them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptjax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_weights_flag(p, "serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="decode slots: requests generated at "
                   "once (default: 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests waiting for a slot before "
                   "new ones get 429 (default: 64)")
    p.add_argument("--grace-seconds", type=float, default=30.0, metavar="S", help="on SIGINT/SIGTERM, how long "
                   "running requests may finish (default: 30)")
    p.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="float32",
                   help="store the matmul weights as bfloat16 or int8 for decoding (default: float32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="matmul compute dtype (default: float32)")
    p.add_argument("--context-length", type=int, metavar="N", help="the longest request (prompt and completion) "
                   "a slot holds, for a model with rotary positions (Llama 3, Qwen3), whose KV cache of its whole "
                   f"context would not fit (default: the model's context, at most {SERVE_CONTEXT}; GPT-2: its own)")
    p.add_argument("--api-key", default=os.environ.get("GPTJAX_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: $GPTJAX_API_KEY, else none)")
    cli.add_compile_cache_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cli.setup_compile_cache(args)
        for name in ("max_batch", "max_queue"):
            if getattr(args, name) < 1:
                raise ValueError(f"{cli.flag(name)} must be at least 1, got {getattr(args, name)}")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        if args.grace_seconds < 0:
            raise ValueError(f"--grace-seconds must be at least 0, got {args.grace_seconds}")
        params, cfg = cli.load_weights_flag(args.weights, args.n_heads)
        tokenizer, chat = cli.model_text_flag(args.weights, cfg)
        cfg = _serving_context(cfg, args.context_length)
    except (ValueError, OSError) as e:
        return cli.fail(e)
    name = args.weights if cli.is_hub_id_flag(args.weights) else Path(args.weights).resolve().name
    app = create_app(params, cfg, model_name=name, max_batch=args.max_batch, weights_dtype=args.weights_dtype,
                     dtype=args.dtype, max_queue=args.max_queue, api_key=args.api_key, tokenizer=tokenizer,
                     chat=chat)
    # The engine thread wakes from each step needing the GIL for a moment; at Python's default switch interval
    # (5 ms) it can wait that long behind the event loop, a sixth of a 124M model's step.
    sys.setswitchinterval(0.0005)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.grace_seconds)
    Server(config).run()
    return 0


def _serving_context(cfg: Any, context_length: int | None) -> Any:
    """The config the engine serves: a rotary model's context capped (its KV cache is max_batch slots of it;
    Qwen3-0.6B's 40,960 positions are 4.6 GB a slot), GPT-2's as its position table fixes it."""
    if not hasattr(cfg, "rope_base"):
        if context_length not in (None, cfg.context_length):
            raise ValueError(f"--context-length: GPT-2's learned positions fix its context at {cfg.context_length}; "
                             "drop the flag")
        return cfg
    if context_length is not None and not 0 < context_length <= cfg.context_length:
        raise ValueError(f"--context-length must be in 1..{cfg.context_length}, the model's context, got {context_length}")
    if context_length is None and cfg.context_length > SERVE_CONTEXT:
        print(f"note: serving requests of up to {SERVE_CONTEXT} tokens (the model's context is {cfg.context_length}); "
              "--context-length N for longer ones", file=sys.stderr)
    return cfg.replace(context_length=context_length or min(cfg.context_length, SERVE_CONTEXT))


if __name__ == "__main__":
    sys.exit(main())
