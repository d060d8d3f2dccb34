"""The DiffEditor nodes: the drag (a picture, an edit mask and drags in, the edited picture out, on either host's
SD1.x MODEL and VAE; :mod:`.diffeditor`) and the loader of its optional image-prompt encoder (:mod:`.image_prompt`)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from ..common.images import mask_batch, single_image, to_channels_last
from ..common.limits import MAX_CFG, MAX_RESOLUTION, MAX_SEED
from ..common.memory import MEMORY, Resident
from ..models.comfy_adapters import (denoiser_and_codec, denoiser_network, model_device, model_family,
                                     refuse_attention_patches)
from ..models.devices import default_device
from ..models.loading import list_models, resolve_model_path
from ..models.refs import ModelsFolder
from ..sampling.generate import with_image_size
from ..sampling.guidance import to_conditioning
from ..sampling.previews import progress_reporter
from .diffeditor import (DEFAULT_CFG, DEFAULT_ENERGY, DEFAULT_RESOLUTION, DEFAULT_SDE_STRENGTH, DEFAULT_STEPS,
                         DEFAULT_W_CONTENT, DEFAULT_W_EDIT, DEFAULT_W_INPAINT, METHODS, SIDE_MULTIPLE, diffeditor_drag,
                         parse_drag_points, working_size)
from .image_prompt import (DEFAULT_IP_SCALE, ImagePrompt, ImagePromptAttention, load_image_encoder,
                           load_image_prompt_adapter)

CATEGORY = "atelier/editing"
IMAGE_PROMPT = "DIFFEDITOR_IMAGE_PROMPT"
ADAPTER_FOLDER, ENCODER_FOLDER = "diffeditor", "clip_vision"
FAMILIES = ("sd1", "sd2")  # the decoder layout the features and the memory bank are read from (the authors': SD1.5)
MAX_DRAG_STEPS = 1000
MAX_ENERGY = 100_000.0
MAX_WEIGHT = 100.0


class AtelierDiffEditorDrag:
    DESCRIPTION = ("DiffEditor (Mou et al., CVPR 2024), training-free: drag points of a picture to new places. The "
                   "picture is inverted with DDIM and sampled back while an energy on the UNet's features pulls each "
                   "handle's content to its target and keeps the rest; a memory bank of the inversion's attention, a "
                   "regional ODE-SDE mix and time travel keep it faithful. Paint the edit mask over what may change "
                   "(the object and where it goes). The authors' settings: 50 steps, CFG 4, energy 2000.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The edited picture, at the working size (the resolution's area, sides a multiple of 64).",)
    FUNCTION = "drag"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.x model (the authors': SD 1.5); its UNet's own weights, untrained "
                                           "for this."}),
            "vae": ("VAE", {"tooltip": "The model's VAE."}),
            "image": ("IMAGE", {"tooltip": "The picture to edit (one)."}),
            "mask": ("MASK", {"tooltip": "The edit region: 1 over the object and the places it is dragged to; the "
                                         "rest is kept (paint it in the mask editor)."}),
            "positive": ("CONDITIONING", {"tooltip": "A prompt describing the picture (the inversion, the features "
                                                     "and the guided half use it)."}),
            "negative": ("CONDITIONING", {"tooltip": "The unguided half's prompt (the authors': empty)."}),
            "drags": ("STRING", {"default": "", "multiline": True,
                                 "tooltip": "One drag per line: 'x,y -> x,y', the handle then its target, in the "
                                            "input picture's pixels."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": MAX_SEED, "step": 1,
                             "tooltip": "Seed of the SDE mix's noise (the authors': 42)."}),
            "steps": ("INT", {"default": DEFAULT_STEPS, "min": 2, "max": MAX_DRAG_STEPS, "step": 1,
                              "tooltip": "DDIM steps, for the inversion and the edit (the authors': 50; other counts "
                                         "map the schedule's phases by fraction)."}),
            "cfg": ("FLOAT", {"default": DEFAULT_CFG, "min": 1.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance (the authors': 4)."}),
            "energy_scale": ("FLOAT", {"default": DEFAULT_ENERGY, "min": 0.0, "max": MAX_ENERGY, "step": 100.0,
                                       "round": 1.0,
                                       "tooltip": "Strength of the drag energy's gradient (the authors' 2000); 0 "
                                                  "only reconstructs the picture."}),
            "w_edit": ("FLOAT", {"default": DEFAULT_W_EDIT, "min": 0.0, "max": MAX_WEIGHT, "step": 0.1,
                                 "round": 0.01, "tooltip": "Weight of the pull toward the targets (the authors': 4)."}),
            "w_content": ("FLOAT", {"default": DEFAULT_W_CONTENT, "min": 0.0, "max": MAX_WEIGHT, "step": 0.1,
                                    "round": 0.01,
                                    "tooltip": "Weight of keeping the picture outside the mask (the authors': 6)."}),
            "w_inpaint": ("FLOAT", {"default": DEFAULT_W_INPAINT, "min": 0.0, "max": MAX_WEIGHT, "step": 0.05,
                                    "round": 0.01,
                                    "tooltip": "Weight of changing the place a handle leaves (the authors': 0.2)."}),
            "sde_strength": ("FLOAT", {"default": DEFAULT_SDE_STRENGTH, "min": 0.0, "max": 1.0, "step": 0.05,
                                       "round": 0.01,
                                       "tooltip": "Noise of the regional SDE steps inside the mask (the authors': "
                                                  "0.4; DiffEditor only)."}),
            "resolution": ("INT", {"default": DEFAULT_RESOLUTION, "min": SIDE_MULTIPLE, "max": MAX_RESOLUTION,
                                   "step": SIDE_MULTIPLE,
                                   "tooltip": "The picture is edited at this side squared in area, sides a multiple "
                                              "of 64 (the authors': 768 for SD 1.5; the embedded model: 64)."}),
            "method": (list(METHODS), {"default": METHODS[0],
                                       "tooltip": "DiffEditor (regional SDE, time travel) or the authors' earlier "
                                                  "DragonDiffusion (guidance on every early step)."}),
        }, "optional": {
            "image_prompt": (IMAGE_PROMPT, {"tooltip": "DiffEditor's image-prompt encoder (Load DiffEditor Image "
                                                       "Prompt): the picture's CLIP tokens join the cross-attention "
                                                       "on steps 10-19. Without it the training-free parts run "
                                                       "alone."}),
            "ip_scale": ("FLOAT", {"default": DEFAULT_IP_SCALE, "min": 0.0, "max": 2.0, "step": 0.01, "round": 0.001,
                                   "tooltip": "Weight of the image prompt's attention (the authors': 0.1 for "
                                              "drags)."}),
        }}

    def drag(self, model: Any, vae: Any, image: torch.Tensor, mask: torch.Tensor, positive: list, negative: list,
             drags: str, seed: int, steps: int, cfg: float, energy_scale: float, w_edit: float, w_content: float,
             w_inpaint: float, sde_strength: float, resolution: int, method: str,
             image_prompt: ImagePrompt | None = None, ip_scale: float = DEFAULT_IP_SCALE) -> tuple[torch.Tensor]:
        pixels, region = single_image(image, "image").float(), mask_batch(mask)[:1]
        height, width = pixels.shape[-2:]
        if region.shape[-2:] != (height, width):
            raise ValueError(f"mask must be the image's size {height}x{width}; got "
                             f"{region.shape[-2]}x{region.shape[-1]}")
        if not bool((region > 0.5).any()):
            raise ValueError("mask is empty: paint the edit region (the object and where it goes)")
        points = parse_drag_points(drags)
        outside = [point for drag in points for point in drag
                   if not (0 <= point[0] < width and 0 <= point[1] < height)]
        if outside:
            raise ValueError(f"drag points {outside} lie outside the {width}x{height} picture")
        family = model_family(model)
        if family not in FAMILIES:
            raise ValueError(f"DiffEditor reads an SD1.x/SD2.x UNet's decoder; got a {family} model")
        refuse_attention_patches(model, "DiffEditor Drag")
        size = working_size(height, width, resolution)
        scale_y, scale_x = size[0] / height, size[1] / width
        points = [tuple((x * scale_x, y * scale_y) for x, y in drag) for drag in points]
        if size != (height, width):
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True).clamp(0, 1)
        region = (F.interpolate(region, size=size, mode="bilinear") > 0.5).float()  # process_drag's cv2.resize
        # ComfyUI runs nodes in inference mode, where autograd records nothing: the guidance alone records gradients
        with torch.inference_mode(False), torch.no_grad(), \
                denoiser_and_codec(model, vae, differentiable=True) as (denoiser, codec):
            prompts = [with_image_size(to_conditioning(conditioning, family, name), *size)
                       for conditioning, name in ((positive, "positive"), (negative, "negative"))]
            latent = (codec.encode(pixels.to(codec.device)) - codec.shift_factor) * codec.scaling_factor
            latent = latent.to(model_device(model))
            branch = None
            if image_prompt is not None:
                branch = ImagePromptAttention(image_prompt.adapter, *image_prompt.tokens(pixels), ip_scale)
            edited = diffeditor_drag(denoiser, denoiser_network(denoiser), latent, *prompts, points, region,
                                     torch.Generator().manual_seed(seed), codec.downscale, steps, cfg, energy_scale,
                                     w_edit, w_content, w_inpaint, sde_strength, method, branch,
                                     progress_reporter(family))
            picture = codec.decode(edited / codec.scaling_factor + codec.shift_factor)
        return (to_channels_last(picture.float().cpu()),)


def load_kept_image_prompt(adapter_path: str, encoder_path: str) -> ImagePrompt:
    """The image-prompt encoder of two files, one copy per pair, kept by the memory manager (read back if evicted)."""
    paths = tuple(os.path.realpath(path) for path in (adapter_path, encoder_path))

    def read() -> dict[str, torch.nn.Module]:
        return {"adapter": load_image_prompt_adapter(paths[0]), "encoder": load_image_encoder(paths[1])}

    def load() -> tuple[ImagePrompt, Resident]:
        parts = read()
        resident = Resident(f"DiffEditor image prompt {os.path.basename(paths[0])}", parts, home=default_device(),
                            reload=read)
        return ImagePrompt(parts["encoder"], parts["adapter"]), resident

    signature = tuple(os.stat(path).st_mtime_ns for path in paths)
    return MEMORY.kept(("diffeditor image prompt", paths, signature), load)


class AtelierLoadDiffEditorImagePrompt(ModelsFolder):
    DESCRIPTION = ("Loads DiffEditor's image-prompt encoder (trained): its adapter (ip_sd15_64, converted to "
                   ".safetensors) from models/diffeditor and the CLIP ViT-H/14 image encoder it reads "
                   "(h94/IP-Adapter's models/image_encoder/model.safetensors) from models/clip_vision.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (IMAGE_PROMPT,)
    RETURN_NAMES = ("image_prompt",)
    OUTPUT_TOOLTIPS = ("The image-prompt encoder, for DiffEditor Drag.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "adapter_name": (list_models(ADAPTER_FOLDER, cls.models_dir),
                             {"tooltip": "ip_sd15_64.safetensors (models/diffeditor), converted from the authors' "
                                         "ip_sd15_64.bin."}),
            "encoder_name": (list_models(ENCODER_FOLDER, cls.models_dir),
                             {"tooltip": "The CLIP ViT-H/14 image encoder (models/clip_vision), in transformers' "
                                         "layout; a config.json beside it is read, else ViT-H/14's."}),
        }}

    def load(self, adapter_name: str, encoder_name: str) -> tuple[ImagePrompt]:
        return (load_kept_image_prompt(resolve_model_path(ADAPTER_FOLDER, adapter_name, self.models_dir),
                                       resolve_model_path(ENCODER_FOLDER, encoder_name, self.models_dir)),)


NODE_CLASS_MAPPINGS = {"AtelierDiffEditorDrag": AtelierDiffEditorDrag,
                       "AtelierLoadDiffEditorImagePrompt": AtelierLoadDiffEditorImagePrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierDiffEditorDrag": "DiffEditor Drag",
                              "AtelierLoadDiffEditorImagePrompt": "Load DiffEditor Image Prompt"}
