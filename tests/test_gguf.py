"""GGUF export (gptjax.weights.gguf): read back with the gguf package's own reader, against llama.cpp's
GPT-2 layout. (llama.cpp itself decoding the export needs llama.cpp built, some 20 minutes: not in CI.)"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # the gguf extra; part of dev
tokenizers = pytest.importorskip("tokenizers")

from gptjax import init_params  # noqa: E402
from gptjax.config import GPTConfig  # noqa: E402
from gptjax.tokenizer import get_tokenizer, load_default_corpus  # noqa: E402
from gptjax.weights.gguf import save_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
# A padded vocabulary (GPT-2's 50,257 + 7), no QKV bias, an output head of its own: the book's 124M
# config in miniature, with the settings llama.cpp's converter never sees in a Hugging Face GPT-2.
CFG = GPTConfig(vocab_size=50264, context_length=16, emb_dim=64, n_layers=2, n_heads=4, qkv_bias=False)
CFG_BIAS = CFG.replace(vocab_size=50257, qkv_bias=True, n_layers=1)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=0)


@pytest.fixture(scope="module")
def written(params, tmp_path_factory):
    """One export per type, read back."""
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for gguf_type in ("f32", "f16", "q8_0"):
        path = folder / f"tiny-{gguf_type}.gguf"
        save_gguf(params, CFG, path, gguf_type=gguf_type)
        out[gguf_type] = gguf.GGUFReader(path)
    return out


def field(reader, key):
    assert key in reader.fields, f"no {key} in the GGUF file"
    return reader.fields[key].contents()


def expected_tensors(params, cfg) -> dict[str, np.ndarray]:
    """llama.cpp's gpt2 tensors in numpy order ([out, in] for matrices), stated here on their own."""
    p = {k: v for k, v in params.items()}
    f = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {
        "token_embd.weight": f(p["tok_emb"]["embedding"]),
        "position_embd.weight": f(p["pos_emb"]["embedding"]),
        "output_norm.weight": f(p["final_norm"]["scale"]),
        "output_norm.bias": f(p["final_norm"]["shift"]),
        "output.weight": f(p["out_head"]["kernel"]).T,
    }
    for i in range(cfg.n_layers):
        b = p["trf_blocks"][i]
        att = b["att"]
        qkv = np.concatenate([f(att[n]["kernel"]) for n in ("W_query", "W_key", "W_value")], axis=1)
        qkv_bias = (np.concatenate([f(att[n]["bias"]) for n in ("W_query", "W_key", "W_value")])
                    if cfg.qkv_bias else np.zeros(3 * cfg.emb_dim, np.float32))
        out |= {
            f"blk.{i}.attn_norm.weight": f(b["norm1"]["scale"]),
            f"blk.{i}.attn_norm.bias": f(b["norm1"]["shift"]),
            f"blk.{i}.attn_qkv.weight": qkv.T,
            f"blk.{i}.attn_qkv.bias": qkv_bias,
            f"blk.{i}.attn_output.weight": f(att["out_proj"]["kernel"]).T,
            f"blk.{i}.attn_output.bias": f(att["out_proj"]["bias"]),
            f"blk.{i}.ffn_norm.weight": f(b["norm2"]["scale"]),
            f"blk.{i}.ffn_norm.bias": f(b["norm2"]["shift"]),
            f"blk.{i}.ffn_up.weight": f(b["ff"]["layers"][0]["kernel"]).T,
            f"blk.{i}.ffn_up.bias": f(b["ff"]["layers"][0]["bias"]),
            f"blk.{i}.ffn_down.weight": f(b["ff"]["layers"][2]["kernel"]).T,
            f"blk.{i}.ffn_down.bias": f(b["ff"]["layers"][2]["bias"]),
        }
    return out


# What llama.cpp's converter keeps in float32 whatever the file type: vectors and the position embedding.
def stays_f32(name: str, value: np.ndarray) -> bool:
    return value.ndim == 1 or name == "position_embd.weight"


def test_llama_cpp_gpt2_metadata(written):
    for gguf_type, reader in written.items():
        assert field(reader, "general.architecture") == "gpt2"
        assert field(reader, "gpt2.context_length") == CFG.context_length
        assert field(reader, "gpt2.embedding_length") == CFG.emb_dim
        assert field(reader, "gpt2.feed_forward_length") == 4 * CFG.emb_dim
        assert field(reader, "gpt2.block_count") == CFG.n_layers
        assert field(reader, "gpt2.attention.head_count") == CFG.n_heads
        assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
        want_ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                      "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
        assert field(reader, "general.file_type") == want_ftype
        assert field(reader, "tokenizer.ggml.model") == "gpt2"
        assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
        assert field(reader, "tokenizer.ggml.bos_token_id") == 50256
        assert field(reader, "tokenizer.ggml.eos_token_id") == 50256
        assert field(reader, "tokenizer.ggml.add_bos_token") is False


def test_f32_tensors_equal_gptjax(written, params):
    reader = written["f32"]
    want = expected_tensors(params, CFG)
    got = {t.name: t for t in reader.tensors}
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        t = got[name]
        assert t.tensor_type == Q.F32, name
        assert tuple(int(n) for n in t.shape) == value.shape[::-1], name  # ggml lists ne0 (the row) first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(value.shape), value, err_msg=name)
    # Zero QKV bias (qkv_bias=False), which llama.cpp's gpt2 requires to be present.
    assert not np.asarray(got["blk.0.attn_qkv.bias"].data).any()
    assert len(reader.tensors) == 5 + 12 * CFG.n_layers


def quantized(reader, params, kind):
    """(name, tensor, gptjax value) of every matrix stored as ``kind``, after checking that the rest stayed
    float32 and equal."""
    got = {t.name: t for t in reader.tensors}
    for name, value in expected_tensors(params, CFG).items():
        t = got[name]
        if stays_f32(name, value):
            assert t.tensor_type == Q.F32, name
            np.testing.assert_array_equal(np.asarray(t.data).reshape(value.shape), value, err_msg=name)
            continue
        assert t.tensor_type == kind, name
        yield name, t, value


def test_f16_tensors_within_f16_rounding(written, params):
    for name, t, value in quantized(written["f16"], params, Q.F16):
        back = gguf.quants.dequantize(np.asarray(t.data), Q.F16).reshape(value.shape)
        # float16's round-to-nearest: half a unit in the last place, at most 2**-11 relative for normal
        # values, and half the subnormal spacing 2**-24 below them.
        assert np.all(np.abs(back - value) <= np.abs(value) * 2.0**-11 + 2.0**-25), name


def test_q8_0_tensors_within_block_error(written, params):
    n_q8 = 0
    for name, t, value in quantized(written["q8_0"], params, Q.Q8_0):
        assert tuple(int(n) for n in t.shape) == value.shape[::-1], name
        back = gguf.quants.dequantize(np.asarray(t.data), Q.Q8_0).reshape(value.shape)
        # Per 32-value block: scale d = max|x| / 127 and x ~ q * d, stored as float16 d16. Rounding q costs
        # at most d / 2; the float16 scale adds up to |q| <= 127 times |d - d16|.
        blocks, err = value.reshape(-1, 32), (back - value).reshape(-1, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        d16 = d.astype(np.float16).astype(np.float32)
        assert np.all(np.abs(err) <= d / 2 + 127 * np.abs(d - d16) + 1e-7), name
        assert np.abs(err).max() > 0, name  # really quantized, not stored exactly
        n_q8 += 1
    assert n_q8 == 2 + 4 * CFG.n_layers  # token_embd, output and each block's four matrices


def test_qkv_bias_fused_in_order(tmp_path):
    params = init_params(CFG_BIAS, seed=1)
    path = tmp_path / "bias.gguf"
    save_gguf(params, CFG_BIAS, path)
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    att = params["trf_blocks"][0]["att"]
    for j, proj in enumerate(("W_query", "W_key", "W_value")):
        rows = slice(j * CFG_BIAS.emb_dim, (j + 1) * CFG_BIAS.emb_dim)
        np.testing.assert_array_equal(got["blk.0.attn_qkv.bias"][rows], np.asarray(att[proj]["bias"]))
        np.testing.assert_array_equal(got["blk.0.attn_qkv.weight"].reshape(-1, CFG_BIAS.emb_dim)[rows],
                                      np.asarray(att[proj]["kernel"]).T)


def test_tokenizer_tokens_and_merges_reencode_like_tiktoken(written):
    reader = written["f32"]
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(tokens) == len(types) == CFG.vocab_size  # llama.cpp takes n_vocab from the token list
    assert tokens[50256] == "<|endoftext|>" and types[50256] == gguf.TokenType.CONTROL
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, CFG.vocab_size)]
    assert set(types[50257:]) == {gguf.TokenType.UNUSED}
    assert set(types[:50256]) == {gguf.TokenType.NORMAL}
    assert len(merges) == 50000 and len(set(tokens[:50257])) == 50257

    # An independent byte-level BPE (Hugging Face tokenizers) built from the file's tokens and merges
    # must tokenize text exactly as gptjax's tiktoken encoding does.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(tokens[:50256])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = "\n\n".join(load_default_corpus().split("\n\n")[:4])
    text += " Unicode too: naïve café — 北京 🙂, numbers 12345 and   spaces."
    want = get_tokenizer().encode(text)
    got = bpe.encode(text).ids
    assert len(want) > 400
    assert got == want
    assert bpe.decode(got) == text


def test_refuses_existing_file_without_overwrite(params, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not mine to replace")
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        save_gguf(params, CFG, path)
    assert path.read_bytes() == b"not mine to replace"
    save_gguf(params, CFG, path, gguf_type="q8_0", overwrite=True)
    assert field(gguf.GGUFReader(path), "general.architecture") == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left


def test_bad_requests_fail_before_writing(params, tmp_path):
    path = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match="unknown GGUF type 'q4_0'; choose one of f32, f16, q8_0"):
        save_gguf(params, CFG, path, gguf_type="q4_0")
    small = CFG.replace(vocab_size=1000)
    with pytest.raises(ValueError, match=r"vocabulary \(1000\) is smaller than the GPT-2 tokenizer's \(50257\)"):
        save_gguf(init_params(small.replace(n_layers=1), seed=0), small.replace(n_layers=1), path)
    assert list(tmp_path.iterdir()) == []


def test_convert_cli_writes_gguf_by_suffix(tmp_path):
    """``python -m gptjax.convert SRC model.gguf --gguf-type q8_0`` writes the GGUF writer's file; the flag
    without a GGUF destination, and a .gguf source, are one-line errors."""
    from gptjax.cli import convert
    from gptjax.weights import load_weights, save_weights

    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=64, n_layers=1, n_heads=2, drop_rate=0.0)
    src = tmp_path / "tiny"
    save_weights(init_params(cfg, seed=1), cfg, src)
    dst = tmp_path / "tiny.gguf"
    assert convert.main([str(src), str(dst), "--gguf-type", "q8_0"]) == 0
    reader = gguf.GGUFReader(dst)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert convert.main([str(src), str(tmp_path / "x.pth"), "--gguf-type", "f16"]) == 2
    assert not (tmp_path / "x.pth").exists()
    with pytest.raises(ValueError, match="does not read them"):
        load_weights(dst)
