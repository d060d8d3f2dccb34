"""Confining user-supplied file names to a folder."""

from __future__ import annotations

import os


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
