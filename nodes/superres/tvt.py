"""TVT (Transfer VAE Training, ICCV 2025): one-step ×4 super-resolution by an SD2.1-base UNet adapted to a 4× VAE.

Facts read from the official code (Joyies/TVT @9f363fc: ``TVT/modelfile/TVTModel.py``, ``TVT/VAED4/config2.json``,
``TVT/VAED4/vae.py``, ``TVT/inferences/inference.py`` and ``inference_tile.py``, ``scripts/test/test_realsr.sh``):

- the VAE (VAED4) is diffusers' ``AutoencoderKL`` cut to three levels (128, 256, 256 channels; two downsamplers, so
  latents are a quarter of the image's size, 4 channels, scaling 0.18215) with no middle block and no attention;
  its weights are ``vae.ckpt``'s ``vaeDe4.*`` tensors under diffusers' names;
- the UNet is a diffusers folder (``ckp/TVTUNet/unet``) with its own config (SD2.1-base with a level added in front,
  for the finer latents); ``model_TVT.pkl`` then replaces its first down block, its last up blocks' parts,
  ``conv_in`` and ``conv_out`` and adds three PEFT LoRA adapters (rank ``rank_unet``, alpha peft's default 8);
- inference: the LR image upscaled ×4 (bicubic; images under 128 px first enlarged), its sides cut down to multiples
  of 8 (LANCZOS), in [-1, 1]; its latent × 0.18215; the UNet's ε at t = 1 for the prompt "{RAM's tags}, clean,
  high-resolution, 8k," (padded to 77 tokens, no guidance); the DDPM one-step x0; the decode clamped to [-1, 1];
  the AdaIN colour fix against the upscaled input (per channel mean and √(unbiased variance + 1e-5));
- the tiled variant (``inference_tile.py``: ``--tiled_size 192 --tiled_overlap 64``; the README's command passes 96
  and 32) runs the UNet alone on latent tiles whose ε are blended with Gaussian weights; a latent no larger than
  one tile runs whole, as ``inference.py`` runs every image.

Weights are published as pickles; users convert them once to ``.safetensors`` (README), which this module reads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..models.formats import check_safetensors, layout_difference, tensor_shapes
from ..sampling.model_sampling import one_step_x0

SCALE = 4
TIMESTEP = 1  # Source: test_realsr.sh and train.sh, --time_step 1 (the script's own default, 999, is not used)
DEFAULT_PROMPT = "clean, high-resolution, 8k,"  # Source: test_realsr.sh --prompt, after the RAM tags, then ","
MIN_INPUT_SIDE = 128  # Source: inference.py, inputs under process_size // upscale are first enlarged
SIDE_MULTIPLE = 8
LORA_ALPHA = 8  # Source: TVTModel.py LoraConfig without lora_alpha: peft's default
TILE_VARIANCE = 0.01  # Source: TVTModel.py _gaussian_weights, var
VAED4_SCALING = 0.18215  # Source: config2.json has no scaling_factor: AutoencoderKL's default
# Source: TVT/VAED4/config2.json (diffusers AutoencoderKL's defaults for the rest; vae.py drops the middle blocks)
VAED4_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                "block_out_channels": (128, 256, 256), "down_block_types": ("DownEncoderBlock2D",) * 3,
                "up_block_types": ("UpDecoderBlock2D",) * 3, "norm_num_groups": 32, "act_fn": "silu",
                "sample_size": 768}


class _NoMiddle(torch.nn.Module):
    """VAED4's missing middle block: its input, whatever the caller passes beside it."""

    def forward(self, hidden: torch.Tensor, *_: object) -> torch.Tensor:
        return hidden


def build_vaed4(config: Mapping | None = None) -> torch.nn.Module:
    """TVT's 4× VAE, on the current default device (build it under ``torch.device("meta")`` to count);
    ``config`` (by default :data:`VAED4_CONFIG`) as diffusers' ``AutoencoderKL`` takes it.

    Example:
        >>> with torch.device("meta"):
        ...     vae = build_vaed4()
        >>> sum(parameter.numel() for parameter in vae.parameters()), 2 ** (len(vae.config.block_out_channels) - 1)
        (15162343, 4)
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**(config or VAED4_CONFIG))
    vae.encoder.mid_block = _NoMiddle()
    vae.decoder.mid_block = _NoMiddle()
    return vae


def load_vaed4(path: str | os.PathLike) -> torch.nn.Module:
    """VAED4 from ``vae.ckpt``'s ``vaeDe4.*`` tensors converted to ``.safetensors`` (the prefix may stay), float32.

    Raises:
        UnsafeModelFormatError: not ``.safetensors``.
        ValueError: other tensors than VAED4's (names and shapes compared before loading).
    """
    check_safetensors(path)
    tensors = {key.removeprefix("vaeDe4."): value for key, value in load_file(os.fspath(path)).items()}
    with torch.device("meta"):
        vae = build_vaed4()
    expected, found = tensor_shapes(vae.state_dict()), tensor_shapes(tensors)
    if found != expected:
        count, detail = layout_difference(expected, found)
        raise ValueError(f"{os.path.basename(path)!r} is not TVT's VAE ({count} differences: {detail}); give "
                         f"vae.ckpt's vaeDe4 tensors converted to .safetensors")
    vae.load_state_dict({key: value.float() for key, value in tensors.items()}, assign=True)
    return vae.eval()


def _lora_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """PEFT's B·A for a Linear (A (r, in), B (out, r)) or a Conv2d (A (r, in, k, k), B (out, r, 1, 1))."""
    if down.ndim == 2:
        return up @ down
    return torch.einsum("or,rikl->oikl", up.flatten(1), down)


def merge_tvt_weights(unet: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """``model_TVT``'s ``state_dict_unet`` into ``unet``: its plain and ``base_layer`` tensors replace the UNet's,
    and every module's LoRA adapters add (alpha / rank)·B·A to its weight, as PEFT computes them.

    Raises:
        ValueError: tensors the UNet has no place for, or LoRA halves without their pair.
    """
    params = dict(unet.named_parameters())
    updates: dict[str, torch.Tensor] = {}
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if ".lora_A." in key or ".lora_B." in key:
            module, half, rest = key.partition(".lora_A." if ".lora_A." in key else ".lora_B.")
            pairs.setdefault((module, rest.removesuffix(".weight")), {})[half.strip(".")] = value.float()
        else:
            updates[key.replace(".base_layer.", ".")] = value.float()
    stray = sorted(key for key in updates if key not in params)
    if stray:
        raise ValueError(f"the TVT weights hold {len(stray)} tensors this UNet has no place for (e.g. {stray[0]!r}): "
                         f"give model_TVT's state_dict_unet for this TVTUNet")
    for key, value in updates.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"the TVT weights' {key!r} is {tuple(value.shape)}, the UNet's "
                             f"{tuple(params[key].shape)}")
    with torch.no_grad():
        for key, value in updates.items():
            params[key].copy_(value)
        for (module, adapter), halves in sorted(pairs.items()):
            if set(halves) != {"lora_A", "lora_B"} or module + ".weight" not in params:
                raise ValueError(f"LoRA adapter {adapter!r} of {module!r} is incomplete or has no module here")
            down, up = halves["lora_A"], halves["lora_B"]
            params[module + ".weight"].add_(LORA_ALPHA / down.shape[0] * _lora_delta(down, up))


def load_tvt_unet(unet_file: str | os.PathLike, weights_file: str | os.PathLike) -> torch.nn.Module:
    """TVTUNet from its folder's file (``config.json`` beside it) with ``model_TVT``'s weights merged, float32.

    Raises:
        UnsafeModelFormatError: a file that is not ``.safetensors``.
        FileNotFoundError: no ``config.json`` beside the UNet file.
        ValueError: files that do not fit the config or each other.
    """
    from diffusers import UNet2DConditionModel

    for path in (unet_file, weights_file):
        check_safetensors(path)
    config_path = os.path.join(os.path.dirname(os.fspath(unet_file)), "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"TVTUNet's config.json must sit beside {os.path.basename(unet_file)!r} (the "
                                f"published ckp/TVTUNet/unet folder has it)")
    config = UNet2DConditionModel.load_config(os.path.dirname(os.fspath(unet_file)))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({key: value for key, value in config.items()
                                                 if not key.startswith("_")})
    tensors = load_file(os.fspath(unet_file))
    expected, found = tensor_shapes(unet.state_dict()), tensor_shapes(tensors)
    if found != expected:
        count, detail = layout_difference(expected, found)
        raise ValueError(f"{os.path.basename(unet_file)!r} does not fit its config.json ({count} differences: "
                         f"{detail})")
    unet.load_state_dict({key: value.float() for key, value in tensors.items()}, assign=True)
    check_safetensors(weights_file)
    merge_tvt_weights(unet, load_file(os.fspath(weights_file)))
    return unet.eval()


def tile_offsets(size: int, tile: int, overlap: int) -> list[int]:
    """The official tiling's starts along one side: every ``tile - overlap``, the last one snapped to the end.

    Example:
        >>> tile_offsets(200, 96, 32)
        [0, 64, 104]
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap ({overlap}) must be at least 0 and smaller than the tile ({tile})")
    count, end = 0, 0
    while end < size:
        end = count * (tile - overlap) + tile
        count += 1
    return [index * (tile - overlap) for index in range(count - 1)] + [size - tile]


def gaussian_tile_weights(tile: int) -> torch.Tensor:
    """The official blend weights of a square tile: a Gaussian of variance 0.01 tile² each way, centred at
    (tile - 1) / 2 across and, as the official code has it, tile / 2 down. (tile, tile), float64."""
    def profile(midpoint: float) -> torch.Tensor:
        position = torch.arange(tile, dtype=torch.float64)
        return (torch.exp(-(position - midpoint) ** 2 / tile ** 2 / (2 * TILE_VARIANCE))
                / math.sqrt(2 * math.pi * TILE_VARIANCE))

    return torch.outer(profile(tile / 2), profile((tile - 1) / 2))


def tiled_eps(predict: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, tile: int, overlap: int
              ) -> torch.Tensor:
    """``predict`` (the UNet's ε) over ``latent`` as ``tile_forward`` runs it: whole when its area is at most
    tile², else on square tiles (of the shorter side, if smaller) blended with :func:`gaussian_tile_weights`.
    Departure: a tile shrunk to the shorter side keeps at most half of it as overlap (the official loop never ends
    when the overlap reaches the shrunk tile)."""
    height, width = latent.shape[-2:]
    if height * width <= tile * tile:
        return predict(latent)
    if min(height, width) < tile:
        tile = min(height, width)
        overlap = min(overlap, tile // 2)
    weights = gaussian_tile_weights(tile).to(latent.device)
    total = torch.zeros(latent.shape, dtype=torch.float64, device=latent.device)
    count = torch.zeros((height, width), dtype=torch.float64, device=latent.device)
    for top in tile_offsets(height, tile, overlap):
        for left in tile_offsets(width, tile, overlap):
            window = (..., slice(top, top + tile), slice(left, left + tile))
            total[window] += predict(latent[window]).double() * weights
            count[window[1:]] += weights
    return (total / count).to(latent.dtype)


def adain_colour_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The official ``adain`` fix: ``image`` given ``reference``'s per-image, per-channel mean and
    √(unbiased variance + 1e-5), clamped to [0, 1]. Both (B, C, H, W) in [0, 1], of one size."""
    def statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + 1e-5).sqrt()[..., None, None]

    mean, std = statistics(image)
    reference_mean, reference_std = statistics(reference)
    return ((image - mean) / std * reference_std + reference_mean).clamp(0, 1)


def upscaled_input(image: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The official encoder input: images under 128 px on a side enlarged first, then ×4 bicubic, the sides cut
    down to multiples of 8. Returns it in [0, 1] and the enlargement (1 if none).

    Example:
        >>> upscaled_input(torch.rand(1, 3, 150, 203))[0].shape
        torch.Size([1, 3, 600, 808])
    """
    height, width = image.shape[-2:]
    enlarge = max(1.0, MIN_INPUT_SIDE / min(height, width))
    if enlarge > 1:
        image = F.interpolate(image, size=(int(enlarge * height), int(enlarge * width)), mode="bicubic",
                              align_corners=False).clamp(0, 1)
        height, width = image.shape[-2:]
    # Departure: the authors resize an 8-bit PIL image (bicubic, then LANCZOS to the multiple of 8)
    upscaled = F.interpolate(image, size=(SCALE * height, SCALE * width), mode="bicubic", align_corners=False)
    target = (SCALE * height - SCALE * height % SIDE_MULTIPLE, SCALE * width - SCALE * width % SIDE_MULTIPLE)
    if target != tuple(upscaled.shape[-2:]):
        upscaled = F.interpolate(upscaled, size=target, mode="bicubic", antialias=True, align_corners=False)
    return upscaled.clamp(0, 1), enlarge


def tvt_upscale(predict_eps: Callable[[torch.Tensor], torch.Tensor], encode: Callable[[torch.Tensor], torch.Tensor],
                decode: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tile: int = 96,
                overlap: int = 32, colour_fix: bool = True) -> torch.Tensor:
    """TVT's ×4 of (B, 3, H, W) images in [0, 1].

    Args:
        predict_eps: scaled latents → the UNet's ε at t = :data:`TIMESTEP` for the prompt.
        encode: images in [0, 1] → VAED4's posterior mean, unscaled. Departure: the authors sample the posterior
            (unseeded); the mean is its deterministic centre.
        decode: unscaled latents → images in [0, 1] (clamped).
    Returns:
        (B, 3, 4H, 4W) in [0, 1], less the few pixels that make the upscaled sides multiples of 8.
    """
    upscaled, enlarge = upscaled_input(image)
    latent = encode(upscaled) * VAED4_SCALING
    eps = tiled_eps(predict_eps, latent, tile, overlap)
    result = decode(one_step_x0(latent, eps, TIMESTEP) / VAED4_SCALING)
    if colour_fix:
        result = adain_colour_fix(result, upscaled)
    if enlarge > 1:  # Departure: the official script means to size small inputs' results back, and drops the resize
        height, width = image.shape[-2:]
        result = F.interpolate(result, size=(SCALE * height, SCALE * width), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
    return result

