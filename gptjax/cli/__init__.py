"""Flags shared by the command-line tools, defined once so each means the same everywhere.

``python -m gptjax.train`` uses every group; ``python -m gptjax.aot`` compiles the same train step from the
same model, batch, training and device flags. Parsers built with ``argparse.SUPPRESS`` as the default put
only the flags the user typed into the result, so code can tell "given" from "defaulted".
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gptjax import compile_cache
from gptjax.config import GPTConfig
from gptjax.presets import ModelConfig, model_preset, preset_names
from gptjax.model import Params
from gptjax.training import COMPUTE_DTYPES, TrainConfig

DEFAULT_PRESET = "GPT_CONFIG_124M"
MODEL_FLAGS = ("context_length", "emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias")


def add_model_flags(p: argparse.ArgumentParser, *, init_from: bool = True) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--preset", "--model", dest="preset", metavar="NAME",
                   help=f"model preset (default: {DEFAULT_PRESET}); one of: {', '.join(preset_names())}")
    m.add_argument("--context-length", type=int, metavar="N",
                   help="tokens per window (default: the preset's, 256 for GPT_CONFIG_124M)")
    m.add_argument("--emb-dim", type=int, metavar="N", help="embedding size (default: the preset's)")
    m.add_argument("--n-layers", type=int, metavar="N", help="number of transformer blocks (default: the preset's)")
    m.add_argument("--n-heads", type=int, metavar="N", help="number of attention heads (default: the preset's; with "
                   "--init-from, the weights' own, or 64-wide heads for a .pth without its config file)")
    m.add_argument("--drop-rate", type=float, metavar="X", help="dropout rate, also with --init-from (default: the "
                   "preset's, 0.1)")
    m.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction,
                   help="biases in the query/key/value projections (default: the preset's, off for GPT_CONFIG_124M)")
    if init_from:
        m.add_argument("--init-from", "--weights", dest="init_from", metavar="WEIGHTS",
                       help="start from these weights (gptjax checkpoint or run, torch .pth, safetensors, Hugging Face "
                       "or OpenAI folder, or a Hugging Face model id); the model config comes from them (default: "
                       "initialise from --seed)")
        m.add_argument("--tokenizer", metavar="DIR", help="a Llama 3 or Qwen3 model's tokenizer files "
                       "(tokenizer.json or tokenizer.model, tokenizer_config.json) (default: those beside "
                       "--init-from's weights; GPT-2 models use GPT-2's)")


def add_batch_flags(g: argparse._ArgumentGroup) -> None:
    d = TrainConfig()
    g.add_argument("--batch-size", type=int, metavar="N", help=f"sequences per batch (default: {d.batch_size})")


def add_step_flags(t: argparse._ArgumentGroup) -> None:
    """The flags that shape the compiled train step (besides the model and the batch)."""
    d = TrainConfig()
    t.add_argument("--lr", type=float, metavar="X", help=f"peak AdamW learning rate (default: {d.lr})")
    t.add_argument("--weight-decay", type=float, metavar="X", help=f"AdamW weight decay (default: {d.weight_decay})")
    t.add_argument("--exclude-bias-norm-from-decay", action="store_true",
                   help="no weight decay on biases and LayerNorm parameters (default: off, torch's AdamW decays all)")
    t.add_argument("--warmup-steps", type=int, metavar="N", help="linear warmup from 0 over this many steps (default: 0)")
    t.add_argument("--min-lr", type=float, metavar="X", help="cosine-decay the learning rate to this value (default: constant lr)")
    t.add_argument("--grad-clip", type=float, metavar="X", help="clip gradients to this global norm (default: no clipping)")
    t.add_argument("--grad-accum", type=int, metavar="N", help="batches per optimizer step (default: 1)")
    t.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), help="matmul compute dtype: bfloat16 is mixed "
                   "precision (float32 parameters, optimizer state, softmax, LayerNorm statistics and loss); "
                   f"for GPUs and TPUs (default: {d.dtype})")
    t.add_argument("--remat", action="store_true", help="recompute each block's activations in the backward pass: "
                   "less memory for longer contexts or bigger batches, about a third more compute (default: off)")
    t.add_argument("--seed", type=int, metavar="N", help=f"seed for initialisation, shuffling and dropout (default: {d.seed})")


def add_mesh_flag(v: argparse._ArgumentGroup) -> None:
    v.add_argument("--mesh", metavar="AXES", help="train on all devices as a mesh data=N,fsdp=M whose sizes multiply "
                   "to the device count: batches split over both axes, parameters and optimizer state split over "
                   "fsdp (replicated over data); the batch size must be a multiple of N*M (default: one device; "
                   "in a multi-process run data=<all devices>)")


def model_config(args: dict[str, Any]) -> ModelConfig:
    """The model the flags in ``args`` (parsed with SUPPRESS defaults) describe, without --init-from."""
    try:
        return model_preset(args.get("preset", DEFAULT_PRESET), **model_overrides(args))
    except ValueError as e:
        raise ValueError(in_flag_terms(e, MODEL_FLAGS)) from None


def model_overrides(args: dict[str, Any]) -> dict[str, Any]:
    return {k: args[k] for k in MODEL_FLAGS if k in args}


def train_config(args: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of the flags in ``args`` (every other setting at its default)."""
    try:
        return TrainConfig(**{k: v for k, v in args.items() if k in TrainConfig.__dataclass_fields__})
    except ValueError as e:
        raise ValueError(in_flag_terms(e, tuple(TrainConfig.__dataclass_fields__))) from None


def flag(name: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def in_flag_terms(e: BaseException, names: Iterable[str] | Mapping[str, str]) -> str:
    """An error of the library about its parameters ``names`` (``batch_size must be at least 1``), as one
    line in the flags the user typed (``--batch-size must be at least 1``). ``names`` may map a phrase of the
    library to its flag where the two differ by more than ``_`` and ``-`` (``{"overwrite=True": "--overwrite"}``)."""
    flags = dict(names) if isinstance(names, Mapping) else {name: flag(name) for name in names}
    text = " ".join(str(e).split())
    for name in sorted(flags, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-])(?:[A-Z]\w*Config\.)?{re.escape(name)}(?![\w-])", flags[name], text)
    return text


# What the library's messages call the settings the tools take as flags. The library speaks Python (its
# errors name parameters); this is the one place where those names become flags.
LIBRARY_FLAGS = {"data_dir": "--data-dir", "mesh": "--mesh", "overwrite=True": "--overwrite", "cfg.n_heads": "--n-heads",
                 "wandb_project": "--wandb", "lr": "--lr", "grad_clip": "--grad-clip", "warmup_steps": "--warmup-steps",
                 "out_dir": "--out", "resume_run": "--resume", "batch_size": "--batch-size",
                 "grad_accum": "--grad-accum", "context_length": "--context-length", "train_ratio": "--train-ratio",
                 "hellaswag_every": "--hellaswag-every", "compile_cache=False": "--no-compile-cache",
                 "compile_cache": "--compile-cache", "remat": "--remat", "drop_rate": "--drop-rate",
                 "dump_hlo": "--dump-hlo", "RunSettings.tokenizer": "--tokenizer", "train_tokens": "--train-tokens",
                 "val_tokens": "--val-tokens",
                 **{f"PrepareConfig.{name}": flag(name) for name in ("out", "name", "text_field", "hf_dataset",
                                                                    "hf_config", "split", "workers", "shard_tokens",
                                                                    "val_tokens", "resume", "overwrite")}}


def error_line(e: BaseException) -> str:
    """How every tool prints an error: one line, the library's parameters named as the user's flags."""
    return in_flag_terms(e, LIBRARY_FLAGS)


def notices(caught: list[warnings.WarningMessage], category: type[Warning], *, show: bool) -> list:
    """The library's notices of ``category`` among the recorded warnings ``caught``, printed as one-line notes
    in the flags' terms when ``show``; every other warning is passed on as it was."""
    mine = [w for w in caught if issubclass(w.category, category)]
    for w in caught:
        if w not in mine:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif show:
            print(f"note: {error_line(w.message)}", file=sys.stderr)
    return mine


def fail(e: BaseException | str, code: int = 2) -> int:
    """Print ``e`` as the tool's one-line error (:func:`error_line`) and return the exit code: 2 for bad input."""
    print(f"error: {e if isinstance(e, str) else error_line(e)}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------
# Loading weights named on the command line


def add_weights_flag(p: argparse.ArgumentParser, what: str = "load") -> None:
    """``--weights`` (required) and :func:`add_n_heads_flag`, as the tools that take weights spell them."""
    p.add_argument("--weights", required=True, metavar="PATH", help=f"weights to {what}: run/checkpoint dir, .pth, "
                   ".safetensors, HF or OpenAI folder, or a Hugging Face model id (required)")
    add_n_heads_flag(p)


def add_n_heads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-heads", type=int, metavar="N", default=None,
                   help="the head count, for weights that do not record it (a .pth without its config file) "
                   "(default: from the weights' config, else GPT-2's 64-wide heads, with a notice)")


def is_hub_id_flag(weights: str) -> bool:
    """Whether the tools read ``weights`` as a Hugging Face Hub model id (from its cache, else downloaded)
    rather than a path: the question :func:`gptjax.weights.load_weights` asks, no such path and id-shaped."""
    from gptjax.weights.hub import is_hub_id

    return not Path(weights).exists() and is_hub_id(weights)


def weights_record(weights: str) -> str:
    """How a run records the weights it started from: a path made absolute (a resumed run finds it from any
    directory), a Hub model id as typed (resolved through the cache again)."""
    return weights if is_hub_id_flag(weights) else str(Path(weights).absolute())


def load_weights_flag(weights: str, n_heads: int | None, *, flag_name: str = "--weights") -> tuple[Params, GPTConfig]:
    """``load_weights(weights)`` for a CLI: a path or a Hub model id (:func:`is_hub_id_flag`), whose lookup
    errors are the loader's (they name the cache and HF_HUB_OFFLINE); a head count the weights do not hold
    comes from ``--n-heads`` (else the assumed one is printed as one notice), and a ``--n-heads`` that
    contradicts them is an error."""
    from gptjax.weights import load_weights
    from gptjax.weights.mapping import ARCH_FIELDS, AssumedHeadsWarning, UnknownHeadsError

    if not Path(weights).exists() and not is_hub_id_flag(weights):
        raise FileNotFoundError(f"{flag_name} {weights}: no such file or directory, nor a Hugging Face model id "
                                "(owner/name, or gpt2, gpt2-medium, gpt2-large, gpt2-xl)")
    if n_heads is not None and n_heads < 1:
        raise ValueError(f"--n-heads must be at least 1, got {n_heads}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AssumedHeadsWarning)
        try:
            params, cfg = load_weights(weights)
            unknown = None
        except UnknownHeadsError as e:
            if n_heads is None:
                raise
            unknown = {k: v for k, v in e.found.items() if k in ARCH_FIELDS and k != "n_heads"}
    assumed = notices(caught, AssumedHeadsWarning, show=n_heads is None)
    if n_heads is None:
        return params, cfg
    emb_dim = cfg.emb_dim if unknown is None else unknown["emb_dim"]
    if emb_dim % n_heads:
        raise ValueError(f"--n-heads {n_heads} does not divide the embedding size {emb_dim} of {flag_name} {weights}")
    if unknown is not None:  # nothing was assumed: read the file again, now with a whole config
        return load_weights(weights, cfg=GPTConfig(**unknown, n_heads=n_heads))
    if not assumed and n_heads != cfg.n_heads:
        raise ValueError(f"--n-heads {n_heads} does not match {flag_name} {weights}, whose config has "
                         f"{cfg.n_heads} heads; drop --n-heads")
    # The parameter shapes do not depend on the head count: only the config changes.
    return params, cfg.replace(n_heads=n_heads)


def model_text_flag(weights: str, cfg: Any, *, flag_name: str = "--weights") -> tuple[Any, Any]:
    """The tokenizer and chat format of the model ``weights`` names (:func:`gptjax.chat.model_text`)."""
    from gptjax.chat import model_text
    from gptjax.weights import tokenizer_folder

    try:
        return model_text(cfg, tokenizer_folder(weights))
    except ValueError as e:
        raise ValueError(f"{flag_name} {weights}: {e}") from None


# ---------------------------------------------------------------------------------------------
# jax's persistent compilation cache, on by default for the tools that compile


# The setting the compile-cache flags fill in (a folder, or False for --no-compile-cache): the same name in
# the Python API (gptjax.compile_cache.setup_compile_cache(compile_cache=...)). It changes no result, so a
# resumed run may give it.
COMPILE_CACHE_FLAGS = ("compile_cache",)


def add_compile_cache_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compilation cache")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--compile-cache", metavar="DIR", help="keep the compiled XLA programs in DIR, so later runs of the "
                   "same shapes skip compiling (default: $GPTJAX_COMPILE_CACHE, where 0, off, false or an empty value "
                   "turns the cache off; else jax's own JAX_COMPILATION_CACHE_DIR if set; else "
                   "$XDG_CACHE_HOME/gptjax/xla, or ~/.cache/gptjax/xla without it); this flag wins over both variables")
    x.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="compile everything afresh and keep nothing on disk, whatever GPTJAX_COMPILE_CACHE or "
                   "JAX_COMPILATION_CACHE_DIR say (default: the cache is on)")


def setup_compile_cache(args: argparse.Namespace | Mapping[str, Any]) -> str | None:
    """The compile-cache flags applied (:func:`gptjax.compile_cache.setup_compile_cache`), its notice printed
    in the flags' terms; returns the folder in use."""
    value = (args if isinstance(args, Mapping) else vars(args)).get("compile_cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", compile_cache.CompileCacheNote)
        folder = compile_cache.setup_compile_cache(value)
    notices(caught, compile_cache.CompileCacheNote, show=True)
    return folder


def command_shim(module_name: str, tool: str) -> None:
    """The body of ``gptjax/<tool>.py``, which keeps the documented ``python -m gptjax.<tool>`` working while
    the code lives in ``gptjax.cli.<tool>``. Imported rather than run, such a module would replace a
    same-named attribute of the package (``gptjax.generate``, the sampling function), so it refuses."""
    if module_name != "__main__":
        raise ImportError(f"gptjax.{tool} only runs as `python -m gptjax.{tool}`; import gptjax.cli.{tool} for "
                          "its code")
    import importlib

    sys.exit(importlib.import_module(f"gptjax.cli.{tool}").main())
