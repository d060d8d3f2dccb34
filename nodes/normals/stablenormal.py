"""StableNormal's one-step stage, YOSO (Ye et al., SIGGRAPH Asia 2024): surface normals of a photo from one call of an
SD2.1 UNet steered by a ControlNet that reads the photo's own latent.

Facts read from the official code (Stable-X/StableNormal @594b934: ``hubconf.py``, ``stablenormal/
pipeline_yoso_normal.py``) and the published ``controlnet/controlnetvae.py`` (``ControlNetVAEModel``, public copies
in kijai/ComfyUI-StableXWrapper and Abuuu122/Dereflection-Any-Image):

- ``ControlNetVAEModel`` is diffusers' ``ControlNetModel`` (its weights, all of them) with another forward: its input
  is the image's latent (the VAE posterior's mode × the VAE's scaling factor), through ``conv_in``, the down blocks
  and the mid block with the UNet's timestep and prompt; the conditioning embedding and the zero convolutions are
  not run; the 12 down states and the mid state, × the conditioning scale (1), are the UNet's ControlNet residuals;
- the UNet, a plain SD2.1 ``UNet2DConditionModel`` predicting x0, takes Gaussian noise at the timestep ``t_start``
  with the empty prompt (padded to 77 tokens) and those residuals; its output is the normal map's latent;
- hubconf's ``StableNormal_turbo`` (YOSO alone) passes ``t_start`` = 0 (the two-stage pipeline keeps the class
  default, 401); the image is first resized (LANCZOS) to 1024 on its long side, each side rounded to a multiple of
  64; the pipeline (diffusers' Marigold image processor) maps it to [-1, 1], resizes its long side to 768
  (bilinear, antialiased) and pads it (replicate) to a multiple of 8;
- the decode is normalised to unit length per pixel, unpadded, resized back (bilinear, no antialias), normalised
  again, clipped to [-1, 1] and shown as (n + 1) / 2, resized to the input's size (LANCZOS).

The refinement stage (ten steps with a DINOv2 prior through a second ControlNet) is not here: the published
``dino_controlnetvae.py``, whose layer order its weights do not tell, could not be read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor

TURBO_TIMESTEP = 0  # Source: hubconf.py StableNormal_turbo, t_start=0
TWO_STAGE_TIMESTEP = 401  # Source: pipeline_yoso_normal.py, YOSONormalsPipeline's default t_start
HUB_RESOLUTION = 1024  # Source: hubconf.py Predictor.__call__, resize_image(img, resolution=1024)
HUB_SIDE_MULTIPLE = 64  # Source: hubconf.py resize_image, each side rounded to a multiple of 64
PROCESSING_RESOLUTION = 768  # Source: pipeline_yoso_normal.py, default_processing_resolution
LATENT_DOWNSCALE = 8


def controlnet_vae_residuals(controlnet: torch.nn.Module, image_latent: torch.Tensor, timestep: torch.Tensor,
                             text_states: torch.Tensor, scale: float = 1.0
                             ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``ControlNetVAEModel``'s forward on diffusers' ``ControlNetModel`` ``controlnet``: the image latent through
    ``conv_in``, the down blocks and the mid block; the raw states (no conditioning embedding, no zero convolutions)
    × ``scale``.

    Returns:
        (the 12 down residuals, the mid residual), as a UNet's ``down_block_additional_residuals`` and
        ``mid_block_additional_residual`` take them.
    """
    emb = controlnet.time_embedding(controlnet.time_proj(timestep).to(image_latent.dtype))
    hidden = controlnet.conv_in(image_latent)
    states = [hidden]
    for block in controlnet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, outputs = block(hidden, temb=emb, encoder_hidden_states=text_states)
        else:
            hidden, outputs = block(hidden, temb=emb)
        states.extend(outputs)
    hidden = controlnet.mid_block(hidden, emb, encoder_hidden_states=text_states)
    return [state * scale for state in states], hidden * scale


def unit_normals(normals: torch.Tensor) -> torch.Tensor:
    """Each pixel's 3-vector at unit length (the norm floored at 1e-6, as the pipeline's ``normalize_normals``).

    Example:
        >>> unit_normals(torch.tensor([3.0, 0.0, 4.0]).view(1, 3, 1, 1)).flatten()
        tensor([0.6000, 0.0000, 0.8000])
    """
    return normals / normals.norm(dim=1, keepdim=True).clamp(min=1e-6)


def hub_size(height: int, width: int, resolution: int = HUB_RESOLUTION) -> tuple[int, int]:
    """hubconf's ``resize_image`` size: the long side scaled to ``resolution``, each side rounded to a multiple of 64.

    Example:
        >>> hub_size(480, 640)
        (768, 1024)
    """
    scale = resolution / max(height, width)
    return (max(HUB_SIDE_MULTIPLE, round(height * scale / HUB_SIDE_MULTIPLE) * HUB_SIDE_MULTIPLE),
            max(HUB_SIDE_MULTIPLE, round(width * scale / HUB_SIDE_MULTIPLE) * HUB_SIDE_MULTIPLE))


def yoso_normals(unet: torch.nn.Module, controlnet: torch.nn.Module, vae: torch.nn.Module,
                 text_states: torch.Tensor, image: torch.Tensor, noise: torch.Tensor,
                 timestep: int = TURBO_TIMESTEP) -> torch.Tensor:
    """YOSO's normals of images already at the processing size: the pipeline's steps 5 to 7 and its decode.

    Args:
        unet, controlnet, vae: the published folder's, on one device.
        text_states: (1, L, D), the empty prompt's states padded to 77 tokens.
        image: (B, 3, H, W) in [-1, 1], H and W multiples of 8.
        noise: (B, 4, H/8, W/8).
    Returns:
        (B, 3, H, W) unit normals.
    """
    if image.shape[-2] % LATENT_DOWNSCALE or image.shape[-1] % LATENT_DOWNSCALE:
        raise ValueError(f"YOSO runs images of sides that are multiples of 8; got {tuple(image.shape[-2:])}")
    scaling = vae.config.scaling_factor
    image_latent = vae.encode(image.to(vae.dtype)).latent_dist.mode() * scaling
    batch = image.shape[0]
    steps = torch.full((batch,), timestep, device=image_latent.device)
    states = text_states.to(image_latent).expand(batch, -1, -1)
    down, mid = controlnet_vae_residuals(controlnet, image_latent, steps, states)
    latent = unet(noise.to(image_latent), steps, encoder_hidden_states=states, down_block_additional_residuals=down,
                  mid_block_additional_residual=mid).sample
    return unit_normals(vae.decode(latent / scaling).sample.float())


def stablenormal_turbo(predict, image: torch.Tensor, resolution: int = HUB_RESOLUTION,
                       processing_resolution: int = PROCESSING_RESOLUTION) -> torch.Tensor:
    """hubconf's ``StableNormal_turbo`` on images of any size, as a picture of the normals.

    Args:
        predict: images (B, 3, H, W) in [-1, 1] at the processing size, padded → unit normals of that size, e.g.
            :func:`yoso_normals` with a fresh noise.
        image: (B, 3, H, W) in [0, 1].
    Returns:
        (B, 3, H, W): (n + 1) / 2 of the unit normals n, in [0, 1].
    """
    height, width = image.shape[-2:]
    # Departure: hubconf resizes an 8-bit PIL image with LANCZOS; this is the float image, bilinear antialiased
    hub = F.interpolate(image, size=hub_size(height, width, resolution), mode="bilinear", antialias=True,
                        align_corners=False)
    processed = MarigoldImageProcessor.resize_to_max_edge(hub * 2 - 1, processing_resolution, "bilinear")
    padded, padding = MarigoldImageProcessor.pad_image(processed, LATENT_DOWNSCALE)
    normals = MarigoldImageProcessor.unpad_image(predict(padded), padding)
    normals = unit_normals(MarigoldImageProcessor.resize_antialias(normals, hub.shape[-2:], "bilinear", is_aa=False))
    shown = (normals.clamp(-1, 1) + 1) / 2
    # Departure: hubconf resizes the 8-bit picture back with LANCZOS; this is the float one, bilinear antialiased
    return F.interpolate(shown, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
