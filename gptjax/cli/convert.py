"""Convert model weights between formats.

    python -m gptjax.convert SRC DST [--format gptjax|torch|safetensors|hf|openai|gguf] [--names NAMES]
                             [--gguf-type f32|f16|q8_0] [--tokenizer FOLDER] [--overwrite] [--n-heads N]

SRC is anything gptjax.weights.load_weights reads (a gptjax run or checkpoint directory, a torch
.pth/.pt, a .safetensors file or Hugging Face folder, an OpenAI GPT-2 folder). DST is written in
--format (default: torch for a .pth/.pt name, safetensors for a .safetensors one, gguf for a .gguf one
(llama.cpp's layout of the model's family), else gptjax); a torch or safetensors file holds the book's tensor names and an
openai folder OpenAI's unless --names says otherwise (book, hf, openai or gptjax), with the config beside. Nothing is left at DST if it
fails. An existing DST needs --overwrite, which replaces only the files the format writes (the weights and
their config): a tokenizer or anything else in a DST folder stays. A Qwen3 or Llama 3 GGUF carries the
model's tokenizer.json: --tokenizer's, else the one beside SRC (its Hugging Face folder, a run's tokenizer/).
"""

from __future__ import annotations

import argparse
import sys

from gptjax import cli
from gptjax.atomic import check_overwrite
from gptjax.config import GPTConfig
from gptjax.weights import FORMATS, save_weights, tokenizer_folder
from gptjax.weights.gguf import GGUF_SUFFIX, GGUF_TYPES, TOKENIZER_JSON
from gptjax.weights.writers import NAMED_FORMATS, NAMES, default_format


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="weights to read (format detected)")
    parser.add_argument("dst", help="where to write them")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="output format (default: torch for a .pth/.pt DST, safetensors for a .safetensors one, "
                        "gguf for a .gguf one, else gptjax)")
    parser.add_argument("--names", choices=tuple(NAMES), default=None,
                        help="tensor names in a torch, safetensors or openai DST: the book's GPTModel, Hugging Face's "
                        "GPT-2, OpenAI's release or gptjax's tree (default: book for a file, openai for the folder)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                        help="tensor type of a GGUF DST: f16 / q8_0 store the matrices so, norms, biases and the "
                        "position embedding stay f32, as llama.cpp's converter keeps them (default: f32)")
    parser.add_argument("--tokenizer", metavar="FOLDER", default=None,
                        help=f"the folder with the model's {TOKENIZER_JSON} (its Hugging Face folder), for the "
                        "tokenizer of a Qwen3 or Llama 3 GGUF DST (default: the tokenizer files beside SRC)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the weights and config at an existing DST, keeping its other files "
                        "(default: off, an existing DST is refused)")
    cli.add_n_heads_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_format = args.format or default_format(args.dst)
    if args.gguf_type is not None and out_format != "gguf":
        return cli.fail(f"--gguf-type applies to GGUF output; name DST *{GGUF_SUFFIX} or add --format gguf")
    if args.tokenizer is not None and out_format != "gguf":
        return cli.fail(f"--tokenizer applies to GGUF output; name DST *{GGUF_SUFFIX} or add --format gguf")
    if args.names is not None and out_format not in NAMED_FORMATS:
        return cli.fail(f"--names applies to the {', '.join(NAMED_FORMATS)} formats; {out_format} has its own "
                        "names (name DST *.pth or *.safetensors, or add --format)")
    options = {"gguf_type": args.gguf_type or "f32"} if out_format == "gguf" else {}
    if args.names is not None:
        options["names"] = args.names
    try:
        check_overwrite(args.dst, args.overwrite)  # before reading SRC, which can take a while
        params, cfg = cli.load_weights_flag(args.src, args.n_heads, flag_name="SRC")
        if out_format == "gguf" and isinstance(cfg, GPTConfig) and args.tokenizer is not None:
            return cli.fail("--tokenizer applies to Qwen3 and Llama 3 models; a GPT-2 GGUF carries gptjax's GPT-2 "
                            "tokenizer: drop --tokenizer")
        if out_format == "gguf" and not isinstance(cfg, GPTConfig):
            options["tokenizer"] = args.tokenizer or tokenizer_folder(args.src)
            if options["tokenizer"] is None:
                return cli.fail(f"SRC {args.src} has no tokenizer files beside it, and a {type(cfg).__name__} GGUF "
                                "carries the model's tokenizer: pass --tokenizer FOLDER (the model's Hugging Face "
                                "folder)")
        save_weights(params, cfg, args.dst, format=args.format, overwrite=args.overwrite, **options)
    except (ValueError, OSError) as e:
        return cli.fail(e)
    print(f"wrote {args.dst} ({out_format}{', ' + args.names + ' names' if args.names else ''}): {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
