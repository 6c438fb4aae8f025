"""GGUF export in llama.cpp's own layouts, so a gptjax model runs in llama.cpp, ollama or LM Studio.

Each file is what llama.cpp's ``convert_hf_to_gguf.py`` writes for the same model from a Hugging Face folder:
its architecture, hyperparameter keys and tensor names, and the tokenizer as byte-level BPE (tokenizer model
``gpt2``). Written with the ``gguf`` package (``pip install 'gptjax[gguf]'``).

- GPT-2 (architecture ``gpt2``): ``token_embd``, ``position_embd``, ``blk.N.attn_qkv`` with query, key and
  value fused, ...; the tokenizer is gptjax's bundled GPT-2 BPE: the 50,257 tokens as byte-level unicode
  strings, the merges rebuilt from the tiktoken ranks, ``<|endoftext|>`` (50256) as BOS and EOS, pre-tokenizer
  ``gpt-2``.
- Qwen3 (``qwen3``) and Llama 3 (``llama``): ``blk.N.attn_q`` / ``attn_k`` / ``attn_v`` / ``attn_output``,
  ``ffn_gate`` / ``ffn_up`` / ``ffn_down``, Qwen3's ``attn_q_norm`` / ``attn_k_norm``, Llama 3's RoPE scaling
  as the ``rope_freqs`` tensor; no ``output`` tensor for a tied head (llama.cpp reuses ``token_embd``). The
  tokenizer comes from the model's folder (``tokenizer=``: its ``tokenizer.json``, or for a Llama 3 folder as
  Meta publishes it the tiktoken ``tokenizer.model``, its merges rebuilt as GPT-2's are; the special tokens
  and chat template of ``tokenizer_config.json``), with pre-tokenizer ``qwen2`` or ``llama-bpe``.

Types (``gguf_type``), as llama.cpp's converter assigns them: ``f32`` stores everything in float32;
``f16`` and ``q8_0`` store the matrices (embeddings, attention and MLP projections, output head) in that type
and keep the vectors (biases, norms, ``rope_freqs``) and GPT-2's position embedding float32, which llama.cpp
expects.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.atomic import atomic_file, check_overwrite
from gptjax.config import GPTConfig
from gptjax.model import Params
from gptjax.presets import ModelConfig, family_of
from gptjax.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, LLAMA3_SPECIALS, Encoding, get_tokenizer, load_tokenizer
from gptjax.weights.files import one_line
from gptjax.weights.mapping import Row, tensors_from_params, zero_qkv_biases

GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_SUFFIX = ".gguf"
GPT2_VOCAB = ENDOFTEXT_ID + 1
# GPT-2's LayerNorm epsilon, which gptjax's LayerNorm uses too.
LAYER_NORM_EPS = 1e-5
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the chat template
MODEL_CONFIG = "config.json"  # transformers' model config, beside the tokenizer in a model folder


@dataclass(frozen=True)
class Layout:
    """How llama.cpp's converter writes one of gptjax's GQA families.

    ``arch``: the ``gguf.MODEL_ARCH`` member. ``pre``: llama.cpp's name for the family's pre-tokenizer (its
    converter finds it by hashing the tokenizer's output; these are the names it finds for the published
    Qwen3 and Llama 3 tokenizers). ``interleaved_rope``: llama.cpp's ``llama`` architecture rotates adjacent
    pairs of a head's dimensions (RoPE type "norm"), while gptjax, like Hugging Face, rotates dimension i with
    i + head_dim / 2; the converter reorders the query and key rows of each head to match, and so does
    this export. ``qwen3`` rotates the halves as gptjax does (RoPE type "neox"): no reordering."""

    arch: str
    pre: str
    interleaved_rope: bool


LAYOUTS = {"qwen3": Layout("QWEN3", pre="qwen2", interleaved_rope=False),
           "llama3": Layout("LLAMA", pre="llama-bpe", interleaved_rope=True)}


def save_gguf(
    params: Params, cfg: ModelConfig, path: str | os.PathLike, *, gguf_type: str = "f32",
    tokenizer: str | os.PathLike | None = None, overwrite: bool = False,
) -> None:
    """Write ``params`` as one GGUF file at ``path`` (atomically; an existing file needs ``overwrite``).

    ``params`` must hold the shapes ``cfg`` implies (``gptjax.weights.save_weights`` checks that first).
    GPT-2: the vocabulary must cover the GPT-2 tokenizer's 50,257 ids; ``tokenizer`` is not taken (the file
    carries gptjax's bundled GPT-2 tokenizer). Qwen3 and Llama 3: ``tokenizer`` is the folder with the model's
    ``tokenizer.json`` (its Hugging Face folder) or, for Llama 3, Meta's tiktoken ``tokenizer.model``
    (:func:`read_hf_vocab`). Either way, rows past the tokenizer's ids (a padded vocabulary) become unused
    ``[PADn]`` tokens, as llama.cpp's converter writes them.
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    family = family_of(cfg)
    if family == "gpt2":
        if tokenizer is not None:
            raise ValueError("tokenizer applies to Qwen3 and Llama 3 models; a GPT-2 GGUF carries gptjax's bundled "
                             "GPT-2 tokenizer: drop it")
        if cfg.vocab_size < GPT2_VOCAB:
            raise ValueError(
                f"the model's vocabulary ({cfg.vocab_size}) is smaller than the GPT-2 tokenizer's ({GPT2_VOCAB}), "
                "which the GGUF file carries; only models trained on GPT-2 tokens can be exported to GGUF"
            )
    elif tokenizer is None:
        raise ValueError(f"a {type(cfg).__name__} model's GGUF file carries its tokenizer: pass tokenizer=, the "
                         f"folder with the model's {TOKENIZER_JSON} (its Hugging Face folder) or Llama 3's "
                         "tokenizer.model")
    check_overwrite(path, overwrite)
    gguf = _import_gguf()
    vocab = None if tokenizer is None else read_hf_vocab(tokenizer, cfg.vocab_size, gguf)
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

    arch = gguf.MODEL_ARCH.GPT2 if family == "gpt2" else gguf.MODEL_ARCH[LAYOUTS[family].arch]
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(path).stem)
    if family == "gpt2":
        _add_gpt2_hparams(writer, cfg)
    else:
        _add_gqa_hparams(writer, cfg)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if family == "gpt2":
        _add_gpt2_tokenizer(writer, cfg.vocab_size, gguf)
        tensors = to_tensors(params, cfg, gguf)
    else:
        vocab.add_to(writer, LAYOUTS[family].pre)
        tensors = gqa_tensors(params, cfg, gguf)
    for name, value in tensors.items():
        data, data_type = _encode(name, value, qtype, gguf)
        writer.add_tensor(name, data, raw_dtype=data_type)

    with atomic_file(path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def _add_gpt2_hparams(writer: Any, cfg: GPTConfig) -> None:
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(4 * cfg.emb_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)


def _add_gqa_hparams(writer: Any, cfg: ModelConfig) -> None:
    """The keys llama.cpp reads for ``llama`` and ``qwen3``. The head size is written (``key_length``,
    ``value_length``, ``rope.dimension_count``) because llama.cpp otherwise takes emb_dim / n_heads, which
    Qwen3 0.6B's 128-wide heads are not. Llama 3's RoPE scaling is no key but the ``rope_freqs`` tensor."""
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_groups)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)


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


def gqa_table(cfg: ModelConfig, gguf: Any) -> list[Row]:
    """llama.cpp's ``llama`` / ``qwen3`` tensor name -> gptjax tree path, for :mod:`gptjax.gqa`'s models.

    Kernels are transposed to ggml's [out, in], as the converter stores Hugging Face's Linear weights. fc1,
    fc2 and fc3 are SwiGLU's gate, up and down projections. A tied head has no ``output`` tensor: llama.cpp
    then uses ``token_embd`` for it, the same matrix."""
    T = gguf.MODEL_TENSOR

    def name(tensor: Any, i: int | None = None) -> str:
        return f"{gguf.TENSOR_NAMES[tensor].format(bid=i)}.weight"

    table = [Row(name(T.TOKEN_EMBD), ("tok_emb", "embedding"))]
    for i in range(cfg.n_layers):
        b = ("trf_blocks", i)
        table.append(Row(name(T.ATTN_NORM, i), (*b, "norm1", "scale")))
        for tensor, proj in ((T.ATTN_Q, "W_query"), (T.ATTN_K, "W_key"), (T.ATTN_V, "W_value"),
                             (T.ATTN_OUT, "out_proj")):
            table.append(Row(name(tensor, i), (*b, "att", proj, "kernel"), transpose=True))
        if cfg.qk_norm:
            table += [Row(name(T.ATTN_Q_NORM, i), (*b, "att", "q_norm", "scale")),
                      Row(name(T.ATTN_K_NORM, i), (*b, "att", "k_norm", "scale"))]
        table.append(Row(name(T.FFN_NORM, i), (*b, "norm2", "scale")))
        for tensor, fc in ((T.FFN_GATE, "fc1"), (T.FFN_UP, "fc2"), (T.FFN_DOWN, "fc3")):
            table.append(Row(name(tensor, i), (*b, "ff", fc, "kernel"), transpose=True))
    table.append(Row(name(T.OUTPUT_NORM), ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        table.append(Row(name(T.OUTPUT), ("out_head", "kernel"), transpose=True))
    return table


def gqa_tensors(params: Params, cfg: ModelConfig, gguf: Any) -> dict[str, np.ndarray]:
    """The tensors of llama.cpp's architecture for ``cfg``'s family, as float32 numpy: Llama 3's query and key
    rows reordered for llama.cpp's RoPE (:class:`Layout`), and its ``rope_freqs`` first, where the converter
    puts them."""
    tensors = tensors_from_params(gqa_table(cfg, gguf), params)
    if LAYOUTS[family_of(cfg)].interleaved_rope:
        T = gguf.MODEL_TENSOR
        for i in range(cfg.n_layers):
            for tensor, n_heads in ((T.ATTN_Q, cfg.n_heads), (T.ATTN_K, cfg.n_kv_groups)):
                key = f"{gguf.TENSOR_NAMES[tensor].format(bid=i)}.weight"
                tensors[key] = interleave_rope_rows(tensors[key], n_heads)
    if cfg.rope_freq is None:
        return tensors
    return {f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight": llama3_rope_factors(cfg), **tensors}


def interleave_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """``weight`` [n_heads * head_dim, in] with each head's rows 0, d/2, 1, d/2 + 1, ...: the pair that
    split-halves RoPE rotates together (i, i + d/2) becomes adjacent rows (2i, 2i + 1), the pair llama.cpp's
    ``llama`` architecture rotates, by the same angle. Queries and keys reordered alike give the same dot
    products, so attention is unchanged."""
    head_dim = weight.shape[0] // n_heads
    return np.ascontiguousarray(weight.reshape(n_heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(weight.shape))


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama 3's RoPE scaling: per frequency, what it divides the unscaled
    frequency by (1 for wavelengths under the original context / high_freq_factor, ``factor`` over the original
    context / low_freq_factor, a smooth blend between), which gives the frequencies :mod:`gptjax.gqa`
    computes."""
    f = cfg.rope_freq
    inv_freq = 1.0 / cfg.rope_base ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (f.original_context_length / wavelen - f.low_freq_factor) / (f.high_freq_factor - f.low_freq_factor)
    blended = 1 / ((1 - smooth) / f.factor + smooth)
    factors = np.where(wavelen < f.original_context_length / f.high_freq_factor, 1.0,
                       np.where(wavelen > f.original_context_length / f.low_freq_factor, f.factor, blended))
    return factors.astype(np.float32)


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


def _add_gpt2_tokenizer(writer: Any, vocab_size: int, gguf: Any) -> None:
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


@dataclass(frozen=True)
class HFVocab:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model holds it: ``tokens`` and their
    ``types`` for every id of the model's vocabulary, ``merges`` as ``"left right"``, the special tokens' ids
    (``bos``, ``eos``, ``unk``, ``pad``), whether a BOS starts every encoded text, and the chat template."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    chat_template: str | list | None

    def add_to(self, writer: Any, pre: str) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def read_hf_vocab(folder: str | os.PathLike, vocab_size: int, gguf: Any) -> HFVocab:
    """``folder``'s tokenizer for a model of ``vocab_size`` rows, as llama.cpp's converter reads it: its
    ``tokenizer.json`` or, where there is none, Llama 3's tiktoken ``tokenizer.model`` (at the top or in
    ``original/``, as Meta publishes it, read by :func:`gptjax.tokenizer.load_tokenizer`); with
    ``tokenizer_config.json`` and ``config.json`` when there.

    Token types: ``added_tokens`` marked special, or spelt ``<|...|>``, and tokenizer.model's special tokens
    are control tokens; other added tokens (Qwen3's ``<think>``) user-defined; ids no token has, unused
    ``[PADn]``. Special tokens: by name from tokenizer_config.json (``bos_token``, ...), else by id from
    config.json (Qwen3 names no BOS but its config.json gives one), else for a tokenizer.model Llama 3's
    ``<|begin_of_text|>`` and ``<|end_of_text|>``. A BOS is added where tokenizer_config.json says
    ``add_bos_token``, else where the tokenizer puts it before every text: tokenizer.json's post-processor
    template (Llama 3's does), and Meta's tokenizer.model always."""
    folder = Path(folder)
    if (folder / TOKENIZER_JSON).is_file():
        pieces, merges, first = _read_tokenizer_json(folder, gguf)
        fallback = {}
    else:
        pieces, merges = _read_tiktoken_model(folder, load_tokenizer(folder), gguf)
        first, fallback = LLAMA3_SPECIALS[0], {"bos": LLAMA3_SPECIALS[0], "eos": LLAMA3_SPECIALS[1]}
    if max(pieces) >= vocab_size:
        raise ValueError(f"tokenizer {folder} has ids up to {max(pieces)}, past the model's vocabulary "
                         f"({vocab_size} rows); give the model's own tokenizer folder")
    tokens, types = zip(*(pieces.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)))
    config = _read_json(folder / TOKENIZER_CONFIG)
    special = _special_ids(folder, config, tokens, fallback)
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = "bos" in special and tokens[special["bos"]] == first
    template = config.get("chat_template")
    if template is None and (folder / CHAT_TEMPLATE_FILE).is_file():
        template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return HFVocab(list(tokens), list(types), merges, special, add_bos, template)


Pieces = dict[int, tuple[str, int]]  # id -> (token as llama.cpp spells it, gguf.TokenType)


def _read_tokenizer_json(folder: Path, gguf: Any) -> tuple[Pieces, list[str], str | None]:
    """``folder``'s tokenizer.json: its tokens, merges, and the special token its post-processor puts first."""
    spec = _read_json(folder / TOKENIZER_JSON)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"tokenizer {folder / TOKENIZER_JSON} is not a byte-level BPE tokenizer, the kind GGUF "
                         "export writes (Qwen3's, Llama 3's); give the model's own tokenizer folder")
    T = gguf.TokenType
    pieces = {i: (token, T.NORMAL) for token, i in model["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        text = added["content"]
        control = added.get("special") or (text.startswith("<|") and text.endswith("|>"))
        pieces[added["id"]] = (text, T.CONTROL if control else T.USER_DEFINED)
    # Byte-level BPE spells a space as "Ġ", so no part of a merge holds one: "left right" is unambiguous.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return pieces, merges, _template_first(spec.get("post_processor"))


def _read_tiktoken_model(folder: Path, encoding: Encoding, gguf: Any) -> tuple[Pieces, list[str]]:
    """Llama 3's tiktoken ranks as byte-level tokens with their merges (:func:`_byte_level_bpe`), then its
    special tokens at their ids as control tokens.

    One merge per token, where transformers' converter lists every split of a token into two tokens: tiktoken's
    BPE never joins any other split. No part ever crosses the edges of the span the two parts cover, so they
    formed there as they form in that token's bytes alone, whose BPE ends on its own split; llama.cpp, given
    only these merges, so tokenizes as tiktoken does."""
    specials = {encoding.encode_single_token(token): token for token in encoding.special_tokens_set}
    ranks = [encoding.decode_single_token_bytes(i) for i in range(min(specials, default=encoding.n_vocab))]
    tokens, merges = _byte_level_bpe(ranks, f"tokenizer {folder}")
    T = gguf.TokenType
    return {**dict(enumerate((token, T.NORMAL) for token in tokens)),
            **{i: (token, T.CONTROL) for i, token in specials.items()}}, merges


def _special_ids(folder: Path, config: dict, tokens: tuple[str, ...], fallback: dict[str, str]) -> dict[str, int]:
    """The special tokens' ids: named in tokenizer_config.json (``config``), else given by id in config.json,
    else named in ``fallback``."""
    ids = {token: i for i, token in enumerate(tokens)}
    special = {}
    for kind in ("bos", "eos", "unk", "pad"):
        entry = config.get(f"{kind}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        if text in ids:
            special[kind] = ids[text]
    model_config = _read_json(folder / MODEL_CONFIG)
    for kind in ("bos", "eos"):
        token_id = model_config.get(f"{kind}_token_id")
        if kind not in special and isinstance(token_id, int) and 0 <= token_id < len(tokens):
            special[kind] = token_id
    for kind, text in fallback.items():
        if kind not in special and text in ids:
            special[kind] = ids[text]
    return special


def _template_first(post_processor: dict | None) -> str | None:
    """The special token the tokenizer's TemplateProcessing (alone or in a Sequence) puts before every text."""
    processors = (post_processor or {}).get("processors", [post_processor or {}])
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            single = processor.get("single") or [{}]
            return (single[0].get("SpecialToken") or {}).get("id")
    return None


def _read_json(path: Path) -> dict:
    """``path``'s JSON object; ``{}`` where there is no such file."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {one_line(e)}") from None


@functools.lru_cache(maxsize=1)
def gpt2_tokens_and_merges() -> tuple[list[str], list[str]]:
    """GPT-2's vocabulary as llama.cpp (and Hugging Face's vocab.json / merges.txt) spell it: every token as
    its byte-level unicode string, ``<|endoftext|>`` last, and the merges in rank order as ``"left right"``."""
    tokenizer = get_tokenizer()
    ranks = [tokenizer.decode_single_token_bytes(i) for i in range(ENDOFTEXT_ID)]
    tokens, merges = _byte_level_bpe(ranks, "gptjax's GPT-2 tokenizer")
    return tokens + [ENDOFTEXT], merges


def _byte_level_bpe(ranks: list[bytes], source: str) -> tuple[list[str], list[str]]:
    """tiktoken's ranks (``ranks[r]``: the bytes of the token of rank r) as byte-level BPE: every token as its
    byte-level unicode string, and the merges in rank order as ``"left right"``.

    tiktoken keeps only the ranks; the merge that made the token of rank r is found by running BPE on its
    bytes with the merges of rank < r, which must end in exactly two parts."""
    from gguf.vocab import bytes_to_unicode

    byte_encoder = bytes_to_unicode()
    rank_of = {piece: rank for rank, piece in enumerate(ranks)}

    def spell(piece: bytes) -> str:
        return "".join(byte_encoder[b] for b in piece)

    merges = []
    for rank, piece in enumerate(ranks):
        if len(piece) == 1:
            continue
        parts = _bpe(piece, rank_of, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"{source}: its ranks give no single merge for token {rank} ({piece!r}): {parts}, "
                             "which GGUF's merge list needs; give a folder with the model's tokenizer.json")
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    return [spell(piece) for piece in ranks], merges


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


__all__ = ["GGUF_SUFFIX", "GGUF_TYPES", "LAYOUTS", "HFVocab", "gguf_table", "gpt2_tokens_and_merges", "gqa_table",
           "gqa_tensors", "interleave_rope_rows", "llama3_rope_factors", "read_hf_vocab", "save_gguf", "to_tensors"]
