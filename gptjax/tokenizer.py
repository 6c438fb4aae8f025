"""GPT-2 byte-pair encoding through tiktoken, built offline from the bundled ranks file."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k/gpt2 pre-tokenizer: the original GPT-2 pattern, rewritten with possessive quantifiers.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def asset_path(name: str) -> Path:
    """Path of a file bundled in ``gptjax/assets`` (the GPT-2 ranks, the-verdict.txt)."""
    return Path(str(resources.files("gptjax") / "assets" / name))


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The exact GPT-2 encoding (vocabulary 50,257), with no network access."""
    ranks = load_tiktoken_bpe(str(asset_path("gpt2.tiktoken")), expected_hash=GPT2_RANKS_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=50257,
    )


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding | None = None) -> jnp.ndarray:
    """int32 ids of shape [1, n], ``<|endoftext|>`` allowed, as the book's helper returns."""
    tokenizer = tokenizer or get_tokenizer()
    ids = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    return jnp.asarray(np.asarray(ids, dtype=np.int32)[None, :])


def token_ids_to_text(token_ids, tokenizer: tiktoken.Encoding | None = None) -> str:
    """Text for ids of shape [n] or [1, n]."""
    tokenizer = tokenizer or get_tokenizer()
    ids = np.asarray(token_ids)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"token_ids_to_text takes one sequence, got a batch of {ids.shape[0]}; decode rows one by one")
        ids = ids[0]
    return tokenizer.decode(ids.tolist())


def load_default_corpus() -> str:
    """The bundled default training text: Edith Wharton's "The Verdict", as in the book."""
    return asset_path("the-verdict.txt").read_text(encoding="utf-8")
