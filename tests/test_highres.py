"""Tiled diffusion (MultiDiffusion, Mixture of Diffusers, shifted tiles), LinFusion and the 16K generator."""

from __future__ import annotations

import json
import os
import random
import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from fixtures_models import tiny_sd1  # noqa: F401  (session fixture)
from nodes.common.denoiser import Conditioning, DiffusersDenoiser, NoiseSchedule
from nodes.common.paths import PathOutsideFolderError
from nodes.sampling.generate import generate
from nodes.highres.linfusion import (GeneralizedLinearAttention, build_linfusion, linear_attention, linfusion_config,
                                     load_linfusion, mounted, staged_recipe)
from nodes.highres.tiling import (MODES, TiledDenoiser, TileSettings, blend_weights, plan_tiles, shifted_offset,
                                  shifted_starts, tile_calls_per_step)
from nodes.models.loading import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "nodes", "models", "configs")


def weight_sum(tiles, weights, height, width):
    total = torch.zeros(height, width, dtype=torch.float64)
    for (top, left, h, w), weight in zip(tiles, weights):
        total[top:top + h, left:left + w] += weight.double()
    return total


# --- tiled diffusion -----------------------------------------------------------------------------------------

def test_blend_weights_are_a_partition_of_unity_for_random_sizes_tiles_and_shifts():
    rng = random.Random(0)
    for _ in range(40):
        height, width, tile = rng.randint(1, 150), rng.randint(1, 150), rng.randint(4, 64)
        mode = rng.choice(MODES)
        overlap = rng.randint(0, tile - 1)
        offset = (rng.randint(0, tile - 1), rng.randint(0, tile - 1))
        tiles = plan_tiles(height, width, tile, overlap, mode, offset)
        total = weight_sum(tiles, blend_weights(tiles, height, width, mode), height, width)
        assert float((total - 1).abs().max()) < 1e-6, (height, width, tile, overlap, mode, offset)


def test_shifted_tiles_cover_everything_without_gaps_and_only_clamped_tiles_overlap():
    rng = random.Random(1)
    for _ in range(200):
        size, tile = rng.randint(1, 300), rng.randint(1, 64)
        offset = rng.randint(0, tile - 1)
        starts = shifted_starts(size, tile, offset)
        length = min(tile, size)
        covered = torch.zeros(size, dtype=torch.int64)
        for start in starts:
            covered[start:start + length] += 1
        assert bool((covered >= 1).all()), (size, tile, offset)
        inner = [s for s in starts if s not in (0, size - length)]
        assert all(b - a == tile for a, b in zip(inner, inner[1:]))  # the grid itself does not overlap


def test_shifted_offsets_visit_every_offset_once_per_cycle_and_follow_the_seed():
    cycle = [shifted_offset(step, 64, 16, seed=3) for step in range(32)]
    assert sorted(cycle[:16]) == sorted(cycle[16:]) == [(y, x) for y in range(0, 64, 16) for x in range(0, 64, 16)]
    assert cycle[:16] != cycle[16:]  # each cycle reshuffled
    assert cycle == [shifted_offset(step, 64, 16, seed=3) for step in range(32)]
    assert cycle != [shifted_offset(step, 64, 16, seed=4) for step in range(32)]


def test_shifted_mode_needs_at_least_1_5x_fewer_tile_calls_than_multidiffusion_at_quarter_overlap():
    multi = tile_calls_per_step(1024, 1024, TileSettings("multidiffusion", tile=64, overlap=16), 8)
    shifted = tile_calls_per_step(1024, 1024, TileSettings("shifted", tile=64, overlap=0), 8)
    assert multi / shifted >= 1.5


class CoordinateStub:
    """A per-sample denoiser whose output depends only on each sample's own input (no batch interaction)."""

    schedule = NoiseSchedule(torch.linspace(0.9999, 0.01, 1000, dtype=torch.float64), "epsilon")

    def __call__(self, x, t, conditioning):
        return torch.sin(x * 3) + x * conditioning.embeds.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("mode", MODES)
def test_tiled_output_does_not_depend_on_the_tile_batch_size(mode):
    x = torch.randn(2, 4, 37, 50, generator=torch.Generator().manual_seed(0))
    conditioning = Conditioning(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)))
    outputs = []
    for batch in (1, 3, 64):
        tiled = TiledDenoiser(CoordinateStub(), TileSettings(mode, tile=16, overlap=4, tile_batch_size=batch,
                                                             offset_stride=8))
        outputs.append([tiled(x, torch.full((2,), 500.0), conditioning) for _ in range(3)])
    for other in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs[0], other))


def checkerboard_stub(tiled: TiledDenoiser, height: int, width: int):
    """A denoiser returning 0 or 1 per tile, alternating between neighbours (each tile's grid row + column, mod 2);
    it finds its tile from the coordinates the latent holds in channels 0 (row) and 1 (column)."""

    class Stub:
        schedule = CoordinateStub.schedule
        step = 0

        def __call__(self, x, t, conditioning):
            tiles, _ = tiled.plan(height, width, self.step)
            rows, columns = sorted({top for top, _, _, _ in tiles}), sorted({left for _, left, _, _ in tiles})
            parity = [(rows.index(int(crop[0, 0, 0])) + columns.index(int(crop[1, 0, 0]))) % 2 for crop in x]
            return torch.tensor(parity, dtype=x.dtype).reshape(-1, 1, 1, 1).expand_as(x).clone()

    return Stub()


def border_and_interior_gradient(image: torch.Tensor, tiles) -> tuple[float, float]:
    """The largest gradient across a tile border, and the largest elsewhere, on a (H, W) image."""
    height, width = image.shape
    ratios = []
    for axis, size in ((0, height), (1, width)):
        gradient = image.diff(dim=axis).abs()  # index p: between pixel p and p + 1
        borders = {edge - 1 for tile in tiles for edge in (tile[axis], tile[axis] + tile[axis + 2])
                   if 0 < edge < size}
        on_border = torch.zeros(size - 1, dtype=torch.bool)
        on_border[sorted(borders)] = True
        shape = (-1, 1) if axis == 0 else (1, -1)
        mask = on_border.reshape(shape).expand_as(gradient)
        ratios.append((float(gradient[mask].max()), float(gradient[~mask].max())))
    return max(border for border, _ in ratios), max(interior for _, interior in ratios)


def stub_blend(mode: str, steps: int, height: int = 96, width: int = 128):
    settings = TileSettings(mode, tile=32, overlap=8, offset_stride=16, seed=2)
    tiled = TiledDenoiser(CoordinateStub(), settings)
    tiled.denoiser = stub = checkerboard_stub(tiled, height, width)
    rows = torch.arange(height, dtype=torch.float32).reshape(-1, 1).expand(height, width)
    columns = torch.arange(width, dtype=torch.float32).reshape(1, -1).expand(height, width)
    x = torch.stack([rows, columns, rows, columns])[None]
    outputs = []
    for step in range(steps):
        stub.step = step
        outputs.append(tiled(x, torch.full((1,), 500.0), Conditioning(torch.zeros(1, 1, 1)))[0, 0])
    base_tiles = plan_tiles(height, width, settings.tile, settings.overlap, mode, (0, 0))
    return torch.stack(outputs).mean(0), base_tiles


def test_mixture_of_diffusers_leaves_no_step_at_tile_borders():
    border, interior = border_and_interior_gradient(*stub_blend("mixture", 1))
    assert border <= 1.1 * interior


def test_shifted_tiles_leave_no_step_at_tile_borders_over_an_offset_cycle():
    border, interior = border_and_interior_gradient(*stub_blend("shifted", 4))  # (32 / 16)² offsets: one cycle
    assert border <= 1.1 * interior


def test_uniform_multidiffusion_averaging_does_step_at_tile_borders():
    border, interior = border_and_interior_gradient(*stub_blend("multidiffusion", 1))
    assert border > 1.1 * interior  # the measure above can fail: here it must


@pytest.fixture(scope="module")
def sd1(tiny_sd1):  # noqa: F811
    model = load_model(tiny_sd1.folder)
    return model, DiffusersDenoiser(model.unet, model.schedule)


def sample(denoiser, model, latent, **options):
    from nodes.common.denoiser import DiffusersCodec

    positive = Conditioning(torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5)))
    negative = Conditioning(torch.zeros(1, 77, 32))
    return generate(denoiser, DiffusersCodec(model.vae), "sd1", positive, negative, latent, seed=7, steps=3,
                    cfg=4.0, sampler="euler", scheduler="normal", **options)


@pytest.mark.parametrize("mode", MODES)
def test_one_tile_equals_the_untiled_sampler(sd1, mode):
    model, denoiser = sd1
    latent = torch.zeros(1, 4, 12, 16)
    tiled = TiledDenoiser(denoiser, TileSettings(mode, tile=16, overlap=4, offset_stride=8))
    assert torch.equal(sample(tiled, model, latent), sample(denoiser, model, latent))


def test_tiled_sampling_with_the_unet_barely_depends_on_the_batch_size(sd1):
    # The blending is batch-exact (test above); the UNet's CPU kernels themselves differ by ~1e-6 between batch
    # sizes, which is all that is left here.
    model, denoiser = sd1
    latent = torch.zeros(1, 4, 12, 16)
    results = [sample(TiledDenoiser(denoiser, TileSettings("shifted", tile=8, overlap=2, tile_batch_size=batch,
                                                            offset_stride=4)), model, latent)
               for batch in (1, 3)]
    assert float((results[0] - results[1]).norm() / results[0].norm()) < 1e-4


# --- LinFusion -----------------------------------------------------------------------------------------------

def naive_linfusion(q, k, v):
    """out_i = Σ_j (φq_i·φk_j) v_j / N / (Σ_j φq_i·φk_j / N + 1e-4), with the N×N score matrix, in float64."""
    phi = lambda z: torch.nn.functional.elu(z.double()) + 1  # noqa: E731
    scores = phi(q) @ phi(k).transpose(-2, -1) / k.shape[-2]
    return (scores @ v.double()) / (scores.sum(-1, keepdim=True) + 1e-4)


def test_linear_attention_equals_the_naive_reference():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 16, generator=generator) for _ in range(3))
    assert float((linear_attention(q, k, v).double() - naive_linfusion(q, k, v)).abs().max()) < 1e-5


def test_linfusion_module_equals_the_naive_reference_through_its_projections():
    torch.manual_seed(0)
    module = GeneralizedLinearAttention(32, 4, 32).eval()
    x = torch.randn(2, 200, 32)
    with torch.no_grad():
        q = module.to_q(x + module.to_q_(x))
        k = module.to_k(x + module.to_k_(x))
        split = lambda t: t.reshape(2, 200, 4, 8).transpose(1, 2)  # noqa: E731
        reference = naive_linfusion(split(q), split(k), split(module.to_v(x))).transpose(1, 2).reshape(2, 200, 32)
        reference = module.to_out[0](reference.float())
        assert float((module(x) - reference).abs().max()) < 1e-5


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensors that ops allocate inside the block, live at once (freed when collected)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.counts = 0, 0, {}

    def release(self, pointer: int, size: int) -> None:
        self.counts[pointer] -= 1
        if not self.counts[pointer]:
            del self.counts[pointer]
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                pointer, size = storage.data_ptr(), storage.nbytes()
                if pointer not in self.counts:
                    self.counts[pointer] = 0
                    self.live += size
                    self.peak = max(self.peak, self.live)
                self.counts[pointer] += 1
                weakref.finalize(tensor, self.release, pointer, size)
        return out


def test_linfusion_memory_grows_linearly_with_tokens():
    torch.manual_seed(0)
    module = GeneralizedLinearAttention(16, 2, 16).eval()
    peaks = []
    for tokens in (4096, 16384, 65536):
        x = torch.randn(1, tokens, 16)
        with torch.no_grad(), PeakBytes() as meter:
            module(x)
        peaks.append(meter.peak)
    ratios = [b / a for a, b in zip(peaks, peaks[1:])]
    assert all(3.5 < ratio < 4.5 for ratio in ratios), ratios  # softmax attention: ≈ 16× per 4× tokens


@pytest.mark.parametrize("family, folder, expected", [("sd1", "sd15", 99_235_520), ("sd2", "sd21", 99_235_520),
                                                      ("sdxl", "sdxl", 435_480_800)])
def test_linfusion_parameter_counts_match_the_published_models(family, folder, expected):
    from diffusers import UNet2DConditionModel

    with open(os.path.join(CONFIGS, folder, "unet", "config.json")) as file:
        config = json.load(file)
    with torch.device("meta"):  # full-size layers, no memory
        unet = UNet2DConditionModel.from_config(config)
        layers = build_linfusion(linfusion_config(unet, family))
    assert sum(parameter.numel() for parameter in layers.parameters()) == expected


def test_linfusion_loads_published_key_names_and_mounts_reversibly(sd1, tmp_path):
    model, _ = sd1
    config = linfusion_config(model.unet, "sd1")
    torch.manual_seed(3)
    published = {key: value.contiguous() for key, value in build_linfusion(config).state_dict().items()}
    assert "0.to_q_.3.weight" in published and f"{len(config) - 1}.to_out.0.bias" in published
    path = str(tmp_path / "linfusion.safetensors")
    save_file(published, path)
    layers = load_linfusion(path, model.unet, "sd1")
    assert all(torch.equal(layers.state_dict()[key], value) for key, value in published.items())

    x, t = torch.randn(1, 4, 8, 8), torch.full((1,), 500.0)
    embeds = torch.randn(1, 77, 32)
    with torch.no_grad():
        before = model.unet(x, t, encoder_hidden_states=embeds).sample
        with mounted(model.unet, layers, config):
            during = model.unet(x, t, encoder_hidden_states=embeds).sample
        after = model.unet(x, t, encoder_hidden_states=embeds).sample
    assert torch.equal(before, after) and not torch.allclose(before, during)


def test_linfusion_file_for_another_unet_is_refused(sd1, tmp_path):
    model, _ = sd1
    published = build_linfusion(linfusion_config(model.unet, "sd1")).state_dict()
    path = str(tmp_path / "short.safetensors")
    save_file({key: value for key, value in published.items() if not key.startswith("0.")}, path)
    with pytest.raises(ValueError, match=r"not a LinFusion file for this sd1 UNet .*: \d+ tensors missing "
                                         r"\(e\.g\. '0\."):
        load_linfusion(path, model.unet, "sd1")


def test_staged_recipe_follows_the_published_strengths_and_counts():
    sd1 = staged_recipe("sd1", 16384, 8192)
    assert [s.strength for s in sd1[1:]] == [0.4, 0.3, 0.2, 0.1]
    assert [s.steps for s in sd1] == [50, 20, 15, 10, 5]
    sdxl = staged_recipe("sdxl", 16384, 8192, recipe="highres")
    assert [s.strength for s in sdxl[1:]] == [0.32, 0.24, 0.16, 0.08]
    assert sum(s.unet_passes for s in sdxl[1:]) == 80 and sdxl[0].unet_passes == 50  # highres.md Target 5
    assert sdxl[-1].tokens == 2048 * 1024 and [s.width for s in sdxl] == [1024, 2048, 4096, 8192, 16384]
    assert len(staged_recipe("sd1", 1024, 512)) == 1  # already at the base size: text-to-image only


def test_staged_recipe_refuses_sizes_that_do_not_halve_to_the_latent_grid():
    with pytest.raises(ValueError, match="halve"):
        staged_recipe("sd1", 4100, 2048)


# --- nodes and workflow --------------------------------------------------------------------------------------

def test_tiled_sampler_node_equals_the_maths_and_reports_tile_calls(sd1):
    from nodes.highres.nodes import AtelierTiledSample
    from nodes.models.refs import ModelRef
    from nodes.sampling.guidance import from_conditioning

    model, denoiser = sd1
    positive = Conditioning(torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5)))
    negative = Conditioning(torch.zeros(1, 77, 32))
    latent, report = AtelierTiledSample().sample(
        ModelRef(model), from_conditioning(positive), from_conditioning(negative), {"samples": torch.zeros(1, 4, 16, 24)},
        seed=7, steps=3, cfg=4.0,
        sampler_name="euler", scheduler="normal", denoise=1.0, mode="shifted", tile_size=64, overlap=0,
        offset_stride=32, tile_batch_size=4)
    tiled = TiledDenoiser(denoiser, TileSettings("shifted", tile=8, overlap=0, tile_batch_size=4, offset_stride=4,
                                                 seed=7))
    expected = sample(tiled, model, torch.zeros(1, 4, 16, 24))
    assert torch.equal(latent["samples"], expected)
    assert report == f"shifted: {sum(tiled.tiles_per_call) / 3:g} tiles per step over 3 steps"


@pytest.mark.parametrize("inputs, message", [({"tile_size": 64, "overlap": 64, "offset_stride": 32}, "overlap must be"),
                                             ({"tile_size": 64, "overlap": 8, "offset_stride": 128}, "offset_stride"),
                                             ({"tile_size": 32, "overlap": 8, "offset_stride": 8}, "tile_size must")])
def test_tiling_widgets_are_checked_before_anything_runs(inputs, message):
    from nodes.highres.nodes import AtelierTiled16KGenerator, AtelierTiledSample

    for node in (AtelierTiledSample, AtelierTiled16KGenerator):
        assert message in node.VALIDATE_INPUTS(**inputs)


def test_staged_generation_refuses_a_stage_with_no_step():
    from nodes.highres.generate import plan_stages

    with pytest.raises(ValueError, match="steps=2"):
        plan_stages("sd1", 512, 512, "staged", 2, 64, 8)


def test_tiled_16k_workflow_runs_headless_on_the_shipped_model(tmp_path, capsys):
    from PIL import Image

    from web.cli import main

    code = main(["run", os.path.join(ROOT, "workflows", "tiled_16k.json"), "--models-dir", str(tmp_path / "models"),
                 "--data-dir", str(tmp_path / "data"), "--set", "Tiled 16K Generator.width=128",
                 "--set", "Tiled 16K Generator.height=64", "--set", "Tiled 16K Generator.steps=3"])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("output: ")]
    assert [Image.open(line.removeprefix("output: ")).size for line in lines] == [(128, 64)]


def test_linfusion_node_loads_from_the_models_folder_and_the_sampler_runs_with_it(sd1, tmp_path):
    from nodes.highres.nodes import AtelierLoadLinFusion, AtelierTiledSample
    from nodes.models.refs import ModelRef

    model, _ = sd1
    (tmp_path / "linfusion").mkdir()
    torch.manual_seed(4)
    save_file({key: value.contiguous() for key, value in
               build_linfusion(linfusion_config(model.unet, "sd1")).state_dict().items()},
              str(tmp_path / "linfusion" / "lf15.safetensors"))
    node = type("Bound", (AtelierLoadLinFusion,), {"models_dir": str(tmp_path)})
    assert node.INPUT_TYPES()["required"]["linfusion_name"][0] == ["lf15.safetensors"]
    (linfusion,) = node().load(ModelRef(model), "lf15.safetensors")
    inputs = dict(positive=[[torch.randn(1, 77, 32), {}]], negative=[[torch.zeros(1, 77, 32), {}]],
                  latent_image={"samples": torch.zeros(1, 4, 8, 8)}, seed=1, steps=2, cfg=2.0, sampler_name="euler",
                  scheduler="normal", denoise=1.0, mode="mixture", tile_size=64, overlap=0, offset_stride=32,
                  tile_batch_size=1)
    plain, _ = AtelierTiledSample().sample(ModelRef(model), **inputs)
    linear, _ = AtelierTiledSample().sample(ModelRef(model), **inputs, linfusion=linfusion)
    again, _ = AtelierTiledSample().sample(ModelRef(model), **inputs)
    assert not torch.allclose(plain["samples"], linear["samples"]) and torch.equal(plain["samples"], again["samples"])
    with pytest.raises(PathOutsideFolderError):
        node().load(ModelRef(model), "../escape.safetensors")


def test_with_linfusion_the_base_stage_runs_whole_and_the_refining_stages_tiled(sd1):
    """LinFusion's point: the text-to-image stage sees the whole latent in one call per step (no repeated subject)."""
    from nodes.common.denoiser import DiffusersCodec
    from nodes.highres.generate import generate_large, plan_stages

    model, denoiser = sd1
    seen = []

    def recording(x, t, conditioning):
        seen.append(tuple(x.shape[-2:]))
        return denoiser(x, t, conditioning)

    recording.schedule = denoiser.schedule
    stages = plan_stages("sd1", 256, 256, "staged", 4, 128, 8)
    settings = TileSettings("mixture", tile=8, overlap=0, tile_batch_size=1, offset_stride=4, seed=0)
    prompt = Conditioning(torch.zeros(1, 77, 32))
    _, reports = generate_large(recording, DiffusersCodec(model.vae), "sd1", prompt, prompt, stages, 0, 4, 1.0,
                                "euler", "normal", settings, untiled_base=True)
    assert reports[0].tiles_per_step == 1 and reports[1].tiles_per_step == 16  # 32×32 latent in 8×8 tiles
    assert seen[:stages[0].steps] == [(16, 16)] * stages[0].steps and set(seen[stages[0].steps:]) == {(8, 8)}
    _, tiled_reports = generate_large(recording, DiffusersCodec(model.vae), "sd1", prompt, prompt, stages, 0, 4, 1.0,
                                      "euler", "normal", settings)
    assert tiled_reports[0].tiles_per_step == 4
