"""OpenAI's GPT-2 TensorFlow checkpoints: synthetic release folders written with TensorFlow's own
Saver under OpenAI's variable names, read by gptjax and compared with the book's torch model.
(TensorFlow takes seconds to import: every TensorFlow test lives in this module.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import torch

import gptjax
from gptjax import GPTConfig, get_tokenizer, text_to_token_ids, token_ids_to_text
from gptjax.cli.convert import main as convert_main
from gptjax.cli.generate import main as generate_main
from gptjax.weights import detect_format, load_weights, save_weights
from gptjax.weights import load_openai_checkpoint
from gptjax.weights.openai import book_params, openai_to_params
from gptjax.weights.tf_checkpoint import read_bundle
from tests.torch_reference import GPTModel as TorchGPTModel
from tests.torch_reference import generate_text_simple, randomize_
from tests.test_weights import IDS, assert_same_params, jax_logits, torch_logits
from tests.test_weights_hf import assert_owns_its_memory



TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
CFG = GPTConfig(vocab_size=257, context_length=32, emb_dim=48, n_layers=2, n_heads=4, qkv_bias=True)


def openai_names(n_layers):
    names = ["model/wte", "model/wpe", "model/ln_f/g", "model/ln_f/b"]
    for i in range(n_layers):
        for layer in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            names += [f"model/h{i}/{layer}/w", f"model/h{i}/{layer}/b"]
        names += [f"model/h{i}/ln_{j}/{p}" for j in (1, 2) for p in "gb"]
    return sorted(names)


def tied_book_model(cfg, seed):
    """The book's torch model with OpenAI's constraint: the output head is the token embedding."""
    model = randomize_(TorchGPTModel(cfg.to_dict()), seed=seed).eval()
    with torch.no_grad():
        model.out_head.weight.copy_(model.tok_emb.weight)
    return model


def to_openai_tensors(model, cfg):
    """The book model's weights in OpenAI's layout (written out here, independently of gptjax's tables)."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    t = {"model/wte": sd["tok_emb.weight"], "model/wpe": sd["pos_emb.weight"],
         "model/ln_f/g": sd["final_norm.scale"], "model/ln_f/b": sd["final_norm.shift"]}
    for i in range(cfg.n_layers):
        b, h = f"trf_blocks.{i}.", f"model/h{i}/"
        qkv = ("W_query", "W_key", "W_value")
        t[h + "attn/c_attn/w"] = np.concatenate([sd[f"{b}att.{p}.weight"].T for p in qkv], axis=1)[None]
        t[h + "attn/c_attn/b"] = np.concatenate([sd[f"{b}att.{p}.bias"] for p in qkv])
        for name, torch_name in (("attn/c_proj", "att.out_proj"), ("mlp/c_fc", "ff.layers.0"),
                                 ("mlp/c_proj", "ff.layers.2")):
            t[h + name + "/w"] = sd[f"{b}{torch_name}.weight"].T[None]
            t[h + name + "/b"] = sd[f"{b}{torch_name}.bias"]
        for j in (1, 2):
            t[h + f"ln_{j}/g"], t[h + f"ln_{j}/b"] = sd[f"{b}norm{j}.scale"], sd[f"{b}norm{j}.shift"]
    return t


def write_release(folder, tensors, cfg):
    """What OpenAI's folder holds, written by TensorFlow's v1 Saver with the variables' own names."""
    folder.mkdir(parents=True)
    variables = {name: tf.Variable(np.ascontiguousarray(v)) for name, v in tensors.items()}
    tf.compat.v1.train.Saver(var_list=variables).save(None, str(folder / "model.ckpt"), write_meta_graph=False)
    hparams = {"n_vocab": cfg.vocab_size, "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim,
               "n_head": cfg.n_heads, "n_layer": cfg.n_layers}
    (folder / "hparams.json").write_text(json.dumps(hparams))
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    model = tied_book_model(CFG, seed=7)
    folder = write_release(tmp_path_factory.mktemp("gpt2") / "tiny", to_openai_tensors(model, CFG), CFG)
    return model, folder


@pytest.fixture(scope="module")
def loaded(release):
    return load_weights(release[1])


def test_checkpoint_has_openai_names(release):
    _, folder = release
    variables = dict(tf.train.list_variables(str(folder / "model.ckpt")))
    assert sorted(variables) == openai_names(CFG.n_layers)
    assert variables["model/h0/attn/c_attn/w"] == [1, 48, 144] and variables["model/wte"] == [257, 48]
    assert detect_format(folder) == "openai"


def test_openai_folder_matches_torch_reference(release, loaded):
    model, _ = release
    params, cfg = loaded
    assert cfg == CFG
    assert np.abs(jax_logits(params, cfg) - torch_logits(model)).max() <= TOL


def test_book_loader_structure(release, loaded):
    _, folder = release
    settings, params_dict = load_openai_checkpoint(folder)
    assert settings == json.loads((folder / "hparams.json").read_text())
    assert len(params_dict["blocks"]) == 2
    assert params_dict["blocks"][1]["attn"]["c_attn"]["w"].shape == (48, 144)
    assert params_dict["blocks"][0]["mlp"]["c_proj"]["w"].shape == (192, 48)
    assert params_dict["g"].shape == params_dict["b"].shape == (48,)
    assert params_dict["wte"].shape == (257, 48) and params_dict["wpe"].shape == (32, 48)
    assert_same_params(openai_to_params(params_dict, CFG), loaded[0])


def test_save_openai_roundtrip_is_bitwise(release, loaded, tmp_path):
    _, folder = release
    params, cfg = loaded
    save_weights(params, cfg, tmp_path / "back", format="openai")
    original, written = str(folder / "model.ckpt"), str(tmp_path / "back" / "model.ckpt")
    assert tf.train.list_variables(written) == tf.train.list_variables(original)
    for name, _ in tf.train.list_variables(original):
        a, b = tf.train.load_variable(original, name), tf.train.load_variable(written, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert tf.train.latest_checkpoint(str(tmp_path / "back")) == written
    assert json.loads((tmp_path / "back" / "hparams.json").read_text()) == json.loads(
        (folder / "hparams.json").read_text())
    again, again_cfg = load_weights(tmp_path / "back")
    assert again_cfg == cfg
    assert_same_params(again, params)


def test_convert_openai_through_torch_and_hf(release, loaded, tmp_path):
    _, folder = release
    for src, dst, fmt in [(folder, tmp_path / "m.pth", "torch"), (tmp_path / "m.pth", tmp_path / "hf", "hf"),
                          (tmp_path / "hf", tmp_path / "oa", "openai")]:
        assert convert_main([str(src), str(dst), "--format", fmt]) == 0
    params, cfg = load_weights(tmp_path / "oa")
    assert cfg == CFG
    assert_same_params(params, loaded[0])


def test_model_without_qkv_bias_and_untied_head(tmp_path):
    cfg = CFG.replace(qkv_bias=False)
    params = gptjax.init_params(cfg, seed=3)
    with pytest.raises(ValueError, match="out_head differs from tok_emb"):
        save_weights(params, cfg, tmp_path / "untied", format="openai")
    assert not (tmp_path / "untied").exists()
    params["out_head"]["kernel"] = params["tok_emb"]["embedding"].T
    save_weights(params, cfg, tmp_path / "tied", format="openai")  # zero c_attn biases, as GPT-2 has them
    assert not np.any(tf.train.load_variable(str(tmp_path / "tied" / "model.ckpt"), "model/h1/attn/c_attn/b"))
    loaded, loaded_cfg = load_weights(tmp_path / "tied")
    assert loaded_cfg == cfg
    assert_same_params(loaded, params)


def test_bad_release_folders(release, tmp_path):
    _, folder = release
    names = ["checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"]

    def copy(name, skip=(), **hparams):
        dst = tmp_path / name
        dst.mkdir()
        for f in names:
            if f not in skip:
                (dst / f).write_bytes((folder / f).read_bytes())
        (dst / "hparams.json").write_text(json.dumps({**json.loads((folder / "hparams.json").read_text()), **hparams}))
        return dst

    with pytest.raises(ValueError, match=r"missing tensor 'model/h2/attn/c_attn/w'"):
        load_weights(copy("more_layers", n_layer=3))
    with pytest.raises(ValueError, match=r"tensor 'model/wte' has shape \(257, 48\), expected \(300, 48\)"):
        load_weights(copy("bigger_vocab", n_vocab=300))
    with pytest.raises(ValueError, match=r"hparams.json: no 'n_head'"):
        bad = copy("no_heads")
        (bad / "hparams.json").write_text(json.dumps({"n_vocab": 257, "n_ctx": 32, "n_embd": 48, "n_layer": 2}))
        load_weights(bad)
    with pytest.raises(FileNotFoundError, match=r"model.ckpt.index is missing"):
        load_weights(copy("no_index", skip=("model.ckpt.index",)))
    truncated = copy("truncated")
    data = truncated / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot read the TensorFlow checkpoint .*truncated/model.ckpt"):
        load_weights(truncated)
    with pytest.raises(ValueError, match="the weights have emb_dim=48 but the given config has emb_dim=64"):
        load_weights(folder, cfg=CFG.replace(emb_dim=64))


def test_generate_cli_on_an_openai_folder(tmp_path, capsys):
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_layers=1, n_heads=1, qkv_bias=True)
    model = tied_book_model(cfg, seed=11)
    folder = write_release(tmp_path / "gpt2" / "tiny", to_openai_tensors(model, cfg), cfg)
    prompt = "Every effort moves you"
    assert generate_main(["--weights", str(folder), "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", "6"]) == 0
    tokenizer = get_tokenizer()
    ids = torch.as_tensor(np.array(text_to_token_ids(prompt, tokenizer)), dtype=torch.long)
    want = token_ids_to_text(generate_text_simple(model, ids, 6, cfg.context_length)[0].numpy(), tokenizer)
    assert capsys.readouterr().out == want + "\n"


# ---------------------------------------------------------------------------------------------
# gptjax's own reader of TensorFlow's checkpoint bundle, against TensorFlow's


@pytest.mark.parametrize("n_layers", [12, 24, 36, 48])  # the variable names of 124M, 355M, 774M and 1558M
def test_reader_is_bitwise_tensorflow_for_every_size(n_layers, tmp_path):
    cfg = GPTConfig(vocab_size=11, context_length=4, emb_dim=8, n_layers=n_layers, n_heads=2, qkv_bias=True)
    folder = write_release(tmp_path / "gpt2", to_openai_tensors(tied_book_model(cfg, seed=n_layers), cfg), cfg)
    prefix = str(folder / "model.ckpt")
    reference = tf.train.load_checkpoint(prefix)
    ours = read_bundle(prefix)
    assert sorted(ours) == sorted(reference.get_variable_to_shape_map()) == openai_names(n_layers)
    for name in ours:
        a, b = ours[name], reference.get_tensor(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    if n_layers == 12:  # (the mapping at every size is checked abstractly in test_weights.py)
        squeezed = {name: np.squeeze(reference.get_tensor(name)) for name in ours}
        want = openai_to_params(book_params(squeezed, n_layers), cfg)
        params, got = load_weights(folder)
        assert got == cfg
        assert_same_params(params, want)
        assert_owns_its_memory(params, [folder / "model.ckpt.data-00000-of-00001"])


def test_reader_takes_every_dtype_and_shape_tensorflow_writes(tmp_path):
    rng = np.random.default_rng(0)
    values = {"f32": rng.standard_normal((3, 5)).astype(np.float32), "f16": rng.standard_normal(4).astype(np.float16),
              "f64": rng.standard_normal((2, 1, 2)), "i32": np.arange(6, dtype=np.int32).reshape(3, 2),
              "i64": np.arange(3, dtype=np.int64), "u8": np.arange(4, dtype=np.uint8), "b": np.array([True, False]),
              "scalar": np.float32(2.5), "empty": np.zeros((0, 3), np.float32)}
    prefix = str(tmp_path / "ckpt")
    variables = {name: tf.Variable(v) for name, v in values.items()}
    tf.compat.v1.train.Saver(var_list=variables).save(None, prefix, write_meta_graph=False)
    ours = read_bundle(prefix)
    for name, v in values.items():
        assert ours[name].dtype == v.dtype and ours[name].shape == np.shape(v) and np.array_equal(ours[name], v), name


def test_damaged_checkpoint_files_are_one_clear_error(release, tmp_path):
    _, folder = release

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(folder, dst)
        return dst, dst / "model.ckpt.index", dst / "model.ckpt.data-00000-of-00001"

    def flip(path, at):
        data = bytearray(path.read_bytes())
        data[at] ^= 0x40
        path.write_bytes(bytes(data))

    def fails(folder, message, error=ValueError):
        with pytest.raises(error, match=message) as e:
            load_weights(folder)
        assert "\n" not in str(e.value)

    bad, index, data = copy("index_cut")
    index.write_bytes(index.read_bytes()[:-10])
    fails(bad, r"checkpoint .*/model.ckpt: .*model.ckpt.index: truncated or not a TensorFlow checkpoint index")
    bad, index, data = copy("index_flipped")
    flip(index, 20)
    fails(bad, r"corrupt: the block at byte \d+ does not match its checksum")
    bad, index, data = copy("data_cut")
    data.write_bytes(data.read_bytes()[:-4])
    fails(bad, rf"data-00000-of-00001 is truncated: {data.stat().st_size} bytes, the index needs {data.stat().st_size + 4}")
    bad, index, data = copy("data_flipped")
    flip(data, data.stat().st_size - 2)  # in the last tensor
    fails(bad, r"tensor 'model/wte' does not match its checksum; the file is corrupt; download the model again")
    bad, index, data = copy("data_missing")
    data.unlink()
    fails(bad, r"model.ckpt.data-00000-of-00001 is missing; the checkpoint is incomplete", FileNotFoundError)
    # TensorFlow agrees about the flipped data byte
    with pytest.raises(tf.errors.OpError, match="Checksum does not match"):
        tf.train.load_checkpoint(str(tmp_path / "data_flipped" / "model.ckpt")).get_tensor("model/wte")


def test_checkpoint_file_with_a_path_from_elsewhere(release, loaded, tmp_path):
    _, folder = release
    shutil.copytree(folder, tmp_path / "moved")
    (tmp_path / "moved" / "checkpoint").write_text('model_checkpoint_path: "/somewhere/else/model.ckpt"\n')
    assert_same_params(load_weights(tmp_path / "moved")[0], loaded[0])


NO_TF = """
import sys
sys.modules["tensorflow"] = None  # any import of tensorflow now fails
import numpy as np
from gptjax import apply, load_weights
params, cfg = load_weights(sys.argv[1])
np.save(sys.argv[2], np.asarray(apply(params, cfg, np.load(sys.argv[3]))))
"""


def test_openai_folder_loads_where_tensorflow_cannot_be_imported(release, tmp_path):
    model, folder = release
    np.save(tmp_path / "ids.npy", IDS)
    out = subprocess.run([sys.executable, "-c", NO_TF, str(folder), str(tmp_path / "logits.npy"), str(tmp_path / "ids.npy")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert np.abs(np.load(tmp_path / "logits.npy") - torch_logits(model)).max() <= TOL
