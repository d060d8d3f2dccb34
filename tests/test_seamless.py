"""StableMaterials' seamless tiling (techniques.md §4.11, Targets 3 and 14): with circular convolutions the UNet is
equivariant to latent rolls by multiples of its downsampling, the zero-padded one is not; the wrapped convolutions
keep the network's own alignment; start_fraction 1 is the plain sampler bit for bit; the rolled patch attention
is attention within each rolled native-size window; the seamless decode is roll-consistent (within its context)
where the plain decode is not. The seam figures on generated images are bench/creative.py's."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures_models import tiny_sd1, tiny_sd1_prompts  # noqa: F401  (session fixtures)
from nodes.common.denoiser import DiffusersCodec
from nodes.embedded.train import SHIPPED_NAME
from nodes.models.loading import SHIPPED_MODELS, load_model
from nodes.seamless.nodes import AtelierSeamlessTiling, AtelierSeamlessVAEDecode
from nodes.seamless.tiling import (SeamlessTiling, circular_convolutions, circular_start, patched_attention,
                                   seamless_decode, wrap_seam_ratio)
from web.nodes_sampling import KSampler

STEPS = 8


def _sample(model, positive, negative, size: int = 8) -> torch.Tensor:
    latent = {"samples": torch.zeros(1, 4, size, size)}
    return KSampler().sample(model, 3, STEPS, 5.0, "euler", "normal", positive, negative, latent, 1.0)[0]["samples"]


def _unet_run(unet, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, torch.tensor([500.0]), encoder_hidden_states=context).sample


def test_circular_unet_is_equivariant_to_rolls_by_multiples_of_its_downsampling(tiny_sd1_prompts):
    model, positive, _ = tiny_sd1_prompts
    unet = model.model.unet
    downsamplers = sum(block.downsamplers is not None for block in unet.down_blocks)
    period = 2 ** downsamplers  # 8 for the tiny UNet's three
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4 * period, 4 * period, generator=generator)
    shift = (period, 2 * period)
    with circular_convolutions(unet):
        wrapped = _unet_run(unet, x, positive[0][0])
        wrapped_rolled = _unet_run(unet, torch.roll(x, shift, (2, 3)), positive[0][0])
        off_grid = _unet_run(unet, torch.roll(x, (1, 1), (2, 3)), positive[0][0])
    torch.testing.assert_close(wrapped_rolled, torch.roll(wrapped, shift, (2, 3)), rtol=1e-5, atol=1e-5)
    # a roll off the downsampling grid samples other pixels at the lower levels
    assert (off_grid - torch.roll(wrapped, (1, 1), (2, 3))).abs().max() > 1e-3
    zero_padded = _unet_run(unet, x, positive[0][0])
    zero_padded_rolled = _unet_run(unet, torch.roll(x, shift, (2, 3)), positive[0][0])
    assert (zero_padded_rolled - torch.roll(zero_padded, shift, (2, 3))).abs().max() > 1e-2
    assert "forward" not in vars(unet.conv_in)  # unwrapped afterwards


@pytest.mark.parametrize("stride", [1, 2])
def test_a_wrapped_convolution_reads_where_the_plain_one_does(stride):
    """Inside, the wrapped convolution equals the zero-padded one (the official pipeline's crop moves a stride-2
    convolution's sampling by one pixel); at the borders it reads the other side."""
    conv = torch.nn.Conv2d(2, 3, 3, stride=stride, padding=1)
    x = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = conv(x)
        with circular_convolutions(conv):
            wrapped = conv(x)
        reference = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), conv.weight, conv.bias, stride=stride)
    assert wrapped.shape == plain.shape
    torch.testing.assert_close(wrapped, reference)
    torch.testing.assert_close(wrapped[..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1])
    assert not torch.allclose(wrapped[..., 0, :], plain[..., 0, :])


def test_one_axis_wraps_only_that_axis():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), circular_convolutions(conv, "x"):
        wrapped = conv(x)
    reference = F.conv2d(F.pad(F.pad(x, (1, 1, 0, 0), mode="circular"), (0, 0, 1, 1)), conv.weight)
    torch.testing.assert_close(wrapped, reference)


def test_start_fraction_one_is_the_plain_sampler_and_the_default_wraps_from_a_quarter(tiny_sd1_prompts):
    model, positive, negative = tiny_sd1_prompts
    plain = _sample(model, positive, negative)
    node = AtelierSeamlessTiling()
    (never,) = node.patch(model, 1.0, "both", True, 0)
    assert torch.equal(_sample(never, positive, negative), plain)
    assert never.sampling_patch.wrapped_calls == 0
    (tiling,) = node.patch(model, 0.25, "both", True, 0)
    tiled = _sample(tiling, positive, negative)
    assert not torch.equal(tiled, plain)
    # one UNet call per step (both guidance halves batched); steps 2..7 of 8 wrap
    assert tiling.sampling_patch.wrapped_calls == STEPS - circular_start(STEPS, 0.25) == 6
    assert model.sampling_patch is None


@pytest.mark.parametrize("axes", ["both", "x"])
def test_patched_attention_is_attention_within_each_rolled_patch(tiny_sd1_prompts, axes):
    """Each transformer's output is its output on each native-size window of the input rolled by the drawn even
    offsets (along the wrapped axes only), put back and rolled back; not attention over the whole map; scale 1
    leaves it alone."""
    model, positive, _ = tiny_sd1_prompts
    transformer = model.model.unet.down_blocks[1].attentions[0]
    context = positive[0][0]
    varied = torch.randn(1, transformer.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(3))

    def run(hidden: torch.Tensor) -> torch.Tensor:
        return transformer(hidden, encoder_hidden_states=context, return_dict=False)[0]

    with torch.no_grad():
        whole = run(varied)
        with patched_attention(transformer, 2, seed=5, axes=axes):
            patched = transformer(varied, encoder_hidden_states=context, return_dict=False)
        with patched_attention(transformer, 1, seed=5, axes=axes):
            unpatched = run(varied)
        drawn = torch.randint(0, 256, (2,), generator=torch.Generator().manual_seed(5))
        shift_y, shift_x = (int(value) // 2 * 2 for value in drawn)
        shift_y *= axes == "both"
        rolled = torch.roll(varied, (shift_y, shift_x), (2, 3))
        expected = torch.empty_like(rolled)
        for top in ((0, 4) if axes == "both" else (0,)):
            for left in (0, 4):
                window = np.s_[..., top:top + (4 if axes == "both" else 8), left:left + 4]
                expected[window] = run(rolled[window])
        expected = torch.roll(expected, (-shift_y, -shift_x), (2, 3))
    assert isinstance(patched, tuple)  # diffusers' return convention kept
    torch.testing.assert_close(patched[0], expected, rtol=1e-5, atol=1e-5)
    assert (patched[0] - whole).abs().max() > 1e-3
    assert torch.equal(unpatched, whole)
    assert "forward" not in vars(transformer)


def test_a_latent_too_small_to_wrap_is_refused_by_name():
    """Two stride-2 convolutions: the second sees a 1×1 map, which a circular pad of 2 would wrap more than once."""
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, stride=2, padding=1),
                                  torch.nn.Conv2d(1, 1, 3, stride=2, padding=1))
    with circular_convolutions(network), pytest.raises(ValueError, match="too small for seamless tiling"):
        network(torch.zeros(1, 1, 2, 2))
    assert all("forward" not in vars(conv) for conv in network)  # restored after the error


def test_an_instance_forward_already_there_comes_back():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    patched = conv.forward
    conv.forward = patched  # another node's instance patch
    with circular_convolutions(conv):
        assert conv.forward is not patched
    assert vars(conv)["forward"] is patched


def test_attention_scale_follows_the_native_size(tiny_sd1_prompts):
    unet = tiny_sd1_prompts[0].model.unet  # sample_size 8
    assert SeamlessTiling().attention_scale(unet, (8, 8)) == 1
    assert SeamlessTiling().attention_scale(unet, (16, 24)) == 2
    assert SeamlessTiling(native_size=4).attention_scale(unet, (16, 16)) == 4
    assert SeamlessTiling(patched_attention=False).attention_scale(unet, (32, 32)) == 1


def _embedded_codec() -> DiffusersCodec:
    return DiffusersCodec(load_model(os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME), device="cpu").vae)


def test_seamless_decode_is_roll_consistent_where_the_plain_decode_is_not():
    """On the embedded model's (trained) decoder: decoding a rolled latent gives the rolled image far more nearly
    with the authors' wrapped context than without, and the borders join."""
    codec = _embedded_codec()
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    shift, factor = 8, codec.downscale

    def roll_error(decode) -> float:
        rolled = decode(torch.roll(latent, (shift, shift), (2, 3)))
        return (rolled - torch.roll(decode(latent), (shift * factor,) * 2, (2, 3))).abs().mean().item()

    seamless, plain = roll_error(lambda z: seamless_decode(codec.decode, z)), roll_error(codec.decode)
    assert seamless < plain / 2, (seamless, plain)  # measured: 0.033 against 0.081
    image = seamless_decode(codec.decode, latent)
    assert image.shape == (1, 3, 16 * factor, 16 * factor)
    assert wrap_seam_ratio(image).item() < wrap_seam_ratio(codec.decode(latent)).item() / 2  # 2.0 against 8.2


def test_seamless_decode_node_gives_the_image_and_its_3x3_tiling():
    codec = _embedded_codec()
    latent = {"samples": torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(5))}
    node = AtelierSeamlessVAEDecode()
    for context in (0.125, 1.0):
        image, tiled = node.decode(latent, codec, "both", context)
        assert image.shape == (2, 64, 128, 3) and tiled.shape == (2, 192, 384, 3)
        assert torch.equal(tiled[:, 64:128, 128:256], image)
    _, across = node.decode(latent, codec, "x", 0.125)
    assert across.shape == (2, 64, 384, 3)
    # no context: the plain decode
    plain = codec.decode(latent["samples"]).permute(0, 2, 3, 1)
    torch.testing.assert_close(node.decode(latent, codec, "both", 0.0)[0], plain)
    with pytest.raises(ValueError, match="LATENT"):
        node.decode({"pixels": 1}, codec, "both", 0.125)
    with pytest.raises(ValueError, match="context"):
        node.decode(latent, codec, "both", 1.5)


def test_settings_are_checked(tiny_sd1_prompts):
    with pytest.raises(ValueError, match="start_fraction"):
        SeamlessTiling(start_fraction=1.5)
    with pytest.raises(ValueError, match="axes"):
        SeamlessTiling(axes="z")
    (patched,) = AtelierSeamlessTiling().patch(tiny_sd1_prompts[0], 0.25, "both", True, 0)
    with pytest.raises(ValueError, match="sampling patch already"):
        AtelierSeamlessTiling().patch(patched, 0.25, "both", True, 0)
