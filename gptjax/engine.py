"""A continuous-batching decode engine (JetStream's prefill / insert / generate) for :mod:`gptjax.serve`.

A fixed set of ``max_batch`` decode slots shares one KV cache [slots, heads, context, head_dim] per layer.
Between decode steps, a waiting request is prefilled alone (its prompt padded to a power-of-two bucket,
as :func:`gptjax.sampling.generate` pads it), its first token sampled, and its cache rows and state
inserted into a free slot; then one jitted step advances every slot by one token. Each slot keeps its
own position, key, temperature, top-k and top-p as arrays on the device, so any mix of settings runs the
same compiled step. The host receives one array per step (the new token of every slot; the log-probs
too when a request asked for them) and decides stops: ``<|endoftext|>``, ``max_tokens``, stop strings,
a cancelled request. A stopped slot is free for the next insert at once; a free slot keeps computing
(the step's shape is fixed) and its output is ignored.

Greedy rows take the argmax of the same logits :func:`gptjax.generate` computes, so a greedy request
returns generate's tokens whatever shares the batch (tested).
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.model import Params, apply_with_cache, init_cache
from gptjax.quantize import quantize_params
from gptjax.sampling import _bucket, top_p_filter
from gptjax.tokenizer import ENDOFTEXT_ID

MAX_LOGPROBS = 5  # OpenAI's completions API allows logprobs up to 5


@dataclass
class Request:
    """One sequence to generate. ``on_token(token_id, logprob_info)`` and ``on_finish(reason)`` are
    called from the engine thread; ``finish_reason`` is "stop" (eos or a stop string found by the
    caller, see ``should_stop``), "length", "cancelled" or "error"."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None
    on_token: Callable[[int, tuple | None], None] = lambda token, lp: None
    on_finish: Callable[[str], None] = lambda reason: None
    should_stop: Callable[[], bool] = lambda: False
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    generated: int = 0


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """One token per row of ``logits`` [rows, vocab], each row with its own settings: temperature 0 is
    argmax; else top-k (0: off; ties with the k-th kept), temperature, top-p, and a draw from the row's key.
    The filtering only runs when some row samples, so an all-greedy batch pays for the argmax alone."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        vocab = logits.shape[-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = jnp.take_along_axis(jnp.flip(jnp.sort(logits, axis=-1), axis=-1), (k - 1)[:, None], axis=-1)
        x = jnp.where(logits < kth, -jnp.inf, logits) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        x = top_p_filter(x, top_p[:, None])
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, x).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def _logprob_info(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[rows, 1 + 2 * MAX_LOGPROBS] float32: the chosen token's log-prob, then the top log-probs and their ids."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, MAX_LOGPROBS)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)
    return jnp.concatenate([chosen, top_lp, top_ids.astype(jnp.float32)], axis=-1)


@dataclass
class Slots:
    """The device state of every decode slot."""

    cache: list
    token: jax.Array  # [slots] int32: the token fed next
    pos: jax.Array  # [slots] int32: its position
    key: jax.Array  # [slots] keys
    count: jax.Array  # [slots] int32: tokens generated so far (folded into the key)
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


jax.tree_util.register_dataclass(Slots, data_fields=list(Slots.__dataclass_fields__), meta_fields=[])


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _prefill(params: Params, cfg: GPTConfig, padded: jax.Array, length: jax.Array, key: jax.Array,
             temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *, dtype: str):
    """The padded prompt [1, bucket] through the model: its cache, first token and that token's log-probs."""
    cache = init_cache(cfg, 1, slots=padded.shape[1])
    logits, cache = apply_with_cache(params, cfg, padded, cache, 0, dtype=jnp.dtype(dtype))
    last = jnp.take(logits, length - 1, axis=1)
    token = sample_rows(last, jax.random.fold_in(key, 0)[None], temperature[None], top_k[None], top_p[None])
    return cache, token, _logprob_info(last, token)


@functools.partial(jax.jit, donate_argnames=("slots",))
def _insert(slots: Slots, prefill_cache: list, slot: jax.Array, token: jax.Array, length: jax.Array, key: jax.Array,
            temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> Slots:
    """Write a prefilled request into decode slot ``slot`` (positions past its prompt are overwritten by
    its own decode steps before anything reads them, and the causal mask hides the rest)."""
    cache = [{name: jax.lax.dynamic_update_slice(layer[name], new[name], (slot, 0, 0, 0)) for name in layer}
             for layer, new in zip(slots.cache, prefill_cache)]

    def put(array, value):
        return array.at[slot].set(value)

    return Slots(cache, put(slots.token, token[0]), put(slots.pos, length), put(slots.key, key), put(slots.count, 1),
                 put(slots.temperature, temperature), put(slots.top_k, top_k), put(slots.top_p, top_p))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "logprobs"), donate_argnames=("slots",))
def _step(params: Params, cfg: GPTConfig, slots: Slots, *, dtype: str, logprobs: bool):
    """One token for every slot, each at its own position: the model runs per row (vmapped), so rows
    never see one another."""
    def row(token, cache, pos):
        cache = [{name: slab[None] for name, slab in layer.items()} for layer in cache]
        logits, cache = apply_with_cache(params, cfg, token[None, None], cache, pos, dtype=jnp.dtype(dtype))
        return logits[0, -1], [{name: slab[0] for name, slab in layer.items()} for layer in cache]

    logits, cache = jax.vmap(row)(slots.token, slots.cache, slots.pos)
    keys = jax.vmap(jax.random.fold_in)(slots.key, slots.count)
    token = sample_rows(logits, keys, slots.temperature, slots.top_k, slots.top_p)
    # A free slot's position keeps moving; clamped, its writes stay inside its own rows.
    new = Slots(cache, token, jnp.minimum(slots.pos + 1, cfg.context_length - 1), slots.key, slots.count + 1,
                slots.temperature, slots.top_k, slots.top_p)
    return new, token, (_logprob_info(logits, token) if logprobs else None)


class Engine:
    """Runs requests on its own thread: ``submit`` from any thread, ``start`` once, ``stop`` to end.

    ``max_queue`` bounds the requests waiting for a slot: ``submit`` raises ``queue.Full`` beyond it.
    ``on_step(active_slots, waiting)`` is called after each step (for metrics)."""

    def __init__(self, params: Params, cfg: GPTConfig, *, max_batch: int = 8, weights_dtype: str = "float32",
                 dtype: str = "float32", max_queue: int = 64, on_step: Callable[[int, int], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.cfg, self.max_batch, self.dtype = cfg, max_batch, jnp.dtype(dtype).name
        self.params = quantize_params(params, weights_dtype)
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.on_step = on_step
        self.slots = self._empty_slots()
        self.running: list[Request | None] = [None] * max_batch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gptjax-engine", daemon=True)

    def _empty_slots(self) -> Slots:
        b = self.max_batch
        return Slots(init_cache(self.cfg, b), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32),
                     jax.random.split(jax.random.key(0), b), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.float32),
                     jnp.zeros(b, jnp.int32), jnp.ones(b, jnp.float32))

    def prefill_buckets(self) -> list[int]:
        """The padded prompt lengths prefill compiles for."""
        sizes, n = [], 1
        while not sizes or sizes[-1] < self.cfg.context_length:
            sizes.append(_bucket(n, cap=self.cfg.context_length))
            n = sizes[-1] + 1
        return sizes

    def warm_up(self) -> None:
        """Compile every shape a request can hit (each prefill bucket, insert, both decode steps) now."""
        for size in self.prefill_buckets():
            self._prefill_insert(Request([0] * size, 1, temperature=1.0, top_k=1), 0)
        for logprobs in (False, True):
            self.slots, token, info = _step(self.params, self.cfg, self.slots, dtype=self.dtype, logprobs=logprobs)
            jax.block_until_ready((token, info))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def submit(self, request: Request) -> None:
        self.waiting.put_nowait(request)
        self._wake.set()

    def active(self) -> int:
        return sum(r is not None for r in self.running)

    def idle(self) -> bool:
        return self.active() == 0 and self.waiting.empty()

    def _prefill_insert(self, r: Request, slot: int) -> tuple[int, tuple | None]:
        length = len(r.prompt)
        padded = np.zeros((1, _bucket(length, cap=self.cfg.context_length)), np.int32)
        padded[0, :length] = r.prompt
        key = jax.random.key(r.seed)
        settings = (np.float32(r.temperature), np.int32(r.top_k), np.float32(r.top_p))
        cache, token, info = _prefill(self.params, self.cfg, padded, np.int32(length), key, *settings,
                                      dtype=self.dtype)
        self.slots = _insert(self.slots, cache, np.int32(slot), token, np.int32(length), key, *settings)
        token, info = jax.device_get((token, info))
        return int(token[0]), (info[0] if r.logprobs is not None else None)

    def _emit(self, slot: int, token: int, info) -> None:
        """Hand a slot its new token; end the request on eos, its length, a stop string or a cancel."""
        r = self.running[slot]
        r.generated += 1
        if token == ENDOFTEXT_ID:
            reason = "stop"
        else:
            r.on_token(token, None if info is None else _split_logprobs(info, r.logprobs))
            reason = ("stop" if r.should_stop() else "length" if r.generated >= r.max_tokens
                      else "cancelled" if r.cancelled.is_set() else None)
        if reason is not None:
            self.running[slot] = None
            r.on_finish(reason)

    def _admit(self) -> None:
        """Prefill and insert waiting requests into the free slots."""
        for slot in range(self.max_batch):
            if self.running[slot] is not None:
                continue
            try:
                r = self.waiting.get_nowait()
            except queue.Empty:
                return
            if r.cancelled.is_set():
                r.on_finish("cancelled")
                continue
            self.running[slot] = r
            try:
                token, info = self._prefill_insert(r, slot)
            except Exception as e:  # a failed request must not take the engine down
                self.running[slot] = None
                r.on_finish(f"error: {e}")
                continue
            self._emit(slot, token, info)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for slot, r in enumerate(self.running):
                if r is not None and r.cancelled.is_set():
                    self.running[slot] = None
                    r.on_finish("cancelled")
            self._admit()
            if self.active() == 0:
                if self.on_step:
                    self.on_step(0, self.waiting.qsize())
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            want = any(r is not None and r.logprobs is not None for r in self.running)
            self.slots, tokens, info = _step(self.params, self.cfg, self.slots, dtype=self.dtype, logprobs=want)
            tokens, info = jax.device_get((tokens, info))
            for slot, r in enumerate(self.running):
                if r is not None:
                    self._emit(slot, int(tokens[slot]), None if r.logprobs is None else info[slot])
            if self.on_step:
                self.on_step(self.active(), self.waiting.qsize())


def _split_logprobs(info: np.ndarray, n: int) -> tuple[float, list[tuple[int, float]]]:
    """(the chosen token's log-prob, the top ``n`` (id, log-prob) pairs) from a ``_logprob_info`` row."""
    top_lp, top_ids = info[1: 1 + MAX_LOGPROBS], info[1 + MAX_LOGPROBS:]
    return float(info[0]), [(int(top_ids[i]), float(top_lp[i])) for i in range(n)]
