"""The UNet split (techniques.md §3.1, Target 2) and Faster Diffusion (§4.1, Targets 3 and 4): the split reproduces
the full forward; all-key sampling is the plain KSampler; the paper's 50-step set runs the encoder 9 times in 50
steps; a non-key step ignores its latent; parallel decoding equals sequential; the noise injection makes an Euler
step land where it lands from the injected latent; and the patched MODEL runs where it should and only there."""

from __future__ import annotations

import pytest
import torch

from fixtures_models import tiny_sd1, tiny_sd1_prompts  # noqa: F401  (session fixtures)
from nodes.common.unet_split import DiffusersUNetCall, UNetFeatures
from nodes.fasterdiffusion.nodes import AtelierFasterDiffusion
from nodes.fasterdiffusion.propagation import EncoderPropagation, key_steps
from nodes.models.comfy_adapters import denoiser_and_latent_space
from nodes.sampling.model_sampling import DiscreteModelSampling
from nodes.sampling.patches import StepSchedule, patch_model
from tiny_models import build_tiny_pipeline
from web.nodes_sampling import KSampler


@pytest.fixture(scope="module")
def unets() -> dict:
    return {family: build_tiny_pipeline(family, seed=2).unet.eval() for family in ("sd1", "sdxl")}


def _sdxl_added(batch: int) -> dict:
    generator = torch.Generator().manual_seed(5)
    return {"text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)}


@pytest.mark.parametrize("size", [(8, 8), (12, 10)])  # 12×10: not a multiple of the UNet's 8, sizes forwarded
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_encode_then_decode_is_the_full_forward(unets, family, size):
    unet = unets[family]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=generator)
    t = torch.tensor([981.0, 301.0])
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    added = _sdxl_added(2) if family == "sdxl" else None
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=states, added_cond_kwargs=added).sample
        call = DiffusersUNetCall(unet, states, added)
        features = call.encode(x, t)
        assert len(features.skips) == 1 + sum(len(block.resnets) + (block.downsamplers is not None)
                                              for block in unet.down_blocks)
        assert torch.allclose(call.decode(features, t), expected, atol=1e-5, rtol=0)
        assert torch.equal(call.forward(x, t), expected)


def test_split_adds_controlnet_residuals_at_encode_time_as_diffusers_does(unets):
    unet = unets["sd1"]
    generator = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500.0])
    states = torch.randn(1, 77, 32, generator=generator)
    plain = DiffusersUNetCall(unet, states).encode(x, t)
    down = tuple(torch.randn(skip.shape, generator=generator) for skip in plain.skips)
    mid = torch.randn(plain.mid.shape, generator=generator)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        assert torch.equal(DiffusersUNetCall(unet, states, None, down, mid).forward(x, t), expected)
    with pytest.raises(ValueError, match="both"):
        DiffusersUNetCall(unet, states, None, down, None)


def test_decoding_several_timesteps_in_one_batch_equals_decoding_each(unets):
    unet = unets["sdxl"]
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    call = DiffusersUNetCall(unet, torch.randn(2, 77, 96, generator=generator), _sdxl_added(2))
    with torch.no_grad():
        features = call.encode(x, torch.tensor([900.0, 900.0]))
        one_by_one = [call.decode(features, torch.tensor([t, t])) for t in (900.0, 700.0, 500.0)]
        batched = call.decode(features.repeat(3), torch.tensor([900.0, 900.0, 700.0, 700.0, 500.0, 500.0]))
    assert torch.allclose(batched, torch.cat(one_by_one), atol=1e-5, rtol=0)


def test_key_step_sets_are_the_official_ones():
    assert sorted(key_steps(50)) == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert len(key_steps(100)) == 10 + 16 + 14  # i < 10, 10..85 by 5, i > 85
    assert key_steps(75) == frozenset(i for i in range(75) if i < 10 or i > 65 or i % 5 == 0)
    assert sorted(key_steps(25)) == [0, 1, 2, 5, 8, 12, 18]  # the 50-step set scaled (round half to even)
    assert key_steps(7, "uniform", 1) == frozenset(range(7))
    with pytest.raises(ValueError, match="mode"):
        key_steps(50, "sometimes")


class CountingCall:
    """A UNet call whose encoder sums the latent and whose decoder adds the timestep: it counts both."""

    batches_steps = True

    def __init__(self):
        self.encodes, self.decodes = 0, 0

    def encode(self, x, timesteps):
        self.encodes += 1
        return UNetFeatures((x,), x.sum(dim=(1, 2, 3), keepdim=True).expand_as(x).clone())

    def decode(self, features, timesteps):
        self.decodes += 1
        return features.mid + timesteps.reshape(-1, 1, 1, 1)

    def forward(self, x, timesteps):
        return self.decode(self.encode(x, timesteps), timesteps)


def _run(patch: EncoderPropagation, steps: StepSchedule, latents: list[torch.Tensor], call) -> list[torch.Tensor]:
    return [patch.unet(call, x, steps.timesteps[i].expand(x.shape[0]), steps) for i, x in enumerate(latents)]


def test_paper_set_runs_the_encoder_9_times_in_50_steps_and_a_non_key_step_ignores_its_latent():
    sampling = DiscreteModelSampling.from_beta_schedule()
    steps = StepSchedule.of(torch.cat([sampling.sigmas.flip(0)[::20], torch.zeros(1)]), sampling.timestep)
    assert steps.count == 50
    latents = [torch.full((2, 4, 2, 2), float(i)) for i in range(50)]
    call = CountingCall()
    outputs = _run(EncoderPropagation(noise_alpha=0, parallel=False), steps, latents, call)
    assert (call.encodes, call.decodes) == (9, 50)
    in_groups = CountingCall()
    assert all(torch.equal(a, b) for a, b in zip(_run(EncoderPropagation(noise_alpha=0), steps, latents, in_groups),
                                                   outputs))
    # groups of at most 10: [0] [1] [2] [3, 4] [5..9] [10..14] [15..24] [25..34] [35..44] [45..49]
    assert (in_groups.encodes, in_groups.decodes) == (9, 10)
    # step 4 reuses step 3's features: its output is step 3's encoding decoded at step 4's timestep
    assert torch.equal(outputs[4], CountingCall().decode(CountingCall().encode(latents[3], None),
                                                          steps.timesteps[4].expand(2)))
    other = [x if i != 4 else torch.randn_like(x) for i, x in enumerate(latents)]
    assert torch.equal(_run(EncoderPropagation(noise_alpha=0, parallel=False), steps, other, CountingCall())[4],
                       outputs[4])


def test_parallel_decoding_equals_sequential_and_batches_each_group():
    sampling = DiscreteModelSampling.from_beta_schedule()
    steps = StepSchedule.of(torch.cat([sampling.sigmas.flip(0)[::100], torch.zeros(1)]), sampling.timestep)
    latents = [torch.randn(2, 4, 2, 2) for _ in range(steps.count)]
    sequential = _run(EncoderPropagation("uniform", 4, noise_alpha=0, parallel=False), steps, latents,
                      CountingCall())
    call = CountingCall()
    parallel = _run(EncoderPropagation("uniform", 4, noise_alpha=0, parallel=True, max_group=3), steps, latents, call)
    for a, b in zip(parallel, sequential):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    # 10 steps, keys 0, 4, 8; groups of at most 3: {0,1,2} {3} {4,5,6} {7} {8,9}
    assert (call.encodes, call.decodes) == (3, 5)


def test_noise_injection_makes_an_euler_step_land_where_it_lands_from_the_injected_latent():
    sampling = DiscreteModelSampling.from_beta_schedule()
    sigmas = torch.tensor([14.6, 3.0, 0.8, 0.2, 0.0])
    steps = StepSchedule.of(sigmas, sampling.timestep)
    assert steps.timesteps[1] > 500 > steps.timesteps[2]  # injection from step 2 on

    def denoiser(x):  # any D(x, σ); this one is not linear in x
        return torch.tanh(x) * 0.7

    patch = EncoderPropagation(noise_alpha=0.003)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(6)) * (1 + 14.6 ** 2) ** 0.5
    z_start = x0 / (1 + 14.6 ** 2) ** 0.5
    x = x0
    for i in range(4):
        sigma, next_sigma = float(sigmas[i]), float(sigmas[i + 1])
        d = patch.denoised(denoiser, x, sigmas[i:i + 1], steps)
        stepped = x + (next_sigma - sigma) * (x - d) / sigma
        if i < 2:
            assert torch.equal(d, denoiser(x))
        else:
            injected = x + 0.003 * z_start * (1 + sigma ** 2) ** 0.5
            expected = injected + (next_sigma - sigma) * (injected - denoiser(injected)) / sigma
            assert torch.allclose(stepped, expected, atol=1e-5, rtol=0)
        x = stepped


def test_all_key_steps_sample_exactly_as_the_plain_ksampler_and_the_paper_set_changes_the_picture(
        tiny_sd1_prompts):
    model, positive, negative = tiny_sd1_prompts
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    args = (3, 8, 5.0, "ddim", "ddim_uniform", positive, negative, latent, 1.0)
    (plain,) = KSampler().sample(model, *args)
    node = AtelierFasterDiffusion()
    (every_step,) = node.patch(model, "uniform", 1, 0.0, 500, False, 10)
    assert torch.equal(KSampler().sample(every_step, *args)[0]["samples"], plain["samples"])
    (paper,) = node.patch(model, "paper", 4, 0.003, 500, False, 10)
    (accelerated,) = KSampler().sample(paper, *args)
    assert not torch.equal(accelerated["samples"], plain["samples"])
    (parallel,) = node.patch(model, "paper", 4, 0.003, 500, True, 10)
    assert torch.allclose(KSampler().sample(parallel, *args)[0]["samples"], accelerated["samples"], atol=1e-5)
    assert model.sampling_patch is None  # the input MODEL is unchanged


def test_a_patched_model_is_refused_twice_and_by_nodes_with_samplers_of_their_own(tiny_sd1_prompts):
    model = tiny_sd1_prompts[0]
    patched = patch_model(model, EncoderPropagation())
    with pytest.raises(ValueError, match="sampling patch already"):
        patch_model(patched, EncoderPropagation())
    with pytest.raises(ValueError, match="does not run a sampling patch"):
        with denoiser_and_latent_space(patched):
            pass
    with pytest.raises(TypeError, match="Atelier's or ComfyUI's MODEL"):
        patch_model(object(), EncoderPropagation())

