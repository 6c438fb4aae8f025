"""Weight formats other than OpenAI's TensorFlow one (that is tests/test_weights_openai.py): the book's
torch .pth, Hugging Face safetensors folders, gptjax checkpoints; format detection, round trips, bad input."""

import json
import re
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import gptjax
from gptjax import GPTConfig, get_config
from gptjax.cli.convert import main as convert_main
from gptjax.weights import detect_format, load_weights, save_weights
from gptjax.weights.hf import hf_table
from gptjax.weights.mapping import AssumedHeadsWarning, params_from_tensors
from gptjax.weights.openai import book_params, openai_table, openai_to_params
from tests.torch_reference import GPTModel as TorchGPTModel
from tests.torch_reference import randomize_

TOL = 1e-4
CFG = GPTConfig(vocab_size=257, context_length=32, emb_dim=48, n_layers=2, n_heads=4, qkv_bias=True)
IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, CFG.context_length), dtype=np.int32)


def torch_logits(model, ids=IDS):
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(ids), dtype=torch.long))
    return getattr(out, "logits", out).numpy()


def jax_logits(params, cfg, ids=IDS):
    return np.asarray(gptjax.apply(params, cfg, ids))


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def book_model():
    return randomize_(TorchGPTModel(CFG.to_dict()), seed=1).eval()


@pytest.fixture(scope="module")
def params(book_model):
    return gptjax.from_torch_state_dict(book_model.state_dict(), CFG)


def hf_model(tied: bool, seed: int) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=CFG.vocab_size, n_positions=CFG.context_length, n_embd=CFG.emb_dim,
                        n_layer=CFG.n_layers, n_head=CFG.n_heads, tie_word_embeddings=tied)
    return randomize_(GPT2LMHeadModel(config), seed=seed).eval()


@pytest.fixture(scope="module", params=["tied", "untied"])
def hf_folder(request, tmp_path_factory):
    model = hf_model(request.param == "tied", seed=2)
    folder = tmp_path_factory.mktemp("hf") / request.param
    model.save_pretrained(folder)
    return model, folder


# ---------------------------------------------------------------------------------------------
# The book's torch state_dict


def test_pth_matches_torch_reference(tmp_path, book_model):
    path = tmp_path / "model.pth"
    torch.save(book_model.state_dict(), path)
    params, cfg = load_weights(path, cfg=CFG)
    assert cfg == CFG and detect_format(path) == "torch"
    assert np.abs(jax_logits(params, cfg) - torch_logits(book_model)).max() <= TOL


def test_pth_book_checkpoint_dict_and_suffixless_file(tmp_path, book_model, params):
    optimizer = torch.optim.AdamW(book_model.parameters(), lr=4e-4)
    path = tmp_path / "model_and_optimizer.pth"
    torch.save({"model_state_dict": book_model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path)
    loaded, _ = load_weights(path, cfg=CFG)
    assert_same_params(loaded, params)
    bare = tmp_path / "weights.bin"  # torch.save's zip format is recognised without the suffix
    bare.write_bytes(path.read_bytes())
    assert detect_format(bare) == "torch"
    assert_same_params(load_weights(bare, cfg=CFG)[0], params)


def test_pth_config_from_shapes_sidecar_or_given(tmp_path, params):
    path = tmp_path / "model.pth"
    torch.save(gptjax.to_torch_state_dict(params, CFG), path)
    # 48 is no multiple of GPT-2's 64-wide heads, and the shapes do not hold the head count
    with pytest.raises(ValueError, match=r"model.pth: the head count cannot be read .* as cfg.n_heads"):
        load_weights(path)
    (tmp_path / "config.json").write_text(json.dumps(CFG.replace(drop_rate=0.0).to_dict()))  # the book's dict
    assert load_weights(path)[1] == CFG.replace(drop_rate=0.0)
    (tmp_path / "config.json").write_text(json.dumps(CFG.replace(n_layers=3).to_dict()))  # another model's
    with pytest.raises(ValueError, match=r"model.pth: the head count cannot be read"):  # so not this file's
        load_weights(path)
    with pytest.raises(ValueError, match="the weights have context_length=32 but the given config has context_length=64"):
        load_weights(path, cfg=CFG.replace(context_length=64))
    # GPT-2 shapes: 64-wide heads assumed; qkv_bias from the presence of its tensors
    gpt2_like = GPTConfig(vocab_size=50, context_length=8, emb_dim=128, n_layers=1, n_heads=2, qkv_bias=False)
    (tmp_path / "other").mkdir()
    torch.save(TorchGPTModel(gpt2_like.to_dict()).state_dict(), tmp_path / "other" / "m.pt")
    with pytest.warns(AssumedHeadsWarning, match=r"assuming 2 heads of 64 .* pass the head count as cfg.n_heads"):  # one notice
        assert load_weights(tmp_path / "other" / "m.pt")[1] == gpt2_like


def test_save_torch_writes_sidecar_and_roundtrips_bitwise(tmp_path, book_model, params):
    path = tmp_path / "out" / "model.pth"
    save_weights(params, CFG, path)  # torch, from the suffix
    assert json.loads((path.parent / "model.config.json").read_text())["model"] == {"family": "gpt2", **CFG.to_dict()}
    reference = TorchGPTModel(CFG.to_dict())
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for k, v in book_model.state_dict().items():
        assert torch.equal(reference.state_dict()[k], v), k
    loaded, cfg = load_weights(path)
    assert cfg == CFG
    assert_same_params(loaded, params)


def tied(params):
    """The same parameters with the output head shared with the token embedding, as GPT-2 trained it."""
    return {**params, "out_head": {"kernel": params["tok_emb"]["embedding"].T}}


@pytest.mark.parametrize("container, suffix", [("torch", ".pth"), ("safetensors", ".safetensors"), ("openai", "")])
@pytest.mark.parametrize("naming", ["book", "hf", "openai", "gptjax"])
def test_every_container_writes_every_naming_it_reads(container, suffix, naming, params, tmp_path):
    """Writers mirror the readers: each naming in each container (a torch file, a safetensors file, a TensorFlow
    checkpoint folder), read back to the same parameters and config (heads of 12, which no shape says: the
    config beside it does), with and without qkv biases (the GPT-2 layouts store zeros for none) and, where
    the naming has a head of its own, untied."""
    from gptjax.weights import NAMINGS, read_tensors

    biasless = CFG.replace(qkv_bias=False, drop_rate=0.0)
    cases = [(CFG, tied(params)), (biasless, tied(gptjax.init_params(biasless, seed=3)))]
    if naming != "openai":  # OpenAI's names hold one matrix for both
        cases.append((CFG, params))
    for i, (cfg, p) in enumerate(cases):
        path = tmp_path / f"m{i}{suffix}"
        save_weights(p, cfg, path, container, names=naming)
        stored = read_tensors(path).tensors
        assert [n.__name__.rsplit(".", 1)[1] for n in NAMINGS if n.claims(stored)][0] == \
            {"gptjax": "tree_names"}.get(naming, naming)
        loaded, loaded_cfg = load_weights(path)
        hparams = (container, naming) == ("openai", "openai")  # OpenAI's hparams.json holds no dropout rate
        assert loaded_cfg == (cfg.replace(drop_rate=loaded_cfg.drop_rate) if hparams else cfg)
        assert_same_params(loaded, p)
    with pytest.raises(ValueError, match="names applies to the torch, safetensors, openai formats"):
        save_weights(params, CFG, tmp_path / "folder", format="hf", names=naming)


# ---------------------------------------------------------------------------------------------
# Hugging Face


def test_hf_folder_matches_transformers(hf_folder):
    model, folder = hf_folder
    params, cfg = load_weights(folder)
    assert detect_format(folder) == "hf"
    assert cfg == CFG.replace(drop_rate=model.config.resid_pdrop)
    assert np.abs(jax_logits(params, cfg) - torch_logits(model)).max() <= TOL
    untied = not model.config.tie_word_embeddings
    assert np.array_equal(params["out_head"]["kernel"].T, params["tok_emb"]["embedding"]) != untied


def test_hf_roundtrip_is_bitwise_and_transformers_reads_it(hf_folder, tmp_path):
    model, folder = hf_folder
    params, cfg = load_weights(folder)
    save_weights(params, cfg, tmp_path / "back", format="hf")
    original, written = load_file(folder / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(written)
    for k in original:
        assert original[k].dtype == written[k].dtype and np.array_equal(original[k], written[k]), k
    reread = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert reread.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert np.abs(torch_logits(reread) - jax_logits(params, cfg)).max() <= TOL


def test_gptjax_params_to_hf_match_transformers(tmp_path, params):
    # gptjax's out_head is its own matrix: written as lm_head.weight, untied
    save_weights(params, CFG, tmp_path / "hf", format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(torch_logits(model) - jax_logits(params, CFG)).max() <= TOL
    assert_same_params(load_weights(tmp_path / "hf")[0], params)


def test_hf_without_prefix_with_old_buffers_and_single_file(hf_folder, tmp_path):
    model, folder = hf_folder
    params, cfg = load_weights(folder)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    for i in range(CFG.n_layers):  # what transformers < 4.27 saved
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, tmp_path / "gpt2.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    loaded, loaded_cfg = load_weights(tmp_path / "gpt2.safetensors")
    assert loaded_cfg == cfg
    assert_same_params(loaded, params)


def test_book_named_safetensors_file(tmp_path, book_model, params):
    # a book state_dict saved with safetensors (head count: 64-wide heads are not 48, so a sidecar)
    save_file({k: v.numpy() for k, v in book_model.state_dict().items()}, tmp_path / "book.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"format": "gptjax", "model": CFG.to_dict()}))
    loaded, cfg = load_weights(tmp_path / "book.safetensors")
    assert cfg == CFG
    assert_same_params(loaded, params)


def test_qkv_bias_free_model_through_hf(tmp_path):
    cfg = CFG.replace(qkv_bias=False)
    params = gptjax.init_params(cfg, seed=4)
    save_weights(params, cfg, tmp_path / "hf", format="hf")  # GPT-2 has the biases: written as zeros
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(torch_logits(model) - jax_logits(params, cfg)).max() <= TOL
    loaded, loaded_cfg = load_weights(tmp_path / "hf")
    assert loaded_cfg == cfg
    assert_same_params(loaded, params)
    biased, biased_cfg = load_weights(tmp_path / "hf", cfg=CFG)  # zero biases also fit a model with them
    assert biased_cfg.qkv_bias and not np.any(biased["trf_blocks"][0]["att"]["W_query"]["bias"])


# ---------------------------------------------------------------------------------------------
# gptjax checkpoints, conversion


def test_gptjax_format_roundtrip(tmp_path, params):
    save_weights(params, CFG, tmp_path / "ckpt", format="gptjax")
    assert detect_format(tmp_path / "ckpt") == "gptjax"
    loaded, cfg = load_weights(tmp_path / "ckpt")
    assert cfg == CFG
    assert_same_params(loaded, params)
    assert load_weights(tmp_path / "ckpt", cfg=CFG.replace(drop_rate=0.0))[1].drop_rate == 0.0
    with pytest.raises(ValueError, match="the weights have n_heads=4 but the given config has n_heads=3"):
        load_weights(tmp_path / "ckpt", cfg=CFG.replace(n_heads=3))


def test_convert_cli_chain_is_bitwise(tmp_path, params, capsys):
    save_weights(params, CFG, tmp_path / "a.pth")
    steps = [("a.pth", "b", ["--format", "hf"]), ("b", "c", ["--format", "gptjax"]), ("c", "d.pth", []),
             ("d.pth", "e.safetensors", ["--names", "hf"])]
    for src, dst, flags in steps:
        assert convert_main([str(tmp_path / src), str(tmp_path / dst), *flags]) == 0
    assert "transformer.wte.weight" in load_file(tmp_path / "e.safetensors")  # Hugging Face's names
    for name in ("b", "c", "d.pth", "e.safetensors"):
        loaded, cfg = load_weights(tmp_path / name)
        assert cfg == CFG
        assert_same_params(loaded, params)
    assert convert_main([str(tmp_path / "missing.pth"), str(tmp_path / "x")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert convert_main([str(tmp_path / "a.pth"), str(tmp_path / "x"), "--names", "hf"]) == 2
    assert "--names applies to the torch, safetensors, openai formats" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# All four GPT-2 sizes, abstractly (nothing allocated)

GPT2_SHAPES = {  # per size: the released tensors' shapes, squeezed (OpenAI) / as stored (Hugging Face)
    "wte": lambda c: (c.vocab_size, c.emb_dim),
    "wpe": lambda c: (c.context_length, c.emb_dim),
    "attn/c_attn/w": lambda c: (c.emb_dim, 3 * c.emb_dim),
    "attn/c_attn/b": lambda c: (3 * c.emb_dim,),
    "attn/c_proj/w": lambda c: (c.emb_dim, c.emb_dim),
    "mlp/c_fc/w": lambda c: (c.emb_dim, 4 * c.emb_dim),
    "mlp/c_fc/b": lambda c: (4 * c.emb_dim,),
    "mlp/c_proj/w": lambda c: (4 * c.emb_dim, c.emb_dim),
}


def gpt2_tensor_shape(name, cfg):
    """By OpenAI name (model/h0/attn/c_attn/w) or Hugging Face name (h.0.attn.c_attn.weight)."""
    short = re.sub(r"^(model/)?(h\.?\d+[./])?", "", name)
    short = short.replace(".weight", "/w").replace(".bias", "/b").replace(".", "/")
    short = short.removesuffix("/w") if short in ("wte/w", "wpe/w") else short
    return GPT2_SHAPES.get(short, lambda c: (c.emb_dim,))(cfg)  # the rest: layer norms, c_proj biases


@pytest.mark.parametrize("size", ["124M", "355M", "774M", "1558M"])
def test_gpt2_sizes_map_abstractly(size):
    """Each size's widths and head count (1558M: 25 heads of 64) through both tables; two of its blocks, since
    every block maps alike and tracing all 48 of the largest took most of a minute."""
    cfg = get_config(size).replace(n_layers=2)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), gptjax.abstract_params(cfg))
    openai = {row.key: jax.ShapeDtypeStruct(gpt2_tensor_shape(row.key, cfg), np.float32)
              for row in openai_table(cfg)}
    got = jax.eval_shape(lambda t: openai_to_params(book_params(t, cfg.n_layers), cfg), openai)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), got) == want
    hf = {row.key: jax.ShapeDtypeStruct(gpt2_tensor_shape(row.key, cfg), np.float32)
          for row in hf_table(cfg, lm_head=False)}
    got = jax.eval_shape(lambda t: params_from_tensors(hf_table(cfg, lm_head=False), t, cfg, source="hf"), hf)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), got) == want


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the tensor or file, nothing written


@pytest.fixture()
def hf_copy(tmp_path, params):
    save_weights(params, CFG, tmp_path / "hf", format="hf")
    return tmp_path / "hf"


def test_missing_and_misshapen_tensors_are_named(hf_copy):
    file = hf_copy / "model.safetensors"
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}, file)
    with pytest.raises(ValueError, match=r"missing tensor 'h.1.mlp.c_fc.bias'"):
        load_weights(hf_copy)
    save_file({**tensors, "transformer.h.0.attn.c_attn.weight": np.zeros((48, 96), np.float32)}, file)
    with pytest.raises(ValueError, match=r"tensor 'h.0.attn.c_attn.weight' has shape \(48, 96\), expected \(48, 144\)"):
        load_weights(hf_copy)


def test_config_json_disagreeing_with_weights(hf_copy):
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"config.json says n_layer=3 but the weights have n_layers=2"):
        load_weights(hf_copy)
    (hf_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the weights have n_heads=4 but the given config has n_heads=3"):
        load_weights(hf_copy, cfg=CFG.replace(n_heads=3))
    (hf_copy / "config.json").write_text(json.dumps({**config, "activation_function": "gelu"}))
    with pytest.raises(ValueError, match=r"activation_function='gelu' is not supported"):
        load_weights(hf_copy)


def test_truncated_and_corrupt_files(tmp_path, hf_copy, params):
    file = hf_copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors: .*truncated or corrupt"):
        load_weights(hf_copy)
    save_weights(params, CFG, tmp_path / "m.pth")
    pth = tmp_path / "m.pth"
    pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read torch checkpoint .*m.pth: .*truncated, corrupt"):
        load_weights(pth)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt holds a list, not a state_dict"):
        load_weights(tmp_path / "list.pt")


def test_unknown_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt: unknown weights file format"):
        load_weights(tmp_path / "notes.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=r"folder is not a weights folder gptjax knows"):
        load_weights(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match=r"nope: no such file"):
        load_weights(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"unknown weights format 'onnx'"):
        save_weights(gptjax.init_params(CFG), CFG, tmp_path / "x", format="onnx")


def test_failed_saves_leave_nothing(tmp_path, params, monkeypatch):
    with pytest.raises(ValueError, match=r"parameter 'out_head.kernel' has shape \(48, 257\), expected \(48, 300\)"):
        save_weights(params, CFG.replace(vocab_size=300), tmp_path / "a", format="hf")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_weights(params, CFG, tmp_path / "b", format="hf")
    monkeypatch.setattr(torch, "save", broken)
    (tmp_path / "c.pth").write_bytes(b"earlier")
    with pytest.raises(OSError, match="disk full"):
        save_weights(params, CFG, tmp_path / "c.pth", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]
    assert (tmp_path / "c.pth").read_bytes() == b"earlier"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="d already exists; pass overwrite=True"):
        save_weights(params, CFG, tmp_path / "d", format="hf")
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"
    save_weights(params, CFG, tmp_path / "hf", format="hf")  # a .pth's config must not clobber HF's
    hf_config = (tmp_path / "hf" / "config.json").read_text()
    save_weights(params, CFG, tmp_path / "hf" / "model.pth")
    assert (tmp_path / "hf" / "config.json").read_text() == hf_config
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.config.json", "model.pth",
                                                                   "model.safetensors"]


def test_missing_optional_dependencies_are_named(tmp_path, monkeypatch, params):
    save_weights(params, CFG, tmp_path / "m.pth")
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ValueError, match=r"pip install gptjax\[torch\]"):
        load_weights(tmp_path / "m.pth")
    tied = {**params, "out_head": {"kernel": params["tok_emb"]["embedding"].T}}
    with pytest.raises(ValueError, match=r"writing OpenAI's TensorFlow checkpoints needs TensorFlow: pip install gptjax\[tf\]"):
        save_weights(tied, CFG, tmp_path / "oa", format="openai")  # (reading them needs no TensorFlow)


# ---------------------------------------------------------------------------------------------
# Any reader with any naming, through the one path


def test_pth_of_hugging_face_names_and_safetensors_of_gptjax_names(hf_folder, tmp_path, params):
    model, folder = hf_folder
    want, want_cfg = load_weights(folder)
    (tmp_path / "a").mkdir()  # GPT2LMHeadModel's own state_dict, torch.save'd under a .pth name
    torch.save(model.state_dict(), tmp_path / "a" / "gpt2.pth")
    (tmp_path / "a" / "config.json").write_text((folder / "config.json").read_text())
    got, cfg = load_weights(tmp_path / "a" / "gpt2.pth")
    assert detect_format(tmp_path / "a" / "gpt2.pth") == "torch" and cfg == want_cfg
    assert_same_params(got, want)
    # the tree's own names (as orbax stores them) in a safetensors file, with its config file beside it
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    tree = {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v) for path, v in leaves}
    save_file(tree, tmp_path / "tree.safetensors")
    (tmp_path / "tree.config.json").write_text(json.dumps({"format": "gptjax", "model": CFG.to_dict()}))
    got, cfg = load_weights(tmp_path / "tree.safetensors")
    assert detect_format(tmp_path / "tree.safetensors") == "hf" and cfg == CFG
    assert_same_params(got, params)
    save_file({"embeddings.weight": np.zeros((2, 2), np.float32)}, tmp_path / "bert.safetensors")
    with pytest.raises(ValueError, match=r"bert.safetensors: none of the tensor names gptjax knows"):
        load_weights(tmp_path / "bert.safetensors")
