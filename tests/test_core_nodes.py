"""ComfyUI's core nodes in the standalone app: the conditioning rules, the samplers' plumbing and the latent nodes,
each against what ComfyUI's code does, written out here."""

import math

import pytest
import torch

from fixtures_models import tiny_sd1, tiny_sd1_prompts  # noqa: F401  (session fixtures)
from nodes.common.denoiser import Conditioning
from nodes.models.clip import Clip
from nodes.sampling.guidance import mirror_areas, predict_x0, resolve_conditioning
from nodes.sampling.model_sampling import DiscreteModelSampling
from nodes.sampling.noise import prepare_noise
from web.nodes_conditioning import (CLIPSetLastLayer, ConditioningCombine, ConditioningSetArea,
                                    ConditioningSetTimestepRange, ConditioningZeroOut)
from web.nodes_latent import (EmptyLatentImage, LatentUpscale, LatentUpscaleBy, SetLatentNoiseMask,
                              VAEEncodeForInpaint, resize_latent)
from web.nodes_sampling import (BasicScheduler, CFGGuider, KSampler, KSamplerAdvanced, KSamplerSelect, RandomNoise,
                                SamplerCustom, SamplerCustomAdvanced, SplitSigmas)

MODEL_SAMPLING = DiscreteModelSampling.from_beta_schedule()


class RecordingDenoiser:
    """A denoiser whose prediction is a known function of its inputs; it records every call's batch."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_t, t, conditioning):
        self.calls.append((x_t.shape, conditioning.embeds.shape))
        # ε = the mean of each row's embeddings, broadcast: different prompts give different predictions
        return conditioning.embeds.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).expand_as(x_t).clone()


def entry(value: float, **options) -> list:
    return [[torch.full((1, 77, 8), value), options]]


def resolved(conditioning, kind="positive", shape=(1, 4, 16, 16)):
    return resolve_conditioning(conditioning, kind, torch.Size(shape), MODEL_SAMPLING, family="sd1", downscale=8,
                                device=torch.device("cpu"))


def test_one_prompt_gives_its_own_x0():
    x, sigma = torch.randn(1, 4, 16, 16), torch.tensor([2.0])
    denoiser = RecordingDenoiser()
    (x0,) = predict_x0(denoiser, MODEL_SAMPLING, x, sigma, [resolved(entry(0.5))])
    assert torch.allclose(x0, x - sigma * 0.5, atol=1e-6)  # ε-model: x̂₀ = x − σ·ε
    assert denoiser.calls == [((1, 4, 16, 16), (1, 77, 8))]


def test_an_area_prompt_averages_with_weights_that_fade_at_inner_edges():
    """Two prompts: one everywhere (ε 0), one on the left half (ε 1, strength 1): ComfyUI's calc_cond_batch."""
    x, sigma = torch.zeros(1, 4, 16, 16), torch.tensor([1.0])
    conds = resolved(entry(0.0) + [[torch.full((1, 77, 8), 1.0), {"area": (16, 8, 0, 0), "strength": 1.0}]])
    (x0,) = predict_x0(RecordingDenoiser(), MODEL_SAMPLING, x, sigma, [conds])
    eps = -x0[0, 0]  # x = 0, σ = 1: x̂₀ = −ε
    # the area's weight ramps (t+1)/4 over its last 4 columns (min(8, 8 // 4 · ...)): rr = min(8, 8 // 4) = 2
    ramp = min(8, 8 // 4)
    weights = torch.ones(8)
    for t in range(ramp):
        weights[8 - 1 - t] *= (t + 1) / ramp
    expected_left = weights / (1 + weights)  # (1·w + 0·1) / (w + 1)
    assert torch.allclose(eps[0, :8], expected_left, atol=1e-6)
    assert torch.allclose(eps[:, 8:], torch.zeros(16, 8), atol=1e-6)


def test_a_timestep_range_switches_a_prompt_on_and_off():
    early = resolved(ConditioningSetTimestepRange().set_range(entry(1.0), 0.0, 0.5)[0]
                     + ConditioningSetTimestepRange().set_range(entry(3.0), 0.5, 1.0)[0])
    x = torch.zeros(1, 4, 16, 16)
    high = MODEL_SAMPLING.percent_to_sigma(0.1)  # early in sampling: high noise
    low = MODEL_SAMPLING.percent_to_sigma(0.9)
    (at_high,) = predict_x0(RecordingDenoiser(), MODEL_SAMPLING, x, torch.tensor([high]), [early])
    (at_low,) = predict_x0(RecordingDenoiser(), MODEL_SAMPLING, x, torch.tensor([low]), [early])
    assert torch.allclose(at_high, torch.full_like(x, -high * 1.0), atol=1e-4)
    assert torch.allclose(at_low, torch.full_like(x, -low * 3.0), atol=1e-4)


def test_an_area_gets_a_counterpart_in_the_other_kind():
    conds = {"positive": resolved(entry(1.0, area=(8, 8, 0, 0))), "negative": resolved(entry(0.0), "negative")}
    mirror_areas(conds)
    assert [c.area for c in conds["negative"]] == [None, (8, 8, 0, 0)]
    assert torch.equal(conds["negative"][1].conditioning.embeds, conds["negative"][0].conditioning.embeds)


def test_prompts_of_different_lengths_share_one_call_repeated_to_a_common_length():
    denoiser = RecordingDenoiser()
    x = torch.zeros(1, 4, 8, 8)
    long = [[torch.ones(1, 154, 8), {}]]
    predict_x0(denoiser, MODEL_SAMPLING, x, torch.tensor([1.0]), [resolved(entry(0.0)), resolved(long)])
    assert denoiser.calls == [((2, 4, 8, 8), (2, 154, 8))]
    parts = Conditioning.cat([Conditioning(torch.arange(3.0).reshape(1, 3, 1)), Conditioning(torch.zeros(1, 6, 1))])
    assert parts.embeds[0, :, 0].tolist() == [0, 1, 2, 0, 1, 2]


def test_conditioning_nodes_build_comfyuis_options():
    (area,) = ConditioningSetArea().append(entry(1.0), 256, 128, 64, 32, 0.5)
    assert area[0][1] == {"area": (16, 32, 4, 8), "strength": 0.5, "set_area_to_bounds": False}
    (zeroed,) = ConditioningZeroOut().zero_out(entry(1.0, pooled_output=torch.ones(1, 4)))
    assert not zeroed[0][0].any() and not zeroed[0][1]["pooled_output"].any()
    (both,) = ConditioningCombine().combine(entry(1.0), entry(2.0))
    assert len(both) == 2
    with pytest.raises(ValueError, match="CONDITIONING"):
        ConditioningCombine().combine("not a conditioning", entry(1.0))


def test_latent_nodes_follow_comfyui():
    (latent,) = EmptyLatentImage().generate(72, 40, 3)
    assert latent["samples"].shape == (3, 4, 5, 9) and not latent["samples"].any()
    samples = {"samples": torch.randn(1, 4, 8, 8)}
    assert LatentUpscale().upscale(samples, "nearest-exact", 0, 0, "disabled")[0] is samples
    assert LatentUpscale().upscale(samples, "bilinear", 128, 0, "disabled")[0]["samples"].shape == (1, 4, 16, 16)
    # LatentUpscale never goes below 64 px
    assert LatentUpscale().upscale(samples, "bilinear", 8, 8, "disabled")[0]["samples"].shape == (1, 4, 8, 8)
    assert LatentUpscaleBy().upscale(samples, "bicubic", 1.5)[0]["samples"].shape == (1, 4, 12, 12)
    # interpolation without antialiasing, as comfy.utils.common_upscale
    expected = torch.nn.functional.interpolate(samples["samples"], size=(4, 4), mode="bilinear")
    assert torch.equal(resize_latent(samples["samples"], 4, 4, "bilinear"), expected)
    wide = torch.arange(32.0).reshape(1, 1, 4, 8)  # centre crop to the target's aspect ratio first
    assert torch.equal(resize_latent(wide, 4, 4, "nearest-exact", "center"), wide[..., 2:6])
    (masked,) = SetLatentNoiseMask().set_mask(samples, torch.ones(64, 64))
    assert masked["noise_mask"].shape == (1, 1, 64, 64)


def test_empty_latent_refuses_a_batch_over_the_pixel_budget_before_allocating():
    message = EmptyLatentImage.VALIDATE_INPUTS(width=16384, height=16384, batch_size=2)
    assert "pixel budget" in message and "--max-pixels" in message
    assert EmptyLatentImage.VALIDATE_INPUTS(width=512, height=512, batch_size=1) is True


def test_vae_encode_for_inpaint_greys_the_masked_pixels_and_grows_the_mask():
    class Codec:
        downscale = 8

        def encode(self, image):
            self.seen = image
            return torch.zeros(image.shape[0], 4, image.shape[2] // 8, image.shape[3] // 8)

    codec, pixels = Codec(), torch.ones(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 24:40, 24:40] = 1
    (latent,) = VAEEncodeForInpaint().encode(codec, pixels, mask, grow_mask_by=6)
    assert torch.all(codec.seen[:, :, 24:40, 24:40] == 0.5) and torch.all(codec.seen[:, :, :20] == 1)
    grown = latent["noise_mask"][0, 0]
    # a 6×6 box with padding 3 (ComfyUI's): rows 22..42 for a mask on 24..39
    assert grown[22:43, 22:43].all() and not grown[:22].any() and not grown[43:].any()


def test_random_noise_is_comfyuis_prepare_noise():
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    (noise,) = RandomNoise().get_noise(7)
    drawn = noise.generate_noise(latent)
    assert torch.equal(drawn, torch.randn(2, 4, 8, 8, generator=torch.manual_seed(7)))
    assert torch.equal(prepare_noise(latent["samples"], 7), noise.generate_noise(latent))


def test_ksampler_custom_samplers_and_a_guider_give_the_same_latents(tiny_sd1_prompts):
    model, positive, negative = tiny_sd1_prompts
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (ksampled,) = KSampler().sample(model, 3, 4, 5.0, "dpmpp_2m", "karras", positive, negative, latent, 1.0)
    (sampler,) = KSamplerSelect().get_sampler("dpmpp_2m")
    (sigmas,) = BasicScheduler().get_sigmas(model, "karras", 4, 1.0)
    custom, denoised = SamplerCustom().sample(model, True, 3, 5.0, positive, negative, sampler, sigmas, latent)
    (guider,) = CFGGuider().get_guider(model, positive, negative, 5.0)
    (noise,) = RandomNoise().get_noise(3)
    advanced, _ = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)
    assert torch.equal(ksampled["samples"], custom["samples"]) and torch.equal(custom["samples"], advanced["samples"])
    assert denoised["samples"].shape == custom["samples"].shape


def test_ksampler_advanced_split_in_two_passes_equals_one_pass(tiny_sd1_prompts):
    """Steps 0–2 with leftover noise, then 2–4 without new noise: KSamplerAdvanced's refiner pattern."""
    model, positive, negative = tiny_sd1_prompts
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    args = dict(model=model, noise_seed=11, steps=4, cfg=3.0, sampler_name="euler", scheduler="normal",
                positive=positive, negative=negative)
    (whole,) = KSamplerAdvanced().sample(add_noise="enable", latent_image=latent, start_at_step=0, end_at_step=10000,
                                         return_with_leftover_noise="disable", **args)
    (first,) = KSamplerAdvanced().sample(add_noise="enable", latent_image=latent, start_at_step=0, end_at_step=2,
                                         return_with_leftover_noise="enable", **args)
    (second,) = KSamplerAdvanced().sample(add_noise="disable", latent_image=first, start_at_step=2,
                                          end_at_step=10000, return_with_leftover_noise="disable", **args)
    torch.testing.assert_close(second["samples"], whole["samples"], rtol=1e-4, atol=1e-4)
    (sigmas,) = BasicScheduler().get_sigmas(model, "normal", 4, 1.0)
    high, low = SplitSigmas().get_sigmas(sigmas, 2)
    assert torch.equal(high[-1], low[0]) and len(high) + len(low) == len(sigmas) + 1


def test_cfg_one_skips_the_negative(tiny_sd1_prompts, monkeypatch):
    model, positive, negative = tiny_sd1_prompts
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    calls = []
    unet = model.model.unet
    original = unet.forward

    def counted(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counted)
    KSampler().sample(model, 0, 2, 1.0, "euler", "normal", positive, negative, latent, 1.0)
    assert calls == [1, 1]
    calls.clear()
    KSampler().sample(model, 0, 2, 2.0, "euler", "normal", positive, negative, latent, 1.0)
    assert calls == [2, 2]


def test_clip_set_last_layer_changes_the_encoding(tiny_sd1_prompts):
    model, positive, _ = tiny_sd1_prompts
    (skipped,) = CLIPSetLastLayer().set_last_layer(Clip(model), -2)
    assert not torch.allclose(skipped.encode("a red circle")[0][0], positive[0][0])
    assert math.isclose(float(Clip(model).encode("a red circle")[0][0].sum()), float(positive[0][0].sum()))


def _gaussian_denoiser(x, sigma, **_):
    """The exact x̂₀ for data N(0.3, 0.5²): a smooth, known model for comparing sampling functions."""
    variance = 0.25
    scale = sigma.reshape(-1, 1, 1, 1) ** 2
    return 0.3 + (x - 0.3) * variance / (variance + scale)


def test_ghvb_with_momentum_one_is_comfyuis_euler_and_momentum_changes_it():
    from nodes.generation.nodes import AtelierMomentumSampler
    from nodes.sampling.k_samplers import run_sampler

    sigmas = torch.tensor([14.6, 6.0, 2.0, 0.7, 0.2, 0.0])
    noise, latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 4, 8, 8)

    def run(sampler):
        return run_sampler(sampler, _gaussian_denoiser, MODEL_SAMPLING, sigmas, noise, latent, 0)

    (ddim,) = AtelierMomentumSampler().get_sampler("ghvb", 1.0)
    (ghvb,) = AtelierMomentumSampler().get_sampler("ghvb", 2.5)
    (plms,) = AtelierMomentumSampler().get_sampler("hb_plms", 3.8)
    euler = run(KSamplerSelect().get_sampler("euler")[0])
    assert torch.equal(run(ddim), euler)
    assert not torch.allclose(run(ghvb), euler) and not torch.allclose(run(plms), euler)
    # every method converges to the data's mean on this smooth problem
    assert abs(float(run(ghvb).mean()) - 0.3) < 0.1


def test_f_scheduler_sigmas_are_the_schedules_truncated_grid(tiny_sd1_prompts):
    from nodes.generation.nodes import AtelierFScheduler
    from nodes.sampling.schedules import f_scheduler_schedule

    model = tiny_sd1_prompts[0]
    (sigmas,) = AtelierFScheduler().get_sigmas(model, 5)
    _, expected = f_scheduler_schedule(model.model.schedule, 5, "sd1")
    assert sigmas.shape == (6,) and torch.allclose(sigmas.double(), expected) and float(sigmas[-1]) > 0.1
