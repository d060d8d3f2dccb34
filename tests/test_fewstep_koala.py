"""KOALA (issue 25): the shipped UNet configs against the published models, detection from a config, a state
dict's keys or ComfyUI's model, the preset's Euler against diffusers' on the authors' grids, the node, and KOALA as
T-Stitch's small model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

from fixtures_models import tiny_sdxl  # noqa: F401
from nodes.fewstep.koala import (KOALA_PRESETS, KOALA_UNETS, koala_config_dir, koala_timesteps, koala_unet_of_config,
                                 koala_unet_of_keys)
from nodes.fewstep.nodes import AtelierKOALA
from nodes.models.loading import load_model
from nodes.models.model_configs import SHIPPED_CONFIGS
from nodes.models.refs import ModelRef
from nodes.sampling.k_samplers import Sampler, run_sampler
from nodes.sampling.model_sampling import DiscreteModelSampling
from nodes.sampling.schedules import timestep_sigmas
from tiny_models import mixing_eps_network, save_tiny_koala

# huggingface.co/etri-vilab/koala-700m and koala-1b (and the Lightning ones), unet/diffusion_pytorch_model.safetensors
# listed as 3.13 GB and 4.64 GB (float32); ComfyUI v0.3.64's comfy/model_detection.py KOALA_700M / KOALA_1B give the
# same depths (one ResNet per level, transformer depths [0, 2, 5] without a mid block, [0, 2, 6] with one of 6).
PUBLISHED = {"koala_700m": (782_822_724, 3.13), "koala_1b": (1_161_184_324, 4.64)}
SDXL_SCHEDULER = os.path.join(SHIPPED_CONFIGS, "sdxl", "scheduler")


def _meta_unet(folder: str) -> UNet2DConditionModel:
    with open(os.path.join(folder, "unet", "config.json")) as file:
        config = json.load(file)
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize("name", list(KOALA_UNETS))
def test_shipped_configs_count_the_published_parameters_and_are_detected(name):
    unet = _meta_unet(koala_config_dir(name))
    count = sum(parameter.numel() for parameter in unet.parameters())
    parameters, gigabytes = PUBLISHED[name]
    assert count == parameters and round(4 * count / 1e9, 2) == gigabytes
    assert koala_unet_of_config(dict(unet.config)) == name
    assert koala_unet_of_keys(unet.state_dict().keys()) == name


def test_sdxls_own_unet_is_no_koala():
    unet = _meta_unet(os.path.join(SHIPPED_CONFIGS, "sdxl"))
    assert koala_unet_of_config(dict(unet.config)) is None
    assert koala_unet_of_keys(unet.state_dict().keys()) is None
    sd15 = _meta_unet(os.path.join(SHIPPED_CONFIGS, "sd15"))
    assert koala_unet_of_keys(sd15.state_dict().keys()) is None and koala_unet_of_config(dict(sd15.config)) is None


@pytest.mark.parametrize("weights,steps", [("KOALA-Lightning-700M", 10), ("KOALA-1B", 25)])
def test_grids_are_diffusers_euler_grids_of_sdxls_scheduler(weights, steps):
    preset = KOALA_PRESETS[weights]
    scheduler = EulerDiscreteScheduler.from_pretrained(SDXL_SCHEDULER, timestep_spacing=preset.spacing)
    scheduler.set_timesteps(steps)
    assert koala_timesteps(preset, steps).tolist() == scheduler.timesteps.long().tolist()


@pytest.mark.parametrize("weights", ["KOALA-Lightning-1B", "KOALA-700M"])
def test_the_presets_euler_is_diffusers_euler_step_for_step(weights):
    """diffusers' EulerDiscreteScheduler.step (the authors' sampler), from the same start, on a tiny ε-network:
    the same latents within 1e-5 (float64)."""
    preset = KOALA_PRESETS[weights]
    scheduler = EulerDiscreteScheduler.from_pretrained(SDXL_SCHEDULER, timestep_spacing=preset.spacing)
    scheduler.set_timesteps(preset.steps)
    alphas = scheduler.alphas_cumprod.double()
    network = mixing_eps_network(alphas, seed=1)
    generator = torch.Generator().manual_seed(1)

    sampling = DiscreteModelSampling(alphas)
    sigmas = timestep_sigmas(_schedule(alphas), koala_timesteps(preset, preset.steps)).double()
    noise = torch.randn(1, 4, 6, 6, dtype=torch.float64, generator=generator)
    ours = run_sampler(Sampler.from_name("euler"), lambda x, s: sampling.apply_model(network, x, s), sampling,
                       sigmas, noise, torch.zeros_like(noise), seed=0)
    x = sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), sampling.is_max_denoise(sigmas))
    for t in scheduler.timesteps:
        x = scheduler.step(network(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


def _schedule(alphas):
    from nodes.common.denoiser import NoiseSchedule
    return NoiseSchedule(alphas, "epsilon")


@pytest.fixture(scope="module")
def tiny_koala(tmp_path_factory):
    """A tiny KOALA-700M-shaped SDXL diffusers folder, as the published ones are laid out, loaded."""
    folder = save_tiny_koala(tmp_path_factory.mktemp("koala") / "koala-lightning-700m")
    return ModelRef(load_model(folder, device="cpu"))


def test_the_node_gives_the_lightning_preset_and_refuses_another_unet(tiny_koala, tiny_sdxl):  # noqa: F811
    model, sampler, sigmas, cfg = AtelierKOALA().apply(tiny_koala, "KOALA-Lightning-700M", 0)
    assert model is tiny_koala and sampler.name == "euler" and cfg == 3.5 and sigmas.shape == (11,)
    expected = timestep_sigmas(tiny_koala.model.schedule, koala_timesteps(KOALA_PRESETS["KOALA-Lightning-700M"], 10))
    assert torch.equal(sigmas, expected)
    with pytest.raises(ValueError, match="KOALA-Lightning-1B expects KOALA-1B's UNet; this MODEL's UNet is "
                                         "KOALA-700M's"):
        AtelierKOALA().apply(tiny_koala, "KOALA-Lightning-1B", 0)
    with pytest.raises(ValueError, match="expects KOALA-700M's UNet; this MODEL's UNet is not a KOALA UNet \\(SDXL\\)"):
        AtelierKOALA().apply(ModelRef(load_model(tiny_sdxl.folder, device="cpu")), "KOALA-700M", 0)


def test_a_model_of_neither_host_is_refused():
    from nodes.fewstep.koala import koala_unet_of_model
    with pytest.raises(TypeError, match="got object"):
        koala_unet_of_model(object())


def test_koala_serves_as_t_stitchs_small_model_for_sdxl(tiny_koala, tiny_sdxl):  # noqa: F811
    """T-Stitch's small model on SDXL (techniques.md row 38): the KOALA UNet takes the first 40 % of the steps of
    the SDXL model's run, which then differs from the SDXL model alone."""
    from nodes.models.clip import Clip
    from nodes.tstitch.nodes import AtelierTStitch
    from web.nodes_sampling import KSampler

    large = ModelRef(load_model(tiny_sdxl.folder, device="cpu"))
    clip = Clip(large)
    positive, negative = clip.encode("a red circle"), clip.encode("")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    stitched = AtelierTStitch().patch(large, tiny_koala, 0.4)[0]
    mixed = KSampler().sample(stitched, 1, 4, 3.5, "euler", "normal", positive, negative, latent, 1.0)[0]["samples"]
    alone = KSampler().sample(large, 1, 4, 3.5, "euler", "normal", positive, negative, latent, 1.0)[0]["samples"]
    assert torch.isfinite(mixed).all() and not torch.allclose(mixed, alone, atol=1e-4)


def test_the_example_workflow_runs_headless_on_a_stand_in_folder(tmp_path, capsys):
    from web.cli import main

    save_tiny_koala(tmp_path / "models" / "diffusers" / "koala-lightning-700m")
    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "koala.json")
    assert main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                 "--set", "5.width=64", "--set", "5.height=64"]) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if "output: " in line]
    assert len(saved) == 1 and "koala_" in saved[0]
