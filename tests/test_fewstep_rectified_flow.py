"""InstaFlow and 2-Rectified Flow (issue 25): the flow's sampling view, the node, and the authors' pipeline loop
written out against SamplerCustom with the node's outputs on a tiny SD1 UNet."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel

from fixtures_models import tiny_sd1, tiny_sdxl  # noqa: F401
from nodes.fewstep.nodes import AtelierRectifiedFlow
from nodes.fewstep.rectified_flow import RECTIFIED_FLOW_PRESETS, rectified_flow_sigmas
from nodes.generation.nodes import AtelierSampler
from nodes.models.comfy_adapters import noise_schedule
from nodes.models.loading import load_model
from nodes.models.model_configs import SHIPPED_CONFIGS
from nodes.models.refs import ModelRef
from nodes.sampling.model_sampling import RectifiedFlowSampling
from nodes.sampling.noise import prepare_noise

# huggingface.co/XCLiu/instaflow_0_9B_from_sd_1_5 (and 2_rectified_flow_from_sd_1_5): a diffusers folder whose
# unet/diffusion_pytorch_model.safetensors is listed as 3.44 GB, SD1.5's UNet (859,520,964 parameters) in float32.
SD15_UNET_PARAMETERS = 859_520_964
PUBLISHED_UNET_GB = 3.44
SEED = 5


def test_the_published_unet_is_sd15s_architecture_at_its_listed_size():
    with open(os.path.join(SHIPPED_CONFIGS, "sd15", "unet", "config.json")) as file:
        config = json.load(file)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    count = sum(parameter.numel() for parameter in unet.parameters())
    assert count == SD15_UNET_PARAMETERS
    assert round(4 * count / 1e9, 2) == PUBLISHED_UNET_GB


def test_the_flow_sampling_is_comfyuis_discrete_flow_with_the_velocity_toward_the_data():
    sampling = RectifiedFlowSampling()
    assert float(sampling.sigma_min) == pytest.approx(0.001) and float(sampling.sigma_max) == 1.0
    sigma = torch.tensor([0.25])
    x, velocity = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.equal(sampling.calculate_input(sigma, x), x)
    assert torch.allclose(sampling.calculate_denoised(sigma, velocity, x), x + 0.25 * velocity)
    noise, latent = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.allclose(sampling.noise_scaling(sigma, noise, latent), 0.25 * noise + 0.75 * latent)
    assert sampling.is_max_denoise(rectified_flow_sigmas(3)) and not sampling.is_max_denoise(torch.tensor([0.5, 0]))
    assert float(sampling.timestep(torch.tensor(0.75))) == 750.0
    assert sampling.percent_to_sigma(0.2) == pytest.approx(0.8)


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory, tiny_sd1):  # noqa: F811
    """The tiny SD1 model as a published rectified-flow folder is laid out (a diffusers folder), loaded by the
    standalone CheckpointLoaderSimple from models/diffusers, with its prompts."""
    from web.nodes_loaders import CheckpointLoaderSimple

    models = tmp_path_factory.mktemp("flow_models")
    shutil.copytree(tiny_sd1.folder, models / "diffusers" / "instaflow_0_9B_from_sd_1_5")
    CheckpointLoaderSimple.models_dir = str(models)
    try:
        model, clip, _ = CheckpointLoaderSimple().load_checkpoint("diffusers/instaflow_0_9B_from_sd_1_5")
    finally:
        CheckpointLoaderSimple.models_dir = None
    return model, clip.encode("a red circle"), clip.encode("")


def authors_loop(unet, noise: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, steps: int,
                 guidance: float) -> torch.Tensor:
    """RectifiedFlowPipeline's loop (gnobitab/InstaFlow, code/pipeline_rf.py), written out."""
    timesteps = [(1.0 - i / steps) * 1000.0 for i in range(steps)]
    dt = 1.0 / steps
    latents = noise.clone()
    with torch.no_grad():
        for t in timesteps:
            vec_t = torch.full((1,), t)
            v_text = unet(latents, vec_t, encoder_hidden_states=positive).sample
            if guidance > 1.0:
                v_neg = unet(latents, vec_t, encoder_hidden_states=negative).sample
                v_pred = v_neg + guidance * (v_text - v_neg)
            else:
                v_pred = v_text
            latents = latents + dt * v_pred
    return latents


@pytest.mark.parametrize("weights,steps", [("InstaFlow-0.9B", 0), ("2-Rectified Flow", 4)])
def test_sampler_custom_with_the_nodes_outputs_is_the_authors_loop(flow_model, weights, steps):
    from web.nodes_sampling import SamplerCustom

    model, positive, negative = flow_model
    flowing, sampler, sigmas, cfg = AtelierRectifiedFlow().apply(model, weights, steps)
    preset = RECTIFIED_FLOW_PRESETS[weights]
    assert cfg == preset.cfg and sigmas.shape == ((steps or preset.steps) + 1,) and sampler.name == "euler"
    assert model.model_sampling_override is None  # the input MODEL is unchanged
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    ours = SamplerCustom().sample(flowing, True, SEED, cfg, positive, negative, sampler, sigmas, latent)[0]["samples"]
    noise = prepare_noise(latent["samples"], SEED)
    reference = authors_loop(model.model.unet, noise, positive[0][0], negative[0][0], steps or preset.steps, cfg)
    ours = ours * model.model.vae.config.scaling_factor  # a LATENT holds the VAE's latents; the UNet sees them scaled
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def test_another_family_is_refused_and_flow_models_leave_the_discrete_nodes(flow_model, tiny_sdxl):  # noqa: F811
    with pytest.raises(ValueError, match="InstaFlow-0.9B is an SD1.5-family UNet; this MODEL is SDXL"):
        AtelierRectifiedFlow().apply(ModelRef(load_model(tiny_sdxl.folder)), "InstaFlow-0.9B", 0)
    flowing = AtelierRectifiedFlow().apply(flow_model[0], "InstaFlow-0.9B", 0)[0]
    with pytest.raises(ValueError, match="samples as a rectified flow"):  # Hyper-SD's and the F-scheduler's sigmas
        noise_schedule(flowing)
    with pytest.raises(ValueError, match="training schedule, and this MODEL samples on another"):
        AtelierSampler().sample(flowing, flow_model[1], flow_model[2], {"samples": torch.zeros(1, 4, 8, 8)}, 0, 2,
                                1.0, "euler", "normal", 1.0, 0.0)
    assert flowing.recipe().model_sampling_override is flowing.model_sampling_override  # carried to workers


def test_noiseshift_tstitch_and_tcd_refuse_a_flow(flow_model):
    """NoiseShift's tables are calibrated on diffusion sigmas (0.03 to 14.6): neither order composes with a flow
    (σ in [0, 1]); T-Stitch's two models must sample alike; TCD's VE re-noising does not hold on a flow."""
    from nodes.noiseshift.nodes import AtelierNoiseShiftApply
    from nodes.noiseshift.shift import NoiseShiftTable
    from nodes.sampling.k_samplers import Sampler, run_sampler, sample_tcd

    model = flow_model[0]
    flowing = AtelierRectifiedFlow().apply(model, "InstaFlow-0.9B", 0)[0]
    table = NoiseShiftTable(torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64),
                            torch.tensor([0.12, 1.1, 10.5], dtype=torch.float64), (8, 8))
    with pytest.raises(ValueError, match="this MODEL samples as a flow"):
        AtelierNoiseShiftApply().apply(flowing, table)
    shifted = AtelierNoiseShiftApply().apply(model, table)[0]
    with pytest.raises(ValueError, match="carries a NoiseShift table"):
        AtelierRectifiedFlow().apply(shifted, "InstaFlow-0.9B", 0)
    from nodes.tstitch.nodes import AtelierTStitch
    with pytest.raises(ValueError, match="sampling is 'RectifiedFlowSampling' in the small model, 'discrete' in"):
        AtelierTStitch().patch(model, flowing, 0.4)
    sampling = RectifiedFlowSampling()
    with pytest.raises(ValueError, match="this model samples as a flow"):
        run_sampler(Sampler(sample_tcd, {"gamma": 0.3}), lambda x, sigma: x * 0, sampling, rectified_flow_sigmas(2),
                    torch.randn(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), 0)


def test_rectified_flow_sigmas_refuse_no_steps():
    with pytest.raises(ValueError, match="steps must be at least 1"):
        rectified_flow_sigmas(0)


def test_the_example_workflow_runs_headless(tmp_path, capsys):
    from web.cli import main

    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                            "instaflow.json")
    assert main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")]) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if "output: " in line]
    assert len(saved) == 1 and "instaflow_" in saved[0]

