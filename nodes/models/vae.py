"""Separate VAE files, as ComfyUI's VAELoader takes them from ``models/vae``: SD1/SD2 and SDXL autoencoders in the
original (LDM) layout (``encoder.``, ``decoder.``, ``quant_conv.``, ``post_quant_conv.``, as
``vae-ft-mse-840000-ema-pruned.safetensors`` and ``sdxl_vae.safetensors`` are published) or in diffusers' own
layout, loaded offline into a diffusers ``AutoencoderKL``; and Asymmetric VQGAN's published decoders (with SD's
encoder) into a diffusers ``AsymmetricAutoencoderKL`` (:func:`load_asymmetric_vae`).

SD's and SDXL's VAEs share one architecture, and the files do not record the latent scaling factor: it is the
family's (SD1/SD2 0.18215, SDXL 0.13025), given by the caller or SD1/SD2's by default. ComfyUI keeps the factor
with the diffusion model for the same reason (its ``latent_format``).
"""

from __future__ import annotations

import copy
import json
import os

import torch

from .devices import ACCEPTED_DTYPES, default_device
from .families import FAMILIES, UNET_PREFIX
from .formats import check_safetensors, tensor_shapes
from .model_configs import SHIPPED_CONFIGS, component_configs, shipped_config_dir
from .sources import list_models

# One tensor of each layout that every SD-family VAE file holds.
LDM_VAE_MARKER = "encoder.down.0.block.0.norm1.weight"
DIFFUSERS_VAE_MARKER = "encoder.down_blocks.0.resnets.0.norm1.weight"
LDM_CHECKPOINT_VAE_PREFIX = "first_stage_model."
LATENT_CHANNELS = 4  # SD1, SD2 and SDXL; SD3 and Flux VAEs have 16


def list_vaes(models_dir: str | os.PathLike | None = None) -> list[str]:
    """The VAE files in ``models/vae`` (or ComfyUI's ``vae`` folders inside ComfyUI), for a VAELoader combo."""
    return list_models("vae", models_dir)


def _vae_layout(shapes: dict[str, tuple[int, ...]]) -> str:
    """``"ldm"`` or ``"diffusers"``, or a clear refusal naming what the file holds instead."""
    if LDM_VAE_MARKER in shapes:
        return "ldm"
    if DIFFUSERS_VAE_MARKER in shapes:
        return "diffusers"
    if any(key.startswith(LDM_CHECKPOINT_VAE_PREFIX) for key in shapes) or any(
            key.startswith(UNET_PREFIX) for key in shapes):
        raise ValueError("this is a whole checkpoint (UNet, VAE and text encoders), not a VAE file: load it with "
                         "the checkpoint loader, whose VAE output is its VAE")
    first = sorted(shapes)[:3]
    raise ValueError(f"not an SD/SDXL VAE: it has neither {LDM_VAE_MARKER!r} (LDM layout) nor "
                     f"{DIFFUSERS_VAE_MARKER!r} (diffusers layout); its first tensors are {first}")


def load_vae(path: str | os.PathLike, family: str | None = None, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.nn.Module:
    """Load a separate VAE file into a diffusers ``AutoencoderKL``, offline.

    Args:
        path: a ``.safetensors`` VAE in the LDM or the diffusers layout.
        family: the model family whose latent scaling factor (and SDXL's ``force_upcast``) the VAE carries in
            ``config.scaling_factor``; by default SD1/SD2's 0.18215.
        dtype: float32, float16 or bfloat16.
        device: by default ``devices.default_device()``.
    Returns:
        The ``AutoencoderKL`` in eval mode, without gradients.
    Raises:
        FileNotFoundError: no such file.
        formats.UnsafeModelFormatError: not a ``.safetensors`` file.
        ValueError: an unknown family or dtype, a file that is not an SD/SDXL VAE (a whole checkpoint, a
            16-channel VAE, another model), or tensors whose shapes do not fit the SD VAE layout.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    path = os.fspath(path)
    check_safetensors(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no VAE file at {path!r}")
    family = family or "sd1"
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None; got {family!r}")
    if dtype not in ACCEPTED_DTYPES:
        raise ValueError(f"dtype must be one of {ACCEPTED_DTYPES}; got {dtype}")
    tensors = load_file(path)
    shapes = tensor_shapes(tensors)
    layout = _vae_layout(shapes)
    config = copy.deepcopy(component_configs(shipped_config_dir(family))["vae"])
    conv_in, conv_out = ("encoder.conv_in.weight", "encoder.conv_out.weight")
    if conv_in not in shapes or conv_out not in shapes:
        raise ValueError(f"{os.path.basename(path)!r} lacks {conv_in!r} or {conv_out!r}: the file is incomplete")
    latent_channels = shapes[conv_out][0] // 2  # the encoder gives a mean and a log-variance per channel
    if latent_channels != LATENT_CHANNELS:
        raise ValueError(f"{os.path.basename(path)!r} is a {latent_channels}-channel VAE; accepted are the "
                         f"{LATENT_CHANNELS}-channel VAEs of SD1, SD2 and SDXL")
    width, published = shapes[conv_in][0], config["block_out_channels"]
    config["block_out_channels"] = [width * channels // published[0] for channels in published]
    if layout == "ldm":
        tensors = convert_ldm_vae_checkpoint(tensors, config)
    return _built_with(AutoencoderKL, config, tensors, f"{os.path.basename(path)!r} does not fit the SD VAE layout "
                       f"({layout}, width {width})", device, dtype)


def _built_with(model_class: type, config: dict, tensors: dict[str, torch.Tensor], misfit: str,
                device: torch.device | str | None, dtype: torch.dtype) -> torch.nn.Module:
    """``model_class`` built from ``config`` with the file's ``tensors`` as its parameters, in eval mode and without
    gradients; a ValueError starting with ``misfit`` names the tensors missing, extra or of another shape."""
    with torch.device("meta"):  # shapes only: the file's tensors become the parameters (assign=True)
        model = model_class.from_config(config)
    expected, found = tensor_shapes(model.state_dict()), tensor_shapes(tensors)
    if expected != found:
        differing = sorted(set(expected) ^ set(found)) or sorted(key for key in expected if expected[key] != found[key])
        more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
        raise ValueError(f"{misfit}: tensors missing, extra or of another shape: {differing[:3]}{more}")
    device = torch.device(device) if device is not None else default_device()
    model.load_state_dict({key: value.to(device=device, dtype=dtype) for key, value in tensors.items()}, assign=True)
    return model.eval().requires_grad_(False)


# Asymmetric VQGAN's published decoders (cross-attention/asymmetric-autoencoder-kl-x-1-5 and -x-2, diffusers'
# layout): their architectures, from diffusers' scripts/convert_asymmetric_vqgan_to_diffusers.py, as shipped configs;
# told apart by the decoder's widest width (its conv_in).
ASYMMETRIC_VAE_CONFIGS = os.path.join(SHIPPED_CONFIGS, "asymmetric_vae")
ASYMMETRIC_VAE_MARKER = "decoder.condition_encoder.layers.0.weight"
ASYMMETRIC_VAE_VARIANTS = {768: "x-1-5", 1024: "x-2"}


def asymmetric_vae_config(variant: str, width_scale: float = 1.0) -> dict:
    """The shipped config of a published asymmetric VAE (``"x-1-5"`` or ``"x-2"``), its widths times
    ``width_scale`` (1: the published model; smaller for tests)."""
    if variant not in ASYMMETRIC_VAE_VARIANTS.values():
        raise ValueError(f"variant must be one of {sorted(ASYMMETRIC_VAE_VARIANTS.values())}; got {variant!r}")
    with open(os.path.join(ASYMMETRIC_VAE_CONFIGS, f"{variant}.json"), encoding="utf-8") as file:
        config = json.load(file)
    for key in ("down_block_out_channels", "up_block_out_channels"):
        config[key] = [round(channels * width_scale) for channels in config[key]]
    return config


def load_asymmetric_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> torch.nn.Module:
    """Load one of Asymmetric VQGAN's published decoders (with SD's encoder) into a diffusers
    ``AsymmetricAutoencoderKL``, offline, from a ``.safetensors`` file in diffusers' layout.

    The variant (x-1-5 or x-2) is read from the decoder's width; a file at another width whose other tensors scale
    with it loads as that variant scaled (tests build such small ones).

    Raises:
        FileNotFoundError: no such file.
        formats.UnsafeModelFormatError: not a ``.safetensors`` file.
        ValueError: an unknown dtype, a file that is not an asymmetric VAE (a plain VAE, a checkpoint), or tensors
            that do not fit the variant's layout.
    """
    from diffusers import AsymmetricAutoencoderKL
    from safetensors.torch import load_file

    path = os.fspath(path)
    check_safetensors(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no VAE file at {path!r}")
    if dtype not in ACCEPTED_DTYPES:
        raise ValueError(f"dtype must be one of {ACCEPTED_DTYPES}; got {dtype}")
    name = os.path.basename(path)
    tensors = load_file(path)
    if ASYMMETRIC_VAE_MARKER not in tensors:
        raise ValueError(f"{name!r} is not an asymmetric VAE (Asymmetric VQGAN, diffusers layout): it has no "
                         f"{ASYMMETRIC_VAE_MARKER!r}; a plain SD VAE goes to the VAE loader")
    encoder_width, decoder_width = (tensors[key].shape[0] for key in ("encoder.conv_in.weight",
                                                                      "decoder.conv_in.weight"))
    # the published encoders are SD's, 128 wide; the decoders 1.5 and 2 times wider
    variant = next((variant for width, variant in ASYMMETRIC_VAE_VARIANTS.items()
                    if width * encoder_width == decoder_width * 128), None)
    if variant is None:
        raise ValueError(f"{name!r}: an encoder {encoder_width} wide with a decoder {decoder_width} wide is neither "
                         f"published asymmetric VAE (x-1-5: 128 and 768, x-2: 128 and 1024)")
    return _built_with(AsymmetricAutoencoderKL, asymmetric_vae_config(variant, encoder_width / 128), tensors,
                       f"{name!r} does not fit the asymmetric VAE {variant} layout", device, dtype)
