"""Completion requests to the engine and back: each choice handed to :class:`gptjax.engine.Engine` (or, for an
echoed prompt with log-probs, to its scoring pass), its tokens gathered from the engine thread, and the
response built on the event loop, whole or as server-sent events. :mod:`gptjax.app` routes HTTP to it; the
shapes are :mod:`gptjax.openai_api`'s.
"""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gptjax.presets import ModelConfig
from gptjax.engine import Engine, Request, ScoreRequest, split_logprobs
from gptjax.openai_api import (APIError, Choice, Sampling, TextTracker, chunk_body, completion_id, finish_reason,
                               greedy_token, is_done, joined, logprobs_block, refresh, sse, text_offsets, usage)


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
class Job:
    """One request's choices in flight: ``events`` gets a choice's index whenever the engine thread has news
    for it; ``requests`` (None: nothing to decode) and ``scores`` are what the engine was handed."""

    prompts: list[list[int]]
    s: Sampling
    chat: bool
    events: asyncio.Queue
    choices: list[Choice] = field(default_factory=list)
    trackers: list[TextTracker] = field(default_factory=list)
    requests: list[Request | None] = field(default_factory=list)
    scores: list[ScoreRequest] = field(default_factory=list)
    rid: str = ""
    created: int = 0

    def cancel(self) -> None:
        """Free the job's slots and scoring at the engine's next step (a finished job's too: harmless)."""
        for r in [*self.requests, *self.scores]:
            if r is not None:
                r.cancelled.set()


class Completions:
    """Completion jobs over one running engine: :meth:`submit` checks and hands a request to it, then
    :meth:`complete` or :meth:`stream` answers it."""

    def __init__(self, engine: Engine, tokenizer, cfg: ModelConfig, metrics: Metrics, model_name: str):
        self.engine, self.tokenizer, self.cfg, self.metrics, self.model_name = engine, tokenizer, cfg, metrics, model_name

    # --- handing a request to the engine -------------------------------------------------------------

    def submit(self, prompts: list[list[int]], s: Sampling, *, chat: bool) -> Job:
        """Check the lengths and the queue, then hand every choice to the engine (its request, or None with
        max_tokens 0) and every echoed prompt with logprobs to its scorer."""
        self._check(prompts, s)
        job = Job(prompts, s, chat, asyncio.Queue(), rid=completion_id(chat), created=int(time.time()))
        scoring = s.echo and s.logprobs is not None
        for p in prompts:
            group = [Choice(p, scored=not scoring) for _ in range(s.n)]
            if scoring:
                job.scores.append(ScoreRequest(p, self._on_scored(job, group, len(job.choices))))
            for choice in group:
                self._add_choice(job, choice)
        try:
            for score in job.scores:
                self.engine.score(score)
            for r in job.requests:
                if r is not None:
                    self.engine.submit(r)
            self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * s.n)
        except queue.Full:
            job.cancel()
            raise self._queue_full() from None
        return job

    def _check(self, prompts: list[list[int]], s: Sampling) -> None:
        context = self.cfg.context_length
        for p in prompts:
            if len(p) + s.max_tokens > context:
                raise APIError(400, f"This model's maximum context length is {context} tokens. However, you "
                               f"requested {len(p) + s.max_tokens} tokens ({len(p)} in the prompt, {s.max_tokens} "
                               "in max_tokens). Please reduce the prompt or max_tokens.", "max_tokens",
                               "context_length_exceeded")
        if self.engine.waiting.qsize() + len(prompts) * s.n > self.engine.waiting.maxsize:
            raise self._queue_full()

    @staticmethod
    def _queue_full() -> APIError:
        return APIError(429, "the server's queue is full; retry shortly", None, "queue_full", "rate_limit_error",
                        {"Retry-After": "1"})

    @staticmethod
    def _one_greedy(s: Sampling) -> bool:
        # lm_eval's loglikelihood request (echo, logprobs, one greedy token): the scoring pass's last logits
        # give that token too, so no decode slot is involved.
        return s.echo and s.logprobs is not None and s.max_tokens == 1 and s.temperature == 0

    def _on_scored(self, job: Job, group: list[Choice], first: int):
        """The engine thread's callback for a prompt's scoring pass, shared by the prompt's ``group``."""
        loop, s = asyncio.get_running_loop(), job.s

        def on_scored(info, why=None):
            for choice in group:
                if info is None:
                    choice.finish = choice.finish or why or "error"
                else:
                    choice.prompt_logprobs = [None] + [split_logprobs(row, s.logprobs) for row in info[:-1]]
                    if self._one_greedy(s) and greedy_token(choice, info[-1], s, self.engine.stop_ids):
                        self.metrics.generated_tokens.inc()
                choice.scored = True
            for index in range(first, first + len(group)):
                loop.call_soon_threadsafe(job.events.put_nowait, index)

        return on_scored

    def _add_choice(self, job: Job, choice: Choice) -> None:
        """The choice's tracker and engine request, with the callbacks the engine thread calls."""
        loop, s, index, metrics = asyncio.get_running_loop(), job.s, len(job.choices), self.metrics
        tracker = TextTracker(self.tokenizer, s.stop)

        def on_token(token, lp):
            # The engine thread: record and signal only; the text is decoded on the event loop.
            now = time.perf_counter()
            if choice.tokens:
                metrics.itl.observe(now - choice.last)
            else:
                metrics.ttft.observe(now - job.requests[index].submitted)
            choice.last = now
            choice.logprobs.append(lp)  # before the token: a reader never finds a token without its entry
            choice.tokens.append(token)
            metrics.generated_tokens.inc()
            loop.call_soon_threadsafe(job.events.put_nowait, index)

        def on_finish(reason):
            choice.finish = reason
            loop.call_soon_threadsafe(job.events.put_nowait, index)

        if s.max_tokens == 0 or self._one_greedy(s):
            choice.finish = "length" if s.max_tokens == 0 else None
            job.requests.append(None)
        else:
            job.requests.append(Request(choice.prompt, s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed + index,
                                        s.logprobs, s.ignore_eos, on_token, on_finish,
                                        should_stop=lambda: tracker.stopped))
        job.choices.append(choice)
        job.trackers.append(tracker)

    # --- answering -------------------------------------------------------------------------------------

    def _logprobs_of(self, job: Job, i: int, start: int = 0, base: int = 0) -> dict | None:
        """Choice i's generated tokens' log-probs from ``start``; offsets past ``base`` characters (an echoed
        prompt)."""
        if job.s.logprobs is None:
            return None
        choice, tracker = job.choices[i], job.trackers[i]
        entries = choice.logprobs[start: tracker.used]
        tokens = choice.tokens[: start + len(entries)]
        return logprobs_block(self.tokenizer, tokens[start:], entries,
                              text_offsets(self.tokenizer, tokens, start, len(tokens), base))

    def _prompt_logprobs_of(self, choice: Choice) -> dict:
        p = choice.prompt
        return logprobs_block(self.tokenizer, p, choice.prompt_logprobs, text_offsets(self.tokenizer, p, 0, len(p)))

    def _prefixes(self, job: Job) -> list[str]:
        return [self.tokenizer.decode(c.prompt) if job.s.echo else "" for c in job.choices]

    async def complete(self, job: Job) -> dict:
        """The whole response, once every choice is done."""
        choices, trackers, requests, s = job.choices, job.trackers, job.requests, job.s
        try:
            refresh(choices, trackers, requests)
            while not all(is_done(c, t) for c, t in zip(choices, trackers)):
                await job.events.get()
                refresh(choices, trackers, requests)
        finally:
            job.cancel()
        refresh(choices, trackers, requests)
        prefixes, out = self._prefixes(job), []
        for i, (c, t) in enumerate(zip(choices, trackers)):
            reason = finish_reason(c, t)
            if job.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": t.text},
                            "finish_reason": reason, "logprobs": None})
            else:
                prompt_lp = self._prompt_logprobs_of(c) if s.echo and s.logprobs is not None else None
                out.append({"index": i, "text": prefixes[i] + t.text, "finish_reason": reason,
                            "logprobs": joined(prompt_lp, self._logprobs_of(job, i, base=len(prefixes[i])))})
        return {"id": job.rid, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
                "model": self.model_name, "choices": out, "usage": usage(trackers, job.prompts, s)}

    async def stream(self, job: Job, *, include_usage: bool = False) -> AsyncIterator[str]:
        """The response as server-sent events, each choice's text as it becomes stable."""
        n = len(job.choices)
        sent, lp_sent, echoed, done = [0] * n, [0] * n, [not job.s.echo] * n, set()
        prefixes = self._prefixes(job)
        try:
            if job.chat:
                for i in range(n):
                    yield self._chunk(job, i, None, None, role=True)
            while True:
                # Every choice looked at after each event: a signal is never the only record of news.
                refresh(job.choices, job.trackers, job.requests)
                for i, (c, t) in enumerate(zip(job.choices, job.trackers)):
                    if i in done or not c.scored:
                        continue
                    if not echoed[i]:  # the prompt (and its log-probs) first
                        echoed[i] = True
                        lp = self._prompt_logprobs_of(c) if job.s.logprobs is not None else None
                        yield self._chunk(job, i, prefixes[i], None, lp)
                    final = is_done(c, t)
                    if final:  # every token is in once the engine finished the choice
                        t.update(c.tokens)
                    text = t.stable(final)
                    if len(text) > sent[i]:
                        lp = self._logprobs_of(job, i, lp_sent[i], base=len(prefixes[i]))
                        lp_sent[i] = t.used
                        yield self._chunk(job, i, text[sent[i]:], None, lp)
                        sent[i] = len(text)
                    if final:
                        done.add(i)
                        yield self._chunk(job, i, None if job.chat else "", finish_reason(c, t))
                if len(done) == n:
                    break
                await job.events.get()
            if include_usage:
                yield sse({"id": job.rid, "object": "chat.completion" if job.chat else "text_completion",
                           "created": job.created, "model": self.model_name, "choices": [],
                           "usage": usage(job.trackers, job.prompts, job.s)})
            yield "data: [DONE]\n\n"
        finally:  # a client that went away: free its slots at the next step
            job.cancel()

    def _chunk(self, job: Job, i: int, text: str | None, reason: str | None, lp: dict | None = None,
               role: bool = False) -> str:
        return sse(chunk_body(job.rid, job.created, self.model_name, job.chat, i, text, reason, lp, role))
