"""The correspondence nodes: extract dense features (weight-free dense SIFT, Stable Diffusion UNet decoder features,
DINOv2 tokens), fuse them, match two images densely, and copy appearance along the matches (instance swap).

They are thin: each converts ComfyUI's IMAGE (B, H, W, C) to (1, 3, H, W) once, calls :mod:`.features`,
:mod:`.fusion` or :mod:`.matching`, and returns a tuple. Features travel on ``ATELIER_FEATURES`` as
:class:`~.features.FeatureMaps`; a fixed PCA basis on ``ATELIER_FEATURE_BASIS``; a DINOv2 backbone on
``ATELIER_DINOV2``. DINOv2 folders live in the models folder's ``dinov2/`` (a transformers ``save_pretrained`` folder
with ``config.json`` and ``model.safetensors``).
"""

from __future__ import annotations

import base64
import dataclasses
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..common.comfy_host import comfy_model_family
from ..common.denoiser import Conditioning
from ..common.images import single_image
from ..common.limits import MAX_SEED
from ..common.memory import MEMORY
from ..common.progress import progress
from ..models.comfy_adapters import denoiser_and_codec, denoiser_network
from ..models.loading import list_models, load_transformers_folder, resolve_model_path
from ..models.refs import ModelRef, ModelsFolder
from ..sampling.guidance import to_conditioning
from .cache import FEATURE_CACHE, tensor_digest
from .features import (DINO_IMAGE_SIZE, SD_FAMILIES, SD_IMAGE_SIZE, SD_LAYER_CHOICES, SD_LAYERS, SD_NOISE_SEED,
                       SD_TIMESTEP, SIFT_IMAGE_SIZE, SIFT_OCTAVES, SIFT_STRIDE, FeatureMaps, dense_sift_features,
                       dinov2_features, sd_denoiser_features)
from .fusion import FUSION_WEIGHT, PCA_DIMS, SECOND_SOURCE_PCA_DIMS, PCABasis, fit_pca_basis, fuse_pair
from .matching import (DEFAULT_MAX_MATCHES, SOFT_TEMPERATURE, SOFT_WINDOW_RADIUS, draw_matches, flow_field,
                       flow_to_image, instance_swap, match_dense, matches_json, side_by_side, sparse_matches)

CATEGORY = "atelier/correspondence"
MAX_IMAGE_SIDE = 4096  # the extractors' largest working side; SD's 960 and DINOv2's 840 fit well inside
MAX_PCA_DIMS = 4096
MAX_SOFT_WINDOW = 16
MAX_MATCHES = 1000
MAX_SWAP_RESOLUTION = 2048
DEFAULT_SWAP_RESOLUTION = 256  # Source: sd-dino demo_swap.ipynb, 256 by default (512 "to align with the paper")
PREVIEW_WIDTH = 768  # the hover widget's picture: enough to point at a cell, small enough for a websocket message
DINOV2_FOLDER = "dinov2"


@dataclasses.dataclass(frozen=True, eq=False)
class DinoBackbone:
    """A loaded DINOv2 model and the folder it came from (the cache key)."""

    model: torch.nn.Module
    source: str


def _mask(mask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.ndim == 3 and mask.shape[0] == 1:
        return mask[0]
    if mask.ndim == 2:
        return mask
    raise ValueError(f"{name} must be one mask of shape (1, H, W); got {tuple(mask.shape)}")


def _size_input(default: int, multiple: int, low: int, tooltip: str) -> tuple[str, dict]:
    return ("INT", {"default": default, "min": low, "max": MAX_IMAGE_SIDE, "step": multiple, "tooltip": tooltip})


class _Extractor:
    """What every feature extractor node returns."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_FEATURES",)
    RETURN_NAMES = ("features",)
    OUTPUT_TOOLTIPS = ("The image's dense feature maps, for Fuse Features.",)
    FUNCTION = "extract"


def parse_layers(text: str) -> tuple[int, ...]:
    """The ldm ``output_blocks`` indices of a comma-separated widget.

    Example:
        >>> parse_layers("2, 5,8")
        (2, 5, 8)
    """
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        layers = ()
    if not layers or any(layer not in SD_LAYER_CHOICES for layer in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers must list distinct indices from {SD_LAYER_CHOICES}, comma-separated; got {text!r}")
    return layers


class AtelierDenseSIFTFeatures(_Extractor):
    DESCRIPTION = ("Weight-free dense features: RootSIFT descriptors on a regular grid at three scales. Lets the "
                   "correspondence nodes run with no model at all.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        multiple = SIFT_STRIDE * 2 ** (SIFT_OCTAVES - 1)
        return {"required": {
            "image": ("IMAGE", {"tooltip": "One image."}),
            "size": _size_input(SIFT_IMAGE_SIZE, multiple, 64, "The long side the image is resized to; the grid is "
                                                               "size / 4 cells (240: the paper's 60×60)."),
        }}

    def extract(self, image: torch.Tensor, size: int) -> tuple[FeatureMaps]:
        return (dense_sift_features(single_image(image, "image"), size),)


class AtelierSDFeatures(_Extractor):
    DESCRIPTION = ("Stable Diffusion UNet decoder features (SD1.x / SD2.x): the image is noised once to t with "
                   "seeded noise and the decoder tensors are taken with hooks, as in 'A Tale of Two Features'. "
                   "Cached per image, model, t and layers.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.x or SD2.x checkpoint's UNet."}),
            "vae": ("VAE", {"tooltip": "Its VAE, to encode the image."}),
            "conditioning": ("CONDITIONING", {"tooltip": "The prompt: the empty prompt as in the paper, or "
                                                                 "a caption of the image."}),
            "image": ("IMAGE", {"tooltip": "One image."}),
            "timestep": ("INT", {"default": SD_TIMESTEP, "min": 0, "max": 999, "step": 1,
                                 "tooltip": "The noise level t; the paper's 100 (0 to 200 works)."}),
            # Not "noise_seed": the editor would add a randomise-after-run control to that name, and the paper's
            # features come from one fixed noise sample.
            "fixed_noise_seed": ("INT", {"default": SD_NOISE_SEED, "min": 0, "max": MAX_SEED, "step": 1,
                                         "tooltip": "Seeds the one noise sample; the paper's 42."}),
            "size": _size_input(SD_IMAGE_SIZE, 64, 64, "The long side the image is resized to; the paper's 960."),
            "layers": ("STRING", {"default": ",".join(map(str, SD_LAYERS)),
                                  "tooltip": "Decoder layers as ldm output_blocks indices from "
                                             f"{SD_LAYER_CHOICES}; the paper's 2,5,8."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, layers: str | None) -> bool | str:
        if layers is None:
            return True
        try:
            parse_layers(layers)
        except ValueError as error:
            return str(error)
        return True

    def extract(self, model: Any, vae: Any, conditioning: list, image: torch.Tensor, timestep: int,
                fixed_noise_seed: int, size: int, layers: str) -> tuple[FeatureMaps]:
        pixels, chosen = single_image(image, "image"), parse_layers(layers)
        family = model.model.family if isinstance(model, ModelRef) else comfy_model_family(model)
        if family not in SD_FAMILIES:
            raise ValueError(f"model must be an SD1.x or SD2.x checkpoint (families {SD_FAMILIES}); got {family!r}")
        prompt, settings = to_conditioning(conditioning, family), (timestep, fixed_noise_seed, size, chosen)
        if not isinstance(model, ModelRef):
            # Inside ComfyUI, whose execution cache keeps this node's output while its inputs are unchanged; a
            # ModelPatcher has no cheap content key for ours (its LoRA patches change the weights, not the object).
            maps = _sd_features(model, vae, prompt, pixels, *settings)
        else:
            loaded = model.model
            with vae.in_use():  # its weights may be elsewhere until held
                vae_digest = tensor_digest(next(vae.vae.parameters()))
            key = ("sd", tensor_digest(pixels), loaded.source, loaded.unet_source, model.loras, str(loaded.dtype),
                   str(loaded.device), vae_digest, tensor_digest(prompt.embeds), *settings)
            maps = FEATURE_CACHE.get_or_compute(
                key, lambda: _sd_features(model, vae, prompt, pixels.to(loaded.device), *settings))
        progress(1, 1)
        return (maps,)


def _sd_features(model: Any, vae: Any, conditioning: Conditioning, pixels: torch.Tensor, timestep: int, seed: int,
                 size: int, layers: tuple[int, ...]) -> FeatureMaps:
    """SD features on whatever arrived on the MODEL and VAE sockets: Atelier's diffusers UNet standalone, ComfyUI's
    ModelPatcher (its LDM ``diffusion_model`` hooked, loaded by ComfyUI's model management) inside ComfyUI."""
    with denoiser_and_codec(model, vae) as (denoiser, codec):
        return sd_denoiser_features(denoiser, denoiser_network(denoiser), codec, pixels, conditioning, timestep, seed,
                                    size, layers)


class AtelierLoadDINOv2(ModelsFolder):
    DESCRIPTION = ("Loads a DINOv2 backbone (transformers' Dinov2Model, .safetensors only, offline) from "
                   "models/dinov2; the paper uses ViT-B/14.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_DINOV2",)
    RETURN_NAMES = ("dinov2",)
    OUTPUT_TOOLTIPS = ("The backbone, for DINOv2 Features.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "dinov2_name": (list_models(DINOV2_FOLDER, cls.models_dir), {
                "tooltip": "A folder in models/dinov2 holding config.json and model.safetensors (e.g. "
                           "facebook/dinov2-base saved with save_pretrained)."}),
        }}

    def load(self, dinov2_name: str) -> tuple[DinoBackbone]:
        from transformers import Dinov2Model

        folder = resolve_model_path(DINOV2_FOLDER, dinov2_name, self.models_dir)
        _, model = load_transformers_folder(folder, Dinov2Model)
        return (DinoBackbone(model, folder),)


class AtelierDINOv2Features(_Extractor):
    DESCRIPTION = ("DINOv2 features: the last layer's patch tokens as a map over the image (ViT-B/14 at 840 px "
                   "gives the paper's 60×60). Cached per image, model and size.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "dinov2": ("ATELIER_DINOV2", {"tooltip": "From Load DINOv2."}),
            "image": ("IMAGE", {"tooltip": "One image."}),
            "size": _size_input(DINO_IMAGE_SIZE, 14, 14, "The long side the image is resized to, a multiple of "
                                                         "the patch size; the paper's 840."),
        }}

    def extract(self, dinov2: DinoBackbone, image: torch.Tensor, size: int) -> tuple[FeatureMaps]:
        pixels = single_image(image, "image")
        key = ("dinov2", tensor_digest(pixels), dinov2.source, size)
        with MEMORY.use_module(dinov2.model):
            maps = FEATURE_CACHE.get_or_compute(key, lambda: dinov2_features(dinov2.model, pixels, size))
        progress(1, 1)
        return (maps,)


def _pca_dims_input(default: int, tooltip: str) -> tuple[str, dict]:
    return ("INT", {"default": default, "min": 0, "max": MAX_PCA_DIMS, "step": 1, "tooltip": tooltip})


def _weight_input(tooltip: str) -> tuple[str, dict]:
    return ("FLOAT", {"default": FUSION_WEIGHT, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.001,
                      "tooltip": tooltip})


class AtelierFitFeatureBasis:
    DESCRIPTION = ("Fits a fixed PCA basis per layer on two images' features, to reuse on other pairs so that "
                   "their descriptors stay comparable (instead of co-PCA fitted on each pair).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_FEATURE_BASIS",)
    RETURN_NAMES = ("basis",)
    OUTPUT_TOOLTIPS = ("The basis, for Fuse Features' basis input.",)
    FUNCTION = "fit"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "features_a": ("ATELIER_FEATURES", {"tooltip": "Features of one image."}),
            "features_b": ("ATELIER_FEATURES", {"tooltip": "Features of another image, from the same extractor."}),
            "pca_dims": ("INT", {"default": PCA_DIMS, "min": 1, "max": MAX_PCA_DIMS, "step": 1,
                                 "tooltip": "Dimensions kept per layer; the paper's 256."}),
        }}

    def fit(self, features_a: FeatureMaps, features_b: FeatureMaps, pca_dims: int) -> tuple[PCABasis]:
        return (fit_pca_basis([features_a, features_b], pca_dims),)


class AtelierFuseFeatures:
    DESCRIPTION = ("Fuses up to two feature sources of an image pair into one descriptor: co-PCA per layer (or a "
                   "fixed basis), layers resampled to one grid, each source L2-normalised and weighted (α = 0.5), "
                   "then concatenated, as in 'A Tale of Two Features'.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_FEATURES", "ATELIER_FEATURES")
    RETURN_NAMES = ("descriptor_a", "descriptor_b")
    OUTPUT_TOOLTIPS = ("Image A's fused descriptor, for Match Features.", "Image B's fused descriptor.")
    FUNCTION = "fuse"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "features_a": ("ATELIER_FEATURES", {"tooltip": "Image A's features of the first source (e.g. SD)."}),
            "features_b": ("ATELIER_FEATURES", {"tooltip": "Image B's features of the same source."}),
            "weight": _weight_input("The first source's weight; the paper's α = 0.5."),
            "pca_dims": _pca_dims_input(PCA_DIMS, "Dimensions kept per layer of the first source by co-PCA; sd-dino's "
                                                  "256 for SD. 0 keeps the raw channels."),
        }, "optional": {
            "features_a_2": ("ATELIER_FEATURES", {"tooltip": "Image A's features of a second source (e.g. DINOv2)."}),
            "features_b_2": ("ATELIER_FEATURES", {"tooltip": "Image B's features of the second source."}),
            "weight_2": _weight_input("The second source's weight; the paper's 1 − α = 0.5."),
            "pca_dims_2": _pca_dims_input(SECOND_SOURCE_PCA_DIMS, "Dimensions kept per layer of the second source; "
                                                                  "0, sd-dino's default, keeps DINOv2 whole."),
            "basis": ("ATELIER_FEATURE_BASIS", {"tooltip": "A fixed basis for the first source instead of co-PCA."}),
            "basis_2": ("ATELIER_FEATURE_BASIS", {"tooltip": "A fixed basis for the second source."}),
        }}

    def fuse(self, features_a: FeatureMaps, features_b: FeatureMaps, weight: float, pca_dims: int,
             features_a_2: FeatureMaps | None = None, features_b_2: FeatureMaps | None = None,
             weight_2: float = FUSION_WEIGHT, pca_dims_2: int = SECOND_SOURCE_PCA_DIMS,
             basis: PCABasis | None = None, basis_2: PCABasis | None = None) -> tuple[FeatureMaps, FeatureMaps]:
        sources, weights, bases, dims = [(features_a, features_b)], [weight], [basis], [pca_dims]
        if (features_a_2 is None) != (features_b_2 is None):
            raise ValueError("features_a_2 and features_b_2 come together: connect both or neither")
        if features_a_2 is not None:
            sources.append((features_a_2, features_b_2))
            weights.append(weight_2)
            bases.append(basis_2)
            dims.append(pca_dims_2)
        elif basis_2 is not None:
            raise ValueError("basis_2 is for the second source; connect features_a_2 and features_b_2 too")
        descriptor_a, descriptor_b = fuse_pair(sources, weights, dims, bases)
        name = "fused " + " + ".join(f"{w:g}·{a.source}" for (a, _), w in zip(sources, weights))
        return (FeatureMaps((descriptor_a,), name, features_a.image_size),
                FeatureMaps((descriptor_b,), name, features_b.image_size))


def _descriptor(features: FeatureMaps, name: str) -> torch.Tensor:
    if len(features.layers) != 1:
        raise ValueError(f"{name} has {len(features.layers)} layers ({features.source}); pass it through Fuse "
                         f"Features first to make one descriptor")
    return features.layers[0]


def _check_sizes(features: FeatureMaps, image: torch.Tensor, name: str) -> None:
    if tuple(features.image_size) != tuple(image.shape[-2:]):
        raise ValueError(f"{name} describes an image of size {tuple(features.image_size)} but the image is "
                         f"{tuple(image.shape[-2:])}; connect the image the features came from")


def _preview(picture: torch.Tensor) -> tuple[str, float]:
    """The picture as a JPEG data URL at most PREVIEW_WIDTH wide, and its scale."""
    scale = min(1.0, PREVIEW_WIDTH / picture.shape[-1])
    if scale < 1:
        size = (max(1, round(picture.shape[-2] * scale)), max(1, round(picture.shape[-1] * scale)))
        picture = F.interpolate(picture[None], size=size, mode="bilinear", antialias=True)[0].clamp(0, 1)
    array = (picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), scale


class AtelierMatchFeatures:
    DESCRIPTION = ("Matches every cell of image A to image B: nearest neighbour (chunked, bounded memory), refined "
                   "by window soft-argmax, with a mutual-nearest-neighbour confidence. Hover over A in the node to "
                   "see the match in B.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK", "STRING", "IMAGE")
    RETURN_NAMES = ("flow", "confidence", "matches", "picture")
    OUTPUT_TOOLTIPS = (
        "A's size; red = matched x / (B width − 1), green = matched y / (B height − 1): a coordinate map.",
        "A's size; 1 where the match is mutual, falling as the cycle A→B→A strays (σ = 1 cell).",
        "JSON list of sparse matches {a: [x, y], b: [x, y], confidence} in pixels.",
        "A and B side by side with lines between the sparse matches.")
    FUNCTION = "match"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "descriptor_a": ("ATELIER_FEATURES", {"tooltip": "Image A's descriptor, from Fuse Features."}),
            "descriptor_b": ("ATELIER_FEATURES", {"tooltip": "Image B's descriptor, from Fuse Features."}),
            "image_a": ("IMAGE", {"tooltip": "Image A, for the picture."}),
            "image_b": ("IMAGE", {"tooltip": "Image B, for the picture."}),
            "soft_window": ("INT", {"default": SOFT_WINDOW_RADIUS, "min": 0, "max": MAX_SOFT_WINDOW, "step": 1,
                                    "tooltip": "Soft-argmax window radius in cells; 0 keeps the hard nearest "
                                               "neighbour (the paper)."}),
            "temperature": ("FLOAT", {"default": SOFT_TEMPERATURE, "min": 0.001, "max": 10.0, "step": 0.001,
                                      "round": 0.0001, "tooltip": "Soft-argmax temperature on squared distances; "
                                                                  "lower is closer to the hard match."}),
            "max_matches": ("INT", {"default": DEFAULT_MAX_MATCHES, "min": 0, "max": MAX_MATCHES, "step": 1,
                                    "tooltip": "How many sparse matches to list and draw, spread over A."}),
            "min_confidence": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "round": 0.001,
                                         "tooltip": "Sparse matches need at least this confidence; 1 keeps mutual "
                                                    "nearest neighbours only."}),
        }}

    def match(self, descriptor_a: FeatureMaps, descriptor_b: FeatureMaps, image_a: torch.Tensor,
              image_b: torch.Tensor, soft_window: int, temperature: float, max_matches: int,
              min_confidence: float) -> dict:
        pixels_a, pixels_b = single_image(image_a, "image_a")[0].cpu(), single_image(image_b, "image_b")[0].cpu()
        _check_sizes(descriptor_a, pixels_a, "descriptor_a")
        _check_sizes(descriptor_b, pixels_b, "descriptor_b")
        dense = match_dense(_descriptor(descriptor_a, "descriptor_a"), _descriptor(descriptor_b, "descriptor_b"),
                            descriptor_a.image_size, descriptor_b.image_size, soft_window, temperature)
        target_xy, confidence = flow_field(dense)
        sparse = sparse_matches(dense, max_matches, min_confidence)
        picture = draw_matches(pixels_a, pixels_b, sparse)
        preview, scale = _preview(side_by_side(pixels_a, pixels_b))
        progress(1, 1)
        widget = {"picture": preview, "scale": scale, "size_a": list(dense.size_a), "size_b": list(dense.size_b),
                  "grid": list(dense.confidence.shape),
                  "targets": [round(v, 1) for v in dense.target_xy.flatten().cpu().tolist()],
                  "confidence": [round(v, 3) for v in dense.confidence.flatten().cpu().tolist()]}
        return {"ui": {"atelier_correspondence": [widget]},
                "result": (flow_to_image(target_xy, dense.size_b)[None].cpu(), confidence[None].cpu(),
                           matches_json(sparse), picture.permute(1, 2, 0)[None])}


class AtelierInstanceSwap:
    DESCRIPTION = ("Instance swap: repaints image A's object with image B's appearance, every pixel taking the "
                   "colour of its nearest-feature pixel in B (the paper's application), in one chunked search.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("A at the working size (long side = resolution), its masked pixels taken from B.",)
    FUNCTION = "swap"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "image_a": ("IMAGE", {"tooltip": "The image whose shape and pose are kept."}),
            "image_b": ("IMAGE", {"tooltip": "The image whose appearance is copied."}),
            "descriptor_a": ("ATELIER_FEATURES", {"tooltip": "Image A's descriptor, from Fuse Features."}),
            "descriptor_b": ("ATELIER_FEATURES", {"tooltip": "Image B's descriptor, from Fuse Features."}),
            "resolution": ("INT", {"default": DEFAULT_SWAP_RESOLUTION, "min": 8, "max": MAX_SWAP_RESOLUTION,
                                   "step": 8, "tooltip": "The working long side in pixels; the paper's demo 256."}),
        }, "optional": {
            "mask_a": ("MASK", {"tooltip": "The object in A to repaint; by default the whole image."}),
            "mask_b": ("MASK", {"tooltip": "The object in B to take colours from; by default the whole image."}),
        }}

    def swap(self, image_a: torch.Tensor, image_b: torch.Tensor, descriptor_a: FeatureMaps,
             descriptor_b: FeatureMaps, resolution: int, mask_a: torch.Tensor | None = None,
             mask_b: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        pixels_a, pixels_b = single_image(image_a, "image_a")[0], single_image(image_b, "image_b")[0]
        _check_sizes(descriptor_a, pixels_a, "descriptor_a")
        _check_sizes(descriptor_b, pixels_b, "descriptor_b")
        swapped = instance_swap(pixels_a, pixels_b, _descriptor(descriptor_a, "descriptor_a"),
                                _descriptor(descriptor_b, "descriptor_b"), _mask(mask_a, "mask_a"),
                                _mask(mask_b, "mask_b"), resolution)
        progress(1, 1)
        return (swapped.permute(1, 2, 0)[None].cpu(),)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    AtelierDenseSIFTFeatures, AtelierSDFeatures, AtelierLoadDINOv2, AtelierDINOv2Features, AtelierFitFeatureBasis,
    AtelierFuseFeatures, AtelierMatchFeatures, AtelierInstanceSwap)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierDenseSIFTFeatures": "Dense SIFT Features (Atelier)", "AtelierSDFeatures": "SD Features (Atelier)",
    "AtelierLoadDINOv2": "Load DINOv2 (Atelier)", "AtelierDINOv2Features": "DINOv2 Features (Atelier)",
    "AtelierFitFeatureBasis": "Fit Feature Basis (Atelier)", "AtelierFuseFeatures": "Fuse Features (Atelier)",
    "AtelierMatchFeatures": "Match Features (Atelier)", "AtelierInstanceSwap": "Instance Swap (Atelier)",
}
