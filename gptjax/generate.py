"""Generate text from trained or pretrained weights (the book's gpt_generate.py).

    python -m gptjax.generate --weights PATH --prompt "Every effort moves you"
        [--max-new-tokens 25] [--temperature 1.0] [--top-k 50] [--top-p P] [--seed 123] [--eos]

PATH is anything gptjax.weights.load_weights reads (a training run or checkpoint directory, a
torch state_dict .pth, safetensors / Hugging Face folder, OpenAI GPT-2 folder); the model config
comes from the weights. Prints the prompt followed by its continuation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from gptjax.sampling import generate
from gptjax.tokenizer import ENDOFTEXT_ID, get_tokenizer, text_to_token_ids, token_ids_to_text
from gptjax.weights import load_weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", required=True, help="weights to load (run/checkpoint dir, .pth, ...)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=25)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy decoding (default 1.0)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = off")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--eos", action="store_true", help="stop at <|endoftext|>")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not Path(args.weights).exists():
            raise FileNotFoundError(f"--weights {args.weights}: no such file or directory")
        if not args.prompt:
            raise ValueError("--prompt is empty; give some text to continue")
        if args.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 turns top-k off), got {args.top_k}")
        params, cfg = load_weights(args.weights)
        tokenizer = get_tokenizer()
        if cfg.vocab_size < tokenizer.n_vocab:
            raise ValueError(
                f"the model's vocabulary ({cfg.vocab_size}) is smaller than the GPT-2 tokenizer's "
                f"({tokenizer.n_vocab}); these weights were not trained on GPT-2 tokens"
            )
        prompt_ids = text_to_token_ids(args.prompt, tokenizer)
        token_ids = generate(
            params,
            cfg,
            prompt_ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            eos_id=ENDOFTEXT_ID if args.eos else None,
            rng=jax.random.key(args.seed),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = token_ids[0]
    if args.eos and len(ids) > prompt_ids.shape[1] and ids[-1] == ENDOFTEXT_ID:
        ids = ids[:-1]  # generation stopped at <|endoftext|>: print the text before it
    print(token_ids_to_text(ids, tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
