"""The embedded model's loader, in whichever host runs it.

Standalone it gives what CheckpointLoaderSimple gives for ``atelier_embedded_sd1.safetensors``: Atelier's
diffusers-backed MODEL, CLIP and VAE. Inside ComfyUI, whose core nodes (KSampler, VAEDecode, ...) consume what
arrives on those sockets, it gives ComfyUI's own ModelPatcher, ``comfy.sd.CLIP`` and ``comfy.sd.VAE``, built with
the architecture given explicitly (:mod:`.comfy_native`), because ComfyUI's checkpoint detection does not know
the embedded model's widths.
"""

from __future__ import annotations

import os
from typing import Any

from ..common.comfy_host import inside_comfyui
from ..common.denoiser import DiffusersCodec
from ..models.checkpoint_unet import EMBEDDINGS_FOLDER, load_checkpoint_with_unet
from ..models.clip import Clip
from ..models.formats import SAFE_EXTENSION, check_safetensors
from ..models.loading import (SHIPPED_MODELS, comfy_folder_paths, list_checkpoints, list_models, load_model,
                              resolve_checkpoint, resolve_model_path)
from ..models.comfy_adapters import model_with_lora
from ..models.lora import MAX_STRENGTH
from ..models.refs import ModelRef, ModelsFolder
from ..models.sources import SHIPPED_NAME
from .comfy_native import load_comfy_native

CATEGORY = "atelier/loaders"
EMBEDDED_CHECKPOINT = os.path.join(SHIPPED_MODELS, "checkpoints", SHIPPED_NAME + SAFE_EXTENSION)
# The same weights as a diffusers folder: its configs are the architecture the single file lacks.
EMBEDDED_CONFIG_DIR = os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME)
LORA_FOLDER = "loras"
UNET_FOLDER = "diffusion_models"  # ComfyUI's name (it also reads the older models/unet there)


class AtelierEmbeddedCheckpointLoader(ModelsFolder):
    DESCRIPTION = ("Loads Atelier's embedded text-to-image model (SD1's layout at a fraction of the width, 64×64 "
                   "pictures of coloured shapes; no download). Inside ComfyUI its outputs are ComfyUI's own MODEL, "
                   "CLIP and VAE, so ComfyUI's KSampler, CLIPTextEncode and VAEDecode take them.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The embedded model's UNet, for denoising 8×8-latent (64 px) images.",
                       "Its text encoder (SD1's tokenizer), for CLIPTextEncode.",
                       "Its VAE, for decoding latents to images and encoding images to latents.")
    FUNCTION = "load_checkpoint"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {}}

    def load_checkpoint(self) -> tuple[Any, Any, Any]:
        if inside_comfyui():
            return load_comfy_native(EMBEDDED_CHECKPOINT, EMBEDDED_CONFIG_DIR,
                                     embedding_directory=comfy_folder_paths().get_folder_paths(EMBEDDINGS_FOLDER))
        ref = ModelRef(load_model(EMBEDDED_CHECKPOINT))
        # CheckpointLoaderSimple's embeddings folder: models_dir/embeddings when the app bound a models folder.
        embedding_dirs = () if self.models_dir is None else (os.path.join(self.models_dir, EMBEDDINGS_FOLDER),)
        return ref, Clip(ref, embedding_dirs=embedding_dirs), DiffusersCodec(ref.model.vae, recipe=ref.recipe())


class AtelierLoraWhenReady(ModelsFolder):
    DESCRIPTION = ("Loads a LoRA for the diffusion model while sampling goes on (SwiftDiffusion): sampling starts on "
                   "the base weights and the LoRA comes in at the first step boundary after its file is read, never "
                   "inside a step. The first steps may then run without it: use Load LoRA for an exact result. "
                   "Inside ComfyUI, whose model management owns the weights, the LoRA is applied before sampling.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, with the LoRA from the step its file is ready.",)
    FUNCTION = "load_lora"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "lora_name": (list_models(LORA_FOLDER, cls.models_dir), {"tooltip": "A LoRA in models/loras."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -MAX_STRENGTH, "max": MAX_STRENGTH, "step": 0.01,
                                         "round": 0.001, "tooltip": "How strongly to modify the diffusion model; "
                                                                    "can be negative."}),
        }}

    def load_lora(self, model: Any, lora_name: str, strength_model: float) -> tuple[Any]:
        path = resolve_model_path(LORA_FOLDER, lora_name, self.models_dir)
        check_safetensors(path)
        return (model_with_lora(model, path, strength_model, when_ready=True),)


class AtelierCheckpointWithUNet(ModelsFolder):
    DESCRIPTION = ("Loads a checkpoint with its UNet replaced by a UNet file (models/diffusion_models, diffusers "
                   "layout, .safetensors only): for models published as their UNet alone, such as Rectified "
                   "Diffusion's (with SD1.5 or SDXL) or KOALA's (with SDXL). The text encoders and VAE are the "
                   "checkpoint's. A file that does not fit the checkpoint's UNet (or KOALA's, for SDXL) is refused.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The UNet file's diffusion model.", "The checkpoint's text encoder(s).",
                       "The checkpoint's VAE.")
    FUNCTION = "load_checkpoint"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "ckpt_name": (list_checkpoints(cls.models_dir), {
                "tooltip": "The base checkpoint the UNet was trained from: its text encoders and VAE are used."}),
            "unet_name": (list_models(UNET_FOLDER, cls.models_dir), {
                "tooltip": "A UNet file in models/diffusion_models, e.g. rd.safetensors (converted from the "
                           "published rd.ckpt)."}),
        }}

    def load_checkpoint(self, ckpt_name: str, unet_name: str) -> tuple[Any, Any, Any]:
        return load_checkpoint_with_unet(resolve_checkpoint(ckpt_name, self.models_dir),
                                         resolve_model_path(UNET_FOLDER, unet_name, self.models_dir), self.models_dir)


NODE_CLASS_MAPPINGS = {"AtelierEmbeddedCheckpointLoader": AtelierEmbeddedCheckpointLoader,
                       "AtelierLoraWhenReady": AtelierLoraWhenReady,
                       "AtelierCheckpointWithUNet": AtelierCheckpointWithUNet}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierEmbeddedCheckpointLoader": "Load Embedded Checkpoint (Atelier)",
                              "AtelierLoraWhenReady": "Load LoRA When Ready (Atelier)",
                              "AtelierCheckpointWithUNet": "Load Checkpoint + UNet File (Atelier)"}
