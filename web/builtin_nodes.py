"""ComfyUI's basic image nodes, for the standalone app only, under ComfyUI's own class and input names.

With these, simple ComfyUI workflows (load, scale, crop, invert, save, preview) run unchanged outside ComfyUI.
They are not exported to ComfyUI, which has its own. Re-implemented from ``comfyui-protocol.md`` §3.1, §3.3
and §4.3; no upstream code is copied.

The nodes that touch files need the data folders. Rather than a module global, each class here leaves its
``folders`` attribute unset, and :func:`builtin_nodes` returns subclasses bound to one :class:`DataFolders`.

Departures from ComfyUI, each on purpose:

- Refuse, never correct: ``ImageCrop`` raises when the crop leaves the image (ComfyUI clamps), ``LoadImage``
  raises on frames of different sizes (ComfyUI drops them), ``ImageScale`` with width and height both 0 is a
  validation error (ComfyUI returns the image unchanged), and non-finite pixels are refused when saving.
- ``LoadImage`` lists the input folder recursively, reads 16-bit greyscale at full range (ComfyUI divides by
  255 and clips), and confines every name (ComfyUI's ``VALIDATE_INPUTS`` lets ``../`` through, §6).
- ``ImageScale`` antialiases bilinear and bicubic, resizes lanczos in float rather than 8 bits, and clamps the
  overshoot of bicubic and lanczos to 0..1 so IMAGE stays in range.
- ``filename_prefix`` tokens (``%date%``, ``%width%``, ...) are not expanded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import secrets
import string
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from nodes.common.checks import range_errors
from nodes.common.paths import PathOutsideFolderError, atomic_write, confine

from .folders import DataFolders, split_annotation

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_DISPLAY_NAMES", "CROP_METHODS", "MAX_RESOLUTION", "UPSCALE_METHODS", "EmptyImage", "ImageCrop",
    "ImageInvert", "ImageScale", "LoadImage", "PreviewImage", "SaveImage", "builtin_nodes", "crop_image",
    "empty_image", "invert_image", "list_input_images", "load_image_file", "read_png_metadata", "save_png_batch",
    "scale_image",
]

MAX_RESOLUTION = 16384  # ComfyUI's MAX_RESOLUTION in nodes.py: the largest width or height a node accepts
MAX_BATCH_SIZE = 4096  # ComfyUI's EmptyImage limit
MAX_COLOR = 0xFFFFFF  # 24-bit RGB, as the frontend's "color" widget edits it
DEFAULT_SIZE = 512
NO_ALPHA_MASK_SIZE = 64  # ComfyUI's mask for an image without alpha: 64×64 zeros, whatever the image size
SAVE_COMPRESS_LEVEL = 4  # ComfyUI's SaveImage level: smaller files than 1 at a modest cost in time
PREVIEW_COMPRESS_LEVEL = 1  # previews are thrown away; speed matters more than size
DEFAULT_PREFIX = "Atelier"
PREVIEW_PREFIX = "AtelierPreview_"
PREVIEW_SUFFIX_LENGTH = 5  # random letters per PreviewImage instance, so two previews never share a counter
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens 16-bit greyscale (PNG, TIFF)
SIXTEEN_BIT_MAX = 65535
SINGLE_IMAGE_FORMATS = ("MPO",)  # an MPO's extra images are stereo views or depth maps, not frames of a batch
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")
ANTIALIASED_METHODS = ("bilinear", "bicubic")  # the modes torch's interpolate can antialias
OVERSHOOTING_METHODS = ("bicubic", "lanczos")  # kernels with negative lobes ring past 0..1 at sharp edges


# --- image maths --------------------------------------------------------------------------------------------------


def _check_image(image: torch.Tensor, name: str = "image") -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, W, 3); got {type(image).__name__}")
    if image.ndim != 4 or image.shape[-1] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{name} must have shape (B, H, W, 3) with H, W >= 1; got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in 0..1; got {image.dtype}")


def empty_image(width: int, height: int, batch_size: int, color: int) -> torch.Tensor:
    """A batch of images filled with one colour.

    Args:
        width: 1 <= width <= MAX_RESOLUTION.
        height: 1 <= height <= MAX_RESOLUTION.
        batch_size: 1 <= batch_size <= MAX_BATCH_SIZE.
        color: 0xRRGGBB, 0 <= color <= 0xFFFFFF.
    Returns:
        IMAGE of shape (batch_size, height, width, 3), float32.
    Raises:
        ValueError: an argument out of range.
    Example:
        >>> image = empty_image(4, 2, 1, 0xFF0000)
        >>> tuple(image.shape), image[0, 0, 0].tolist()
        ((1, 2, 4, 3), [1.0, 0.0, 0.0])
    """
    for name, value, low, high in (("width", width, 1, MAX_RESOLUTION), ("height", height, 1, MAX_RESOLUTION),
                                   ("batch_size", batch_size, 1, MAX_BATCH_SIZE), ("color", color, 0, MAX_COLOR)):
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low}, {high}]; got {value}")
    rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 255
    return rgb.expand(batch_size, height, width, 3).clone()


def invert_image(image: torch.Tensor) -> torch.Tensor:
    """Each channel ``c`` becomes ``1 - c``.

    Args:
        image: IMAGE of shape (B, H, W, 3), values in 0..1.
    Returns:
        IMAGE of the same shape, dtype and device.
    Raises:
        ValueError, TypeError: ``image`` is not an IMAGE tensor.
    Example:
        >>> invert_image(torch.full((1, 1, 2, 3), 0.25))[0, 0, 0].tolist()
        [0.75, 0.75, 0.75]
    """
    _check_image(image)
    return 1 - image


def crop_image(image: torch.Tensor, width: int, height: int, x: int, y: int) -> torch.Tensor:
    """The ``width`` × ``height`` rectangle whose top-left corner is at (``x``, ``y``).

    Args:
        image: IMAGE of shape (B, H, W, 3).
        width: 1 <= width and x + width <= W.
        height: 1 <= height and y + height <= H.
        x: left edge, 0 <= x.
        y: top edge, 0 <= y.
    Returns:
        IMAGE of shape (B, height, width, 3).
    Raises:
        ValueError: the rectangle is empty or leaves the image (it is never clamped to fit).
    Example:
        >>> crop_image(torch.zeros(2, 8, 6, 3), width=4, height=3, x=2, y=5).shape
        torch.Size([2, 3, 4, 3])
    """
    _check_image(image)
    image_height, image_width = image.shape[1:3]
    if (width < 1 or height < 1 or x < 0 or y < 0
            or x + width > image_width or y + height > image_height):
        raise ValueError(f"crop {width}x{height} at x={x}, y={y} must lie inside the {image_width}x{image_height} "
                         f"image (x + width <= {image_width}, y + height <= {image_height}, all >= 0, sizes >= 1)")
    return image[:, y:y + height, x:x + width, :]


def scale_image(image: torch.Tensor, width: int, height: int, method: str,
                crop: str = "disabled") -> torch.Tensor:
    """Resize images to ``width`` × ``height``; a 0 size follows the other one, keeping the aspect ratio.

    Args:
        image: IMAGE of shape (B, H, W, 3).
        width: target width in 0..MAX_RESOLUTION; 0 means ``round(W * height / H)``, at least 1.
        height: target height in 0..MAX_RESOLUTION; 0 means ``round(H * width / W)``, at least 1.
        method: one of UPSCALE_METHODS. The first four use ``torch.nn.functional.interpolate`` (bilinear and
            bicubic antialiased, which matters when shrinking); lanczos uses Pillow on float channels.
        crop: "disabled" stretches to the target; "center" first cuts the centre of the image to the target's
            aspect ratio, so nothing is stretched.
    Returns:
        IMAGE of shape (B, height, width, 3), on the input's device and dtype. Bicubic and lanczos overshoot
        at sharp edges; their result is clamped to 0..1 so that it stays a valid IMAGE.
    Raises:
        ValueError: both sizes 0, a size out of range, or an unknown method or crop.
    Example:
        >>> scale_image(torch.rand(1, 50, 100, 3), width=40, height=0, method="bilinear").shape
        torch.Size([1, 20, 40, 3])
    """
    _check_image(image)
    if method not in UPSCALE_METHODS:
        raise ValueError(f"method must be one of {UPSCALE_METHODS}; got {method!r}")
    if crop not in CROP_METHODS:
        raise ValueError(f"crop must be one of {CROP_METHODS}; got {crop!r}")
    for name, value in (("width", width), ("height", height)):
        if not 0 <= value <= MAX_RESOLUTION:
            raise ValueError(f"{name} must be in [0, {MAX_RESOLUTION}]; got {value}")
    image_height, image_width = image.shape[1:3]
    width, height = _target_size(image_width, image_height, width, height)
    if crop == "center":
        image = _center_crop(image, width / height)
    samples = image.movedim(-1, 1)  # interpolate and Pillow want (B, C, H, W); IMAGE is channels last
    if method == "lanczos":
        samples = _lanczos(samples, width, height)
    else:
        samples = F.interpolate(samples, size=(height, width), mode=method,
                                antialias=method in ANTIALIASED_METHODS)
    if method in OVERSHOOTING_METHODS:
        samples = samples.clamp(0, 1)
    return samples.movedim(1, -1).contiguous()


def _target_size(image_width: int, image_height: int, width: int, height: int) -> tuple[int, int]:
    if width == 0 and height == 0:
        raise ValueError("width and height are both 0; set at least one (a 0 size follows the other, "
                         "keeping the aspect ratio)")
    if width == 0:
        width = max(1, round(image_width * height / image_height))
    elif height == 0:
        height = max(1, round(image_height * width / image_width))
    if width > MAX_RESOLUTION or height > MAX_RESOLUTION:
        raise ValueError(f"keeping the aspect ratio of the {image_width}x{image_height} image gives {width}x{height}, "
                         f"larger than MAX_RESOLUTION {MAX_RESOLUTION}; give a smaller size")
    return width, height


def _center_crop(image: torch.Tensor, aspect: float) -> torch.Tensor:
    """The largest centred part of ``image`` (B, H, W, C) whose width / height is ``aspect``."""
    image_height, image_width = image.shape[1:3]
    width = min(image_width, max(1, round(image_height * aspect)))
    height = min(image_height, max(1, round(image_width / aspect)))
    x, y = (image_width - width) // 2, (image_height - height) // 2
    return image[:, y:y + height, x:x + width, :]


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pillow's lanczos resize of (B, C, H, W), one float32 ("F" mode) channel at a time: no 8-bit rounding."""
    planes = samples.detach().to("cpu", torch.float32).contiguous().numpy()
    resized = np.stack([
        np.stack([np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.LANCZOS))
                  for plane in channels])
        for channels in planes])
    return torch.from_numpy(resized).to(samples.device, samples.dtype)


# --- files --------------------------------------------------------------------------------------------------------


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


def _sha256(path: str) -> str:
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
    _check_image(images, "images")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values, which a PNG cannot hold; accepted are finite "
                         "values in 0..1 (a NaN usually comes from a model run in too low a precision)")
    if extra_pnginfo is not None and not isinstance(extra_pnginfo, dict):
        raise TypeError(f"extra_pnginfo must be a dict of chunk name to JSON value; got {type(extra_pnginfo).__name__}")
    directory, base, subfolder = _prefix_target(folder, filename_prefix)
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


def _prefix_target(folder: str, filename_prefix: str) -> tuple[str, str, str]:
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


# --- nodes --------------------------------------------------------------------------------------------------------


def _data_folders(cls: type) -> DataFolders:
    folders = getattr(cls, "folders", None)
    if not isinstance(folders, DataFolders):
        raise TypeError(f"{cls.__name__} is not bound to data folders; take it from builtin_nodes(folders)")
    return folders


def _size_input(default: int, low: int, tooltip: str) -> tuple[str, dict[str, Any]]:
    return ("INT", {"default": default, "min": low, "max": MAX_RESOLUTION, "step": 1, "tooltip": tooltip})


class LoadImage:
    """Loads an image (every frame, for animations) from the input folder, with its alpha as a mask."""

    folders: ClassVar[DataFolders]
    DESCRIPTION = ("Loads an image from the input folder. Animated files give one batch item per frame; "
                   "the alpha channel becomes the mask.")
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("IMAGE", "MASK")
    OUTPUT_TOOLTIPS = ("The image, or the batch of its frames.",
                       "1 - alpha: 1 where the image is transparent. 64×64 zeros when it has no alpha.")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        names = list_input_images(_data_folders(cls).input)
        return {"required": {
            "image": (names, {"image_upload": True,
                              "tooltip": "An image file in the input folder; upload one with the button."}),
        }}

    @classmethod
    def _path(cls, image: str) -> str:
        """The confined path of a combo value; "name [output]" and "name [temp]" read from those folders."""
        image, kind = split_annotation(image, "input")
        return confine(_data_folders(cls).folder(kind), image)

    @classmethod
    def IS_CHANGED(cls, image: str) -> str:
        return _sha256(cls._path(image))

    @classmethod
    def VALIDATE_INPUTS(cls, image: str | None) -> bool | str:
        if image is None:  # a linked value is checked when the node runs
            return True
        try:
            path = cls._path(image)
        except PathOutsideFolderError as error:
            return f"Invalid image file: {error}"
        if not os.path.isfile(path):
            return f"Invalid image file: {image!r} is not a file in the input folder"
        return True

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        return load_image_file(self._path(image))


class SaveImage:
    """Saves images as PNGs in the output folder, with the workflow embedded so the file reopens the graph."""

    folders: ClassVar[DataFolders]
    FOLDER_KIND = "output"
    COMPRESS_LEVEL = SAVE_COMPRESS_LEVEL
    DESCRIPTION = ("Saves the images as PNG files in the output folder. Each file carries the workflow, so "
                   "dropping it on the editor opens the graph that made it.")
    CATEGORY = "image"
    RETURN_TYPES = ()
    RETURN_NAMES = ()
    OUTPUT_TOOLTIPS = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {
                    "default": DEFAULT_PREFIX,
                    "tooltip": "The start of the file names; a counter follows. 'sub/name' saves into a "
                               "subfolder of the output folder."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str | None = None) -> bool | str:
        if filename_prefix is None:  # linked, or absent (PreviewImage): checked when the node runs
            return True
        try:
            _prefix_target(_data_folders(cls).folder(cls.FOLDER_KIND), filename_prefix)
        except ValueError as error:
            return str(error)
        return True

    def save_images(self, images: torch.Tensor, filename_prefix: str = DEFAULT_PREFIX, prompt: Any = None,
                    extra_pnginfo: dict[str, Any] | None = None) -> dict[str, dict[str, list]]:
        folder = _data_folders(type(self)).folder(self.FOLDER_KIND)
        saved = save_png_batch(images, folder, filename_prefix, self.FOLDER_KIND, prompt, extra_pnginfo,
                               self.COMPRESS_LEVEL)
        return {"ui": {"images": saved}}


class PreviewImage(SaveImage):
    """Shows images in the editor: saved as quick PNGs in the temp folder instead of the output folder."""

    FOLDER_KIND = "temp"
    COMPRESS_LEVEL = PREVIEW_COMPRESS_LEVEL
    DESCRIPTION = "Shows the images on the node. They go to the temp folder, not to the output folder."

    def __init__(self) -> None:
        # secrets rather than random: a workflow that seeds the random module must not make two previews collide
        suffix = "".join(secrets.choice(string.ascii_lowercase) for _ in range(PREVIEW_SUFFIX_LENGTH))
        self.filename_prefix = f"{PREVIEW_PREFIX}{suffix}"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {
            "required": {"images": ("IMAGE", {"tooltip": "The images to show."})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save_images(self, images: torch.Tensor, prompt: Any = None,
                    extra_pnginfo: dict[str, Any] | None = None) -> dict[str, dict[str, list]]:
        return super().save_images(images, self.filename_prefix, prompt, extra_pnginfo)


class EmptyImage:
    """Makes a batch of images filled with one colour."""

    folders: ClassVar[DataFolders]
    DESCRIPTION = "Makes a batch of images of the given size, filled with one colour."
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The filled images.",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "width": _size_input(DEFAULT_SIZE, 1, "Width in pixels."),
            "height": _size_input(DEFAULT_SIZE, 1, "Height in pixels."),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH_SIZE, "step": 1,
                                   "tooltip": "How many images."}),
            "color": ("INT", {"default": 0, "min": 0, "max": MAX_COLOR, "step": 1, "display": "color",
                              "tooltip": "The fill colour, 0xRRGGBB."}),
        }}

    def generate(self, width: int, height: int, batch_size: int, color: int) -> tuple[torch.Tensor]:
        return (empty_image(width, height, batch_size, color),)


class ImageScale:
    """Resizes images to a given size, optionally cropping the centre first so nothing is stretched."""

    folders: ClassVar[DataFolders]
    DESCRIPTION = ("Resizes the images. A width or height of 0 follows the other and keeps the aspect ratio; "
                   "crop 'center' cuts the centre to the target's aspect ratio first.")
    CATEGORY = "image/upscaling"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The resized images.",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to resize."}),
            "upscale_method": (list(UPSCALE_METHODS), {
                "tooltip": "The resampling filter: nearest-exact keeps hard pixels, area averages when "
                           "shrinking, lanczos is the sharpest."}),
            "width": _size_input(DEFAULT_SIZE, 0, "Target width in pixels; 0 follows the height."),
            "height": _size_input(DEFAULT_SIZE, 0, "Target height in pixels; 0 follows the width."),
            "crop": (list(CROP_METHODS), {
                "tooltip": "'center' crops the centre to the target's aspect ratio before resizing; "
                           "'disabled' stretches."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width: int | None, height: int | None) -> bool | str:
        # Naming width and height switches off their built-in min/max checks (ComfyUI's rule): check them here.
        errors = range_errors({"width": width, "height": height},
                              {"width": (0, MAX_RESOLUTION), "height": (0, MAX_RESOLUTION)})
        if width == 0 and height == 0:
            errors.append("width and height are both 0; set at least one (a 0 size follows the other)")
        return "; ".join(errors) or True

    def upscale(self, image: torch.Tensor, upscale_method: str, width: int, height: int,
                crop: str) -> tuple[torch.Tensor]:
        return (scale_image(image, width, height, upscale_method, crop),)


class ImageInvert:
    """Inverts the colours of images."""

    folders: ClassVar[DataFolders]
    DESCRIPTION = "Inverts the colours: each channel value c becomes 1 - c."
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The inverted images.",)
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {"image": ("IMAGE", {"tooltip": "The images to invert."})}}

    def invert(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (invert_image(image),)


class ImageCrop:
    """Cuts a rectangle out of images; a rectangle that leaves the image is an error, never clamped."""

    folders: ClassVar[DataFolders]
    DESCRIPTION = ("Cuts a width × height rectangle out of the images, its top-left corner at x, y. "
                   "The rectangle must lie inside the image.")
    CATEGORY = "image/transform"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The cropped images.",)
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images to crop."}),
            "width": _size_input(DEFAULT_SIZE, 1, "Width of the rectangle in pixels."),
            "height": _size_input(DEFAULT_SIZE, 1, "Height of the rectangle in pixels."),
            "x": _size_input(0, 0, "Left edge of the rectangle, in pixels from the left."),
            "y": _size_input(0, 0, "Top edge of the rectangle, in pixels from the top."),
        }}

    def crop(self, image: torch.Tensor, width: int, height: int, x: int, y: int) -> tuple[torch.Tensor]:
        return (crop_image(image, width, height, x, y),)


_NODE_CLASSES: tuple[type, ...] = (LoadImage, SaveImage, PreviewImage, EmptyImage, ImageScale, ImageInvert,
                                   ImageCrop)

BUILTIN_DISPLAY_NAMES: dict[str, str] = {  # ComfyUI's labels, where it has one
    "LoadImage": "Load Image",
    "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
    "EmptyImage": "Empty Image",
    "ImageScale": "Upscale Image",
    "ImageInvert": "Invert Image",
    "ImageCrop": "Image Crop",
}


def builtin_nodes(folders: DataFolders) -> dict[str, type]:
    """The built-in node classes, keyed by ComfyUI's names, bound to ``folders``.

    Each value is a fresh subclass whose ``folders`` is set, so two apps with different data folders can live
    in one process.
    """
    return {cls.__name__: type(cls.__name__, (cls,), {"folders": folders}) for cls in _NODE_CLASSES}
