"""Atomic writes: a reader (or a crash) sees either the old file / folder or the complete new one, never a part.

One rule for every file and folder paca_hpu writes (adapter files, ``metrics.json``, checkpoint folders, exports, the
embedded model's cache entry; the benchmark harness uses it too):

* a file is written under a unique temporary name in the same directory (``.<name>.<random>.tmp``, created
  exclusively, so concurrent writers never share one), flushed to disk (``fsync``), given the permissions a plain
  ``open()`` would give it, renamed over the target (``os.replace``, atomic on POSIX and Windows), and the directory
  is flushed so that the rename itself survives a power loss;
* a folder is filled under a unique temporary name beside the target, every file in it and the folder itself are
  flushed, then it is renamed into place (an existing target is moved aside first and removed afterwards);
* on any error (disk full, a failing serializer, ``KeyboardInterrupt``) the temporary file or folder is removed and
  the target is untouched. Only a process killed mid-write leaves its temporary behind (under a name that starts
  with a dot and never is the target's).

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

__all__ = ["write_atomic", "write_text_atomic", "write_json_atomic", "atomic_directory", "replace_directory",
           "fsync_dir", "fsync_tree"]

PathLike = Union[str, "os.PathLike[str]"]


def _unique(directory: str, prefix: str, suffix: str, make: Callable[[str], Any]):
    """``make(candidate)`` for the first candidate name ``<prefix><random><suffix>`` in ``directory`` that does not
    exist yet (``make`` must fail with ``FileExistsError`` when it does)."""
    for _ in range(100):
        candidate = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return make(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no unused temporary name '{prefix}...{suffix}' in '{directory}'")


def fsync_dir(folder: PathLike) -> None:
    """Flush ``folder``'s entries (renames, new files) to disk; a no-op where directories cannot be opened or
    flushed (Windows, some network file systems)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: PathLike) -> None:
    """Flush every file below ``folder`` and every folder in it (``folder`` included) to disk.

    Raises:
        OSError: a file cannot be opened or flushed (for example a full disk reported late).
    """
    for dirpath, _dirs, files in os.walk(os.fspath(folder), topdown=False):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def write_atomic(path: PathLike, write: Callable[[str], Any]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a new empty temporary file ``tmp`` (a path string in the same
    directory; ``write`` may also replace that file, as ``safetensors.torch.save_file`` does), which is then flushed,
    given the permissions ``open()`` gives a new file (``0o666`` less the umask), renamed over ``path``, and the
    directory is flushed.

    Raises:
        whatever ``write`` raises, or ``OSError`` from the file system; the temporary file is removed first and
        ``path`` is as it was.
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    directory = directory or "."

    def create(candidate: str):
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            return candidate, os.fstat(fd).st_mode & 0o777  # 0o666 less the umask: what open() would give
        finally:
            os.close(fd)

    tmp, mode = _unique(directory, f".{name}.", ".tmp", create)
    try:
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that replaced the file (safetensors: 0o600)
            os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write the string ``text`` to ``path`` atomically (:func:`write_atomic`), encoded with ``encoding``."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)

    write_atomic(path, write)


def write_json_atomic(path: PathLike, obj: Any, *, indent: Optional[int] = None, sort_keys: bool = False,
                      default: Optional[Callable[[Any], Any]] = None) -> None:
    """Write ``obj`` as JSON (``json.dumps(obj, indent=..., sort_keys=..., default=...)`` plus a final newline,
    UTF-8) to ``path`` atomically (:func:`write_atomic`).

    Raises:
        TypeError / ValueError: ``obj`` is not JSON-serialisable (raised before anything is written).
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n"
    write_text_atomic(path, text)


def replace_directory(src: PathLike, final: PathLike, trash: Optional[PathLike] = None) -> None:
    """Make the finished folder ``src`` appear as ``final`` in one rename: every file in ``src`` and ``src`` itself
    are flushed first, the parent folder after the rename.

    An existing ``final`` is first moved into ``trash`` (as ``trash/replaced``; a folder on the same file system that
    the caller removes afterwards); if the rename of ``src`` then fails, ``final`` is moved back. A process killed
    between the two renames leaves ``final`` missing and the old one in ``trash``.

    Raises:
        ValueError: ``final`` exists and no ``trash`` is given.
        OSError: from the file system.
    """
    src, final = os.fspath(src), os.fspath(final)
    fsync_tree(src)
    aside = None
    if os.path.lexists(final):
        if trash is None:
            raise ValueError(f"'{final}' exists; pass a trash folder to move it into")
        aside = os.path.join(os.fspath(trash), "replaced")
        os.replace(final, aside)
    try:
        os.replace(src, final)
    except BaseException:
        if aside is not None:
            os.replace(aside, final)
        raise
    fsync_dir(os.path.dirname(final) or ".")


def _plain_file_modes(folder: Path) -> None:
    """Give every file under ``folder`` that a writer created as ``0o600`` (``safetensors.torch.save_file`` does) the
    mode ``open()`` gives a new file: ``0o666`` less the umask, read off ``folder`` itself (made by ``mkdir`` with
    ``0o777`` less the umask), so that an export is readable by whoever may read the folder's other files."""
    mode = os.stat(folder).st_mode & 0o666
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and os.stat(path).st_mode & 0o777 == 0o600 and mode != 0o600:
                os.chmod(path, mode)


@contextlib.contextmanager
def atomic_directory(final: PathLike, *, prefix: Optional[str] = None) -> Iterator[Path]:
    """A new empty folder beside ``final`` (named ``<prefix><random>``; default prefix ``.<name>.tmp-``, created with
    the permissions ``mkdir`` gives) for the block to fill. When the block completes, files the block wrote with mode
    ``0o600`` get ``open()``'s mode (safetensors writes 0o600) and the folder replaces ``final``
    (:func:`replace_directory`; an existing ``final`` is moved into a folder ``<prefix>old-<random>`` and removed);
    when it raises, the folder is removed and ``final`` is untouched.

    Yields:
        the temporary folder (``pathlib.Path``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = prefix if prefix is not None else f".{final.name}.tmp-"

    def new_dir(candidate: str) -> Path:
        os.mkdir(candidate, 0o777)
        return Path(candidate)

    tmp = _unique(str(final.parent), prefix, "", new_dir)
    trash = None
    try:
        yield tmp
        _plain_file_modes(tmp)
        if os.path.lexists(final):
            trash = _unique(str(final.parent), prefix + "old-", "", new_dir)
        replace_directory(tmp, final, trash)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
