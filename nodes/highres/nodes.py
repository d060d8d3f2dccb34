"""The highres nodes: tiled sampling (MultiDiffusion, Mixture of Diffusers, shifted tiles), the same tiling as a
MODEL patch for ComfyUI's samplers, LinFusion, and the Tiled 16K generator. They are thin: each checks its
widgets, calls :mod:`.tiling`, :mod:`.unet_wrapper`, :mod:`.linfusion` or :mod:`.generate`, and returns a tuple.
Design note: ``highres.md``.

LinFusion travels on its own socket, ``ATELIER_LINFUSION`` (:class:`LinFusion`): the shared model is never changed;
the nodes that take it mount it on the UNet under the model's lock for their own run only, as LoRAs are switched.
Inside ComfyUI, the LinFusion Patch (:class:`AtelierLinFusionPatch`) puts the same layers on a clone of its MODEL.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from ..common.checks import range_errors
from ..common.comfy_host import comfy_model_family, inside_comfyui
from ..common.denoiser import Conditioning, Denoiser, DiffusersCodec, DiffusersDenoiser, LatentCodec
from ..common.images import to_channels_first
from ..common.paths import confine
from ..common.tiled_vae import DECODE_PRECISIONS, decode_dtype, tiled_decode
from ..common.limits import MAX_CFG, MAX_RESOLUTION, MAX_SEED, MAX_STEPS
from ..common.memory import MEMORY
from ..models.comfy_adapters import ComfyCodec, denoiser_and_codec, model_device, model_family
from ..models.loading import LoadedModel, check_safetensors, files_under
from ..models.refs import ModelRef, ModelsFolder
from ..sampling.generate import generate
from ..sampling.guidance import to_conditioning
from ..sampling.samplers import SAMPLERS, SCHEDULERS, check_sampler_settings
from .generate import SCHEDULES, generate_large, plan_stages
from .linfusion import (LayerConfig, LdmSelfAttention, ldm_linfusion_config, linfusion_config, load_linfusion,
                        mounted, read_linfusion)
from .tiling import MODES, TiledDenoiser, TileSettings
from .unet_wrapper import TiledUnetWrapper

CATEGORY = "atelier/highres"
LINFUSION_FOLDER = "linfusion"  # models/linfusion: the published diffusion_pytorch_model.safetensors, renamed
MAX_TILE_PX = 4096
MAX_TILE_BATCH = 64
DEFAULT_TILE_PX = 512  # Source: FSTD's 64-latent tile (highres.md §2.1)
DEFAULT_OVERLAP_PX = 128  # 16 latent; Source: the A1111 wiki's 16–32 latent for Mixture of Diffusers
DEFAULT_OFFSET_STRIDE_PX = 256  # 32 latent; Source: FSTD's offset_stride for T = 64
VAE_OVERLAP_DIVISOR = 8  # VAE tiles overlap by 1/8 of their side: the VAE Decode node's 64 px at 512 px
# The VAE of every family ComfyUI's MODEL may be here (SD1, SD2, SDXL: comfy_model_family checks) has 8 pixels
# to a latent pixel; the MODEL socket carries no VAE to ask.
SD_LATENT_DOWNSCALE = 8


@dataclasses.dataclass(frozen=True)
class LinFusion:
    """LinFusion layers loaded for one model's UNet, and the layers they replace."""

    model: LoadedModel
    layers: torch.nn.ModuleList
    config: tuple[LayerConfig, ...]


@contextlib.contextmanager
def model_in_use(model: ModelRef, linfusion: LinFusion | None) -> Iterator[LoadedModel]:
    """The model under its lock, with its ref's LoRAs and, if given, LinFusion mounted for the block."""
    if linfusion is not None and linfusion.model is not model.model:
        raise ValueError("linfusion was loaded for another checkpoint than model; load it from this model")
    with model.in_use() as loaded:
        if linfusion is None:
            yield loaded
            return
        with MEMORY.use_module(linfusion.layers), mounted(loaded.unet, linfusion.layers, list(linfusion.config)):
            yield loaded


@contextlib.contextmanager
def denoiser_and_codec_with(model: Any, vae: Any, linfusion: LinFusion | None
                            ) -> Iterator[tuple[Denoiser, LatentCodec]]:
    """:func:`~nodes.models.comfy_adapters.denoiser_and_codec` of the MODEL and VAE sockets, with LinFusion mounted
    for the block if given. LinFusion's layers replace a diffusers UNet's attention, so they need Atelier's model.

    Raises:
        TypeError: LinFusion with ComfyUI's MODEL; or see ``denoiser_and_codec``.
    """
    if linfusion is None:
        with denoiser_and_codec(model, vae) as parts:
            yield parts
        return
    if not isinstance(model, ModelRef):
        raise TypeError("linfusion mounts on Atelier's own MODEL (a diffusers UNet); got a MODEL of type "
                        f"{type(model).__name__}: unlink linfusion")
    # The model's lock is reentrant: denoiser_and_codec takes it and switches the ref's LoRAs, then model_in_use
    # mounts LinFusion, in the order model_in_use alone keeps (LoRAs first).
    with denoiser_and_codec(model, vae) as parts, model_in_use(model, linfusion):
        yield parts


def _spreadable(model: Any, linfusion: LinFusion | None) -> ModelRef | None:
    """The MODEL that a tile pool's workers can rebuild the denoiser from: Atelier's, without LinFusion mounted
    (its layers live on this process's UNet only)."""
    return model if isinstance(model, ModelRef) and linfusion is None else None


def _plain_prompts(positive: list, negative: list, family: str) -> tuple[Conditioning, Conditioning]:
    return to_conditioning(positive, family, "positive"), to_conditioning(negative, family, "negative")


def _tiling_inputs() -> dict[str, tuple]:
    return {
        "mode": (list(MODES), {"tooltip": "mixture: Mixture of Diffusers' Gaussian blend (no seams); "
                                          "multidiffusion: uniform average; shifted: FSTD's non-overlapping tiles, "
                                          "shifted every step (fewest UNet calls)."}),
        "tile_size": ("INT", {"default": DEFAULT_TILE_PX, "min": 64, "max": MAX_TILE_PX, "step": 8,
                              "tooltip": "Tile side in pixels; the model's native size works best."}),
        "overlap": ("INT", {"default": DEFAULT_OVERLAP_PX, "min": 0, "max": MAX_TILE_PX - 8, "step": 8,
                            "tooltip": "Least overlap between tiles in pixels (mixture, multidiffusion)."}),
        "offset_stride": ("INT", {"default": DEFAULT_OFFSET_STRIDE_PX, "min": 8, "max": MAX_TILE_PX, "step": 8,
                                  "tooltip": "Shifted mode: the grid moves in steps of this many pixels; "
                                             "(tile / stride)² offsets per cycle."}),
        "tile_batch_size": ("INT", {"default": 4, "min": 1, "max": MAX_TILE_BATCH, "step": 1,
                                    "tooltip": "Tiles per UNet call; the result does not depend on it."}),
    }


def _sampling_inputs() -> dict[str, tuple]:
    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1, "control_after_generate": True,
                         "tooltip": "The noise seed; it also seeds the shifted mode's offset schedule."}),
        "steps": ("INT", {"default": 20, "min": 1, "max": MAX_STEPS, "step": 1, "tooltip": "Denoising steps."}),
        "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale; 1 skips the negative pass."}),
        "sampler_name": (list(SAMPLERS), {"tooltip": "The solver."}),
        "scheduler": (list(SCHEDULERS), {"tooltip": "The noise levels the solver visits."}),
    }


def _tile_settings(mode: str, tile_size: int, overlap: int, offset_stride: int, tile_batch_size: int, seed: int,
                   downscale: int) -> TileSettings:
    return TileSettings(mode, tile_size // downscale, overlap // downscale, tile_batch_size,
                        offset_stride // downscale, seed)


def _validate(cls: type, values: dict) -> bool | str:
    """Widget limits of the named inputs (naming them switches ComfyUI's own checks off), then their relations."""
    specs = {**cls.INPUT_TYPES()["required"]}
    errors = range_errors(values, {name: (specs[name][1]["min"], specs[name][1]["max"]) for name in values})
    tile, overlap, stride = values.get("tile_size"), values.get("overlap"), values.get("offset_stride")
    if tile is not None and overlap is not None and overlap >= tile:
        errors.append(f"overlap must be smaller than tile_size; got {overlap} >= {tile}")
    if tile is not None and stride is not None and stride > tile:
        errors.append(f"offset_stride must be at most tile_size; got {stride} > {tile}")
    return "; ".join(errors) or True


class AtelierTiledSample:
    DESCRIPTION = ("Samples a latent of any size tile by tile and blends the tiles with weights that sum to 1 at "
                   "every pixel: Mixture of Diffusers (Gaussian, seamless), MultiDiffusion (uniform) or FSTD-style "
                   "shifted tiles, which need the fewest UNet calls. Optional LinFusion attention.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "report")
    OUTPUT_TOOLTIPS = ("The denoised latents.", "Tiles the UNet evaluated per step.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to denoise with."}),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
            "negative": ("CONDITIONING", {"tooltip": "What it should not show."}),
            "latent_image": ("LATENT", {"tooltip": "An empty latent, or an encoded image for image-to-image."}),
            **_sampling_inputs(),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "round": 0.001,
                                  "tooltip": "1 for text-to-image; lower keeps more of the input latents."}),
            **_tiling_inputs(),
        }, "optional": {
            "linfusion": ("ATELIER_LINFUSION", {"tooltip": "LinFusion layers to use in place of self-attention."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size: int | None, overlap: int | None, offset_stride: int | None) -> bool | str:
        return _validate(cls, {"tile_size": tile_size, "overlap": overlap, "offset_stride": offset_stride})

    def sample(self, model: ModelRef, positive: list, negative: list, latent_image: dict, seed: int,
               steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float, mode: str, tile_size: int,
               overlap: int, offset_stride: int, tile_batch_size: int,
               linfusion: LinFusion | None = None) -> tuple[dict, str]:
        if "noise_mask" in latent_image:
            raise ValueError("AtelierTiledSample does not support a LATENT noise_mask (inpainting); remove the mask")
        with model_in_use(model, linfusion) as loaded:
            codec = DiffusersCodec(loaded.vae)
            check_sampler_settings(sampler_name, scheduler, steps, denoise=denoise, family=loaded.family)
            positive, negative = _plain_prompts(positive, negative, loaded.family)
            tiled = TiledDenoiser(DiffusersDenoiser(loaded.unet, loaded.schedule),
                                  _tile_settings(mode, tile_size, overlap, offset_stride, tile_batch_size, seed,
                                                 codec.downscale),
                                  model=_spreadable(model, linfusion))
            latent = generate(tiled, codec, loaded.family, positive, negative,
                              latent_image["samples"].to(loaded.device), seed, steps, cfg, sampler_name, scheduler,
                              denoise)
        mean = sum(tiled.tiles_per_call) / len(tiled.tiles_per_call)
        report = f"{mode}: {mean:g} tiles per step over {len(tiled.tiles_per_call)} steps"
        return {"samples": latent.cpu()}, report


class AtelierLoadLinFusion(ModelsFolder):
    DESCRIPTION = ("Loads published LinFusion weights (SD1.5, SD2.1 or SDXL) for the model: linear attention in place "
                   "of self-attention, so memory grows linearly with the image's pixels. The tiled sampler and the "
                   "16K generator use it for their run; the model itself is left unchanged.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("ATELIER_LINFUSION",)
    RETURN_NAMES = ("linfusion",)
    OUTPUT_TOOLTIPS = ("LinFusion layers for this model.",)
    FUNCTION = "load"

    @classmethod
    def linfusion_folder(cls) -> str | None:
        return cls.models_subfolder(LINFUSION_FOLDER)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        folder = cls.linfusion_folder()
        names = [] if folder is None else sorted(files_under(folder, (".safetensors",)))
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the LinFusion weights were trained for."}),
            "linfusion_name": (names, {"tooltip": "A LinFusion .safetensors in models/linfusion (the published "
                                                  "diffusion_pytorch_model.safetensors under any name)."}),
        }}

    @classmethod
    def linfusion_path(cls, linfusion_name: str) -> str:
        """The checked path of ``linfusion_name`` in models/linfusion."""
        folder = cls.linfusion_folder()
        if folder is None:
            raise ValueError("no models folder for LinFusion files: pass --models-dir (standalone) or run inside "
                             "ComfyUI")
        path = confine(folder, linfusion_name)
        check_safetensors(path)
        return path

    def load(self, model: ModelRef, linfusion_name: str) -> tuple[LinFusion]:
        path = self.linfusion_path(linfusion_name)
        with model.in_use() as loaded:
            layers = load_linfusion(path, loaded.unet, loaded.family)
            config = tuple(linfusion_config(loaded.unet, loaded.family))
        return (LinFusion(loaded, layers, config),)


class AtelierTiled16KGenerator:
    DESCRIPTION = ("Makes an image of up to 16384 pixels a side: LinFusion's staged recipe (text-to-image at the base "
                   "size, then ×2 per stage, re-noised less each time) or one direct pass, every stage sampled with "
                   "tiled diffusion, then a tiled VAE decode with shared normalisation statistics (inside ComfyUI, "
                   "on its MODEL and VAE: ComfyUI's own tiled decode).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report")
    OUTPUT_TOOLTIPS = ("The image.", "Per stage: size, strength, steps, tiles per step and tokens.")
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to sample with: Atelier's, or ComfyUI's (SD1, SD2) with its "
                                           "LoRAs and patches."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
            "negative": ("CONDITIONING", {"tooltip": "What it should not show."}),
            "width": ("INT", {"default": 2048, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "Image width in pixels; staged: it must halve to the base size."}),
            "height": ("INT", {"default": 1024, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "Image height in pixels."}),
            "schedule": (list(SCHEDULES), {"tooltip": "staged: LinFusion's ×2 stages from the base size; direct: one "
                                                      "text-to-image pass at full size."}),
            "base_size": ("INT", {"default": 1024, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                                  "tooltip": "Staged: the first stage's long side at most (LinFusion: 1024)."}),
            **_sampling_inputs(),
            **_tiling_inputs(),
            "vae_tile_size": ("INT", {"default": 512, "min": 64, "max": MAX_TILE_PX, "step": 64,
                                      "tooltip": "Tile side of the VAE decode in pixels."}),
            "vae_precision": (list(DECODE_PRECISIONS), {
                "tooltip": "auto: bfloat16 where the device runs it natively (faster; about half an 8-bit level of "
                           "mean error), else the VAE's own dtype. ComfyUI's VAE: auto only (ComfyUI sets its "
                           "dtype)."}),
        }, "optional": {
            "linfusion": ("ATELIER_LINFUSION", {"tooltip": "LinFusion layers to use in place of self-attention "
                                                           "(Atelier's MODEL only)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size: int | None, overlap: int | None, offset_stride: int | None) -> bool | str:
        return _validate(cls, {"tile_size": tile_size, "overlap": overlap, "offset_stride": offset_stride})

    def generate(self, model: Any, vae: Any, positive: list, negative: list,
                 width: int, height: int, schedule: str, base_size: int, seed: int, steps: int, cfg: float,
                 sampler_name: str, scheduler: str, mode: str, tile_size: int, overlap: int, offset_stride: int,
                 tile_batch_size: int, vae_tile_size: int, vae_precision: str,
                 linfusion: LinFusion | None = None) -> tuple[torch.Tensor, str]:
        if vae_precision != "auto" and not isinstance(vae, DiffusersCodec):
            raise ValueError(f"vae_precision {vae_precision!r} sets Atelier's VAE; ComfyUI's VAE decodes in the dtype "
                             "ComfyUI chose for it (--fp32-vae, --bf16-vae): choose 'auto'")
        family = model_family(model)
        positive, negative = _plain_prompts(positive, negative, family)
        with denoiser_and_codec_with(model, vae, linfusion) as (denoiser, codec):
            stages = plan_stages(family, width, height, schedule, steps, base_size, codec.downscale)
            check_sampler_settings(sampler_name, scheduler, steps, family=family)
            settings = _tile_settings(mode, tile_size, overlap, offset_stride, tile_batch_size, seed, codec.downscale)
            latent, reports = generate_large(denoiser, codec, family, positive, negative, stages, seed, steps, cfg,
                                             sampler_name, scheduler, settings, model_device(model),
                                             untiled_base=linfusion is not None, model=_spreadable(model, linfusion))
        vae_tile = vae_tile_size // codec.downscale
        summary = "\n".join(report.line() for report in reports)
        if isinstance(codec, ComfyCodec):
            # The shared-statistics tiled decode hooks the GroupNorms of a diffusers decoder; ComfyUI's VAE has its
            # own tiled decode (VAE Decode (Tiled)'s), with its memory management.
            return vae.decode_tiled(latent, tile_x=vae_tile, tile_y=vae_tile,
                                    overlap=vae_tile // VAE_OVERLAP_DIVISOR), summary
        image = torch.empty(1, height, width, 3)  # the IMAGE itself: tiles stream into it, no second copy
        tiled_decode(vae, latent.cpu(), vae_tile, vae_tile // VAE_OVERLAP_DIVISOR, out=to_channels_first(image),
                     dtype=decode_dtype(vae_precision, vae))
        return image, summary


class AtelierTiledDiffusion:
    """Tiled diffusion as a MODEL → MODEL patch: the user's own KSampler or SamplerCustomAdvanced then samples
    tile by tile (``interop.md`` §4).

    Inside ComfyUI the incoming ModelPatcher is cloned (the clone shares its weights) and the clone's UNet call
    is wrapped by :class:`~.unet_wrapper.TiledUnetWrapper`: each call cuts the latent into tiles, runs them in
    batches and blends them with the tiled sampler's weights (:mod:`.tiling`). Inpainting models' spatial
    conditioning is cropped per tile; ControlNet is not supported (the run raises).

    Standalone, Atelier's MODEL (a ``ModelRef``: a shared loaded model and its LoRAs) has no hook on the UNet
    call, so this node raises there and points to the Tiled Sampler, which samples with the same tiling. A hook
    would have to be honoured, or refused, by every node that runs a MODEL (the KSamplers' guider, the Tiled
    Sampler, OmniSSR, correspondence, watermark detection); honoured by the guider alone, the others would drop
    the patch without a word.
    """

    DESCRIPTION = ("Patches a MODEL so that every sampler evaluates it tile by tile and blends the tiles (Mixture "
                   "of Diffusers, MultiDiffusion or FSTD-style shifted tiles): sample large latents with your own "
                   "KSampler. Inside ComfyUI; standalone, use the Tiled Sampler. No ControlNet.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model that samples tile by tile; the input model is unchanged.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to tile (SD1, SD2 or SDXL)."}),
            **_tiling_inputs(),
            "offset_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1,
                                    "tooltip": "Shifted mode: seeds the shuffled cycle of grid offsets."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size: int | None, overlap: int | None, offset_stride: int | None) -> bool | str:
        return _validate(cls, {"tile_size": tile_size, "overlap": overlap, "offset_stride": offset_stride})

    def patch(self, model, mode: str, tile_size: int, overlap: int, offset_stride: int, tile_batch_size: int,
              offset_seed: int) -> tuple:
        if isinstance(model, ModelRef) or not inside_comfyui():
            raise TypeError("AtelierTiledDiffusion patches ComfyUI's MODEL and runs inside ComfyUI; Atelier's own "
                            "MODEL has no UNet-call hook: use the Tiled Sampler (AtelierTiledSample) standalone")
        comfy_model_family(model)  # SD1, SD2 or SDXL, so SD_LATENT_DOWNSCALE holds
        if "model_function_wrapper" in model.model_options:
            raise ValueError("this MODEL already has a UNet-call wrapper (another patch); tiled diffusion would "
                             "replace it: apply only one of them")
        settings = _tile_settings(mode, tile_size, overlap, offset_stride, tile_batch_size, offset_seed,
                                  SD_LATENT_DOWNSCALE)
        patched = model.clone()
        patched.set_model_unet_function_wrapper(TiledUnetWrapper(settings))
        return (patched,)


class AtelierLinFusionPatch(AtelierLoadLinFusion):
    """LinFusion's attention swap as a MODEL → MODEL patch (``interop.md`` §4): the user's own KSampler then samples
    with linear self-attention. The widgets and the weights' folder are Load LinFusion's.

    Inside ComfyUI the incoming ModelPatcher is cloned and each ``attn1`` of the clone's UNet is replaced by
    ``add_object_patch("diffusion_model.<LDM path>.attn1", layer)``; ComfyUI swaps the layers in when it loads the
    clone and back out when it unloads it, so the incoming MODEL never sees them. Not ``set_model_attn1_replace``:
    ComfyUI hands that replacement q, k and v already projected by the original ``to_q``/``to_k``/``to_v`` and
    applies the original ``to_out`` after it, whereas LinFusion has projections of its own, and its q and k come
    from x + P(x) (:mod:`.linfusion`). A whole-submodule swap sees x, so :class:`~.linfusion.LdmSelfAttention`
    takes ``attn1``'s call as ``BasicTransformerBlock`` makes it.

    Standalone, Atelier's MODEL has no such hook (see :class:`AtelierTiledDiffusion`): Load LinFusion's
    ATELIER_LINFUSION into the Tiled Sampler or the 16K generator does the same there.
    """

    DESCRIPTION = ("Patches a MODEL with published LinFusion weights (SD1.5, SD2.1 or SDXL): linear attention in "
                   "place of self-attention, so memory grows linearly with the image's pixels; sample with your own "
                   "KSampler. Inside ComfyUI; standalone, use Load LinFusion with the Tiled Sampler.")
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model with LinFusion's self-attention; the input model is unchanged.",)
    FUNCTION = "patch"

    def patch(self, model, linfusion_name: str) -> tuple:
        if isinstance(model, ModelRef) or not inside_comfyui():
            raise TypeError("AtelierLinFusionPatch patches ComfyUI's MODEL and runs inside ComfyUI; standalone, "
                            "use Load LinFusion (AtelierLoadLinFusion) with the Tiled Sampler or the 16K generator")
        family = comfy_model_family(model)
        path = self.linfusion_path(linfusion_name)
        config = ldm_linfusion_config(model.get_model_object("diffusion_model"), family)
        layers = read_linfusion(path, config, family).to(model.model.get_dtype())
        patched = model.clone()
        for layer, module in zip(config, layers):
            patched.add_object_patch(f"diffusion_model.{layer.module_name}", LdmSelfAttention(module))
        return (patched,)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (AtelierTiledSample, AtelierLoadLinFusion,
                                                     AtelierTiled16KGenerator, AtelierTiledDiffusion,
                                                     AtelierLinFusionPatch)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierTiledSample": "Tiled Sampler (Atelier)",
    "AtelierLoadLinFusion": "Load LinFusion (Atelier)",
    "AtelierTiled16KGenerator": "Tiled 16K Generator (Atelier)",
    "AtelierTiledDiffusion": "Tiled Diffusion Patch (Atelier)",
    "AtelierLinFusionPatch": "LinFusion Patch (Atelier)",
}
