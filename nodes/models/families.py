"""Which model family a checkpoint belongs to, read from its tensor names and shapes or a diffusers folder's configs.

Families: ``"sd1"`` (SD1.x: OpenAI CLIP ViT-L text encoder), ``"sd2"`` (SD2.x: OpenCLIP ViT-H text encoder,
epsilon or v-prediction), ``"sdxl"`` (SDXL base: two text encoders, size and crop conditioning) and
``"sdxl_refiner"`` (SDXL's refiner: the OpenCLIP ViT-bigG encoder only, size, crop and aesthetic-score
conditioning). Any of them may have an inpainting UNet, which takes 9 input channels (the noisy latent, the mask
and the masked image's latent) instead of 4: :attr:`CheckpointInfo.unet_in_channels`.

The checks are structural (which blocks exist, and that the UNet's cross-attention width matches the text
encoders), not tied to SD's real widths, so they hold for the narrow test models as well as for real checkpoints.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")

UNET_PREFIX = "model.diffusion_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."  # OpenAI CLIP, transformers layout
SD2_TEXT_PREFIX = "cond_stage_model.model."  # OpenCLIP layout
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."  # OpenCLIP bigG alone
SDXL_LABEL_EMB_PREFIX = UNET_PREFIX + "label_emb."
UNET_IN_CONV_KEY = UNET_PREFIX + "input_blocks.0.0.weight"

# The token-embedding tensor of each text encoder: its second dimension is the encoder's width.
_TEXT_WIDTH_KEYS = {
    "sd1": (SD1_TEXT_PREFIX + "text_model.embeddings.token_embedding.weight",),
    "sd2": (SD2_TEXT_PREFIX + "token_embedding.weight",),
    "sdxl": (SDXL_TEXT_PREFIXES[0] + "text_model.embeddings.token_embedding.weight",
             SDXL_TEXT_PREFIXES[1] + "token_embedding.weight"),
    "sdxl_refiner": (SDXL_REFINER_TEXT_PREFIX + "token_embedding.weight",),
}
# UNet input channels: the latent alone, or with an inpainting model's mask (1) and masked-image latent (4).
UNET_INPUT_CHANNELS = (4, 9)

# Source: ComfyUI v0.3.64 comfy/supported_models.py, SD20.model_type: the std (biased) of this tensor above 0.09
# marks a v-prediction SD2 model (768-v) unless its UNet is an inpainting one; ComfyUI's own comment calls it a
# guess. Callers can override the result.
V_PREDICTION_PROBE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PREDICTION_STD_THRESHOLD = 0.09
# ComfyUI writes an empty "v_pred" tensor into checkpoints it saves from a v-prediction model, and reads it back
# for SDXL only (SDXL.model_type; SD1 is always epsilon there and SD2 goes by the probe above).
V_PREDICTION_MARKER_KEY = "v_pred"
V_PREDICTION_MARKER_FAMILIES = ("sdxl",)

DIFFUSERS_PIPELINE_CLASSES = {
    "StableDiffusionPipeline": ("sd1", "sd2"), "StableDiffusionInpaintPipeline": ("sd1", "sd2"),
    "StableDiffusionXLPipeline": ("sdxl",), "StableDiffusionXLInpaintPipeline": ("sdxl",),
    "StableDiffusionXLImg2ImgPipeline": ("sdxl", "sdxl_refiner"),
}


class UnknownModelLayoutError(ValueError):
    """The tensors or configs match none of the supported families."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What the tensor names and shapes of a single-file checkpoint say about it."""

    family: str  # one of FAMILIES
    prediction_type: str  # "epsilon" or "v_prediction"
    reason: str  # how the prediction type was decided, for the log
    unet_width: int  # the UNet's first block width (SD: 320)
    unet_parameters: int  # with the width, what tells a narrow shipped model's file from other narrow files
    unet_in_channels: int  # 4, or 9 for an inpainting UNet
    shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict, repr=False, compare=False)


def _prefix_summary(keys: Sequence[str], depth: int = 2, limit: int = 12) -> str:
    """``'model.diffusion_model (686), first_stage_model (248), ...'``: what a state dict holds, for error messages."""
    counts = collections.Counter(".".join(key.split(".")[:depth]) for key in keys)
    parts = [f"{prefix} ({count})" for prefix, count in counts.most_common(limit)]
    more = len(counts) - limit
    return ", ".join(parts) + (f", and {more} more prefixes" if more > 0 else "") if parts else "no tensors"


def _cross_attention_width(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The UNet's cross-attention context width: the input width of the first ``attn2.to_k`` it has."""
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight"):
            return int(shape[1])
    return None


def family_from_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    """Detect the family of an original-layout (LDM) state dict from its tensor names and shapes.

    SDXL holds ``conditioner.embedders.1.`` (its second text encoder) and ``model.diffusion_model.label_emb.``
    (its size and crop embedding); the SDXL refiner holds ``label_emb`` and a lone OpenCLIP encoder under
    ``conditioner.embedders.0.model.``; SD2 holds an OpenCLIP text encoder under ``cond_stage_model.model.``; SD1
    an OpenAI CLIP one under ``cond_stage_model.transformer.``. The UNet's cross-attention width must then equal
    the text encoders' width (their sum for SDXL), and its input take 4 channels (9 for inpainting).

    Args:
        shapes: tensor name → shape, for every tensor in the file.
    Returns:
        one of ``FAMILIES``.
    Raises:
        UnknownModelLayoutError: a layout none of them matches (a LoRA, a VAE or UNet-only file, a UNet with
            another number of input channels, another architecture); the message lists the prefixes found.
    Example:
        >>> family_from_shapes({
        ...     "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
        ...     "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 32),
        ...     "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 32)})
        'sd1'
    """
    keys = list(shapes)
    found = _prefix_summary(keys)
    if any(key.startswith(("lora_unet_", "lora_te", "lora_transformer_")) or ".lora_" in key for key in keys):
        raise UnknownModelLayoutError(
            f"this file holds LoRA weights, not a checkpoint (found: {found}); load it with the LoRA loader")
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        raise UnknownModelLayoutError(
            f"no UNet under {UNET_PREFIX!r}: not a full SD1/SD2/SDXL/SDXL-refiner checkpoint in the original layout "
            f"(found: {found}); accepted are single files holding UNet, VAE and text encoder(s)")

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has(SDXL_LABEL_EMB_PREFIX) and has(SDXL_TEXT_PREFIXES[1]):
        family = "sdxl"
    elif has(SDXL_LABEL_EMB_PREFIX) and has(SDXL_REFINER_TEXT_PREFIX):
        family = "sdxl_refiner"
    elif has(SD2_TEXT_PREFIX):
        family = "sd2"
    elif has(SD1_TEXT_PREFIX):
        family = "sd1"
    else:
        raise UnknownModelLayoutError(
            f"a UNet without a text encoder that SD1 ({SD1_TEXT_PREFIX!r}), SD2 ({SD2_TEXT_PREFIX!r}) or SDXL "
            f"({SDXL_TEXT_PREFIXES[1]!r} with label_emb) would have (found: {found})")

    in_conv = shapes.get(UNET_IN_CONV_KEY)
    if in_conv is None:
        raise UnknownModelLayoutError(f"looks like {family} but its UNet has no input convolution "
                                      f"{UNET_IN_CONV_KEY!r}: the file is incomplete (found: {found})")
    if int(in_conv[1]) not in UNET_INPUT_CHANNELS:
        raise UnknownModelLayoutError(
            f"looks like {family}, but its UNet takes {int(in_conv[1])} input channels; accepted are "
            f"{UNET_INPUT_CHANNELS} (text-to-image, inpainting)")
    missing = [key for key in _TEXT_WIDTH_KEYS[family] if key not in shapes]
    if missing:
        raise UnknownModelLayoutError(f"looks like {family} but lacks {missing} (found: {found})")
    text_width = sum(int(shapes[key][1]) for key in _TEXT_WIDTH_KEYS[family])
    context_width = _cross_attention_width(shapes)
    if context_width is not None and context_width != text_width:
        raise UnknownModelLayoutError(
            f"looks like {family}, but the UNet's cross-attention width is {context_width} while its text "
            f"encoder(s) give {text_width}; the file mixes parts of different models")
    return family


def prediction_type_from_weights(family: str, keys: Sequence[str], load_tensor: Callable[[str], torch.Tensor],
                                 unet_in_channels: int = 4) -> tuple[str, str]:
    """Decide whether a checkpoint predicts the noise or v, as ComfyUI v0.3.64 does (``model_type`` of its
    ``supported_models.py``), so that the same file samples the same way in both.

    SD2 with a 4-channel UNet: v-prediction when the biased std of
    ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` exceeds 0.09 (the 768-v models), a guess that a caller
    can override; SD2 inpainting models are epsilon. SDXL: v-prediction when the file carries ComfyUI's empty
    ``v_pred`` tensor. SD1 and the SDXL refiner: always epsilon (ComfyUI ignores the marker there too).

    Args:
        family: one of ``FAMILIES``.
        keys: every tensor name in the file.
        load_tensor: reads one tensor by name (only the probe tensor is read).
        unet_in_channels: the UNet's input channels (9: inpainting).
    Returns:
        ``(prediction_type, reason)``, the reason in words for the log.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    if family in V_PREDICTION_MARKER_FAMILIES:
        if V_PREDICTION_MARKER_KEY in keys:
            return "v_prediction", f"the file carries ComfyUI's {V_PREDICTION_MARKER_KEY!r} marker"
        return "epsilon", f"{family} without ComfyUI's {V_PREDICTION_MARKER_KEY!r} marker predicts the noise"
    if family != "sd2":
        return "epsilon", f"{family} models predict the noise"
    if unet_in_channels != 4:
        return "epsilon", "SD2 inpainting models predict the noise"
    if V_PREDICTION_PROBE_KEY not in keys:
        return "epsilon", f"no {V_PREDICTION_PROBE_KEY} to test, so the SD2 default"
    std = float(torch.std(load_tensor(V_PREDICTION_PROBE_KEY).float(), unbiased=False))
    if std > V_PREDICTION_STD_THRESHOLD:
        return "v_prediction", f"std {std:.3f} of {V_PREDICTION_PROBE_KEY} > {V_PREDICTION_STD_THRESHOLD}"
    return "epsilon", f"std {std:.3f} of {V_PREDICTION_PROBE_KEY} <= {V_PREDICTION_STD_THRESHOLD}"


def inspect_single_file(path: str | os.PathLike) -> CheckpointInfo:
    """Family, UNet input channels and prediction type of an original-layout ``.safetensors`` checkpoint.

    Only the header (names and shapes) is read, plus the one small tensor the v-prediction probe needs.

    Raises:
        UnknownModelLayoutError: see :func:`family_from_shapes`.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as file:
        keys = list(file.keys())
        shapes = {key: tuple(file.get_slice(key).get_shape()) for key in keys}
        family = family_from_shapes(shapes)
        in_channels = int(shapes[UNET_IN_CONV_KEY][1])
        prediction_type, reason = prediction_type_from_weights(family, keys, file.get_tensor, in_channels)
    unet_parameters = sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(UNET_PREFIX))
    return CheckpointInfo(family, prediction_type, reason, int(shapes[UNET_IN_CONV_KEY][0]), unet_parameters,
                          in_channels, shapes)


def read_json(path: str) -> dict:
    """A JSON config file's content."""
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def family_from_diffusers_folder(folder: str | os.PathLike) -> str:
    """Detect the family of a diffusers pipeline folder from its ``model_index.json`` and UNet config.

    An SDXL pipeline (text-to-image, image-to-image or inpainting) without a first text encoder is the SDXL refiner,
    with one SDXL. An SD pipeline (text-to-image or inpainting) whose UNet uses linear projections in its
    transformers (``use_linear_projection``, as every SD2.x does and no SD1.x does) is SD2, otherwise SD1.

    Raises:
        FileNotFoundError: ``model_index.json`` or ``unet/config.json`` is missing.
        UnknownModelLayoutError: another pipeline class.
    """
    folder = os.fspath(folder)
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{folder!r} is not a diffusers pipeline folder: it has no model_index.json")
    index = read_json(index_path)
    class_name = index.get("_class_name")
    if class_name not in DIFFUSERS_PIPELINE_CLASSES:
        raise UnknownModelLayoutError(
            f"{folder!r} holds a {class_name!r}; accepted pipeline classes are {sorted(DIFFUSERS_PIPELINE_CLASSES)}")
    if "sdxl" in DIFFUSERS_PIPELINE_CLASSES[class_name]:
        text_encoder = index.get("text_encoder")
        return "sdxl" if isinstance(text_encoder, list) and None not in text_encoder else "sdxl_refiner"
    unet_config_path = os.path.join(folder, "unet", "config.json")
    if not os.path.isfile(unet_config_path):
        raise FileNotFoundError(f"{folder!r} has no unet/config.json")
    return "sd2" if read_json(unet_config_path).get("use_linear_projection") else "sd1"


def prediction_type_from_diffusers_folder(folder: str | os.PathLike) -> str:
    """The prediction type a diffusers folder declares in ``scheduler/scheduler_config.json`` (epsilon if unset)."""
    path = os.path.join(os.fspath(folder), "scheduler", "scheduler_config.json")
    return read_json(path).get("prediction_type", "epsilon") if os.path.isfile(path) else "epsilon"
