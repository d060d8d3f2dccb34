"""Image files for ComfyUI's basic image nodes: listing the input folder, loading images and their frames,
saving PNG batches with the workflow in their text chunks, and reading those chunks back.

Departures from ComfyUI, each on purpose: loading raises on frames of different sizes (ComfyUI drops them),
reads 16-bit greyscale at full range (ComfyUI divides by 255 and clips) and lists the input folder recursively;
non-finite pixels are refused when saving; ``filename_prefix`` tokens (``%date%``, ...) are not expanded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from nodes.common.paths import PathOutsideFolderError, atomic_write, confine

from .image_maths import check_image

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "SAVE_COMPRESS_LEVEL", "file_sha256", "list_input_images", "load_image_file",
           "prefix_target", "read_png_metadata", "save_png_batch"]

NO_ALPHA_MASK_SIZE = 64  # ComfyUI's mask for an image without alpha: 64×64 zeros, whatever the image size
SAVE_COMPRESS_LEVEL = 4  # ComfyUI's SaveImage level: smaller files than 1 at a modest cost in time
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens 16-bit greyscale (PNG, TIFF)
SIXTEEN_BIT_MAX = 65535
SINGLE_IMAGE_FORMATS = ("MPO",)  # an MPO's extra images are stereo views or depth maps, not frames of a batch


def list_input_images(folder: str) -> list[str]:
    """The image files under ``folder``, as sorted relative names with "/" (``"sub/cat.png"``).

    Hidden files and folders (a leading dot: our half-written uploads among them) and names that resolve
    outside ``folder`` (symlinks pointing out) are not listed.
    """
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        for name in files:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            try:
                confine(folder, relative)
            except PathOutsideFolderError:  # listing it would only offer a name that validation refuses
                continue
            names.append(relative)
    return sorted(names)


def load_image_file(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an image file as ComfyUI's LoadImage does: EXIF orientation applied, every frame in the batch.

    Args:
        path: an image file Pillow can read. Its frames (GIF, TIFF pages, animated WEBP/PNG) become the batch;
            an MPO file gives its first image only, because its others are stereo views or depth maps.
    Returns:
        IMAGE of shape (B, H, W, 3) and MASK of shape (B, H, W), both float32. The mask is ``1 - alpha``
        (1 = masked); a frame without alpha gets zeros. When no frame has alpha the mask is (B, 64, 64) zeros,
        as in ComfyUI.
    Raises:
        FileNotFoundError: no such file.
        ValueError: frames of different sizes (after orientation), a 32-bit float image, or a 32-bit integer
            image with values above 16 bits.
        PIL.UnidentifiedImageError: not an image.
    """
    rgbs, alphas = [], []
    with Image.open(path) as opened:
        frames = [opened] if opened.format in SINGLE_IMAGE_FORMATS else ImageSequence.Iterator(opened)
        for index, frame in enumerate(frames):
            rgb, alpha = _frame_arrays(ImageOps.exif_transpose(frame), path)
            if rgbs and rgb.shape != rgbs[0].shape:
                raise ValueError(f"{path}: frame {index} is {rgb.shape[1]}x{rgb.shape[0]} but frame 0 is "
                                 f"{rgbs[0].shape[1]}x{rgbs[0].shape[0]}; a batch needs frames of one size")
            rgbs.append(rgb)
            alphas.append(alpha)
    image = torch.from_numpy(np.stack(rgbs))
    if all(alpha is None for alpha in alphas):
        mask = torch.zeros(len(rgbs), NO_ALPHA_MASK_SIZE, NO_ALPHA_MASK_SIZE)
    else:
        opaque = np.ones(rgbs[0].shape[:2], dtype=np.float32)
        mask = 1 - torch.from_numpy(np.stack([opaque if alpha is None else alpha for alpha in alphas]))
    return image, mask


def _frame_arrays(frame: Image.Image, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One frame as float32 RGB (H, W, 3) in 0..1, and its alpha (H, W), or None when it has none."""
    if frame.mode == "F":
        raise ValueError(f"{path}: 32-bit float images (mode F) have no fixed white level; "
                         f"accepted are 8-bit images and 16-bit greyscale")
    if frame.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(frame).astype(np.float32)
        if grey.max(initial=0) > SIXTEEN_BIT_MAX:
            raise ValueError(f"{path}: integer pixel values up to {int(grey.max())} exceed 16 bits "
                             f"(max {SIXTEEN_BIT_MAX}); accepted are 8-bit images and 16-bit greyscale")
        return np.repeat((grey / SIXTEEN_BIT_MAX)[..., None], 3, axis=-1), None
    has_alpha = any(band in ("A", "a") for band in frame.getbands()) or "transparency" in frame.info
    pixels = np.asarray(frame.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255
    return np.ascontiguousarray(pixels[..., :3]), (pixels[..., 3] if has_alpha else None)


def file_sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def read_png_metadata(path: str) -> dict[str, Any]:
    """The text chunks of a PNG, JSON-decoded: ``{"prompt": {...}, "workflow": {...}}`` for our saved images.

    A chunk whose text is not JSON (another tool's ``Software`` or A1111's ``parameters``) is returned as
    its text.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a PNG.
    """
    with Image.open(path) as image:
        if image.format != "PNG":
            raise ValueError(f"{path} is a {image.format} file; only PNG text chunks are read")
        texts = dict(image.text)  # tEXt, zTXt and iTXt; reading it loads chunks that follow the pixels too
    return {key: _json_or_text(text) for key, text in texts.items()}


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def save_png_batch(images: torch.Tensor, folder: str, filename_prefix: str, kind: str,
                   prompt: Any = None, extra_pnginfo: dict[str, Any] | None = None,
                   compress_level: int = SAVE_COMPRESS_LEVEL) -> list[dict[str, str]]:
    """Save each image of a batch as ``<prefix>_<counter:05>_.png``, with the workflow in its text chunks.

    The counter continues after the highest one already used for that prefix. Each file is written
    atomically. Like ComfyUI, each PNG gets a ``tEXt`` chunk ``prompt`` holding ``json.dumps(prompt)`` and one
    per key of ``extra_pnginfo`` (the frontend sends ``workflow``), so dropping the PNG on the editor restores
    the graph.

    Args:
        images: IMAGE of shape (B, H, W, 3), finite. Values are clipped to 0..1 and rounded to 8 bits, as an
            8-bit PNG requires.
        folder: the folder the prefix is confined to.
        filename_prefix: a file name prefix, possibly with subfolders (``"a/b"``); it must stay in ``folder``.
        kind: the ``type`` reported to the frontend: "output" or "temp".
        prompt: the API-format prompt, or None for no ``prompt`` chunk.
        extra_pnginfo: more chunks, key → JSON value, or None.
        compress_level: zlib level 0..9.
    Returns:
        One ``{"filename", "subfolder", "type"}`` item per image, for ``ui.images``.
    Raises:
        ValueError: a prefix leaving ``folder`` or naming no file, or non-finite pixels.
        TypeError: ``extra_pnginfo`` is not a dict.
    """
    check_image(images, "images")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values, which a PNG cannot hold; accepted are finite "
                         "values in 0..1 (a NaN usually comes from a model run in too low a precision)")
    if extra_pnginfo is not None and not isinstance(extra_pnginfo, dict):
        raise TypeError(f"extra_pnginfo must be a dict of chunk name to JSON value; got {type(extra_pnginfo).__name__}")
    directory, base, subfolder = prefix_target(folder, filename_prefix)
    os.makedirs(directory, exist_ok=True)
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))  # ASCII-escaped JSON, so Pillow writes tEXt, never iTXt
    counter = _next_counter(directory, base)
    pixels = (images.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    saved = []
    for offset, frame in enumerate(pixels):
        filename = f"{base}_{counter + offset:05}_.png"
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
        atomic_write(os.path.join(directory, filename), buffer.getvalue())
        saved.append({"filename": filename, "subfolder": subfolder, "type": kind})
    logger.debug("saved %d image(s) to %s as %s_*", len(saved), directory, base)
    return saved


def prefix_target(folder: str, filename_prefix: str) -> tuple[str, str, str]:
    """``(directory, file name base, subfolder with "/")`` of a prefix; refuses one that leaves ``folder``."""
    accepted = "a relative name inside its folder that ends in a file name, such as 'Atelier' or 'sub/Atelier'"
    try:
        path = confine(folder, filename_prefix)
    except PathOutsideFolderError as error:
        raise ValueError(f"filename_prefix must be {accepted}; got {filename_prefix!r}") from error
    directory, base = os.path.split(path)
    root = os.path.realpath(folder)
    if path == root or filename_prefix.endswith(("/", os.sep)):
        raise ValueError(f"filename_prefix must be {accepted}; got {filename_prefix!r}")
    subfolder = os.path.relpath(directory, root)
    return directory, base, "" if subfolder == "." else subfolder.replace(os.sep, "/")


def _next_counter(directory: str, base: str) -> int:
    pattern = re.compile(rf"{re.escape(base)}_(\d+)_\.\w+")
    used = [int(match[1]) for name in os.listdir(directory) if (match := pattern.fullmatch(name))]
    return max(used, default=0) + 1
