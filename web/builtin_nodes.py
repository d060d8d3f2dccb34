"""ComfyUI's basic image nodes, for the standalone app only, under ComfyUI's own class and input names.

With these, simple ComfyUI workflows (load, scale, crop, invert, save, preview) run unchanged outside ComfyUI.
They are not exported to ComfyUI, which has its own. Re-implemented from ``comfyui-protocol.md`` §3.1, §3.3
and §4.3; no upstream code is copied. The pixel maths lives in :mod:`web.image_maths` and the file handling in
:mod:`web.image_files`; their departures from ComfyUI are listed there. Here, ``LoadImage`` confines every name
(ComfyUI's ``VALIDATE_INPUTS`` lets ``../`` through, §6) and ``ImageScale`` with width and height both 0 is a
validation error.

Nodes that make or load image batches check the pixel budget of :mod:`web.limits` first (their ``limits``,
which the server binds to its own). The nodes that touch files need the data folders. Rather than a module
global, each class here leaves its ``folders`` attribute unset, and :func:`builtin_nodes` returns subclasses
bound to one :class:`DataFolders`.
"""

from __future__ import annotations

import os
import secrets
import string
from typing import Any, ClassVar

import torch

from nodes.common.checks import range_errors
from nodes.common.paths import PathOutsideFolderError, confine

from .folders import DataFolders, split_annotation
from .image_files import (SAVE_COMPRESS_LEVEL, file_sha256, list_input_images, load_image_file, prefix_target,
                          read_png_metadata, save_png_batch)
from .image_maths import (CROP_METHODS, MAX_BATCH_SIZE, MAX_COLOR, MAX_RESOLUTION, UPSCALE_METHODS, crop_image,
                          empty_image, invert_image, scale_image, target_size)
from .limits import DEFAULT_LIMITS, Limits, check_pixel_budget

__all__ = ["BUILTIN_DISPLAY_NAMES", "EmptyImage", "ImageCrop", "ImageInvert", "ImageScale", "LoadImage",
           "PreviewImage", "SaveImage", "builtin_nodes", "read_png_metadata"]

DEFAULT_SIZE = 512
PREVIEW_COMPRESS_LEVEL = 1  # previews are thrown away; speed matters more than size
DEFAULT_PREFIX = "Atelier"
PREVIEW_PREFIX = "AtelierPreview_"
PREVIEW_SUFFIX_LENGTH = 5  # random letters per PreviewImage instance, so two previews never share a counter


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
    limits: ClassVar[Limits] = DEFAULT_LIMITS
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
        return file_sha256(cls._path(image))

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
        return load_image_file(self._path(image), self.limits)


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
            prefix_target(_data_folders(cls).folder(cls.FOLDER_KIND), filename_prefix)
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
    limits: ClassVar[Limits] = DEFAULT_LIMITS
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
        check_pixel_budget("EmptyImage", batch_size, height, width, self.limits)
        return (empty_image(width, height, batch_size, color),)


class ImageScale:
    """Resizes images to a given size, optionally cropping the centre first so nothing is stretched."""

    folders: ClassVar[DataFolders]
    limits: ClassVar[Limits] = DEFAULT_LIMITS
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
        batch, image_height, image_width = image.shape[:3]
        target_width, target_height = target_size(image_width, image_height, width, height)
        check_pixel_budget("ImageScale's result", batch, target_height, target_width, self.limits)
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
