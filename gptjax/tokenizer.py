"""Tokenizers: GPT-2's byte-pair encoding through tiktoken, built offline from the bundled ranks file, and a
model folder's own (Llama 3's ``tokenizer.model`` through tiktoken, Qwen3's ``tokenizer.json`` through Hugging
Face tokenizers), each used through tiktoken's method names so the rest of gptjax takes any of them."""

from __future__ import annotations

import functools
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

if TYPE_CHECKING:
    import tokenizers

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


# Meta's pre-tokenizer for Llama 3's tiktoken ranks (its tokenizer.py; the book's Llama3Tokenizer uses it too).
LLAMA3_PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3.2's 256 special tokens after its 128,000 ranks, named as Meta's tokenizer.py and transformers'
# converter name them (the names its tokenizer.json carries), for a tokenizer.model with no
# tokenizer_config.json beside it (which lists the folder's own names and wins).
LLAMA3_N_SPECIALS = 256
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                   "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                   "<|eot_id|>", "<|python_tag|>")
LLAMA3_SPECIALS += tuple(f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_N_SPECIALS - len(LLAMA3_SPECIALS)))

Encoding = tiktoken.Encoding  # or HFEncoding: what load_tokenizer returns
# A model folder's tokenizer and chat files (what load_tokenizer and gptjax.chat read; a run directory keeps copies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja")


class HFEncoding:
    """A Hugging Face ``tokenizer.json`` byte-level BPE (Qwen3's, Llama 3's, GPT-2's) behind the tiktoken
    method names gptjax calls. ``encode`` matches special tokens only where ``allowed_special`` names them (as
    tiktoken does; transformers matches all of them, which is ``allowed_special="all"``)."""

    def __init__(self, tok: tokenizers.Tokenizer, name: str):
        self._tok, self.name = tok, name
        # Special tokens' text in ordinary text stays text; encode() splits on the allowed ones itself.
        tok.encode_special_tokens = True
        added = tok.get_added_tokens_decoder()
        self._special = {t.content: i for i, t in added.items() if t.special}
        self.n_vocab = tok.get_vocab_size(with_added_tokens=True)
        self._bytes = [b""] * self.n_vocab
        byte_of = _byte_of_char()
        for token, i in tok.get_vocab(with_added_tokens=False).items():
            self._bytes[i] = bytes(byte_of[c] for c in token)
        for i, t in added.items():
            self._bytes[i] = t.content.encode()

    @property
    def special_tokens_set(self) -> set[str]:
        return set(self._special)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, *, allowed_special: set[str] | str = frozenset()) -> list[int]:
        allowed = self._special if allowed_special == "all" else {
            t: self._special[t] for t in allowed_special if t in self._special}
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        pieces = re.split("(" + "|".join(map(re.escape, sorted(allowed, key=len, reverse=True))) + ")", text)
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(allowed[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self._bytes[token]

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self._bytes[i] for i in ids)


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: printable Latin-1 bytes stand for themselves, the others for
    code points from 256 up. ``tokenizers`` applies it but does not expose the table, which decoding to bytes
    (UTF-8 held back while streaming) needs."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def load_tokenizer(folder: str | os.PathLike) -> Encoding | HFEncoding:
    """A model folder's tokenizer: Llama 3's tiktoken ``tokenizer.model`` (at the top or in ``original/``, as
    Meta publishes it) through tiktoken, else ``tokenizer.json`` through Hugging Face tokenizers."""
    folder = Path(folder)
    ranks_file = next((f for f in (folder / "tokenizer.model", folder / "original" / "tokenizer.model")
                       if f.is_file() and _is_tiktoken_ranks(f)), None)
    if ranks_file is not None:
        ranks = load_tiktoken_bpe(str(ranks_file))
        specials = _added_tokens(folder) or {name: len(ranks) + k for k, name in enumerate(LLAMA3_SPECIALS)}
        return tiktoken.Encoding(name=folder.name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks,
                                 special_tokens={t: i for t, i in specials.items() if i >= len(ranks)})
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder} has no tokenizer.json or Llama 3 tokenizer.model; copy the model's tokenizer "
                         "files from where its weights came from")
    decoder = (json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise ValueError(f"{folder / 'tokenizer.json'} is not a byte-level BPE tokenizer (its decoder is {decoder!r}); "
                         "gptjax reads GPT-2's, Llama 3's and Qwen3's")
    from tokenizers import Tokenizer

    return HFEncoding(Tokenizer.from_file(str(folder / "tokenizer.json")), folder.name)


def _is_tiktoken_ranks(path: Path) -> bool:
    """Llama 3's tokenizer.model is tiktoken's text format (base64 token, rank); Llama 2's is SentencePiece's."""
    with open(path, "rb") as f:
        first = f.readline().split()
    return len(first) == 2 and first[1].isdigit()


def _added_tokens(folder: Path) -> dict[str, int]:
    """The special tokens tokenizer_config.json lists (``added_tokens_decoder``), or none."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    return {t["content"]: int(i) for i, t in added.items()}
