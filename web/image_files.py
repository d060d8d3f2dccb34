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
from .limits import DEFAULT_LIMITS, Limits, check_pixel_budget

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "SAVE_COMPRESS_LEVEL", "file_sha256", "list_input_images", "load_image_file",
           "prefix_target", "read_png_metadata", "save_png_batch"]

NO_ALPHA_MASK_SIZE = 64  # ComfyUI's mask for an image without alpha: 64×64 zeros, whatever the image size
SAVE_COMPRESS_LEVEL = 4  # ComfyUI's SaveImage level: smaller files than 1 at a modest cost in time
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens 16-bit greyscale (PNG, TIFF)
SIXTEEN_BIT_MAX = 65535
# Saving converts an image to 8 bits a band of rows at a time: 4 MB of float32 each, where a whole 16384² image
# took three 3 GiB copies.
SAVE_BAND_VALUES = 1 << 20
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


def load_image_file(path: str, limits: Limits = DEFAULT_LIMITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an image file as ComfyUI's LoadImage does: EXIF orientation applied, every frame in the batch.

    The whole batch (frames × height × width) is checked against the pixel budget before any frame is
    decoded, and the frames are decoded one at a time straight into the batch, so memory stays near the
    batch's own size.

    Args:
        path: an image file Pillow can read. Its frames (GIF, TIFF pages, animated WEBP/PNG) become the batch;
            an MPO file gives its first image only, because its others are stereo views or depth maps.
        limits: the pixel budget (:mod:`web.limits`).
    Returns:
        IMAGE of shape (B, H, W, 3) and MASK of shape (B, H, W), both float32. The mask is ``1 - alpha``
        (1 = masked); a frame without alpha gets zeros. When no frame has alpha the mask is (B, 64, 64) zeros,
        as in ComfyUI.
    Raises:
        FileNotFoundError: no such file.
        ValueError: frames over the pixel budget, frames of different sizes (after orientation), a 32-bit float
            image, or a 32-bit integer image with values above 16 bits.
        PIL.UnidentifiedImageError: not an image.
    """
    with Image.open(path) as opened:
        single = opened.format in SINGLE_IMAGE_FORMATS
        count = 1 if single else getattr(opened, "n_frames", 1)  # read from the header, nothing decoded
        check_pixel_budget(f"{os.path.basename(path)!r} ({count} frames)", count, opened.height, opened.width,
                           limits)
        image, mask, filled = None, None, 0
        for index, frame in enumerate([opened] if single else ImageSequence.Iterator(opened)):
            frame = ImageOps.exif_transpose(frame)
            if image is None:
                image = torch.empty(count, frame.height, frame.width, 3)
            elif (frame.height, frame.width) != tuple(image.shape[1:3]):
                raise ValueError(f"{path}: frame {index} is {frame.width}x{frame.height} but frame 0 is "
                                 f"{image.shape[2]}x{image.shape[1]}; a batch needs frames of one size")
            if index >= count:
                raise ValueError(f"{path}: the file announces {count} frames but holds more")
            alpha = _decode_frame(frame, image[index], path)
            if alpha is not None:
                if mask is None:
                    mask = torch.zeros(count, frame.height, frame.width)  # frames without alpha are opaque
                mask[index] = 1 - alpha
            filled = index + 1
    image = image[:filled]
    if mask is None:
        return image, torch.zeros(filled, NO_ALPHA_MASK_SIZE, NO_ALPHA_MASK_SIZE)
    return image, mask[:filled]


def _decode_frame(frame: Image.Image, out: torch.Tensor, path: str) -> torch.Tensor | None:
    """Decode one frame into ``out`` (H, W, 3) as float32 RGB in 0..1; returns its alpha (H, W), or None."""
    if frame.mode == "F":
        raise ValueError(f"{path}: 32-bit float images (mode F) have no fixed white level; "
                         f"accepted are 8-bit images and 16-bit greyscale")
    if frame.mode in SIXTEEN_BIT_MODES:
        grey = torch.from_numpy(np.asarray(frame).astype(np.float32))
        if grey.max() > SIXTEEN_BIT_MAX:
            raise ValueError(f"{path}: integer pixel values up to {int(grey.max())} exceed 16 bits "
                             f"(max {SIXTEEN_BIT_MAX}); accepted are 8-bit images and 16-bit greyscale")
        out.copy_((grey / SIXTEEN_BIT_MAX)[..., None].expand_as(out))
        return None
    has_alpha = any(band in ("A", "a") for band in frame.getbands()) or "transparency" in frame.info
    pixels = torch.from_numpy(np.array(frame.convert("RGBA" if has_alpha else "RGB")))  # writable, as torch wants
    out.copy_(pixels[..., :3]).div_(255)
    return pixels[..., 3].float().div_(255) if has_alpha else None


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
    if not all(torch.isfinite(band).all() for image in images for band in _row_bands(image)):
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
    saved = []
    for offset, image in enumerate(images):
        filename = f"{base}_{counter + offset:05}_.png"
        buffer = io.BytesIO()
        _as_8_bit(image).save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
        atomic_write(os.path.join(directory, filename), buffer.getbuffer())
        saved.append({"filename": filename, "subfolder": subfolder, "type": kind})
    logger.debug("saved %d image(s) to %s as %s_*", len(saved), directory, base)
    return saved


def _row_bands(image: torch.Tensor) -> list[torch.Tensor]:
    """``image`` (H, W, C) as views of SAVE_BAND_VALUES values or so each, so that work on them stays small."""
    rows = max(1, SAVE_BAND_VALUES // (image.shape[1] * image.shape[2]))
    return list(image.split(rows))


def _as_8_bit(image: torch.Tensor) -> Image.Image:
    """One IMAGE (H, W, 3) as an 8-bit Pillow image, converted band by band: no full-size float copy.

    Levels are truncated, not rounded, as ComfyUI's SaveImage does (``uint8(clip(255 x))``): rounding would move
    about half the pixels of every image by one level from ComfyUI's file for the same workflow and seed.
    """
    result = Image.new("RGB", (image.shape[1], image.shape[0]))
    top = 0
    for band in _row_bands(image.detach()):
        levels = band.to("cpu", torch.float32, copy=True).clamp_(0, 1).mul_(255).to(torch.uint8).numpy()
        result.paste(Image.fromarray(levels), (0, top))
        top += band.shape[0]
    return result


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
