"""Tiled diffusion as ComfyUI's UNet-call wrapper (nodes/highres/unet_wrapper.py), on stand-ins for ComfyUI's
``apply_model``: no ComfyUI needed. tests/test_comfy_pack_tiled.py runs it inside real ComfyUI."""

from __future__ import annotations

import pytest
import torch

from nodes.highres.tiling import MODES, TileSettings
from nodes.highres.unet_wrapper import TiledUnetWrapper, step_of_sigma

HEIGHT, WIDTH = 24, 40
SAMPLE_SIGMAS = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.0])


def settings(mode: str, tile: int = 16, tile_batch_size: int = 3) -> TileSettings:
    return TileSettings(mode, tile=tile, overlap=4, tile_batch_size=tile_batch_size, offset_stride=8)


def params(x: torch.Tensor, sigma: float = 14.6, **conditioning) -> dict:
    """The wrapper's second argument as ComfyUI's calc_cond_batch builds it, for a cond + uncond batch."""
    batch = x.shape[0]
    c = {"c_crossattn": torch.randn(batch, 77, 8, generator=torch.Generator().manual_seed(2)),
         "transformer_options": {"cond_or_uncond": [0, 1], "uuids": ["a", "b"], "sample_sigmas": SAMPLE_SIGMAS},
         **conditioning}
    return {"input": x, "timestep": torch.full((batch,), sigma), "c": c, "cond_or_uncond": [0, 1]}


def latent(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))


def coordinate_latent() -> torch.Tensor:
    """A cond + uncond batch whose channels 0 and 1 hold each pixel's row and column (2 and 3 repeat them)."""
    rows = torch.arange(HEIGHT, dtype=torch.float32).reshape(-1, 1).expand(HEIGHT, WIDTH)
    columns = torch.arange(WIDTH, dtype=torch.float32).reshape(1, -1).expand(HEIGHT, WIDTH)
    return torch.stack([rows, columns, rows, columns]).expand(2, 4, HEIGHT, WIDTH).clone()


def nonlinear_model(x, t, c_crossattn, transformer_options, c_concat=None):
    """A stand-in UNet whose output depends on every input, pixel by pixel and through its neighbours."""
    out = torch.tanh(x * t.reshape(-1, 1, 1, 1) / 10) + c_crossattn.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    out = out + torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    return out if c_concat is None else out + c_concat[:, :1]


@pytest.mark.parametrize("mode", MODES)
def test_tiles_cover_every_latent_pixel(mode):
    """Channels 0 and 1 carry each pixel's row and column; the crops the model sees hold every (row, col)."""
    x = coordinate_latent()
    seen = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)

    def recording_model(crops, t, **c):
        for crop in crops:
            seen[crop[0].long(), crop[1].long()] = True
        assert crops.shape[-2:] == (16, 16)  # full-size tiles everywhere, clamped at the borders
        return crops

    out = TiledUnetWrapper(settings(mode))(recording_model, params(x, sigma=6.0))
    assert bool(seen.all())
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_one_tile_covering_the_latent_is_the_model_itself_bit_for_bit(mode):
    x = latent()
    spatial = torch.randn(2, 5, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3))
    call = params(x, c_concat=spatial)
    expected = nonlinear_model(x, call["timestep"], **call["c"])
    wrapped = TiledUnetWrapper(settings(mode, tile=max(HEIGHT, WIDTH)))(nonlinear_model, call)
    assert torch.equal(wrapped, expected)


@pytest.mark.parametrize("mode", MODES)
def test_the_blend_of_a_constant_prediction_is_that_constant(mode):
    x = latent()
    out = TiledUnetWrapper(settings(mode))(lambda crops, t, **c: torch.full_like(crops, 3.25), params(x))
    torch.testing.assert_close(out, torch.full_like(x, 3.25), rtol=0, atol=1e-6)


def test_spatial_conditioning_is_cropped_with_its_tile_and_the_rest_repeats_per_tile():
    """c_concat (inpainting models) travels with its tile; text embeddings and cond_or_uncond repeat per tile."""
    x = latent()
    call = params(x, c_concat=x.clone())
    embeddings = call["c"]["c_crossattn"]

    def checking_model(crops, t, c_crossattn, transformer_options, c_concat):
        tiles = crops.shape[0] // 2
        assert torch.equal(c_concat, crops)
        assert torch.equal(c_crossattn, torch.cat([embeddings] * tiles)) and torch.equal(t, torch.full((2 * tiles,),
                                                                                                        14.6))
        assert transformer_options["cond_or_uncond"] == [0, 1] * tiles
        assert transformer_options["uuids"] == ["a", "b"] * tiles
        return crops

    TiledUnetWrapper(settings("mixture"))(checking_model, call)
    assert call["c"]["transformer_options"]["cond_or_uncond"] == [0, 1]  # ComfyUI's own dict is left as it was


def test_the_blend_does_not_depend_on_the_tile_batch_size():
    x = latent()
    outputs = [TiledUnetWrapper(settings("mixture", tile_batch_size=size))(nonlinear_model, params(x))
               for size in (1, 4, 64)]
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_shifted_grid_moves_with_the_step_read_from_sigma():
    """The call at the schedule's i-th σ uses step i's grid, and the grids of the steps differ."""
    wrapper = TiledUnetWrapper(settings("shifted"))
    x = coordinate_latent()
    grids = []
    for sigma in SAMPLE_SIGMAS[:-1].tolist():
        starts = set()

        def recording_model(crops, t, **c):
            starts.update((int(crop[0, 0, 0]), int(crop[1, 0, 0])) for crop in crops)
            return crops

        wrapper(recording_model, params(x, sigma=sigma))
        grids.append(starts)
    assert grids == [{(top, left) for top, left, _, _ in wrapper.plan(HEIGHT, WIDTH, step)[0]} for step in range(4)]
    assert len({frozenset(grid) for grid in grids}) > 1


def test_step_of_sigma_places_intermediate_sigmas_on_the_next_step():
    assert [step_of_sigma(sigma, SAMPLE_SIGMAS) for sigma in (14.6, 6.0, 4.0, 0.9, 0.5)] == [0, 1, 2, 3, 4]


def test_shifted_mode_without_the_schedule_raises():
    call = params(latent())
    del call["c"]["transformer_options"]["sample_sigmas"]
    with pytest.raises(ValueError, match="sample_sigmas"):
        TiledUnetWrapper(settings("shifted"))(nonlinear_model, call)


def test_controlnet_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="ControlNet"):
        TiledUnetWrapper(settings("mixture"))(nonlinear_model, params(latent(), control={"output": []}))


def test_the_patch_node_standalone_points_to_the_tiled_sampler():
    from nodes.highres.nodes import AtelierTiledDiffusion

    with pytest.raises(TypeError, match="AtelierTiledSample"):
        AtelierTiledDiffusion().patch(object(), "mixture", 512, 128, 256, 4, 0)
