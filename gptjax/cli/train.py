"""``python -m gptjax.train``: the book's pretraining run (chapter 5), writing a run directory.

With no arguments it trains GPT_CONFIG_124M on the bundled the-verdict.txt exactly as the book does.
The run directory (``--out``) gets config.json, metrics.jsonl, samples.txt, loss.png, TensorBoard event
files (:mod:`gptjax.dashboard`) and orbax checkpoints; ``--resume RUN`` continues a stopped run step for step.

``--mesh data=N,fsdp=M`` trains on many devices (:mod:`gptjax.sharding`); started on every host of a
cluster with ``--distributed`` (or ``--coordinator``/``--num-processes``/``--process-id``), it is one
multi-host run in which process 0 writes the logs and every process takes part in the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax

from jax.sharding import Mesh

from tqdm.auto import tqdm

from gptjax import cli, hellaswag, sharding
from gptjax.atomic import atomic_file
from gptjax.checkpoint import CHECKPOINTS, checkpoint_manager, latest_step, restore_checkpoint, save_checkpoint
from gptjax.config import GPTConfig
from gptjax.dashboard import Dashboards, check_wandb, new_wandb_id
from gptjax.model import Params, abstract_params, init_params, param_count
from gptjax.plot import plot_run
from gptjax.training import (
    NonFiniteLossError,
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
from gptjax.weights.mapping import ARCH_FIELDS

DATA_FLAGS = ("corpus", "train_tokens", "val_tokens", "data_dir")
DEVICE_FLAGS = ("mesh", "coordinator", "num_processes", "process_id", "distributed")
# Settings that may change when resuming: they do not touch the arithmetic of training (a new mesh only
# changes the order of floating-point sums).
# What a run reports and to where (config.json's "monitoring"): free to change when resuming too.
MONITOR_FLAGS = ("tensorboard", "wandb", "hellaswag", "hellaswag_every")
RESUME_OVERRIDES = ("max_steps", "save_every", "save_minutes", "keep", "progress", "peak_tflops", *DEVICE_FLAGS,
                    *MONITOR_FLAGS, *cli.COMPILE_CACHE_FLAGS)
HELLASWAG_EVERY = 250
METRICS, SAMPLES, CONFIG, PLOT = "metrics.jsonl", "samples.txt", "config.json", "loss.png"


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m gptjax.train",
        description="Pretrain a GPT model as in chapter 5 of 'Build a Large Language Model (From Scratch)'. "
        "With no arguments: GPT_CONFIG_124M on the bundled the-verdict.txt, the book's settings.",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line appear in the result
    )
    cli.add_model_flags(p)

    g = p.add_argument_group("data")
    g.add_argument("--corpus", metavar="TXT", help="UTF-8 text to train on (default: the bundled the-verdict.txt)")
    g.add_argument("--train-tokens", metavar="BIN", help="uint16 token file for training (nanoGPT's headerless train.bin) "
                   "(default: none, train on --corpus)")
    g.add_argument("--val-tokens", metavar="BIN", help="uint16 token file for validation (default: none)")
    g.add_argument("--data-dir", metavar="DIR", help="token shards from python -m gptjax.prepare, llm.c or "
                   "modded-nanogpt (*_train_*.bin, *_val_*.bin), or nanoGPT's train.bin and val.bin (default: none)")
    cli.add_batch_flags(g)
    g.add_argument("--stride", type=int, metavar="N", help="step between window starts (default: the context length)")
    g.add_argument("--train-ratio", type=float, metavar="X", help=f"share of a text corpus used for training (default: {d.train_ratio})")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the training batches in order (default: reshuffled every epoch)")

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, metavar="N", help=f"passes over the training data (default: {d.epochs})")
    t.add_argument("--max-steps", type=int, metavar="N", help="stop after this many optimizer steps (the lr schedule still "
                   "spans all epochs, so a stopped run resumes exactly) (default: all epochs)")
    cli.add_step_flags(t)

    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-freq", type=int, metavar="N", help=f"evaluate every this many steps (default: {d.eval_freq})")
    e.add_argument("--eval-iter", type=int, metavar="N", help=f"batches per evaluation, each split (default: {d.eval_iter})")
    e.add_argument("--start-context", metavar="TEXT", help=f"prompt of the greedy sample after each epoch, '' for none "
                   f"(default: {d.start_context!r})")
    e.add_argument("--hellaswag", metavar="JSONL", help="also score HellaSwag (the dataset's hellaswag_val.jsonl) "
                   "and log hellaswag_acc_norm and hellaswag_acc (default: none)")
    e.add_argument("--hellaswag-every", type=int, metavar="N", help="score --hellaswag every this many steps "
                   f"(default: {HELLASWAG_EVERY})")

    b = p.add_argument_group("dashboards")
    b.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="no TensorBoard event files in the run directory (default: write them, for tensorboard "
                   "--logdir runs)")
    b.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project (needs "
                   "pip install 'gptjax[wandb]'; WANDB_MODE=offline logs with no network) (default: none)")

    r = p.add_argument_group("run directory")
    r.add_argument("--out", metavar="DIR", help="run directory, new or empty (default: runs/<date>-<time>, e.g. "
                   "runs/20250101-120000)")
    r.add_argument("--save-every", type=int, metavar="N", help="also checkpoint every this many steps (default: 0, "
                   "by time only)")
    r.add_argument("--save-minutes", type=float, metavar="X", help="also checkpoint when this many minutes have "
                   f"passed since the last save, 0 for never (default: {d.save_minutes:g}); Ctrl-C, SIGTERM and "
                   "the end always save")
    r.add_argument("--keep", type=int, metavar="N", help=f"checkpoints to keep (default: {d.keep})")
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint (or from step 0 "
                   "if it has none) to its end, with its settings (only --max-steps, --save-every, --save-minutes, "
                   "--keep, --no-progress, the device flags and the compile-cache flags may be given: a run may resume on "
                   "another mesh) (default: start a new run)")
    r.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (default: a progress bar)")

    v = p.add_argument_group("devices")
    cli.add_mesh_flag(v)
    v.add_argument("--distributed", action="store_true", help="join a multi-host run whose settings jax detects "
                   "(Cloud TPU pod slices, SLURM, Open MPI): start the same command on every host (default: off)")
    v.add_argument("--coordinator", metavar="HOST:PORT", help="join a multi-host run: process 0's address and a free "
                   "port (default: JAX_COORDINATOR_ADDRESS, else a one-process run)")
    v.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (default: JAX_NUM_PROCESSES)")
    v.add_argument("--process-id", type=int, metavar="I",
                   help="this process's index, 0 to N-1 (default: JAX_PROCESS_ID)")
    v.add_argument("--peak-tflops", type=float, metavar="X", help="one device's peak TFLOPS, for the MFU in the "
                   "progress bar and metrics.jsonl (default: the datasheet peak of known GPUs and TPUs for --dtype; "
                   "none on CPU)")
    cli.add_compile_cache_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        cli.setup_compile_cache(args)
        run(args)
    except NonFiniteLossError as e:
        print(f"error: {cli.error_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {cli.error_line(e)}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(e, file=sys.stderr)
        return 128 + e.signum  # the shell's code for a death by that signal: 130 for SIGINT, 143 for SIGTERM
    except KeyboardInterrupt:
        print("aborted: continue from the run's last checkpoint with python -m gptjax.train --resume RUN_DIR",
              file=sys.stderr)
        return 130
    return 0


class Stopped(Exception):
    """The run stopped on SIGINT or SIGTERM, after saving; the message says how to continue it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM (how clusters and preemptible VMs stop jobs) only ask the
    training loop to stop after the step under way, and save; a second one aborts at once.

    Only in the main thread of a one-process run: in a multi-host run the processes would stop at different
    steps and wait for each other's checkpoint shards forever, so there the signals keep their usual effect
    (--save-every bounds the loss)."""

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


def run(args: dict[str, Any]) -> Path:
    """Train as the parsed flags say (only those given are in ``args``); returns the run directory."""
    start = time.time()
    progress = args.get("progress", True)
    if not args.get("peak_tflops", 1.0) > 0:
        raise ValueError(f"--peak-tflops must be a positive number of TFLOPS, got {args['peak_tflops']}")
    resuming = "resume" in args
    sharding.initialize_distributed(args.get("coordinator"), args.get("num_processes"), args.get("process_id"),
                                    auto=args.get("distributed", False))
    mesh = _make_mesh(args)
    if resuming:
        run_dir, cfg, tcfg, data, steps_at_start = _resume_settings(args)
    else:
        cfg, tcfg, data, params = _new_run(args)
    if mesh is not None:
        sharding.check_batch_size(tcfg.batch_size, mesh)
    monitoring = _monitoring(args, _read_config(run_dir).get("monitoring", {}) if resuming else {})
    examples = _hellaswag_examples(monitoring, cfg)
    train_loader, val_loader = build_loaders(data, cfg, tcfg)
    if not resuming:  # only once the data is known to be usable
        run_dir = _make_run_dir(args.get("out"))
    sharding.sync_processes("gptjax.train: settings checked")  # before process 0 writes anything
    n_steps = steps_per_epoch(train_loader, tcfg.grad_accum)
    if n_steps == 0:
        raise ValueError(f"the training data gives {len(train_loader)} batches, fewer than --grad-accum "
                         f"{tcfg.grad_accum}; lower --grad-accum or --batch-size")
    optimizer = make_optimizer(tcfg, tcfg.epochs * n_steps)
    if resuming:
        if n_steps != steps_at_start:
            raise ValueError(f"the training data now gives {n_steps} steps per epoch, not {steps_at_start} as "
                             f"when {run_dir} started: its data changed, so the run cannot resume exactly")
        if latest_step(run_dir) is None:  # stopped before its first save: start it again as it started
            _log(f"{run_dir} has no checkpoint yet: starting it again from step 0 with its settings")
            init_key, key = run_keys(tcfg.seed)
            params, opt_state = _init_state(cfg, optimizer, init_key, _init_from(data, cfg), mesh)
            position = Position()
            _trim_logs(run_dir, position.step)
        else:
            params, opt_state, position, key = _restore(run_dir, cfg, optimizer, mesh)
            _log(f"resuming {run_dir} at step {position.step}")
    else:
        init_key, key = run_keys(tcfg.seed)
        params, opt_state = _init_state(cfg, optimizer, init_key, params, mesh)
        position = Position()
    train_step = None  # the loop's own single-device step
    if mesh is not None:
        jit_kwargs = sharding.train_step_jit_kwargs(mesh, cfg, optimizer, tcfg.grad_accum)
        train_step = make_train_step(cfg, optimizer, **train_step_options(tcfg), jit_kwargs=jit_kwargs, mesh=mesh)
        train_loader, val_loader = sharding.ShardedLoader(train_loader, mesh), sharding.ShardedLoader(val_loader, mesh)
    if sharding.is_main_process():
        _write_config(run_dir, cfg, tcfg, data, n_steps, train_loader, val_loader, monitoring)
    _log(f"model: {param_count(abstract_params(cfg)):,} parameters, {cfg}")
    _log(f"data: {len(train_loader)} training and {len(val_loader)} validation batches of {tcfg.batch_size} x "
         f"{cfg.context_length} tokens, {n_steps} steps per epoch; run directory {run_dir}")
    if mesh is not None:
        _log(f"devices: mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
             f"{jax.process_count()} process(es)")

    signals = StopSignals()
    hooks = RunWriter(run_dir, cfg, key, tcfg, signals, monitoring, examples, position.step)
    try:
        with signals:
            result = train_model_simple(
                params, cfg, train_loader, val_loader, tcfg, optimizer=optimizer, opt_state=opt_state,
                train_step=train_step, start=position, key=key, hooks=hooks, progress=progress,
                peak_tflops=args.get("peak_tflops"),
            )
    finally:
        hooks.close()
        if sharding.is_main_process():
            plot_run(run_dir)
    planned = min(tcfg.epochs * n_steps, tcfg.max_steps or tcfg.epochs * n_steps)
    if signals.signum is not None and result.position.step < planned:
        until = f" --max-steps {tcfg.max_steps}" if tcfg.max_steps else ""  # a resumed run otherwise runs to its end
        raise Stopped(signals.signum, f"stopped by {signal.Signals(signals.signum).name} after step "
                      f"{result.position.step}, with a checkpoint there; continue with: python -m gptjax.train "
                      f"--resume {shlex.quote(str(run_dir))}{until}")
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


def _make_mesh(args: dict[str, Any]) -> Mesh | None:
    """The --mesh; without one, a single device, or data parallelism over every device of a multi-process run."""
    if "mesh" in args:
        return sharding.make_mesh(sharding.parse_mesh(args["mesh"]))
    if jax.process_count() > 1:
        return sharding.make_mesh({"data": jax.device_count()})
    return None


def _init_state(cfg: GPTConfig, optimizer, key: jax.Array, params: Params | None,
                mesh: Mesh | None) -> tuple[Params, OptState | None]:
    """A new run's parameters (``params`` loaded with --init-from, else initialised from ``key``) and, on a
    mesh, its optimizer state, both created in their shards (train_model_simple makes a one-device state)."""
    if mesh is None:
        return (init_params(cfg, key) if params is None else params), None
    if params is None:
        params = sharding.init_sharded_params(cfg, key, mesh)
    else:
        params = sharding.shard_params(params, mesh)
    return params, sharding.init_sharded_opt_state(optimizer, params, mesh)


def _monitoring(args: dict[str, Any], stored: dict) -> dict:
    """config.json's "monitoring": the dashboards and --hellaswag of the flags, else of ``stored`` (a
    resumed run's), else the defaults; checked before any slow work."""
    m = {"tensorboard": True, "wandb": None, "wandb_id": None, "hellaswag": None, "hellaswag_every": HELLASWAG_EVERY,
         **stored, **{k: args[k] for k in MONITOR_FLAGS if k in args}}
    if "hellaswag" in args:
        m["hellaswag"] = str(Path(args["hellaswag"]).absolute())
    if m["hellaswag_every"] < 1:
        raise ValueError(f"--hellaswag-every must be at least 1, got {m['hellaswag_every']}")
    if "hellaswag_every" in args and m["hellaswag"] is None:
        raise ValueError("--hellaswag-every needs --hellaswag FILE, the HellaSwag examples to score")
    if m["hellaswag"] is not None and jax.process_count() > 1:
        raise ValueError("--hellaswag scores on one process; drop it from a multi-process run and score the "
                         "checkpoints with python -m gptjax.evaluate --hellaswag")
    if m["wandb"] is not None:
        check_wandb()
        if m["wandb_id"] is None:
            m["wandb_id"] = new_wandb_id()
    return m


def _hellaswag_examples(monitoring: dict, cfg: GPTConfig) -> list[hellaswag.Example] | None:
    if monitoring["hellaswag"] is None:
        return None
    examples = hellaswag.load_examples(monitoring["hellaswag"])
    hellaswag.check_fits(examples, cfg, monitoring["hellaswag"])
    return examples


class RunWriter(TrainHooks):
    """Appends each event to the run directory and its dashboards, scores HellaSwag, and saves checkpoints:
    when the loop saves, and also every ``tcfg.save_minutes`` and when ``signals`` asks the run to stop."""

    def __init__(self, run_dir: Path, cfg: GPTConfig, key: jax.Array, tcfg: TrainConfig, signals: "StopSignals",
                 monitoring: dict, examples: list[hellaswag.Example] | None, start_step: int):
        self.run_dir, self.cfg, self.key, self.signals = run_dir, cfg, key, signals
        self.examples, self.hellaswag_every = examples, monitoring["hellaswag_every"]
        self.save_seconds, self.last_save = 60 * tcfg.save_minutes, time.monotonic()
        self.manager = checkpoint_manager(run_dir, tcfg.keep)  # every process saves its shards
        # Only process 0 logs. Line-buffered appends: a killed run leaves whole lines (resume drops any past
        # its checkpoint).
        self.logs = sharding.is_main_process()
        self.metrics = open(run_dir / METRICS, "a", buffering=1) if self.logs else None
        self.samples = open(run_dir / SAMPLES, "a", buffering=1) if self.logs else None
        self.dashboards = None
        if self.logs:
            self.dashboards = Dashboards(run_dir, _read_config(run_dir), tensorboard=monitoring["tensorboard"],
                                         wandb_project=monitoring["wandb"], wandb_id=monitoring["wandb_id"],
                                         start_step=start_step)

    def on_step(self, record: dict) -> None:
        if self.logs:
            self.metrics.write(json.dumps(record) + "\n")
            self.dashboards.log(record)

    def on_eval(self, record: dict) -> None:
        if self.logs:
            self.metrics.write(json.dumps(record) + "\n")
            self.dashboards.log(record, position=False)

    def on_sample(self, epoch: int, step: int, text: str) -> None:
        if self.logs:
            self.samples.write(f"Ep {epoch} (Step {step:06d}): {text}\n")
            self.dashboards.text("sample", text, step)

    def benchmark_due(self, step: int) -> bool:
        return self.examples is not None and step % self.hellaswag_every == 0

    def on_benchmark(self, params: Params, record: dict) -> None:
        scores = hellaswag.score(params, self.cfg, self.examples)
        record = {**record, "hellaswag_acc": scores.acc, "hellaswag_acc_norm": scores.acc_norm}
        if self.logs:
            tqdm.write(f"Ep {record['epoch']} (Step {record['step']:06d}): HellaSwag acc_norm "
                       f"{scores.acc_norm:.4f}, acc {scores.acc:.4f} ({len(self.examples)} examples)")
            self.metrics.write(json.dumps(record) + "\n")
            self.dashboards.log(record, position=False)

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
# Setting up a new run, or picking one up


def _new_run(args: dict[str, Any]) -> tuple[GPTConfig, TrainConfig, dict, Params | None]:
    """The settings of a new run, and the --init-from weights (None: initialise from the seed)."""
    tcfg = cli.train_config(args)
    overrides = cli.model_overrides(args)
    if "init_from" in args:
        params, cfg = cli.load_weights_flag(args["init_from"], args.get("n_heads"), flag_name="--init-from")
        given = cli.model_config(args) if "preset" in args else None
        for k in ARCH_FIELDS:
            want = overrides.get(k, getattr(given, k, None))
            if want is not None and getattr(cfg, k) != want:
                raise ValueError(f"{cli.flag(k) if k in overrides else '--preset ' + args['preset']} ({k}={want!r}) "
                                 f"does not match the weights in {args['init_from']} ({k}={getattr(cfg, k)!r}); "
                                 "drop the flag")
        if "drop_rate" in overrides:
            cfg = cfg.replace(drop_rate=overrides["drop_rate"])
    else:
        cfg = cli.model_config(args)
        params = None
    tcfg = tcfg.replace(stride=tcfg.stride or cfg.context_length)
    if "out" in args:
        _check_out(Path(args["out"]))
    init_from = cli.weights_record(args["init_from"]) if "init_from" in args else None
    return cfg, tcfg, {**_data_spec(args), "init_from": init_from}, params


def _resume_settings(args: dict[str, Any]) -> tuple[Path, GPTConfig, TrainConfig, dict, int]:
    run_dir = Path(args["resume"])
    fixed = sorted(k for k in args if k not in RESUME_OVERRIDES and k != "resume")
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise ValueError(f"{flags} cannot change when resuming: the run's settings come from {run_dir / CONFIG}; "
                         "start a new run (--init-from the old one) to change them")
    config = _read_config(run_dir)
    # A stored --max-steps was where the run was told to stop: resuming runs on to the end unless given again.
    given = {k: args[k] for k in RESUME_OVERRIDES if k in args and k in TrainConfig.__dataclass_fields__}
    overrides = {"max_steps": None, **given}
    tcfg = TrainConfig.from_dict(config["train"]).replace(**overrides)
    return run_dir, GPTConfig.from_dict(config["model"]), tcfg, config["data"], config["steps_per_epoch"]


def _restore(run_dir: Path, cfg: GPTConfig, optimizer,
             mesh: Mesh | None) -> tuple[Params, OptState, Position, jax.Array]:
    # Into the shardings of the current mesh, whatever mesh wrote the checkpoint.
    params, opt_state, position, key = restore_checkpoint(run_dir, *sharding.abstract_state(cfg, optimizer, mesh))
    _trim_logs(run_dir, position.step)
    return params, opt_state, position, key


def _trim_logs(run_dir: Path, step: int) -> None:
    """Events from ``step`` on belong to a run that was then lost: they will happen again."""
    if sharding.is_main_process():
        _trim_lines(run_dir / METRICS, step, lambda line: json.loads(line)["step"])
        _trim_lines(run_dir / SAMPLES, step, lambda line: int(re.match(r"Ep \d+ \(Step (\d+)\)", line)[1]))


def _init_from(data: dict, cfg: GPTConfig) -> Params | None:
    """The --init-from weights a run started from (None: it started from its seed)."""
    if not data.get("init_from"):
        return None
    from gptjax.weights import load_weights

    return load_weights(data["init_from"], cfg=cfg)[0]


def _read_config(run_dir: Path) -> dict:
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


def _data_spec(args: dict[str, Any]) -> dict:
    """Absolute data paths (so a run resumes from any working directory); corpus None = bundled text."""
    given = [k for k in DATA_FLAGS if k in args]
    if "data_dir" in args:
        if len(given) > 1:
            raise ValueError("--data-dir cannot be combined with --corpus, --train-tokens or --val-tokens")
        return {"corpus": None, "train_tokens": None, "val_tokens": None,
                "data_dir": str(Path(args["data_dir"]).absolute())}
    if "train_tokens" in args or "val_tokens" in args:
        if "corpus" in args or not ("train_tokens" in args and "val_tokens" in args):
            raise ValueError("token files need both --train-tokens and --val-tokens, and no --corpus")
        return {"corpus": None, "train_tokens": str(Path(args["train_tokens"]).absolute()),
                "val_tokens": str(Path(args["val_tokens"]).absolute())}
    corpus = args.get("corpus")
    return {"corpus": None if corpus is None else str(Path(corpus).absolute()), "train_tokens": None,
            "val_tokens": None}


def build_loaders(data: dict, cfg: GPTConfig, tcfg: TrainConfig):
    """The book's loaders: shuffled training batches (last partial batch dropped) and ordered validation batches."""
    from gptjax import data as gdata

    if data.get("data_dir"):
        train_src, val_src = gdata.load_data_dir(data["data_dir"])
        names = (f"the training tokens of {data['data_dir']}", f"the validation tokens of {data['data_dir']}")
    elif data.get("train_tokens"):
        for name in ("train_tokens", "val_tokens"):
            if not Path(data[name]).is_file():
                raise FileNotFoundError(f"token file {data[name]} not found; {gdata.PREPARE_HINT}")
        train_src, val_src = gdata.load_token_file(data["train_tokens"]), gdata.load_token_file(data["val_tokens"])
        names = (data["train_tokens"], data["val_tokens"])
    else:
        if data.get("corpus"):
            text = gdata.read_corpus(data["corpus"])
        else:
            from gptjax.tokenizer import load_default_corpus

            text = load_default_corpus()
        train_src, val_src = gdata.split_text(text, tcfg.train_ratio)
        source = data.get("corpus") or "the bundled the-verdict.txt"
        names = (f"the training split of {source}", f"the validation split of {source}")
    common = dict(batch_size=tcfg.batch_size, max_length=cfg.context_length, stride=tcfg.stride or cfg.context_length)
    loaders = []
    for src, name, train in zip((train_src, val_src), names, (True, False)):
        try:
            loader = gdata.create_dataloader(src, shuffle=train and tcfg.shuffle, drop_last=train, seed=tcfg.seed,
                                             **common)
        except ValueError as e:
            raise ValueError(f"{name}: {e}; use more data or a smaller --context-length") from None
        if len(loader) == 0:
            raise ValueError(f"{name} gives no full batch of {tcfg.batch_size} windows of {cfg.context_length} "
                             "tokens; lower --batch-size or --context-length, or use more data")
        loaders.append(loader)
    return tuple(loaders)


def _make_run_dir(out: str | None) -> Path:
    if out is None and jax.process_count() > 1:
        raise ValueError("a multi-process run needs --out DIR, a directory on a file system every host shares")
    if out is None:
        base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        run_dir, n = base, 1
        while run_dir.exists():
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    else:
        run_dir = Path(out)
        _check_out(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _check_out(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file; give a directory")
    if _holds_run(run_dir):
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ValueError(f"--out {run_dir} is a folder with other files in it, not a gptjax run; give a new or "
                         "empty folder (a run writes several files there)")


def _holds_run(run_dir: Path) -> bool:
    if (run_dir / METRICS).exists() or (run_dir / CHECKPOINTS).exists():
        return True
    try:
        _read_config(run_dir)  # a run stopped before its first step
    except (ValueError, OSError):
        return False
    return True


def _write_config(run_dir: Path, cfg: GPTConfig, tcfg: TrainConfig, data: dict, n_steps: int,
                  train_loader, val_loader, monitoring: dict) -> None:
    config = {
        "model": cfg.to_dict(),
        "train": tcfg.to_dict(),
        "data": data,
        "steps_per_epoch": n_steps,
        "total_steps": tcfg.epochs * n_steps,
        "train_batches": len(train_loader),
        "val_batches": len(val_loader),
        "monitoring": monitoring,
    }
    _atomic_write(run_dir / CONFIG, json.dumps(config, indent=2) + "\n")


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


if __name__ == "__main__":
    sys.exit(main())
