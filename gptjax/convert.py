"""Convert model weights between formats.

    python -m gptjax.convert SRC DST [--format gptjax|torch|hf|openai] [--overwrite] [--n-heads N]

SRC is anything gptjax.weights.load_weights reads (a gptjax run or checkpoint directory, a torch
.pth/.pt, a .safetensors file or Hugging Face folder, an OpenAI GPT-2 folder). DST is written in
--format (default: torch for a .pth/.pt name, else gptjax); nothing is left there if it fails. An
existing DST needs --overwrite, which replaces only the files the format writes (the weights and their
config): a tokenizer or anything else in a DST folder stays.
"""

from __future__ import annotations

import argparse
import sys

from gptjax import cli
from gptjax.atomic import check_overwrite
from gptjax.weights import FORMATS, save_weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="weights to read (format detected)")
    parser.add_argument("dst", help="where to write them")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="output format (default: torch for a .pth/.pt DST, else gptjax)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the weights and config at an existing DST, keeping its other files "
                        "(default: off, an existing DST is refused)")
    cli.add_n_heads_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_overwrite(args.dst, args.overwrite)  # before reading SRC, which can take a while
        params, cfg = cli.load_weights_flag(args.src, args.n_heads, flag_name="SRC")
        save_weights(params, cfg, args.dst, format=args.format, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({args.format or 'format from its name'}): {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
