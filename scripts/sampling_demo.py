"""Chapter 5's decoding-strategy figures for any next-token logits.

    python scripts/sampling_demo.py [--out temperature-scaling.png] [--temperatures 1 0.1 5]
    python scripts/sampling_demo.py --vocab "a b c" --logits 2.0 1.0 0.1

Plots the next-token distribution softmax(logits / T) for each temperature as grouped bars (the
book's temperature figure) and prints how often each token comes out of 1,000 draws per
temperature (the book's print_sampled_tokens). Defaults: the book's 9-word toy vocabulary and its
next_token_logits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gptjax.sampling import apply_temperature, sample_next  # noqa: E402

BOOK_VOCAB = "closer every effort forward inches moves pizza toward you"
BOOK_LOGITS = [4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79]


def sample_counts(logits: np.ndarray, temperature: float, num_samples: int, seed: int) -> np.ndarray:
    """How often each token is drawn in ``num_samples`` independent draws (vectorised over keys)."""
    keys = jax.random.split(jax.random.key(seed), num_samples)
    draws = jax.vmap(lambda key: sample_next(logits, key, temperature))(keys)
    return np.bincount(np.asarray(draws), minlength=len(logits))


def print_sampled_tokens(counts: np.ndarray, vocab: list[str]) -> None:
    for count, word in zip(counts, vocab):
        print(f"{count} x {word}")


def plot(vocab: list[str], probs: dict[float, np.ndarray], out: Path) -> None:
    x = np.arange(len(vocab))
    width = 0.8 / len(probs)
    fig, ax = plt.subplots(figsize=(5, 3))
    for i, (temperature, p) in enumerate(probs.items()):
        ax.bar(x + (i - (len(probs) - 1) / 2) * width, p, width, label=f"Temperature = {temperature:g}")
    ax.set_ylabel("Probability")
    ax.set_xticks(x)
    ax.set_xticklabels(vocab, rotation=90)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp-" + out.name)
    fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=150)
    plt.close(fig)
    os.replace(tmp, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default=BOOK_VOCAB, help="space-separated token names, one per logit")
    parser.add_argument("--logits", type=float, nargs="+", default=BOOK_LOGITS)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.1, 5.0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", type=Path, default=Path("temperature-scaling.png"))
    args = parser.parse_args(argv)

    vocab = args.vocab.split()
    logits = np.asarray(args.logits, np.float32)
    try:
        if len(vocab) != len(logits):
            raise ValueError(f"--vocab names {len(vocab)} tokens but --logits has {len(logits)} values; give one per token")
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        probs = {t: np.asarray(jax.nn.softmax(apply_temperature(logits, t))) for t in args.temperatures}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    for temperature in args.temperatures:
        print(f"\nTemperature {temperature:g}: {args.num_samples} samples")
        print_sampled_tokens(sample_counts(logits, temperature, args.num_samples, args.seed), vocab)
    plot(vocab, probs, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
