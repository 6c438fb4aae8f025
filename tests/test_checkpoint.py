"""orbax checkpoints: exact round trips with int keys, the three layouts, damage, and a save killed midway."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import gptjax
from gptjax import GPTConfig
from gptjax.checkpoint import (
    checkpoint_manager,
    is_gptjax_checkpoint,
    latest_step,
    load_params,
    restore_checkpoint,
    save_checkpoint,
    save_params,
)
from gptjax.training import Position, TrainConfig, init_opt_state, make_optimizer

CFG = GPTConfig(vocab_size=257, context_length=32, emb_dim=48, n_layers=2, n_heads=4, qkv_bias=True)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def params():
    return gptjax.init_params(CFG, seed=7)


def assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def make_run(run_dir: Path, params, steps=(2, 4)):
    """A run directory with checkpoints at ``steps`` (params shifted per step so they differ)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    opt = make_optimizer(TrainConfig(), 100)
    state = init_opt_state(opt, params)
    manager = checkpoint_manager(run_dir, keep=3)
    for s in steps:
        shifted = jax.tree_util.tree_map(lambda x: x + s, params)
        save_checkpoint(manager, Position(s, 1, s % 3, 64 * s), shifted, state, jax.random.key(11), CFG)
    manager.close()
    return opt, state


def test_save_params_round_trip_keeps_int_keys(params, tmp_path):
    save_params(params, CFG, tmp_path / "w")
    assert sorted(os.listdir(tmp_path)) == ["w"]  # no temporary directory left beside it
    loaded, cfg = load_params(tmp_path / "w")
    assert cfg == CFG
    assert 0 in loaded["trf_blocks"] and 2 in loaded["trf_blocks"][0]["ff"]["layers"]
    assert_same_tree(loaded, params)
    # Overwriting an earlier save needs overwrite=True, and replaces it.
    with pytest.raises(ValueError, match=r"w already exists; pass overwrite=True to replace it"):
        save_params(params, CFG, tmp_path / "w")
    save_params(jax.tree_util.tree_map(lambda x: x * 2, params), CFG, tmp_path / "w", overwrite=True)
    assert_same_tree(load_params(tmp_path / "w")[0], jax.tree_util.tree_map(lambda x: x * 2, params))
    assert sorted(os.listdir(tmp_path)) == ["w"]


def test_save_params_refuses_to_replace_something_else(params, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes already exists; pass overwrite=True"):
        save_params(params, CFG, tmp_path / "notes")
    save_params(params, CFG, tmp_path / "notes", overwrite=True)  # beside the user's file, which stays
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep me"
    assert_same_tree(load_params(tmp_path / "notes")[0], params)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')  # someone else's config.json
    with pytest.raises(ValueError, match="holds a config.json that is not from weights of this format"):
        save_params(params, CFG, tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "config.json").read_text() == '{"model_type": "gpt2"}'
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json"]


def test_run_checkpoints_restore_exactly(params, tmp_path):
    opt, state = make_run(tmp_path / "run", params, steps=(2, 4, 6, 8))
    assert latest_step(tmp_path / "run") == 8
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4", "6", "8"]  # keep=3
    target_p = jax.eval_shape(lambda: params)
    target_s = jax.eval_shape(opt.init, target_p)
    p, s, position, key = restore_checkpoint(tmp_path / "run", target_p, target_s, step=6)
    assert position == Position(6, 1, 0, 384)
    assert_same_tree(p, jax.tree_util.tree_map(lambda x: x + 6, params))
    assert_same_tree(s, state)
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(11)))
    # load_params reads the run's latest checkpoint, or a given step directory.
    assert_same_tree(load_params(tmp_path / "run")[0], jax.tree_util.tree_map(lambda x: x + 8, params))
    loaded, cfg = load_params(tmp_path / "run" / "checkpoints" / "4")
    assert cfg == CFG
    assert_same_tree(loaded, jax.tree_util.tree_map(lambda x: x + 4, params))


def test_is_gptjax_checkpoint(params, tmp_path):
    make_run(tmp_path / "run", params, steps=(1,))
    save_params(params, CFG, tmp_path / "w")
    (tmp_path / "model.pth").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert is_gptjax_checkpoint(tmp_path / "run")
    assert is_gptjax_checkpoint(tmp_path / "run" / "checkpoints" / "1")
    assert is_gptjax_checkpoint(tmp_path / "w")
    for other in ("model.pth", "empty", "missing"):
        assert not is_gptjax_checkpoint(tmp_path / other)
    with pytest.raises(ValueError, match="is not a gptjax checkpoint"):
        load_params(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_params(tmp_path / "missing")


# orbax leaves an asyncio callback behind when a read fails; it is harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoints_give_a_one_line_error(params, tmp_path):
    save_params(params, CFG, tmp_path / "w")
    # Truncate every stored array file: the kind of damage a full disk or an interrupted copy leaves.
    for f in (tmp_path / "w" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(ValueError) as e:
        load_params(tmp_path / "w")
    assert "cannot read the gptjax checkpoint" in str(e.value) and "\n" not in str(e.value)

    save_params(params, CFG, tmp_path / "v")
    (tmp_path / "v" / "params" / "_METADATA").unlink()
    with pytest.raises(ValueError, match="cannot read the gptjax checkpoint") as e:
        load_params(tmp_path / "v")
    assert "\n" not in str(e.value)


def test_unfinished_save_is_ignored_and_cleaned_up(params, tmp_path):
    make_run(tmp_path / "run", params, steps=(2,))
    # What a save of step 3 killed midway leaves: orbax's temporary directory, never renamed.
    partial = tmp_path / "run" / "checkpoints" / "3.orbax-checkpoint-tmp"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "junk").write_bytes(b"\0" * 10)
    assert latest_step(tmp_path / "run") == 2
    assert_same_tree(load_params(tmp_path / "run")[0], jax.tree_util.tree_map(lambda x: x + 2, params))
    # A resumed run saving step 3 again: the leftover goes, the new save takes its place.
    manager = checkpoint_manager(tmp_path / "run")
    opt = make_optimizer(TrainConfig(), 100)
    save_checkpoint(manager, Position(3), params, init_opt_state(opt, params), jax.random.key(0), CFG)
    manager.close()
    assert not partial.exists() and latest_step(tmp_path / "run") == 3


KILLED_SAVER = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from gptjax import GPTConfig
    from gptjax.checkpoint import checkpoint_manager, save_checkpoint
    from gptjax.training import Position
    cfg = GPTConfig(vocab_size=257, context_length=32, emb_dim=48, n_layers=2, n_heads=4)
    manager = checkpoint_manager(sys.argv[1])
    big = {"w": jnp.ones((64, 1024, 1024), jnp.float32)}  # 256 MiB: a save that takes a while
    save_checkpoint(manager, Position(1), {"w": jnp.zeros((4,))}, {"n": jnp.zeros(())}, jax.random.key(0), cfg)
    print("saved 1", flush=True)
    for step in range(2, 1000):
        save_checkpoint(manager, Position(step), big, {"n": jnp.zeros(())}, jax.random.key(0), cfg)
""")


def test_process_killed_during_save_leaves_last_checkpoint_loadable(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved 1"
        deadline = time.time() + 60
        while not list((run / "checkpoints").glob("*.orbax-checkpoint-tmp*")):  # a save under way
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    step = latest_step(run)
    assert step is not None and step >= 1
    tmp_dirs = list((run / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    assert all(int(d.name.split(".")[0]) > step for d in tmp_dirs)  # any unfinished save is newer
    assert (run / "checkpoints" / str(step) / "params").is_dir()
    from gptjax.checkpoint import _restore_tree  # the array files of the last finished save are intact

    shape = (4,) if step == 1 else (64, 1024, 1024)
    restored = _restore_tree(run / "checkpoints" / str(step) / "params",
                             {"w": jax.ShapeDtypeStruct(shape, np.float32)})
    assert float(restored["w"].reshape(-1)[0]) == (0.0 if step == 1 else 1.0)


def test_restored_state_runs_without_recompiling(params, tmp_path):
    """Arrays restored by orbax have the types the step returns: a resumed run compiles once too."""
    opt, _ = make_run(tmp_path / "run", params, steps=(2,))
    target = jax.eval_shape(lambda: params)
    p, s, _, key = restore_checkpoint(tmp_path / "run", target, jax.eval_shape(opt.init, target))
    from gptjax.training import make_train_step

    step = make_train_step(CFG, opt)
    x = np.zeros((2, 8), np.int32)
    for i in range(3):
        p, s, _ = step(p, s, (x, x), jax.random.fold_in(key, i))
    assert step._cache_size() == 1
