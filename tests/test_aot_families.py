"""python -m gptjax.aot for Qwen3 and Llama 3.2: their presets by name, tiny, compiled for two GPUs with fsdp=2
(seconds each); the report's sizes and its stored config; the flags that do not apply to them."""

import json

import pytest

from gptjax.cli import aot
from gptjax.model import abstract_params, param_count
from gptjax.presets import config_from_dict, model_preset

# See tests/test_aot.py: compile-only executables cannot be read back from the persistent cache.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")

# The presets' vocabularies (151,936 and 128,256) and tied heads, one block of 8 query heads over their 8
# key/value groups; Qwen3's head_dim stays 128, Llama's is emb_dim / n_heads.
SHAPES = {"qwen3-0.6b": {"emb_dim": 64, "n_heads": 8, "n_layers": 1, "context_length": 32},
          "llama-3.2-1b": {"emb_dim": 128, "n_heads": 8, "n_layers": 1, "context_length": 32}}


def flags(shape: dict) -> list[str]:
    return [arg for k, v in shape.items() for arg in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="module", params=list(SHAPES))
def compiled(request, tmp_path_factory):
    name = request.param
    report = tmp_path_factory.mktemp(name) / "r.json"
    assert aot.main(["--preset", name, *flags(SHAPES[name]), "--batch-size", "4", "--dtype", "bfloat16",
                     "--target", "gpu-h100:2", "--mesh", "fsdp=2", "--json", str(report)]) == 0
    return name, json.loads(report.read_text())


def test_family_report(compiled):
    name, r = compiled
    cfg = model_preset(name, **SHAPES[name])
    assert config_from_dict(r["model"]) == cfg  # the stored config names its family and reads back
    assert r["model"]["family"] == {"qwen3-0.6b": "qwen3", "llama-3.2-1b": "llama3"}[name]
    assert r["parameters"] == param_count(abstract_params(cfg))
    assert r["mesh"] == {"data": 1, "fsdp": 2} and r["devices"] == 2 and r["fits"] is True
    b = r["per_device_bytes"]
    assert b["peak"] >= b["arguments"] >= r["state_bytes_per_device"] > 0 and b["temp"] > 0
    # fsdp=2 holds half of the float32 parameters and AdamW's two moments per GPU (norm scales are replicated)
    assert 1 <= r["state_bytes_per_device"] / (12 * r["parameters"] / 2) < 1.01
    assert r["tokens_per_step"] == 4 * 32 and r["flops_per_step"] > 0
    assert r["attention"].startswith(("cuDNN", "XLA attention ("))  # says which, and why not cuDNN


@pytest.mark.parametrize("args, message", [
    (["--preset", "qwen3-0.6b", "--drop-rate", "0.1"], "Qwen3Config has no --drop-rate setting (the model has no such part); leave it out"),
    (["--preset", "llama-3.2-1b", "--qkv-bias"], "Llama3Config has no --qkv-bias setting"),
    (["--preset", "qwen3-0.6b", "--n-heads", "4"], "--n-heads (4) must be a multiple of n_kv_groups (8)"),
    (["--preset", "qwen3-9b"], "unknown preset 'qwen3-9b'; choose one of"),
])
def test_flags_that_do_not_fit_the_family_are_one_line(capsys, args, message):
    assert aot.main(["--target", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
