"""Download OpenAI's GPT-2 weights (the book's gpt_download.py).

    python -m gptjax.download --model-size 124M --models-dir gpt2

writes the seven release files to gpt2/124M/. Broken transfers resume when run again; files already
complete are skipped. Then: python -m gptjax.generate --weights gpt2/124M --prompt "Every effort moves you"
"""

from __future__ import annotations

import argparse
import sys

from gptjax import cli
from gptjax.weights.hub import BASE_URLS, GPT2_SIZES, download_gpt2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.download", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-size", required=True, choices=GPT2_SIZES,
                        help="which GPT-2 (required, no default): " + ", ".join(GPT2_SIZES))
    parser.add_argument("--models-dir", default="gpt2", metavar="DIR",
                        help="parent folder: files go to DIR/SIZE/ (default: gpt2)")
    parser.add_argument(
        "--base-urls", nargs="+", default=list(BASE_URLS), metavar="URL",
        help="where to look, in order (default: OpenAI's location, then the book's mirror)",
    )
    parser.add_argument("--retries", type=int, default=3, metavar="N",
                        help="attempts per file and URL, each resuming the last (default: 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.retries < 1:
            raise ValueError(f"--retries must be at least 1, got {args.retries}")
        folder = download_gpt2(args.model_size, args.models_dir, base_urls=args.base_urls, retries=args.retries)
    except (ValueError, OSError) as e:
        return cli.fail(e)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
