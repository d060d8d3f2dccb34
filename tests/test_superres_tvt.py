"""TVT (issue 26): the 4× VAE built as the official VAED4 is; model_TVT's weights merged into TVTUNet equal the
authors' PEFT-wrapped UNet; the Gaussian-blended latent tiles, the colour fix and the input's sizes as the official
code has them; the nodes on a tiny SD2 CLIP; the example workflow."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_models import tiny_sd2  # noqa: F401  (session fixture)
from nodes.models.clip import Clip
from nodes.models.formats import UnsafeModelFormatError
from nodes.models.loading import load_model
from nodes.models.refs import ModelRef
from nodes.superres.nodes import AtelierLoadTVT, AtelierTVTUpscale
from nodes.superres.tvt import (adain_colour_fix, build_vaed4, gaussian_tile_weights, load_tvt_unet, load_vaed4,
                                tile_offsets, tiled_eps, upscaled_input)
from nodes.superres import tvt as tvt_module
from tiny_models import NARROW_VAED4, write_tvt_files

# Source: TVT/VAED4/config2.json built as vae.py builds it (diffusers' AutoencoderKL at 128, 256, 256 channels, the
# middle blocks removed): 15,162,343 parameters. TVTUNet's count follows its config.json, which was not at hand.
VAED4_PARAMETERS = 15_162_343


def test_the_full_size_vae_has_the_official_constructions_parameter_count():
    with torch.device("meta"):
        vae = build_vaed4()
    assert sum(parameter.numel() for parameter in vae.parameters()) == VAED4_PARAMETERS
    assert not any("mid_block" in name for name, _ in vae.named_parameters())


@pytest.fixture(scope="module")
def tiny_tvt(tmp_path_factory):
    """Random TVT files in the published layouts under a models folder (a narrow VAED4, for speed): (models dir,
    paths, PEFT reference)."""
    root = tmp_path_factory.mktemp("tvt_models")
    paths, reference = write_tvt_files(root / "tvt", vae_config=NARROW_VAED4)
    return str(root), paths, reference


def test_the_published_weights_merge_into_the_unet_as_peft_runs_them(tiny_tvt):
    _, (_, unet_file, weights_file), reference = tiny_tvt
    unet = load_tvt_unet(unet_file, weights_file)
    assert not any("lora" in name or "base_layer" in name for name, _ in unet.named_parameters())
    generator = torch.Generator().manual_seed(0)
    latent, text = torch.randn(2, 4, 32, 48, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        ours = unet(latent, torch.tensor([1, 1]), encoder_hidden_states=text).sample
        theirs = reference(latent, torch.tensor([1, 1]), encoder_hidden_states=text).sample
        plain = type(unet).from_pretrained(os.path.dirname(unet_file))(latent, torch.tensor([1, 1]),
                                                                        encoder_hidden_states=text).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (ours - plain).abs().max() > 1e-2  # the weights changed the UNet


def test_weights_that_do_not_fit_are_refused(tiny_tvt, tmp_path):
    _, (vae_file, unet_file, weights_file), _ = tiny_tvt
    tensors = load_file(weights_file)
    save_file({**tensors, "up_blocks.9.conv.weight": torch.zeros(1)}, tmp_path / "stray.safetensors")
    with pytest.raises(ValueError, match="no place for .*up_blocks.9"):
        load_tvt_unet(unet_file, tmp_path / "stray.safetensors")
    lonely = {key: value for key, value in tensors.items() if ".lora_B." not in key}
    save_file(lonely, tmp_path / "lonely.safetensors")
    with pytest.raises(ValueError, match="incomplete"):
        load_tvt_unet(unet_file, tmp_path / "lonely.safetensors")
    save_file(load_file(unet_file), tmp_path / "unet.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tvt_unet(tmp_path / "unet.safetensors", weights_file)
    with pytest.raises(ValueError, match="not TVT's VAE"):
        load_vaed4(vae_file)  # a narrow one, not the published widths
    (tmp_path / "vae.ckpt").write_bytes(b"a pickle")
    with pytest.raises(UnsafeModelFormatError):
        load_vaed4(tmp_path / "vae.ckpt")


def test_the_vae_loads_under_its_checkpoint_prefix_and_works_at_a_quarter():
    with torch.device("meta"):
        expected = set(build_vaed4().state_dict())
    assert all(not key.startswith("vaeDe4.") for key in expected)
    vae = build_vaed4()
    image = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(image).latent_dist.mean
        assert latent.shape == (1, 4, 16, 24)
        assert vae.decode(latent).sample.shape == (1, 3, 64, 96)


def _official_offsets(size: int, tile: int, overlap: int) -> list[int]:
    """tile_forward's loop along one side, as the official code writes it."""
    count, current = 0, 0
    while current < size:
        current = max(count * tile - overlap * count, 0) + tile
        count += 1
    return [max(index * tile - overlap * index, 0) if index < count - 1 else size - tile for index in range(count)]


def test_latent_tiles_follow_the_official_loop_and_blend():
    for size in (96, 97, 150, 160, 200, 333):
        assert tile_offsets(size, 96, 32) == _official_offsets(size, 96, 32)
    weights = gaussian_tile_weights(8)
    assert weights.shape == (8, 8) and weights[3, 3] < weights[4, 3]  # down, centred at 8 / 2 = 4
    torch.testing.assert_close(weights[:, 3], weights[:, 4])  # across, at 3.5
    latent = torch.randn(1, 4, 40, 70)
    calls = []

    def record(tile: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(tile.shape[-2:]))
        return tile * 2

    torch.testing.assert_close(tiled_eps(record, latent, 32, 8), latent * 2)  # weights sum out
    assert set(calls) == {(32, 32)} and len(calls) == 2 * 3
    calls.clear()
    tiled_eps(record, latent, 96, 32)
    assert calls == [(40, 70)]  # 40·70 ≤ 96²: whole
    calls.clear()
    strip = torch.randn(1, 4, 20, 600)
    torch.testing.assert_close(tiled_eps(record, strip, 96, 64), strip * 2)  # tiles of 20, overlap cut to 10
    assert set(calls) == {(20, 20)}
    with pytest.raises(ValueError, match="smaller than the tile"):
        tile_offsets(100, 20, 20)


def test_the_colour_fix_and_the_encoder_input_are_the_officials():
    image, reference = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16) * 0.5
    fixed = adain_colour_fix(image, reference)
    flat = reference.flatten(2)
    expected = ((image - image.flatten(2).mean(-1)[..., None, None]) / (image.flatten(2).var(-1) + 1e-5).sqrt()[
        ..., None, None] * (flat.var(-1) + 1e-5).sqrt()[..., None, None] + flat.mean(-1)[..., None, None]).clamp(0, 1)
    torch.testing.assert_close(fixed, expected)
    assert upscaled_input(torch.rand(1, 3, 150, 203))[0].shape == (1, 3, 600, 808)
    enlarged, factor = upscaled_input(torch.rand(1, 3, 40, 64))
    assert factor == 128 / 40 and enlarged.shape == (1, 3, 512, 816)  # (128, 204) × 4


@pytest.fixture(scope="module")
def tiny_sd2_clip(tiny_sd2):  # noqa: F811
    return Clip(ModelRef(load_model(tiny_sd2.folder, device="cpu")))


def test_the_nodes_upscale_four_times_whole_or_in_tiles(tiny_tvt, tiny_sd2_clip, monkeypatch):
    monkeypatch.setattr(tvt_module, "VAED4_CONFIG", NARROW_VAED4)
    root, paths, _ = tiny_tvt
    AtelierLoadTVT.models_dir = root
    try:
        names = AtelierLoadTVT.INPUT_TYPES()["required"]["unet_name"][0]
        assert "TVTUNet/unet/diffusion_pytorch_model.safetensors" in names
        (tvt,) = AtelierLoadTVT().load("tvt_vae.safetensors", "TVTUNet/unet/diffusion_pytorch_model.safetensors",
                                       "model_TVT.safetensors")
    finally:
        AtelierLoadTVT.models_dir = None
    image = torch.rand(1, 136, 144, 3, generator=torch.Generator().manual_seed(1))
    node = AtelierTVTUpscale()
    (whole,) = node.upscale(tvt, tiny_sd2_clip, image, "clean, high-resolution, 8k,", 512, 32, 1024, True)
    assert whole.shape == (1, 544, 576, 3) and 0 <= whole.min() and whole.max() <= 1
    (tiled,) = node.upscale(tvt, tiny_sd2_clip, image, "clean, high-resolution, 8k,", 64, 16, 256, True)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.05  # tiles blend into nearly the whole pass
    (other_prompt,) = node.upscale(tvt, tiny_sd2_clip, image, "a cat", 512, 32, 1024, True)
    assert (other_prompt - whole).abs().max() > 1e-3
    (small,) = node.upscale(tvt, tiny_sd2_clip, image[:, :40, :50], "", 512, 32, 1024, False)
    assert small.shape == (1, 160, 200, 3)  # enlarged to 128 first, then sized back to ×4
    assert AtelierTVTUpscale.VALIDATE_INPUTS(tile=32, overlap=32) != True  # noqa: E712


def test_the_example_workflow_runs_headless_on_stand_ins(tmp_path, monkeypatch):
    """workflows/tvt.json with stand-ins for what it names (a small SD2 at SD2.1's proportions as SD2.1-base, random
    TVT files on a small TVTUNet of its text width and a narrow VAED4)."""
    from PIL import Image

    from tiny_models import TVT_WORKFLOW_MODELS, save_tvt_stand_ins
    from web.cli import main

    monkeypatch.setattr(tvt_module, "VAED4_CONFIG", NARROW_VAED4)
    save_tvt_stand_ins(tmp_path / "models", vae_config=NARROW_VAED4)
    assert all(os.path.exists(tmp_path / "models" / name) for name in TVT_WORKFLOW_MODELS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "workflows", "tvt.json"), encoding="utf-8") as file:
        assert json.load(file)["nodes"]
    assert main(["run", os.path.join(root, "workflows", "tvt.json"), "--models-dir", str(tmp_path / "models"),
                 "--data-dir", str(tmp_path / "data")]) == 0
    saved = sorted((tmp_path / "data" / "output").glob("tvt_*.png"))
    assert [Image.open(path).size for path in saved] == [(256, 256), (256, 256)]
