"""Hyper-SD (issue 25): the published LoRA layout, the model card's presets and their samplers against the
authors' update rules (diffusers' DDIMScheduler with trailing spacing, TCDScheduler), and the node."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DDIMScheduler, TCDScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from fixtures_models import tiny_sd1, tiny_sd1_prompts, tiny_sd1_prompts_no_loras, tiny_sdxl  # noqa: F401
from nodes.common.denoiser import NoiseSchedule
from nodes.fewstep import nodes as fewstep_nodes
from nodes.fewstep.hypersd import (HYPER_SD_PRESETS, check_lora_family, hyper_sd_sigmas, lora_context_width,
                                   preset_name_for_file)
from nodes.models.model_configs import SHIPPED_CONFIGS
from nodes.sampling.ddim import trailing_timesteps
from nodes.sampling.k_samplers import Sampler, run_sampler, sample_tcd
from nodes.sampling.model_sampling import DiscreteModelSampling
from nodes.sampling.schedules import TCD_ORIGINAL_STEPS, tcd_timesteps
from tiny_models import build_tiny_pipeline, hyper_sd_layout, mixing_eps_network, write_hyper_sd_lora

# Hyper-SD's files are LCM-LoRA's layout (tiny_models.HYPER_SD_LORA_TARGETS) at rank 64 in float32: for SD1.5's UNet
# that serialises to exactly the 269,127,064 bytes of the published Hyper-SD15-{2,4,8}steps-lora.safetensors
# (huggingface.co/ByteDance/Hyper-SD, commit 123f4ee "upload SD15 loras", the LFS pointers' sizes).
PUBLISHED_RANK = 64
PUBLISHED_SD15_BYTES = 269_127_064
# Hyper-SDXL-*-lora.safetensors are listed as 787 MB on the same page; SDXL's UNet in that layout holds
# 196,752,148 float32 numbers (787.0 MB) before the header.
PUBLISHED_SDXL_NUMBERS = 196_752_148


def full_size_unet(family: str) -> UNet2DConditionModel:
    with open(os.path.join(SHIPPED_CONFIGS, family, "unet", "config.json")) as file:
        config = json.load(file)
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


# ---------------------------------------------------------------------------------------- the published layout

def test_the_sd15_layout_at_full_size_is_byte_for_byte_the_published_files_size(tmp_path):
    shapes = hyper_sd_layout(full_size_unet("sd15"), PUBLISHED_RANK)
    path = tmp_path / "Hyper-SD15-8steps-lora.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    assert os.path.getsize(path) == PUBLISHED_SD15_BYTES
    assert lora_context_width(str(path)) == 768
    check_lora_family(str(path), "Hyper-SD15-8steps-lora", "sd1")


def test_the_sdxl_layout_at_full_size_holds_the_published_files_numbers():
    shapes = hyper_sd_layout(full_size_unet("sdxl"), PUBLISHED_RANK)
    numbers = sum(torch.Size(shape).numel() for shape in shapes.values())
    assert numbers == PUBLISHED_SDXL_NUMBERS
    assert any(key.endswith("attn2_to_k.lora_down.weight") and shape[-1] == 2048 for key, shape in shapes.items())


# --------------------------------------------------------------------------------------------- presets, grids

def test_every_published_file_name_has_its_model_cards_preset():
    assert len(HYPER_SD_PRESETS) == 12
    assert HYPER_SD_PRESETS["Hyper-SD15-1step-lora"].sampler == "tcd"
    assert HYPER_SD_PRESETS["Hyper-SD15-1step-lora"].eta == 1.0
    assert HYPER_SD_PRESETS["Hyper-SDXL-12steps-CFG-lora"].cfg == 5.0
    assert HYPER_SD_PRESETS["Hyper-SDXL-4steps-lora"].cfg == 1.0
    assert HYPER_SD_PRESETS["Hyper-SDXL-4steps-lora"].family == "sdxl"
    for name, preset in HYPER_SD_PRESETS.items():
        assert preset_name_for_file(f"/x/{name}.safetensors") == name
        assert preset_name_for_file(f"{name.upper()} (1).safetensors") == name
        assert preset.steps == (1 if "1step" in name else int(name.split("-")[2].removesuffix("steps")))
    with pytest.raises(ValueError, match="not named as a Hyper-SD LoRA"):
        preset_name_for_file("my_lora.safetensors")
    with pytest.raises(ValueError, match="not named"):
        preset_name_for_file("Hyper-SD15-8steps-loraX.safetensors")


def test_grids_are_diffusers_trailing_ddim_and_tcd_grids_at_every_step_count_the_node_takes():
    for steps in range(1, TCD_ORIGINAL_STEPS + 1):
        ddim = DDIMScheduler(timestep_spacing="trailing")
        ddim.set_timesteps(steps)
        assert trailing_timesteps(steps).tolist() == ddim.timesteps.tolist(), steps
        tcd = TCDScheduler()
        tcd.set_timesteps(steps)
        assert tcd_timesteps(steps).tolist() == tcd.timesteps.tolist(), steps
    ddim.set_timesteps(61)  # diffusers' float range gains a 62nd entry there, timestep -1: the grid is the first 61
    assert trailing_timesteps(61).tolist() == ddim.timesteps.tolist()[:61] and ddim.timesteps.tolist()[61:] == [-1]


def test_grids_refuse_step_counts_out_of_range():
    with pytest.raises(ValueError, match="steps must be in \\[1, 1000\\]"):
        trailing_timesteps(0)
    with pytest.raises(ValueError, match="steps must be in \\[1, 50\\]"):
        tcd_timesteps(51)
    with pytest.raises(ValueError, match="sampler must be one of"):
        hyper_sd_sigmas(NoiseSchedule(_schedule(), "epsilon"), "euler", 4)


# ------------------------------------------------------------------- the samplers against the authors' rules

@pytest.fixture(scope="module")
def eps_network():
    """SD1's tiny UNet with a fixed random prompt as an ε-network on (VP latent, integer timestep), added to the
    exact ε of unit-Gaussian data, √(1 − ᾱ_t)·x, so that x̂₀ stays of order one as a trained model's does.

    In float64, with float64 latents: the comparisons test the update rules, not float32 rounding (from pure noise
    x̂₀ = x − σ·ε multiplies ε's rounding by σ_max ≈ 14.6).
    """
    unet = build_tiny_pipeline("sd1", seed=3).unet.eval().double()
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(5),
                          dtype=torch.float64)
    alphas = _schedule()

    @torch.no_grad()
    def network(x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        random = unet(x, t, encoder_hidden_states=context.expand(x.shape[0], -1, -1)).sample
        return (1 - alphas[t.long()]).sqrt().reshape(-1, 1, 1, 1) * x + 0.1 * random

    return network


SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}  # SD's scheduler config


def _schedule() -> torch.Tensor:
    return DDIMScheduler(**SD_BETAS).alphas_cumprod.double()


def _ours(eps_network, sampler: Sampler, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    sampling = DiscreteModelSampling(_schedule())
    return run_sampler(sampler, lambda x, sigma: sampling.apply_model(eps_network, x, sigma), sampling, sigmas,
                       noise, torch.zeros_like(noise), seed=0)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_ddim_preset_reproduces_trailing_ddim(eps_network, steps):
    """The authors run diffusers' DDIM (η 0) on trailing timesteps; written out, and diffusers' own step."""
    alphas = _schedule()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    timesteps = trailing_timesteps(steps).tolist()
    x = noise.clone()
    for i, t in enumerate(timesteps):
        alpha_prev = alphas[timesteps[i + 1]] if i + 1 < steps else alphas.new_tensor(1.0)  # ends at σ 0: ᾱ = 1
        eps = eps_network(x, t)
        x0 = (x - (1 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
        x = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
    scheduler = DDIMScheduler(**SD_BETAS, timestep_spacing="trailing", set_alpha_to_one=True,
                              clip_sample=False)
    scheduler.set_timesteps(steps)
    reference = noise.clone()
    for t in scheduler.timesteps:
        reference = scheduler.step(eps_network(reference, t), t, reference).prev_sample
    ours = _ours(eps_network, Sampler.from_name("ddim"), hyper_sd_sigmas_for_sd(steps, "ddim"), noise)
    assert torch.allclose(x, reference, atol=1e-5)
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


def hyper_sd_sigmas_for_sd(steps: int, sampler: str) -> torch.Tensor:
    return hyper_sd_sigmas(NoiseSchedule(_schedule(), "epsilon"), sampler, steps)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 4])
def test_tcd_reproduces_the_tcd_step_with_the_same_draws(eps_network, gamma, steps):
    """TCD's rule written out in the VP form (diffusers' TCDScheduler.step), with its last step ending at t = 0
    as diffusers does (σ_min given as the last sigma): same latents within 1e-5, and diffusers' own step too."""
    alphas = _schedule()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    timesteps = tcd_timesteps(steps).tolist()
    draws = torch.Generator().manual_seed(7)
    x = noise.clone()
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < steps else 0
        s = int((1 - gamma) * prev)
        eps = eps_network(x, t)
        x0 = (x - (1 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
        x_s = alphas[s].sqrt() * x0 + (1 - alphas[s]).sqrt() * eps
        if gamma > 0 and i + 1 < steps:
            z = torch.randn(x.shape, generator=draws, dtype=x.dtype)
            x = (alphas[prev] / alphas[s]).sqrt() * x_s + (1 - alphas[prev] / alphas[s]).sqrt() * z
        else:
            x = x_s
    scheduler = TCDScheduler(**SD_BETAS)
    scheduler.set_timesteps(steps)
    reference, generator = noise.clone(), torch.Generator().manual_seed(7)
    for t in scheduler.timesteps:
        reference = scheduler.step(eps_network(reference, t), t, reference, eta=gamma, generator=generator).prev_sample
    assert torch.allclose(x, reference, atol=1e-5)

    ours_draws = torch.Generator().manual_seed(7)
    sampling = DiscreteModelSampling(_schedule())
    sigmas = hyper_sd_sigmas_for_sd(steps, "tcd")
    sigmas[-1] = sampling.sigma_min  # diffusers' t = 0
    sampler = Sampler(sample_tcd, {"gamma": gamma,
                                   "noise_sampler": lambda s, s_next: torch.randn(noise.shape, generator=ours_draws,
                                                                                   dtype=noise.dtype)})
    ours = _ours(eps_network, sampler, sigmas, noise)
    alpha_0 = alphas[0]
    assert torch.allclose(ours * alpha_0.sqrt(), x, atol=1e-5), (ours * alpha_0.sqrt() - x).abs().max()


def test_tcd_with_gamma_zero_is_ddim_and_refuses_gamma_out_of_range(eps_network):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigmas = hyper_sd_sigmas_for_sd(4, "ddim")
    tcd = _ours(eps_network, Sampler(sample_tcd, {"gamma": 0.0}), sigmas, noise)
    ddim = _ours(eps_network, Sampler.from_name("ddim"), sigmas, noise)
    assert torch.allclose(tcd, ddim, atol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        _ours(eps_network, Sampler(sample_tcd, {"gamma": 1.5}), sigmas, noise)


# ------------------------------------------------------------------------------------------------------ the node

@pytest.fixture
def loras_dir(tmp_path, monkeypatch, tiny_sd1):
    folder = tmp_path / "loras"
    folder.mkdir()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(tiny_sd1.folder, "unet"))
    for name in ("Hyper-SD15-8steps-CFG-lora", "Hyper-SD15-1step-lora", "Hyper-SDXL-8steps-CFG-lora", "renamed"):
        write_hyper_sd_lora(unet, folder / f"{name}.safetensors", seed=len(name))
    # a file named for SD1.5 that holds an SDXL LoRA (cross-attention width 2048)
    save_file({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
               torch.zeros(4, 2048)}, str(folder / "Hyper-SD15-4steps-lora.safetensors"))
    monkeypatch.setattr(fewstep_nodes.AtelierHyperSD, "models_dir", str(tmp_path))
    return folder


@pytest.fixture
def prompts(tiny_sd1_prompts_no_loras):
    return tiny_sd1_prompts_no_loras


def test_the_node_applies_the_lora_and_gives_the_cards_preset(loras_dir, prompts):
    from web.nodes_sampling import SamplerCustom

    model, positive, negative = prompts
    node = fewstep_nodes.AtelierHyperSD()
    out = node.apply(model, "Hyper-SD15-8steps-CFG-lora.safetensors", "auto", 1.0, 0, 1.0)
    patched, sampler, sigmas, cfg = out["result"]
    assert "DDIM, trailing timesteps, 8 step(s), cfg 5" in out["ui"]["text"][0]
    assert sampler.name == "ddim" and cfg == 5.0 and sigmas.shape == (9,) and sigmas[-1] == 0
    assert torch.allclose(sigmas[:-1], model.model.schedule.ve_sigmas()[trailing_timesteps(8)].float())
    assert [spec.strength_model for spec in patched.loras] == [1.0]

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with_lora = SamplerCustom().sample(patched, True, 3, cfg, positive, negative, sampler, sigmas, latent)[0]
    without = SamplerCustom().sample(model, True, 3, cfg, positive, negative, sampler, sigmas, latent)[0]
    assert torch.isfinite(with_lora["samples"]).all()
    assert not torch.allclose(with_lora["samples"], without["samples"], atol=1e-4)  # the LoRA's layers ran

    one_step = node.apply(model, "Hyper-SD15-1step-lora.safetensors", "auto", 1.0, 4, 0.5)
    _, tcd, tcd_sigmas, tcd_cfg = one_step["result"]
    assert tcd.function is sample_tcd and tcd.options == {"gamma": 0.5} and tcd_cfg == 1.0
    assert torch.allclose(tcd_sigmas[:-1], model.model.schedule.ve_sigmas()[tcd_timesteps(4)].float())
    assert "TCD (eta 0.5), 4 step(s)" in one_step["ui"]["text"][0]


def test_the_node_refuses_what_the_model_cannot_take_naming_the_model(loras_dir, prompts):
    model = prompts[0]
    node = fewstep_nodes.AtelierHyperSD()
    with pytest.raises(ValueError, match="for SDXL-family models; this MODEL is SD1.5: use Hyper-SD15-8steps-CFG"):
        node.apply(model, "Hyper-SDXL-8steps-CFG-lora.safetensors", "auto", 1.0, 0, 1.0)
    with pytest.raises(ValueError, match="LoRA for SDXL models .*width 2048.*Hyper-SD15-4steps-lora"):
        node.apply(model, "Hyper-SD15-4steps-lora.safetensors", "auto", 1.0, 0, 1.0)
    with pytest.raises(ValueError, match="not named as a Hyper-SD LoRA"):
        node.apply(model, "renamed.safetensors", "auto", 1.0, 0, 1.0)
    chosen = node.apply(model, "renamed.safetensors", "Hyper-SD15-2steps-lora", 1.0, 0, 1.0)["result"]
    assert chosen[2].shape == (3,)


def test_the_example_workflow_runs_headless_with_a_stand_in_lora_for_the_embedded_model(tmp_path, capsys):
    from nodes.loaders.nodes import EMBEDDED_CHECKPOINT
    from nodes.models.loading import load_model
    from web.cli import main

    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    write_hyper_sd_lora(load_model(EMBEDDED_CHECKPOINT).unet, loras / "Hyper-SD15-8steps-CFG-lora.safetensors")
    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                            "hypersd.json")
    assert main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")]) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if "output: " in line]
    assert len(saved) == 1 and "hypersd_" in saved[0]


# ------------------------------------------------------------------- the SDXL 1-step UNet

def test_the_sdxl_1step_unets_preset_is_one_lcm_step_from_timestep_800(tiny_sdxl, tiny_sd1):  # noqa: F811
    """The card's LCMScheduler (SDXL's scheduler config, timesteps=[800], one step) written out and diffusers' own
    step, against SamplerCustom's loop with the node's outputs from the same VP latent: the same x̂₀ within 1e-5
    (LCM's c_skip at t = 800 is 4e-9). The UNet file itself is SDXL's (the card's strict load_state_dict): its
    2,567,463,684 parameters are counted in test_fewstep_rectified_diffusion.py."""
    from diffusers import LCMScheduler

    from nodes.fewstep.nodes import AtelierHyperSDXLUNet
    from nodes.models.loading import load_model
    from nodes.models.refs import ModelRef

    model = ModelRef(load_model(tiny_sdxl.folder))
    same, sampler, sigmas, cfg = AtelierHyperSDXLUNet().apply(model, 800)
    assert same is model and sampler.name == "lcm" and cfg == 1.0 and sigmas.shape == (2,)
    with pytest.raises(ValueError, match="Hyper-SDXL-1step-Unet is SDXL's UNet; this MODEL is SD1.5"):
        AtelierHyperSDXLUNet().apply(ModelRef(load_model(tiny_sd1.folder)), 800)
    scheduler = LCMScheduler.from_pretrained(os.path.join(SHIPPED_CONFIGS, "sdxl", "scheduler"))
    scheduler.set_timesteps(timesteps=[800])
    alphas = scheduler.alphas_cumprod.double()
    network = mixing_eps_network(alphas, seed=4)
    noise = torch.randn(1, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sigma = float(sigmas[0])
    start = noise * sigma / (1 + sigma ** 2) ** 0.5  # SamplerCustom's start σ·noise, as a VP latent
    eps = network(start, 800)
    x0 = (start - (1 - alphas[800]).sqrt() * eps) / alphas[800].sqrt()
    scaled = 800 * 10.0  # LCM's timestep_scaling
    c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25) ** 0.5
    written = c_skip * start + c_out * x0
    reference = scheduler.step(eps, scheduler.timesteps[0], start).prev_sample
    sampling = DiscreteModelSampling(alphas)
    ours = run_sampler(Sampler.from_name("lcm"), lambda x, s: sampling.apply_model(network, x, s), sampling,
                       sigmas.double(), noise, torch.zeros_like(noise), seed=0)
    assert torch.allclose(written, reference, atol=1e-5)
    assert torch.allclose(ours, written, atol=1e-5), (ours - written).abs().max()
