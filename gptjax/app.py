"""The OpenAI-compatible HTTP app over a running engine: routes only. The request and response shapes are
:mod:`gptjax.openai_api`'s, chat formats :mod:`gptjax.chat`'s; handing requests to the engine and streaming
the answers, :mod:`gptjax.completions`'; the engine, :mod:`gptjax.engine`. ``python -m gptjax.serve``
(:mod:`gptjax.cli.serve`) runs it with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gptjax.chat import GPT2_CHAT, ChatFormat, template_switches
from gptjax.completions import Completions, Metrics
from gptjax.engine import Engine
from gptjax.model import Params
from gptjax.openai_api import (APIError, Sampling, model_list, parse_body, parse_prompts, parse_sampling, parse_text,
                               parse_token_ids, render_chat, tokenizer_card)
from gptjax.presets import ModelConfig
from gptjax.tokenizer import Encoding, HFEncoding, get_tokenizer

STATIC = Path(__file__).parent / "static"


def create_app(params: Params, cfg: ModelConfig, *, model_name: str = "gptjax", max_batch: int = 8,
               weights_dtype: str = "float32", dtype: str = "float32", max_queue: int = 64,
               api_key: str | None = None, tokenizer: Encoding | HFEncoding | None = None,
               chat: ChatFormat = GPT2_CHAT) -> FastAPI:
    """The FastAPI app over a warmed-up, running :class:`Engine` (``app.state.engine``; stopped at shutdown).
    ``tokenizer`` and ``chat`` are the model's (:func:`gptjax.chat.model_text`); GPT-2's by default."""
    tokenizer = tokenizer or get_tokenizer()
    metrics = Metrics()
    engine = Engine(params, cfg, max_batch=max_batch, weights_dtype=weights_dtype, dtype=dtype,
                    max_queue=max_queue, on_step=metrics.on_step, stop_ids=chat.stop_ids)
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

    _add_model_routes(app, tokenizer, chat, cfg, metrics, model_name)
    _add_completion_routes(app, jobs, tokenizer, chat, cfg, model_name)
    return app


def _add_model_routes(app: FastAPI, tokenizer: Encoding | HFEncoding, chat: ChatFormat, cfg: ModelConfig,
                      metrics: Metrics, model_name: str) -> None:
    """Health, metrics, the model list, the tokenizer and the page."""
    switches = template_switches(chat)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The model entry names the template's switches (vLLM's chat_template_kwargs), so that a client (the page's
    # thinking checkbox) offers only those the loaded model's template reads.
    @app.get("/v1/models")
    async def models():
        listing = model_list(model_name, cfg)
        listing["data"][0]["chat_template_kwargs"] = switches
        return listing

    # The tokenizer in vLLM's shapes: lm-evaluation-harness's tokenizer_backend=remote needs nothing else.
    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        body = parse_body(await request.body(), model_name)
        tokens = tokenizer.encode(parse_text(body), allowed_special="all")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": cfg.context_length}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        body = parse_body(await request.body(), model_name)
        return {"prompt": tokenizer.decode(parse_token_ids(body, cfg.vocab_size))}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenizer_card(tokenizer, chat, cfg)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (STATIC / "index.html").read_text()


def _add_completion_routes(app: FastAPI, jobs: Completions, tokenizer: Encoding | HFEncoding, chat: ChatFormat,
                           cfg: ModelConfig, model_name: str) -> None:
    """The OpenAI completion endpoints: parsed requests handed to the engine through ``jobs``."""

    async def respond(prompts: list[list[int]], s: Sampling, chat: bool, body: dict):
        job = jobs.submit(prompts, s, chat=chat)
        if not s.stream:
            return await jobs.complete(job)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(jobs.stream(job, include_usage=include_usage), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = parse_body(await request.body(), model_name)
        s = parse_sampling(body, chat=None)
        return await respond(parse_prompts(body, tokenizer, cfg.vocab_size), s, chat=False, body=body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = parse_body(await request.body(), model_name)
        s = parse_sampling(body, chat=chat)
        return await respond([tokenizer.encode(render_chat(body, chat), allowed_special="all")], s, chat=True,
                             body=body)


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
