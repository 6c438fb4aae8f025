"""Training and validation loss of some weights on a text, as chapter 5 reports them.

    python -m gptjax.evaluate --weights PATH [--corpus FILE] [--context-length N]

The text (default: the bundled the-verdict.txt) is split 90/10 by characters; windows of the context
length (the model's, or --context-length) with stride = context length, batches of 2, every batch
averaged. For GPT-2 124M on the-verdict at --context-length 256 the book reports train 3.755, val 3.560.
"""

from __future__ import annotations

import argparse
import sys

from gptjax.data import create_dataloader, read_corpus, split_text
from gptjax.tokenizer import load_default_corpus
from gptjax.training import calc_loss_loader, perplexity
from gptjax.weights import load_weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", required=True, help="weights to load (run/checkpoint dir, .pth, HF, OpenAI)")
    parser.add_argument("--corpus", default=None, help="UTF-8 text file (default: the bundled the-verdict.txt)")
    parser.add_argument("--context-length", type=int, default=None, help="window length (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--train-ratio", type=float, default=0.9)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = read_corpus(args.corpus) if args.corpus else load_default_corpus()
        train_text, val_text = split_text(text, args.train_ratio)
        params, cfg = load_weights(args.weights)
        context = args.context_length or cfg.context_length
        if not 0 < context <= cfg.context_length:
            raise ValueError(f"--context-length must be between 1 and the model's {cfg.context_length}, got {context}")
        losses = {}
        for name, part, drop_last in (("train", train_text, True), ("val", val_text, False)):
            try:
                loader = create_dataloader(part, batch_size=args.batch_size, max_length=context, stride=context,
                                           shuffle=False, drop_last=drop_last)
            except ValueError as e:
                raise ValueError(f"{name} split: {e}; use a longer --corpus or a smaller --context-length") from None
            if len(loader) == 0:
                raise ValueError(f"the {name} split gives no full batch of {args.batch_size} windows of {context} "
                                 "tokens; use a longer --corpus or a smaller --context-length")
            losses[name] = calc_loss_loader(params, cfg, loader)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"weights {args.weights}: {cfg}, context {context}")
    for name, loss in losses.items():
        print(f"{name:5s} loss {loss:.3f}  perplexity {perplexity(loss):.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
