"""Serve a model over an OpenAI-compatible HTTP API, with continuous batching, streaming and a web page.

    python -m gptjax.serve --weights PATH [--host 127.0.0.1] [--port 8000] [--max-batch 8]
        [--weights-dtype {float32,bfloat16,int8}] [--dtype {float32,bfloat16}] [--api-key KEY]
        [--max-queue 64] [--grace-seconds 30] [--n-heads N]

PATH is anything gptjax.weights.load_weights reads. Endpoints: POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /metrics (Prometheus), and the page at /. With --api-key (or GPTJAX_API_KEY)
every /v1 request needs ``Authorization: Bearer KEY``. SIGINT / SIGTERM stop accepting connections, let the
running requests finish for up to --grace-seconds, then exit 0. The engine is :mod:`gptjax.engine`.

Chat template (GPT-2 is a base model, so a conversation is plain text it continues): a system message's
content, then a blank line; each user / assistant message as ``User: TEXT`` / ``Assistant: TEXT`` on its own
line; then ``Assistant:``. Generation stops at ``\\nUser:`` as well as any ``stop`` given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gptjax import cli
from gptjax.config import GPTConfig
from gptjax.engine import MAX_LOGPROBS, Engine, Request, ScoreRequest, split_logprobs
from gptjax.model import Params
from gptjax.quantize import WEIGHTS_DTYPES
from gptjax.tokenizer import ENDOFTEXT_ID, get_tokenizer

CHAT_STOP = "\nUser:"
STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = status, message, param, code, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def render_chat(messages: Any) -> str:
    """The plain-text prompt of a chat (the module docstring's template)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must be an object with 'role' system, user or assistant and a "
                           "string 'content'", f"messages[{i}]")
        role, content = m["role"], m["content"]
        parts.append(f"{content}\n\n" if role == "system" else f"{role.capitalize()}: {content}\n")
    return "".join(parts) + "Assistant:"


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    seed: int
    n: int
    stream: bool
    echo: bool
    logprobs: int | None
    ignore_eos: bool = False


def _field(body: dict, name: str, kinds: tuple, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("float", "number").replace("int", "integer").replace("bool", "boolean")
                            for k in kinds)
        raise APIError(400, f"'{name}' must be {names}, got {json.dumps(value)}", name)
    return value


def parse_sampling(body: dict, cfg: GPTConfig, *, chat: bool) -> Sampling:
    """The sampling fields of a request, each checked, with OpenAI's defaults."""
    max_tokens = _field(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                        (int,), 16)
    echo = False if chat else _field(body, "echo", (bool,), False)
    if max_tokens < (0 if echo else 1):
        raise APIError(400, f"'max_tokens' must be at least 1 (0 only with echo), got {max_tokens}", "max_tokens")
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    if not temperature >= 0:
        raise APIError(400, f"'temperature' must be at least 0 (0 is greedy), got {temperature}", "temperature")
    top_p = float(_field(body, "top_p", (int, float), 1.0))
    if not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _field(body, "top_k", (int,), 0)
    if top_k < 0 and top_k != -1:
        raise APIError(400, f"'top_k' must be 0 or -1 (off) or a positive integer, got {top_k}", "top_k")
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    n = _field(body, "n", (int,), 1)
    if not 1 <= n <= 16:
        raise APIError(400, f"'n' must be between 1 and 16, got {n}", "n")
    seed = _field(body, "seed", (int,), None)
    logprobs = None
    if chat:
        if _field(body, "logprobs", (bool,), False):
            logprobs = _field(body, "top_logprobs", (int,), 0)
    else:
        logprobs = _field(body, "logprobs", (int,), None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"'logprobs' must be between 0 and {MAX_LOGPROBS}, got {logprobs}", "logprobs")
    return Sampling(max_tokens, temperature, top_p, max(top_k, 0), stop + ([CHAT_STOP] if chat else []),
                    random.getrandbits(31) if seed is None else seed, n, _field(body, "stream", (bool,), False),
                    echo, logprobs,
                    _field(body, "ignore_eos", (bool,), False))


def parse_prompts(body: dict, tokenizer, vocab_size: int) -> list[list[int]]:
    """``prompt`` as token lists: a string, a list of token ids, or a list of either."""
    prompt = body.get("prompt")
    bad = APIError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of either", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = tokenizer.encode(p, allowed_special={"<|endoftext|>"})
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if any(not 0 <= t < vocab_size for t in p):
                raise APIError(400, f"'prompt' token ids must lie in [0, {vocab_size})", "prompt")
            ids = p
        else:
            raise bad
        if not ids:
            raise APIError(400, "'prompt' is empty; give some text (or token ids) to continue", "prompt")
        out.append(ids)
    return out


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gptjax_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("gptjax_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("gptjax_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("gptjax_queue_depth", "requests waiting for a decode slot", registry=r)
        self.active_slots = Gauge("gptjax_active_slots", "decode slots in use", registry=r)
        self.ttft = Histogram("gptjax_time_to_first_token_seconds", "from submission to the first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("gptjax_inter_token_latency_seconds", "between consecutive tokens of a request",
                             registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))

    def on_step(self, active: int, waiting: int) -> None:
        self.active_slots.set(active)
        self.queue_depth.set(waiting)


@dataclass
class Choice:
    """One generated sequence of a request, filled in by the engine thread: its tokens and their log-prob
    entries, and (echo with logprobs) the prompt's entries once scored (None for the first token)."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish: str | None = None
    last: float = 0.0
    prompt_logprobs: list | None = None
    scored: bool = True


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode_single_token_bytes(token).decode("utf-8", errors="replace")


def text_offsets(tokenizer, tokens: list[int], start: int, end: int, base: int = 0) -> list[int]:
    """Where each of tokens[start:end] begins in the decoded text of ``tokens``, plus ``base``."""
    return [base + len(tokenizer.decode_bytes(tokens[:k]).decode("utf-8", errors="replace")) for k in range(start, end)]


def logprobs_block(tokenizer, tokens: list[int], entries: list, offsets: list[int]) -> dict:
    """OpenAI's completions ``logprobs`` object for ``tokens``; an entry is (log-prob, [(id, log-prob)] of the
    top ones), or None for a token nothing predicts (a prompt's first)."""
    return {"tokens": [token_text(tokenizer, t) for t in tokens],
            "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": [None if e is None else {token_text(tokenizer, t): v for t, v in e[1]} for e in entries],
            "text_offset": offsets}


class TextTracker:
    """Decoded text of a choice, cut at the first stop string; ``stable()`` is the part no later token can
    change (an incomplete UTF-8 character or a possible stop string's beginning is held back). ``used`` is
    how many tokens the text took: once a stop string is found, the tokens up to the one that completed it
    (the engine may have appended more before it saw the stop)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop, self.text, self.stopped, self.used = tokenizer, stop, "", False, 0

    def update(self, tokens: list[int]) -> None:
        tokens = list(tokens)  # the engine thread appends meanwhile
        while not self.stopped and self.used < len(tokens):
            # Usually one new token; after a burst, each in turn, so the stop is found at its own token.
            self.used += 1
            text = self.tokenizer.decode_bytes(tokens[: self.used]).decode("utf-8", errors="replace")
            cuts = [text.find(s) for s in self.stop if s in text]
            if cuts:
                text, self.stopped = text[: min(cuts)], True
            self.text = text

    def stable(self, final: bool) -> str:
        if final or self.stopped:
            return self.text
        text = self.text.rstrip("\ufffd")
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return text[: max(0, len(text) - hold)]


def greedy_token(choice: Choice, info, s: Sampling) -> bool:
    """The argmax after the prompt, from a scoring pass's last log-prob block, as the choice's one token
    (False: it was the end of text, which ends the choice without a token)."""
    token = int(info[1 + MAX_LOGPROBS])  # the first of the top ids
    if token == ENDOFTEXT_ID and not s.ignore_eos:
        choice.finish = "stop"
        return False
    choice.logprobs.append((float(info[1]), split_logprobs(info, s.logprobs)[1]))
    choice.tokens.append(token)
    choice.finish = "length"
    return True


def refresh(choices: list[Choice], trackers: list[TextTracker], requests: list) -> None:
    """Every choice's text brought up to date; a stop string found ends its request."""
    for c, t, r in zip(choices, trackers, requests):
        t.update(c.tokens)
        if t.stopped and r is not None:
            r.cancelled.set()


def is_done(choice: Choice, tracker: TextTracker) -> bool:
    return (choice.finish is not None or tracker.stopped) and choice.scored


def finish_reason(choice: Choice) -> str:
    if choice.finish and choice.finish.startswith("error"):
        raise APIError(500, f"generation failed: {choice.finish}", None, "engine_error", "server_error")
    return "length" if choice.finish == "length" else "stop"


def joined(*blocks: dict | None) -> dict | None:
    """Log-prob objects one after another (an echoed prompt's, then the generated tokens')."""
    blocks = [b for b in blocks if b is not None]
    return {k: [x for b in blocks for x in b[k]] for k in blocks[0]} if blocks else None


def usage(trackers: list[TextTracker], prompts: list[list[int]], s: Sampling) -> dict:
    prompt_tokens = sum(len(p) for p in prompts) * s.n
    completion = sum(t.used for t in trackers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


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
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gptjax",
                                            "context_length": cfg.context_length}]}

    # The tokenizer in vLLM's shapes: lm-evaluation-harness's tokenizer_backend=remote needs nothing else.
    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        body = await body_of(request)
        if not isinstance(body.get("prompt"), str):
            raise APIError(400, "'prompt' must be a string", "prompt")
        tokens = tokenizer.encode(body["prompt"], allowed_special={"<|endoftext|>"})  # GPT-2 adds no special tokens
        return {"tokens": tokens, "count": len(tokens), "max_model_len": cfg.context_length}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        body = await body_of(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise APIError(400, "'tokens' must be a list of token ids", "tokens")
        if any(not 0 <= t < cfg.vocab_size for t in tokens):
            raise APIError(400, f"'tokens' must lie in [0, {cfg.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        eot = tokenizer.decode([ENDOFTEXT_ID])
        return {"tokenizer_class": "GPT2Tokenizer", "eos_token": eot, "bos_token": eot, "unk_token": eot,
                "pad_token": None, "model_max_length": cfg.context_length, "vocab_size": cfg.vocab_size}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (STATIC / "index.html").read_text()

    async def body_of(request: HTTPRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(400, f"unknown model {json.dumps(model)}; this server serves {model_name!r}", "model",
                           "model_not_found")
        return body

    def submit(prompts: list[list[int]], s: Sampling) -> tuple[list[Choice], list[TextTracker], asyncio.Queue, list,
                                                               list[ScoreRequest]]:
        """Check the lengths and the queue, then hand every choice to the engine (its request, or None with
        max_tokens 0) and every echoed prompt with logprobs to its scorer."""
        for p in prompts:
            if len(p) + s.max_tokens > cfg.context_length:
                raise APIError(400, f"This model's maximum context length is {cfg.context_length} tokens. However, "
                               f"you requested {len(p) + s.max_tokens} tokens ({len(p)} in the prompt, {s.max_tokens} "
                               "in max_tokens). Please reduce the prompt or max_tokens.", "max_tokens",
                               "context_length_exceeded")
        if engine.waiting.qsize() + len(prompts) * s.n > engine.waiting.maxsize:
            raise APIError(429, "the server's queue is full; retry shortly", None, "queue_full", "rate_limit_error",
                           {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        choices, trackers, requests, scores = [], [], [], []
        scoring = s.echo and s.logprobs is not None
        # lm_eval's loglikelihood request (echo, logprobs, one greedy token): the scoring pass's last logits
        # give that token too, so no decode slot is involved.
        one_greedy = scoring and s.max_tokens == 1 and s.temperature == 0
        for i, p in enumerate(prompts):
            group = [Choice(p, scored=not scoring) for _ in range(s.n)]
            if scoring:
                first = len(choices)

                def on_scored(info, why=None, group=group, first=first):
                    for choice in group:
                        if info is None:
                            choice.finish = choice.finish or why or "error"
                        else:
                            choice.prompt_logprobs = [None] + [split_logprobs(row, s.logprobs) for row in info[:-1]]
                            if one_greedy and greedy_token(choice, info[-1], s):
                                metrics.generated_tokens.inc()
                        choice.scored = True
                    for index in range(first, first + len(group)):
                        loop.call_soon_threadsafe(events.put_nowait, index)
                scores.append(ScoreRequest(p, on_scored))
            for choice in group:
                index = len(choices)
                tracker = TextTracker(tokenizer, s.stop)

                def on_token(token, lp, choice=choice, index=index):
                    # The engine thread: record and signal only; the text is decoded on the event loop.
                    now = time.perf_counter()
                    if choice.tokens:
                        metrics.itl.observe(now - choice.last)
                    else:
                        metrics.ttft.observe(now - requests[index].submitted)
                    choice.last = now
                    choice.logprobs.append(lp)  # before the token: a reader never finds a token without its entry
                    choice.tokens.append(token)
                    metrics.generated_tokens.inc()
                    loop.call_soon_threadsafe(events.put_nowait, index)

                def on_finish(reason, choice=choice, index=index):
                    choice.finish = reason
                    loop.call_soon_threadsafe(events.put_nowait, index)

                if s.max_tokens == 0 or one_greedy:
                    choice.finish = "length" if s.max_tokens == 0 else None
                    requests.append(None)
                else:
                    requests.append(Request(p, s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed + index,
                                            s.logprobs, s.ignore_eos, on_token, on_finish,
                                            should_stop=lambda tracker=tracker: tracker.stopped))
                choices.append(choice)
                trackers.append(tracker)
        try:
            for job in scores:
                engine.score(job)
            for r in requests:
                if r is not None:
                    engine.submit(r)
            metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * s.n)
        except queue.Full:
            for r in [*requests, *scores]:
                if r is not None:
                    r.cancelled.set()
            raise APIError(429, "the server's queue is full; retry shortly", None, "queue_full", "rate_limit_error",
                           {"Retry-After": "1"}) from None
        return choices, trackers, events, requests, scores

    def logprobs_of(choice: Choice, tracker: TextTracker, s: Sampling, start: int = 0, base: int = 0) -> dict | None:
        """The generated tokens' log-probs from ``start``; offsets past ``base`` characters (an echoed prompt)."""
        if s.logprobs is None:
            return None
        entries = choice.logprobs[start: tracker.used]
        tokens = choice.tokens[: start + len(entries)]
        return logprobs_block(tokenizer, tokens[start:], entries, text_offsets(tokenizer, tokens, start, len(tokens), base))

    def prompt_logprobs_of(choice: Choice) -> dict:
        p = choice.prompt
        return logprobs_block(tokenizer, p, choice.prompt_logprobs, text_offsets(tokenizer, p, 0, len(p)))

    async def run(prompts: list[list[int]], s: Sampling, chat: bool, body: dict):
        choices, trackers, events, requests, scores = submit(prompts, s)
        everything = [r for r in [*requests, *scores] if r is not None]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{random.getrandbits(64):016x}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        prefixes = [tokenizer.decode(c.prompt) if s.echo else "" for c in choices]

        if not s.stream:
            try:
                refresh(choices, trackers, requests)
                while not all(is_done(c, t) for c, t in zip(choices, trackers)):
                    await events.get()
                    refresh(choices, trackers, requests)
            finally:
                for r in everything:
                    r.cancelled.set()
            refresh(choices, trackers, requests)
            out = []
            for i, (c, t) in enumerate(zip(choices, trackers)):
                reason = finish_reason(c)
                if chat:
                    out.append({"index": i, "message": {"role": "assistant", "content": t.text},
                                "finish_reason": reason, "logprobs": None})
                else:
                    prompt_lp = prompt_logprobs_of(c) if s.echo and s.logprobs is not None else None
                    out.append({"index": i, "text": prefixes[i] + t.text, "finish_reason": reason,
                                "logprobs": joined(prompt_lp, logprobs_of(c, t, s, base=len(prefixes[i])))})
            return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": out,
                    "usage": usage(trackers, prompts, s)}

        def chunk(i: int, text: str | None, reason: str | None, lp=None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                payload = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                payload = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": lp}
            body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                    "model": model_name, "choices": [payload]}
            return f"data: {json.dumps(body)}\n\n"

        async def stream():
            sent = [0] * len(choices)
            lp_sent = [0] * len(choices)
            echoed = [not s.echo] * len(choices)
            try:
                if chat:
                    for i in range(len(choices)):
                        yield chunk(i, None, None, role=True)
                done = set()
                while True:
                    # Every choice looked at after each event: a signal is never the only record of news.
                    refresh(choices, trackers, requests)
                    for i, (c, t) in enumerate(zip(choices, trackers)):
                        if i in done or not c.scored:
                            continue
                        if not echoed[i]:  # the prompt (and its log-probs) first
                            echoed[i] = True
                            yield chunk(i, prefixes[i], None, prompt_logprobs_of(c) if s.logprobs is not None else None)
                        final = is_done(c, t)
                        if final:  # every token is in once the engine finished the choice
                            t.update(c.tokens)
                        text = t.stable(final)
                        if len(text) > sent[i]:
                            lp = logprobs_of(c, t, s, lp_sent[i], base=len(prefixes[i]))
                            lp_sent[i] = t.used
                            yield chunk(i, text[sent[i]:], None, lp)
                            sent[i] = len(text)
                        if final:
                            done.add(i)
                            yield chunk(i, None if chat else "", finish_reason(c))
                    if len(done) == len(choices):
                        break
                    await events.get()
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield (f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model_name, 'choices': [], 'usage': usage(trackers, prompts, s)})}\n\n")
                yield "data: [DONE]\n\n"
            finally:  # a client that went away: free its slots at the next step
                for r in everything:
                    r.cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await body_of(request)
        s = parse_sampling(body, cfg, chat=False)
        return await run(parse_prompts(body, tokenizer, cfg.vocab_size), s, chat=False, body=body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await body_of(request)
        s = parse_sampling(body, cfg, chat=True)
        return await run([tokenizer.encode(render_chat(body.get("messages")))], s, chat=True, body=body)

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
