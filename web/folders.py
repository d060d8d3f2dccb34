"""The standalone app's data folders: where uploads are read from and where results are written.

ComfyUI keeps these as module globals in ``folder_paths``; we pass one frozen :class:`DataFolders` value to
whoever needs it (the built-in nodes, the upload and ``/view`` routes), so two apps in one process (the tests)
never share folders.
"""

from __future__ import annotations

import dataclasses
import logging
import os

logger = logging.getLogger(__name__)

FILE_KINDS = ("input", "output", "temp")  # the ``type`` values of uploads, ``/view`` and ``ui.images`` items


def split_annotation(name: str, kind: str) -> tuple[str, str]:
    """A file name and its folder kind, reading an editor annotation such as ``"x.png [output]"``.

    Example:
        >>> split_annotation("cat.png [output]", "input"), split_annotation("cat.png", "input")
        (('cat.png', 'output'), ('cat.png', 'input'))
    """
    for annotated in FILE_KINDS:
        suffix = f" [{annotated}]"
        if name.endswith(suffix):
            return name[:-len(suffix)], annotated
    return name, kind


@dataclasses.dataclass(frozen=True)
class DataFolders:
    """Absolute, symlink-resolved paths of the four data folders.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as data:
        ...     folders = DataFolders.under(data)
        ...     print(os.path.basename(folders.folder("temp")), os.path.isdir(folders.user))
        temp True
    """

    input: str  # uploads; what LoadImage lists
    output: str  # SaveImage results
    temp: str  # PreviewImage results
    user: str  # userdata: settings, saved workflows

    @classmethod
    def under(cls, data_dir: str, output_dir: str | None = None) -> DataFolders:
        """The folders ``input``, ``output``, ``temp`` and ``user`` inside ``data_dir``, created if missing.

        Args:
            data_dir: the data directory (``--data-dir``).
            output_dir: a separate output folder (``--output-dir``), or None for ``<data_dir>/output``.
        Returns:
            The folders as realpaths, so later containment checks compare like with like.
        Raises:
            OSError: a folder cannot be created.
        """
        paths = {kind: os.path.join(data_dir, kind) for kind in ("input", "output", "temp", "user")}
        if output_dir is not None:
            paths["output"] = output_dir
        for path in paths.values():
            os.makedirs(path, exist_ok=True)
        folders = cls(**{kind: os.path.realpath(path) for kind, path in paths.items()})
        logger.debug("data folders: %s", folders)
        return folders

    def folder(self, kind: str) -> str:
        """The folder of a file ``type`` as the protocol names it: "input", "output" or "temp".

        Raises:
            ValueError: ``kind`` is not one of those three.
        """
        if kind not in FILE_KINDS:
            raise ValueError(f"folder kind must be one of {', '.join(FILE_KINDS)}; got {kind!r}")
        return getattr(self, kind)
