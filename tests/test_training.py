"""Loss, optimizer, train step and the book's loop: learning, exactness against torch, one compile."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import gptjax
from gptjax import GPTConfig
from gptjax.data import DataLoader, GPTDataset
from gptjax.training import (
    NonFiniteLossError,
    Position,
    TrainConfig,
    TrainHooks,
    calc_loss_batch,
    calc_loss_loader,
    clip_by_global_norm,
    decay_mask,
    global_norm,
    init_opt_state,
    lr_schedule,
    make_optimizer,
    make_train_step,
    perplexity,
    prefetch_to_device,
    train_model_simple,
)
from tests.torch_reference import GPTModel as TorchGPTModel

CFG = GPTConfig(vocab_size=257, context_length=32, emb_dim=48, n_layers=2, n_heads=4, drop_rate=0.0)
TEXT = b"Every effort moves you forward, one small step at a time. " * 24  # 1,416 bytes


def byte_ids(data: bytes = TEXT) -> np.ndarray:
    return np.frombuffer(data, np.uint8).astype(np.int32)  # bytes are tokens of a 257-token vocabulary


def loaders(batch_size=2, shuffle=False, seed=0):
    ids = byte_ids()
    split = int(0.9 * len(ids))
    train = DataLoader(GPTDataset(ids[:split], CFG.context_length, CFG.context_length), batch_size,
                       shuffle=shuffle, drop_last=True, seed=seed)
    val = DataLoader(GPTDataset(ids[split:], CFG.context_length, CFG.context_length), batch_size,
                     shuffle=False, drop_last=False, seed=seed)
    return train, val


@pytest.fixture(scope="module")
def params():
    return gptjax.init_params(CFG, seed=0)


def fresh(tree):
    """A host copy: the train step donates (consumes) the parameter buffers it is given."""
    return jax.tree_util.tree_map(np.array, tree)


def quiet(**kw):
    return TrainConfig(**{"start_context": "", "eval_freq": 1000, **kw})


# --- loss ------------------------------------------------------------------------------------------


def test_calc_loss_batch_is_mean_token_cross_entropy(params):
    rng = np.random.default_rng(0)
    x = rng.integers(0, CFG.vocab_size, (2, 8), dtype=np.int32)
    y = rng.integers(0, CFG.vocab_size, (2, 8), dtype=np.int32)
    logits = np.asarray(gptjax.apply(params, CFG, x), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    want = -np.take_along_axis(logp, y[..., None], -1).mean()
    assert float(calc_loss_batch(params, CFG, x, y)) == pytest.approx(want, abs=1e-5)


def test_calc_loss_loader_averages_batches_and_is_nan_when_empty(params):
    train, _ = loaders()
    batches = list(itertools.islice(iter(train), 3))
    per_batch = [float(calc_loss_batch(params, CFG, x, y)) for x, y in batches]
    assert calc_loss_loader(params, CFG, train, num_batches=3) == pytest.approx(np.mean(per_batch), rel=1e-6)
    assert calc_loss_loader(params, CFG, train, num_batches=10_000) == pytest.approx(
        np.mean([float(calc_loss_batch(params, CFG, x, y)) for x, y in train]), rel=1e-6)
    empty = DataLoader(GPTDataset(byte_ids()[:40], 32, 32), batch_size=4, shuffle=False, drop_last=True, seed=0)
    assert len(empty) == 0 and math.isnan(calc_loss_loader(params, CFG, empty))


def test_perplexity():
    assert perplexity(math.log(50257)) == pytest.approx(50257)
    assert float(perplexity(jax.numpy.float32(2.0))) == pytest.approx(math.e**2, rel=1e-6)


# --- optimizer -------------------------------------------------------------------------------------


def test_lr_schedules():
    const = lr_schedule(TrainConfig(), 100)
    assert float(const(0)) == float(const(99)) == pytest.approx(4e-4)
    sched = lr_schedule(TrainConfig(lr=1e-3, warmup_steps=10, min_lr=1e-4), 110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)  # half-way down the cosine
    assert float(sched(110)) == pytest.approx(1e-4)


def test_weight_decay_on_everything_or_only_matrices(params):
    nonzero = jax.tree_util.tree_map(lambda x: x + 0.5, params)  # LayerNorm shifts start at zero
    zero = jax.tree_util.tree_map(np.zeros_like, params)

    def decayed(tcfg):  # one update with zero gradients: only weight decay moves the parameters
        opt = make_optimizer(tcfg, 10)
        updates, _ = opt.update(zero, opt.init(nonzero), nonzero)
        return {jax.tree_util.keystr(k): bool(np.any(np.asarray(u) != 0))
                for k, u in jax.tree_util.tree_leaves_with_path(updates)}

    every = decayed(TrainConfig())
    assert all(every.values())
    masked = decayed(TrainConfig(exclude_bias_norm_from_decay=True))
    assert masked["['trf_blocks'][0]['att']['W_query']['kernel']"] and masked["['tok_emb']['embedding']"]
    assert not masked["['trf_blocks'][0]['norm1']['scale']"] and not masked["['trf_blocks'][0]['ff']['layers'][0]['bias']"]
    assert sum(jax.tree_util.tree_leaves(decay_mask(params))) == sum(masked.values())


def test_grad_clip_acts_before_adam(params):
    """Clipping to a norm far below Adam's eps shrinks the (otherwise scale-free) first Adam update."""
    x = np.tile(byte_ids()[:33], (2, 1))
    batch = (x[:, :-1], x[:, 1:])
    moved = {}
    for clip in (None, 1e-12):
        opt = make_optimizer(TrainConfig(grad_clip=clip, weight_decay=0.0), 10)
        p = fresh(params)
        new, _, m = make_train_step(CFG, opt)(p, init_opt_state(opt, p), batch, jax.random.key(0))
        moved[clip] = float(optax.tree.norm(jax.tree_util.tree_map(lambda a, b: a - b, new, params)))
        assert float(m["grad_norm"]) > 1e-2  # metrics report the gradient before clipping
    assert moved[1e-12] < 1e-3 * moved[None]


# --- train step ------------------------------------------------------------------------------------


def test_grad_accumulation_matches_one_big_batch(params):
    """Two micro-batches of 2 give the gradient of one batch of 4 (no dropout: the keys do not matter).

    Plain SGD makes the update the gradient itself, so the comparison is not blurred by Adam's
    sign-like first step on near-zero gradients."""
    ids = byte_ids()
    x = np.stack([ids[i * 32:i * 32 + 32] for i in range(4)])
    y = np.stack([ids[i * 32 + 1:i * 32 + 33] for i in range(4)])
    opt = optax.sgd(1.0)
    key = jax.random.key(0)
    big, _, m_big = make_train_step(CFG, opt)(fresh(params), init_opt_state(opt, params), (x, y), key)
    acc, _, m_acc = make_train_step(CFG, opt, grad_accum=2)(
        fresh(params), init_opt_state(opt, params), (x.reshape(2, 2, 32), y.reshape(2, 2, 32)), key)
    assert float(m_acc["loss"]) == pytest.approx(float(m_big["loss"]), abs=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(acc), jax.tree_util.tree_leaves(big)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_train_step_compute_options(params):
    """bf16 mixed precision updates float32 parameters by nearly the float32 update; remat computes the same step."""
    x = np.tile(byte_ids()[:33], (2, 1))
    batch = (x[:, :-1], x[:, 1:])
    opt = optax.sgd(1.0)  # the update is the gradient: differences are not hidden by Adam's normalisation
    key = jax.random.key(0)
    run = lambda **kw: make_train_step(CFG, opt, **kw)(fresh(params), init_opt_state(opt, params), batch, key)  # noqa: E731
    plain, _, m_plain = run()
    bf16, _, m_bf16 = run(dtype=jnp.bfloat16)
    remat, _, m_remat = run(remat=True)
    assert {a.dtype for a in jax.tree_util.tree_leaves(bf16)} == {jnp.dtype(jnp.float32)}
    assert 0 < abs(float(m_bf16["loss"]) - float(m_plain["loss"])) <= 1e-2 * float(m_plain["loss"])
    delta = lambda new: jax.tree_util.tree_map(lambda a, b: a - b, new, params)  # noqa: E731
    err = optax.tree.norm(jax.tree_util.tree_map(lambda a, b: a - b, delta(bf16), delta(plain)))
    assert 0 < float(err) <= 5e-2 * float(optax.tree.norm(delta(plain)))
    assert float(m_remat["loss"]) == pytest.approx(float(m_plain["loss"]), abs=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(remat), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_global_norm_equals_optax_norm(params):
    tree = jax.tree_util.tree_map(lambda p: p * 3.0 + 0.5, params)  # matrices, vectors, the [in, vocab] head
    assert float(global_norm(tree)) == pytest.approx(float(optax.tree.norm(tree)), rel=1e-6)
    assert float(global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])})) == 5.0


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])  # clipping, and not
def test_clip_by_global_norm_equals_optax(params, max_norm):
    grads = jax.tree_util.tree_map(lambda p: p * 0.01, params)
    ours, ours_state = clip_by_global_norm(max_norm).update(grads, clip_by_global_norm(max_norm).init(params))
    want, want_state = optax.clip_by_global_norm(max_norm).update(grads, optax.clip_by_global_norm(max_norm).init(params))
    assert jax.tree_util.tree_structure(ours_state) == jax.tree_util.tree_structure(want_state)  # checkpoints unchanged
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


def test_train_config_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        TrainConfig(dtype="float16")


def test_prefetch_to_device_keeps_order_and_runs_ahead():
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield np.full((2, 3), i), np.full((2, 3), -i)

    it = prefetch_to_device(source(), size=2)
    x, y = next(it)
    assert isinstance(x, jax.Array) and int(x[0, 0]) == 0 and int(y[0, 0]) == 0
    assert pulled == [0, 1, 2]  # two batches already on their way to the device
    assert [int(x[0, 0]) for x, _ in it] == [1, 2, 3, 4]


def test_dropout_key_changes_the_step(params):
    cfg = CFG.replace(drop_rate=0.5)
    x = np.tile(byte_ids()[:33], (2, 1))
    opt = make_optimizer(TrainConfig(), 100)
    step = make_train_step(cfg, opt)
    losses = [float(step(fresh(params), init_opt_state(opt, params),
                         (x[:, :-1], x[:, 1:]), jax.random.key(k))[2]["loss"]) for k in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]


# --- the loop --------------------------------------------------------------------------------------


class Recorder(TrainHooks):
    def __init__(self):
        self.steps, self.evals, self.samples, self.saves = [], [], [], []

    def on_step(self, record):
        self.steps.append(record)

    def on_eval(self, record):
        self.evals.append(record)

    def on_sample(self, epoch, step, text):
        self.samples.append((epoch, step, text))

    def on_checkpoint(self, position, params, opt_state):
        self.saves.append(position)


@pytest.fixture(scope="module")
def learned(params):
    """A short run on the repeated sentence, shared by the tests below (one compile)."""
    train, val = loaders(batch_size=2, shuffle=True)
    tcfg = TrainConfig(batch_size=2, epochs=8, lr=3e-3, eval_freq=5, eval_iter=2, start_context="", save_every=8)
    opt = make_optimizer(tcfg, tcfg.epochs * len(train))
    step = make_train_step(CFG, opt)
    hooks = Recorder()
    result = train_model_simple(fresh(params), CFG, train, val, tcfg, optimizer=opt, train_step=step, hooks=hooks,
                                progress=False)
    return train, tcfg, step, hooks, result


def test_tiny_model_learns_repeated_text(learned):
    train, tcfg, _, hooks, result = learned
    losses = result.history.step_losses
    assert len(losses) == tcfg.epochs * len(train) == result.position.step
    assert losses[0] > 0.9 * math.log(CFG.vocab_size)  # ln(257) = 5.55: an untrained model guesses
    assert result.history.train_losses[-1] < 1.0
    assert result.history.val_losses[-1] < 1.0


def test_loop_records_the_books_histories(learned):
    train, tcfg, _, hooks, result = learned
    n = len(train)
    h = result.history
    assert [r["step"] for r in hooks.steps] == list(range(tcfg.epochs * n))
    assert h.eval_steps == list(range(0, tcfg.epochs * n, tcfg.eval_freq))
    assert h.track_tokens_seen == [(s + 1) * 2 * 32 for s in h.eval_steps]
    assert [r["epoch"] for r in hooks.steps] == [s // n + 1 for s in range(tcfg.epochs * n)]
    assert [r["loss"] for r in hooks.steps] == h.step_losses
    assert all(r["lr"] == pytest.approx(3e-3) for r in hooks.steps)
    saved = [p.step for p in hooks.saves]
    assert saved == list(range(8, tcfg.epochs * n + 1, 8)) + ([] if (tcfg.epochs * n) % 8 == 0 else [tcfg.epochs * n])
    assert result.position == Position(tcfg.epochs * n, tcfg.epochs, 0, tcfg.epochs * n * 64)


def test_one_compilation_per_run(learned):
    """Eight epochs with evaluations, samples and saves in between: the step compiled once."""
    _, _, step, _, _ = learned
    assert step._cache_size() == 1


def test_grad_accum_loop_compiles_once_and_counts_steps(params):
    train, val = loaders(batch_size=2, shuffle=True)
    tcfg = quiet(epochs=2, grad_accum=3, warmup_steps=2, min_lr=1e-5, grad_clip=1.0)
    opt = make_optimizer(tcfg, 100)
    step = make_train_step(CFG, opt, grad_accum=3)
    result = train_model_simple(fresh(params), CFG, train, val, tcfg, optimizer=opt, train_step=step, progress=False)
    per_epoch = len(train) // 3
    assert result.position == Position(2 * per_epoch, 2, 0, 2 * per_epoch * 3 * 64)
    assert len(result.history.step_losses) == 2 * per_epoch
    assert step._cache_size() == 1


def test_resume_from_a_position_is_exact(params):
    """Stopping after k steps and continuing from (params, opt_state, position) reproduces the run bitwise."""
    train, val = loaders(batch_size=2, shuffle=True, seed=3)
    cfg = CFG.replace(drop_rate=0.1)
    tcfg = quiet(epochs=2, seed=3)
    full = train_model_simple(fresh(params), cfg, train, val, tcfg, progress=False)
    k = len(train) + 2  # inside the second epoch
    first = train_model_simple(fresh(params), cfg, train, val, tcfg.replace(max_steps=k), progress=False)
    assert first.position == Position(k, 1, 2, k * 64)
    rest = train_model_simple(first.params, cfg, train, val, tcfg, opt_state=first.opt_state,
                              start=first.position, progress=False)
    assert first.history.step_losses + rest.history.step_losses == full.history.step_losses
    for a, b in zip(jax.tree_util.tree_leaves(rest.params), jax.tree_util.tree_leaves(full.params)):
        np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_before_saving(params):
    train, val = loaders()
    tcfg = quiet(epochs=2, save_every=2)
    opt = make_optimizer(tcfg, 100)
    real = make_train_step(CFG, opt)
    calls = []

    def poisoned(p, s, batch, key):  # from the fourth step on, the parameters are NaN
        calls.append(1)
        if len(calls) == 4:
            p = jax.tree_util.tree_map(lambda a: a * np.nan, p)
        return real(p, s, batch, key)

    hooks = Recorder()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan .* at step 3, epoch 1.*last good checkpoint"):
        train_model_simple(fresh(params), CFG, train, val, tcfg, optimizer=opt,
                           train_step=poisoned, hooks=hooks, progress=False)
    assert [p.step for p in hooks.saves] == [2]
    assert [r["step"] for r in hooks.steps] == [0, 1, 2]


def test_samples_after_each_epoch_are_greedy_and_printed(params, capsys):
    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.0)
    p = gptjax.init_params(cfg, seed=1)
    ids = np.asarray(gptjax.text_to_token_ids(TEXT.decode() * 2))[0]
    train = DataLoader(GPTDataset(ids[:300], 16, 16), 4, shuffle=False, drop_last=True, seed=0)
    val = DataLoader(GPTDataset(ids[300:], 16, 16), 4, shuffle=False, drop_last=False, seed=0)
    hooks = Recorder()
    tcfg = TrainConfig(epochs=2, batch_size=4, eval_freq=3, start_context="Every effort")
    result = train_model_simple(p, cfg, train, val, tcfg, hooks=hooks, progress=False)
    out = capsys.readouterr().out
    n = len(train)
    assert [(e, s) for e, s, _ in hooks.samples] == [(1, n - 1), (2, 2 * n - 1)]
    from gptjax.sampling import generate

    prompt = gptjax.text_to_token_ids("Every effort")
    want = gptjax.token_ids_to_text(np.asarray(generate(result.params, cfg, prompt, 50))).replace("\n", " ")
    assert hooks.samples[-1][2] == want and want.startswith("Every effort") and want in out
    assert "Ep 1 (Step 000000): Train loss " in out and f"Ep 2 (Step {3 * (n // 3 + 1):06d})" in out


# --- exactness against the book's torch loop ---------------------------------------------------------


def test_first_five_losses_match_torch_adamw():
    """Same weights, same batches, no dropout, no shuffling: the book's torch loop and ours agree."""
    torch.manual_seed(123)
    ref = TorchGPTModel(CFG.to_dict())
    # Cloned: the torch optimizer updates its tensors in place, and converted arrays may share their memory.
    params = gptjax.from_torch_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, CFG)
    train, val = loaders(batch_size=2, shuffle=False)
    batches = list(itertools.islice(train.batches(0), 5))
    assert len(batches) == 5

    optimizer = torch.optim.AdamW(ref.parameters(), lr=4e-4, weight_decay=0.1)
    ref.train()
    want = []
    for x, y in batches:
        optimizer.zero_grad()
        logits = ref(torch.as_tensor(x, dtype=torch.long))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(y, dtype=torch.long).flatten())
        loss.backward()
        optimizer.step()
        want.append(loss.item())

    result = train_model_simple(params, CFG, train, val, quiet(max_steps=5, shuffle=False), progress=False)
    got = result.history.step_losses
    assert len(got) == 5 and want[0] - want[-1] > 0.05  # the steps moved the model
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
