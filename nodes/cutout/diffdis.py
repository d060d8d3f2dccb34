"""DiffDIS (Yu et al., ICLR 2025): high-resolution dichotomous image segmentation (a cut-out mask and its edges) in
one step of a modified sd-turbo UNet.

Facts read from the official code (qianyu-dlut/DiffDIS @d119034: ``run_inference.py``, ``core/diffdis_pipeline.py``
and its patched diffusers 0.30.2, ``unets/unet_2d_condition_diffdis.py``, ``attention.py``,
``attention_processor.py``):

- the UNet is SD2.1's (sd-turbo's) with ``in_channels`` 8 (the image latent, then the noisy latent) and a class
  projection ``TimestepEmbedding(4, 1280)`` added to the time embedding; its input is a batch of two, the mask and
  the edge map, told apart by the batch-discriminative code sin/cos of (0, 1) and of (1, 0);
- SWCI: after each of the first three down blocks, the block's last skip ``s`` becomes ``s · P(g) + P'(g) + s``,
  where ``g = GELU(BN(conv3×3(z)))`` of the latent of the image resized to ½, ¼, ⅛, and ``P``, ``P'`` are 3×3
  convolutions (zero-initialised in training);
- DBIA: the mid-block transformer gains, between its self- and cross-attention, ``h += attn3(norm2_(h))`` where the
  mask half's queries attend to the edge half's keys and values and the reverse;
- inference: the image resized to 1024² (bilinear), its latent the VAE posterior's mean × 0.18215 (so are the ½, ¼,
  ⅛ ones), one DDPM step at t = 999 (sd-turbo's scheduler config, trailing spacing) from one noise shared by both
  halves, the empty prompt unpadded (its two tokens), the decode's channel mean clipped to [-1, 1], mapped to
  [0, 1] and min-max normalised per image; test-time augmentation averages horizontal flips × scales 0.75, 1, 1.25;
  the result is resized back to the input's size: a soft mask, not thresholded.

The UNet file is the authors' ``unet/diffusion_pytorch_model.safetensors``; the VAE and the text encoder are
sd-turbo's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..models.formats import check_safetensors, layout_difference, tensor_shapes
from ..sampling.model_sampling import one_step_x0

LATENT_SCALE = 0.18215  # Source: diffdis_pipeline.py, rgb_latent_scale_factor and mask_latent_scale_factor
TIMESTEP = 999  # Source: one DDPM step (run_inference.sh --denoise_steps 1) on sd-turbo's trailing spacing
GUIDED_SKIPS = 3  # Source: unet_2d_condition_diffdis.py, SWCI on down blocks j < 3 with rgb_token[j + 1]
# Source: diffdis_pipeline.py single_infer: cat(sin, cos) of the labels (0, 1) for the mask and (1, 0) for the edges
DISCRIMINATIVE_LABELS = ((0.0, 1.0), (1.0, 0.0))
TTA_SCALES = (0.75, 1.0, 1.25)  # Source: run_inference.py, ttach HorizontalFlip × Scale(0.75, 1, 1.25)
PROCESSING_RESOLUTION = 1024  # Source: run_inference.py --processing_res, a square bilinear resize


def diffdis_unet_config(sd21_config: Mapping) -> dict:
    """DiffDIS's UNet config from SD2.1's: what ``run_inference.py`` passes to ``from_pretrained``, less its own
    keywords (``mid_extra_cross``, ``mode``, ``use_swci``), which :func:`build_diffdis_unet` builds. Private keys
    (``_use_default_values`` would reset the overrides) are dropped."""
    public = {key: value for key, value in sd21_config.items() if not key.startswith("_")}
    return {**public, "in_channels": 8, "class_embed_type": "projection",
            "projection_class_embeddings_input_dim": 2 * len(DISCRIMINATIVE_LABELS[0])}


def mutual_attention(attention: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """DBIA's attention: diffusers ``Attention`` ``attention``'s projections, the first half of the batch (masks)
    querying the second's (edges) keys and values and the second the first's. ``hidden``: (2B, N, C).

    Example:
        >>> from diffusers.models.attention_processor import Attention
        >>> attention = Attention(query_dim=8, heads=2, dim_head=4)
        >>> hidden = torch.randn(2, 5, 8)
        >>> swapped = mutual_attention(attention, hidden.flip(0)).flip(0)
        >>> torch.allclose(mutual_attention(attention, hidden), swapped, atol=1e-6)
        True
    """
    batch, tokens, _ = hidden.shape
    if batch % 2:
        raise ValueError(f"DBIA needs a batch of masks then edges (an even batch); got {batch}")

    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.view(batch, tokens, attention.heads, -1).transpose(1, 2)

    query, key, value = (heads(projection(hidden)) for projection in (attention.to_q, attention.to_k, attention.to_v))
    other_key, other_value = (torch.cat(tensor.chunk(2)[::-1]) for tensor in (key, value))
    mixed = F.scaled_dot_product_attention(query, other_key, other_value)
    mixed = mixed.transpose(1, 2).reshape(batch, tokens, -1).to(query.dtype)
    return attention.to_out[1](attention.to_out[0](mixed))


class DbiaTransformerBlock(torch.nn.Module):
    """SD's ``BasicTransformerBlock`` with DiffDIS's mask–edge attention (``norm2_``, ``attn3``) between its self-
    and cross-attention; its modules keep the published names. Built from the block it replaces."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn1, self.norm2, self.attn2 = block.norm1, block.attn1, block.norm2, block.attn2
        self.norm3, self.ff = block.norm3, block.ff
        from diffusers.models.attention_processor import Attention

        width = block.norm2.normalized_shape[0]
        self.norm2_ = torch.nn.LayerNorm(width, eps=block.norm2.eps, elementwise_affine=block.norm2.elementwise_affine)
        self.attn3 = Attention(query_dim=width, heads=block.attn1.heads, dim_head=width // block.attn1.heads,
                               bias=block.attn1.to_q.bias is not None, out_bias=True)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        """As ``Transformer2DModel`` calls its blocks; the other keywords (timestep, class labels) SD ignores."""
        hidden = hidden_states + self.attn1(self.norm1(hidden_states), attention_mask=attention_mask)
        hidden = hidden + mutual_attention(self.attn3, self.norm2_(hidden))
        hidden = hidden + self.attn2(self.norm2(hidden), encoder_hidden_states=encoder_hidden_states)
        return hidden + self.ff(self.norm3(hidden))


def _conv_bn_gelu(in_channels: int, out_channels: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, out_channels, 3, padding=1),
                               torch.nn.BatchNorm2d(out_channels), torch.nn.GELU())


def build_diffdis_unet(sd21_config: Mapping) -> torch.nn.Module:
    """DiffDIS's UNet from SD2.1's config, on the current default device (build it under ``torch.device("meta")``
    to count or to load without allocating twice); run it with :func:`diffdis_unet_forward`.

    Example:
        >>> from nodes.models.model_configs import shipped_unet_config
        >>> with torch.device("meta"):
        ...     unet = build_diffdis_unet(shipped_unet_config("sd2"))
        >>> unet.conv_in.in_channels, unet.class_embedding.linear_1.in_features, unet.rgb_proj[2].out_channels
        (8, 4, 1280)
    """
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(diffdis_unet_config(sd21_config))
    widths = unet.config.block_out_channels[:GUIDED_SKIPS]
    latent = unet.config.out_channels
    unet.rgb_conv = torch.nn.ModuleList(_conv_bn_gelu(latent, width) for width in widths)
    unet.rgb_proj = torch.nn.ModuleList(torch.nn.Conv2d(width, width, 3, padding=1) for width in widths)
    unet.rgb_proj1 = torch.nn.ModuleList(torch.nn.Conv2d(width, width, 3, padding=1) for width in widths)
    for transformer in unet.mid_block.attentions:
        transformer.transformer_blocks = torch.nn.ModuleList(
            DbiaTransformerBlock(block) for block in transformer.transformer_blocks)
    return unet


def diffdis_unet_forward(unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                         text_states: torch.Tensor, class_code: torch.Tensor, image_pyramid: Sequence[torch.Tensor]
                         ) -> torch.Tensor:
    """The DiffDIS UNet's forward, as the patched ``UNet2DConditionModel_diffdis.forward`` runs it for inference.

    Args:
        sample: (2B, 8, h, w): the image latent, then the noisy mask or edge latent; masks first, then edges.
        timestep: (2B,).
        text_states: (2B, L, D), the empty prompt.
        class_code: (2B, 4), :func:`discriminative_code`.
        image_pyramid: the (2B, 4, ·, ·) latents of the image at ½, ¼ and ⅛ of its size, one per guided skip.
    Returns:
        (2B, 4, h, w), the predicted noise.
    """
    emb = unet.time_embedding(unet.time_proj(timestep).to(sample.dtype))
    emb = emb + unet.class_embedding(class_code.to(sample.dtype))
    hidden = unet.conv_in(sample)
    skips = [hidden]
    for index, block in enumerate(unet.down_blocks):
        if getattr(block, "has_cross_attention", False):
            hidden, outputs = block(hidden, temb=emb, encoder_hidden_states=text_states)
        else:
            hidden, outputs = block(hidden, temb=emb)
        outputs = list(outputs)
        if index < GUIDED_SKIPS:  # SWCI: the image's latent at this scale modulates the block's last skip
            guide = unet.rgb_conv[index](image_pyramid[index])
            outputs[-1] = outputs[-1] * unet.rgb_proj[index](guide) + unet.rgb_proj1[index](guide) + outputs[-1]
        skips.extend(outputs)
    hidden = unet.mid_block(hidden, emb, encoder_hidden_states=text_states)
    for block in unet.up_blocks:
        taken = len(block.resnets)
        outputs = tuple(skips[-taken:])
        del skips[-taken:]
        size = skips[-1].shape[-2:] if skips else None
        if getattr(block, "has_cross_attention", False):
            hidden = block(hidden, outputs, temb=emb, encoder_hidden_states=text_states, upsample_size=size)
        else:
            hidden = block(hidden, outputs, temb=emb, upsample_size=size)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))


def discriminative_code(batch: int) -> torch.Tensor:
    """The class labels of a batch of ``batch`` masks then ``batch`` edge maps: (2·batch, 4).

    Example:
        >>> discriminative_code(1).round(decimals=3)
        tensor([[0.0000, 0.8410, 1.0000, 0.5400],
                [0.8410, 0.0000, 0.5400, 1.0000]])
    """
    labels = torch.tensor(DISCRIMINATIVE_LABELS)
    return torch.cat([labels.sin(), labels.cos()], dim=-1).repeat_interleave(batch, 0)


def load_diffdis_unet(path: str | os.PathLike, base_config: Mapping) -> torch.nn.Module:
    """DiffDIS's UNet from the authors' ``diffusion_pytorch_model.safetensors``, float32 on the CPU, in eval mode
    (its batch norms use their running statistics).

    Raises:
        UnsafeModelFormatError: a file that is not ``.safetensors``.
        ValueError: a file whose tensors are not DiffDIS's UNet (names and shapes compared before anything is built).
    """
    check_safetensors(path)
    tensors = load_file(os.fspath(path))
    with torch.device("meta"):
        unet = build_diffdis_unet(base_config)
    expected, found = tensor_shapes(unet.state_dict()), tensor_shapes(tensors)
    if found != expected:
        count, detail = layout_difference(expected, found)
        raise ValueError(f"{os.path.basename(path)!r} is not DiffDIS's UNet ({count} differences: {detail}); give "
                         f"unet/diffusion_pytorch_model.safetensors from the authors' weights")
    unet.load_state_dict({key: value.float() if value.is_floating_point() else value
                          for key, value in tensors.items()}, assign=True)
    return unet.eval()


def _normalised(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1], as the pipeline does. Departure: a flat map gives zeros, not a division by 0."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny)


def diffdis_predict(unet: torch.nn.Module, text_states: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor],
                    decode: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, noise: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DiffDIS inference (``single_infer`` and the pipeline's normalisation) on square images.

    Args:
        unet: from :func:`build_diffdis_unet`, on the device the images are on.
        text_states: (1, L, D), the empty prompt's states (its two tokens).
        encode: images (B, 3, H, W) in [0, 1] → the VAE posterior's mean (B, 4, H/8, W/8), unscaled.
        decode: latents → images in [0, 1].
        image: (B, 3, S, S) in [0, 1], S a multiple of 64.
        noise: (B, 4, S/8, S/8), shared by the mask and the edge map.
    Returns:
        The mask and the edge map, (B, S, S) each, in [0, 1].
    """
    size = image.shape[-1]
    if image.shape[-2] != size or size % 64:
        raise ValueError(f"DiffDIS runs square images of a multiple of 64 pixels; got {tuple(image.shape[-2:])}")
    batch = image.shape[0]

    def latent(pixels: int) -> torch.Tensor:
        resized = image if pixels == size else F.interpolate(image, size=pixels, mode="bilinear", align_corners=False)
        return (encode(resized) * LATENT_SCALE).repeat(2, 1, 1, 1)

    image_latent = latent(size)
    pyramid = [latent(size // 2 ** (level + 1)) for level in range(GUIDED_SKIPS)]
    noisy = noise.to(image_latent).repeat(2, 1, 1, 1)
    timestep = torch.full((2 * batch,), TIMESTEP, device=image_latent.device)
    states = text_states.to(image_latent).expand(2 * batch, -1, -1)
    eps = diffdis_unet_forward(unet, torch.cat([image_latent, noisy], dim=1), timestep, states,
                               discriminative_code(batch).to(image_latent), pyramid)
    clean = one_step_x0(noisy, eps, TIMESTEP)
    # Departure: both hosts' VAEs clamp each channel to [0, 1] before the channel mean (the authors clamp after it)
    maps = _normalised(decode(clean / LATENT_SCALE).mean(dim=1))
    return maps[:batch], maps[batch:]


def diffdis_segment(predict: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], image: torch.Tensor,
                    resolution: int = PROCESSING_RESOLUTION, augment: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffDIS's mask and edge map of images of any size, as ``run_inference.py`` makes them.

    Args:
        predict: square images (B, 3, S, S) in [0, 1] → mask and edge maps (B, S, S), e.g. :func:`diffdis_predict`
            with a fresh noise each call.
        image: (B, 3, H, W) in [0, 1].
        resolution: the square processing size.
        augment: average horizontal flips × scales :data:`TTA_SCALES` (the authors' test-time augmentation).
    Returns:
        The mask and the edge map, (B, H, W) in [0, 1].
    """
    height, width = image.shape[-2:]
    # Departure: the authors resize an 8-bit PIL image (bilinear, antialiased when shrinking); this is the float one
    square = F.interpolate(image, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    sums = None
    for flip in (False, True) if augment else (False,):
        for scale in TTA_SCALES if augment else (1.0,):
            pixels = round(resolution * scale)
            view = square.flip(-1) if flip else square
            if pixels != resolution:
                view = F.interpolate(view, size=pixels, mode="bilinear", align_corners=False)
            maps = torch.stack(predict(view), dim=1)  # (B, 2, S, S)
            if pixels != resolution:
                maps = F.interpolate(maps, size=resolution, mode="bilinear", align_corners=False)
            maps = maps.flip(-1) if flip else maps
            sums = maps if sums is None else sums + maps
    views = 2 * len(TTA_SCALES) if augment else 1
    result = F.interpolate(sums / views, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    result = result.clamp(0, 1)
    return result[:, 0], result[:, 1]
