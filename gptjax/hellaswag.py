"""HellaSwag scored as nanoGPT and llm.c score it (dev/data/hellaswag.py there).

Each example is a context and 4 endings; each ending, tokenized with a leading space, is appended to the
context and the model's cross-entropy is taken over the ending's tokens only. The prediction is the
ending of lowest summed loss (``acc``) or lowest mean loss per token (``acc_norm``, the figure llm.c and
nanoGPT report). Input: the dataset's own ``hellaswag_val.jsonl`` (``ctx``, ``endings``, ``label`` on each
line; other fields are ignored).

The rows are padded to a few bucket lengths and scored in fixed-shape batches, so the scoring compiles
once per bucket.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from gptjax.buckets import length_bucket
from gptjax.config import GPTConfig
from gptjax.model import Params, apply

N_ENDINGS = 4


@dataclass(frozen=True)
class Example:
    """One example as token ids: the context, the 4 endings (each with its leading space) and the label."""

    ctx: list[int]
    endings: list[list[int]]
    label: int


@dataclass(frozen=True)
class Scores:
    """Per-ending losses of every example: ``sum_losses`` and ``mean_losses`` [N, 4], and the labels [N]."""

    sum_losses: np.ndarray
    mean_losses: np.ndarray
    labels: np.ndarray

    @property
    def acc(self) -> float:
        return float(np.mean(self.sum_losses.argmin(1) == self.labels))

    @property
    def acc_norm(self) -> float:
        return float(np.mean(self.mean_losses.argmin(1) == self.labels))


def load_examples(path: str | Path, tokenizer: Any = None) -> list[Example]:
    """The examples of a ``hellaswag_val.jsonl``-format file, tokenized; a bad file raises a one-line
    ValueError naming the file and line."""
    if tokenizer is None:
        from gptjax.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HellaSwag file {path} not found; give the dataset's hellaswag_val.jsonl")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where} is not JSON ({e}); give a HellaSwag .jsonl file") from None
            if not isinstance(item, dict):
                raise ValueError(f"{where} is not a JSON object with ctx, endings and label")
            ctx, endings, label = item.get("ctx"), item.get("endings"), item.get("label")
            if not isinstance(ctx, str):
                raise ValueError(f"{where}: 'ctx' must be the context text, got {ctx!r}")
            if not (isinstance(endings, list) and len(endings) == N_ENDINGS and all(isinstance(e, str) for e in endings)):
                raise ValueError(f"{where}: 'endings' must be a list of {N_ENDINGS} texts, got {endings!r}")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
                raise ValueError(f"{where}: 'label' must be the index 0-3 of the right ending, got {label!r}")
            examples.append(Example(tokenizer.encode_ordinary(ctx),
                                    [tokenizer.encode_ordinary(" " + e) for e in endings], label))
    if not examples:
        raise ValueError(f"HellaSwag file {path} has no examples")
    return examples


def check_fits(examples: list[Example], cfg: GPTConfig, path: str | Path) -> None:
    """Each ending must fit the context window after at least one context token (longer contexts lose
    their start); raises a one-line ValueError otherwise."""
    for i, ex in enumerate(examples):
        longest = max(len(e) for e in ex.endings)
        if longest > cfg.context_length or not ex.ctx:
            raise ValueError(f"{path}: example {i + 1} has an ending of {longest} tokens"
                             f"{' and no context' if not ex.ctx else ''}, which does not fit a model with "
                             f"context length {cfg.context_length}")


def _rows(ex: Example, max_len: int) -> list[tuple[list[int], int]]:
    """(tokens, ending length) of the 4 rows; a context too long for ``max_len`` tokens loses its start."""
    rows = []
    for ending in ex.endings:
        ctx = ex.ctx[max(0, len(ex.ctx) + len(ending) - max_len):]
        rows.append((ctx + ending, len(ending)))
    return rows


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ending_losses(params: Params, cfg: GPTConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed loss over the masked (ending) targets of each row."""
    logits = apply(params, cfg, tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return (losses * mask[:, 1:]).sum(-1)


def score(params: Params, cfg: GPTConfig, examples: list[Example], *, batch_tokens: int = 8192,
          progress: bool = False) -> Scores:
    """Per-ending losses of ``examples`` under ``params`` (float32), in batches of about ``batch_tokens``
    tokens (a multiple of 4 rows: whole examples)."""
    max_len = cfg.context_length + 1  # the last token is only a target
    by_bucket: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        longest = max(len(t) for t, _ in _rows(ex, max_len))
        by_bucket.setdefault(length_bucket(longest, cap=max_len), []).append(i)
    sums = np.zeros((len(examples), N_ENDINGS), np.float64)
    counts = np.array([[len(e) for e in ex.endings] for ex in examples], np.float64)
    batches = []
    for length, indices in sorted(by_bucket.items()):
        per_batch = max(1, batch_tokens // (N_ENDINGS * length))
        batches += [(length, per_batch, indices[s:s + per_batch]) for s in range(0, len(indices), per_batch)]
    for length, per_batch, indices in tqdm(batches, desc="hellaswag", unit="batch", disable=not progress):
        # Always per_batch examples (padding rows have an empty mask): one compiled shape per bucket.
        tokens = np.zeros((per_batch * N_ENDINGS, length), np.int32)
        mask = np.zeros_like(tokens)
        for j, i in enumerate(indices):
            for k, (row, n_end) in enumerate(_rows(examples[i], max_len)):
                r = j * N_ENDINGS + k
                tokens[r, :len(row)] = row
                mask[r, len(row) - n_end:len(row)] = 1
        losses = np.asarray(_ending_losses(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
        sums[indices] = losses[:len(indices) * N_ENDINGS].reshape(len(indices), N_ENDINGS)
    return Scores(sums, sums / counts, np.array([ex.label for ex in examples]))
