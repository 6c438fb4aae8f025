"""Sharded training on simulated CPU devices, for tests/test_sharding.py. It runs in subprocesses because
the device count must be set before jax is imported.

    python tests/sharding_worker.py OUT                       8 devices, one process: prints a JSON object
    python tests/sharding_worker.py OUT PROCESS_ID ADDRESS    4 devices, one of 2 processes of a run

One process: trains the same tiny model through ``python -m gptjax.train`` (in-process ``main``) on one
device and on three meshes, resumes the 4x2 run's checkpoint on other meshes, and checks shardings,
sampling, the loader and errors; it prints the raw results (losses, differences, messages) for the test.

Two processes (4 devices each, joined through ADDRESS): the 4x2 run again, as a multi-host run, then the
one-process 4x2 run resumed from OUT/multi-resume on a fsdp=8 mesh; each process writes the dataset
windows it read during the first run to OUT/reads-<process>.json.
"""

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

MULTI = len(sys.argv) == 4
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={4 if MULTI else 8}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from gptjax import sharding  # noqa: E402
from gptjax.checkpoint import restore_checkpoint  # noqa: E402
from gptjax.presets import config_from_dict  # noqa: E402
from gptjax.data import GPTDataset, create_dataloader  # noqa: E402
from gptjax.model import init_params  # noqa: E402
from gptjax.sampling import generate  # noqa: E402
from gptjax.cli.train import main  # noqa: E402
from gptjax.training import TrainConfig, make_optimizer  # noqa: E402

# The tiny model of the issue; dropout 0 so that every mesh computes the same function.
MODEL = ["--emb-dim", "64", "--n-layers", "2", "--n-heads", "4", "--context-length", "32", "--drop-rate", "0"]
# 4 steps of 8 x 32 tokens on the bundled text; evaluations at steps 0 and 2 (the validation split's 15
# windows make batches of 8 and 7 rows: 7 cannot split 8 ways, so it is replicated); checkpoints after
# steps 2 and 4.
RUN = [*MODEL, "--train-ratio", "0.91", "--batch-size", "8", "--max-steps", "4", "--eval-freq", "2",
       "--eval-iter", "2", "--save-every", "2", "--seed", "3", "--no-progress"]


def cli(*argv) -> tuple[int, str]:
    """``python -m gptjax.train ARGV`` in this process: (exit code, stderr); its stdout goes to our stderr."""
    err = io.StringIO()
    with contextlib.redirect_stdout(sys.stderr), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue().strip()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_diff(a, b) -> float:
    """Largest absolute difference between two trees (0.0: bitwise equal values)."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) if x.size else 0.0
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def shard_shapes(tree) -> dict:
    """Shape of one leaf (an FSDP-ruled kernel) and of its first addressable shard."""
    kernel = tree["trf_blocks"][0]["ff"]["layers"][0]["kernel"]
    return {"shape": list(kernel.shape), "shard": list(kernel.addressable_shards[0].data.shape),
            "devices": len(kernel.sharding.device_set)}


def one_process(out: Path) -> dict:
    result: dict = {"device_count": jax.device_count()}

    # 1. The same run on one device and on three meshes.
    meshes = {"single": [], "data=8": ["--mesh", "data=8"], "fsdp=8": ["--mesh", "fsdp=8"],
              "data=4,fsdp=2": ["--mesh", "data=4,fsdp=2"]}
    result["runs"] = {}
    for name, flags in meshes.items():
        code, err = cli(*RUN, *flags, "--out", out / name)
        assert code == 0, err
        result["runs"][name] = records(out / name)
    cfg = config_from_dict(json.loads((out / "single" / "config.json").read_text())["model"])

    # 2. The 4x2 run's checkpoint of step 2 picked up on 8x1 and on one device (as if the run had stopped
    # there): the restored state is the saved one bit for bit, and training continues as before.
    opt = make_optimizer(TrainConfig(), 100)
    saved = restore_checkpoint(out / "data=4,fsdp=2", *sharding.abstract_state(cfg, opt), step=2)
    result["restore"], result["resumed"] = {}, {}
    for name, flags in {"data=8": ["--mesh", "data=8"], "single": []}.items():
        mesh = sharding.make_mesh(sharding.parse_mesh(flags[1])) if flags else None
        params, opt_state, position, _ = restore_checkpoint(
            out / "data=4,fsdp=2", *sharding.abstract_state(cfg, opt, mesh), step=2)
        result["restore"][name] = {"params_diff": max_diff(params, saved[0]),
                                   "opt_state_diff": max_diff(opt_state, saved[1]),
                                   "step": position.step, **shard_shapes(params)}
        copy = out / f"resume-{name}"
        shutil.copytree(out / "data=4,fsdp=2", copy)
        shutil.rmtree(copy / "checkpoints" / "4")
        code, err = cli("--resume", copy, "--max-steps", 4, "--no-progress", *flags)
        assert code == 0, err
        result["resumed"][name] = records(copy)

    # 3. Parameters and optimizer state created in their shards, equal to the one-device initialisation;
    # weights loaded whole (--init-from) placed in shards.
    mesh = sharding.make_mesh({"fsdp": 8})
    key = jax.random.key(3)
    params = sharding.init_sharded_params(cfg, key, mesh)
    reference = init_params(cfg, key)
    result["init_diff"] = max_diff(params, reference)
    result["fsdp_params"] = shard_shapes(params)
    result["fsdp_mu"] = shard_shapes(sharding.init_sharded_opt_state(opt, params, mesh).inner_state[0].mu)
    result["loaded_diff"] = max_diff(sharding.shard_params(jax.device_get(reference), mesh), reference)

    # 4. Greedy sampling with sharded parameters gives the one-device tokens.
    prompt = np.array([[6109, 3626, 6100, 345]], np.int32)  # "Every effort moves you"
    result["generate"] = {"sharded": generate(params, cfg, prompt, 6).tolist(),
                          "single": generate(reference, cfg, prompt, 6).tolist()}

    # 5. The loader: each step's rows as global arrays, equal to the plain loader's, with accumulation too.
    ids = np.arange(8 * 32 * 5 + 1) % 251
    loader = create_dataloader(ids, batch_size=8, max_length=32, stride=32, shuffle=True, seed=1)
    sharded = sharding.ShardedLoader(loader, sharding.make_mesh({"data": 4, "fsdp": 2}))
    plain = list(loader.batches(1, start=1))
    grouped = list(sharded.step_batches(1, 1, 2))
    result["loader"] = {
        "batches_equal": all(np.array_equal(a, b) for pa, pb in zip(plain, sharded.batches(1, start=1))
                             for a, b in zip(pa, pb)),
        "grouped_equal": all(np.array_equal(g[k][i], plain[2 * n + i][k])
                             for n, g in enumerate(grouped) for i in range(2) for k in range(2)),
        "groups": len(grouped),
        "grouped_spec": str(grouped[0][0].sharding.spec),
        "batch_spec": str(next(iter(sharded))[0].sharding.spec),
    }

    # 6. Clear one-line errors, before anything is written.
    result["errors"] = {}
    for name, flags in {"batch": ["--mesh", "data=8", "--batch-size", "4"], "devices": ["--mesh", "data=3"],
                        "axis": ["--mesh", "model=8"]}.items():
        code, err = cli(*MODEL, *flags, "--out", out / f"error-{name}")
        result["errors"][name] = {"code": code, "message": err, "dir_made": (out / f"error-{name}").exists()}
    return result


def one_of_two_processes(out: Path, process_id: int, address: str) -> None:
    reads = []
    real_getitem = GPTDataset.__getitem__

    def logged_getitem(self, i):
        reads.append(["train" if len(self) > 100 else "val", int(i)])  # 145 training and 15 validation windows
        return real_getitem(self, i)

    GPTDataset.__getitem__ = logged_getitem
    join = ["--coordinator", address, "--num-processes", 2, "--process-id", process_id]
    code, err = cli(*RUN, *join, "--mesh", "data=4,fsdp=2", "--out", out / "multi")
    assert code == 0, err
    (out / f"reads-{process_id}.json").write_text(json.dumps(reads))
    code, err = cli("--resume", out / "multi-resume", "--max-steps", 4, "--no-progress", *join, "--mesh", "fsdp=8")
    assert code == 0, err


if __name__ == "__main__":
    if MULTI:
        one_of_two_processes(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    else:
        print(json.dumps(one_process(Path(sys.argv[1]))))
