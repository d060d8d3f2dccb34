"""NoiseDiffusion (techniques.md §4.8, Targets 3 and 11): α'² + β'² + γ² = 1 and μ + ν = inject for all λ; A↔B with
λ↔1−λ gives the same z; the clip bound holds; inject 1, γ 0, no clipping and λ 0 give z = l_A exactly; the
sampling half is diffusers' DDIM on LDM's grid; inversion and sampling back at guidance 1 reconstruct the image on
the embedded model; the node gives the sequence as one batch. The shape-finding figures are bench/creative.py's."""

from __future__ import annotations

import math
import os

import pytest
import torch

from nodes.common.denoiser import DiffusersCodec, DiffusersDenoiser
from nodes.embedded.dataset import held_out_captions, render
from nodes.embedded.train import SHIPPED_NAME
from nodes.models.clip import Clip
from nodes.models.loading import SHIPPED_MODELS, load_model
from nodes.models.refs import ModelRef
from nodes.noisediffusion.interpolate import fractions_of, mixing_weights, noise_mix, noisediffusion_interpolate
from nodes.noisediffusion.nodes import AtelierNoiseDiffusion
from nodes.sampling.ddim import ddim_invert_partial, ddim_sample_partial, ldm_ddim_timesteps


@pytest.fixture(scope="module")
def embedded():
    model = load_model(os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME), device="cpu")
    ref = ModelRef(model)
    return ref, Clip(ref), DiffusersCodec(model.vae)


def _latents(seed: int) -> list[torch.Tensor]:
    return list(torch.randn(5, 1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).unbind(0))


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9])
def test_weights_keep_the_variance_and_the_injection_for_every_fraction(gamma):
    for fraction in torch.linspace(0, 1, 21).tolist():
        alpha, beta, mu, nu = mixing_weights(fraction, gamma, 1.2)
        assert alpha ** 2 + beta ** 2 + gamma ** 2 == pytest.approx(1, abs=1e-12)
        assert mu + nu == pytest.approx(1.2, abs=1e-12) and min(alpha, beta, mu, nu) >= 0


def test_the_official_weights_in_the_interior():
    """The code's own formula, α' = √((1−γ²)l²/(l²+1)), β' = √((1−γ²)/(l²+1)) with l = α/β, at its fractions."""
    gamma = 0.2
    for fraction in (0.17, 0.33, 0.5, 0.67, 0.83):
        ratio = math.cos(math.radians(fraction * 90)) / math.sin(math.radians(fraction * 90))
        official = (((1 - gamma ** 2) * ratio ** 2 / (ratio ** 2 + 1)) ** 0.5, ((1 - gamma ** 2) / (ratio ** 2 + 1))
                    ** 0.5)
        assert mixing_weights(fraction, gamma)[:2] == pytest.approx(official, abs=1e-12)


def test_swapping_the_images_and_the_fraction_gives_the_same_latent():
    l_a, l_b, x_a, x_b, noise = _latents(0)
    for fraction in (0.17, 0.4, 0.5):
        forward = noise_mix(l_a, l_b, x_a, x_b, noise, fraction, 0.3, 0.2, 2.0, 1.2)
        backward = noise_mix(l_b, l_a, x_b, x_a, noise, 1 - fraction, 0.3, 0.2, 2.0, 1.2)
        torch.testing.assert_close(forward, backward, rtol=1e-6, atol=1e-6)


def test_clip_bounds_hold_and_the_identity_setting_is_l_a():
    l_a, l_b, x_a, x_b, noise = (3 * latent for latent in _latents(1))
    mixed = noise_mix(l_a, l_b, x_a, x_b, noise, 0.5, 0.3, 0.5, 2.0, 1.2)
    assert mixed.abs().max() <= 2.0 and (mixed.abs() == 2.0).any()
    assert noise_mix(l_a, l_b, x_a, x_b, noise, 0.5, 0.3, 0.5, None, 1.2).abs().max() > 2.0
    assert torch.equal(noise_mix(l_a, l_b, x_a, x_b, noise, 0.0, 0.3, 0.0, None, 1.0), l_a)


def test_ldm_grid_and_sampling_are_diffusers_ddim_with_leading_spacing(embedded):
    """LDM's DDIMSampler on its uniform grid is diffusers' DDIMScheduler with leading spacing, steps_offset 1 and
    set_alpha_to_one False (the last step lands on ᾱ_0): the same latents from the same start."""
    from diffusers import DDIMScheduler

    ref, clip, _ = embedded
    denoiser = DiffusersDenoiser(ref.model.unet, ref.model.schedule)
    positive, negative = clip.encode("a red circle"), clip.encode("")
    from nodes.sampling.guidance import to_conditioning

    positive, negative = to_conditioning(positive, "sd1"), to_conditioning(negative, "sd1")
    steps = 20
    timesteps = ldm_ddim_timesteps(steps)
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = ddim_sample_partial(denoiser, start, positive, negative, 5.0, timesteps, steps)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.flip(0).tolist() == timesteps.tolist()
    x = start
    from nodes.common.denoiser import guided_eps

    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = guided_eps(denoiser, x, t.float().reshape(1), positive, negative, 5.0)
            x = scheduler.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_inversion_and_sampling_back_at_guidance_one_reconstruct_the_image(embedded):
    ref, clip, codec = embedded
    from nodes.sampling.guidance import to_conditioning

    denoiser = DiffusersDenoiser(ref.model.unet, ref.model.schedule)
    scene = held_out_captions(1)[0]
    positive = to_conditioning(clip.encode(scene.caption), "sd1")
    clean = codec.encode(render(scene)[None]) * codec.scaling_factor
    timesteps = ldm_ddim_timesteps(50)
    inverted = ddim_invert_partial(denoiser, clean, positive, timesteps, 28)
    back = ddim_sample_partial(denoiser, inverted, positive, positive, 1.0, timesteps, 28)
    error = ((back - clean).norm() / clean.norm()).item()
    assert error < 0.15, error
    assert ((inverted - clean).norm() / clean.norm()).item() > 0.5  # it did go into the noise


def test_node_gives_the_sequence_as_one_batch_with_ends_that_reconstruct(embedded):
    ref, clip, codec = embedded
    scenes = held_out_captions(2)
    image_a, image_b = (render(scene)[None].permute(0, 2, 3, 1) for scene in scenes)
    positive, negative = clip.encode("a shape"), clip.encode("")
    node = AtelierNoiseDiffusion()
    (latent,) = node.interpolate(ref, codec, image_a, image_b, positive, negative, 3, True, 40, 0.56, 7.5, 0.2,
                                 2.0, 1.2, 5)
    assert latent["samples"].shape == (5, 4, 8, 8)
    # the in-betweens are the maths' at λ = 1/4, 1/2, 3/4, noise from the seed, A to B
    denoiser = DiffusersDenoiser(ref.model.unet, ref.model.schedule)
    from nodes.sampling.guidance import to_conditioning

    expected = noisediffusion_interpolate(denoiser, codec, image_a.permute(0, 3, 1, 2), image_b.permute(0, 3, 1, 2),
                                          to_conditioning(positive, "sd1"), to_conditioning(negative, "sd1"),
                                          [0.25, 0.5, 0.75], torch.Generator().manual_seed(5), False, 40, 0.56, 7.5,
                                          0.2, 2.0, 1.2)
    torch.testing.assert_close(latent["samples"][1:-1], expected)
    decoded = codec.decode(latent["samples"])
    for index, image in ((0, image_a), (-1, image_b)):
        mse = ((decoded[index] - image[0].permute(2, 0, 1)) ** 2).mean().item()
        assert 10 * math.log10(1 / mse) > 20  # the ends come back (PSNR in dB; bench/creative.py reports them)
    with pytest.raises(ValueError, match="one RGB image"):
        node.interpolate(ref, codec, image_a.expand(2, -1, -1, -1), image_b, positive, negative, 3, True, 40,
                         0.56, 7.5, 0.0, 2.0, 1.2, 0)
    with pytest.raises(ValueError, match="same size"):
        node.interpolate(ref, codec, image_a, image_b[:, :32, :32], positive, negative, 3, True, 40, 0.56, 7.5,
                         0.0, 2.0, 1.2, 0)
    with pytest.raises(ValueError, match="multiples of 8"):
        node.interpolate(ref, codec, image_a[:, :60, :60], image_b[:, :60, :60], positive, negative, 3, True, 40,
                         0.56, 7.5, 0.0, 2.0, 1.2, 0)


@pytest.mark.parametrize("steps", [250, 300, 40, 600, 999])
def test_the_grid_spans_the_schedule_so_depth_means_the_same_for_every_step_count(steps):
    timesteps = ldm_ddim_timesteps(steps)
    assert len(timesteps) == steps and timesteps.unique().numel() == steps and int(timesteps.max()) <= 999
    # the inverted state sits at the grid step before t[round(steps·depth)]: within 1.5 grid steps of depth·1000
    assert abs(int(timesteps[round(steps * 0.56) - 1]) - 560) <= 1.5 * 1000 / steps + 1


def test_fractions():
    assert fractions_of(1) == [0.5]
    with pytest.raises(ValueError, match="frames"):
        fractions_of(0)
    with pytest.raises(ValueError, match="fraction"):
        mixing_weights(1.5)


def test_example_workflow_runs_headless_on_the_shipped_model(tmp_path, capsys):
    from web.cli import main

    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                            "noisediffusion.json")
    assert main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                 "--set", "6.steps=4", "--set", "7.steps=4", "--set", "11.steps=20"]) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if "output: " in line]
    assert len(saved) == 7  # A's reconstruction, five in-betweens, B's
