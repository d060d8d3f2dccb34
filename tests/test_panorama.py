"""Panorama projection: geometry against an analytic rendering, the round trip, the ±180° seam, coverage, the
metrics, the nodes against the maths, and the example workflow."""

from __future__ import annotations

import math
import re
import os

import pytest
import torch
from PIL import Image

from fixtures_models import tiny_sd1  # noqa: F401  (session fixture)
from nodes.common.denoiser import DiffusersCodec
from nodes.models.refs import ModelRef
from nodes.models.loading import load_model
from nodes.panorama.fidelity import downsample, gd_project
from nodes.panorama.metrics import latitude_weights, ws_psnr, ws_ssim
from nodes.panorama.nodes import (AtelierERPToPlanes, AtelierGDProject, AtelierOmniSSR, AtelierPanoramaMetrics,
                                  AtelierPlaneLayout, AtelierPlanesToERP, AtelierSyntheticPanorama)
from nodes.panorama.projection import (OMNISSR_FOV_DEG, PlaneLayout, coverage, cube_layout, direction_texture,
                                       erp_to_planes, omnissr_layout, plane_directions, planes_to_erp,
                                       synthetic_panorama)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUND_TRIP_FREQUENCY = 24.0  # detail at which a 1024×2048 ERP is well sampled yet far from flat


def test_omnissr_fov_is_the_true_angle_of_its_75():
    assert OMNISSR_FOV_DEG == pytest.approx(66.41, abs=0.01)
    assert math.tan(math.radians(OMNISSR_FOV_DEG) / 2) == pytest.approx(math.radians(75) / 2)


def test_omnissr_layout_rows_match_the_official_code():
    layout = omnissr_layout(64)
    latitudes = [lat for _, lat in layout.centres]
    assert latitudes == [-67.5] * 3 + [-22.5] * 6 + [22.5] * 6 + [67.5] * 3
    assert [lon for lon, lat in layout.centres if lat == 67.5] == [-120.0, 0.0, 120.0]
    assert [lon for lon, lat in layout.centres if lat == 22.5] == [-150.0, -90.0, -30.0, 30.0, 90.0, 150.0]


@pytest.mark.parametrize("layout, covered, max_planes", [(omnissr_layout(64), 1.0, 4.0), (cube_layout(64), 1.0, 1.0)])
def test_coverage_of_the_presets(layout, covered, max_planes):
    report = coverage(layout, 128)
    assert report["covered"] == covered and report["max_planes"] == max_planes
    assert report["covered_area"] == pytest.approx(1.0)


def test_coverage_reports_gaps_of_a_narrow_layout():
    report = coverage(omnissr_layout(64, fov_deg=40.0), 128)
    assert report["covered"] < 0.9 and report["mean_planes"] >= 1.0


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_erp_to_planes_shapes_and_dtype(batch, mode):
    erp = torch.rand(batch, 2, 16, 32, dtype=torch.float64)
    planes = erp_to_planes(erp, omnissr_layout(8), mode)
    assert planes.shape == (batch, 18, 2, 8, 8) and planes.dtype == torch.float64
    assert planes_to_erp(planes, omnissr_layout(8), 16, mode).shape == (batch, 2, 16, 32)


@pytest.mark.parametrize("mode, min_db", [("bilinear", 58.0), ("bicubic", 54.0)])
def test_planes_agree_with_an_analytic_rendering(mode, min_db):
    layout = omnissr_layout(128)
    erp = synthetic_panorama(256, ROUND_TRIP_FREQUENCY)
    truth = direction_texture(plane_directions(layout), ROUND_TRIP_FREQUENCY).transpose(0, 1)[None].float()
    planes = erp_to_planes(erp, layout, mode)
    psnr = 10 * torch.log10(1 / ((planes - truth) ** 2).mean())
    assert psnr > min_db


def test_a_plane_looks_where_its_centre_says():
    # a cube face looking east at the equator sees longitude +90°: the ERP's column 3/4 of the way across
    erp = torch.zeros(1, 1, 32, 64)
    erp[..., 14:18, 46:50] = 1.0
    east = erp_to_planes(erp, PlaneLayout(((90.0, 0.0),), 90.0, 16))[0, 0, 0]
    assert east[7:9, 7:9].min() > 0.9 and east[:4].max() == 0 and east[:, :4].max() == 0


@pytest.mark.parametrize("mode, min_db", [("bilinear", 70.0), ("bicubic", 75.0)])
def test_round_trip_at_1024x2048_keeps_the_panorama(mode, min_db):
    layout = omnissr_layout(512)
    assert coverage(layout, 1024)["covered"] == 1.0
    erp = synthetic_panorama(1024, ROUND_TRIP_FREQUENCY)
    back = planes_to_erp(erp_to_planes(erp, layout, mode), layout, 1024, mode)
    assert ws_psnr(back, erp).item() >= min_db


def test_merge_weights_sum_to_one():
    layout = omnissr_layout(32)
    ones = torch.ones(2, 18, 3, 32, 32)
    assert torch.allclose(planes_to_erp(ones, layout, 64), torch.ones(2, 3, 64, 128), atol=1e-5)


@pytest.mark.parametrize("layout, height", [(omnissr_layout(24), 100), (cube_layout(20, 100.0), 36),
                                            (PlaneLayout(((17.3, 89.0), (-179.9, -90.0), (33.0, 12.5)), 75.0, 16), 41)])
def test_fast_setup_equals_the_per_pixel_computation(layout, height):
    """The e2p grid (trigonometry once per latitude, then shifted) and the merge tables (row segments ruled out as a
    whole, width 2H not a multiple of the segment) equal the plain computation: every plane's rays, every plane
    tested against every ERP pixel."""
    from nodes.panorama.projection import _PAD, MERGE_SIGMA, _e2p_grid, _merge_tables, _rotations

    width, size, padded, cpu = 2 * height, layout.size, layout.size + 2 * _PAD, torch.device("cpu")
    rays = plane_directions(layout)
    column = torch.remainder(torch.atan2(rays[..., 0], rays[..., 2]) / (2 * math.pi) * width + height, width) - 0.5
    row = (0.5 - torch.asin(rays[..., 1].clamp(-1, 1)) / math.pi) * height - 0.5
    grid = torch.stack([(column + _PAD + 0.5) / (width + 2 * _PAD), (row + _PAD + 0.5) / (height + 2 * _PAD)], -1)
    assert torch.allclose(_e2p_grid(layout, height, cpu, torch.float32)[0],
                          (grid * 2 - 1).reshape(-1, size, 2).float(), rtol=0, atol=1e-6)

    lon = (torch.arange(width, dtype=torch.float64) + 0.5) / width * 2 * math.pi - math.pi
    lat = math.pi / 2 - (torch.arange(height, dtype=torch.float64) + 0.5) / height * math.pi
    lat, lon = lat[:, None], lon[None, :]
    erp_rays = torch.stack(torch.broadcast_tensors(lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()), -1)
    half, centre = math.tan(math.radians(layout.fov_deg) / 2), (size - 1) / 2
    indices, grids, windows = [], [], []
    for plane, rotation in enumerate(_rotations(layout)):
        local = erp_rays.reshape(-1, 3) @ rotation
        x, y = local[:, 0] / local[:, 2], local[:, 1] / local[:, 2]
        inside = ((local[:, 2] > 0) & (x.abs() <= half) & (y.abs() <= half)).nonzero().squeeze(1)
        column = (x[inside] / half + 1) / 2 * size - 0.5
        row = (1 - y[inside] / half) / 2 * size - 0.5
        indices.append(inside)
        windows.append(torch.exp(-((column - centre) ** 2 + (row - centre) ** 2) / (2 * (MERGE_SIGMA * size) ** 2)))
        grids.append(torch.stack([(column + _PAD + 0.5) / padded, (row + _PAD + plane * padded + 0.5)
                                  / (padded * layout.count)], -1) * 2 - 1)
    index, window = torch.cat(indices), torch.cat(windows)
    total = torch.zeros(height * width, dtype=torch.float64).index_add_(0, index, window)
    tables = _merge_tables(layout, height, cpu, torch.float32)
    assert torch.equal(tables.index, index)
    assert torch.allclose(tables.grid[0, 0], torch.cat(grids).float(), rtol=0, atol=1e-6)
    assert torch.allclose(tables.weight, (window / total[index]).float(), rtol=0, atol=1e-6)


def test_gradients_flow_through_both_directions():
    layout = cube_layout(8, 100.0)
    erp = torch.rand(1, 1, 8, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: planes_to_erp(erp_to_planes(x, layout), layout, 8), (erp,))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_no_seam_at_the_180_meridian(mode):
    height = 512
    lon = (torch.arange(2 * height) + 0.5) / (2 * height) * 2 * math.pi - math.pi
    erp = torch.sin(16 * lon).expand(1, 1, height, -1).contiguous()

    def second_difference(centre_lon: float) -> float:
        row = erp_to_planes(erp, PlaneLayout(((centre_lon, 0.0),), 60.0, 256), mode)[0, 0, 0, 128]
        return (row[2:] - 2 * row[1:-1] + row[:-2]).abs().max().item()

    assert second_difference(-180.0) <= 1.5 * second_difference(0.0)


def test_ws_psnr_weights_rows_by_area():
    reference = torch.zeros(1, 1, 8, 16, dtype=torch.float64)
    polar, equatorial = reference.clone(), reference.clone()
    polar[..., 0, :] = 0.1
    equatorial[..., 4, :] = 0.1
    assert ws_psnr(polar, reference) > ws_psnr(equatorial, reference)
    expected = 10 * math.log10(1 / (0.01 * latitude_weights(8)[4].item() / latitude_weights(8).sum().item()))
    assert ws_psnr(equatorial, reference).item() == pytest.approx(expected)


def test_ws_ssim_is_one_for_equal_images_and_lower_for_noise():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 64, generator=generator, dtype=torch.float64)
    noisy = (image + 0.1 * torch.randn(image.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    assert torch.allclose(ws_ssim(image, image), torch.ones(2, dtype=torch.float64))
    assert (ws_ssim(noisy, image) < 0.95).all()


@pytest.mark.parametrize("call, message", [
    (lambda: erp_to_planes(torch.rand(1, 3, 16, 16), cube_layout(8)), "(B, C, H, 2H)"),
    (lambda: erp_to_planes(torch.rand(1, 3, 16, 32), cube_layout(8), "nearest"), "'nearest'"),
    (lambda: planes_to_erp(torch.rand(1, 5, 3, 8, 8), cube_layout(8), 16), "(B, 6, C, 8, 8)"),
    (lambda: PlaneLayout(((0.0, 0.0),), 180.0, 8), "fov_deg"),
    (lambda: PlaneLayout(((200.0, 0.0),), 90.0, 8), "(200.0, 0.0)"),
    (lambda: ws_psnr(torch.rand(1, 3, 8, 16), torch.rand(1, 3, 8, 8)), "same shape"),
    (lambda: AtelierPanoramaMetrics().measure(torch.rand(1, 8, 16, 3), torch.rand(1, 8, 8, 3)), "reference"),
    (lambda: AtelierPlanesToERP().merge(torch.rand(5, 8, 8, 3), cube_layout(8), 16, "bilinear"), "planes"),
    (lambda: AtelierGDProject().project(torch.rand(1, 8, 12, 3), torch.rand(1, 4, 4, 3), 1.0), "(8, 12) and (4, 4)"),
    (lambda: gd_project(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 4, 4), 2, 1.5), "strength"),
])
def test_bad_input_is_refused_with_a_message_naming_it(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_nodes_equal_the_maths():
    panorama, = AtelierSyntheticPanorama().make(32, 6.0)
    assert torch.equal(panorama, synthetic_panorama(32, 6.0).permute(0, 2, 3, 1))
    layout, report = AtelierPlaneLayout().layout("omnissr_18", 16, 66.41, 32)
    assert layout == omnissr_layout(16, 66.41) and "100.00% of the pixels" in report
    batch = torch.cat([panorama, 1 - panorama])
    planes, = AtelierERPToPlanes().project(batch, layout, "bicubic")
    expected = erp_to_planes(batch.permute(0, 3, 1, 2), layout, "bicubic")
    assert planes.shape == (36, 16, 16, 3)
    assert torch.equal(planes[18 + 4], expected[1, 4].permute(1, 2, 0))
    back, = AtelierPlanesToERP().merge(planes, layout, 32, "bicubic")
    assert torch.equal(back, planes_to_erp(expected, layout, 32, "bicubic").permute(0, 2, 3, 1))
    measured = AtelierPanoramaMetrics().measure(back, batch)
    psnr, ssim, text = measured["result"]
    assert measured["ui"]["text"] == [text]
    assert psnr == pytest.approx(ws_psnr(back.permute(0, 3, 1, 2).double(), batch.permute(0, 3, 1, 2).double())
                                 .mean().item())
    assert 0.9 < ssim <= 1.0 and text.count("WS-PSNR") == 2


def test_panorama_tangent_workflow_runs_without_weights(tmp_path, capsys):
    from web.cli import main

    workflow = os.path.join(ROOT, "workflows", "panorama_tangent.json")
    code = main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")])
    assert code == 0
    lines = [line.removeprefix("output: ") for line in capsys.readouterr().out.splitlines()
             if line.startswith("output: ")]
    sizes = sorted(Image.open(path).size for path in lines)
    assert sizes == [(128, 128)] * 18 + [(512, 256)] * 2


@pytest.mark.parametrize("scale", [2, 4])
def test_gd_projection_is_exact_on_its_subspace(scale):
    generator = torch.Generator().manual_seed(scale)
    low_res = downsample(torch.rand(2, 3, 16 * scale, 32 * scale, generator=generator, dtype=torch.float64), scale)
    estimate = torch.rand(2, 3, 16 * scale, 32 * scale, generator=generator, dtype=torch.float64)
    projected = gd_project(estimate, low_res, scale)
    residual = (downsample(projected, scale) - low_res).norm() / low_res.norm()
    assert residual < 1e-4
    assert (downsample(estimate, scale) - low_res).norm() / low_res.norm() > 0.1  # it had work to do
    # the null-space part of the estimate is kept: projecting twice changes nothing
    assert torch.allclose(gd_project(projected, low_res, scale), projected, atol=1e-9)


def test_gd_strength_zero_returns_the_estimate_and_bicubic_keeps_constants():
    estimate = torch.rand(1, 1, 16, 32, dtype=torch.float64)
    assert torch.equal(gd_project(estimate, torch.zeros(1, 1, 8, 16, dtype=torch.float64), 2, 0.0), estimate)
    assert torch.allclose(downsample(torch.full((1, 1, 16, 32), 0.3, dtype=torch.float64), 2),
                          torch.full((1, 1, 8, 16), 0.3, dtype=torch.float64))


def test_gd_node_equals_the_maths():
    image, low_res = torch.rand(1, 16, 32, 3), torch.rand(1, 4, 8, 3)
    projected, = AtelierGDProject().project(image, low_res, 0.5)
    expected = gd_project(image.permute(0, 3, 1, 2).double(), low_res.permute(0, 3, 1, 2).double(), 4, 0.5)
    assert torch.allclose(projected, expected.permute(0, 2, 3, 1).float())


def test_omnissr_runs_end_to_end_on_a_tiny_model_and_keeps_the_low_res_input(tiny_sd1):  # noqa: F811
    from nodes.models.clip import Clip

    model = ModelRef(load_model(tiny_sd1.folder))
    codec = DiffusersCodec(model.model.vae)
    conditioning = Clip(model).encode("a room")
    low_res = synthetic_panorama(8, 3.0)
    layout = cube_layout(16, 100.0)
    run = AtelierOmniSSR().super_resolve
    out, = run(model, codec, conditioning, conditioning, low_res.permute(0, 2, 3, 1), layout, 2, 3, 1.0, 1.0, 1,
               0.5, 1.0, 7)
    assert out.shape == (1, 16, 32, 3) and torch.isfinite(out).all()
    residual = (downsample(out.permute(0, 3, 1, 2).double(), 2) - low_res.double()).norm() / low_res.norm()
    assert residual < 1e-2  # the final GD makes bicubic ↓2 of the result the input, up to the clamp to 0..1
    again, = run(model, codec, conditioning, conditioning, low_res.permute(0, 2, 3, 1), layout, 2, 3, 1.0, 1.0, 1,
                 0.5, 1.0, 7)
    assert torch.equal(out, again)


def test_panorama_superres_workflow_runs_on_the_shipped_model(tmp_path, capsys):
    from web.cli import main

    workflow = os.path.join(ROOT, "workflows", "panorama_superres.json")
    code = main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")])
    assert code == 0
    lines = [line.removeprefix("output: ") for line in capsys.readouterr().out.splitlines()
             if line.startswith("output: ")]
    assert sorted(Image.open(path).size for path in lines) == [(64, 32), (128, 64)]


def test_omnissr_keeps_every_tensor_on_the_models_device():
    """The meta device stands in for CUDA: the low-res input and the seeded noise must meet the latents there (a CPU
    tensor mixed in raises), and the panorama comes back on the model's device."""
    import torch.nn.functional as F

    from nodes.common.denoiser import Conditioning, NoiseSchedule
    from nodes.panorama.omnissr import omnissr_super_resolve

    device = meta = torch.device("meta")

    class Codec:
        latent_channels, downscale, scaling_factor, shift_factor = 4, 8, 0.18215, 0.0
        device = meta  # where it computes, which OmniSSR reads

        def encode(self, image):
            assert image.device == device
            return F.avg_pool2d(image, 8).repeat(1, 2, 1, 1)[:, :4]

        def decode(self, latent):
            assert latent.device == device
            return F.interpolate(latent[:, :3], scale_factor=8).clamp(0, 1)

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2

    class Denoiser:
        schedule = NoiseSchedule(torch.cumprod(1 - betas, 0), "epsilon")

        def __call__(self, x, t, conditioning):
            assert x.device == conditioning.embeds.device == device
            return torch.zeros_like(x)

    prompt = Conditioning(torch.zeros(1, 77, 8, device=device))
    out = omnissr_super_resolve(Denoiser(), Codec(), torch.rand(1, 3, 8, 16), 2, cube_layout(16, 90.0), prompt,
                                prompt, 1.0, 2, 1.0, 1, 0.5, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 16, 32) and out.device == device
