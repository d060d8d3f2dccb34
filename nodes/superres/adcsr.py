"""AdcSR (Chen et al., CVPR 2025): one-step ×4 real-world super-resolution by a compressed SD2.1 UNet and a
channel-pruned VAE decoder, with no text, no timestep and no VAE encoder.

Facts read from the official code (Guaishou74851/AdcSR, ``model.py``, ``forward.py``, ``test.py``):

- the network starts from SD2.1-base's UNet: the time embedding, every ResNet's time projection and every
  transformer's cross-attention (``attn2``, ``norm2``) are removed; ``conv_in`` takes the 12 channels of a
  2×2 pixel-unshuffled RGB image; then every convolution, linear layer, group norm and layer norm is cut to 3/4 of
  its input and output widths (``halve_channels``, in spite of its name), a group norm taking the first of 32, 24,
  16, 12, 8, 6, 4, 2, 1 groups that divides its new width; attention keeps its head count (so heads narrow to 48);
- the UNet runs as a plain encoder-decoder (ResNet and transformer blocks in order, the skip connections as SD's),
  and its ``conv_out`` gives the 256 channels of the pruned VAE decoder's middle (``halfDecoder``: diffusers'
  ``Decoder`` with widths 64, 128, 256, 256), whose middle block the distillation trained with the UNet
  (``net_params_200.pkl``) and whose up blocks, norm and output convolution come from the pretrained
  ``halfDecoder.ckpt``;
- the input is the LR image in [-1, 1]; the output is then given the LR image's per-channel mean and standard
  deviation (a colour fix) before being mapped back to [0, 1]; the output is ×4 the input.

Weights are published as pickles; users convert them once to ``.safetensors`` (README), which this module reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from fractions import Fraction

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..models.formats import check_safetensors, layout_difference, tensor_shapes

CHANNEL_KEEP = Fraction(3, 4)  # Source: model.py halve_channels, int(width * 0.75)
GROUP_CHOICES = (32, 24, 16, 12, 8, 6, 4, 2, 1)  # Source: model.py halve_channels, the first that divides
HALF_DECODER_WIDTHS = (64, 128, 256, 256)  # Source: test.py, the halfDecoder's Decoder(block_out_channels=...)
UNSHUFFLE = 2  # Source: model.py Net, nn.PixelUnshuffle(2) before the UNet
SCALE = 4
# The UNet halves its input three times after the 2×2 unshuffle: inputs are padded to a multiple of this.
SIZE_MULTIPLE = UNSHUFFLE * 8


def _narrow(width: int) -> int:
    return int(width * CHANNEL_KEEP)


def _narrowed_copy(module: torch.nn.Module) -> torch.nn.Module | None:
    """``module`` rebuilt (uninitialised, same options) at 3/4 of its widths, as AdcSR's pruning does; None for a
    module without widths."""
    if isinstance(module, torch.nn.Conv2d):
        return torch.nn.Conv2d(_narrow(module.in_channels), _narrow(module.out_channels), module.kernel_size,
                               stride=module.stride, padding=module.padding, dilation=module.dilation,
                               groups=module.groups, bias=module.bias is not None)
    if isinstance(module, torch.nn.Linear):
        return torch.nn.Linear(_narrow(module.in_features), _narrow(module.out_features), bias=module.bias is not None)
    if isinstance(module, torch.nn.GroupNorm):
        channels = _narrow(module.num_channels)
        groups = next(count for count in GROUP_CHOICES if channels % count == 0)
        return torch.nn.GroupNorm(groups, channels, eps=module.eps, affine=module.affine)
    if isinstance(module, torch.nn.LayerNorm):
        return torch.nn.LayerNorm(_narrow(module.normalized_shape[0]), eps=module.eps,
                                  elementwise_affine=module.elementwise_affine)
    return None


class AdcSRNet(torch.nn.Module):
    """AdcSR's generator: LR image in [-1, 1], (B, 3, H, W) with H and W multiples of :data:`SIZE_MULTIPLE` →
    (B, 3, 4H, 4W), before the colour fix. Build it with :func:`build_adcsr`."""

    def __init__(self, unet: torch.nn.Module, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.mid_block = decoder.mid_block
        self.up_blocks = decoder.up_blocks
        self.conv_norm_out, self.conv_act, self.conv_out = decoder.conv_norm_out, decoder.conv_act, decoder.conv_out

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        hidden = unet.conv_in(F.pixel_unshuffle(image, UNSHUFFLE))
        skips = [hidden]
        for block in unet.down_blocks:
            hidden, outputs = block(hidden)
            skips.extend(outputs)
        hidden = unet.mid_block(hidden)
        for block in unet.up_blocks:
            taken = len(block.resnets)
            hidden = block(hidden, tuple(skips[-taken:]))
            del skips[-taken:]
        hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
        hidden = self.mid_block(hidden)
        for block in self.up_blocks:
            hidden = block(hidden)
        return self.conv_out(self.conv_act(self.conv_norm_out(hidden)))


def build_adcsr(unet_config: Mapping, decoder_widths: tuple[int, ...] = HALF_DECODER_WIDTHS) -> AdcSRNet:
    """AdcSR's architecture from SD2.1-base's UNet config, on the current default device (build it under
    ``torch.device("meta")`` to count or to load without allocating twice).

    Example:
        >>> from nodes.models.model_configs import shipped_unet_config
        >>> with torch.device("meta"):
        ...     net = build_adcsr(shipped_unet_config("sd2"))
        >>> norm = net.unet.down_blocks[0].resnets[0].norm1
        >>> net.unet.conv_in.in_channels, net.unet.conv_out.out_channels, norm.num_groups, norm.num_channels
        (12, 256, 24, 240)
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.autoencoders.vae import Decoder

    unet = UNet2DConditionModel.from_config(dict(unet_config))
    del unet.time_embedding
    for module in unet.modules():
        if hasattr(module, "time_emb_proj"):
            module.time_emb_proj = None
        if hasattr(module, "attn2") and hasattr(module, "ff"):
            module.attn2 = module.norm2 = None
    for name, module in list(unet.named_modules()):
        narrowed = _narrowed_copy(module)
        if narrowed is not None:
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, narrowed)
    for module in unet.modules():  # the resamplers check their input's width against ``channels``
        if hasattr(module, "channels") and hasattr(module, "use_conv"):
            module.channels = _narrow(module.channels)
    first = unet.conv_in.out_channels
    unet.conv_in = torch.nn.Conv2d(3 * UNSHUFFLE ** 2, first, 3, padding=1)
    unet.conv_out = torch.nn.Conv2d(first, decoder_widths[-1], 3, padding=1)
    decoder = Decoder(in_channels=4, out_channels=3, up_block_types=("UpDecoderBlock2D",) * len(decoder_widths),
                      block_out_channels=tuple(decoder_widths), layers_per_block=2, norm_num_groups=32,
                      act_fn="silu", norm_type="group", mid_block_add_attention=True)
    return AdcSRNet(unet, decoder).eval().requires_grad_(False)


def published_state_dict(network: Mapping[str, torch.Tensor], decoder: Mapping[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
    """:class:`AdcSRNet`'s tensors from the two published files, converted to ``.safetensors``: the distilled
    network (``net_params_200``: the ``DataParallel`` Net's ``module.body.1.*`` UNet, whose ``body.*`` aliases
    are dropped, and ``module.body.2.*`` decoder middle) and the pretrained half decoder (``halfDecoder``'s
    ``decoder.*``, of which the up blocks, final norm and output convolution are used)."""
    tensors = {}
    for key, value in network.items():
        key = key.removeprefix("module.")
        if key.startswith("body.1.") and not key.startswith("body.1.body."):
            tensors["unet." + key.removeprefix("body.1.")] = value
        elif key.startswith("body.2."):
            tensors["mid_block." + key.removeprefix("body.2.")] = value
    for key, value in decoder.items():
        key = key.removeprefix("state_dict.").removeprefix("decoder.")
        if key.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")):
            tensors[key] = value
    return tensors


def load_adcsr(network_file: str | os.PathLike, decoder_file: str | os.PathLike, unet_config: Mapping,
               decoder_widths: tuple[int, ...] = HALF_DECODER_WIDTHS) -> AdcSRNet:
    """AdcSR from its two converted files, float32 on the CPU.

    Raises:
        UnsafeModelFormatError: a file that is not ``.safetensors``.
        ValueError: files whose tensors are not AdcSR's (names and shapes compared before anything is built).
    """
    for path in (network_file, decoder_file):
        check_safetensors(path)
    tensors = published_state_dict(load_file(os.fspath(network_file)), load_file(os.fspath(decoder_file)))
    with torch.device("meta"):
        net = build_adcsr(unet_config, decoder_widths)
    expected = tensor_shapes(net.state_dict())
    found = tensor_shapes(tensors)
    if found != expected:
        count, detail = layout_difference(expected, found)
        raise ValueError(f"{os.path.basename(network_file)!r} and {os.path.basename(decoder_file)!r} are not "
                         f"AdcSR's network and half decoder ({count} differences: {detail}); give the converted "
                         f"net_params_200 and halfDecoder files")
    net.load_state_dict({key: value.float() for key, value in tensors.items()}, assign=True)
    return net


def match_colour(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """AdcSR's colour fix: ``output`` given ``reference``'s per-image, per-channel mean and standard deviation
    (unbiased, as ``torch.std``). Both (B, C, H, W) in [-1, 1]; sizes may differ. Departure: a flat output's zero
    deviation is floored (the official code divides by it)."""
    dims = (2, 3)
    spread = output.std(dims, keepdim=True).clamp_min(torch.finfo(output.dtype).tiny)  # a flat output stays flat
    return ((output - output.mean(dims, keepdim=True)) / spread
            * reference.std(dims, keepdim=True) + reference.mean(dims, keepdim=True))


def padded_forward(net: AdcSRNet, image: torch.Tensor) -> torch.Tensor:
    """``net`` on an image of any size: reflect-padded at the bottom and right to a multiple of
    :data:`SIZE_MULTIPLE`, the result cropped back to ×4."""
    height, width = image.shape[-2:]
    pad_h, pad_w = -height % SIZE_MULTIPLE, -width % SIZE_MULTIPLE
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        image = F.pad(image, (0, pad_w, 0, pad_h), mode=mode)
    return net(image)[..., :SCALE * height, :SCALE * width]
