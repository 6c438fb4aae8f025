"""The book's loss plot: training and validation loss against epochs, with tokens seen on a second x-axis."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_losses(
    epochs_seen: Sequence[float],
    tokens_seen: Sequence[int],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    path: str | os.PathLike | None = None,
) -> Figure:
    """The book's ``plot_losses``; with ``path``, also written there as a PNG (atomically).

    Uses matplotlib's object API (no pyplot), so it renders with Agg whatever backend is active.
    """
    fig = Figure(figsize=(5, 3))
    ax1 = fig.add_subplot()
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # a second x-axis for tokens seen, aligned by plotting invisibly
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fig.savefig(tmp, format="png", dpi=150)
        os.replace(tmp, path)
    return fig


def plot_run(run_dir: str | os.PathLike) -> Path | None:
    """Draw RUN/loss.png from RUN/metrics.jsonl (its evaluation lines) and return its path (None: no evaluation yet)."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    steps_per_epoch = config["steps_per_epoch"]
    evals = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if "val_loss" in record:
                evals.append(record)
    if not evals:
        return None
    out = run_dir / "loss.png"
    plot_losses(
        [(r["step"] + 1) / steps_per_epoch for r in evals],
        [r["tokens_seen"] for r in evals],
        [r["train_loss"] for r in evals],
        [r["val_loss"] for r in evals],
        out,
    )
    return out
