"""Tiles: covering starts, and tiled results equal to the untiled ones for functions that act locally."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from nodes.common.progress import use_sink
from nodes.common.tiles import tile_starts, tiled_apply


@pytest.mark.parametrize("size, tile, overlap, align", [(100, 40, 8, 1), (512, 96, 32, 8), (97, 96, 8, 1),
                                                         (1000, 128, 0, 1), (64, 64, 16, 8)])
def test_tiles_cover_everything_with_at_least_the_overlap(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(start % align == 0 for start in starts)
    assert all(a + tile - b >= overlap for a, b in zip(starts, starts[1:]))
    assert starts == sorted(set(starts))


@pytest.mark.parametrize("args", [(0, 8, 0, 1), (10, 8, 8, 1), (10, 8, -1, 1), (20, 8, 2, 8)])
def test_bad_tiling_is_refused(args):
    with pytest.raises(ValueError):
        tile_starts(*args)


def test_tiled_upsampling_equals_the_whole():
    x = torch.randn(2, 4, 37, 53)
    upsample = lambda t: F.interpolate(t, scale_factor=8, mode="nearest")  # noqa: E731
    assert torch.allclose(tiled_apply(upsample, x, 16, 4, Fraction(8)), upsample(x))


def test_tiled_downsampling_keeps_the_output_grid():
    x = torch.randn(1, 3, 128, 200)
    pool = lambda t: F.avg_pool2d(t, 8)  # noqa: E731
    assert torch.allclose(tiled_apply(pool, x, 64, 16, Fraction(1, 8)), pool(x), atol=1e-6)


@pytest.mark.parametrize("scale", [Fraction(1), Fraction(2)])
def test_a_margin_as_deep_as_the_receptive_field_gives_the_whole_result(scale):
    weight = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(0))

    def network(t):  # two zero-padded 3×3 convolutions: each output pixel sees 2 input pixels around it
        t = F.interpolate(t, scale_factor=int(scale), mode="nearest")
        return F.conv2d(F.conv2d(t, weight, padding=1), weight, padding=1)

    x = torch.randn(1, 3, 30, 41, generator=torch.Generator().manual_seed(1))
    whole = network(x)
    assert torch.allclose(tiled_apply(network, x, 12, 4, scale, margin=2), whole, atol=1e-4)
    assert not torch.allclose(tiled_apply(network, x, 12, 4, scale), whole, atol=1e-2)  # zero padding shows


def test_overlaps_are_cross_faded_not_cut():
    x = torch.zeros(1, 1, 8, 24)
    calls = iter([0.0, 1.0])
    constant = lambda t: torch.full_like(t, next(calls))  # noqa: E731 (tile 1 gives 0, tile 2 gives 1)
    row = tiled_apply(constant, x, 16, 8, Fraction(1))[0, 0, 0]
    assert torch.equal(row[:8], torch.zeros(8)) and torch.equal(row[16:], torch.ones(8))
    assert (row[8:16].diff() > 0).all()  # a ramp across the overlap


def test_progress_is_reported_per_tile():
    seen = []

    class Sink:
        def progress(self, step, total, preview):
            seen.append((step, total))

        def interrupted(self):
            return False

    with use_sink(Sink()):
        tiled_apply(lambda t: t, torch.zeros(1, 1, 30, 30), 16, 2, Fraction(1))  # 2 × 2 tiles overlapping by 2
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_image_tiles_stream_a_preview_that_fills_in_tile_by_tile():
    import numpy as np

    previews = []

    class Sink:
        def progress(self, step, total, preview):
            previews.append(np.asarray(preview).astype(np.float32) / 255)

        def interrupted(self):
            return False

    coarse = torch.rand(1, 3, 6, 4, generator=torch.Generator().manual_seed(0))
    x = F.interpolate(coarse, size=(300, 200), mode="bilinear")  # smooth, so a pixel's shift in the preview is small
    upsample = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731  (600 × 400 output)
    with use_sink(Sink()):
        out = tiled_apply(upsample, x, 128, 16, Fraction(2))
    assert len(previews) == 3 * 2 and previews[0].shape == (512, 341, 3)  # at most 512 px a side
    filled = [float((preview > 0).mean()) for preview in previews]
    assert filled == sorted(filled) and filled[0] < 0.5 and filled[-1] > 0.99  # the image fills in
    expected = F.interpolate(out, size=(512, 341), mode="area")[0].permute(1, 2, 0).numpy()
    assert float(np.abs(previews[-1] - expected).mean()) < 0.02
