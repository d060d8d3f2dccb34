"""Which model files are loaded: ``.safetensors`` only, never a pickle-based format."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .families import read_json

SAFE_EXTENSION = ".safetensors"
# Formats read with torch.load / pickle, which can run arbitrary code while loading.
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# The components of a diffusers pipeline folder that hold weights.
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet")


class UnsafeModelFormatError(ValueError):
    """A model file in a pickle-based format, which we refuse to load."""


def check_safetensors(path: str | os.PathLike) -> None:
    """Refuse any model file that is not ``.safetensors``.

    Raises:
        UnsafeModelFormatError: another extension; pickle-based formats (.ckpt, .pt, .pth, .bin, .pkl) are
            named as such, because unpickling a file can run any code it carries.
    Example:
        >>> check_safetensors("model.safetensors")
        >>> check_safetensors("model.ckpt")
        Traceback (most recent call last):
        ...
        nodes.models.formats.UnsafeModelFormatError: 'model.ckpt' is a pickle-based file (.ckpt): loading it could ...
    """
    name = os.path.basename(os.fspath(path))
    extension = os.path.splitext(name)[1].lower()
    if extension == SAFE_EXTENSION:
        return
    if extension in PICKLE_EXTENSIONS:
        raise UnsafeModelFormatError(
            f"{name!r} is a pickle-based file ({extension}): loading it could run any code it carries. Only "
            f"{SAFE_EXTENSION} is loaded; convert it to {SAFE_EXTENSION} with a tool you trust")
    raise UnsafeModelFormatError(f"{name!r} has extension {extension or '(none)'!r}; only {SAFE_EXTENSION} "
                                 f"files (or diffusers folders of them) are loaded")


def check_folder_weights(folder: str) -> str | None:
    """Require safetensors weights for every model component of a diffusers folder; return the variant to load.

    Returns:
        ``None`` when every component has plain ``*.safetensors`` weights, ``"fp16"`` when some have only
        ``*.fp16.safetensors`` (diffusers then falls back to the plain files where there is no fp16 one).
    Raises:
        UnsafeModelFormatError: a component holds only pickle-based weights (``.bin``, ``.ckpt``, …).
        FileNotFoundError: a component holds no weights at all.
    """
    index = read_json(os.path.join(folder, "model_index.json"))
    variant = None
    for component in WEIGHT_COMPONENTS:
        if not isinstance(index.get(component), list) or None in index[component]:
            continue  # absent, or declared empty ([null, null]) as the SDXL refiner's first text encoder is
        directory = os.path.join(folder, component)
        names = os.listdir(directory) if os.path.isdir(directory) else []
        safe = [name for name in names if name.endswith((SAFE_EXTENSION, SAFE_EXTENSION + ".index.json"))]
        if not safe:
            pickled = sorted(name for name in names if name.lower().endswith(PICKLE_EXTENSIONS))
            if pickled:
                raise UnsafeModelFormatError(
                    f"{directory!r} holds only pickle-based weights {pickled}: loading them could run any code "
                    f"they carry. Only {SAFE_EXTENSION} weights are loaded; convert the folder with a tool you trust")
            raise FileNotFoundError(f"{directory!r} holds no {SAFE_EXTENSION} weights; found {sorted(names)}")
        if all(".fp16." in name for name in safe):
            variant = "fp16"
    return variant


def tensor_shapes(tensors: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape by name, as :func:`layout_difference` compares them (a state dict, a loaded file)."""
    return {key: tuple(value.shape) for key, value in tensors.items()}


def layout_difference(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
                      ) -> tuple[int, str]:
    """How a file's tensors (name → shape) differ from a layout's: the number of names that differ and an account
    for a message; (0, "") when they are the same.

    Example:
        >>> layout_difference({"a": (2,), "b": (3,)}, {"a": (2,), "b": (4,), "c": (1,)})
        (2, "0 tensors missing, 1 unexpected (e.g. 'c'), 1 of other shapes (e.g. 'b': (4,), not (3,))")
    """
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & found.keys() if tuple(expected[key]) != tuple(found[key]))
    count = len(missing) + len(unexpected) + len(reshaped)
    if not count:
        return 0, ""
    parts = [f"{len(missing)} tensors missing" + (f" (e.g. {missing[0]!r})" if missing else ""),
             f"{len(unexpected)} unexpected" + (f" (e.g. {unexpected[0]!r})" if unexpected else ""),
             f"{len(reshaped)} of other shapes" + (f" (e.g. {reshaped[0]!r}: {tuple(found[reshaped[0]])}, not "
                                                   f"{tuple(expected[reshaped[0]])})" if reshaped else "")]
    return count, ", ".join(parts)
