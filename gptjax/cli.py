"""Flags shared by the command-line tools, defined once so each means the same everywhere.

``python -m gptjax.train`` uses every group; ``python -m gptjax.aot`` compiles the same train step from the
same model, batch, training and device flags. Parsers built with ``argparse.SUPPRESS`` as the default put
only the flags the user typed into the result, so code can tell "given" from "defaulted".
"""

from __future__ import annotations

import argparse
from typing import Any

from gptjax.config import ALIASES, PRESETS, GPTConfig, get_config
from gptjax.training import COMPUTE_DTYPES, TrainConfig

DEFAULT_PRESET = "GPT_CONFIG_124M"
MODEL_FLAGS = ("context_length", "emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias")


def add_model_flags(p: argparse.ArgumentParser, *, init_from: bool = True) -> None:
    m = p.add_argument_group("model")
    presets = sorted(PRESETS) + sorted(ALIASES)
    m.add_argument("--preset", metavar="NAME", help=f"model preset (default: {DEFAULT_PRESET}); one of: {', '.join(presets)}")
    m.add_argument("--context-length", type=int, metavar="N", help="override the preset's context length (tokens per window)")
    m.add_argument("--emb-dim", type=int, metavar="N", help="override the preset's embedding size")
    m.add_argument("--n-layers", type=int, metavar="N", help="override the preset's number of transformer blocks")
    m.add_argument("--n-heads", type=int, metavar="N", help="override the preset's number of attention heads")
    m.add_argument("--drop-rate", type=float, metavar="X", help="override the dropout rate (also with --init-from)")
    m.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, help="biases in the query/key/value projections")
    if init_from:
        m.add_argument("--init-from", metavar="WEIGHTS", help="start from these weights (gptjax checkpoint or run, "
                       "torch .pth, safetensors, Hugging Face or OpenAI folder); the model config comes from them")


def add_batch_flags(g: argparse._ArgumentGroup) -> None:
    d = TrainConfig()
    g.add_argument("--batch-size", type=int, metavar="N", help=f"sequences per batch (default: {d.batch_size})")


def add_step_flags(t: argparse._ArgumentGroup) -> None:
    """The flags that shape the compiled train step (besides the model and the batch)."""
    d = TrainConfig()
    t.add_argument("--lr", type=float, metavar="X", help=f"peak AdamW learning rate (default: {d.lr})")
    t.add_argument("--weight-decay", type=float, metavar="X", help=f"AdamW weight decay (default: {d.weight_decay})")
    t.add_argument("--exclude-bias-norm-from-decay", action="store_true",
                   help="no weight decay on biases and LayerNorm parameters (torch's AdamW decays all)")
    t.add_argument("--warmup-steps", type=int, metavar="N", help="linear warmup from 0 over this many steps (default: 0)")
    t.add_argument("--min-lr", type=float, metavar="X", help="cosine-decay the learning rate to this value (default: constant lr)")
    t.add_argument("--grad-clip", type=float, metavar="X", help="clip gradients to this global norm (default: no clipping)")
    t.add_argument("--grad-accum", type=int, metavar="N", help="batches per optimizer step (default: 1)")
    t.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), help="matmul compute dtype: bfloat16 is mixed "
                   "precision (float32 parameters, optimizer state, softmax, LayerNorm statistics and loss); "
                   f"for GPUs and TPUs (default: {d.dtype})")
    t.add_argument("--remat", action="store_true", help="recompute each block's activations in the backward pass: "
                   "less memory for longer contexts or bigger batches, about a third more compute")
    t.add_argument("--seed", type=int, metavar="N", help=f"seed for initialisation, shuffling and dropout (default: {d.seed})")


def add_mesh_flag(v: argparse._ArgumentGroup) -> None:
    v.add_argument("--mesh", metavar="AXES", help="train on all devices as a mesh data=N,fsdp=M whose sizes multiply "
                   "to the device count: batches split over both axes, parameters and optimizer state split over "
                   "fsdp (replicated over data); the batch size must be a multiple of N*M (default: one device; "
                   "in a multi-process run data=<all devices>)")


def model_config(args: dict[str, Any]) -> GPTConfig:
    """The model the flags in ``args`` (parsed with SUPPRESS defaults) describe, without --init-from."""
    return get_config(args.get("preset", DEFAULT_PRESET), **model_overrides(args))


def model_overrides(args: dict[str, Any]) -> dict[str, Any]:
    return {k: args[k] for k in MODEL_FLAGS if k in args}


def train_config(args: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of the flags in ``args`` (every other setting at its default)."""
    return TrainConfig(**{k: v for k, v in args.items() if k in TrainConfig.__dataclass_fields__})
