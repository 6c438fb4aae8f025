"""Hugging Face weights as transformers writes them (every layout of save_pretrained), and Hub model ids
resolved through huggingface_hub's cache, against a Hub served on 127.0.0.1 (never the internet)."""

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from gptjax import GPTConfig
from gptjax.weights import detect_format, load_weights
from tests.test_weights import IDS, assert_same_params, jax_logits, torch_logits
from tests.torch_reference import randomize_

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
CFG = GPTConfig(vocab_size=257, context_length=32, emb_dim=48, n_layers=2, n_heads=4, qkv_bias=True, drop_rate=0.1)


@pytest.fixture(scope="module")
def model():
    config = GPT2Config(vocab_size=CFG.vocab_size, n_positions=CFG.context_length, n_embd=CFG.emb_dim,
                        n_layer=CFG.n_layers, n_head=CFG.n_heads)
    return randomize_(GPT2LMHeadModel(config), seed=5).eval()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "single"
    model.save_pretrained(folder)
    return load_weights(folder)


def save_bin(model, folder, **kwargs):
    """pytorch_model.bin as transformers < 5 wrote it (transformers 5 writes safetensors only): huggingface_hub's
    save_torch_state_dict shards and names the files the same way, dropping the tied lm_head.weight."""
    huggingface_hub.save_torch_state_dict(model.state_dict(), folder, safe_serialization=False,
                                          shared_tensors_to_discard=["lm_head.weight"], **kwargs)
    model.config.save_pretrained(folder)


LAYOUTS = {  # writer -> the weight files it writes
    "safetensors": (lambda m, d: m.save_pretrained(d), ["model.safetensors"]),
    "safetensors-sharded": (lambda m, d: m.save_pretrained(d, max_shard_size="100KB"), ["model.safetensors.index.json"]),
    "bin": (lambda m, d: save_bin(m, d), ["pytorch_model.bin"]),
    "bin-sharded": (lambda m, d: save_bin(m, d, max_shard_size="100KB"), ["pytorch_model.bin.index.json"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_layouts_match_transformers(layout, model, reference, tmp_path):
    write, files = LAYOUTS[layout]
    write(model, tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert set(files) <= set(written)
    if "sharded" in layout:  # really several shards
        assert len([n for n in written if n.endswith((".safetensors", ".bin"))]) > 2
    params, cfg = load_weights(tmp_path)
    assert detect_format(tmp_path) == "hf" and cfg == CFG
    assert np.abs(jax_logits(params, cfg) - torch_logits(model)).max() <= TOL
    assert_same_params(params, reference[0])


def test_base_model_without_transformer_prefix(model, reference, tmp_path):
    # GPT2Model (no LM head) writes its keys without "transformer."; the head is the tied embedding
    base = GPT2Model(model.config)
    base.load_state_dict(model.transformer.state_dict())
    base.save_pretrained(tmp_path / "base")
    assert not any(k.startswith("transformer.") for k in load_file(tmp_path / "base" / "model.safetensors"))
    params, cfg = load_weights(tmp_path / "base")
    assert cfg == CFG
    assert np.abs(jax_logits(params, cfg) - torch_logits(model)).max() <= TOL
    assert_same_params(params, reference[0])


def test_a_single_bin_file_also_in_torchs_old_format(model, reference, tmp_path):
    save_bin(model, tmp_path)
    params, cfg = load_weights(tmp_path / "pytorch_model.bin")  # the config.json beside it is read
    assert detect_format(tmp_path / "pytorch_model.bin") == "torch" and cfg == CFG
    assert_same_params(params, reference[0])
    # the Hub's older uploads predate torch.save's zip format, which cannot be memory-mapped
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert (tmp_path / "pytorch_model.bin").read_bytes()[:4] != b"PK\x03\x04"
    assert_same_params(load_weights(tmp_path)[0], reference[0])


def assert_owns_its_memory(params, files):
    """The parameters share no memory with the files they came from: rewriting the files changes nothing
    (a tensor still backed by a file mapping would show the new bytes)."""
    before = [np.array(x) for x in jax.tree.leaves(params)]
    for file in files:
        with open(file, "r+b") as f:
            f.write(b"\0" * file.stat().st_size)
    for x, y in zip(jax.tree.leaves(params), before):
        assert np.array_equal(np.asarray(x), y)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_loaded_parameters_own_their_memory(layout, model, tmp_path):
    LAYOUTS[layout][0](model, tmp_path)
    params, _ = load_weights(tmp_path)
    assert_owns_its_memory(params, [tmp_path / LAYOUTS[layout][1][0]])


def test_missing_shard_is_named(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard {shard.name} listed in .*model.safetensors.index.json not found"):
        load_weights(tmp_path)


# ---------------------------------------------------------------------------------------------
# Hub model ids: the local cache first (offline), a download when the Hub answers, one line when neither.
# huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when imported: each case runs in a
# fresh process with them set, as a user would set them, pointed at a Hub on 127.0.0.1.


class FakeHub(http.server.ThreadingHTTPServer):
    """The route huggingface_hub's downloads use, HEAD and GET {repo}/resolve/{revision}/{file}; with
    ``refuse``, a proxy that answers 403 to everything."""

    def __init__(self, repos):
        self.repos = repos  # repo id -> {file name: bytes}
        self.requests = []
        self.refuse = False
        super().__init__(("127.0.0.1", 0), _HubHandler)


class _HubHandler(http.server.BaseHTTPRequestHandler):
    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body):
        self.server.requests.append(self.path)
        repo, sep, rest = self.path.lstrip("/").partition("/resolve/")
        files = self.server.repos.get(repo)
        name = rest.split("/", 1)[-1].split("?")[0] if sep else ""
        if self.server.refuse or files is None or name not in files:
            self.send_response(403 if self.server.refuse else 404)
            if not self.server.refuse:
                self.send_header("X-Error-Code", "RepoNotFound" if files is None else "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = files[name]
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


CHILD = """
import json, sys
import numpy as np
from gptjax import apply, load_weights
ids = np.load(sys.argv[1])
for name in sys.argv[2:]:
    try:
        params, cfg = load_weights(name)
        print(json.dumps({"name": name, "logits": np.asarray(apply(params, cfg, ids)).tolist()}))
    except Exception as e:
        print(json.dumps({"name": name, "error": f"{type(e).__name__}: {e}"}))
"""


@pytest.fixture()
def hub(model, tmp_path):
    """A Hub on 127.0.0.1 holding the tiny model as gpt2 (the Hub also redirects openai-community/gpt2 there),
    an empty cache in tmp, and ``load(*names, offline=...)``: what a fresh process makes of each name."""
    model.save_pretrained(tmp_path / "upload")
    files = {p.name: p.read_bytes() for p in (tmp_path / "upload").iterdir()}
    server = FakeHub({"gpt2": files})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    np.save(tmp_path / "ids.npy", IDS)
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)}

    def load(*names, offline=False):
        out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ids.npy"), *names], capture_output=True,
                             text=True, cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1" if offline else "0"}, timeout=120)
        assert out.returncode == 0, out.stderr
        return {r["name"]: r for r in map(json.loads, out.stdout.splitlines())}

    server.load, server.cache = load, tmp_path / "cache"
    yield server
    server.shutdown()
    server.server_close()


def test_hub_ids_download_then_load_from_the_cache_offline(hub, model):
    want = torch_logits(model)
    got = hub.load("gpt2", "someone/gpt2-tuned")
    assert np.abs(np.array(got["gpt2"]["logits"]) - want).max() <= TOL
    assert sorted(p.name for p in hub.cache.glob("models--gpt2/snapshots/*/*")) == ["config.json", "model.safetensors"]
    assert got["someone/gpt2-tuned"]["error"].startswith(
        "FileNotFoundError: someone/gpt2-tuned: no such file or folder, nor a model on the Hugging Face Hub")
    hub.requests.clear()
    got = hub.load("gpt2", "openai-community/gpt2", "gpt2-xl", offline=True)  # either of GPT-2's names
    for name in ("gpt2", "openai-community/gpt2"):
        assert np.abs(np.array(got[name]["logits"]) - want).max() <= TOL
    assert got["gpt2-xl"]["error"] == (
        f"FileNotFoundError: gpt2-xl: no such file or folder, and not in the Hugging Face cache ({hub.cache}); "
        "HF_HUB_OFFLINE is set, so it cannot be downloaded (unset it, or give a local path)")
    assert not hub.requests  # offline means offline


def test_hub_unreachable_is_one_line(hub):
    hub.refuse = True
    error = hub.load("gpt2-medium")["gpt2-medium"]["error"]
    assert re.fullmatch(r"FileNotFoundError: gpt2-medium: no such file or folder, not in the Hugging Face cache "
                        r"\(.*\), and the Hub cannot be reached \(.*\); download it once with a network, or give a "
                        r"local path", error), error


def test_local_paths_win_over_hub_ids(reference, tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # this test never asks the Hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model.save_pretrained(tmp_path / "gpt2")
    assert_same_params(load_weights("gpt2")[0], reference[0])  # the folder, not the Hub
    with pytest.raises(FileNotFoundError, match=r"runs/mine: no such file or folder"):
        load_weights("runs/mine")
