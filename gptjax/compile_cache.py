"""jax's persistent compilation cache, on by default for gptjax's tools: where it goes and how it is set up.

Precedence, most specific first: the caller's ``compile_cache`` (a folder, or False for none), then
``$GPTJAX_COMPILE_CACHE`` (a folder, or 0/off/false/empty for none), then jax's own configuration
(``JAX_COMPILATION_CACHE_DIR`` / ``jax.config``, left as it is), then ``$XDG_CACHE_HOME/gptjax/xla``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

COMPILE_CACHE_ENV = "GPTJAX_COMPILE_CACHE"
COMPILE_CACHE_OFF = ("0", "off", "false", "")  # GPTJAX_COMPILE_CACHE values that turn the cache off


def user_cache_dir() -> Path:
    """The user's cache folder: ``$XDG_CACHE_HOME``, else ``~/.cache`` (the XDG base directory spec's)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the spec ignores a relative value


def default_compile_cache_dir() -> Path:
    return user_cache_dir() / "gptjax" / "xla"


@dataclass(frozen=True)
class CompileCacheChoice:
    """Which compile cache the settings ask for: ``dir`` (None: none) and ``source``, the parameter or variable
    that chose it (None: the default folder; LEAVE_TO_JAX: jax's own configuration, kept); ``explicit`` when the user
    named it (a folder that cannot be used is then an error, not a note)."""

    dir: str | None
    source: str | None
    explicit: bool


LEAVE_TO_JAX = "jax"  # CompileCacheChoice.source when jax's own settings are kept
OFF = "compile_cache=False"  # CompileCacheChoice.source when the caller turned the cache off


class CompileCacheNote(UserWarning):
    """The default folder cannot hold the cache, so there is none: nobody asked for that folder, so it is a
    notice, not an error."""


def compile_cache_choice(compile_cache: str | os.PathLike | Literal[False] | None = None,
                         environ: dict[str, str] | None = None,
                         jax_configured: bool = False) -> CompileCacheChoice:
    """Which compile cache the settings ask for, most specific first: ``compile_cache`` (a folder, or False for
    none), then ``$GPTJAX_COMPILE_CACHE`` (a folder, or 0/off/false/empty for
    none), then jax's own configuration when ``jax_configured`` (left alone), then the user cache folder."""
    env = os.environ if environ is None else environ
    if compile_cache is False:
        return CompileCacheChoice(None, OFF, True)
    if compile_cache is not None:
        if not os.fspath(compile_cache).strip():
            raise ValueError(f"compile_cache needs a folder; to turn the cache off, pass {OFF}")
        return CompileCacheChoice(_cache_path(compile_cache), "compile_cache", True)
    if COMPILE_CACHE_ENV in env:
        value = env[COMPILE_CACHE_ENV]
        if value.strip().lower() in COMPILE_CACHE_OFF:
            return CompileCacheChoice(None, COMPILE_CACHE_ENV, True)
        return CompileCacheChoice(_cache_path(value), COMPILE_CACHE_ENV, True)
    if jax_configured:
        return CompileCacheChoice(None, LEAVE_TO_JAX, False)
    return CompileCacheChoice(str(default_compile_cache_dir()), None, False)


def _cache_path(value: str | os.PathLike) -> str:
    text = os.fspath(value)
    if "://" in text:  # a remote folder (gs://...), which jax reads through etils; checked by jax, not here
        return text
    return str(Path(text).expanduser().absolute())


def _jax_cache_configured() -> bool:
    """Whether the user set jax's compile cache up themselves: a folder through jax's own JAX_COMPILATION_CACHE_DIR
    or its config (``jax.config.update("jax_compilation_cache_dir", ...)`` in a notebook or test session calling
    ``main``), or the cache turned off (JAX_ENABLE_COMPILATION_CACHE=false). In a process that called
    setup_compile_cache before, its setting counts as configured too: it stays, as jax's config does."""
    import jax

    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return True
    return jax.config.jax_compilation_cache_dir is not None or not jax.config.jax_enable_compilation_cache


def _unusable(folder: str) -> str | None:
    """Why ``folder`` cannot hold the cache (created if missing), or None when it can."""
    if "://" in folder:
        return None
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "it is a file, not a folder"
    except OSError as e:
        return e.strerror or str(e)
    if not os.access(path, os.W_OK | os.X_OK):
        return "the folder is not writable"
    return None


def setup_compile_cache(compile_cache: str | os.PathLike | Literal[False] | None = None) -> str | None:
    """Point jax's persistent compilation cache where the settings say (see the module), before anything
    compiles; returns the folder in use (None: no cache, or jax's own configuration, which is left as it is).

    Every program is cached however fast it compiled or small it is (decode steps are both). A folder that
    was asked for and cannot be written is a ValueError naming ``compile_cache`` or the variable; the default
    folder unusable is a :class:`CompileCacheNote` warning and no cache. Nothing in the folder is ever
    deleted (jax's cache has no size limit by default: remove the folder to reclaim its space)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    choice = compile_cache_choice(compile_cache, jax_configured=_jax_cache_configured())
    if choice.source == LEAVE_TO_JAX:
        return jax.config.jax_compilation_cache_dir
    folder = choice.dir
    if folder is not None and (why := _unusable(folder)) is not None:
        if choice.explicit:
            raise ValueError(_unusable_message(choice, folder, why))
        warnings.warn(CompileCacheNote(
            f"the default compilation cache folder {folder} cannot be used ({why}): compiling without it; set "
            f"{COMPILE_CACHE_ENV} to a folder you can write (or to off), or pass compile_cache"), stacklevel=2)
        folder = None
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", folder)
        # Cache every program: jax's defaults skip those that compile in under a second, which are most of a
        # decode's; -1 also stops jax from raising the size floor for the file system. A user's own setting stays.
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax_cache.reset_cache()  # a cache jax already opened in this process (set up twice) is reopened
    return folder


def _unusable_message(choice: CompileCacheChoice, folder: str, why: str) -> str:
    if choice.source == "compile_cache":
        return (f"compile_cache {folder}: cannot keep the compilation cache there ({why}); give a folder you can "
                f"write, or {OFF}")
    return (f"{COMPILE_CACHE_ENV}={folder}: cannot keep the compilation cache there ({why}); set "
            f"{COMPILE_CACHE_ENV} to a folder you can write, or to off")
