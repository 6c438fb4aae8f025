"""The command-line tools keep jax's persistent compilation cache (``--compile-cache``, ``--no-compile-cache``,
``GPTJAX_COMPILE_CACHE``), by default in ``$XDG_CACHE_HOME/gptjax/xla``.

The test session has its own cache (conftest's ``jax.config``), so every run that compiles is a fresh
``python -m gptjax.generate`` process, with the user's cache variables taken out of its environment and
``XDG_CACHE_HOME`` pointed into a tmp folder (no test writes to the real home).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptjax import GPTConfig, compile_cache, init_params, save_weights

ROOT = Path(__file__).resolve().parent.parent
CACHE_VARS = ("GPTJAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE", "XDG_CACHE_HOME",
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")
TOOLS_WITH_THE_FLAGS = {  # each tool's required arguments
    "generate": ["--weights", "w", "--prompt", "p"],
    "evaluate": ["--weights", "w"],
    "serve": ["--weights", "w"],
    "train": [],
}
# These compile nothing with jax (convert and prepare move arrays with numpy; aot compiles for devices that
# are not there and reports the compile itself, which a cache hit would hide).
TOOLS_WITHOUT = ("convert", "prepare", "download", "aot")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.0)
    path = tmp_path_factory.mktemp("weights") / "tiny"
    save_weights(init_params(cfg, seed=0), cfg, path)
    return str(path)


@pytest.fixture
def xdg(tmp_path) -> Path:
    return tmp_path / "xdg"


def entries(folder: Path) -> set[str]:
    """The compiled programs jax keeps in ``folder`` (one ``<name>-<key>-cache`` file each)."""
    return {p.name for p in folder.glob("*-cache")} if folder.is_dir() else set()


def generate_run(weights: str, xdg: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    environ.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(xdg), **env)
    r = subprocess.run([sys.executable, "-m", "gptjax.generate", "--weights", weights, "--prompt", "Hi",
                        "--max-new-tokens", "3", "--temperature", "0", *flags],
                       cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    return r


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hi")
    return r.stdout


def test_flag_folder_fills_once_then_is_reused(weights, xdg, tmp_path):
    folder = tmp_path / "new" / "cache"  # created, parents too
    first = ok(generate_run(weights, xdg, "--compile-cache", str(folder)))
    kept = entries(folder)
    assert any(name.startswith("jit__decode") for name in kept), kept  # small decode programs are cached too
    assert any(name.startswith("jit__prefill") for name in kept), kept
    second = ok(generate_run(weights, xdg, "--compile-cache", str(folder)))
    assert entries(folder) == kept  # every program came from the cache: nothing new compiled
    assert second == first
    assert ok(generate_run(weights, xdg, "--no-compile-cache")) == first  # the same text as compiled afresh
    assert entries(xdg / "gptjax" / "xla") == set()  # the flag's folder replaces the default one


def test_default_folder_follows_xdg_cache_home(weights, xdg):
    ok(generate_run(weights, xdg))
    assert entries(xdg / "gptjax" / "xla")


def test_environment_variable_moves_the_cache_and_the_flag_wins(weights, xdg, tmp_path):
    env_dir, flag_dir = tmp_path / "env", tmp_path / "flag"
    ok(generate_run(weights, xdg, GPTJAX_COMPILE_CACHE=str(env_dir)))
    assert entries(env_dir) and entries(xdg / "gptjax" / "xla") == set()
    ok(generate_run(weights, xdg, "--compile-cache", str(flag_dir), GPTJAX_COMPILE_CACHE=str(tmp_path / "unused")))
    assert entries(flag_dir) and not (tmp_path / "unused").exists()


@pytest.mark.parametrize("how", ["--no-compile-cache", "off", ""])
def test_off_writes_nothing(weights, xdg, tmp_path, how):
    env_dir = tmp_path / "env"
    if how == "--no-compile-cache":  # the flag wins over the variable's folder as well
        r = generate_run(weights, xdg, how, GPTJAX_COMPILE_CACHE=str(env_dir))
    else:
        r = generate_run(weights, xdg, GPTJAX_COMPILE_CACHE=how)
    ok(r)
    assert not (xdg / "gptjax").exists() and not env_dir.exists()
    assert r.stderr == ""


def test_jax_own_cache_dir_is_left_alone(weights, xdg, tmp_path):
    jax_dir = tmp_path / "jax"
    ok(generate_run(weights, xdg, JAX_COMPILATION_CACHE_DIR=str(jax_dir)))
    assert jax_dir.is_dir()  # jax's cache, with jax's own thresholds (under 1 s of compiling is not kept)
    assert not (xdg / "gptjax").exists()
    ok(generate_run(weights, xdg, JAX_ENABLE_COMPILATION_CACHE="false"))  # jax's own off switch
    assert not (xdg / "gptjax").exists()
    # gptjax's own settings win over it.
    ok(generate_run(weights, xdg, "--no-compile-cache", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax2")))
    assert not (tmp_path / "jax2").exists()


def test_unusable_folder_asked_for_is_one_line_error(weights, xdg, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for flags, env, names in (
        (["--compile-cache", str(a_file)], {}, ("--compile-cache", "--no-compile-cache")),
        (["--compile-cache", str(a_file / "below")], {}, ("--compile-cache", "--no-compile-cache")),
        ([], {"GPTJAX_COMPILE_CACHE": str(a_file)}, ("GPTJAX_COMPILE_CACHE=", "or to off")),
    ):
        r = generate_run(weights, xdg, *flags, **env)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
        assert all(name in r.stderr for name in names), r.stderr
        assert str(a_file) in r.stderr
    assert a_file.read_text() == "not a folder"


def test_unusable_default_folder_is_a_note_and_no_cache(weights, xdg, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    r = generate_run(weights, a_file)  # XDG_CACHE_HOME is a file: nobody asked for this folder
    ok(r)
    assert r.stderr.startswith("note: the default compilation cache folder") and r.stderr.count("\n") == 1
    assert "GPTJAX_COMPILE_CACHE" in r.stderr and "--compile-cache" in r.stderr


def test_empty_flag_is_an_error():
    with pytest.raises(ValueError, match="compile_cache needs a folder; to turn the cache off, pass compile_cache=False"):
        compile_cache.compile_cache_choice("", environ={})


@pytest.mark.parametrize("tool", sorted(TOOLS_WITH_THE_FLAGS))
def test_flags_parse_in_every_tool_that_compiles(tool, capsys):
    module, required = importlib.import_module(f"gptjax.cli.{tool}"), TOOLS_WITH_THE_FLAGS[tool]
    parse = module.build_parser().parse_args
    assert vars(parse([*required, "--compile-cache", "some/dir"]))["compile_cache"] == "some/dir"
    assert vars(parse([*required, "--no-compile-cache"]))["compile_cache"] is False
    assert vars(parse(required)).get("compile_cache") is None  # train's parser leaves it out
    with pytest.raises(SystemExit):
        parse([*required, "--compile-cache", "d", "--no-compile-cache"])
    assert "not allowed with argument" in capsys.readouterr().err
    help_text = module.build_parser().format_help()
    assert "GPTJAX_COMPILE_CACHE" in help_text and "--no-compile-cache" in help_text


@pytest.mark.parametrize("tool", TOOLS_WITHOUT)
def test_tools_that_compile_nothing_have_no_cache_flags(tool):
    assert "--compile-cache" not in importlib.import_module(f"gptjax.cli.{tool}").build_parser().format_help()


def test_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    choice = compile_cache.compile_cache_choice
    default = str(tmp_path / "xdg" / "gptjax" / "xla")
    assert choice(None, {}) == compile_cache.CompileCacheChoice(default, None, False)
    assert choice(None, {}, jax_configured=True).source == compile_cache.LEAVE_TO_JAX
    env = {"GPTJAX_COMPILE_CACHE": str(tmp_path / "env")}
    assert choice(None, env, jax_configured=True).dir == str(tmp_path / "env")  # gptjax's variable beats jax's
    assert choice("flag", env).dir == str(Path("flag").absolute())  # the flag beats both
    assert choice(False, env) == compile_cache.CompileCacheChoice(None, "compile_cache=False", True)
    for off in ("0", "off", "false", "", " Off ", "FALSE"):
        assert choice(None, {"GPTJAX_COMPILE_CACHE": off}).dir is None
    assert choice(None, {"GPTJAX_COMPILE_CACHE": "~/x"}).dir == str(Path.home() / "x")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec ignores a relative value
    assert compile_cache.default_compile_cache_dir() == Path.home() / ".cache" / "gptjax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_compile_cache_dir() == Path.home() / ".cache" / "gptjax" / "xla"


def test_resume_may_name_a_compile_cache(tmp_path):
    train = importlib.import_module("gptjax.cli.train")
    # The cache changes no result, so it is not one of the settings a resumed run must keep.
    train.check_resume_flags({"resume": str(tmp_path / "run"), "compile_cache": "d"})
    with pytest.raises(ValueError, match="--lr cannot change when resuming"):
        train.check_resume_flags({"resume": str(tmp_path / "run"), "compile_cache": "d", "lr": 0.1})
