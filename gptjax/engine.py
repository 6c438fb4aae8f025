"""A continuous-batching decode engine for :mod:`gptjax.app`: many requests decoded together, each at its
own position, joining and leaving between steps.

The KV cache has one row per decode slot (``max_batch`` of them, each the whole context long). A step decodes
the busy slots only: their rows are gathered into the smallest compiled batch (1, 2, 4, ... up to
``max_batch``) that holds them, the rest of the batch being padding rows that read and write nothing, and
each row reads and writes its own slot's cache row (:func:`gptjax.model.apply_with_cache`'s ``cache_rows``;
on CPU the compiled attention updates the slot in place and reads only its filled positions). So a step
costs what the busy slots cost, and an idle engine waits without computing.

Tokens are chosen on the device by :func:`gptjax.sampling.sample_rows`, the sampler ``generate`` uses, with
each request's settings as arrays and its own key: a request with seed ``s`` draws the tokens row 0 of
``generate(..., rng=s)`` draws, whatever shares its batch (up to float rounding, which differs between batch
sizes), and a greedy one returns generate's tokens.

The host round trip of each step is hidden behind the next one: step n+1 is dispatched before the host
copies step n's tokens out and hands them on (JetStream's pipelining), so the device never waits for
Python while the set of busy slots stays the same. When it changes (a request ends, or waits to join), the
host drains the pipeline first; a request that ended is computed for one step more, and that token is
dropped. While only one or two requests decode and none waits, a dispatch runs ``burst_steps`` steps
(levanter's engine does this always): a dispatch costs the host about a millisecond, a twentieth of a
one-row step, and saving it brings one stream to ``generate``'s rate; the tokens then arrive in bursts, and
a request that arrives waits for the burst in flight (a few steps) to join.

A new request is prefilled into a free slot in chunks of at most ``prefill_chunk`` tokens, one round of
chunks between decode steps, so a long prompt delays the running streams by one chunk per step instead of
its whole length. A prompt that fits one chunk is prefilled at the padded length ``generate`` uses.
The engine thread only appends tokens and flags: detokenizing and stop strings are the caller's, on its own
thread (``should_stop`` is read once per token).
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.model import Params, apply, apply_with_cache, init_cache
from gptjax.buckets import batch_buckets, length_bucket
from gptjax.sampling import decoding_weights, position_keys, row_keys, sample_rows
from gptjax.tokenizer import ENDOFTEXT_ID

MAX_LOGPROBS = 5  # OpenAI's completions API allows logprobs up to 5
PREFILL_CHUNK = 256
# While at most BURST_ROWS requests decode and none waits, a dispatch runs BURST_STEPS steps: at one or two
# rows a dispatch's fixed cost (~1 ms of host work and launch on gpt2-small, against a 16-18 ms step) is
# worth saving; at more rows the step is longer and bursts would only delay joining requests.
BURST_STEPS = 4
BURST_ROWS = 2
SCORE_TOKENS = 2048  # tokens in one scoring pass (its logits: 2048 x 50257 float32, 400 MB)


@dataclass
class Request:
    """One sequence to generate. ``on_token(token_id, logprob_info)`` and ``on_finish(reason)`` are
    called from the engine thread and must be quick; ``finish_reason`` is "stop" (end of text unless
    ``ignore_eos``, or
    ``should_stop()`` true after a token), "length", "cancelled" or "error: ..."."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None
    ignore_eos: bool = False
    on_token: Callable[[int, tuple | None], None] = lambda token, lp: None
    on_finish: Callable[[str], None] = lambda reason: None
    should_stop: Callable[[], bool] = lambda: False
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    generated: int = 0


@dataclass
class ScoreRequest:
    """A prompt to score: ``on_done(info)`` gets, for each position of the prompt, the log-prob block of the
    token after it ([len(prompt), 1 + 2 * MAX_LOGPROBS], see ``split_logprobs``): rows 0..n-2 for the prompt's
    own tokens 1..n-1, and the last row's top entries for what would follow the prompt (its first number is
    meaningless); ``on_done(None, reason)`` when it failed ("error: ...") or was cancelled."""

    prompt: list[int]
    on_done: Callable[..., None]
    cancelled: threading.Event = field(default_factory=threading.Event)


def _logprob_info(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[..., 1 + 2 * MAX_LOGPROBS] float32: the chosen token's log-prob, then the top log-probs and their ids
    (both read from one log-softmax, so the chosen token's number is the one among the top where it is)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, MAX_LOGPROBS)
    chosen = jnp.take_along_axis(logp, tokens[..., None], axis=-1)
    return jnp.concatenate([chosen, top_lp, top_ids.astype(jnp.float32)], axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _score_pass(params: Params, cfg: GPTConfig, tokens: jax.Array, *, dtype: str) -> jax.Array:
    """Every position's next-token log-prob block of padded prompts [rows, width]: one forward pass."""
    logits = apply(params, cfg, tokens, dtype=jnp.dtype(dtype))
    return _logprob_info(logits, jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))))


class Rows(NamedTuple):
    """One decode batch, a row per busy slot (padding rows: position -1)."""

    slot: jax.Array  # [rows] int32: the cache row
    token: jax.Array  # [rows] int32: the token fed next
    pos: jax.Array  # [rows] int32: its position
    key: jax.Array  # [rows, 2] uint32: the request's key data
    temperature: jax.Array  # [rows] float32
    top_k: jax.Array  # [rows] int32
    top_p: jax.Array  # [rows] float32


def _sample(logits: jax.Array, key_data: jax.Array, position: jax.Array, temperature: jax.Array, top_k: jax.Array,
            top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The tokens at ``position`` (one per row) and their log-prob blocks."""
    keys = position_keys(jax.random.wrap_key_data(key_data), position)
    token = sample_rows(logits, keys, temperature, top_k, top_p)
    return token, _logprob_info(logits, token)


@jax.jit
def _request_key(seed: jax.Array) -> jax.Array:
    """The key data a request with ``seed`` samples with: row 0's of ``generate(..., rng=seed)`` (one compiled
    call per admitted request rather than a handful of eager ones on the engine thread)."""
    return jax.random.key_data(row_keys(jax.random.key(seed), 1)[0])


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "logprobs", "steps"), donate_argnames=("cache",))
def _decode_steps(params: Params, cfg: GPTConfig, cache: list, rows: Rows, *, dtype: str, logprobs: bool,
                  steps: int):
    """``steps`` tokens for every row, each fed back as the next one's input: (the cache, the rows advanced,
    the tokens [steps, rows], their log-prob blocks [steps, rows, ...] or None)."""
    def step(carry, _):
        cache, rows = carry
        logits, cache = apply_with_cache(params, cfg, rows.token[:, None], cache, rows.pos, cache_rows=rows.slot,
                                         dtype=jnp.dtype(dtype))
        token, info = _sample(logits[:, -1], rows.key, rows.pos + 1, rows.temperature, rows.top_k, rows.top_p)
        pos = jnp.where(rows.pos >= 0, jnp.minimum(rows.pos + 1, cfg.context_length - 1), rows.pos)
        return (cache, rows._replace(token=token, pos=pos)), (token, info if logprobs else None)

    (cache, rows), (tokens, info) = jax.lax.scan(step, (cache, rows), length=steps, unroll=steps == 1)
    return cache, rows, tokens, info


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "first"), donate_argnames=("cache",))
def _prefill_chunk(params: Params, cfg: GPTConfig, cache: list, chunk: jax.Array, start: jax.Array, slot: jax.Array,
                   last: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                   dtype: str, first: bool):
    """A padded chunk [1, width] of a prompt at positions start.. into cache row ``slot``, and the token that
    follows its position ``last`` (used after the prompt's last chunk) with its log-prob block.

    A prompt's ``first`` chunk (start 0) attends only to itself: it runs on a cache of its own width, copied
    into the slot's row afterwards, instead of attending over all context_length slots of the row
    (gpt2-small, a 16-token prompt: 70 -> 34 ms from float32, 54 -> 21 ms from int8)."""
    if first:
        own = init_cache(cfg, 1, cache[0]["k"].dtype, slots=chunk.shape[1])
        logits, own = apply_with_cache(params, cfg, chunk, own, 0, logits_at=last, dtype=jnp.dtype(dtype))
        at = (slot, 0, 0, 0)
        cache = [{name: jax.lax.dynamic_update_slice(layer[name], new[name], at) for name in layer}
                 for layer, new in zip(cache, own)]
    else:
        logits, cache = apply_with_cache(params, cfg, chunk, cache, start, cache_rows=slot[None], logits_at=last,
                                         dtype=jnp.dtype(dtype))
    final = logits[:, 0]
    token, info = _sample(final, key[None], start + last + 1, temperature[None], top_k[None], top_p[None])
    return cache, token[0], info[0]


@dataclass
class _Slot:
    """A busy slot, as the host knows it: its request, how much of the prompt is in the cache, and (once
    decoding) the last token and its position."""

    request: Request
    key: np.ndarray  # [2] uint32
    prefilled: int = 0
    token: int = 0
    pos: int = 0

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt)


class Engine:
    """Runs requests on its own thread: ``submit`` from any thread, ``start`` once, ``stop`` to end.

    ``max_queue`` bounds the requests waiting for a slot: ``submit`` raises ``queue.Full`` beyond it.
    ``on_step(active_slots, waiting)`` is called after each step (for metrics)."""

    def __init__(self, params: Params, cfg: GPTConfig, *, max_batch: int = 8, weights_dtype: str = "float32",
                 dtype: str = "float32", max_queue: int = 64, on_step: Callable[[int, int], None] | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, burst_steps: int = BURST_STEPS,
                 stop_ids: frozenset[int] = frozenset({ENDOFTEXT_ID})):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if burst_steps < 1:
            raise ValueError(f"burst_steps must be at least 1, got {burst_steps}")
        self.burst_steps, self.stop_ids = burst_steps, stop_ids
        self.params, cfg = decoding_weights(params, cfg, weights_dtype)
        self.cfg, self.max_batch, self.dtype = cfg, max_batch, jnp.dtype(dtype).name
        self.prefill_chunk = min(prefill_chunk, cfg.context_length)
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.scoring: queue.Queue[ScoreRequest] = queue.Queue(maxsize=max_queue)
        self._unscored: list[ScoreRequest] = []  # taken from the queue, not yet in a pass
        self.on_step = on_step
        # Committed to the device as every step's outputs are: jit compiles anew for an argument that changes
        # from uncommitted (fresh zeros, numpy rows) to committed, which once made each shape compile twice,
        # the second time mid-request.
        self.device = jax.devices()[0]
        self.cache = jax.device_put(init_cache(cfg, max_batch), self.device)
        self.slots: list[_Slot | None] = [None] * max_batch
        self.buckets = batch_buckets(max_batch)
        self._changed = True  # the busy slots changed since the decode batch was built
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gptjax-engine", daemon=True)

    # --- compiled programs -------------------------------------------------------------------------

    def prefill_widths(self) -> list[int]:
        """The padded chunk lengths prefill compiles for."""
        sizes, n = [], 1
        while not sizes or sizes[-1] < self.prefill_chunk:
            sizes.append(length_bucket(n, cap=self.prefill_chunk))
            n = sizes[-1] + 1
        return sizes

    def warm_up(self) -> None:
        """Compile every shape a request can hit (each prefill width, each decode batch with and without
        log-probs, in bursts too) now, on padding that writes nothing a request reads."""
        jax.block_until_ready(_request_key(0))
        zero_f, zero_i = np.float32(0), np.int32(0)
        for width in self.prefill_widths():
            for first in (True, False):
                self.cache, token, _ = _prefill_chunk(self.params, self.cfg, self.cache, np.zeros((1, width), np.int32),
                                                      zero_i, zero_i, zero_i, np.zeros(2, np.uint32), zero_f, zero_i,
                                                      np.float32(1), dtype=self.dtype, first=first)
                jax.block_until_ready(token)
        for size in self.buckets:
            for logprobs in (False, True):
                for steps in {1, self.burst_steps if size <= BURST_ROWS else 1}:
                    self.cache, _, token, _ = _decode_steps(self.params, self.cfg, self.cache, self._rows([], size),
                                                            dtype=self.dtype, logprobs=logprobs, steps=steps)
                    jax.block_until_ready(token)

    # --- the public side -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def submit(self, request: Request) -> None:
        self.waiting.put_nowait(request)
        self._wake.set()

    def score(self, request: ScoreRequest) -> None:
        """Queue a prompt for scoring (one forward pass, no decode slot); ``queue.Full`` beyond max_queue."""
        if not 1 <= len(request.prompt) <= self.cfg.context_length:
            raise ValueError(f"a scored prompt needs 1 to {self.cfg.context_length} tokens, got {len(request.prompt)}")
        self.scoring.put_nowait(request)
        self._wake.set()

    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def idle(self) -> bool:
        return self.active() == 0 and self.waiting.empty() and self.scoring.empty() and not self._unscored

    # --- the engine thread -----------------------------------------------------------------------------

    def _rows(self, order: list[int], size: int) -> Rows:
        """The decode batch of slots ``order``, padded to ``size`` rows."""
        assert len(order) <= size
        slot, token, pos = np.zeros(size, np.int32), np.zeros(size, np.int32), np.full(size, -1, np.int32)
        key, temperature = np.zeros((size, 2), np.uint32), np.zeros(size, np.float32)
        top_k, top_p = np.zeros(size, np.int32), np.ones(size, np.float32)
        for i, s in enumerate(self.slots[j] for j in order):
            r = s.request
            slot[i], token[i], pos[i], key[i] = order[i], s.token, s.pos, s.key
            temperature[i], top_k[i], top_p[i] = r.temperature, r.top_k, r.top_p
        return jax.device_put(Rows(slot, token, pos, key, temperature, top_k, top_p), self.device)

    def _finish(self, index: int, reason: str) -> None:
        s = self.slots[index]
        self.slots[index] = None
        self._changed = True
        s.request.on_finish(reason)

    def _emit(self, index: int, token: int, info) -> None:
        """Hand a slot's request its new token; end it on end of text, its length, a stop or a cancel."""
        s = self.slots[index]
        r = s.request
        r.generated += 1
        s.token, s.pos = token, s.pos + 1
        if token in self.stop_ids and not r.ignore_eos:
            self._finish(index, "stop")
            return
        # A step computes log-probs for every row when any request asked for them; a request hears only its own.
        try:
            r.on_token(token, None if info is None or r.logprobs is None else split_logprobs(info, r.logprobs))
            reason = ("stop" if r.should_stop() else "length" if r.generated >= r.max_tokens
                      else "cancelled" if r.cancelled.is_set() else None)
        except Exception as e:  # a failing callback ends its request, not the engine
            reason = f"error: {e}"
        if reason is not None:
            self._finish(index, reason)

    def _admit(self) -> None:
        """Move waiting requests into the free slots (to be prefilled)."""
        for index in range(self.max_batch):
            while self.slots[index] is None:
                try:
                    r = self.waiting.get_nowait()
                except queue.Empty:
                    return
                if r.cancelled.is_set():
                    r.on_finish("cancelled")
                    continue
                try:
                    key = np.asarray(_request_key(r.seed), np.uint32)
                except (OverflowError, TypeError, ValueError) as e:  # a seed jax cannot take
                    r.on_finish(f"error: {e}")
                    continue
                self.slots[index] = _Slot(r, key)
                self._changed = True

    def _prefill_round(self) -> None:
        """One chunk of every slot still prefilling, until a chunk's worth of tokens ran; a prompt's last chunk
        also chooses its first token."""
        budget = self.prefill_chunk
        for index, s in enumerate(self.slots):
            if s is None or s.decoding or budget <= 0:
                continue
            r = s.request
            n = min(self.prefill_chunk, len(r.prompt) - s.prefilled)
            chunk = np.zeros((1, length_bucket(n, cap=self.prefill_chunk)), np.int32)
            chunk[0, :n] = r.prompt[s.prefilled: s.prefilled + n]
            try:
                self.cache, token, info = _prefill_chunk(
                    self.params, self.cfg, self.cache, chunk, np.int32(s.prefilled), np.int32(index), np.int32(n - 1),
                    s.key, np.float32(r.temperature), np.int32(r.top_k), np.float32(r.top_p), dtype=self.dtype,
                    first=s.prefilled == 0)
            except Exception as e:  # a failed request must not take the engine down
                self._finish(index, f"error: {e}")
                continue
            budget -= n
            s.prefilled += n
            if s.decoding:
                token, info = jax.device_get((token, info))
                s.pos = len(r.prompt) - 1  # _emit advances it to the new token's position
                self._emit(index, int(token), info if r.logprobs is not None else None)

    def _steps(self, requests: list[Request], inflight: collections.deque) -> int:
        """The steps of the next dispatch: a burst while few rows decode, none waits to join and each row has
        that many tokens to go past those in flight (so a length limit never wastes a step); else one."""
        ahead = sum(tokens.shape[0] for _, _, tokens, _ in inflight)
        if (len(requests) <= BURST_ROWS and self.waiting.empty()
                and all(r.max_tokens - r.generated - ahead >= self.burst_steps for r in requests)):
            return self.burst_steps
        return 1

    def _process(self, order: list[int], requests: list[Request], tokens, info) -> None:
        """Hand each row's tokens of a finished dispatch to its slot, step by step (rows whose request ended
        meanwhile, even within the dispatch, are dropped)."""
        tokens, info = jax.device_get((tokens, info))
        for step in range(tokens.shape[0]):
            for i, index in enumerate(order):
                s = self.slots[index]
                if s is not None and s.request is requests[i]:
                    self._emit(index, int(tokens[step, i]), None if info is None else info[step, i])
        if self.on_step:
            self.on_step(self.active(), self.waiting.qsize())

    def _score_round(self) -> None:
        """One scoring pass over the longest waiting prompts, padded to the longest one's bucket, as many as
        SCORE_TOKENS allows, in a power-of-two number of rows: sorted by length, a pass holds prompts of
        similar lengths, and prompts of one request and of concurrent ones share passes."""
        while True:
            try:
                self._unscored.append(self.scoring.get_nowait())
            except queue.Empty:
                break
        for job in [j for j in self._unscored if j.cancelled.is_set()]:
            self._unscored.remove(job)
            job.on_done(None, "cancelled")
        if not self._unscored:
            return
        self._unscored.sort(key=lambda j: len(j.prompt), reverse=True)
        width = length_bucket(len(self._unscored[0].prompt), cap=self.cfg.context_length)
        jobs = self._unscored[: max(1, SCORE_TOKENS // width)]
        del self._unscored[: len(jobs)]
        tokens = np.zeros((1 << (len(jobs) - 1).bit_length(), width), np.int32)
        for i, job in enumerate(jobs):
            tokens[i, : len(job.prompt)] = job.prompt
        try:
            info = np.asarray(_score_pass(self.params, self.cfg, tokens, dtype=self.dtype))
        except Exception as e:  # a failed pass must not take the engine down
            for job in jobs:
                job.on_done(None, f"error: {e}")
            return
        for i, job in enumerate(jobs):
            job.on_done(info[i, : len(job.prompt)])

    def _cancel_requested(self) -> None:
        for index, s in enumerate(self.slots):
            if s is not None and s.request.cancelled.is_set():
                self._finish(index, "cancelled")

    def _loop(self) -> None:
        inflight: collections.deque = collections.deque()
        rows = order = requests = None
        while not self._stop.is_set():
            self._cancel_requested()
            prefilling = any(s is not None and not s.decoding for s in self.slots)
            joining = not self.waiting.empty() and None in self.slots
            scoring = bool(self._unscored) or not self.scoring.empty()
            if self._changed or prefilling or joining or scoring:
                while inflight:
                    self._process(*inflight.popleft())
                self._score_round()
                self._admit()
                self._prefill_round()
                self._changed = False
                order = [i for i, s in enumerate(self.slots) if s is not None and s.decoding]
                if not order:
                    if self.idle():
                        if self.on_step:
                            self.on_step(0, 0)
                        self._wake.wait()
                        self._wake.clear()
                    self._changed = True
                    continue
                requests = [self.slots[i].request for i in order]
                rows = self._rows(order, next(b for b in self.buckets if b >= len(order)))
            logprobs = any(r.logprobs is not None for r in requests)
            self.cache, rows, tokens, info = _decode_steps(self.params, self.cfg, self.cache, rows, dtype=self.dtype,
                                                           logprobs=logprobs, steps=self._steps(requests, inflight))
            inflight.append((order, requests, tokens, info))
            if len(inflight) > 1:
                self._process(*inflight.popleft())
        while inflight:
            self._process(*inflight.popleft())


def split_logprobs(info: np.ndarray, n: int) -> tuple[float, list[tuple[int, float]]]:
    """(the chosen token's log-prob, the top ``n`` (id, log-prob) pairs) from a ``_logprob_info`` row."""
    top_lp, top_ids = info[1: 1 + MAX_LOGPROBS], info[1 + MAX_LOGPROBS:]
    return float(info[0]), [(int(top_ids[i]), float(top_lp[i])) for i in range(n)]
