"""Convert model weights between formats.

    python -m gptjax.convert SRC DST [--format gptjax|torch|hf|openai]

SRC is anything gptjax.weights.load_weights reads (a gptjax run or checkpoint directory, a torch
.pth/.pt, a .safetensors file or Hugging Face folder, an OpenAI GPT-2 folder). DST is written in
--format (default: torch for a .pth/.pt name, else gptjax); nothing is left there if it fails.
"""

from __future__ import annotations

import argparse
import sys

from gptjax.weights import FORMATS, load_weights, save_weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="weights to read (format detected)")
    parser.add_argument("dst", help="where to write them")
    parser.add_argument("--format", choices=FORMATS, default=None, help="output format (default: from DST's name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params, cfg = load_weights(args.src)
        save_weights(params, cfg, args.dst, format=args.format)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({args.format or 'format from its name'}): {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
