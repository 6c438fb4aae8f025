"""Run directories: a training run that writes its record to a folder and can be continued from it.

:func:`start_run` trains a new run into a folder (config.json, metrics.jsonl, samples.txt, loss.png, TensorBoard
event files through :mod:`gptjax.dashboard`, orbax checkpoints); :func:`resume_run` continues a stopped one step
for step, with the settings it recorded. ``python -m gptjax.train`` is these two behind flags. In a multi-process
run process 0 writes the logs and every process takes part in the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gptjax import hellaswag, sharding
from gptjax.atomic import atomic_file
from gptjax.checkpoint import CHECKPOINTS, checkpoint_manager, latest_step, restore_checkpoint, save_checkpoint
from gptjax.presets import ModelConfig, config_from_dict, config_to_dict, family_of
from gptjax.tokenizer import TOKENIZER_FILES, load_tokenizer
from gptjax.dashboard import Dashboards, check_wandb, new_wandb_id
from gptjax.data import DataLoader, DataSource, build_loaders
from gptjax.model import Params, abstract_params, init_params, param_count
from gptjax.plot import plot_run
from gptjax.training import (
    OptState,
    Position,
    TrainConfig,
    TrainHooks,
    make_optimizer,
    make_train_step,
    run_keys,
    steps_per_epoch,
    train_model_simple,
    train_step_options,
)

METRICS, SAMPLES, CONFIG = "metrics.jsonl", "samples.txt", "config.json"
TOKENIZER_DIR = "tokenizer"
HELLASWAG_EVERY = 250


@dataclass(frozen=True)
class Monitoring:
    """What a run reports and to where (config.json's "monitoring"); free to change when resuming.
    ``wandb``: a Weights & Biases project; ``hellaswag``: a hellaswag_val.jsonl scored every
    ``hellaswag_every`` steps."""

    tensorboard: bool = True
    wandb: str | None = None
    wandb_id: str | None = None  # made when the run starts, so that a resumed run logs into the same W&B run
    hellaswag: str | None = None
    hellaswag_every: int = HELLASWAG_EVERY

    def __post_init__(self) -> None:
        if self.hellaswag_every < 1:
            raise ValueError(f"hellaswag_every must be at least 1, got {self.hellaswag_every}")

    def checked(self) -> "Monitoring":
        """Ready to run (the HellaSwag path absolute, a W&B id made), or the reason it cannot; before slow work."""
        if self.hellaswag is not None and jax.process_count() > 1:
            raise ValueError("HellaSwag is scored on one process: leave hellaswag out of a multi-process run and "
                             "score its checkpoints afterwards")
        if self.wandb is not None:
            check_wandb()
        return dataclasses.replace(
            self, hellaswag=None if self.hellaswag is None else str(Path(self.hellaswag).absolute()),
            wandb_id=self.wandb_id or (new_wandb_id() if self.wandb is not None else None))


class Stopped(Exception):
    """The run stopped on SIGINT or SIGTERM after saving a checkpoint at ``step``; ``resume_run(run_dir)``
    continues it (with ``max_steps`` again, if it had one)."""

    def __init__(self, signum: int, step: int, run_dir: Path, max_steps: int | None):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}, with a checkpoint there")
        self.signum, self.step, self.run_dir, self.max_steps = signum, step, run_dir, max_steps


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM (how clusters and preemptible VMs stop jobs) only ask the
    training loop to stop after the step under way, and save; a second one aborts at once.

    Only in the main thread of a one-process run: in a multi-host run the processes would stop at different
    steps and wait for each other's checkpoint shards forever, so there the signals keep their usual effect
    (``save_every`` bounds the loss)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.active = threading.current_thread() is threading.main_thread() and jax.process_count() == 1
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if self.active:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint (again to abort "
              "at once, without saving)", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunSettings:
    """Everything config.json fixes about a run: the model, training, data and starting weights (``init_from``,
    None: initialised from the seed); ``monitoring`` may change when it resumes."""

    cfg: ModelConfig
    tcfg: TrainConfig
    data: DataSource
    init_from: str | None = None
    monitoring: Monitoring = Monitoring()
    tokenizer: str | None = None  # the folder of the model's tokenizer files; None: GPT-2's bundled one

    @classmethod
    def from_config(cls, config: dict) -> "RunSettings":
        """The settings a run directory's config.json records."""
        return cls(config_from_dict(config["model"]), TrainConfig.from_dict(config["train"]),
                   DataSource.from_dict(config["data"]), config["data"].get("init_from"),
                   Monitoring(**config.get("monitoring", {})), config["data"].get("tokenizer"))

    def encoding(self) -> Any:
        """The tokenizer of the run's text: its model's own, or None for GPT-2's bundled one (what the data,
        sample and HellaSwag functions take as their default)."""
        if self.tokenizer is None:
            if family_of(self.cfg) != "gpt2":
                raise ValueError(f"a {family_of(self.cfg)} model trains on its own tokenizer's tokens: give "
                                 "RunSettings.tokenizer, the folder of its tokenizer.json or tokenizer.model")
            return None
        encoding = load_tokenizer(self.tokenizer)
        if encoding.n_vocab > self.cfg.vocab_size:
            raise ValueError(f"the tokenizer in {self.tokenizer} has {encoding.n_vocab} tokens, more than the model's "
                             f"vocabulary of {self.cfg.vocab_size}; it is not this model's tokenizer")
        return encoding

    def loaders(self) -> tuple[DataLoader, DataLoader]:
        """The run's (training, validation) loaders, the batches its steps read."""
        tcfg = self.tcfg
        return build_loaders(self.data, context_length=self.cfg.context_length, batch_size=tcfg.batch_size,
                             stride=tcfg.stride, train_ratio=tcfg.train_ratio, shuffle=tcfg.shuffle, seed=tcfg.seed,
                             tokenizer=self.encoding())


def start_run(settings: RunSettings, *, out_dir: str | Path | None = None, params: Params | None = None,
              mesh: Mesh | None = None, progress: bool = True, peak_tflops: float | None = None) -> Path:
    """Train a new run into ``out_dir`` (new or empty; None: runs/<date>-<time>) from ``params`` (the weights
    ``settings.init_from`` names, loaded by the caller; None: initialised from the seed); returns the folder."""
    if out_dir is not None:
        check_out_dir(Path(out_dir))
    tcfg = settings.tcfg.replace(stride=settings.tcfg.stride or settings.cfg.context_length)
    settings = dataclasses.replace(settings, tcfg=tcfg, data=settings.data.absolute(),
                                   monitoring=settings.monitoring.checked())
    checked = _check(settings, mesh)
    run_dir = make_run_dir(out_dir)  # only once the data is known to be usable
    if settings.tokenizer is not None:  # the run keeps its own copy: generate, serve and resume read it
        settings = dataclasses.replace(settings, tokenizer=str(_copy_tokenizer(Path(settings.tokenizer), run_dir)))
    sharding.sync_processes("gptjax.runs: settings checked")  # before process 0 writes anything
    optimizer = make_optimizer(tcfg, tcfg.epochs * checked.n_steps)
    init_key, key = run_keys(tcfg.seed)
    state = (*_init_state(settings.cfg, optimizer, init_key, params, mesh), Position(), key)
    return _train(run_dir, settings, checked, optimizer, state, mesh, progress, peak_tflops)


def resume_run(run_dir: str | Path, *, max_steps: int | None = None, save_every: int | None = None,
               save_minutes: float | None = None, keep: int | None = None, monitoring: dict[str, Any] | None = None,
               mesh: Mesh | None = None, progress: bool = True, peak_tflops: float | None = None) -> Path:
    """Continue the run in ``run_dir`` from its latest checkpoint (from step 0 if it has none) with its recorded
    settings, to its end or ``max_steps``; the other arguments, None, keep what the run recorded (``monitoring``:
    the Monitoring fields to change). ``mesh`` may differ from the one that wrote the checkpoints."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    stored = RunSettings.from_config(config)
    changes = {k: v for k, v in dict(save_every=save_every, save_minutes=save_minutes, keep=keep).items()
               if v is not None}
    # A recorded max_steps was where the run was told to stop: resuming runs on to the end unless given again.
    tcfg = stored.tcfg.replace(max_steps=max_steps, **changes)
    settings = dataclasses.replace(stored, tcfg=tcfg,
                                   monitoring=dataclasses.replace(stored.monitoring, **(monitoring or {})).checked())
    checked = _check(settings, mesh)
    if checked.n_steps != config["steps_per_epoch"]:
        raise ValueError(f"the training data now gives {checked.n_steps} steps per epoch, not "
                         f"{config['steps_per_epoch']} as when {run_dir} started: its data changed, so the run "
                         "cannot resume exactly")
    sharding.sync_processes("gptjax.runs: settings checked")
    optimizer = make_optimizer(tcfg, tcfg.epochs * checked.n_steps)
    if latest_step(run_dir) is None:  # stopped before its first save: start it again as it started
        _log(f"{run_dir} has no checkpoint yet: starting it again from step 0 with its settings")
        init_key, key = run_keys(tcfg.seed)
        state = (*_init_state(settings.cfg, optimizer, init_key, _starting_weights(settings), mesh), Position(), key)
    else:
        # Into the shardings of the current mesh, whatever mesh wrote the checkpoint.
        state = restore_checkpoint(run_dir, *sharding.abstract_state(settings.cfg, optimizer, mesh))
        _log(f"resuming {run_dir} at step {state[2].step}")
    trim_logs(run_dir, state[2].step)
    return _train(run_dir, settings, checked, optimizer, state, mesh, progress, peak_tflops)


def _check(settings: RunSettings, mesh: Mesh | None) -> _Checked:
    """The run's loaders, steps per epoch and HellaSwag examples, every setting checked against the data, the
    devices and the HellaSwag file, before any slow work."""
    cfg, tcfg = settings.cfg, settings.tcfg
    if mesh is not None:
        sharding.check_batch_size(tcfg.batch_size, mesh)
    loaders = settings.loaders()
    n_steps = steps_per_epoch(loaders[0], tcfg.grad_accum)
    if n_steps == 0:
        raise ValueError(f"the training data gives {len(loaders[0])} batches, fewer than grad_accum "
                         f"{tcfg.grad_accum}; lower grad_accum or batch_size")
    examples, path = None, settings.monitoring.hellaswag
    if path is not None:
        examples = hellaswag.load_examples(path, settings.encoding())
        hellaswag.check_fits(examples, cfg, path)
    return _Checked(loaders, n_steps, examples)


class _Checked(NamedTuple):
    loaders: tuple[DataLoader, DataLoader]
    n_steps: int
    examples: list[hellaswag.Example] | None


def _train(run_dir: Path, settings: RunSettings, checked: _Checked, optimizer: optax.GradientTransformation,
           state: tuple[Params, OptState | None, Position, jax.Array],
           mesh: Mesh | None, progress: bool, peak_tflops: float | None) -> Path:
    """Record the run's settings and train it from ``state``, saving on the way and when stopped by a signal."""
    cfg, tcfg = settings.cfg, settings.tcfg
    params, opt_state, position, key = state
    start = time.time()
    (train_loader, val_loader), n_steps = checked.loaders, checked.n_steps
    train_step = None  # the loop's own single-device step
    if mesh is not None:
        jit_kwargs = sharding.train_step_jit_kwargs(mesh, cfg, optimizer, tcfg.grad_accum)
        train_step = make_train_step(cfg, optimizer, **train_step_options(tcfg), jit_kwargs=jit_kwargs, mesh=mesh)
        train_loader, val_loader = sharding.ShardedLoader(train_loader, mesh), sharding.ShardedLoader(val_loader, mesh)
    if sharding.is_main_process():
        write_config(run_dir, settings, n_steps, len(train_loader), len(val_loader))
    _log(f"model: {param_count(abstract_params(cfg)):,} parameters, {cfg}")
    _log(f"data: {len(train_loader)} training and {len(val_loader)} validation batches of {tcfg.batch_size} x "
         f"{cfg.context_length} tokens, {n_steps} steps per epoch; run directory {run_dir}")
    if mesh is not None:
        _log(f"devices: mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
             f"{jax.process_count()} process(es)")
    signals = StopSignals()
    hooks = RunWriter(run_dir, cfg, key, tcfg, signals, settings.monitoring, checked.examples, position.step)
    try:
        with signals:
            result = train_model_simple(
                params, cfg, train_loader, val_loader, tcfg, optimizer=optimizer, opt_state=opt_state,
                train_step=train_step, start=position, key=key, hooks=hooks, progress=progress,
                peak_tflops=peak_tflops, tokenizer=settings.encoding(),
            )
    finally:
        hooks.close()
        if sharding.is_main_process():
            plot_run(run_dir)
    planned = min(tcfg.epochs * n_steps, tcfg.max_steps or tcfg.epochs * n_steps)
    if signals.signum is not None and result.position.step < planned:
        raise Stopped(signals.signum, result.position.step, run_dir, tcfg.max_steps)
    history = result.history
    if history.train_losses:
        _log(f"last evaluation: train loss {history.train_losses[-1]:.3f}, val loss {history.val_losses[-1]:.3f}")
    _log(f"done: {result.position.step} steps, {result.position.tokens_seen:,} tokens seen, "
         f"{time.time() - start:.1f}s{_average_speed(result.speed)}; run directory {run_dir}")
    return run_dir


def _average_speed(speed: dict) -> str:
    """The run's average tokens/s (and MFU where known) for the last line; empty if no step ran."""
    if speed.get("tokens_per_sec") is None:
        return ""
    mfu = "" if speed["mfu"] is None else f", MFU {100 * speed['mfu']:.1f}%"
    return f", {speed['tokens_per_sec']:,.0f} tokens/s on average{mfu}"


def _log(message: str) -> None:
    if sharding.is_main_process():
        print(message)


def _init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, key: jax.Array, params: Params | None,
                mesh: Mesh | None) -> tuple[Params, OptState | None]:
    """A new run's parameters (``params`` if given, else initialised from ``key``) and, on a mesh, its optimizer
    state, both created in their shards (train_model_simple makes a one-device state)."""
    if mesh is None:
        return (init_params(cfg, key) if params is None else params), None
    if params is None:
        params = sharding.init_sharded_params(cfg, key, mesh)
    else:
        params = sharding.shard_params(params, mesh)
    return params, sharding.init_sharded_opt_state(optimizer, params, mesh)


def _starting_weights(settings: RunSettings) -> Params | None:
    """The weights a run started from (None: it started from its seed)."""
    if not settings.init_from:
        return None
    from gptjax.weights import load_weights

    return load_weights(settings.init_from, cfg=settings.cfg)[0]


class RunWriter(TrainHooks):
    """Appends each event to the run directory and its dashboards, scores HellaSwag, and saves checkpoints:
    when the loop saves, and also every ``tcfg.save_minutes`` and when ``signals`` asks the run to stop."""

    def __init__(self, run_dir: Path, cfg: ModelConfig, key: jax.Array, tcfg: TrainConfig, signals: StopSignals,
                 monitoring: Monitoring, examples: list[hellaswag.Example] | None, start_step: int):
        self.run_dir, self.cfg, self.key, self.signals = run_dir, cfg, key, signals
        self.examples, self.hellaswag_every = examples, monitoring.hellaswag_every
        self.save_seconds, self.last_save = 60 * tcfg.save_minutes, time.monotonic()
        self.manager = checkpoint_manager(run_dir, tcfg.keep)  # every process saves its shards
        # Only process 0 logs. Line-buffered appends: a killed run leaves whole lines (resume drops any past
        # its checkpoint).
        self.logs = sharding.is_main_process()
        self.metrics = open(run_dir / METRICS, "a", buffering=1) if self.logs else None
        self.samples = open(run_dir / SAMPLES, "a", buffering=1) if self.logs else None
        self.dashboards = None
        if self.logs:
            self.dashboards = Dashboards(run_dir, read_config(run_dir), tensorboard=monitoring.tensorboard,
                                         wandb_project=monitoring.wandb, wandb_id=monitoring.wandb_id,
                                         start_step=start_step)

    def _record(self, record: dict, *, position: bool = True) -> None:
        if self.logs:
            self.metrics.write(json.dumps(record) + "\n")
            self.dashboards.log(record, position=position)

    def on_step(self, record: dict) -> None:
        self._record(record)

    def on_eval(self, record: dict) -> None:
        self._record(record, position=False)

    def on_sample(self, epoch: int, step: int, text: str) -> None:
        if self.logs:
            self.samples.write(f"Ep {epoch} (Step {step:06d}): {text}\n")
            self.dashboards.text("sample", text, step)

    def benchmark_due(self, step: int) -> bool:
        return self.examples is not None and step % self.hellaswag_every == 0

    def on_benchmark(self, params: Params, record: dict) -> None:
        scores = hellaswag.score(params, self.cfg, self.examples)
        if self.logs:
            tqdm.write(f"Ep {record['epoch']} (Step {record['step']:06d}): HellaSwag acc_norm "
                       f"{scores.acc_norm:.4f}, acc {scores.acc:.4f} ({len(self.examples)} examples)")
        self._record({**record, "hellaswag_acc": scores.acc, "hellaswag_acc_norm": scores.acc_norm}, position=False)

    def on_checkpoint(self, position: Position, params: Params, opt_state: OptState) -> None:
        save_checkpoint(self.manager, position, params, opt_state, self.key, self.cfg)
        self.last_save = time.monotonic()

    def save_due(self, position: Position) -> bool:
        # Every process must agree (each writes its shards): in a multi-host run only steps decide.
        return (self.save_seconds > 0 and jax.process_count() == 1
                and time.monotonic() - self.last_save >= self.save_seconds)

    def stop_requested(self) -> bool:
        return self.signals.signum is not None

    def close(self) -> None:
        if self.logs:
            self.metrics.close()
            self.samples.close()
            self.dashboards.close()
        self.manager.close()


# ---------------------------------------------------------------------------------------------
# The run directory's files


def read_config(run_dir: Path) -> dict:
    """A run directory's config.json, checked to be one."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a gptjax run directory: it has no {CONFIG}")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); is the run directory damaged?") from None
    missing = [k for k in ("model", "train", "data", "steps_per_epoch") if k not in config]
    if missing:
        raise ValueError(f"{path} is not a gptjax run config: it lacks {', '.join(missing)}")
    return config


def write_config(run_dir: Path, settings: RunSettings, n_steps: int, train_batches: int, val_batches: int) -> None:
    config = {
        "model": config_to_dict(settings.cfg),
        "train": settings.tcfg.to_dict(),
        "data": {**settings.data.to_dict(), "init_from": settings.init_from, "tokenizer": settings.tokenizer},
        "steps_per_epoch": n_steps,
        "total_steps": settings.tcfg.epochs * n_steps,
        "train_batches": train_batches,
        "val_batches": val_batches,
        "monitoring": dataclasses.asdict(settings.monitoring),
    }
    _atomic_write(run_dir / CONFIG, json.dumps(config, indent=2) + "\n")


def _copy_tokenizer(folder: Path, run_dir: Path) -> Path:
    """The tokenizer files of ``folder`` copied into the run's ``tokenizer/`` (Meta's original/tokenizer.model
    too), where :func:`gptjax.weights.tokenizer_folder` finds them."""
    copy = run_dir / TOKENIZER_DIR
    copy.mkdir()
    for name in TOKENIZER_FILES:
        source = next((f for f in (folder / name, folder / "original" / name) if f.is_file()), None)
        if source is not None:
            shutil.copyfile(source, copy / name)
    return copy.absolute()


def make_run_dir(out_dir: str | Path | None) -> Path:
    """A new run's folder: ``out_dir`` (checked to be new or empty), else a fresh runs/<date>-<time>."""
    if out_dir is None and jax.process_count() > 1:
        raise ValueError("a multi-process run needs out_dir, a directory on a file system every host shares")
    if out_dir is None:
        base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        run_dir, n = base, 1
        while run_dir.exists():
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    else:
        run_dir = Path(out_dir)
        check_out_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_out_dir(run_dir: Path) -> None:
    """Whether a new run may be written to ``run_dir``: a new or empty folder, never one holding anything else."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"out_dir {run_dir} is a file; give a directory")
    if holds_run(run_dir):
        raise ValueError(f"{run_dir} already holds a run; continue it with resume_run {run_dir} or pick another "
                         "out_dir")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ValueError(f"out_dir {run_dir} is a folder with other files in it, not a gptjax run; give a new or "
                         "empty folder (a run writes several files there)")


def holds_run(run_dir: Path) -> bool:
    if (run_dir / METRICS).exists() or (run_dir / CHECKPOINTS).exists():
        return True
    try:
        read_config(run_dir)  # a run stopped before its first step
    except (ValueError, OSError):
        return False
    return True


def trim_logs(run_dir: Path, step: int) -> None:
    """Events from ``step`` on belong to a run that was then lost: they will happen again."""
    if sharding.is_main_process():
        _trim_lines(run_dir / METRICS, step, lambda line: json.loads(line)["step"])
        _trim_lines(run_dir / SAMPLES, step, lambda line: int(re.match(r"Ep \d+ \(Step (\d+)\)", line)[1]))


def _trim_lines(path: Path, step: int, step_of) -> None:
    """Keep the lines of ``path`` whose step is before ``step`` (unreadable, i.e. cut-off, lines go too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if line.endswith("\n") and step_of(line) < step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    _atomic_write(path, "".join(kept))


def _atomic_write(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
