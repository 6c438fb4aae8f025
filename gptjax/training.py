"""Pretraining as in chapter 5: the loss, AdamW, one jitted train step, and the book's training loop.

The train step is a pure function ``(params, opt_state, batch, key) -> (params, opt_state, metrics)``
built by :func:`make_train_step`; everything else (evaluation, samples, logging, checkpoints) happens
around it in :func:`train_model_simple`, which follows the book's function of the same name.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
from time import perf_counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from gptjax import platform
from gptjax.config import GPTConfig, Settings
from gptjax.flops import Throughput, device_peak_flops, flops_per_token
from gptjax.model import Params, apply

OptState = Any
Batch = tuple[Any, Any]
TrainStep = Callable[[Params, OptState, Batch, jax.Array], tuple[Params, OptState, dict[str, jax.Array]]]


# ---------------------------------------------------------------------------------------------
# Loss


@functools.partial(jax.jit, static_argnames=("cfg", "train", "dtype", "remat"))
def calc_loss_batch(
    params: Params,
    cfg: GPTConfig,
    input_batch: jax.Array,
    target_batch: jax.Array,
    *,
    train: bool = False,
    rng: jax.Array | None = None,
    dtype: Any = jnp.float32,
    remat: bool = False,
) -> jax.Array:
    """Mean cross-entropy over every token of the batch (the book's ``calc_loss_batch``).

    ``dtype`` and ``remat`` are :func:`gptjax.model.apply`'s compute options; the logits and the loss
    are float32 either way."""
    logits = apply(params, cfg, input_batch, train=train, rng=rng, dtype=dtype, remat=remat)
    return optax.softmax_cross_entropy_with_integer_labels(logits, target_batch).mean()


def calc_loss_loader(params: Params, cfg: GPTConfig, loader: Any, num_batches: int | None = None) -> float:
    """Average batch loss over the first ``num_batches`` batches (all by default); NaN for an empty loader."""
    num_batches = len(loader) if num_batches is None else min(num_batches, len(loader))
    if num_batches == 0:
        return float("nan")
    total = jnp.zeros((), jnp.float32)
    for i, (input_batch, target_batch) in enumerate(loader):
        if i >= num_batches:
            break
        total = total + calc_loss_batch(params, cfg, input_batch, target_batch)
    # One host transfer for the whole loader rather than one per batch.
    return float(total) / num_batches


def perplexity(loss: float | jax.Array) -> float | jax.Array:
    """exp(loss): the number of tokens the model is, in effect, choosing between."""
    if isinstance(loss, jax.Array):
        return jnp.exp(loss)
    with np.errstate(over="ignore"):
        return float(np.exp(np.float64(loss)))


# ---------------------------------------------------------------------------------------------
# Settings and optimizer

# TrainConfig.dtype names: parameters and optimizer state stay float32 in every case.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Training settings; the defaults are the book's chapter 5 experiment."""

    batch_size: int = 2
    stride: int | None = None  # None: the model's context_length (non-overlapping windows)
    train_ratio: float = 0.9
    epochs: int = 10
    max_steps: int | None = None  # stop early; the lr schedule still spans all epochs
    lr: float = 4e-4
    weight_decay: float = 0.1
    exclude_bias_norm_from_decay: bool = False  # torch.optim.AdamW decays every parameter
    warmup_steps: int = 0
    min_lr: float | None = None  # set: cosine decay to min_lr over the run
    grad_clip: float | None = None  # global-norm clipping threshold
    grad_accum: int = 1
    eval_freq: int = 5
    eval_iter: int = 5
    start_context: str = "Every effort moves you"  # "" disables the per-epoch sample
    seed: int = 123
    shuffle: bool = True
    dtype: str = "float32"  # matmul compute dtype of the train step: "float32" or "bfloat16" (mixed precision)
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, more compute)
    save_every: int = 0  # 0: no step-based saves (the end, save_minutes and a stop request still save)
    save_minutes: float = 10.0  # also save when this long has passed since the last save; 0: never by time
    keep: int = 3

    def __post_init__(self) -> None:
        positive = ("batch_size", "epochs", "grad_accum", "eval_freq", "eval_iter", "keep")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("stride", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "save_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.train_ratio < 1.0:
            raise ValueError(f"train_ratio must be between 0 and 1 (exclusive), got {self.train_ratio}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")



def lr_schedule(tcfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Constant lr (the book's chapter 5); optional linear warmup from 0 and cosine decay to min_lr (appendix D)."""
    after_warmup = optax.constant_schedule(tcfg.lr)
    if tcfg.min_lr is not None:
        decay_steps = max(1, total_steps - tcfg.warmup_steps)
        after_warmup = optax.cosine_decay_schedule(tcfg.lr, decay_steps, alpha=tcfg.min_lr / tcfg.lr)
    if tcfg.warmup_steps == 0:
        return after_warmup
    warmup = optax.linear_schedule(0.0, tcfg.lr, tcfg.warmup_steps)
    return optax.join_schedules([warmup, after_warmup], [tcfg.warmup_steps])


def decay_mask(params: Params) -> Params:
    """True for the matrices (weights and embeddings), False for biases and norm scales/shifts."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(tcfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with torch's defaults (betas 0.9/0.999, eps 1e-8), the schedule, and optional clipping.

    The learning rate is injected into the optimizer state so that each step reports the rate it used.
    """
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=lr_schedule(tcfg, total_steps),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=tcfg.weight_decay,
        mask=decay_mask if tcfg.exclude_bias_norm_from_decay else None,
    )
    if tcfg.grad_clip is None:
        return adamw
    return optax.chain(clip_by_global_norm(tcfg.grad_clip), adamw)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (same rule, same empty state) with the norm of :func:`global_norm`:
    optax's own norm costs 1.8 s of a 4.1 s GPT_CONFIG_124M step on XLA:CPU."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        clipped = jax.tree_util.tree_map(
            lambda g: jnp.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm), updates)
        return clipped, state

    return optax.GradientTransformation(optax.clip_by_global_norm(max_norm).init, update)


# ---------------------------------------------------------------------------------------------
# Train step


def make_train_step(
    cfg: GPTConfig,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    dtype: Any = jnp.float32,
    remat: bool = False,
    jit_kwargs: dict[str, Any] | None = None,
    mesh: Any = None,
) -> TrainStep:
    """The jitted step ``(params, opt_state, batch, key) -> (params, opt_state, metrics)``.

    ``batch`` is ``(inputs, targets)`` of shape [B, T], or [grad_accum, B, T] with accumulation: the
    micro-batches run one after another in a scan and their mean gradient makes one optimizer update.
    ``key`` is this step's dropout key. ``metrics`` holds the batch ``loss``, the gradient's global
    norm and the ``lr`` used. ``dtype`` (``jnp.bfloat16``: mixed precision) and ``remat`` are the
    model's compute options (:func:`gptjax.model.apply`). ``jit_kwargs`` (e.g. ``in_shardings``/
    ``out_shardings`` for a mesh) go to ``jax.jit`` on top of the donation of params and optimizer
    state, whose buffers the update reuses. ``mesh``, the mesh of those shardings, keeps the model's
    activations split over its batch axes (:func:`gptjax.sharding.split_over_batch`).
    """
    grad_fn = jax.value_and_grad(
        lambda p, x, y, k: calc_loss_batch(p, cfg, x, y, train=True, rng=k, dtype=dtype, remat=remat)
    )

    def train_step(params, opt_state, batch, key):
        if mesh is None:
            return step(params, opt_state, batch, key)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(params, opt_state, batch, key)

    def step(params, opt_state, batch, key):
        inputs, targets = batch
        if grad_accum == 1:
            loss, grads = grad_fn(params, inputs, targets, key)
        else:
            def micro_step(carry, xs):
                loss_sum, grad_sum = carry
                loss, grads = grad_fn(params, *xs)
                return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
            keys = jax.random.split(key, grad_accum)
            (loss_sum, grad_sum), _ = jax.lax.scan(micro_step, zeros, (inputs, targets, keys))
            # Equal-sized micro-batches: the mean of their means is the mean over all tokens.
            loss = loss_sum / grad_accum
            grads = jax.tree_util.tree_map(lambda g: g / grad_accum, grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # The rate injected by make_optimizer (the schedule's own state has that name too); None elsewhere.
        lr = optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=lambda _, v: isinstance(v, jax.Array))
        metrics = {
            "loss": loss,
            "grad_norm": global_norm(grads),
            "lr": jnp.asarray(jnp.nan if lr is None else lr, jnp.float32),
        }
        return params, opt_state, metrics

    return jax.jit(train_step, **{"donate_argnums": (0, 1), **(jit_kwargs or {})})


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together (``optax.tree.norm``), each leaf's sum of squares taken as
    :func:`gptjax.platform.sum_of_squares` takes it (a matrix-vector product on CPU)."""
    return jnp.sqrt(sum(platform.sum_of_squares(x) for x in jax.tree_util.tree_leaves(tree)))


def train_step_options(tcfg: TrainConfig) -> dict[str, Any]:
    """:func:`make_train_step`'s keywords from a TrainConfig."""
    return {"grad_accum": tcfg.grad_accum, "dtype": COMPUTE_DTYPES[tcfg.dtype], "remat": tcfg.remat}


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(initialisation key, training key) of a run: independent streams from one seed.

    Step ``s`` drops out with ``fold_in(training key, s)``, so a resumed run draws the same masks."""
    init_key, train_key = jax.random.split(jax.random.key(seed))
    return init_key, train_key


def init_opt_state(optimizer: optax.GradientTransformation, params: Params) -> OptState:
    """The optimizer state, built under jit so its leaves have the types the train step returns
    (a fresh state with Python-scalar leaves would make the second step compile again)."""
    return jax.jit(optimizer.init)(params)


# ---------------------------------------------------------------------------------------------
# The book's loop


@dataclass(frozen=True)
class Position:
    """Where a run is: optimizer steps done, and the next batch to read (epoch, index within it)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens_seen: int = 0


@dataclass
class History:
    """What the book's ``train_model_simple`` returns, plus each step's training-batch loss."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    track_tokens_seen: list[int] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)


@dataclass
class TrainResult:
    params: Params
    opt_state: OptState
    position: Position
    history: History
    speed: dict[str, float | None] = field(default_factory=dict)  # the run's average tokens_per_sec and mfu


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


class TrainHooks:
    """Receives a run's events; the default ignores them. :mod:`gptjax.runs` writes them to the run directory."""

    def on_step(self, record: dict) -> None:
        """One optimizer step: step, epoch, loss, tokens_seen, lr, grad_norm, tokens_per_sec and mfu (None
        where the devices' peak is unknown)."""

    def on_eval(self, record: dict) -> None:
        """One evaluation: step, epoch, tokens_seen, train_loss, val_loss."""

    def on_sample(self, epoch: int, step: int, text: str) -> None:
        """The greedy sample printed after each epoch."""

    def benchmark_due(self, step: int) -> bool:
        """Asked after each step: score the parameters after it on a benchmark (:meth:`on_benchmark`)?"""
        return False

    def on_benchmark(self, params: Params, record: dict) -> None:
        """Score ``params``, those after step ``record["step"]`` (the record also has its epoch and
        tokens_seen), on a benchmark such as HellaSwag, and log the result."""

    def on_checkpoint(self, position: Position, params: Params, opt_state: OptState) -> None:
        """Save now (every ``save_every`` steps, when :meth:`save_due`, when stopping, and at the end); the
        loss up to here is finite."""

    def save_due(self, position: Position) -> bool:
        """Asked after each step (on the host, without waiting for the device): save here too?"""
        return False

    def stop_requested(self) -> bool:
        """Asked after each step: stop here (after saving), as when the process got SIGINT or SIGTERM?"""
        return False


def evaluate_model(
    params: Params, cfg: GPTConfig, train_loader: Any, val_loader: Any, eval_iter: int
) -> tuple[float, float]:
    """Train and validation loss over the first ``eval_iter`` batches of each loader."""
    train_loss = calc_loss_loader(params, cfg, train_loader, num_batches=eval_iter)
    val_loss = calc_loss_loader(params, cfg, val_loader, num_batches=eval_iter)
    return train_loss, val_loss


def generate_and_print_sample(
    params: Params, cfg: GPTConfig, tokenizer: Any, start_context: str, max_new_tokens: int = 50
) -> str:
    """Greedy continuation of ``start_context``, printed on one line (as the book does) and returned."""
    from gptjax.sampling import generate
    from gptjax.tokenizer import text_to_token_ids, token_ids_to_text

    encoded = text_to_token_ids(start_context, tokenizer)
    token_ids = generate(params, cfg, encoded, max_new_tokens)
    decoded = token_ids_to_text(np.asarray(token_ids), tokenizer).replace("\n", " ")
    if jax.process_index() == 0:  # one copy of the output in a multi-host run
        tqdm.write(decoded)
    return decoded


def _on_device(tree: Any) -> Any:
    """Host (numpy) leaves moved to the default device; jax arrays, sharded ones included, stay where they are
    (a multi-host array cannot be moved to one device)."""
    return jax.tree_util.tree_map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), tree)


def steps_per_epoch(train_loader: Any, grad_accum: int = 1) -> int:
    """Optimizer steps in one epoch: a last group of fewer than ``grad_accum`` batches is dropped."""
    return len(train_loader) // grad_accum


def step_batches(loader: Any, epoch: int, start: int, grad_accum: int = 1) -> Iterator[Batch]:
    """Epoch ``epoch``'s batches from batch index ``start`` on, grouped into optimizer steps ([B, T] each,
    or [grad_accum, B, T]); a last group of fewer than ``grad_accum`` batches is dropped.

    A loader with its own ``step_batches`` builds them itself: :class:`gptjax.sharding.ShardedLoader`
    reads each process's rows of a step straight into global arrays."""
    if hasattr(loader, "step_batches"):
        return loader.step_batches(epoch, start, grad_accum)
    return _grouped(loader.batches(epoch, start=start), grad_accum)


def prefetch_to_device(batches: Iterable[Batch], size: int = 2) -> Iterator[Batch]:
    """``batches`` moved to the device ``size`` batches ahead of the consumer: the copies (asynchronous in
    JAX) overlap the steps already dispatched instead of delaying the next one. Arrays already on a
    device, such as a sharded loader's global batches, pass through as they are."""
    queue: collections.deque[Batch] = collections.deque()
    for batch in batches:
        queue.append(_on_device(batch))
        if len(queue) > size:
            yield queue.popleft()
    yield from queue


def _grouped(batches: Iterable[Batch], grad_accum: int) -> Iterator[Batch]:
    if grad_accum == 1:
        yield from batches
        return
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == grad_accum:
            yield np.stack([b[0] for b in group]), np.stack([b[1] for b in group])
            group = []


def train_model_simple(
    params: Params,
    cfg: GPTConfig,
    train_loader: Any,
    val_loader: Any,
    tcfg: TrainConfig,
    *,
    tokenizer: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    opt_state: OptState | None = None,
    train_step: TrainStep | None = None,
    start: Position = Position(),
    key: jax.Array | None = None,
    hooks: TrainHooks | None = None,
    progress: bool = True,
    peak_tflops: float | None = None,
) -> TrainResult:
    """The book's training loop over ``tcfg.epochs`` epochs (or until ``tcfg.max_steps`` steps are done).

    Evaluates every ``eval_freq`` steps, prints a greedy sample after each epoch, and reports each
    step's metrics one step late so the host never waits for the step it has just dispatched.
    ``start`` (with the matching ``params``, ``opt_state`` and ``key``) continues a saved run exactly:
    the data order depends only on (seed, epoch), and step ``s`` uses dropout key ``fold_in(key, s)``.
    Raises :class:`NonFiniteLossError` as soon as a loss is NaN or infinite, before any further save.
    When ``hooks.stop_requested()`` turns true, the step under way finishes, is saved, and the loop returns.
    ``params`` and ``opt_state`` are donated to the jitted step (their buffers are reused): keep
    working with the returned ones.

    On a mesh (:mod:`gptjax.sharding`), pass sharded ``params`` and ``opt_state``, a ``train_step`` built
    with the mesh's shardings and :class:`~gptjax.sharding.ShardedLoader` loaders; the loop is the same.

    Each step's tokens/s and MFU (:mod:`gptjax.flops`) go to the progress bar and the step records; the
    result's ``speed`` is the run's average. ``peak_tflops`` is one device's peak for MFU (default: the
    datasheet figure of known GPUs and TPUs for ``tcfg.dtype``; none on CPU).
    """
    n_steps, last_step = _step_counts(train_loader, tcfg)
    optimizer = optimizer or make_optimizer(tcfg, tcfg.epochs * n_steps)
    # On device from the start: host (numpy) inputs would make the second step compile again.
    params = _on_device(params)
    opt_state = init_opt_state(optimizer, params) if opt_state is None else _on_device(opt_state)
    train_step = train_step or make_train_step(cfg, optimizer, **train_step_options(tcfg))
    key = run_keys(tcfg.seed)[1] if key is None else key
    hooks = hooks or TrainHooks()
    tokenizer = tokenizer or _sample_tokenizer(tcfg)
    history, pos, stop = History(), start, False  # stop: hooks.stop_requested(), save and return early
    main_process = jax.process_index() == 0  # in a multi-host run, only process 0 prints
    bar = tqdm(total=last_step, initial=min(pos.step, last_step), unit="step",
               disable=not (progress and main_process), dynamic_ncols=True)
    peak = device_peak_flops(jax.tree_util.tree_leaves(params)[0].sharding.device_set, tcfg.dtype, peak_tflops)
    steps = _StepReports(cfg, peak, history, hooks, bar)
    try:
        while pos.step < last_step and pos.epoch < tcfg.epochs:
            epoch = pos.epoch
            # No further than the last step: prefetching must not read batches the run will not use.
            batches = itertools.islice(step_batches(train_loader, epoch, pos.batch, tcfg.grad_accum),
                                       last_step - pos.step)
            for batch in prefetch_to_device(batches):
                step = pos.step
                params, opt_state, metrics = train_step(params, opt_state, batch, jax.random.fold_in(key, step))
                tokens_seen = pos.tokens_seen + int(batch[0].size)  # the global batch, on many hosts too
                where = {"step": step, "epoch": epoch + 1, "tokens_seen": tokens_seen}
                steps.dispatched(where, metrics, batch[0].shape)
                pos = Position(step + 1, epoch, pos.batch + tcfg.grad_accum, tokens_seen)
                bar.update(1)

                if step % tcfg.eval_freq == 0:
                    steps.report()
                    _evaluate(params, cfg, train_loader, val_loader, tcfg.eval_iter, where, history, hooks)
                if hooks.benchmark_due(step):
                    steps.report()  # so that the benchmark's time does not count as the step's
                    hooks.on_benchmark(params, where)
                if pos.batch >= n_steps * tcfg.grad_accum:  # the epoch is complete
                    if tcfg.start_context:
                        steps.report()
                        hooks.on_sample(epoch + 1, step,
                                        generate_and_print_sample(params, cfg, tokenizer, tcfg.start_context))
                    pos = Position(pos.step, epoch + 1, 0, pos.tokens_seen)

                stop = hooks.stop_requested()
                if (pos.step == last_step or (tcfg.save_every and pos.step % tcfg.save_every == 0) or stop
                        or hooks.save_due(pos)):
                    steps.report()
                    hooks.on_checkpoint(pos, params, opt_state)
                if pos.step >= last_step or pos.epoch != epoch or stop:
                    break
            else:  # the loader ran out before the epoch's last step: a loader shorter than it claims
                pos = Position(pos.step, epoch + 1, 0, pos.tokens_seen)
            if stop:
                break
        steps.report()
    finally:
        bar.close()
    return TrainResult(params, opt_state, pos, history, steps.average())


def _step_counts(train_loader: Any, tcfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, the step the run ends at: all epochs, or ``tcfg.max_steps``)."""
    n_steps = steps_per_epoch(train_loader, tcfg.grad_accum)
    if n_steps == 0:
        raise ValueError(
            f"the training loader has {len(train_loader)} batches, fewer than one optimizer step "
            f"(grad_accum={tcfg.grad_accum}); use more data, a smaller batch size or less accumulation"
        )
    total_steps = tcfg.epochs * n_steps
    return n_steps, total_steps if tcfg.max_steps is None else min(total_steps, tcfg.max_steps)


def _sample_tokenizer(tcfg: TrainConfig) -> Any:
    """GPT-2's tokenizer when the run prints samples after each epoch (``tcfg.start_context``), else None."""
    if not tcfg.start_context:
        return None
    from gptjax.tokenizer import get_tokenizer

    return get_tokenizer()


def _evaluate(params: Params, cfg: GPTConfig, train_loader: Any, val_loader: Any, eval_iter: int, where: dict,
              history: History, hooks: TrainHooks) -> None:
    """The book's periodic evaluation: both losses into the history, printed, and to the hooks."""
    train_loss, val_loss = evaluate_model(params, cfg, train_loader, val_loader, eval_iter)
    history.train_losses.append(train_loss)
    history.val_losses.append(val_loss)
    history.track_tokens_seen.append(where["tokens_seen"])
    history.eval_steps.append(where["step"])
    if jax.process_index() == 0:
        tqdm.write(f"Ep {where['epoch']} (Step {where['step']:06d}): Train loss {train_loss:.3f}, "
                   f"Val loss {val_loss:.3f}")
    hooks.on_eval({**where, "train_loss": train_loss, "val_loss": val_loss})


class _StepReports:
    """Each step's metrics, read one step late so that the host never waits for the step it has just
    dispatched: checked to be finite, timed, and handed to the history, the hooks and the progress bar."""

    def __init__(self, cfg: GPTConfig, peak: float | None, history: History, hooks: TrainHooks, bar: tqdm):
        self.cfg, self.peak, self.history, self.hooks, self.bar = cfg, peak, history, hooks, bar
        self.pending: list[tuple[dict, dict, int, float]] = []  # dispatched steps whose metrics are not read yet
        self.speed: Throughput | None = None  # made at the first batch, whose length the attention FLOPs depend on
        self.last_read = -math.inf  # when the latest metrics arrived, i.e. (nearly) when their step ended

    def dispatched(self, where: dict, metrics: dict, batch_shape: tuple[int, ...]) -> None:
        """A step over a batch of ``batch_shape`` tokens was just dispatched: report the one before it (finished
        by now, or nearly) and keep this one."""
        now = perf_counter()
        if self.speed is None:
            self.speed = Throughput(flops_per_token(self.cfg, batch_shape[-1]), self.peak)
        self.report()
        self.pending.append((where, metrics, math.prod(batch_shape), now))

    def report(self) -> None:
        for where, metrics, tokens, dispatched in self.pending:
            # float32 values as their shortest decimal form: exact, and readable in metrics.jsonl.
            metrics = {k: float(str(np.float32(v))) for k, v in jax.device_get(metrics).items()}
            # Timed by the reads the loop makes anyway: a step runs from the end of the one before it (or from
            # its dispatch, after an evaluation, sample or save) until its metrics can be read.
            now = perf_counter()
            step_speed = self.speed.step(tokens, now - max(self.last_read, dispatched))
            self.last_read = now
            loss, grad_norm = metrics["loss"], metrics["grad_norm"]
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise NonFiniteLossError(
                    f"the loss is {loss} (gradient norm {grad_norm}) at step {where['step']}, epoch "
                    f"{where['epoch']}: training diverged, so it stopped without saving; the last good "
                    "checkpoint is kept. Try a lower lr, grad_clip 1.0 or more warmup_steps"
                )
            self.history.step_losses.append(loss)
            self.hooks.on_step({**where, "loss": loss, "lr": metrics["lr"], "grad_norm": grad_norm,
                                **_rounded(step_speed)})
            self.bar.set_postfix({"loss": f"{loss:.3f}", **_speed_postfix(step_speed, self.speed.average())},
                                 refresh=False)
        self.pending.clear()

    def average(self) -> dict[str, float | None]:
        """The run's average tokens/s and MFU ({} if no step ran)."""
        return {} if self.speed is None else _rounded(self.speed.average())


def _rounded(speed: dict[str, float | None]) -> dict[str, float | None]:
    """Tokens/s to 0.1 and MFU to 4 significant digits: what a timing on a busy host supports."""
    rate, mfu = speed["tokens_per_sec"], speed["mfu"]
    return {"tokens_per_sec": None if rate is None else round(rate, 1),
            "mfu": None if mfu is None else float(f"{mfu:.4g}")}


def _speed_postfix(step: dict[str, float | None], run: dict[str, float | None]) -> dict[str, str]:
    """The progress bar's speed: this step's tokens/s, the run's average, and MFU where it is known."""
    if step["tokens_per_sec"] is None:
        return {}
    postfix = {"tok/s": f"{step['tokens_per_sec']:,.0f}", "avg": f"{run['tokens_per_sec']:,.0f}"}
    if step["mfu"] is not None:
        postfix["mfu"] = f"{100 * step['mfu']:.1f}%"
    return postfix
