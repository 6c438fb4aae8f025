"""GGUF export in llama.cpp's own GPT-2 layout, so a gptjax model runs in llama.cpp, ollama or LM Studio.

The file is what llama.cpp's ``convert_hf_to_gguf.py`` writes for a Hugging Face GPT-2 (architecture
``gpt2``): its tensor names (``token_embd``, ``position_embd``, ``blk.N.attn_qkv`` with query, key and value
fused, ...), its hyperparameter keys, and the tokenizer as GPT-2's byte-level BPE: the 50,257 tokens as
byte-level unicode strings, the merges rebuilt from the bundled tiktoken ranks, ``<|endoftext|>`` (50256) as
BOS and EOS, pre-tokenizer ``gpt-2``. Written with the ``gguf`` package (``pip install 'gptjax[gguf]'``).

Types (``gguf_type``), as llama.cpp's converter assigns them: ``f32`` stores everything in float32;
``f16`` and ``q8_0`` store the matrices (embedding, QKV, attention output, MLP, output head) in that type
and keep the biases, LayerNorms and the position embedding float32, which llama.cpp expects.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.atomic import atomic_file, check_overwrite
from gptjax.config import GPTConfig
from gptjax.model import Params
from gptjax.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, get_tokenizer
from gptjax.weights.mapping import Row, tensors_from_params, zero_qkv_biases

GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_SUFFIX = ".gguf"
GPT2_VOCAB = ENDOFTEXT_ID + 1
# GPT-2's LayerNorm epsilon, which gptjax's LayerNorm uses too.
LAYER_NORM_EPS = 1e-5


def save_gguf(
    params: Params, cfg: GPTConfig, path: str | os.PathLike, *, gguf_type: str = "f32", overwrite: bool = False
) -> None:
    """Write ``params`` as one GGUF file at ``path`` (atomically; an existing file needs ``overwrite``).

    ``params`` must hold the shapes ``cfg`` implies (``gptjax.weights.save_weights`` checks that first).
    The vocabulary must cover the GPT-2 tokenizer's 50,257 ids; rows past them (a padded vocabulary)
    become unused ``[PADn]`` tokens, as llama.cpp's converter writes them.
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if cfg.vocab_size < GPT2_VOCAB:
        raise ValueError(
            f"the model's vocabulary ({cfg.vocab_size}) is smaller than the GPT-2 tokenizer's ({GPT2_VOCAB}), "
            "which the GGUF file carries; only models trained on GPT-2 tokens can be exported to GGUF"
        )
    check_overwrite(path, overwrite)
    gguf = _import_gguf()
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[gguf_type]
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(path).stem)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(4 * cfg.emb_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, cfg.vocab_size, gguf)
    for name, value in to_tensors(params, cfg, gguf).items():
        data, data_type = _encode(name, value, qtype, gguf)
        writer.add_tensor(name, data, raw_dtype=data_type)

    with atomic_file(path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ValueError("writing GGUF files needs the gguf package: pip install 'gptjax[gguf]'") from None
    return gguf


def gguf_table(cfg: GPTConfig, gguf: Any) -> list[Row]:
    """llama.cpp's gpt2 tensor name -> gptjax tree path.

    ggml stores a matrix as torch does, [out, in] in numpy order, and flax kernels are [in, out]: every
    kernel is transposed, as llama.cpp's converter transposes Hugging Face GPT-2's Conv1D weights. The
    output head is always its own tensor: gptjax's out_head is a separate parameter, even where it was
    trained tied."""
    T = gguf.MODEL_TENSOR

    def name(tensor: Any, kind: str, i: int | None = None) -> str:
        return f"{gguf.TENSOR_NAMES[tensor].format(bid=i)}.{kind}"

    table = [Row(name(T.TOKEN_EMBD, "weight"), ("tok_emb", "embedding")),
             Row(name(T.POS_EMBD, "weight"), ("pos_emb", "embedding"))]
    for i in range(cfg.n_layers):
        b = ("trf_blocks", i)
        for j, proj in enumerate(("W_query", "W_key", "W_value")):
            table.append(Row(name(T.ATTN_QKV, "weight", i), (*b, "att", proj, "kernel"), transpose=True, part=(j, 3)))
            if cfg.qkv_bias:
                table.append(Row(name(T.ATTN_QKV, "bias", i), (*b, "att", proj, "bias"), part=(j, 3)))
        for tensor, path in ((T.ATTN_NORM, ("norm1",)), (T.FFN_NORM, ("norm2",))):
            table += [Row(name(tensor, "weight", i), (*b, *path, "scale")),
                      Row(name(tensor, "bias", i), (*b, *path, "shift"))]
        for tensor, path in ((T.ATTN_OUT, ("att", "out_proj")), (T.FFN_UP, ("ff", "layers", 0)),
                             (T.FFN_DOWN, ("ff", "layers", 2))):
            table += [Row(name(tensor, "weight", i), (*b, *path, "kernel"), transpose=True),
                      Row(name(tensor, "bias", i), (*b, *path, "bias"))]
    table += [Row(name(T.OUTPUT_NORM, "weight"), ("final_norm", "scale")),
              Row(name(T.OUTPUT_NORM, "bias"), ("final_norm", "shift")),
              Row(name(T.OUTPUT, "weight"), ("out_head", "kernel"), transpose=True)]
    return table


def to_tensors(params: Params, cfg: GPTConfig, gguf: Any) -> dict[str, np.ndarray]:
    """The tensors of llama.cpp's gpt2 architecture as float32 numpy, in its order (it requires the fused
    query/key/value bias: a model built without qkv_bias gets zeros, the same model)."""
    bias = lambda i: f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_QKV].format(bid=i)}.bias"  # noqa: E731
    tensors = {**tensors_from_params(gguf_table(cfg, gguf), params), **zero_qkv_biases(cfg, bias)}
    order = {row.key: n for n, row in enumerate(gguf_table(cfg.replace(qkv_bias=True), gguf))}
    return dict(sorted(tensors.items(), key=lambda item: order[item[0]]))


def _encode(name: str, value: np.ndarray, qtype: Any, gguf: Any) -> tuple[np.ndarray, Any]:
    """(data, ggml type) for one tensor, keeping in float32 what llama.cpp's converter keeps there: vectors
    (biases, LayerNorms) and the position embedding. A matrix whose rows are not a whole number of q8_0
    blocks (32 values) falls back to f16, again as the converter does."""
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    if value.ndim == 1 or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD]):
        qtype = F32
    try:
        return gguf.quants.quantize(value, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(value, F16), F16


def _add_tokenizer(writer: Any, vocab_size: int, gguf: Any) -> None:
    tokens, merges = gpt2_tokens_and_merges()
    types = [gguf.TokenType.NORMAL] * ENDOFTEXT_ID + [gguf.TokenType.CONTROL]
    pad = range(GPT2_VOCAB, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in pad])
    writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(pad))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ENDOFTEXT_ID)
    writer.add_eos_token_id(ENDOFTEXT_ID)
    writer.add_unk_token_id(ENDOFTEXT_ID)
    # gptjax feeds the prompt's tokens as they are; llama.cpp must not put a BOS before them either.
    writer.add_add_bos_token(False)


@functools.lru_cache(maxsize=1)
def gpt2_tokens_and_merges() -> tuple[list[str], list[str]]:
    """GPT-2's vocabulary as llama.cpp (and Hugging Face's vocab.json / merges.txt) spell it: every token as
    its byte-level unicode string, ``<|endoftext|>`` last, and the merges in rank order as ``"left right"``.

    tiktoken keeps only the ranks; the merge that made the token of rank r is found by running BPE on its
    bytes with the merges of rank < r, which must end in exactly two parts."""
    from gguf.vocab import bytes_to_unicode

    tokenizer = get_tokenizer()
    byte_encoder = bytes_to_unicode()
    pieces = [tokenizer.decode_single_token_bytes(i) for i in range(ENDOFTEXT_ID)]
    ranks = {piece: rank for rank, piece in enumerate(pieces)}

    def spell(piece: bytes) -> str:
        return "".join(byte_encoder[b] for b in piece)

    merges = []
    for rank, piece in enumerate(pieces):
        if len(piece) == 1:
            continue
        parts = _bpe(piece, ranks, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"the GPT-2 ranks give no single merge for token {rank} ({piece!r}): {parts}")
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    return [spell(piece) for piece in pieces] + [ENDOFTEXT], merges


def _bpe(piece: bytes, ranks: dict[bytes, int], *, max_rank: int) -> list[bytes]:
    """``piece`` split by byte-pair encoding that uses only the merges ranked below ``max_rank``."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        found = [(ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(found)
        if rank >= max_rank:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


__all__ = ["GGUF_SUFFIX", "GGUF_TYPES", "gguf_table", "gpt2_tokens_and_merges", "save_gguf", "to_tensors"]
