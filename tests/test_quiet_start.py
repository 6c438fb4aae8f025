"""gptjax starts quietly on a machine without an accelerator, whatever extras are installed (issue 23).

The dev environment holds the CUDA 12 plugin and libtpu (for ``python -m gptjax.aot``); on this CPU-only
machine neither may print anything as jax starts. Each command runs in a fresh process with the user's
environment: conftest's ``JAX_PLATFORMS=cpu`` is taken out, since setting it is what a user should not need.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptjax import GPTConfig, init_params, save_weights

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("Traceback", "cudart_stub", "plugin configuration error", "Could not find cuda drivers",
         "absl::InitializeLog", "TPU")
TOOLS = ["aot", "convert", "download", "evaluate", "generate", "prepare", "serve", "train"]


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".cache" / "jax")
    env.update(extra)
    return env


def run(args: list[str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=user_env(**extra), capture_output=True,
                          text=True, timeout=600)


def assert_quiet(stderr: str) -> None:
    found = [n for n in NOISE if n in stderr]
    assert not found, f"start-up noise {found} on stderr:\n{stderr}"


@pytest.mark.parametrize("tool", TOOLS)
def test_help_is_quiet(tool):
    r = run(["-m", f"gptjax.{tool}", "--help"])
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    assert_quiet(r.stderr)


def test_generate_is_quiet_and_prints_only_its_text(tmp_path):
    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.0)
    save_weights(init_params(cfg, seed=0), cfg, tmp_path / "tiny")
    r = run(["-m", "gptjax.generate", "--weights", str(tmp_path / "tiny"), "--prompt", "Hi",
             "--max-new-tokens", "3", "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hi")
    assert_quiet(r.stderr)


def test_platform_choice_is_the_users_when_made():
    code = "import gptjax, jax; print(repr(jax.config.jax_platforms), jax.default_backend())"
    chosen = run(["-c", code])
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.split() == ["'cpu'", "cpu"]  # no accelerator here: only the CPU is started
    assert_quiet(chosen.stderr)
    # A user's JAX_PLATFORMS, even empty (every plugin), is left as the user set it.
    for value in ("cpu", ""):
        r = run(["-c", "import gptjax, jax; print(repr(jax.config.jax_platforms))"], JAX_PLATFORMS=value)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == repr(value)
