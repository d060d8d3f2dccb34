"""Tiled VAE decoding and encoding against the whole-image pass (nodes.common.tiled_vae)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from nodes.common.denoiser import DiffusersCodec
from nodes.common.tiled_vae import (DECODER_MARGIN, decode_dtype, shared_group_norm_statistics, tiled_decode,
                                     tiled_encode)
from nodes.common.tiles import tile_starts, tiled_apply

TILE, OVERLAP = 16, 4  # latent pixels: 3 × 5 tiles over the 40 × 56 latent below


@pytest.fixture(scope="module")
def codec() -> DiffusersCodec:
    """A small random AutoencoderKL (factor 2). Its mid-block attention is off: attention sees one tile in every
    tiled VAE, so only a VAE without it can match the whole-image pass to the pixel; with it, the tile-local
    attention is this module's documented departure."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, mid_block_add_attention=False)
    return DiffusersCodec(vae.eval().requires_grad_(False))


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    coarse = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    return F.interpolate(coarse, size=(40, 56), mode="bicubic", align_corners=False)  # smooth, like real latents


def colour_error(image: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest relative difference of a per-channel mean or standard deviation."""
    errors = [abs(float(f(image[:, c]) / f(reference[:, c])) - 1)
              for c in range(image.shape[1]) for f in (torch.mean, torch.std)]
    return max(errors)


def border_gradient_ratio(image: torch.Tensor, starts: list[int], tile: int, scale: int) -> float:
    """Mean horizontal gradient across the columns where tiles begin and end, over the mean everywhere."""
    gradient = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1, 2))
    borders = sorted({start * scale - 1 for start in starts[1:]} | {(start + tile) * scale - 1 for start in starts[:-1]})
    return float(gradient[borders].mean() / gradient.mean())


def test_tiled_decode_keeps_the_colours_and_shows_no_seams(codec, latent):
    whole = codec.decode(latent)
    tiled = tiled_decode(codec, latent, TILE, OVERLAP)  # the latent is below STATISTICS_SIDE_PX: exact statistics
    starts = tile_starts(latent.shape[-1], TILE, OVERLAP)
    assert colour_error(tiled, whole) <= 0.01
    assert border_gradient_ratio(tiled, starts, TILE, codec.downscale) <= 1.1 * border_gradient_ratio(
        whole, starts, TILE, codec.downscale)
    # Plain tiling, each tile normalised alone and zero-padded, fails the same check: the check can fail.
    plain = tiled_apply(codec.decode, latent, TILE, OVERLAP, Fraction(codec.downscale))
    assert colour_error(plain, whole) > 0.01


def test_statistics_of_a_large_input_come_from_a_downsampled_copy(codec, latent):
    seen = []
    hook = codec.vae.decoder.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2:]))
    try:
        tiled_decode(codec, latent, TILE, OVERLAP, statistics_size=28)
    finally:
        hook.remove()
    assert tuple(seen[0]) == (20, 28)  # the statistics pass: the 40 × 56 latent halved, then one pass per tile
    tiles = len(tile_starts(40, TILE, OVERLAP)) * len(tile_starts(56, TILE, OVERLAP))
    assert len(seen) == 1 + tiles and all(max(shape) <= TILE + 2 * DECODER_MARGIN for shape in seen[1:])


def test_tiled_encode_matches_the_whole_encode(codec, latent):
    image = codec.decode(latent)
    whole = codec.encode(image)
    tiled = tiled_encode(codec, image, 2 * TILE, 2 * OVERLAP, margin=8)
    assert tiled.shape == whole.shape
    assert colour_error(tiled, whole) <= 0.01


def test_one_tile_is_the_whole_pass(codec, latent):
    assert torch.equal(tiled_decode(codec, latent, 64, 8), codec.decode(latent))


def test_statistics_hooks_are_removed_afterwards(codec, latent):
    norm = codec.vae.decoder.conv_norm_out
    with shared_group_norm_statistics(codec.vae.decoder, lambda: codec.decode(latent)):
        assert norm._forward_hooks
    assert not norm._forward_hooks and not norm._forward_pre_hooks


def test_tiled_decode_streams_into_a_channels_last_image_buffer(codec, latent):
    expected = tiled_decode(codec, latent, TILE, OVERLAP)
    image = torch.full((1, 80, 112, 3), -1.0)  # ComfyUI's IMAGE layout, written through a (B, C, H, W) view
    returned = tiled_decode(codec, latent, TILE, OVERLAP, out=image.permute(0, 3, 1, 2))
    assert returned.data_ptr() == image.data_ptr()
    assert torch.equal(image.permute(0, 3, 1, 2), expected)


def test_a_bfloat16_decode_stays_within_a_few_8_bit_levels(codec, latent):
    whole = tiled_decode(codec, latent, TILE, OVERLAP)
    fast = tiled_decode(codec, latent, TILE, OVERLAP, dtype=torch.bfloat16)
    assert fast.dtype == torch.float32
    assert 0 < (fast - whole).abs().mean() * 255 <= 2  # it did run in bfloat16, and stays close
    assert colour_error(fast, whole) <= 0.01


def test_decode_precision_names(codec):
    assert decode_dtype("float32", codec) is None
    assert decode_dtype("bfloat16", codec) == torch.bfloat16
    assert decode_dtype("auto", codec) in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="precision must be one of"):
        decode_dtype("int8", codec)
