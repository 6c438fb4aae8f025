"""Tokenizer files of the families, built the published way (no downloads here): a Qwen3-style byte-level BPE
``tokenizer.json`` (NFC, Qwen's split pattern, its special and added tokens) trained on the-verdict with
Qwen3-0.6B's chat template, and a Llama 3-style tiktoken ``original/tokenizer.model`` (GPT-2's first ranks,
Llama 3's special tokens after them). The chat templates are the published ones (tests/data: Qwen3-0.6B's and
Llama 3.2 Instruct's, as llama.cpp's repository keeps them)."""

import json
from pathlib import Path

from gptjax.tokenizer import asset_path

DATA = Path(__file__).parent / "data"
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_RANKS = 1000


def write_qwen_tokenizer(folder: Path, vocab_size: int = 600) -> int:
    """Qwen3-style tokenizer files in ``folder``; returns the tokenizer's size (``vocab_size`` + 5 added)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([asset_path("the-verdict.txt").read_text()], trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.add_tokens(["<think>", "</think>"])  # added but not special, as in Qwen3's tokenizer.json
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": (DATA / "qwen3-0.6b.jinja").read_text()}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|im_end|>"),
                                                                                tok.token_to_id("<|endoftext|>")]}))
    return tok.get_vocab_size()


def write_llama_tiktoken(folder: Path) -> None:
    """Meta's layout: tiktoken ranks in original/tokenizer.model; no tokenizer_config.json, so the special
    tokens are Llama 3's, numbered after the ranks."""
    (folder / "original").mkdir(parents=True, exist_ok=True)
    lines = asset_path("gpt2.tiktoken").read_text().splitlines()[:LLAMA_RANKS]
    (folder / "original" / "tokenizer.model").write_text("\n".join(lines) + "\n")


def write_llama_tokenizer_json(tiktoken_folder: Path, folder: Path) -> None:
    """The tokenizer files of ``tiktoken_folder``'s ranks as Meta's Hugging Face folders hold them, written by
    transformers: its TikTokenConverter's tokenizer.json (every split of a token listed as a merge) with the
    special tokens gptjax reads beside the ranks, the post-processor Meta's tokenizer.json has (a BOS before
    every text), and tokenizer_config.json / chat_template.jinja with Llama 3.2 Instruct's EOS and template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from gptjax.tokenizer import load_tokenizer

    encoding = load_tokenizer(tiktoken_folder)
    specials = sorted(encoding.special_tokens_set, key=encoding.encode_single_token)
    backend = TikTokenConverter(str(tiktoken_folder / "original" / "tokenizer.model"),
                                extra_special_tokens=specials).converted()
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, encoding.encode_single_token(bos))])])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|eot_id|>",
                            chat_template=(DATA / "llama-3.2-instruct.jinja").read_text()).save_pretrained(folder)
