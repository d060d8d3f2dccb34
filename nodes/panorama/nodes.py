"""Panorama nodes: a tangent-plane layout, ERP -> tangent planes, planes -> ERP, WS-PSNR / WS-SSIM and a synthetic
test panorama. They are thin: each converts ComfyUI's (B, H, W, C) IMAGE to (B, C, H, W) once, calls
:mod:`.projection` or :mod:`.metrics`, and converts back. A layout travels on the ``ATELIER_PLANE_LAYOUT`` socket
as a :class:`~.projection.PlaneLayout`; a batch of planes is an IMAGE of B·N images, plane index fastest.
"""

from __future__ import annotations

from typing import Any

import torch

from ..common.images import to_channels_first, to_channels_last
from ..common.limits import MAX_SEED
from ..models.comfy_adapters import denoiser_and_codec, model_family
from ..sampling.guidance import to_conditioning
from .fidelity import gd_project
from .metrics import ws_psnr, ws_ssim
from .omnissr import GAMMA_E, GAMMA_L, omnissr_super_resolve
from .projection import (MODES, OMNISSR_FOV_DEG, PlaneLayout, coverage, cube_layout, erp_to_planes, omnissr_layout,
                         planes_to_erp, synthetic_panorama)

CATEGORY = "atelier/panorama"
LAYOUTS = ("omnissr_18", "cube_6")
MAX_PLANE_SIZE = 4096  # a plane is one diffusion tile; 4096² is far beyond any SD backbone's native size
MAX_ERP_HEIGHT = 8192  # ComfyUI's MAX_RESOLUTION 16384 is the width of the largest ERP
MIN_FOV, MAX_FOV = 1.0, 179.0  # the gnomonic projection needs a FOV strictly inside (0°, 180°)
MAX_FREQUENCY = 200.0  # beyond this an 8192-high ERP aliases the synthetic texture
LAYOUT_TYPE = "ATELIER_PLANE_LAYOUT"


def _format_coverage(report: dict[str, float], height: int) -> str:
    return (f"at {height}x{2 * height}: covered {report['covered']:.2%} of the pixels, {report['covered_area']:.2%}"
            f" of the sphere; {report['mean_planes']:.2f} planes per covered pixel on average, at most "
            f"{report['max_planes']:.0f}")


class AtelierPlaneLayout:
    DESCRIPTION = ("A set of tangent planes for panorama work: OmniSSR's 18 planes (rows of 3/6/6/3 at ±67.5° and "
                   "±22.5°) or a cube map, with a true angular field of view, and how they cover the sphere.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LAYOUT_TYPE, "STRING")
    RETURN_NAMES = ("layout", "coverage")
    OUTPUT_TOOLTIPS = ("The plane layout.", "Coverage and overlap of the layout on a panorama of the given height.")
    FUNCTION = "layout"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "preset": (list(LAYOUTS), {"tooltip": "omnissr_18: OmniSSR's octadecaplex; cube_6: six cube faces."}),
            "plane_size": ("INT", {"default": 512, "min": 8, "max": MAX_PLANE_SIZE, "step": 8,
                                   "tooltip": "Side of each square plane in pixels (OmniSSR: 512)."}),
            "fov_deg": ("FLOAT", {"default": round(OMNISSR_FOV_DEG, 4), "min": MIN_FOV, "max": MAX_FOV, "step": 0.01,
                                  "round": 0.0001,
                                  "tooltip": "True angular field of view of each plane. OmniSSR's code says 75 but "
                                             "means 66.41°; a cube map needs at least 90°."}),
            "erp_height": ("INT", {"default": 1024, "min": 2, "max": MAX_ERP_HEIGHT, "step": 2,
                                   "tooltip": "Panorama height at which to report coverage (the width is twice)."}),
        }}

    def layout(self, preset: str, plane_size: int, fov_deg: float, erp_height: int) -> tuple[PlaneLayout, str]:
        if preset not in LAYOUTS:
            raise ValueError(f"preset must be one of {LAYOUTS}; got {preset!r}")
        make = omnissr_layout if preset == "omnissr_18" else cube_layout
        layout = make(plane_size, fov_deg)
        return (layout, _format_coverage(coverage(layout, erp_height), erp_height))


def _mode_input() -> tuple[list[str], dict]:
    return (list(MODES), {"tooltip": "Interpolation; bilinear is exact to the pixel centres and, with PyTorch's "
                                     "bicubic (a = -0.75), the more accurate on smooth content."})


class AtelierERPToPlanes:
    DESCRIPTION = ("Projects equirectangular panoramas (width = 2 × height) onto tangent planes in one pass, with "
                   "no seam at ±180° and no pre-upsampling.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("planes",)
    OUTPUT_TOOLTIPS = ("B × N planes, the N planes of the first panorama first.",)
    FUNCTION = "project"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "panorama": ("IMAGE", {"tooltip": "Equirectangular panoramas, width twice the height."}),
            "layout": (LAYOUT_TYPE, {"tooltip": "The planes to sample."}),
            "mode": _mode_input(),
        }}

    def project(self, panorama: torch.Tensor, layout: PlaneLayout, mode: str) -> tuple[torch.Tensor]:
        planes = erp_to_planes(to_channels_first(panorama), layout, mode)
        return (to_channels_last(planes.flatten(0, 1)),)


class AtelierPlanesToERP:
    DESCRIPTION = ("Merges tangent planes back into an equirectangular panorama: every pixel is a smooth, "
                   "Gaussian-weighted average of the planes that see it, on the same geometry as ERP → Planes.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("panorama",)
    OUTPUT_TOOLTIPS = ("Equirectangular panoramas, one per N planes.",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "planes": ("IMAGE", {"tooltip": "B × N planes as ERP → Planes makes them."}),
            "layout": (LAYOUT_TYPE, {"tooltip": "The layout the planes were made with."}),
            "erp_height": ("INT", {"default": 1024, "min": 2, "max": MAX_ERP_HEIGHT, "step": 2,
                                   "tooltip": "Height of the panorama to build (the width is twice)."}),
            "mode": _mode_input(),
        }}

    def merge(self, planes: torch.Tensor, layout: PlaneLayout, erp_height: int, mode: str) -> tuple[torch.Tensor]:
        if planes.shape[0] % layout.count:
            raise ValueError(f"planes must be a multiple of the layout's {layout.count} planes; got {planes.shape[0]}")
        grouped = to_channels_first(planes).unflatten(0, (-1, layout.count))
        return (to_channels_last(planes_to_erp(grouped, layout, erp_height, mode)),)


class AtelierPanoramaMetrics:
    DESCRIPTION = "WS-PSNR and WS-SSIM of panoramas against references: PSNR and SSIM weighted by area on the sphere."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("ws_psnr", "ws_ssim", "report")
    OUTPUT_TOOLTIPS = ("Mean WS-PSNR in dB over the batch.", "Mean WS-SSIM over the batch.",
                       "Both figures per image, as text.")
    FUNCTION = "measure"
    OUTPUT_NODE = True  # shows its report on the node, so a graph can end here

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "panorama": ("IMAGE", {"tooltip": "The panoramas to score, values in 0..1."}),
            "reference": ("IMAGE", {"tooltip": "The ground truth, the same size."}),
        }}

    def measure(self, panorama: torch.Tensor, reference: torch.Tensor) -> dict[str, dict | tuple]:
        if panorama.shape != reference.shape:
            raise ValueError(f"reference must have the panorama's shape {tuple(panorama.shape)}; got "
                             f"{tuple(reference.shape)}")
        psnr = ws_psnr(to_channels_first(panorama).double(), to_channels_first(reference).double())
        ssim = ws_ssim(to_channels_first(panorama).double(), to_channels_first(reference).double())
        report = "\n".join(f"image {i}: WS-PSNR {p:.2f} dB, WS-SSIM {s:.4f}"
                           for i, (p, s) in enumerate(zip(psnr.tolist(), ssim.tolist())))
        return {"ui": {"text": [report]}, "result": (psnr.mean().item(), ssim.mean().item(), report)}


class AtelierSyntheticPanorama:
    DESCRIPTION = ("A test panorama whose colour is known analytically in every direction: smooth plane waves on "
                   "the sphere, seamless at ±180° and at the poles. Needs no weights.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("panorama",)
    OUTPUT_TOOLTIPS = ("One equirectangular panorama, width twice the height.",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "erp_height": ("INT", {"default": 256, "min": 2, "max": MAX_ERP_HEIGHT, "step": 2,
                                   "tooltip": "Height of the panorama (the width is twice)."}),
            "frequency": ("FLOAT", {"default": 12.0, "min": 0.1, "max": MAX_FREQUENCY, "step": 0.1, "round": 0.01,
                                    "tooltip": "Detail: angular frequency of the waves, per radian."}),
        }}

    def make(self, erp_height: int, frequency: float) -> tuple[torch.Tensor]:
        return (to_channels_last(synthetic_panorama(erp_height, frequency)),)


class AtelierGDProject:
    DESCRIPTION = ("OmniSSR's GD step: makes a super-resolved image agree with its low-resolution input by "
                   "replacing its bicubic-range part (x̂ = x − γ·H⁺(Hx − y)) and keeping the detail H cannot "
                   "see.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The projected image; bicubic-downsampled it gives the low-resolution input back.",)
    FUNCTION = "project"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The high-resolution estimate, an integer multiple of low_res's size."}),
            "low_res": ("IMAGE", {"tooltip": "The low-resolution observation."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.001,
                                   "tooltip": "γ: 1 is the full projection (OmniSSR's γ_e and γ_p = 1)."}),
        }}

    def project(self, image: torch.Tensor, low_res: torch.Tensor, strength: float) -> tuple[torch.Tensor]:
        scale = image.shape[1] // max(low_res.shape[1], 1)
        if scale < 1 or image.shape[1:3] != (low_res.shape[1] * scale, low_res.shape[2] * scale):
            raise ValueError(f"image must be an integer multiple of low_res's size; got {tuple(image.shape[1:3])} "
                             f"and {tuple(low_res.shape[1:3])}")
        projected = gd_project(to_channels_first(image).double(), to_channels_first(low_res).double(), scale, strength)
        return (to_channels_last(projected.float()),)


MAX_SCALE = 8  # OmniSSR evaluates ×2 and ×4; beyond ×8 the planes carry too little of the input
MAX_STEPS = 1000  # the training schedule's length
MAX_CFG = 30.0


class AtelierOmniSSR:
    DESCRIPTION = ("OmniSSR: super-resolves an equirectangular panorama with the loaded SD model as img2img on tangent "
                   "planes; every k steps OTII merges the planes' x0 estimates into the panorama, projects it onto "
                   "the low-resolution input (GD) and re-projects, so the planes agree with each other and the input.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("panorama",)
    OUTPUT_TOOLTIPS = ("The super-resolved panoramas, scale × the input's size.",)
    FUNCTION = "super_resolve"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model run on the planes: Atelier's, or ComfyUI's (SD1, "
                                           "SD2) with its LoRAs and patches."}),
            "vae": ("VAE", {"tooltip": "The model's VAE."}),
            "positive": ("CONDITIONING", {"tooltip": "What the panorama shows (OmniSSR: empty prompt)."}),
            "negative": ("CONDITIONING", {"tooltip": "What it should not show (unused at cfg 1)."}),
            "panorama": ("IMAGE", {"tooltip": "The low-resolution equirectangular panorama (width = 2 × height)."}),
            "layout": (LAYOUT_TYPE, {"tooltip": "The planes (OmniSSR: 18 planes of 512², 66.41°); their size must "
                                                "be a multiple of 8."}),
            "scale": ("INT", {"default": 4, "min": 1, "max": MAX_SCALE, "step": 1,
                              "tooltip": "Upscaling factor (OmniSSR: 2 or 4)."}),
            "steps": ("INT", {"default": 200, "min": 1, "max": MAX_STEPS, "step": 1,
                              "tooltip": "Denoising steps (OmniSSR: 200)."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_CFG, "step": 0.1, "round": 0.01,
                              "tooltip": "Guidance scale; OmniSSR uses none (1)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "round": 0.001,
                                   "tooltip": "How far into the noise to start (OmniSSR: 1, from t = 999)."}),
            "every_k": ("INT", {"default": 1, "min": 1, "max": MAX_STEPS, "step": 1,
                                "tooltip": "Run OTII every k steps (OmniSSR: every step)."}),
            "gamma_l": ("FLOAT", {"default": GAMMA_L, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.001,
                                  "tooltip": "γ_l: weight of the re-projected latent (OmniSSR: 0.5)."}),
            "gamma_e": ("FLOAT", {"default": GAMMA_E, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.001,
                                  "tooltip": "γ_e: strength of GD inside OTII (OmniSSR: 1)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1, "tooltip": "Noise seed."}),
        }}

    def super_resolve(self, model: Any, vae: Any, positive: list, negative: list,
                      panorama: torch.Tensor, layout: PlaneLayout, scale: int, steps: int, cfg: float,
                      strength: float, every_k: int, gamma_l: float, gamma_e: float, seed: int
                      ) -> tuple[torch.Tensor]:
        if panorama.shape[2] != 2 * panorama.shape[1]:
            raise ValueError(f"panorama must be twice as wide as high; got {tuple(panorama.shape[1:3])}")
        family = model_family(model)
        positive = to_conditioning(positive, family, "positive")
        negative = to_conditioning(negative, family, "negative")
        with denoiser_and_codec(model, vae) as (denoiser, codec):  # Atelier's objects standalone, ComfyUI's inside it
            result = omnissr_super_resolve(denoiser, codec, to_channels_first(panorama), scale, layout, positive,
                                           negative, cfg, steps, strength, every_k, gamma_l, gamma_e,
                                           torch.Generator().manual_seed(seed))
        return (to_channels_last(result),)


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "AtelierOmniSSR": AtelierOmniSSR,
    "AtelierGDProject": AtelierGDProject,
    "AtelierPlaneLayout": AtelierPlaneLayout,
    "AtelierERPToPlanes": AtelierERPToPlanes,
    "AtelierPlanesToERP": AtelierPlanesToERP,
    "AtelierPanoramaMetrics": AtelierPanoramaMetrics,
    "AtelierSyntheticPanorama": AtelierSyntheticPanorama,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "AtelierOmniSSR": "OmniSSR Panorama Super-Resolution",
    "AtelierGDProject": "Low-Res Fidelity Projection (GD)",
    "AtelierPlaneLayout": "Panorama Plane Layout",
    "AtelierERPToPlanes": "Panorama to Tangent Planes",
    "AtelierPlanesToERP": "Tangent Planes to Panorama",
    "AtelierPanoramaMetrics": "Panorama WS-PSNR / WS-SSIM",
    "AtelierSyntheticPanorama": "Synthetic Panorama",
}
