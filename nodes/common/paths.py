"""File names from users, and the files we write: confining names to a folder, writing atomically."""

from __future__ import annotations

import contextlib
import os
import secrets


class PathOutsideFolderError(ValueError):
    """A file name that would leave its folder: ``..``, an absolute path, or a symlink pointing out."""


def confine(folder: str | os.PathLike, name: str) -> str:
    """Resolve ``name`` inside ``folder`` and refuse anything that ends up outside it.

    Both sides go through ``realpath``, so ``..`` segments and symlinks that point out of the folder are
    caught, then ``commonpath`` checks containment (a prefix test would let ``/data/input2`` pass for
    ``/data/input``).

    Args:
        folder: the folder that must contain the result.
        name: a relative file name from the user, such as ``"sub/cat.png"``.
    Returns:
        The resolved absolute path; the file need not exist.
    Raises:
        PathOutsideFolderError: ``name`` is empty, absolute, or resolves outside ``folder``.
    Example:
        >>> confine("/tmp", "a/b.png")
        '/tmp/a/b.png'
        >>> confine("/tmp", "../etc/passwd")
        Traceback (most recent call last):
        ...
        nodes.common.paths.PathOutsideFolderError: '../etc/passwd' leaves its folder; give a name inside it
    """
    if not name or "\x00" in name or os.path.isabs(name):
        raise PathOutsideFolderError(f"{name!r} is not a relative file name inside its folder")
    base = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:
        raise PathOutsideFolderError(f"{name!r} leaves its folder; give a name inside it")
    return path


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one, never a part.

    The bytes go to a hidden temporary file in the same folder (a rename is atomic only within one file
    system), are flushed to disk with ``fsync``, and the temporary file then replaces ``path`` with
    ``os.replace``. If anything fails, the temporary file is removed and the error is raised; ``path`` is left
    as it was.

    Args:
        path: the file to create or replace; its folder must exist.
        data: the complete new content.
    Raises:
        OSError: the folder is missing or not writable, the disk is full, or ``path`` is a folder.
    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     atomic_write(os.path.join(folder, "a.txt"), b"hello")
        ...     with open(os.path.join(folder, "a.txt"), "rb") as file:
        ...         print(file.read(), os.listdir(folder))
        b'hello' ['a.txt']
    """
    folder, name = os.path.split(os.path.abspath(path))
    # A dot name with a .tmp suffix keeps a half-written file out of folder listings that filter by extension.
    # os.open rather than tempfile.mkstemp: mkstemp creates the file 0600, and the final file would keep that
    # mode instead of the usual umask one.
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
