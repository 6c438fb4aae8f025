"""Training on a mesh equals training on one device: data parallel, FSDP and both, on 8 simulated CPU devices
(one process), and as a 2-process multi-host run; sharded checkpoints restore across meshes. Qwen3 and
Llama 3.2 (tiny) on 4 simulated devices: their parameters shard by the same rule and a step on a mesh equals
one on one device.

The device count must be set before jax is imported, so the work happens in tests/sharding_worker.py
subprocesses (about a minute in all) and in FAMILIES below; the rule table and parsing are tested here directly.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptjax.checkpoint import latest_step, load_params
from gptjax.sharding import fsdp_spec, make_mesh, parse_mesh
from gptjax.runs import RunSettings

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "sharding_worker.py"
TOL = 1e-5
MESHES = ("data=8", "fsdp=8", "data=4,fsdp=2")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def two_processes(one_process):
    out, _ = one_process
    # The one-process 4x2 run as it was after its step-2 checkpoint, for the two processes to resume.
    shutil.copytree(out / "data=4,fsdp=2", out / "multi-resume")
    shutil.rmtree(out / "multi-resume" / "checkpoints" / "4")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), str(i), address], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=400)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return out, logs


def assert_same_metrics(records, reference):
    """Line for line the same events, with every loss within TOL of the reference's."""
    assert [sorted(r) for r in records] == [sorted(r) for r in reference]
    for r, ref in zip(records, reference):
        assert (r["step"], r["epoch"], r["tokens_seen"]) == (ref["step"], ref["epoch"], ref["tokens_seen"])
        for k in ("loss", "grad_norm", "train_loss", "val_loss"):
            if k in ref:
                assert abs(r[k] - ref[k]) <= TOL, (k, r, ref)


# ---------------------------------------------------------------------------------------------
# The rule and the flags (one device, in this process)


def test_fsdp_rule_shards_the_largest_divisible_axis_of_matrices():
    assert fsdp_spec((64, 256), 8) == P(None, "fsdp")
    assert fsdp_spec((256, 64), 8) == P("fsdp", None)
    assert fsdp_spec((50257, 64), 8) == P(None, "fsdp")  # the odd vocabulary: split emb_dim instead
    assert fsdp_spec((50257, 63), 8) == P()  # nothing divides: replicated
    assert fsdp_spec((256,), 8) == P()  # vectors (biases, norms) are replicated
    assert fsdp_spec((), 8) == P()
    assert fsdp_spec((64, 256), 1) == P()


def test_parse_mesh():
    assert parse_mesh("data=4,fsdp=2") == {"data": 4, "fsdp": 2}
    assert parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8}
    for bad in ("data=0", "data=x", "model=2", "data"):
        with pytest.raises(ValueError, match="e.g. mesh 'data=4,fsdp=2'"):
            parse_mesh(bad)
    with pytest.raises(ValueError, match="needs 2 devices but 1 are available"):
        make_mesh({"data": 2})


# ---------------------------------------------------------------------------------------------
# 8 devices, one process


def test_device_count(one_process):
    assert one_process[1]["device_count"] == 8


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_run_matches_single_device(one_process, mesh):
    runs = one_process[1]["runs"]
    assert len(runs["single"]) == 6  # 4 steps and 2 evaluations
    assert_same_metrics(runs[mesh], runs["single"])


def test_parameters_and_optimizer_state_are_sharded_on_fsdp(one_process):
    r = one_process[1]
    # An FF kernel [64, 256] split 8 ways along its larger axis; AdamW's first moment likewise.
    assert r["fsdp_params"] == {"shape": [64, 256], "shard": [64, 32], "devices": 8}
    assert r["fsdp_mu"] == {"shape": [64, 256], "shard": [64, 32], "devices": 8}
    assert r["init_diff"] == 0.0  # created in shards, with the one-device values
    assert r["loaded_diff"] == 0.0  # whole weights (--init-from) placed in shards


def test_checkpoint_from_4x2_restores_on_8x1_and_one_device(one_process):
    r = one_process[1]
    for name, devices in (("data=8", 8), ("single", 1)):
        restored = r["restore"][name]
        assert restored["params_diff"] == 0.0 and restored["opt_state_diff"] == 0.0  # bitwise
        assert restored["step"] == 2
        assert restored["devices"] == devices and restored["shard"] == restored["shape"]  # replicated / whole
        assert_same_metrics(r["resumed"][name], r["runs"]["single"])  # steps 2 and 3 again, same losses


def test_sampling_with_sharded_params_matches_one_device(one_process):
    tokens = one_process[1]["generate"]
    assert len(tokens["single"][0]) == 10
    assert tokens["sharded"] == tokens["single"]


def test_loader_builds_global_batches_of_the_plain_loaders_rows(one_process):
    loader = one_process[1]["loader"]
    assert loader["batches_equal"] and loader["grouped_equal"]
    assert loader["groups"] == 2  # batches 1-4 of 5 in pairs
    assert loader["batch_spec"] == "P(('data', 'fsdp'),)"
    assert loader["grouped_spec"] == "P(None, ('data', 'fsdp'))"


def test_mesh_errors_are_one_line_and_early(one_process):
    errors = one_process[1]["errors"]
    expected = {"batch": "batch size 4 does not divide over the 8 data-parallel shards",
                "devices": "needs 3 devices but 8 are available", "axis": "bad --mesh 'model=8'"}
    for name, text in expected.items():
        e = errors[name]
        assert e["code"] == 2 and e["message"].startswith("error: ") and text in e["message"], e
        assert "\n" not in e["message"] and not e["dir_made"]


# ---------------------------------------------------------------------------------------------
# The other families, 4 devices, one process

# Tiny Qwen3 (tied head, q/k norms, head_dim of its own) and Llama 3.2 (here with its own output head), 4 query
# heads over 2 key/value groups: one train step on a data=2,fsdp=2 mesh and on one device. Prints JSON.
FAMILIES = r"""
import json, os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from gptjax import sharding
from gptjax.model import init_params
from gptjax.presets import model_preset
from gptjax.training import TrainConfig, init_opt_state, make_optimizer, make_train_step

out = {}
for name, own in (("qwen3-0.6b", {"head_dim": 16}), ("llama-3.2-1b", {"tie_embeddings": False})):
    cfg = model_preset(name, vocab_size=256, context_length=16, emb_dim=64, n_heads=4, n_kv_groups=2, n_layers=2,
                       hidden_dim=128, **own)
    key, mesh = jax.random.key(0), sharding.make_mesh({"data": 2, "fsdp": 2})
    params, reference = sharding.init_sharded_params(cfg, key, mesh), init_params(cfg, key)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    r = {"specs": {jax.tree_util.keystr(k): [list(x.shape), str(x.sharding.spec)] for k, x in leaves},
         "init_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                          for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference)))}
    opt = make_optimizer(TrainConfig(batch_size=4), total_steps=10)
    tokens = np.random.default_rng(0).integers(0, 256, (4, 17), dtype=np.int32)
    batch = (tokens[:, :-1], tokens[:, 1:])
    one = make_train_step(cfg, opt)(reference, init_opt_state(opt, reference), batch, key)
    step = make_train_step(cfg, opt, jit_kwargs=sharding.train_step_jit_kwargs(mesh, cfg, opt), mesh=mesh)
    on_mesh = step(params, sharding.init_sharded_opt_state(opt, params, mesh),
                   jax.device_put(batch, sharding.batch_sharding(mesh)), key)
    r["metrics"] = [{k: float(m[k]) for k in ("loss", "grad_norm")} for m in (one[2], on_mesh[2])]
    r["step_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                         for a, b in zip(jax.tree_util.tree_leaves(one[0]), jax.tree_util.tree_leaves(on_mesh[0])))
    out[name] = r
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def families():
    proc = subprocess.run([sys.executable, "-c", FAMILIES], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", ["qwen3-0.6b", "llama-3.2-1b"])
def test_families_shard_by_the_rule_and_step_as_on_one_device(families, name):
    r = families[name]
    specs = r["specs"]
    for path, (shape, spec) in specs.items():
        # matrices (embedding, projections, SwiGLU, an untied head) split over fsdp; RMSNorm scales replicated
        assert ("fsdp" in spec) == (len(shape) == 2), (path, shape, spec)
    assert specs["['tok_emb']['embedding']"] == [[256, 64], "P('fsdp', None)"]  # along the vocabulary
    assert specs["['trf_blocks'][0]['att']['W_key']['kernel']"][0] == [64, 32]  # 2 groups of 16: half W_query's
    assert ("['out_head']['kernel']" in specs) == (name == "llama-3.2-1b")  # Qwen3's head is tok_emb itself
    assert r["init_diff"] == 0.0  # created in shards, with the one-device values
    one, on_mesh = r["metrics"]
    for k in ("loss", "grad_norm"):
        assert abs(one[k] - on_mesh[k]) <= TOL * max(1.0, abs(one[k])), (k, one, on_mesh)
    # AdamW's first step moves each parameter by about lr (4e-4) times the sign of its gradient: rounding in
    # near-zero gradients can flip a sign, so parameters agree to twice that.
    assert r["step_diff"] <= 8e-4


# ---------------------------------------------------------------------------------------------
# 2 processes x 4 devices


def test_multi_host_run_matches_single_device(one_process, two_processes):
    out, r = one_process
    _, logs = two_processes
    assert_same_metrics([json.loads(line) for line in (out / "multi" / "metrics.jsonl").read_text().splitlines()],
                        r["runs"]["single"])  # one copy of each line: only process 0 logs
    assert "done: 4 steps" in logs[0] and "done:" not in logs[1]
    assert latest_step(out / "multi") == 4
    # The checkpoint both processes wrote restores on this process's one device, with the parameters of
    # the one-device run. Adam turns rounding differences in near-zero gradients into differences of up
    # to lr (4e-4) per step, so the tolerance here is a quarter of one step.
    multi, cfg = load_params(out / "multi")
    single, _ = load_params(out / "single")
    assert cfg.emb_dim == 64
    for a, b in zip(jax.tree_util.tree_leaves(multi), jax.tree_util.tree_leaves(single), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_multi_host_resume_on_another_mesh(one_process, two_processes):
    out, r = one_process
    records = [json.loads(line) for line in (out / "multi-resume" / "metrics.jsonl").read_text().splitlines()]
    assert_same_metrics(records, r["runs"]["single"])


def test_each_process_reads_only_its_rows(one_process, two_processes):
    out, _ = one_process
    config = json.loads((out / "multi" / "config.json").read_text())
    train_loader, _ = RunSettings.from_config(config).loaders()
    reads = [json.loads((out / f"reads-{i}.json").read_text()) for i in range(2)]
    train = [{i for kind, i in rs if kind == "train"} for rs in reads]
    val = [{i for kind, i in rs if kind == "val"} for rs in reads]
    # Training: the windows of the first 4 batches, each read by one process only.
    assert not train[0] & train[1]
    assert train[0] | train[1] == set(train_loader.order(0)[: 4 * 8].tolist())
    # Validation: batch 0 (8 windows) split, batch 1 (7 windows, replicated) read by both.
    assert val[0] & val[1] == set(range(8, 15)) and val[0] | val[1] == set(range(15))

