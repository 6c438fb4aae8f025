"""Serve a model over an OpenAI-compatible HTTP API, with continuous batching, streaming and a web page.

    python -m gptjax.serve --weights PATH [--host 127.0.0.1] [--port 8000] [--max-batch 8]
        [--weights-dtype {float32,bfloat16,int8}] [--dtype {float32,bfloat16}] [--api-key KEY]
        [--max-queue 64] [--grace-seconds 30] [--n-heads N]

PATH is anything gptjax.weights.load_weights reads. Endpoints: POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /metrics (Prometheus), and the page at /. With --api-key (or GPTJAX_API_KEY)
every /v1 request needs ``Authorization: Bearer KEY``. SIGINT / SIGTERM stop accepting connections, let the
running requests finish for up to --grace-seconds, then exit 0. The engine is :mod:`gptjax.engine`.

The request and response shapes (and GPT-2's plain-text chat template) are :mod:`gptjax.openai_api`'s;
handing requests to the engine and streaming the answers, :mod:`gptjax.completions`'; this module routes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gptjax import cli
from gptjax.config import GPTConfig
from gptjax.completions import Completions, Metrics
from gptjax.engine import Engine
from gptjax.model import Params
from gptjax.openai_api import (APIError, Sampling, model_list, parse_body, parse_prompts, parse_sampling, parse_text,
                               parse_token_ids, render_chat, tokenizer_card)
from gptjax.quantize import WEIGHTS_DTYPES
from gptjax.tokenizer import ENDOFTEXT_ID, get_tokenizer

STATIC = Path(__file__).parent.parent / "static"


def create_app(params: Params, cfg: GPTConfig, *, model_name: str = "gptjax", max_batch: int = 8,
               weights_dtype: str = "float32", dtype: str = "float32", max_queue: int = 64,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app over a warmed-up, running :class:`Engine` (``app.state.engine``; stopped at shutdown)."""
    tokenizer = get_tokenizer()
    metrics = Metrics()
    engine = Engine(params, cfg, max_batch=max_batch, weights_dtype=weights_dtype, dtype=dtype,
                    max_queue=max_queue, on_step=metrics.on_step)
    engine.warm_up()
    engine.start()
    jobs = Completions(engine, tokenizer, cfg, metrics, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="gptjax", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.middleware("http")
    async def auth_and_count(request: HTTPRequest, call_next):
        path = request.url.path
        if api_key and path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
            response = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None,
                                "invalid_api_key", "authentication_error").response()
        else:
            response = await call_next(request)
        metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return model_list(model_name, cfg)

    # The tokenizer in vLLM's shapes: lm-evaluation-harness's tokenizer_backend=remote needs nothing else.
    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        tokens = tokenizer.encode(parse_text(await body_of(request)), allowed_special={"<|endoftext|>"})
        return {"tokens": tokens, "count": len(tokens), "max_model_len": cfg.context_length}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        return {"prompt": tokenizer.decode(parse_token_ids(await body_of(request), cfg.vocab_size))}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenizer_card(tokenizer.decode([ENDOFTEXT_ID]), cfg)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (STATIC / "index.html").read_text()

    async def body_of(request: HTTPRequest) -> dict:
        return parse_body(await request.body(), model_name)

    async def respond(prompts: list[list[int]], s: Sampling, chat: bool, body: dict):
        job = jobs.submit(prompts, s, chat=chat)
        if not s.stream:
            return await jobs.complete(job)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(jobs.stream(job, include_usage=include_usage), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await body_of(request)
        s = parse_sampling(body, cfg, chat=False)
        return await respond(parse_prompts(body, tokenizer, cfg.vocab_size), s, chat=False, body=body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await body_of(request)
        s = parse_sampling(body, cfg, chat=True)
        return await respond([tokenizer.encode(render_chat(body.get("messages")))], s, chat=True, body=body)

    return app


class Server(uvicorn.Server):
    """uvicorn's server, printing the address once it listens, and exiting normally on SIGINT / SIGTERM
    (uvicorn re-raises the signal after its graceful shutdown, which would end the process with it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"gptjax serving on http://{self.config.host}:{self.config.port}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptjax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, metavar="PATH",
                   help="weights to serve: run/checkpoint dir, .pth, safetensors, HF or OpenAI folder (required)")
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
    cli.add_n_heads_flag(p)
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
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(params, cfg, model_name=args.weights if cli.is_hub_id_flag(args.weights) else Path(args.weights).resolve().name, max_batch=args.max_batch,
                     weights_dtype=args.weights_dtype, dtype=args.dtype, max_queue=args.max_queue,
                     api_key=args.api_key)
    # The engine thread wakes from each step needing the GIL for a moment; at Python's default switch interval
    # (5 ms) it can wait that long behind the event loop, a sixth of a 124M model's step.
    sys.setswitchinterval(0.0005)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.grace_seconds)
    Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
