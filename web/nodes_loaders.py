"""ComfyUI's loader nodes in the standalone app: checkpoints, VAEs and LoRAs, on Atelier's diffusers backbone.

Class names, input names, widget order, defaults and ranges are ComfyUI's, so a workflow saved by ComfyUI loads
unchanged. What travels on the sockets is Atelier's: MODEL a :class:`~nodes.models.refs.ModelRef`, CLIP a
:class:`~nodes.models.clip.Clip`, VAE a :class:`~nodes.common.denoiser.DiffusersCodec`. LoRAs run beside the base
weights as adapters, switched per node, never merged. These classes are never exported to ComfyUI, which has its own.
"""

from __future__ import annotations

import os

from nodes.common.denoiser import DiffusersCodec
from nodes.models.clip import Clip
from nodes.models.loading import list_checkpoints, list_models, load_checkpoint, resolve_model_path
from nodes.models.lora import MAX_STRENGTH, LoraSpec, prefetch_lora
from nodes.models.refs import ModelRef, ModelsFolder
from nodes.models.vae import list_vaes, load_vae

EMBEDDINGS_FOLDER = "embeddings"


def _embedding_dirs(models_dir: str | None) -> tuple[str, ...]:
    return () if models_dir is None else (os.path.join(models_dir, EMBEDDINGS_FOLDER),)


def _strength(tooltip: str) -> tuple[str, dict]:
    return ("FLOAT", {"default": 1.0, "min": -MAX_STRENGTH, "max": MAX_STRENGTH, "step": 0.01, "round": 0.001,
                      "tooltip": tooltip})


class CheckpointLoaderSimple(ModelsFolder):
    DESCRIPTION = ("Loads a Stable Diffusion 1.x, 2.x or SDXL checkpoint (a .safetensors file or a diffusers folder) "
                   "fully offline; every node that loads the same file shares one copy.")
    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The model used for denoising latents.", "The CLIP model used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space.")
    FUNCTION = "load_checkpoint"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"ckpt_name": (list_checkpoints(cls.models_dir), {
            "tooltip": "The name of the checkpoint (model) to load: models/checkpoints (.safetensors only) or a "
                       "diffusers folder."})}}

    def load_checkpoint(self, ckpt_name: str) -> tuple[ModelRef, Clip, DiffusersCodec]:
        loaded = load_checkpoint(ckpt_name, self.models_dir)
        ref = ModelRef(loaded)
        return (ref, Clip(ref, embedding_dirs=_embedding_dirs(self.models_dir)),
                DiffusersCodec(loaded.vae, recipe=ref.recipe()))


class VAELoader(ModelsFolder):
    DESCRIPTION = "Loads a VAE file (models/vae, .safetensors only), to use in place of a checkpoint's own VAE."
    CATEGORY = "loaders"
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("VAE",)
    OUTPUT_TOOLTIPS = ("The VAE.",)
    FUNCTION = "load_vae"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"vae_name": (list_vaes(cls.models_dir), {"tooltip": "A VAE in models/vae."})}}

    def load_vae(self, vae_name: str) -> tuple[DiffusersCodec]:
        return (DiffusersCodec(load_vae(resolve_model_path("vae", vae_name, self.models_dir))),)


class LoraLoader(ModelsFolder):
    DESCRIPTION = ("LoRAs modify the diffusion and CLIP models, for example to apply a style. Atelier runs them beside "
                   "the base weights, so switching or removing one is instant and exact. Chain several to combine.")
    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    FUNCTION = "load_lora"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
            "lora_name": (list_models("loras", cls.models_dir), {"tooltip": "The name of the LoRA."}),
            "strength_model": _strength("How strongly to modify the diffusion model. This value can be negative."),
            "strength_clip": _strength("How strongly to modify the CLIP model. This value can be negative."),
        }}

    def load_lora(self, model: ModelRef, clip: Clip | None, lora_name: str, strength_model: float,
                  strength_clip: float) -> tuple[ModelRef, Clip | None]:
        if strength_model == 0 and strength_clip == 0:
            return model, clip
        path = resolve_model_path("loras", lora_name, self.models_dir)
        prefetch_lora(model.model, path)
        if strength_model != 0:
            model = model.with_lora(LoraSpec(path, strength_model, 0.0))
        if clip is not None and strength_clip != 0:
            clip = clip.with_lora(LoraSpec(path, 0.0, strength_clip))
        return model, clip


class LoraLoaderModelOnly(LoraLoader):
    DESCRIPTION = "Applies a LoRA to the diffusion model only."
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The modified diffusion model.",)
    FUNCTION = "load_lora_model_only"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "lora_name": (list_models("loras", cls.models_dir), {"tooltip": "The name of the LoRA."}),
            "strength_model": _strength("How strongly to modify the diffusion model. This value can be negative."),
        }}

    def load_lora_model_only(self, model: ModelRef, lora_name: str, strength_model: float) -> tuple[ModelRef]:
        return (self.load_lora(model, None, lora_name, strength_model, 0.0)[0],)


NODE_CLASSES = (CheckpointLoaderSimple, VAELoader, LoraLoader, LoraLoaderModelOnly)
DISPLAY_NAMES = {"CheckpointLoaderSimple": "Load Checkpoint", "VAELoader": "Load VAE", "LoraLoader": "Load LoRA",
                 "LoraLoaderModelOnly": "LoraLoaderModelOnly"}
