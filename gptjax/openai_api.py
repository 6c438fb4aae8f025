"""The OpenAI API's request and response shapes, as plain functions: parsing and checking a request's fields
(a chat's messages, rendered by the model's :class:`gptjax.chat.ChatFormat`), a choice's text as tokens arrive
(stop strings, UTF-8 held back), log-prob blocks, response bodies and SSE chunks. Nothing here runs a model or
holds state beyond one request.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from jinja2.exceptions import TemplateError

from gptjax.chat import ChatFormat
from gptjax.engine import MAX_LOGPROBS, split_logprobs
from gptjax.presets import ModelConfig, family_of


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = status, message, param, code, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def parse_body(raw: bytes, model_name: str) -> dict:
    """A request's JSON object; a ``model`` field, if any, must name the served model."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(400, f"unknown model {json.dumps(model)}; this server serves {model_name!r}", "model",
                       "model_not_found")
    return body


# The tokenizer endpoints in vLLM's shapes: lm-evaluation-harness's tokenizer_backend=remote needs nothing else.
def parse_text(body: dict) -> str:
    if not isinstance(body.get("prompt"), str):
        raise APIError(400, "'prompt' must be a string", "prompt")
    return body["prompt"]


def parse_token_ids(body: dict, vocab_size: int) -> list[int]:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise APIError(400, "'tokens' must be a list of token ids", "tokens")
    if any(not 0 <= t < vocab_size for t in tokens):
        raise APIError(400, f"'tokens' must lie in [0, {vocab_size})", "tokens")
    return tokens


def tokenizer_card(tokenizer, chat: ChatFormat, cfg: ModelConfig) -> dict:
    """The model's tokenizer as vLLM's /tokenizer_info describes one (gptjax adds no special tokens)."""
    eos = chat.special_tokens.get("eos_token") or tokenizer.decode([min(chat.stop_ids)])
    gpt2 = family_of(cfg) == "gpt2"
    return {"tokenizer_class": "GPT2Tokenizer" if gpt2 else "PreTrainedTokenizerFast", "eos_token": eos,
            "bos_token": eos if gpt2 else chat.special_tokens.get("bos_token"), "unk_token": eos if gpt2 else None,
            "pad_token": None, "model_max_length": cfg.context_length, "vocab_size": cfg.vocab_size}


def model_list(model_name: str, cfg: ModelConfig) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gptjax",
                                        "context_length": cfg.context_length}]}


def render_chat(body: dict, chat: ChatFormat) -> str:
    """The prompt text of a chat request: its ``messages`` through the model's chat format, with
    ``chat_template_kwargs`` (vLLM's field; Qwen3's ``enable_thinking``, say) passed to the template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must be an object with 'role' system, user or assistant and a "
                           "string 'content'", f"messages[{i}]")
    kwargs = _field(body, "chat_template_kwargs", (dict,), {})
    try:
        return chat.render([{"role": m["role"], "content": m["content"]} for m in messages], **kwargs)
    except (TemplateError, TypeError) as e:  # the template's raise_exception, or kwargs it cannot take
        raise APIError(400, f"the model's chat template refused the messages: {e}", "messages") from None


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


def parse_sampling(body: dict, *, chat: ChatFormat | None) -> Sampling:
    """The sampling fields of a request (``chat``: a chat request's format, whose stop strings it adds), each
    checked, with OpenAI's defaults."""
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
    return Sampling(max_tokens, temperature, top_p, max(top_k, 0), stop + list(chat.stop if chat else ()),
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
            ids = tokenizer.encode(p, allowed_special="all")
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


def greedy_token(choice: Choice, info, s: Sampling, stop_ids: frozenset[int]) -> bool:
    """The argmax after the prompt, from a scoring pass's last log-prob block, as the choice's one token
    (False: it was the end of text, which ends the choice without a token)."""
    token = int(info[1 + MAX_LOGPROBS])  # the first of the top ids
    if token in stop_ids and not s.ignore_eos:
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


def finish_reason(choice: Choice, tracker: TextTracker) -> str:
    """"stop" when a stop string or an end id ended the choice, "length" when its tokens ran out: a stop string
    found in the last tokens counts even when the engine had already finished the request by its length."""
    if choice.finish and choice.finish.startswith("error"):
        raise APIError(500, f"generation failed: {choice.finish}", None, "engine_error", "server_error")
    return "length" if choice.finish == "length" and not tracker.stopped else "stop"


def joined(*blocks: dict | None) -> dict | None:
    """Log-prob objects one after another (an echoed prompt's, then the generated tokens')."""
    blocks = [b for b in blocks if b is not None]
    return {k: [x for b in blocks for x in b[k]] for k in blocks[0]} if blocks else None


def usage(trackers: list[TextTracker], prompts: list[list[int]], s: Sampling) -> dict:
    prompt_tokens = sum(len(p) for p in prompts) * s.n
    completion = sum(t.used for t in trackers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{random.getrandbits(64):016x}"


def sse(body: dict) -> str:
    """One server-sent event carrying ``body``."""
    return f"data: {json.dumps(body)}\n\n"


def chunk_body(rid: str, created: int, model: str, chat: bool, index: int, text: str | None, reason: str | None,
               lp: dict | None = None, role: bool = False) -> dict:
    """A streamed chunk of choice ``index``: new text (None: none), its log-probs, or its finish reason; for
    chat, ``role`` opens the assistant's message."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        payload = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        payload = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": lp}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [payload]}
