"""Atelier's own small files: float64 tensors in ``.safetensors`` with a format name and a version in the
metadata, written atomically and read without unpickling anything (routers, NoiseShift tables)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .paths import atomic_write


def write_tagged(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], file_format: str, version: str,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (as float64) with ``format``, ``version`` and ``metadata`` (strings) atomically: readers
    see the old file or the whole new one.

    Raises:
        OSError: the folder is missing or not writable.
    """
    tags = {"format": file_format, "version": version, **(metadata or {})}
    atomic_write(path, safetensors_bytes({name: t.double().contiguous() for name, t in tensors.items()}, tags))


def read_tagged(path: str | os.PathLike, kind: str, file_format: str,
                versions: Sequence[str]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a file :func:`write_tagged` wrote as ``file_format`` in one of ``versions``
    (the last is the current one), ``kind`` naming it in errors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, or another format or version.
    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_tagged(os.path.join(folder, "t.safetensors"), {"x": torch.ones(2)}, "demo", "1", {"n": "a"})
        ...     metadata, tensors = read_tagged(os.path.join(folder, "t.safetensors"), "demo file", "demo", ("1",))
        >>> metadata["n"], tensors["x"].dtype
        ('a', torch.float64)
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {kind} file {os.fspath(path)!r}")
    try:
        with safe_open(os.fspath(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except SafetensorError as error:
        raise ValueError(f"{os.fspath(path)!r} is not a safetensors file: {error}") from error
    if metadata.get("format") != file_format or metadata.get("version") not in versions:
        raise ValueError(f"{os.fspath(path)!r} is not an Atelier {kind} of version {versions[-1]}; its metadata says "
                         f"format {metadata.get('format')!r}, version {metadata.get('version')!r}")
    return metadata, tensors
