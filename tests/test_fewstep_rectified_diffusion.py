"""Rectified Diffusion (issue 25): the published UNets loaded beside their base checkpoint (Load Checkpoint + UNet
File, which also takes KOALA's UNet files), the preset's DDIM against the authors' (diffusers' DDIMScheduler on
trailing timesteps, linear betas for rd and cm) and the node's refusals."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from fixtures_models import tiny_sd1, tiny_sdxl  # noqa: F401
from nodes.fewstep.nodes import AtelierKOALA, AtelierRectifiedDiffusion, AtelierRectifiedFlow
from nodes.fewstep.rectified_diffusion import RECTIFIED_DIFFUSION_PRESETS, linear_beta_schedule
from nodes.loaders.nodes import AtelierCheckpointWithUNet
from nodes.models.comfy_adapters import noise_schedule
from nodes.models.families import UnknownModelLayoutError
from nodes.models.formats import UnsafeModelFormatError
from nodes.models.loading import load_model
from nodes.models.model_configs import SHIPPED_CONFIGS
from nodes.models.refs import ModelRef
from nodes.sampling.ddim import trailing_timesteps
from nodes.sampling.k_samplers import Sampler, run_sampler
from tiny_models import build_tiny_pipeline, save_tiny_koala

# The authors load each file with ``pipeline.unet.load_state_dict(torch.load(path))`` into SD1.5's or SDXL's
# pipeline (G-U-N/Rectified-Diffusion, generate_5k.py), strict by default: the published rd/cm/phased files are
# exactly SD1.5's UNet, 859,520,964 parameters (3.44 GB in float32), and phasedxl SDXL's, 2,567,463,684 (10.27 GB).
PUBLISHED_UNET_PARAMETERS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}
CHECKPOINT = "diffusers/tiny_sd1"  # as the checkpoint list names a diffusers folder (also its path under models/)


@pytest.mark.parametrize("config", list(PUBLISHED_UNET_PARAMETERS))
def test_the_published_unets_are_their_base_models_unets(config):
    with open(os.path.join(SHIPPED_CONFIGS, config, "unet", "config.json")) as file:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(json.load(file))
    assert sum(parameter.numel() for parameter in unet.parameters()) == PUBLISHED_UNET_PARAMETERS[config]


def _unet_file(unet: torch.nn.Module, path, seed: int) -> dict[str, torch.Tensor]:
    """A UNet state dict with random values in ``unet``'s diffusers layout, as the published files hold (converted
    from ``.ckpt`` to ``.safetensors``), written to ``path``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {key: torch.randn(value.shape, generator=generator) * 0.02 for key, value in unet.state_dict().items()}
    save_file(tensors, os.fspath(path))
    return tensors


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd1):  # noqa: F811
    """A models folder: the tiny SD1 model (a diffusers folder) and an ``rd.safetensors`` UNet file of its layout."""
    root = tmp_path_factory.mktemp("rd_models")
    os.makedirs(root / "diffusion_models")
    shutil.copytree(tiny_sd1.folder, root / "diffusers" / "tiny_sd1")
    tensors = _unet_file(build_tiny_pipeline("sd1").unet, root / "diffusion_models" / "rd.safetensors", seed=4)
    return str(root), tensors


def _load(models_dir: str, checkpoint: str, unet: str):
    AtelierCheckpointWithUNet.models_dir = models_dir
    try:
        return AtelierCheckpointWithUNet().load_checkpoint(checkpoint, unet)
    finally:
        AtelierCheckpointWithUNet.models_dir = None


def test_the_loader_puts_the_files_unet_beside_the_checkpoints_text_encoder_and_vae(models):
    root, tensors = models
    model, clip, vae = _load(root, CHECKPOINT, "rd.safetensors")
    base = load_model(os.path.join(root, CHECKPOINT))
    loaded = model.model
    assert loaded is not base and loaded.unet_source.endswith("rd.safetensors")
    assert all(torch.equal(value, tensors[key]) for key, value in loaded.unet.state_dict().items())
    assert not torch.equal(loaded.unet.conv_in.weight, base.unet.conv_in.weight)
    for ours, theirs in ((loaded.text_encoders[0], base.text_encoders[0]), (loaded.vae, base.vae)):
        assert ours is not theirs and all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                                            theirs.state_dict().values()))
    assert clip.ref is model and vae.vae is loaded.vae  # the CLIP and VAE outputs are the new model's copies
    recipe = model.recipe()  # how a Ray worker rebuilds it: the same cached model here
    assert recipe.unet_file == loaded.unet_source and recipe.load().model is loaded
    assert _load(root, CHECKPOINT, "rd.safetensors")[0].model is loaded  # one copy per pair of files
    assert loaded.label == "tiny_sd1 + rd.safetensors"


def test_the_loader_refuses_a_unet_of_another_model_an_ldm_layout_and_a_pickle(models, tiny_sdxl):  # noqa: F811
    root, _ = models
    checkpoint = os.path.join(root, CHECKPOINT)
    other = os.path.join(root, "diffusion_models", "phasedxl.safetensors")
    _unet_file(build_tiny_pipeline("sdxl").unet, other, seed=1)
    with pytest.raises(UnknownModelLayoutError, match="'phasedxl.safetensors' is not a UNet this sd1 checkpoint can "
                                                      "take: its tensors fit none of the checkpoint's UNet, nor a "
                                                      "pruning of the checkpoint's UNet; closest "
                                                      r"is the checkpoint's UNet, with \d+ tensors missing"):
        load_model(checkpoint, unet_file=other)
    ldm = os.path.join(root, "diffusion_models", "ldm.safetensors")
    save_file({"input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}, ldm)
    with pytest.raises(UnknownModelLayoutError, match="original \\(LDM\\) layout"):
        load_model(checkpoint, unet_file=ldm)
    pickle = os.path.join(root, "rd.ckpt")
    with open(pickle, "wb") as file:
        file.write(b"\x80\x04")
    with pytest.raises(UnsafeModelFormatError):
        load_model(checkpoint, unet_file=pickle)


def test_a_koala_unet_file_loads_beside_sdxl_and_passes_koalas_preset(tmp_path, tiny_sdxl):  # noqa: F811
    """KOALA's UNet alone (unet/diffusion_pytorch_model.safetensors of its folder) beside an SDXL checkpoint: the
    loader finds KOALA-700M's depths at the checkpoint's widths, and KOALA's node accepts the model."""
    folder = save_tiny_koala(tmp_path / "koala")
    unet_file = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    loaded = load_model(tiny_sdxl.folder, unet_file=unet_file)
    assert loaded.unet.config.transformer_layers_per_block == [1, 2, 5] and loaded.unet.config.mid_block_type is None
    model, sampler, sigmas, cfg = AtelierKOALA().apply(ModelRef(loaded), "KOALA-Lightning-700M", 0)
    assert cfg == 3.5 and sigmas.shape == (11,)


# ------------------------------------------------------------------- the sampler against the authors' DDIM

def _betas(weights: str) -> dict:
    linear = RECTIFIED_DIFFUSION_PRESETS[weights].linear_betas
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear" if linear else "scaled_linear"}


@pytest.mark.parametrize("weights,steps", [("rd", 1), ("rd", 2), ("rd", 4), ("cm", 2), ("phased", 4)])
def test_the_preset_is_the_authors_trailing_ddim_on_their_betas(models, weights, steps):
    """The node's MODEL, SAMPLER and SIGMAS run by SamplerCustom's sampling loop against diffusers' DDIMScheduler
    as the authors configure it (trailing, η 0, their betas) and against DDIM written out: same latents within
    1e-5 (float64, on a tiny UNet turned ε-network). The last step ends at ᾱ = 1 on both sides, as ComfyUI's
    schedules do (the authors' ``set_alpha_to_one`` false stops at ᾱ_0)."""
    root, _ = models
    model = _load(root, CHECKPOINT, "rd.safetensors")[0]
    patched, sampler, sigmas, cfg = AtelierRectifiedDiffusion().apply(model, weights, steps)
    assert cfg == (1.0 if weights == "cm" else 1.5) and sampler.name == "ddim" and sigmas.shape == (steps + 1,)
    reference_scheduler = DDIMScheduler(**_betas(weights), timestep_spacing="trailing", clip_sample=False,
                                        set_alpha_to_one=True)
    alphas = reference_scheduler.alphas_cumprod.double()
    unet = build_tiny_pipeline("sd1", seed=3).unet.eval().double()
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(5),
                          dtype=torch.float64)

    @torch.no_grad()
    def network(x, t):  # ε of unit-Gaussian data under these betas, plus the UNet's random part
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        random = unet(x, t, encoder_hidden_states=context).sample
        return (1 - alphas[t.round().long()]).sqrt().reshape(-1, 1, 1, 1) * x + 0.1 * random

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    timesteps = trailing_timesteps(steps).tolist()
    x = noise.clone()
    for i, t in enumerate(timesteps):
        alpha_prev = alphas[timesteps[i + 1]] if i + 1 < steps else alphas.new_tensor(1.0)
        eps = network(x, t)
        x0 = (x - (1 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
        x = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
    reference_scheduler.set_timesteps(steps)
    reference = noise.clone()
    for t in reference_scheduler.timesteps:
        reference = reference_scheduler.step(network(reference, t), t, reference).prev_sample
    if RECTIFIED_DIFFUSION_PRESETS[weights].linear_betas:
        sampling = patched.model_sampling_override
    else:
        from nodes.sampling.guiders import model_sampling_of
        assert patched is model
        sampling = model_sampling_of(patched)
    ours = run_sampler(Sampler.from_name("ddim"), lambda z, sigma: sampling.apply_model(network, z, sigma), sampling,
                       sigmas.double(), noise, torch.zeros_like(noise), seed=0)
    assert torch.allclose(x, reference, atol=1e-5)
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


def test_rd_samples_on_linear_betas_and_the_phased_models_on_their_own(models):
    root, _ = models
    model = _load(root, CHECKPOINT, "rd.safetensors")[0]
    rd = AtelierRectifiedDiffusion().apply(model, "rd", 0)
    phased = AtelierRectifiedDiffusion().apply(model, "phased", 0)
    assert rd[2].shape == (3,) and phased[2].shape == (5,) and phased[0] is model
    linear = linear_beta_schedule().ve_sigmas()
    assert torch.allclose(rd[2][:-1].double(), linear[trailing_timesteps(2)], rtol=1e-6)
    # the nodes that read a MODEL's schedule read the linear one (Hyper-SD's grids, the F-scheduler, ...)
    assert torch.allclose(noise_schedule(rd[0]).ve_sigmas(), linear, rtol=1e-5)
    assert torch.allclose(phased[2][:-1].double(), model.model.schedule.ve_sigmas()[[999, 749, 499, 249]].float()
                          .double(), rtol=1e-6)


def test_the_preset_refuses_another_family_a_flow_and_a_noiseshift_table(models, tiny_sdxl):  # noqa: F811
    from nodes.generation.nodes import AtelierSampler
    from nodes.noiseshift.nodes import AtelierNoiseShiftApply
    from nodes.noiseshift.shift import NoiseShiftTable

    root, _ = models
    model = _load(root, CHECKPOINT, "rd.safetensors")[0]
    with pytest.raises(ValueError, match="phasedxl is a UNet for SDXL; this MODEL is SD1.5: load it beside an SDXL "
                                         "checkpoint"):
        AtelierRectifiedDiffusion().apply(model, "phasedxl", 0)
    with pytest.raises(ValueError, match="rd is a UNet for SD1.5; this MODEL is SDXL"):
        AtelierRectifiedDiffusion().apply(ModelRef(load_model(tiny_sdxl.folder)), "rd", 0)
    flowing = AtelierRectifiedFlow().apply(model, "InstaFlow-0.9B", 0)[0]
    with pytest.raises(ValueError, match="samples on another schedule already"):
        AtelierRectifiedDiffusion().apply(flowing, "rd", 0)
    with pytest.raises(ValueError, match="samples on another schedule already"):  # rd's linear betas, then phased
        AtelierRectifiedDiffusion().apply(AtelierRectifiedDiffusion().apply(model, "rd", 0)[0], "phased", 0)
    table = NoiseShiftTable(torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64),
                            torch.tensor([0.12, 1.1, 10.5], dtype=torch.float64), (8, 8))
    with pytest.raises(ValueError, match="carries a NoiseShift table"):
        AtelierRectifiedDiffusion().apply(AtelierNoiseShiftApply().apply(model, table)[0], "rd", 0)
    rd = AtelierRectifiedDiffusion().apply(model, "rd", 0)[0]
    with pytest.raises(ValueError, match="this MODEL samples as a flow or on other betas than its checkpoint's"):
        AtelierNoiseShiftApply().apply(rd, table)
    clip = _load(root, CHECKPOINT, "rd.safetensors")[1]
    with pytest.raises(ValueError, match="on the checkpoint's training schedule, and this MODEL samples on another"):
        AtelierSampler().sample(rd, clip.encode("a red circle"), clip.encode(""), {"samples": torch.zeros(1, 4, 8, 8)},
                                0, 2, 1.0, "euler", "normal", 1.0, 0.0)


def test_the_example_workflow_runs_headless_on_a_stand_in_unet_file(models, tmp_path, capsys):
    """workflows/rectified_diffusion.json with the shipped embedded checkpoint and an rd.safetensors of its layout."""
    from nodes.loaders.nodes import EMBEDDED_CONFIG_DIR
    from web.cli import main

    os.makedirs(tmp_path / "models" / "diffusion_models")
    # the embedded UNet's layout from its own folder: the session's shared copy may carry LoRA adapter layers
    unet = UNet2DConditionModel.from_pretrained(os.path.join(EMBEDDED_CONFIG_DIR, "unet"))
    _unet_file(unet, tmp_path / "models" / "diffusion_models" / "rd.safetensors", 2)
    workflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                            "rectified_diffusion.json")
    assert main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")]) == 0
    saved = [line for line in capsys.readouterr().out.splitlines() if "output: " in line]
    assert len(saved) == 1 and "rectified_diffusion_" in saved[0]
