"""Where models come from: a models folder laid out like ComfyUI's (``--models-dir``), ComfyUI's own
``folder_paths`` when running inside ComfyUI, and the models that ship with Atelier, listed after the user's."""

from __future__ import annotations

import os

from ..common.paths import confine
from .formats import PICKLE_EXTENSIONS, SAFE_EXTENSION

# Models that ship with Atelier (the embedded default model), laid out like a models folder; listed after the
# user's own, so a user's model of the same name wins.
SHIPPED_MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")
# The embedded model (nodes/embedded/train.py makes it): diffusers/<name>/ and checkpoints/<name>.safetensors there.
SHIPPED_NAME = "atelier_embedded_sd1"
MODEL_FOLDERS = ("checkpoints", "diffusers", "diffusion_models", "loras", "vae", "dinov2", "sentence_encoders",
                 "speedupnet", "aptp", "adcsr", "tvt", "diffdis", "stablenormal", "diffeditor", "clip_vision")
# The folders whose models are themselves folders, each known by the file it holds (a path inside it); the others
# hold files. An APTP pruning folder holds its router (hypernet/, quantizer/) and its experts (arch<K>/).
FOLDER_MODEL_MARKERS = {"diffusers": "model_index.json", "dinov2": "config.json", "sentence_encoders": "config.json",
                        "aptp": "hypernet/config.json", "stablenormal": "model_index.json"}
DIFFUSERS_PREFIX = "diffusers/"  # how diffusers folders are named in the checkpoint list



def comfy_folder_paths():
    """ComfyUI's ``folder_paths`` module when running inside ComfyUI, else None."""
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def _check_folder_name(folder: str) -> None:
    if folder not in MODEL_FOLDERS:
        raise ValueError(f"model folder must be one of {MODEL_FOLDERS}; got {folder!r}")


def _bases(folder: str, models_dir: str | os.PathLike | None) -> list[str]:
    """The folders that hold ``folder``'s models: ``models_dir/folder``, or ComfyUI's paths for it, then the
    shipped models' ``folder``."""
    shipped = os.path.join(SHIPPED_MODELS, folder)
    if models_dir is not None:
        return [os.path.join(os.fspath(models_dir), folder), shipped]
    folder_paths = comfy_folder_paths()
    if folder_paths is None:
        raise ValueError(f"no models folder to look in for {folder!r}: pass models_dir (standalone, "
                         f"--models-dir) or run inside ComfyUI")
    if folder not in folder_paths.folder_names_and_paths:  # a kind ComfyUI has no setting for: its models/<folder>
        return [os.path.join(folder_paths.models_dir, folder), shipped]
    return [*folder_paths.get_folder_paths(folder), shipped]


def resolve_model_path(folder: str, name: str, models_dir: str | os.PathLike | None = None) -> str:
    """The absolute path of model ``name`` in ``folder`` (one of :data:`MODEL_FOLDERS`).

    With ``models_dir``, the name is confined to ``models_dir/folder`` (no ``..``, absolute paths or symlinks
    out). Without it, inside ComfyUI, ComfyUI's ``folder_paths`` resolves it (``get_full_path``; for folder models
    such as diffusers folders and the kinds ComfyUI has no setting for, each of :func:`_bases`). The shipped models
    (:data:`SHIPPED_MODELS`) come last.

    Raises:
        ValueError: an unknown ``folder``, or no ``models_dir`` outside ComfyUI.
        nodes.common.paths.PathOutsideFolderError: ``name`` leaves its folder.
        FileNotFoundError: no such model.
    """
    _check_folder_name(folder)
    folder_paths = comfy_folder_paths() if models_dir is None else None
    if (folder_paths is not None and folder not in FOLDER_MODEL_MARKERS
            and folder in folder_paths.folder_names_and_paths):
        path = folder_paths.get_full_path(folder, name)
        candidates = ([path] if path else []) + [confine(os.path.join(SHIPPED_MODELS, folder), name)]
    else:
        candidates = [confine(base, name) for base in _bases(folder, models_dir)]
    for path in candidates:
        if os.path.isdir(path) if folder in FOLDER_MODEL_MARKERS else os.path.isfile(path):
            return path
    available = list_models(folder, models_dir)
    raise FileNotFoundError(f"no {folder} model {name!r}; available: {available[:20] or 'none'}")


def list_models(folder: str, models_dir: str | os.PathLike | None = None) -> list[str]:
    """The model names in ``folder``, for a combo: files with a model extension (relative paths with ``/``), or
    for the folders of :data:`FOLDER_MODEL_MARKERS` the sub-folders holding their marker file (a diffusers
    folder's ``model_index.json``, a transformers model's ``config.json``). The user's models come first, sorted,
    then the shipped ones, so a loader's default is the user's own model when there is one.

    Only ``.safetensors`` files are listed: a pickle-based file is never offered, so a workflow naming one is
    refused at validation (its name is not in the list), before anything runs.
    """
    _check_folder_name(folder)
    *user_bases, shipped_base = _bases(folder, models_dir)
    users = sorted(set().union(*(_model_names(folder, base) for base in user_bases)))
    return users + sorted(_model_names(folder, shipped_base) - set(users))


def _model_names(folder: str, base: str) -> set[str]:
    """The names :func:`list_models` lists from one base folder."""
    marker = FOLDER_MODEL_MARKERS.get(folder)
    if marker is None:
        return files_under(base, (SAFE_EXTENSION,))
    names: set[str] = set()
    for current, directories, files in os.walk(base, followlinks=True):
        directories[:] = [name for name in directories if not name.startswith(".")]
        relative = os.path.relpath(current, base).replace(os.sep, "/")
        if os.path.isfile(os.path.join(current, marker)) and relative != ".":
            names.add(relative)
            directories[:] = []
    return names


def files_under(base: str, extensions: tuple[str, ...]) -> set[str]:
    """The files under ``base`` whose names end with one of ``extensions`` (any case), as relative paths with
    ``/``; hidden files and folders are skipped, and a missing ``base`` holds none."""
    names: set[str] = set()
    for current, directories, files in os.walk(base, followlinks=True):
        directories[:] = [name for name in directories if not name.startswith(".")]
        relative = os.path.relpath(current, base).replace(os.sep, "/")
        names.update(name if relative == "." else f"{relative}/{name}" for name in files
                     if name.lower().endswith(extensions) and not name.startswith("."))
    return names


def list_checkpoints(models_dir: str | os.PathLike | None = None) -> list[str]:
    """Every checkpoint a loader can offer: single files in ``checkpoints/``, then the folders in ``diffusers/``
    as ``"diffusers/<folder>"``."""
    return list_models("checkpoints", models_dir) + [DIFFUSERS_PREFIX + name for name in list_models("diffusers",
                                                                                                      models_dir)]


def resolve_checkpoint(name: str, models_dir: str | os.PathLike | None = None) -> str:
    """The path of a name from :func:`list_checkpoints`: ``"diffusers/<folder>"`` is a diffusers folder, anything
    else a file in ``checkpoints/``."""
    if name.startswith(DIFFUSERS_PREFIX) and not name.lower().endswith((SAFE_EXTENSION, *PICKLE_EXTENSIONS)):
        return resolve_model_path("diffusers", name[len(DIFFUSERS_PREFIX):], models_dir)
    return resolve_model_path("checkpoints", name, models_dir)
