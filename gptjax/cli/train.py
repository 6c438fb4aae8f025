"""``python -m gptjax.train``: the book's pretraining run (chapter 5), writing a run directory.

With no arguments it trains GPT_CONFIG_124M on the bundled the-verdict.txt exactly as the book does.
The run directory (``--out``) gets config.json, metrics.jsonl, samples.txt, loss.png, TensorBoard event
files and orbax checkpoints (:mod:`gptjax.runs`); ``--resume RUN`` continues a stopped run step for step.

``--mesh data=N,fsdp=M`` trains on many devices (:mod:`gptjax.sharding`); started on every host of a
cluster with ``--distributed`` (or ``--coordinator``/``--num-processes``/``--process-id``), it is one
multi-host run in which process 0 writes the logs and every process takes part in the checkpoints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from gptjax import cli, sharding
from gptjax.data import DataSource
from gptjax.model import Params
from gptjax.presets import ModelConfig, family_of
from gptjax.runs import HELLASWAG_EVERY, Monitoring, RunSettings, Stopped, check_out_dir, resume_run, start_run
from gptjax.training import NonFiniteLossError, TrainConfig
from gptjax.weights import tokenizer_folder
from gptjax.weights.mapping import ARCH_FIELDS

DATA_FLAGS = ("corpus", "train_tokens", "val_tokens", "data_dir")
DEVICE_FLAGS = ("mesh", "coordinator", "num_processes", "process_id", "distributed")
# What a run reports and to where (config.json's "monitoring").
MONITOR_FLAGS = ("tensorboard", "wandb", "hellaswag", "hellaswag_every")
# The settings resume_run takes: they do not touch the arithmetic of training (a new mesh only changes the
# order of floating-point sums).
RESUME_SETTINGS = ("max_steps", "save_every", "save_minutes", "keep")
RESUME_OVERRIDES = (*RESUME_SETTINGS, "progress", "peak_tflops", *DEVICE_FLAGS, *MONITOR_FLAGS,
                    *cli.COMPILE_CACHE_FLAGS)


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
        return cli.fail(e, 1)
    except (ValueError, OSError) as e:
        return cli.fail(e)
    except Stopped as e:
        until = f" --max-steps {e.max_steps}" if e.max_steps else ""  # a resumed run otherwise runs to its end
        print(f"{e}; continue with: python -m gptjax.train --resume {shlex.quote(str(e.run_dir))}{until}",
              file=sys.stderr)
        return 128 + e.signum  # the shell's code for a death by that signal: 130 for SIGINT, 143 for SIGTERM
    except KeyboardInterrupt:
        print("aborted: continue from the run's last checkpoint with python -m gptjax.train --resume RUN_DIR",
              file=sys.stderr)
        return 130
    return 0


def run(args: dict[str, Any]) -> Path:
    """Train as the parsed flags say (only those given are in ``args``); returns the run directory."""
    if not args.get("peak_tflops", 1.0) > 0:
        raise ValueError(f"--peak-tflops must be a positive number of TFLOPS, got {args['peak_tflops']}")
    if "hellaswag_every" in args and "hellaswag" not in args and "resume" not in args:
        raise ValueError("--hellaswag-every needs --hellaswag FILE, the HellaSwag examples to score")
    if "resume" in args:
        check_resume_flags(args)
    sharding.initialize_distributed(args.get("coordinator"), args.get("num_processes"), args.get("process_id"),
                                    auto=args.get("distributed", False))  # before anything touches a device
    mesh = _make_mesh(args)
    monitoring = {k: args[k] for k in MONITOR_FLAGS if k in args}
    if "resume" not in args:
        if "out" in args:
            check_out_dir(Path(args["out"]))  # before --init-from's weights load
        settings, params = _new_run(args, monitoring)
    common = dict(mesh=mesh, progress=args.get("progress", True), peak_tflops=args.get("peak_tflops"))
    if "resume" in args:
        return resume_run(args["resume"], **{k: args[k] for k in RESUME_SETTINGS if k in args},
                          monitoring=monitoring, **common)
    return start_run(settings, out_dir=args.get("out"), params=params, **common)


def check_resume_flags(args: dict[str, Any]) -> None:
    """Only the flags that do not change a run's arithmetic go with --resume; the rest come from the run."""
    fixed = sorted(k for k in args if k not in RESUME_OVERRIDES and k != "resume")
    if fixed:
        raise ValueError(f"{', '.join(map(cli.flag, fixed))} cannot change when resuming: the run's settings come "
                         f"from {Path(args['resume']) / 'config.json'}; start a new run (--init-from the old one) "
                         "to change them")


def _new_run(args: dict[str, Any], monitoring: dict[str, Any]) -> tuple[RunSettings, Params | None]:
    """A new run's settings, and the --init-from weights (None: initialise from the seed)."""
    tcfg = cli.train_config(args)
    if "init_from" in args:
        params, cfg = _init_from(args)
    else:
        cfg, params = cli.model_config(args), None
    try:
        data = DataSource(**{k: args[k] for k in DATA_FLAGS if k in args})
        monitoring = Monitoring(**monitoring)
    except ValueError as e:
        raise ValueError(cli.in_flag_terms(e, (*DATA_FLAGS, *MONITOR_FLAGS))) from None
    init_from = cli.weights_record(args["init_from"]) if "init_from" in args else None
    return RunSettings(cfg, tcfg, data, init_from, monitoring, _tokenizer(args, cfg)), params


def _tokenizer(args: dict[str, Any], cfg: ModelConfig) -> str | None:
    """The folder of the model's tokenizer files: --tokenizer, else beside --init-from's weights (GPT-2: none,
    it has its bundled one)."""
    if "tokenizer" in args:
        if not Path(args["tokenizer"]).is_dir():
            raise FileNotFoundError(f"--tokenizer {args['tokenizer']}: no such folder")
        return str(Path(args["tokenizer"]).absolute())
    if family_of(cfg) == "gpt2":
        return None
    folder = tokenizer_folder(args["init_from"]) if "init_from" in args else None
    if folder is None:
        raise ValueError(f"a {family_of(cfg)} model trains on its own tokenizer's tokens: give --tokenizer DIR, the "
                         "folder of its tokenizer.json or tokenizer.model"
                         + (f" (there are none beside {args['init_from']})" if "init_from" in args else ""))
    return str(folder.absolute())


def _init_from(args: dict[str, Any]) -> tuple[Params, ModelConfig]:
    """The --init-from weights and their config, which the model flags may only restate (or set dropout, or a
    shorter --context-length for a model with rotary positions, which has no table of positions to match)."""
    params, cfg = cli.load_weights_flag(args["init_from"], args.get("n_heads"), flag_name="--init-from")
    overrides = cli.model_overrides(args)
    given = cli.model_config(args) if "preset" in args else None
    rotary = hasattr(cfg, "rope_base")
    if rotary and "context_length" in overrides:
        if not 0 < overrides["context_length"] <= cfg.context_length:
            raise ValueError(f"--context-length must be in 1..{cfg.context_length} for the weights in "
                             f"{args['init_from']}, got {overrides['context_length']}")
        cfg = cfg.replace(context_length=overrides.pop("context_length"))
    for k in ARCH_FIELDS:
        if rotary and k == "context_length":
            continue
        want = overrides.get(k, getattr(given, k, None))
        if want is not None and getattr(cfg, k) != want:
            raise ValueError(f"{cli.flag(k) if k in overrides else '--preset ' + args['preset']} ({k}={want!r}) "
                             f"does not match the weights in {args['init_from']} ({k}={getattr(cfg, k)!r}); "
                             "drop the flag")
    if "drop_rate" in overrides:
        cfg = cfg.replace(drop_rate=overrides["drop_rate"])
    return params, cfg


def _make_mesh(args: dict[str, Any]) -> Mesh | None:
    """The --mesh; without one, a single device, or data parallelism over every device of a multi-process run."""
    if "mesh" in args:
        return sharding.make_mesh(sharding.parse_mesh(args["mesh"]))
    if jax.process_count() > 1:
        return sharding.make_mesh({"data": jax.device_count()})
    return None


if __name__ == "__main__":
    sys.exit(main())
