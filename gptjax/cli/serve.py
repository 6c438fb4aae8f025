"""Serve a model over an OpenAI-compatible HTTP API, with continuous batching, streaming and a web page.

    python -m gptjax.serve --weights PATH [--host 127.0.0.1] [--port 8000] [--max-batch 8]
        [--weights-dtype {float32,bfloat16,int8}] [--dtype {float32,bfloat16}] [--api-key KEY]
        [--max-queue 64] [--grace-seconds 30] [--n-heads N]

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

import uvicorn

from gptjax import cli
from gptjax.app import Server, create_app
from gptjax.quantize import WEIGHTS_DTYPES


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


if __name__ == "__main__":
    sys.exit(main())
