"""Generate text from trained or pretrained weights (the book's gpt_generate.py).

    python -m gptjax.generate --weights PATH --prompt "Every effort moves you"
        [--max-new-tokens 25] [--temperature 1.0] [--top-k 50] [--top-p P] [--seed 123] [--eos] [--n-heads N]
        [--weights-dtype {float32,bfloat16,int8}]

PATH is anything gptjax.weights.load_weights reads (a training run or checkpoint directory, a
torch state_dict .pth, safetensors / Hugging Face folder, OpenAI GPT-2 folder), or a Hugging Face
model id (gpt2-xl, owner/name: the Hugging Face cache's copy, else a download); the model config
comes from the weights. Prints the prompt followed by its continuation.
"""

from __future__ import annotations

import argparse
import sys

import jax

from gptjax import cli
from gptjax.quantize import WEIGHTS_DTYPES
from gptjax.sampling import generate
from gptjax.tokenizer import text_to_token_ids, token_ids_to_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_weights_flag(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue (required)")
    parser.add_argument("--max-new-tokens", type=int, default=25, metavar="N", help="tokens to add (default: 25)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="X",
                        help="softmax temperature, 0 = greedy decoding (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=50, metavar="K",
                        help="sample among the K most likely tokens, 0 = off (default: 50)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="nucleus sampling: the most likely tokens that make up P of the probability, in (0, 1] "
                        "(default: off)")
    parser.add_argument("--seed", type=int, default=123, metavar="N", help="sampling seed (default: 123)")
    parser.add_argument("--eos", action="store_true", help="stop at the model's end of text (GPT-2: <|endoftext|>; Llama 3 and Qwen3: "
                        "the ids their generation_config.json lists) (default: off)")
    parser.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="float32",
                        help="store the matmul weights as bfloat16, or int8 with per-channel scales, for decoding; "
                        "activations and logits stay float32 (default: float32)")
    cli.add_compile_cache_flags(parser)
    return parser


def check_sampling_flags(args: argparse.Namespace, vocab_size: int | None) -> None:
    """The sampling settings, in the flags' words: before any weights load (``vocab_size`` None), then against
    the model's vocabulary."""
    if not args.prompt:
        raise ValueError("--prompt is empty; give some text to continue")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be at least 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be at least 0 (0 is greedy), got {args.temperature}")
    if not 0 <= args.top_k <= (vocab_size or args.top_k):
        size = "the model's vocabulary size" + (f" {vocab_size}" if vocab_size else "")
        raise ValueError(f"--top-k must be between 0 (off) and {size}, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cli.setup_compile_cache(args)
        check_sampling_flags(args, None)
        params, cfg = cli.load_weights_flag(args.weights, args.n_heads)
        tokenizer, chat = cli.model_text_flag(args.weights, cfg)
        check_sampling_flags(args, cfg.vocab_size)
        if cfg.vocab_size < tokenizer.n_vocab:
            raise ValueError(
                f"the model's vocabulary ({cfg.vocab_size}) is smaller than its tokenizer's ({tokenizer.n_vocab}); "
                "these weights were not trained with this tokenizer"
            )
        prompt_ids = text_to_token_ids(args.prompt, tokenizer)
        if prompt_ids.shape[1] > cfg.context_length:
            print(f"note: the prompt is {prompt_ids.shape[1]} tokens, longer than the model's context of "
                  f"{cfg.context_length}: the model sees only its last {cfg.context_length} (as in the book)",
                  file=sys.stderr)
        token_ids = generate(
            params,
            cfg,
            prompt_ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            eos_id=chat.stop_ids if args.eos else None,
            rng=jax.random.key(args.seed),
            weights_dtype=args.weights_dtype,
        )
    except (ValueError, FileNotFoundError) as e:
        return cli.fail(e)
    ids = token_ids[0]
    if args.eos and len(ids) > prompt_ids.shape[1] and ids[-1] in chat.stop_ids:
        ids = ids[:-1]  # generation stopped at the end of text: print the text before it
    print(token_ids_to_text(ids, tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
