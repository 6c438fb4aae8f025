"""python -m gptjax.aot: the real train step compiled for a TPU topology and a GPU target on this CPU-only
machine (tiny model, seconds each), with the accelerator's paths in those programs and the CPU's in the CPU
one; the report's keys; the errors."""

import json
import re

import pytest

from gptjax.cli import aot

# The persistent compilation cache (tests/conftest.py) stores compile-only executables it cannot load back:
# each such compile warns once and compiles for real, which is what these tests want anyway.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")

# The real vocabulary (50257 -> 50304 when padded), everything else tiny.
TINY = ["--n-layers", "2", "--emb-dim", "32", "--n-heads", "2", "--context-length", "32", "--batch-size", "4"]
EMB, LAYERS = 32, 2
TARGETS = {"cpu": [], "tpu-v5e:2x2": ["--mesh", "fsdp=4"], "gpu-h100:2": ["--mesh", "data=1,fsdp=2"]}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """target -> (report, compiled HLO text), all three compiled in this one process: each program must get
    its own platform's choices whatever was traced before it."""
    out = {}
    for target, extra in TARGETS.items():
        d = tmp_path_factory.mktemp(target.replace(":", "_"))
        args = TINY + extra + ["--target", target, "--json", str(d / "r.json"), "--dump-hlo", str(d / "m.hlo")]
        assert aot.main(args) == 0
        out[target] = (json.loads((d / "r.json").read_text()), (d / "m.hlo").read_text())
    return out


def result_shapes(hlo: str, op: str) -> list[str]:
    """The result shapes of every `op` instruction (dot, conditional, ...), e.g. 'f32[4,32,50304]'."""
    return re.findall(rf"= \(?(\w+\[[\d,]*\])(?:\{{[^}}]*\}})?\)? {op}\(", hlo)  # TPU layouts hold tiles


def dims(shape: str) -> list[int]:
    return [int(d) for d in re.search(r"\[([\d,]*)\]", shape)[1].split(",") if d]


@pytest.mark.parametrize("target", ["tpu-v5e:2x2", "gpu-h100:2"])
def test_accelerator_programs_have_the_accelerator_paths(compiled, target):
    _, hlo = compiled[target]
    matmuls = result_shapes(hlo, "dot") + result_shapes(hlo, "convolution")
    widths = {d for shape in matmuls for d in dims(shape)}
    assert not result_shapes(hlo, "conditional")  # no CPU backward barrier
    if target.startswith("gpu"):
        assert 50304 in widths and 50257 not in widths  # the padded vocabulary
    else:
        assert 50257 in widths and 50304 not in widths  # TPU tiles pad by themselves
    assert 3 * EMB in widths  # one fused q/k/v projection


def test_cpu_program_has_the_cpu_paths(compiled):
    _, hlo = compiled["cpu"]
    widths = {d for shape in result_shapes(hlo, "dot") for d in dims(shape)}
    assert len(result_shapes(hlo, "conditional")) == LAYERS  # one backward barrier per block
    assert 50257 in widths and 50304 not in widths
    assert 3 * EMB not in widths


@pytest.mark.parametrize("target", list(TARGETS))
def test_report_keys_and_memory(compiled, target):
    report, _ = compiled[target]
    for key in ("target", "devices", "per_device_bytes", "device_memory_bytes", "fits", "flops_per_step", "compile_s"):
        assert key in report
    b = report["per_device_bytes"]
    assert set(b) >= {"arguments", "outputs", "temp", "peak"}
    assert b["arguments"] >= report["state_bytes_per_device"] > 0
    assert b["peak"] >= b["arguments"] and report["fits"] is True and report["compile_s"] > 0
    assert report["devices"] == {"cpu": 1, "tpu-v5e:2x2": 4, "gpu-h100:2": 2}[target]
    assert report["flops_per_step"] is None or report["flops_per_step"] > 0


def test_fsdp_splits_the_state(compiled):
    # four-way fsdp on the TPU: each device holds about a quarter of the parameters and AdamW moments
    tpu, cpu = compiled["tpu-v5e:2x2"][0], compiled["cpu"][0]
    assert tpu["state_bytes_per_device"] < 0.3 * cpu["state_bytes_per_device"]


def test_known_device_memory(compiled):
    assert compiled["tpu-v5e:2x2"][0]["device_memory_bytes"] == 16 * 1024**3
    gpu = compiled["gpu-h100:2"][0]
    assert gpu["device_memory_bytes"] == 84942979072 and gpu["usable_memory_bytes"] < gpu["device_memory_bytes"]
    assert gpu["attention"].startswith(("cuDNN", "XLA attention ("))  # says which, and why not cuDNN


def test_fsdp_keeps_activations_split_over_the_batch():
    # The same 2 rows per GPU need the same temporaries on one GPU as under fsdp=8 on eight: XLA must not
    # gather whole-batch activations to follow the fsdp-split weights (it did: 3.4x here, 5x at gpt2-xl).
    small = ["--emb-dim", "256", "--n-heads", "4", "--n-layers", "2", "--context-length", "256"]

    def temp(*args):
        return aot.run(vars(aot.build_parser().parse_args(small + list(args))))["per_device_bytes"]["temp"]

    one = temp("--target", "gpu-h100:1", "--batch-size", "2")
    assert temp("--target", "gpu-h100:8", "--batch-size", "16", "--mesh", "fsdp=8") <= 1.1 * one


def test_does_not_fit_gives_advice_that_works():
    # 1.6B parameters in two wide blocks: their float32 AdamW state (~19 GB) cannot be replicated on 16 GiB
    # chips, and the advice (more fsdp) makes it fit
    wide = ["--target", "tpu-v5e:2x2", "--emb-dim", "6400", "--n-heads", "50", "--n-layers", "2",
            "--context-length", "32", "--batch-size", "4"]

    def run(*mesh):
        return aot.run(vars(aot.build_parser().parse_args(wide + list(mesh))))

    replicated = run("--mesh", "data=4")
    assert replicated["parameters"] > 1.5e9 and replicated["fits"] is False
    assert "--mesh data=2,fsdp=2" in replicated["advice"] and "does not fit" in aot.format_report(replicated)
    assert run("--mesh", "fsdp=4")["fits"] is True


@pytest.mark.parametrize("args, message", [
    (["--target", "tpu-v9z:2x2"], "libtpu does not know topology"),
    (["--target", "gpu-a999:2"], "--target gpu-a999:2: unknown target"),
    (["--target", "quantum"], "--target quantum: unknown target"),
    (["--target", "tpu-v5e:2x2", "--mesh", "fsdp=8"],
     "--mesh data=1,fsdp=8 does not match the target tpu-v5e:2x2, which has 4"),
    (["--target", "tpu-v5e:2x2", "--batch-size", "6"], "--batch-size 6"),
])
def test_errors_are_one_line(capsys, args, message):
    assert aot.main(TINY[:-2] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_existing_report_needs_overwrite(tmp_path, capsys):
    report = tmp_path / "r.json"
    report.write_text("mine")
    assert aot.main(TINY + ["--target", "cpu", "--json", str(report)]) == 2
    assert "--json" in capsys.readouterr().err and report.read_text() == "mine"  # refused before compiling
    assert aot.main(TINY + ["--target", "cpu", "--json", str(report), "--overwrite"]) == 0
    assert json.loads(report.read_text())["target"] == "cpu"


def test_missing_extra_names_the_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert aot.main(TINY + ["--target", "tpu-v5e:2x2"]) == 2
    assert 'pip install "gptjax[aot]"' in capsys.readouterr().err
