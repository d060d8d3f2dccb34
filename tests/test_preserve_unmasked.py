"""Preserve Unmasked (techniques.md §4.12, Target 15, the composite): beyond the dilation and the feather's kernel
every pixel is the original bit for bit, inside the mask the decoded picture bit for bit; a mask of ones gives the
decoded picture, of zeros the original; on the embedded model's VAE round trip the kept region's error is gone."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from nodes.common.denoiser import DiffusersCodec
from nodes.embedded.train import SHIPPED_NAME
from nodes.inpaint.nodes import AtelierPreserveUnmasked
from nodes.inpaint.preserve import feathered_mask, preserve_unmasked
from nodes.models.loading import SHIPPED_MODELS, load_model


def _images(seed: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=generator), torch.rand(2, 3, size, size, generator=generator)


def _band(mask: torch.Tensor, reach: int) -> torch.Tensor:
    """Pixels within ``reach`` (Chebyshev distance) of the mask."""
    return F.max_pool2d(mask, 2 * reach + 1, stride=1, padding=reach) > 0


@pytest.mark.parametrize(("dilate", "feather"), [(8, 4.0), (3, 1.5), (0, 2.0), (5, 0.0)])
def test_beyond_dilation_and_feather_the_original_inside_the_mask_the_decoded_bit_for_bit(dilate, feather):
    decoded, original = _images()
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 20:30, 10:40] = 1
    mask[1, :, 50:60, 50:64] = 1
    out = preserve_unmasked(decoded, original, mask, dilate, feather)
    reach = dilate + math.ceil(3 * feather)
    beyond = ~_band(mask, reach).expand_as(out)
    assert beyond.any() and torch.equal(out[beyond], original[beyond])
    inside = (mask > 0).expand_as(out)
    assert torch.equal(out[inside], decoded[inside])
    # the band right at the reach is still blended: the bound is tight, not a wide margin
    edge = _band(mask, reach).expand_as(out) & ~_band(mask, reach - 1).expand_as(out)
    if feather:
        assert not torch.equal(out[edge], original[edge])


def test_a_mask_of_ones_gives_the_decoded_picture_and_of_zeros_the_original():
    decoded, original = _images(1)
    assert torch.equal(preserve_unmasked(decoded, original, torch.ones(1, 1, 64, 64)), decoded)
    assert torch.equal(preserve_unmasked(decoded, original, torch.zeros(1, 1, 64, 64)), original)


def test_feathered_mask_grows_softly_and_never_below_the_mask():
    mask = torch.zeros(1, 1, 40, 40)
    mask[..., 15:25, 15:25] = 1
    soft = feathered_mask(mask, 4, 2.0)
    assert torch.equal(soft[mask > 0], torch.ones(100))
    row = soft[0, 0, 20, :15]  # leaving the mask to the left: falls monotonically to 0
    assert torch.all(row[1:] >= row[:-1]) and row[0] == 0 and 0 < row[15 - 4 - 3] < 1


def test_the_vae_round_trip_error_outside_the_mask_is_gone_on_the_embedded_model():
    codec = DiffusersCodec(load_model(os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME), device="cpu").vae)
    original = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.25
    round_trip = codec.decode(codec.encode(original))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 24:40, 24:40] = 1
    outside = ~_band(mask, 8 + 12).expand_as(original)
    assert (round_trip - original)[outside].abs().mean() > 0.01  # the round trip changes the kept region
    kept = AtelierPreserveUnmasked().composite(round_trip.permute(0, 2, 3, 1), original.permute(0, 2, 3, 1),
                                               mask[:, 0], 8, 4.0)[0].permute(0, 3, 1, 2)
    assert torch.equal(kept[outside], original[outside])


def test_node_takes_both_mask_layouts_and_refuses_mismatches():
    decoded, original = (image.permute(0, 2, 3, 1) for image in _images(3, 32))
    node = AtelierPreserveUnmasked()
    mask = torch.zeros(32, 32)
    mask[:8, :8] = 1
    (one,) = node.composite(decoded, original, mask, 2, 1.0)
    (batched,) = node.composite(decoded, original, mask[None].expand(2, 32, 32), 2, 1.0)
    assert one.shape == decoded.shape and torch.equal(one, batched)
    with pytest.raises(ValueError, match="size"):
        node.composite(decoded, original, torch.zeros(16, 16), 2, 1.0)
    with pytest.raises(ValueError, match="one size"):
        node.composite(decoded, original[:, :16], mask, 2, 1.0)
    with pytest.raises(ValueError, match="batch"):
        node.composite(decoded, original, torch.zeros(3, 32, 32), 2, 1.0)
