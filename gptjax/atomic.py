"""Atomic writes: a failed save leaves the destination as it was, never half-written, and a save into an
existing folder replaces only the files it writes.

Everything written gets the modes an ordinary ``open``/``mkdir`` would give (0644 files and 0755 folders
under umask 022), not the private 0600/0700 of temporary files: models and runs are often shared.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

OVERWRITE_HINT = "pass overwrite=True to replace it"


def check_overwrite(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing ``path`` (an empty folder holds nothing to lose)
    unless ``overwrite``."""
    p = Path(path)
    if not overwrite and p.exists() and not (p.is_dir() and not any(p.iterdir())):
        raise ValueError(f"{path} already exists; {OVERWRITE_HINT}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces it when the block succeeds, and is removed if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named, not created: the writer creates it (torch.save, open, ...), beside path so the rename is atomic.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        _ordinary_modes(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


class atomic_dir:  # noqa: N801 (used like a function, as contextlib's context managers are)
    """``with atomic_dir(path, names, replaceable) as tmp:`` a temporary directory in which to write the
    entries ``names`` of the folder ``path``.

    A new (or empty) ``path`` appears whole when the block succeeds. An existing one needs ``overwrite``;
    then each entry moves into it on its own (atomically, the slow writing all done before the first move)
    and every other file of the folder stays as it was. Entries of those names in a folder that is not of
    this format (``replaceable(path)`` false) are never replaced. All of this is checked on construction,
    so a writer can build it before its slow work."""

    def __init__(self, path: str | os.PathLike, names: Collection[str], replaceable: Callable[[Path], bool], *,
                 overwrite: bool = False):
        self.path, self.names = Path(path).absolute(), frozenset(names)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{path} is a file, and this format is a folder; choose a folder path")
        self.in_place = self.path.is_dir() and any(self.path.iterdir())
        if self.in_place:
            check_overwrite(path, overwrite)
            clash = sorted(n for n in self.names if (self.path / n).exists())
            if clash and not replaceable(self.path):
                raise ValueError(f"{path} holds a {clash[0]} that is not from weights of this format; "
                                 "write to another folder")

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _commit(self) -> None:
        written = {p.name for p in self.tmp.iterdir()}
        assert written <= self.names, f"wrote {sorted(written - self.names)} beyond the declared {sorted(self.names)}"
        _ordinary_modes(self.tmp)
        if not self.in_place:
            with contextlib.suppress(FileNotFoundError):
                self.path.rmdir()  # an empty folder: nothing in it to keep
            os.replace(self.tmp, self.path)
            return
        for name in sorted(written):
            _replace_entry(self.tmp / name, self.path / name, self.tmp)


@contextlib.contextmanager
def made_dirs(folder: str | os.PathLike) -> Iterator[Path]:
    """``folder``, created with any missing parents; if the block fails, the folders it created that are
    still empty are removed again (a folder with something in it, say a partial download, stays)."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty (or already gone): it and its parents stay
                break
        raise


def _replace_entry(new: Path, dest: Path, scratch: Path) -> None:
    """``new`` becomes ``dest``; a folder cannot be replaced by one rename, so the old one is moved aside first."""
    if dest.is_dir() and not dest.is_symlink():
        old = scratch / f".old-{dest.name}"
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old)
    else:
        os.replace(new, dest)


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ordinary_modes(root: Path) -> None:
    """``root`` and everything under it: files 0666 and folders 0777, less the umask (what open() and mkdir()
    give); tempfile and some libraries' writers create them private."""
    mask = _umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if not root.is_dir():
        if root.exists():
            os.chmod(root, file_mode)
        return
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), dir_mode)
        for f in files:
            os.chmod(os.path.join(folder, f), file_mode)
