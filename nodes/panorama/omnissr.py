"""OmniSSR: zero-shot ERP super-resolution with an SD img2img backbone run on tangent planes, corrected by OTII
(planes -> ERP -> GD -> planes, latent interpolation) every ``every_k`` steps.

Notation (OmniSSR §3, official ``test_sr_val_ddpm_text_T_oldcanvas_TAN-OmniSSR-TAN.py`` at 9ca4a4f):
``x0`` -> x̂₀ (the per-plane x0 estimate), ``gamma_l`` -> γ_l (latent interpolation, 0.5), ``gamma_e`` -> γ_e
(GD strength inside OTII, 1.0), final GD with γ_p = 1.

Departures: the backbone is the loaded SD model (StableSR weights are pickled and S-Lab licensed); its sampler is
DDIM (η = 0) on ``steps`` respaced timesteps instead of 200 DDPM steps; GD uses the whole-image separable operator
(see :mod:`.fidelity`); no AdaIN colour fix and no CFW decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common.denoiser import Conditioning, Denoiser, LatentCodec, guided_eps
from ..common.progress import check_interrupt, progress
from ..sampling.latents import seeded_noise
from .fidelity import gd_project
from .projection import PlaneLayout, erp_to_planes, planes_to_erp

GAMMA_L = 0.5  # Source: OmniSSR, latent interpolation γ_l = 0.5
GAMMA_E = 1.0  # Source: OmniSSR, GD blend inside OTII γ_e = 1.0


def omnissr_super_resolve(denoiser: Denoiser, codec: LatentCodec, low_res: torch.Tensor, scale: int,
                          layout: PlaneLayout, positive: Conditioning, negative: Conditioning, cfg: float,
                          steps: int, strength: float, every_k: int, gamma_l: float, gamma_e: float,
                          generator: torch.Generator, mode: str = "bilinear") -> torch.Tensor:
    """Super-resolves ERP panoramas ×``scale``.

    Args:
        denoiser, codec: Atelier's, or ComfyUI's MODEL and VAE through ``nodes/models/comfy_adapters.py``.
        low_res: (B, 3, h, 2h) panoramas in 0..1.
        scale: the factor s >= 1; the output is (B, 3, s·h, 2·s·h).
        layout: the planes; their size must be a multiple of the VAE's downscale factor.
        cfg: guidance scale (OmniSSR: none, i.e. 1).
        steps: DDIM steps >= 1; strength in (0, 1]: how far into the noise img2img starts (OmniSSR: 1).
        every_k: OTII every k steps (OmniSSR: 1); gamma_l, gamma_e in [0, 1].
    Returns:
        (B, 3, s·h, 2·s·h) in 0..1, downsampled by bicubic ≈ ``low_res`` (the final GD).
    Raises:
        ValueError: a plane size that the VAE cannot encode, or settings out of range.
    """
    if layout.size % codec.downscale:
        raise ValueError(f"layout plane size must be a multiple of {codec.downscale}; got {layout.size}")
    if steps < 1 or every_k < 1 or not 0 < strength <= 1 or not 0 <= gamma_l <= 1:
        raise ValueError(f"steps and every_k must be >= 1, strength in (0, 1], gamma_l in [0, 1]; got steps "
                         f"{steps}, every_k {every_k}, strength {strength}, gamma_l {gamma_l}")
    # GD meets the decoded planes on the VAE's device: both codecs say where their VAE computes, and both return what
    # they compute on their input's device.
    low_res = low_res.to(codec.device, torch.float32)
    batch, height = low_res.shape[0], low_res.shape[-2] * scale
    high_res = F.interpolate(low_res, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)

    def encode(erp: torch.Tensor) -> torch.Tensor:
        planes = erp_to_planes(erp, layout, mode).flatten(0, 1).clamp(0, 1)
        return (codec.encode(planes) - codec.shift_factor) * codec.scaling_factor

    def merge(latent: torch.Tensor) -> torch.Tensor:
        planes = codec.decode(latent / codec.scaling_factor + codec.shift_factor)
        return planes_to_erp(planes.unflatten(0, (batch, layout.count)), layout, height, mode)

    z = encode(high_res)
    schedule = denoiser.schedule
    start = round(strength * (schedule.num_train_timesteps - 1))
    timesteps = torch.linspace(start, 0, steps, dtype=torch.float64).round().long()
    alpha = schedule.alphas_cumprod.to(z)
    noise, _ = seeded_noise(generator, tuple(z.shape), device=z.device, dtype=z.dtype)
    x = alpha[timesteps[0]].sqrt() * z + (1 - alpha[timesteps[0]]).sqrt() * noise
    for i, t in enumerate(timesteps):
        check_interrupt()
        eps = guided_eps(denoiser, x, t, positive, negative, cfg)
        x0 = (x - (1 - alpha[t]).sqrt() * eps) / alpha[t].sqrt()
        if i % every_k == 0:  # OTII: planes -> ERP -> GD -> planes, then interpolate (OmniSSR §3.2, step 5)
            corrected = encode(gd_project(merge(x0), low_res, scale, gamma_e).clamp(0, 1))
            x0 = (1 - gamma_l) * x0 + gamma_l * corrected
        alpha_next = alpha[timesteps[i + 1]] if i + 1 < steps else alpha.new_tensor(1.0)
        x = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps
        progress(i + 1, steps)
    # Source: OmniSSR post-processing notebook, one more range-null-space projection with γ_p = 1
    return gd_project(merge(x), low_res, scale, 1.0).clamp(0, 1)
