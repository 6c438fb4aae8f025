"""GGUF export of Qwen3 and Llama 3 (gptjax.weights.gguf), read back with the gguf package's own reader against
what llama.cpp's converter writes for the same Hugging Face folder: the ``qwen3`` and ``llama`` architectures'
keys and tensors, Llama's query and key rows reordered for llama.cpp's interleaved RoPE and its ``rope_freqs``,
and the tokenizer of the model's folder. (llama.cpp decoding the exports greedily like gptjax is
benchmarks/check_families_gguf.py: CI has no llama.cpp.)

Tiny random models; the tokenizers are small byte-level BPEs trained on the-verdict with the families' special
tokens, written as transformers writes a model folder's tokenizer files, and a Llama 3-style tiktoken
tokenizer.model (tests/family_files.py) against the tokenizer.json transformers converts it to."""

from __future__ import annotations

import json
import re
import shutil

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # the gguf extra; part of dev
tokenizers = pytest.importorskip("tokenizers")

from gptjax import init_params  # noqa: E402
from gptjax.config import GPTConfig  # noqa: E402
from gptjax.gqa import compute_rope_params  # noqa: E402
from gptjax.llama3 import Llama3Config  # noqa: E402
from gptjax.qwen3 import Qwen3Config  # noqa: E402
from gptjax.tokenizer import LLAMA3_N_SPECIALS, load_default_corpus, load_tokenizer  # noqa: E402
from gptjax.weights import save_weights  # noqa: E402
from gptjax.weights.gguf import save_gguf  # noqa: E402
from tests.family_files import DATA, LLAMA_RANKS, write_llama_tiktoken, write_llama_tokenizer_json  # noqa: E402

Q, TT = gguf.GGMLQuantizationType, gguf.TokenType
BPE_SIZE = 320  # the trained vocabulary: 256 bytes and 64 merges
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<think>", "</think>"]  # added but not special, as in Qwen3's tokenizer.json
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
LLAMA_PAD = 5  # the Llama model's vocabulary has rows past the tokenizer's ids


def tokenizer_files(folder, family: str) -> int:
    """Write a family-style tokenizer.json and tokenizer_config.json into ``folder``; the token count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([load_default_corpus()], trainer)
    if family == "qwen3":
        tok.add_special_tokens(QWEN_SPECIALS)
        tok.add_tokens(QWEN_ADDED)
        config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                  "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}
    else:
        tok.add_special_tokens(LLAMA_SPECIALS)
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                  "eos_token": {"content": "<|eot_id|>", "special": True}}
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # where transformers 5 saves it
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size(with_added_tokens=True)


def configs(n_tokens: dict[str, int]) -> dict:
    """Grouped-query attention, Qwen3's own head size and a tied head; Llama 3's RoPE scaling (wavelengths
    on both sides of its band), an output head of its own and a padded vocabulary."""
    return {
        "qwen3": Qwen3Config(vocab_size=n_tokens["qwen3"], context_length=64, emb_dim=64, n_heads=4, n_layers=2,
                             hidden_dim=96, head_dim=32, n_kv_groups=2, tie_embeddings=True),
        "llama3": Llama3Config(vocab_size=n_tokens["llama3"] + LLAMA_PAD, context_length=128, emb_dim=64, n_heads=4,
                               n_layers=2, hidden_dim=96, n_kv_groups=2, rope_original_context_length=64,
                               tie_embeddings=False),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (cfg, params, its Hugging Face folder with the tokenizer, {gguf_type: reader})."""
    out = {}
    folders = {family: tmp_path_factory.mktemp(family) for family in ("qwen3", "llama3")}
    n_tokens = {family: tokenizer_files(folder, family) for family, folder in folders.items()}
    for seed, (family, cfg) in enumerate(configs(n_tokens).items()):
        folder = folders[family]
        # Every value random (norm scales included), so a tensor read from the wrong parameter shows.
        leaves, tree = jax.tree.flatten(init_params(cfg, seed=seed))
        rng = np.random.default_rng(seed)
        params = jax.tree.unflatten(tree, [rng.standard_normal(x.shape).astype(np.float32) for x in leaves])
        save_weights(params, cfg, folder, format="hf", overwrite=True)  # beside the tokenizer files
        if family == "qwen3":  # the published Qwen3 config.json names the BOS its tokenizer_config.json does not
            config = json.loads((folder / "config.json").read_text())
            config["bos_token_id"] = n_tokens["qwen3"] - len(QWEN_SPECIALS + QWEN_ADDED)
            (folder / "config.json").write_text(json.dumps(config))
        readers = {}
        for gguf_type in ("f32", "f16", "q8_0"):
            path = folder.parent / f"{family}-{gguf_type}.gguf"
            save_gguf(params, cfg, path, gguf_type=gguf_type, tokenizer=folder)
            readers[gguf_type] = gguf.GGUFReader(path)
        out[family] = (cfg, params, folder, readers)
    return out


def field(reader, key):
    assert key in reader.fields, f"no {key} in the GGUF file"
    return reader.fields[key].contents()


def expected_tensors(params, cfg) -> dict[str, np.ndarray]:
    """llama.cpp's llama / qwen3 tensors in numpy order ([out, in]), the query and key rows as gptjax (and
    Hugging Face) order them, stated here on their own."""
    f = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {"token_embd.weight": f(params["tok_emb"]["embedding"]),
           "output_norm.weight": f(params["final_norm"]["scale"])}
    if not cfg.tie_embeddings:
        out["output.weight"] = f(params["out_head"]["kernel"]).T
    for i in range(cfg.n_layers):
        b = params["trf_blocks"][i]
        att, ff = b["att"], b["ff"]
        out |= {
            f"blk.{i}.attn_norm.weight": f(b["norm1"]["scale"]),
            f"blk.{i}.attn_q.weight": f(att["W_query"]["kernel"]).T,
            f"blk.{i}.attn_k.weight": f(att["W_key"]["kernel"]).T,
            f"blk.{i}.attn_v.weight": f(att["W_value"]["kernel"]).T,
            f"blk.{i}.attn_output.weight": f(att["out_proj"]["kernel"]).T,
            f"blk.{i}.ffn_norm.weight": f(b["norm2"]["scale"]),
            f"blk.{i}.ffn_gate.weight": f(ff["fc1"]["kernel"]).T,
            f"blk.{i}.ffn_up.weight": f(ff["fc2"]["kernel"]).T,
            f"blk.{i}.ffn_down.weight": f(ff["fc3"]["kernel"]).T,
        }
        if cfg.qk_norm:
            out[f"blk.{i}.attn_q_norm.weight"] = f(att["q_norm"]["scale"])
            out[f"blk.{i}.attn_k_norm.weight"] = f(att["k_norm"]["scale"])
    return out


def split_halves(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving: each head's rows 0, 2, 4, ... then 1, 3, 5, ..."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def read_tensors(reader, cfg, *, undo_interleave: bool) -> dict[str, np.ndarray]:
    """The file's float32 tensors in numpy order, Llama's query and key rows put back in gptjax's order."""
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists ne0 (the row) first
        value = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        if undo_interleave and ".attn_q." in t.name:
            value = split_halves(value, cfg.n_heads)
        elif undo_interleave and ".attn_k." in t.name:
            value = split_halves(value, cfg.n_kv_groups)
        out[t.name] = value
    return out


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_llama_cpp_hyperparameters(models, family):
    cfg, _, _, readers = models[family]
    arch = {"qwen3": "qwen3", "llama3": "llama"}[family]
    for gguf_type, reader in readers.items():
        want = {
            "general.architecture": arch,
            f"{arch}.vocab_size": cfg.vocab_size,
            f"{arch}.context_length": cfg.context_length,
            f"{arch}.embedding_length": cfg.emb_dim,
            f"{arch}.feed_forward_length": cfg.hidden_dim,
            f"{arch}.block_count": cfg.n_layers,
            f"{arch}.attention.head_count": cfg.n_heads,
            f"{arch}.attention.head_count_kv": cfg.n_kv_groups,
            f"{arch}.attention.key_length": cfg.head_dim,
            f"{arch}.attention.value_length": cfg.head_dim,
            f"{arch}.rope.dimension_count": cfg.head_dim,
            "general.file_type": {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type],
        }
        for key, value in want.items():
            assert field(reader, key) == value, (gguf_type, key)
        assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_base)
        assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
        # llama.cpp takes Llama 3's RoPE scaling from the rope_freqs tensor, as the converter writes it: no key.
        assert not any(".rope.scaling." in key for key in reader.fields)


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_f32_tensors_equal_gptjax(models, family):
    cfg, params, _, readers = models[family]
    want = expected_tensors(params, cfg)
    if family == "llama3":
        want["rope_freqs.weight"] = None  # checked on its own below
    reader = readers["f32"]
    assert sorted(t.name for t in reader.tensors) == sorted(want)
    assert {t.tensor_type for t in reader.tensors} == {Q.F32}
    got = read_tensors(reader, cfg, undo_interleave=family == "llama3")
    for name, value in want.items():
        if value is not None:
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert "output.weight" in got or cfg.tie_embeddings  # a tied head is token_embd, which llama.cpp reuses


def test_llama_rope_freqs_give_gptjax_frequencies(models):
    """llama.cpp divides each RoPE frequency by its rope_freqs factor; the result must be gptjax's Llama 3
    scaled frequencies (the angles at position 1)."""
    cfg, _, _, readers = models["llama3"]
    factors = read_tensors(readers["f32"], cfg, undo_interleave=False)["rope_freqs.weight"]
    half = cfg.head_dim // 2
    assert factors.shape == (half,)
    cos, sin = compute_rope_params(cfg.head_dim, cfg.rope_base, np.ones((1, 1)), cfg.rope_freq)
    gptjax_freqs = np.arctan2(np.asarray(sin)[0, 0, :half], np.asarray(cos)[0, 0, :half])
    plain = cfg.rope_base ** (-np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    np.testing.assert_allclose(plain / factors, gptjax_freqs, rtol=1e-5)
    # This config spans all three of Llama 3's bands: unscaled, blended and divided by the factor.
    assert factors[0] == 1 and factors[-1] == np.float32(cfg.rope_factor)
    assert np.any((factors > 1) & (factors < cfg.rope_factor))


def test_llama_interleaved_rope_on_the_export_is_gptjax_rope():
    """What the reordering is for: llama.cpp's RoPE (adjacent pairs) applied to the exported query rows gives
    gptjax's RoPE (split halves) of the original rows, in the exported order; so query-key products match."""
    from gptjax.gqa import apply_rope
    from gptjax.weights.gguf import interleave_rope_rows

    n_heads, head_dim, d_in, seq = 3, 8, 5, 6
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((d_in, n_heads * head_dim)).astype(np.float32)  # gptjax [in, out]
    x = rng.standard_normal((1, seq, d_in)).astype(np.float32)
    cos, sin = compute_rope_params(head_dim, 10_000.0, np.arange(seq)[None])
    ours = np.asarray(apply_rope((x @ kernel).reshape(1, seq, n_heads, head_dim), cos, sin))

    exported = interleave_rope_rows(np.ascontiguousarray(kernel.T), n_heads)  # ggml [out, in]
    q = (x @ exported.T).reshape(1, seq, n_heads, head_dim // 2, 2)
    angle = np.arange(seq)[:, None] * 10_000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    c, s = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    theirs = np.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], axis=-1)
    theirs = theirs.reshape(1, seq, n_heads, head_dim)
    # gptjax's dimension i then i + head_dim / 2 of each head, side by side: the exported order.
    in_export_order = ours.reshape(1, seq, n_heads, 2, head_dim // 2).swapaxes(-1, -2).reshape(theirs.shape)
    np.testing.assert_allclose(in_export_order, theirs, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_f16_and_q8_0_store_matrices_so(models, family):
    cfg, params, _, readers = models[family]
    want = expected_tensors(params, cfg)
    for gguf_type, kind in (("f16", Q.F16), ("q8_0", Q.Q8_0)):
        reader = readers[gguf_type]
        types = {t.name: t.tensor_type for t in reader.tensors}
        got = read_tensors(reader, cfg, undo_interleave=family == "llama3")
        for name, value in want.items():
            if value.ndim == 1:  # norms stay float32, exactly
                assert types[name] == Q.F32, name
                np.testing.assert_array_equal(got[name], value, err_msg=name)
                continue
            assert types[name] == kind, (gguf_type, name)
            err = np.abs(got[name] - value)
            if kind == Q.F16:
                assert np.all(err <= np.abs(value) * 2.0**-11 + 2.0**-25), name
            else:  # q8_0: at most half a step of max|block| / 127, and the float16 scale's rounding
                step = np.abs(value).reshape(-1, 32).max(axis=1, keepdims=True) / 127
                assert np.all(err.reshape(-1, 32) <= step * (0.5 + 127 * 2.0**-11) + 1e-7), name
        if family == "llama3":
            assert types["rope_freqs.weight"] == Q.F32


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_tokenizer_is_the_folders(models, family):
    from tokenizers import Tokenizer

    cfg, _, folder, readers = models[family]
    reader = readers["q8_0"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=True)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size  # llama.cpp takes n_vocab from the token list
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, cfg.vocab_size)]
    specials = QWEN_SPECIALS if family == "qwen3" else LLAMA_SPECIALS
    added = QWEN_ADDED if family == "qwen3" else []
    want_types = [TT.NORMAL] * BPE_SIZE + [TT.CONTROL] * len(specials) + [TT.USER_DEFINED] * len(added)
    assert types == want_types + [TT.UNUSED] * (cfg.vocab_size - n)
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert len(merges) == BPE_SIZE - 256
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    ids = {t: i for i, t in enumerate(tokens)}
    if family == "qwen3":
        assert field(reader, "tokenizer.ggml.pre") == "qwen2"
        assert field(reader, "tokenizer.ggml.bos_token_id") == ids["<|endoftext|>"]  # from config.json
        assert field(reader, "tokenizer.ggml.eos_token_id") == ids["<|im_end|>"]
        assert field(reader, "tokenizer.ggml.padding_token_id") == ids["<|endoftext|>"]
        assert field(reader, "tokenizer.ggml.add_bos_token") is False
    else:
        assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"
        assert field(reader, "tokenizer.ggml.bos_token_id") == ids["<|begin_of_text|>"]
        assert field(reader, "tokenizer.ggml.eos_token_id") == ids["<|eot_id|>"]
        assert field(reader, "tokenizer.ggml.add_bos_token") is True  # its post-processor adds the BOS


def test_bad_requests_fail_before_writing(models, tmp_path):
    cfg, params, folder, _ = models["qwen3"]
    path = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match=r"Qwen3Config model's GGUF file carries its tokenizer: pass tokenizer="):
        save_gguf(params, cfg, path)
    with pytest.raises(ValueError, match="has no tokenizer.json or Llama 3 tokenizer.model"):
        save_gguf(params, cfg, path, tokenizer=tmp_path)
    small = cfg.replace(vocab_size=cfg.vocab_size - 1)
    with pytest.raises(ValueError, match=rf"past the model's vocabulary \({small.vocab_size} rows\)"):
        save_gguf(init_params(small, seed=0), small, path, tokenizer=folder)
    gpt2 = GPTConfig(vocab_size=50257, context_length=8, emb_dim=32, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="tokenizer applies to Qwen3 and Llama 3 models"):
        save_gguf(init_params(gpt2, seed=0), gpt2, path, tokenizer=folder)
    assert list(tmp_path.iterdir()) == []


def test_convert_cli_takes_the_tokenizer_of_the_folder(models, tmp_path, capsys):
    """``python -m gptjax.convert HF_FOLDER model.gguf`` exports with the folder's own tokenizer; weights with
    none beside them need --tokenizer, and the error says so."""
    from gptjax.cli import convert

    cfg, params, folder, _ = models["llama3"]
    dst = tmp_path / "llama.gguf"
    assert convert.main([str(folder), str(dst), "--gguf-type", "f16"]) == 0
    reader = gguf.GGUFReader(dst)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "tokenizer.ggml.tokens") == field(models["llama3"][3]["f32"], "tokenizer.ggml.tokens")

    bare = tmp_path / "bare"
    save_weights(params, cfg, bare, format="hf")
    assert convert.main([str(bare), str(tmp_path / "bare.gguf")]) == 2
    assert "pass --tokenizer FOLDER" in capsys.readouterr().err
    assert convert.main([str(bare), str(tmp_path / "bare.gguf"), "--tokenizer", str(folder)]) == 0
    assert field(gguf.GGUFReader(tmp_path / "bare.gguf"), "tokenizer.ggml.pre") == "llama-bpe"
    assert convert.main([str(bare), str(tmp_path / "x.safetensors"), "--tokenizer", str(folder)]) == 2
    assert "--tokenizer applies to GGUF output" in capsys.readouterr().err


TIKTOKEN_LLAMA = Llama3Config(vocab_size=LLAMA_RANKS + LLAMA3_N_SPECIALS, context_length=32, emb_dim=32, n_heads=2,
                              n_layers=1, hidden_dim=48, n_kv_groups=1, rope_original_context_length=16)


@pytest.fixture(scope="module")
def tiktoken_exports(tmp_path_factory):
    """One tiny Llama exported twice: with a folder of Meta's tiktoken original/tokenizer.model alone, and with
    the tokenizer.json transformers converts the same ranks to; both folders hold the same tokenizer_config.json
    and chat_template.jinja. ({"tiktoken": reader, "json": reader}, the tiktoken folder, the json folder.)"""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llama-tiktoken")
    tiktoken_dir, json_dir = root / "tiktoken", root / "json"
    write_llama_tiktoken(tiktoken_dir)
    write_llama_tokenizer_json(tiktoken_dir, json_dir)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(json_dir / name, tiktoken_dir / name)
    assert not (tiktoken_dir / "tokenizer.json").exists()
    params = init_params(TIKTOKEN_LLAMA, seed=0)
    readers = {}
    for kind, folder in (("tiktoken", tiktoken_dir), ("json", json_dir)):
        save_weights(params, TIKTOKEN_LLAMA, root / f"{kind}.gguf", format="gguf", tokenizer=folder)
        readers[kind] = gguf.GGUFReader(root / f"{kind}.gguf")
    return readers, tiktoken_dir, json_dir


def tokenizer_fields(reader) -> list[str]:
    return sorted(key for key in reader.fields if key.startswith("tokenizer."))


def test_tiktoken_model_exports_as_its_tokenizer_json(tiktoken_exports):
    """Every tokenizer field equals the tokenizer.json export's but the merges: transformers' converter lists
    every split of a token into two tokens (1025 merges for these 744 tokens), the export the one split BPE of
    the token's bytes ends on, as llama.cpp's converter does for its own tiktoken models. Those are all
    tiktoken's BPE ever joins, so they tokenize as the tiktoken file does."""
    readers, tiktoken_dir, json_dir = tiktoken_exports
    ours, theirs = readers["tiktoken"], readers["json"]
    assert tokenizer_fields(ours) == tokenizer_fields(theirs)
    for key in tokenizer_fields(theirs):
        if key != "tokenizer.ggml.merges":
            assert field(ours, key) == field(theirs, key), key
    ids = {token: i for i, token in enumerate(field(ours, "tokenizer.ggml.tokens"))}
    assert len(ids) == TIKTOKEN_LLAMA.vocab_size and ids["<|begin_of_text|>"] == LLAMA_RANKS
    assert field(ours, "tokenizer.ggml.token_type") == [TT.NORMAL] * LLAMA_RANKS + [TT.CONTROL] * LLAMA3_N_SPECIALS
    assert field(ours, "tokenizer.ggml.model") == "gpt2" and field(ours, "tokenizer.ggml.pre") == "llama-bpe"
    assert field(ours, "tokenizer.ggml.bos_token_id") == ids["<|begin_of_text|>"]
    assert field(ours, "tokenizer.ggml.eos_token_id") == ids["<|eot_id|>"]  # tokenizer_config.json's
    assert field(ours, "tokenizer.ggml.add_bos_token") is True
    assert field(ours, "tokenizer.chat_template") == (DATA / "llama-3.2-instruct.jinja").read_text()

    merges, all_splits = field(ours, "tokenizer.ggml.merges"), field(theirs, "tokenizer.ggml.merges")
    n_bytes = sum(len(token) == 1 for token in field(ours, "tokenizer.ggml.tokens")[:LLAMA_RANKS])
    assert len(merges) == LLAMA_RANKS - n_bytes < len(all_splits)
    assert {m.replace(" ", "") for m in merges} == {m.replace(" ", "") for m in all_splits}  # the same tokens made
    later = iter(all_splits)
    assert all(m in later for m in merges)  # one of each token's splits, in the same order

    spec = json.loads((json_dir / "tokenizer.json").read_text())
    spec["model"]["merges"] = [m.split(" ") for m in merges]
    with_ours = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tiktoken = load_tokenizer(tiktoken_dir)
    for text in (load_default_corpus(), "Hello  world!\n\n naïve café 日本 😀 12345 \t\n  x"):
        assert with_ours.encode(text, add_special_tokens=False).ids == tiktoken.encode_ordinary(text)


def test_bare_tiktoken_model_gets_llama3s_special_tokens(tiktoken_exports, tmp_path):
    """Meta's tokenizer.model alone (here at the folder's top): Llama 3's BOS, which every text starts with, and
    <|end_of_text|> as EOS; no chat template; rows past the tokenizer's ids are unused [PADn] tokens."""
    readers, _, _ = tiktoken_exports
    write_llama_tiktoken(tmp_path / "meta")
    (tmp_path / "meta" / "original" / "tokenizer.model").rename(tmp_path / "meta" / "tokenizer.model")
    cfg = TIKTOKEN_LLAMA.replace(vocab_size=TIKTOKEN_LLAMA.vocab_size + LLAMA_PAD)
    save_gguf(init_params(cfg, seed=0), cfg, tmp_path / "bare.gguf", tokenizer=tmp_path / "meta")
    reader = gguf.GGUFReader(tmp_path / "bare.gguf")
    tokens = field(reader, "tokenizer.ggml.tokens")
    n = TIKTOKEN_LLAMA.vocab_size
    assert tokens[:n] == field(readers["json"], "tokenizer.ggml.tokens")
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, cfg.vocab_size)]
    assert field(reader, "tokenizer.ggml.token_type")[n:] == [TT.UNUSED] * LLAMA_PAD
    assert field(reader, "tokenizer.ggml.merges") == field(readers["tiktoken"], "tokenizer.ggml.merges")
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokens.index("<|begin_of_text|>") == LLAMA_RANKS
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokens.index("<|end_of_text|>") == LLAMA_RANKS + 1
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert "tokenizer.chat_template" not in reader.fields


def test_folder_without_a_tokenizer_fails_before_writing(tmp_path):
    """Neither tokenizer.json nor a tiktoken tokenizer.model (Llama 2's SentencePiece one is not Llama 3's)."""
    params, path = init_params(TIKTOKEN_LLAMA, seed=0), tmp_path / "out" / "model.gguf"
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for content in (None, b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02"):
        if content is not None:
            (folder / "tokenizer.model").write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"{folder} has no tokenizer.json or Llama 3 tokenizer.model")):
            save_weights(params, TIKTOKEN_LLAMA, path, format="gguf", tokenizer=folder)
    write_llama_tiktoken(folder)
    small = TIKTOKEN_LLAMA.replace(vocab_size=TIKTOKEN_LLAMA.vocab_size - 1)
    with pytest.raises(ValueError, match=rf"past the model's vocabulary \({small.vocab_size} rows\)"):
        save_weights(init_params(small, seed=0), small, path, format="gguf", tokenizer=folder)
    assert not path.parent.exists()
