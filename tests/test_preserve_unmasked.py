"""Preserve Unmasked (techniques.md §4.12, Target 15, the composite): beyond the dilation and the feather's kernel
every pixel is the original bit for bit, inside the mask the decoded picture bit for bit; a mask of ones gives the
decoded picture, of zeros the original; on the embedded model's VAE round trip the kept region's error is gone."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from fixtures_models import tiny_sd1  # noqa: F401  (session fixture)
from nodes.common.denoiser import DiffusersCodec
from nodes.embedded.train import SHIPPED_NAME
from nodes.inpaint.asymmetric import asymmetric_decode
from nodes.inpaint.nodes import AtelierAsymmetricVAEDecode, AtelierAsymmetricVAELoader, AtelierPreserveUnmasked
from nodes.inpaint.preserve import feathered_mask, preserve_unmasked
from nodes.models.loading import SHIPPED_MODELS, load_model
from nodes.models.vae import asymmetric_vae_config, load_asymmetric_vae


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
    # the batched mask's blur may take another kernel path: equal up to float32 rounding
    assert one.shape == decoded.shape and torch.allclose(one, batched, atol=1e-6)
    with pytest.raises(ValueError, match="size"):
        node.composite(decoded, original, torch.zeros(16, 16), 2, 1.0)
    with pytest.raises(ValueError, match="one size"):
        node.composite(decoded, original[:, :16], mask, 2, 1.0)
    with pytest.raises(ValueError, match="batch"):
        node.composite(decoded, original, torch.zeros(3, 32, 32), 2, 1.0)


# Asymmetric VQGAN's published decoders (Target 15, the decoder half)

def _write_asymmetric_vae(path, variant: str = "x-1-5", width_scale: float = 0.5, seed: int = 0) -> None:
    """A random asymmetric VAE in diffusers' layout, its widths scaled so that GroupNorm's 32 groups still divide
    them (the file cannot say its group count), in float16 to keep it small."""
    from diffusers import AsymmetricAutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    vae = AsymmetricAutoencoderKL.from_config(asymmetric_vae_config(variant, width_scale))
    save_file({key: value.half().contiguous() for key, value in vae.state_dict().items()}, str(path))


def test_shipped_configs_build_the_published_architectures():
    """Full size on the meta device: SD's VAE encoder (34,163,592 parameters, as in every SD1.x/2.x VAE) and the
    decoders 1.5 and 2 times wider with 3 and 5 layers per block. Source of the architectures: diffusers'
    scripts/convert_asymmetric_vqgan_to_diffusers.py; the model cards state no parameter counts, so the totals
    (194.3M and 406.1M, counted from those configs) pin the shipped files against a change."""
    from diffusers import AsymmetricAutoencoderKL

    counts = {}
    for variant in ("x-1-5", "x-2"):
        with torch.device("meta"):
            vae = AsymmetricAutoencoderKL.from_config(asymmetric_vae_config(variant))
        assert sum(parameter.numel() for parameter in vae.encoder.parameters()) == 34_163_592
        counts[variant] = sum(parameter.numel() for parameter in vae.parameters())
    assert counts == {"x-1-5": 194_300_519, "x-2": 406_130_151}


@pytest.fixture(scope="module")
def asymmetric_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("asymmetric") / "asym.safetensors"
    _write_asymmetric_vae(path)
    return str(path)


def test_asymmetric_vae_loads_offline_and_mask_one_is_the_plain_decode_exactly(asymmetric_file):
    vae = load_asymmetric_vae(asymmetric_file, device="cpu")
    assert type(vae).__name__ == "AsymmetricAutoencoderKL" and vae.dtype == torch.float32
    generator = torch.Generator().manual_seed(7)
    latent = torch.randn(1, 4, 4, 4, generator=generator)
    image = torch.rand(1, 3, 32, 32, generator=generator)
    plain = asymmetric_decode(vae, latent)
    assert torch.equal(asymmetric_decode(vae, latent, image, torch.ones(1, 1, 32, 32)), plain)
    assert not torch.allclose(asymmetric_decode(vae, latent, image, torch.zeros(1, 1, 32, 32)), plain)
    # a soft mask is cut at 0.5
    assert torch.equal(asymmetric_decode(vae, latent, image, torch.full((1, 1, 32, 32), 0.6)), plain)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    (node,) = AtelierAsymmetricVAEDecode().decode(vae, {"samples": latent.expand(2, -1, -1, -1)},
                                                  image.permute(0, 2, 3, 1), mask)
    assert node.shape == (2, 32, 32, 3)
    torch.testing.assert_close(node[:1].permute(0, 3, 1, 2), asymmetric_decode(vae, latent, image, mask[:, None]))
    with pytest.raises(ValueError, match="times 8"):
        AtelierAsymmetricVAEDecode().decode(vae, {"samples": latent}, image.permute(0, 2, 3, 1)[:, :16], mask)
    with pytest.raises(ValueError, match="batch"):
        AtelierAsymmetricVAEDecode().decode(vae, {"samples": latent}, image.permute(0, 2, 3, 1),
                                            mask.expand(3, -1, -1))


def test_asymmetric_vae_loader_refuses_what_is_not_one(tmp_path, tiny_sd1, asymmetric_file):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match="not an asymmetric VAE"):
        load_asymmetric_vae(os.path.join(tiny_sd1.folder, "vae", "diffusion_pytorch_model.safetensors"))
    tensors = load_file(asymmetric_file)
    tensors.pop("decoder.up_blocks.0.resnets.0.conv1.weight")
    save_file(tensors, str(tmp_path / "cut2.safetensors"))
    with pytest.raises(ValueError, match="x-1-5 layout"):
        load_asymmetric_vae(tmp_path / "cut2.safetensors")
    with pytest.raises(Exception, match="safetensors"):
        load_asymmetric_vae(tmp_path / "asym.ckpt")


def test_asymmetric_vae_loader_node_reads_models_vae(tmp_path):
    (tmp_path / "vae").mkdir()
    _write_asymmetric_vae(tmp_path / "vae" / "asym.safetensors", "x-2", 0.25)
    loader = type("Loader", (AtelierAsymmetricVAELoader,), {"models_dir": str(tmp_path)})
    assert "asym.safetensors" in loader.INPUT_TYPES()["required"]["vae_name"][0]
    (vae,) = loader().load("asym.safetensors")
    assert vae.config.up_block_out_channels == [64, 128, 256, 256] and vae.config.layers_per_up_block == 5


def test_example_workflow_runs_headless_and_keeps_the_original_outside_the_mask(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from web.cli import main

    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                            "preserve_unmasked.json")
    assert main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                 "--set", "6.steps=4", "--set", "13.steps=4"]) == 0
    saved = {os.path.basename(line.split("output: ")[-1]).rsplit("_", 2)[0]: line.split("output: ")[-1]
             for line in capsys.readouterr().out.splitlines() if "output: " in line}
    original, inpainted, preserved = (np.asarray(Image.open(saved[name]))
                                      for name in ("original", "inpainted", "preserve_unmasked"))
    left = np.s_[:, :36 - 8 - 12]  # left of the square, beyond dilate 8 and the feather's reach
    assert np.array_equal(preserved[left], original[left]) and not np.array_equal(inpainted[left], original[left])
