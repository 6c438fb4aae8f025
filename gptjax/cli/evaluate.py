"""Training and validation loss of some weights on a text, as chapter 5 reports them.

    python -m gptjax.evaluate --weights PATH [--corpus FILE] [--context-length N]
    python -m gptjax.evaluate --weights PATH --hellaswag hellaswag_val.jsonl

The text (default: the bundled the-verdict.txt) is split 90/10 by characters; windows of the context
length (the model's, or --context-length) with stride = context length, batches of 2, every batch
averaged. For GPT-2 124M on the-verdict at --context-length 256 the book reports train 3.755, val 3.560.

With --hellaswag, HellaSwag is scored instead, as nanoGPT and llm.c score it (gptjax.hellaswag): acc by
each ending's summed loss, acc_norm by its mean loss per token. For OpenAI's GPT-2 124M on the full
validation set (10,042 examples) llm.c reports acc_norm 0.2955.

For a training run, the weights are its latest checkpoint, which is usually later than the run's last
evaluation in metrics.jsonl; the step evaluated is printed.
"""

from __future__ import annotations

import argparse
import sys

from gptjax import cli
from gptjax.data import DataSource, loaders_of_splits
from gptjax.training import calc_loss_loader, perplexity


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_weights_flag(parser)
    parser.add_argument("--corpus", default=None, metavar="TXT",
                        help="UTF-8 text file (default: the bundled the-verdict.txt)")
    parser.add_argument("--context-length", type=int, default=None, metavar="N",
                        help="window length, at most the model's (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=2, metavar="N", help="windows per batch (default: 2)")
    parser.add_argument("--train-ratio", type=float, default=0.9, metavar="X",
                        help="share of the text in the training split (default: 0.9)")
    parser.add_argument("--hellaswag", default=None, metavar="JSONL",
                        help="score HellaSwag examples (the dataset's hellaswag_val.jsonl) instead of the corpus "
                        "losses (default: none)")
    cli.add_compile_cache_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cli.setup_compile_cache(args)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        if not 0 < args.train_ratio < 1:
            raise ValueError(f"--train-ratio must be between 0 and 1 (exclusive), got {args.train_ratio}")
        if args.context_length is not None and args.context_length < 1:
            raise ValueError(f"--context-length must be at least 1, got {args.context_length}")
        if args.hellaswag is not None:
            return _hellaswag(args)
        splits = DataSource(corpus=args.corpus).splits(args.train_ratio)  # before the (slower) weights
        params, cfg = cli.load_weights_flag(args.weights, args.n_heads)
        context = args.context_length or cfg.context_length
        if context > cfg.context_length:
            raise ValueError(f"--context-length must be between 1 and the model's {cfg.context_length}, got {context}")
        tokenizer, _ = cli.model_text_flag(args.weights, cfg)
        loaders = loaders_of_splits(splits, context_length=context, batch_size=args.batch_size, shuffle=False,
                                    tokenizer=tokenizer)
        losses = {name: calc_loss_loader(params, cfg, loader) for name, loader in zip(("train", "val"), loaders)}
        step = _checkpoint_step(args.weights)
    except (ValueError, OSError) as e:
        return cli.fail(e)
    print(f"weights {args.weights}{step}: {cfg}, context {context}")
    for name, loss in losses.items():
        print(f"{name:5s} loss {loss:.3f}  perplexity {perplexity(loss):.6g}")
    return 0


def _hellaswag(args: argparse.Namespace) -> int:
    """--hellaswag: the examples are read before the (slower) weights, so a bad file fails first."""
    from gptjax import hellaswag
    from gptjax.tokenizer import get_tokenizer

    if args.corpus is not None:
        raise ValueError("--hellaswag scores its own examples: drop --corpus (or run once for each)")
    examples = hellaswag.load_examples(args.hellaswag)
    params, cfg = cli.load_weights_flag(args.weights, args.n_heads)
    tokenizer, _ = cli.model_text_flag(args.weights, cfg)
    if tokenizer is not get_tokenizer():  # the file is known to be good: now in the model's own tokens
        examples = hellaswag.load_examples(args.hellaswag, tokenizer)
    hellaswag.check_fits(examples, cfg, args.hellaswag)
    scores = hellaswag.score(params, cfg, examples, progress=True)
    print(f"weights {args.weights}{_checkpoint_step(args.weights)}: {cfg}")
    print(f"hellaswag {args.hellaswag}: {len(examples)} examples, acc {scores.acc:.4f}, "
          f"acc_norm {scores.acc_norm:.4f}")
    return 0


def _checkpoint_step(weights: str) -> str:
    """Which training step a gptjax run's or checkpoint's weights are from, for the report line."""
    from gptjax.checkpoint import checkpoint_step, is_gptjax_checkpoint

    if not is_gptjax_checkpoint(weights):
        return ""
    step = checkpoint_step(weights)
    return "" if step is None else f" (checkpoint at step {step})"


if __name__ == "__main__":
    sys.exit(main())
