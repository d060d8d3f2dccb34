"""Cut-out nodes from published weights: DiffDIS's high-resolution mask and edge map (load it once, then segment).

The UNet file lives in the models folder's ``diffdis/`` (``--models-dir`` standalone, ComfyUI's ``models/diffdis``);
the VAE and the text encoder come from sd-turbo, through the VAE and CLIP sockets, so the same code runs in both
hosts: the UNet is Atelier's own module, on the device the memory manager (standalone) or ``default_device``
(inside ComfyUI) gives it.
"""

from __future__ import annotations

import os

import torch

from ..common.images import to_channels_first
from ..common.memory import MEMORY, Resident, runs_on
from ..common.progress import progress
from ..models.comfy_adapters import text_conditioning, vae_decoder, vae_encoder
from ..models.devices import default_device
from ..models.families import read_json
from ..models.loading import list_models, resolve_model_path
from ..models.model_configs import shipped_unet_config
from ..models.refs import ModelsFolder
from .diffdis import PROCESSING_RESOLUTION, TTA_SCALES, diffdis_predict, diffdis_segment, load_diffdis_unet

CATEGORY = "atelier/cutout"
DIFFDIS_FOLDER = "diffdis"
EMPTY_PROMPT_TOKENS = 2  # Source: diffdis_pipeline.py, the empty prompt tokenised "do_not_pad": start and end


def base_unet_config(path: str) -> dict:
    """The config DiffDIS's UNet is built on: the ``config.json`` beside the file (the authors' ``unet/`` folder
    has one), as ``run_inference.py``'s ``from_pretrained`` reads it, else SD2.1's shipped one (sd-turbo's UNet is
    SD2.1's)."""
    beside = os.path.join(os.path.dirname(path), "config.json")
    return read_json(beside) if os.path.isfile(beside) else shipped_unet_config("sd2")


def load_kept_diffdis(path: str) -> torch.nn.Module:
    """DiffDIS's UNet, one copy per file, kept by the memory manager (read back if evicted)."""
    path = os.path.realpath(path)

    def read() -> torch.nn.Module:
        return load_diffdis_unet(path, base_unet_config(path))

    def load() -> tuple[torch.nn.Module, Resident]:
        unet = read()
        return unet, Resident(f"DiffDIS {os.path.basename(path)}", {"unet": unet}, home=default_device(),
                              reload=lambda: {"unet": read()})

    return MEMORY.kept(("diffdis", path, os.stat(path).st_mtime_ns), load)


def empty_prompt_states(clip: object, width: int) -> torch.Tensor:
    """The empty prompt's states as DiffDIS sees them, (1, 2, D): its start and end tokens unpadded. A causal text
    encoder gives those two the same states with padding after them, so either host's padded encoding serves.

    Raises:
        ValueError: a text encoder of another width than the UNet's cross-attention (sd-turbo's is 1024).
    """
    states = text_conditioning(clip, "").embeds[:, :EMPTY_PROMPT_TOKENS]
    if states.shape[-1] != width:
        raise ValueError(f"DiffDIS needs sd-turbo's text encoder ({width}-wide states); this CLIP gives "
                         f"{states.shape[-1]}-wide ones: load sd-turbo (or SD 2.1) and use its CLIP")
    return states


class AtelierLoadDiffDIS(ModelsFolder):
    DESCRIPTION = ("Loads DiffDIS (ICLR 2025), high-resolution dichotomous segmentation in one diffusion step: the "
                   "authors' UNet (unet/diffusion_pytorch_model.safetensors) from models/diffdis. Its VAE and text "
                   "encoder are sd-turbo's: give DiffDIS Cut-out the CLIP and VAE of sd-turbo's checkpoint.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_DIFFDIS",)
    RETURN_NAMES = ("diffdis",)
    OUTPUT_TOOLTIPS = ("DiffDIS's UNet, for DiffDIS Cut-out.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "unet_name": (list_models(DIFFDIS_FOLDER, cls.models_dir),
                          {"tooltip": "The authors' unet/diffusion_pytorch_model.safetensors (models/diffdis)."}),
        }}

    def load(self, unet_name: str) -> tuple[torch.nn.Module]:
        return (load_kept_diffdis(resolve_model_path(DIFFDIS_FOLDER, unet_name, self.models_dir)),)


class AtelierDiffDISCutout:
    DESCRIPTION = ("DiffDIS Cut-out: the foreground mask of a photo, with fine structures (hair, wires, lattices), "
                   "and its edge map, from one step of DiffDIS's UNet at 1024². By default the authors' test-time "
                   "augmentation averages six views (flips × scales): six UNet calls; switch it off for one.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "MASK")
    RETURN_NAMES = ("mask", "edges")
    OUTPUT_TOOLTIPS = ("The foreground, 1 inside; soft as the authors give it unless a threshold is set.",
                       "The foreground's edges, soft.")
    FUNCTION = "cut_out"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "diffdis": ("ATELIER_DIFFDIS", {"tooltip": "From Load DiffDIS."}),
            "clip": ("CLIP", {"tooltip": "sd-turbo's CLIP (from Load Checkpoint), for the empty prompt."}),
            "vae": ("VAE", {"tooltip": "sd-turbo's VAE (from Load Checkpoint)."}),
            "image": ("IMAGE", {"tooltip": "The photo(s); any size, resized to the processing size and back."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "step": 1,
                             "tooltip": "The starting noise (one step from pure noise, shared by mask and edges)."}),
            "resolution": ("INT", {"default": PROCESSING_RESOLUTION, "min": 256, "max": 2048, "step": 256,
                                   "tooltip": "The square processing size (the authors': 1024)."}),
            "test_time_augmentation": ("BOOLEAN", {"default": True,
                                                   "tooltip": "Average horizontal flips × scales 0.75, 1, 1.25, as "
                                                              "the authors do (six UNet calls instead of one)."}),
            "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "round": 0.001,
                                    "tooltip": "0 keeps the soft mask; above 0, a binary mask: 1 where the soft "
                                               "one exceeds it."}),
        }}

    def cut_out(self, diffdis: torch.nn.Module, clip: object, vae: object, image: torch.Tensor, seed: int,
                resolution: int, test_time_augmentation: bool, threshold: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = to_channels_first(image).float()
        states = empty_prompt_states(clip, diffdis.config.cross_attention_dim)
        encode, decode = vae_encoder(vae), vae_decoder(vae)
        generator = torch.Generator().manual_seed(seed)
        calls = 2 * len(TTA_SCALES) if test_time_augmentation else 1
        done = 0
        with torch.no_grad(), MEMORY.use_module(diffdis):
            device = runs_on(diffdis)

            def predict(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                nonlocal done
                size = view.shape[-1] // 8
                noise = torch.randn((view.shape[0], 4, size, size), generator=generator)
                maps = diffdis_predict(diffdis, states.to(device), lambda x: encode(x).to(device), decode,
                                       view.to(device), noise.to(device))
                done += 1
                progress(done, calls)
                return tuple(part.float().cpu() for part in maps)

            mask, edges = diffdis_segment(predict, pixels, resolution, test_time_augmentation)
        if threshold > 0:
            mask = (mask > threshold).float()
        return mask, edges


NODE_CLASS_MAPPINGS = {"AtelierLoadDiffDIS": AtelierLoadDiffDIS, "AtelierDiffDISCutout": AtelierDiffDISCutout}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierLoadDiffDIS": "Load DiffDIS (Atelier)",
                              "AtelierDiffDISCutout": "DiffDIS Cut-out (Atelier)"}
