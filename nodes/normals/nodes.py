"""Normal-map nodes from published weights: StableNormal's YOSO (load its folder once, then estimate normals).

The published folder (``yoso-normal-v0-3``: ``controlnet/``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``model_index.json``) lives in the models folder's ``stablenormal/`` (``--models-dir`` standalone, ComfyUI's
``models/stablenormal``); it carries its own VAE and text encoder, so the node needs no checkpoint. The same code
runs in both hosts: the modules are Atelier's, on the device the memory manager (standalone) or ``default_device``
(inside ComfyUI) gives them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Any

import torch

from ..common.images import to_channels_first, to_channels_last
from ..common.memory import MEMORY, Resident, runs_on
from ..common.progress import progress
from ..models.devices import default_device
from ..models.formats import check_folder_weights
from ..models.loading import list_models, resolve_model_path
from ..models.refs import ModelsFolder
from .stablenormal import (HUB_RESOLUTION, PROCESSING_RESOLUTION, TURBO_TIMESTEP, TWO_STAGE_TIMESTEP,
                           stablenormal_turbo, yoso_normals)

CATEGORY = "atelier/normals"
STABLENORMAL_FOLDER = "stablenormal"
PARTS = ("unet", "controlnet", "vae", "text_encoder")
NIRNE_VERSION = (1, 5)  # Source: hubconf.py, versions from 1.5 on import nirne.pipeline_yoso_normal


@dataclasses.dataclass(frozen=True)
class YosoModel:
    """The published YOSO folder's networks (float32, eval mode) and tokenizer."""

    unet: torch.nn.Module
    controlnet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any


def read_yoso_folder(folder: str) -> YosoModel:
    """The YOSO folder's parts on the CPU, offline, from ``.safetensors`` weights only (the ``fp16`` variant where
    that is all a part has). The ControlNet's ``_class_name`` is the authors' ``ControlNetVAEModel``: its weights
    are diffusers' ``ControlNetModel``'s, built as such (its forward is :func:`controlnet_vae_residuals`).

    Raises:
        UnsafeModelFormatError: a part holds only pickle-based weights.
        FileNotFoundError: a part is missing.
    """
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_folder_weights(folder)

    def options(part: str) -> dict:
        names = os.listdir(os.path.join(folder, part))
        plain = any(name.endswith(".safetensors") and ".fp16." not in name for name in names)
        return dict(subfolder=part, local_files_only=True, use_safetensors=True, variant=None if plain else "fp16")

    parts = {"unet": UNet2DConditionModel.from_pretrained(folder, **options("unet")),
             "controlnet": ControlNetModel.from_pretrained(folder, **options("controlnet")),
             "vae": AutoencoderKL.from_pretrained(folder, **options("vae")),
             "text_encoder": CLIPTextModel.from_pretrained(folder, dtype=torch.float32, **options("text_encoder"))}
    parts = {name: module.float().eval() for name, module in parts.items()}
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    return YosoModel(tokenizer=tokenizer, **parts)


def yoso_version(name: str) -> tuple[int, int] | None:
    """The version in a published folder's name, as hubconf's ``parse_version`` reads it (``yoso-normal-v0-3`` →
    (0, 3)); None when the name carries none.

    Example:
        >>> yoso_version("yoso-normal-v1-8-1"), yoso_version("my_normals")
        ((1, 8), None)
    """
    found = re.search(r"-v(\d+)-(\d+)", name)
    return (int(found.group(1)), int(found.group(2))) if found else None


def load_kept_yoso(folder: str) -> YosoModel:
    """YOSO, one copy per folder, kept by the memory manager (read back if evicted).

    Raises:
        FileNotFoundError: not a published folder.
        ValueError: a version from 1.5 on, which hubconf runs with another recipe (the ``nirne`` package: zero text
            states, the image latent as the UNet's input), not built here.
    """
    folder = os.path.realpath(folder)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"{folder!r} is not the published YOSO folder: it has no model_index.json")
    version = yoso_version(os.path.basename(folder))
    if version is not None and version >= NIRNE_VERSION:
        raise ValueError(f"{os.path.basename(folder)!r} is YOSO v{version[0]}.{version[1]}: from v1.5 on the authors "
                         f"run it with another recipe (zero text states, the image latent as the UNet's input), "
                         f"which this node does not; use yoso-normal-v0-3")

    def load() -> tuple[YosoModel, Resident]:
        model = read_yoso_folder(folder)
        return model, Resident(f"StableNormal {os.path.basename(folder)}",
                               {name: getattr(model, name) for name in PARTS}, home=default_device(),
                               reload=lambda: {name: getattr(read_yoso_folder(folder), name) for name in PARTS})

    signature = tuple(sorted((entry.name, entry.stat().st_mtime_ns) for entry in os.scandir(folder)))
    return MEMORY.kept(("stablenormal", folder, signature), load)


def empty_prompt_states(model: YosoModel, device: torch.device) -> torch.Tensor:
    """The empty prompt as the pipeline's ``encode_prompt`` gives it: padded to the tokenizer's 77 tokens."""
    ids = model.tokenizer("", padding="max_length", max_length=model.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
    return model.text_encoder(ids.to(device))[0]


class AtelierLoadStableNormal(ModelsFolder):
    DESCRIPTION = ("Loads StableNormal's one-step YOSO (SIGGRAPH Asia 2024): the published yoso-normal-v0-3 folder "
                   "(ControlNet, UNet, VAE, text encoder, tokenizer) from models/stablenormal. No checkpoint needed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_STABLENORMAL",)
    RETURN_NAMES = ("stablenormal",)
    OUTPUT_TOOLTIPS = ("StableNormal's YOSO, for StableNormal Normals.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "folder_name": (list_models(STABLENORMAL_FOLDER, cls.models_dir),
                            {"tooltip": "The published folder (e.g. yoso-normal-v0-3) in models/stablenormal."}),
        }}

    def load(self, folder_name: str) -> tuple[YosoModel]:
        return (load_kept_yoso(resolve_model_path(STABLENORMAL_FOLDER, folder_name, self.models_dir)),)


class AtelierStableNormalNormals:
    DESCRIPTION = ("StableNormal Normals: the surface normals of a photo from one step of StableNormal's YOSO, as "
                   "the authors' turbo entry point runs it (the photo at 1024 then 768 on its long side). The "
                   "picture shows each normal n as (n + 1) / 2 in R, G, B.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("normals",)
    OUTPUT_TOOLTIPS = ("The normal map, the input's size: (n + 1) / 2 of unit normals.",)
    FUNCTION = "estimate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "stablenormal": ("ATELIER_STABLENORMAL", {"tooltip": "From Load StableNormal."}),
            "image": ("IMAGE", {"tooltip": "The photo(s); any size."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "step": 1,
                             "tooltip": "The noise the one step starts from."}),
            "timestep": ("INT", {"default": TURBO_TIMESTEP, "min": 0, "max": 999, "step": 1,
                                 "tooltip": f"YOSO's timestep: {TURBO_TIMESTEP} as the authors' turbo entry point "
                                            f"passes it; their two-stage pipeline runs YOSO at "
                                            f"{TWO_STAGE_TIMESTEP}."}),
            "processing_resolution": ("INT", {"default": PROCESSING_RESOLUTION, "min": 64, "max": 2048, "step": 8,
                                              "tooltip": "The long side the network sees (the authors': 768)."}),
        }}

    def estimate(self, stablenormal: YosoModel, image: torch.Tensor, seed: int, timestep: int,
                 processing_resolution: int) -> tuple[torch.Tensor]:
        pixels = to_channels_first(image).float()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad(), contextlib.ExitStack() as held:
            for name in PARTS:
                held.enter_context(MEMORY.use_module(getattr(stablenormal, name)))
            device = runs_on(stablenormal.unet)
            states = empty_prompt_states(stablenormal, device)

            def predict(padded: torch.Tensor) -> torch.Tensor:
                latent_shape = (padded.shape[0], 4, padded.shape[-2] // 8, padded.shape[-1] // 8)
                noise = torch.randn(latent_shape, generator=generator)
                normals = yoso_normals(stablenormal.unet, stablenormal.controlnet, stablenormal.vae, states,
                                       padded.to(device), noise.to(device), timestep)
                progress(1, 1)
                return normals.float().cpu()

            shown = stablenormal_turbo(predict, pixels, HUB_RESOLUTION, processing_resolution)
        return (to_channels_last(shown),)


NODE_CLASS_MAPPINGS = {"AtelierLoadStableNormal": AtelierLoadStableNormal,
                       "AtelierStableNormalNormals": AtelierStableNormalNormals}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierLoadStableNormal": "Load StableNormal (Atelier)",
                              "AtelierStableNormalNormals": "StableNormal Normals (Atelier)"}
