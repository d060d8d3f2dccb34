"""The momentum SAMPLER and the F-scheduler's SIGMAS in either host, without ComfyUI: the host is told apart by
``sys.modules`` (``nodes/common/comfy_host.py``), so stand-in ``comfy`` modules put the nodes on ComfyUI's side.
Real ComfyUI runs them in ``test_comfy_pack.py``."""

import sys
import types

import pytest
import torch

from comfy_stand_ins import EPS, SD15, SD_ALPHAS, SDXL, V_PREDICTION, X0, ModelSamplingDiscrete, install_comfy
from nodes.common.comfy_host import comfy_module, comfy_noise_schedule, inside_comfyui
from nodes.common.denoiser import NoiseSchedule
from nodes.generation.nodes import AtelierFScheduler, AtelierMomentumSampler
from nodes.sampling.dpm_solver import dpmpp_sample
from nodes.sampling.k_samplers import Sampler, run_sampler, sample_dpmpp_2m
from nodes.sampling.model_sampling import DiscreteModelSampling, beta_schedule_alphas_cumprod
from nodes.sampling.momentum import sample_momentum
from nodes.sampling.schedules import f_scheduler_schedule

SD_SCHEDULE = NoiseSchedule(SD_ALPHAS, "epsilon")


class KSAMPLER:
    """Stands in for comfy.samplers.KSAMPLER: keeps what it was built with."""

    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):  # noqa: B006  (ComfyUI's signature)
        self.sampler_function = sampler_function
        self.extra_options, self.inpaint_options = extra_options, inpaint_options


class ModelPatcher:
    """Stands in for ComfyUI's MODEL: ``get_model_object("model_sampling")`` and ``model.model_config``."""

    def __init__(self, model_sampling, model_config):
        self._model_sampling = model_sampling
        self.model = types.SimpleNamespace(model_config=model_config)

    def get_model_object(self, name):
        assert name == "model_sampling", name
        return self._model_sampling


@pytest.fixture
def inside_comfy(monkeypatch):
    """The stand-in comfy modules in sys.modules, as ComfyUI has them when it runs the pack."""
    install_comfy(monkeypatch, {"comfy.model_management": {}, "comfy.samplers": {"KSAMPLER": KSAMPLER},
                                "comfy.model_patcher": {"ModelPatcher": ModelPatcher}})


def comfy_model(prediction=EPS, config=SD15, alphas_cumprod=SD_SCHEDULE.alphas_cumprod) -> ModelPatcher:
    sampling_class = type("ModelSampling", (ModelSamplingDiscrete, prediction), {})
    return ModelPatcher(sampling_class(alphas_cumprod), config())


def test_standalone_has_no_comfy_and_refuses_names_outside_it():
    assert not inside_comfyui() and comfy_module("comfy.samplers") is None
    with pytest.raises(ValueError, match="'nodes.sampling'"):
        comfy_module("nodes.sampling")


def test_momentum_sampler_is_atelier_sampler_standalone():
    (sampler,) = AtelierMomentumSampler().get_sampler("ghvb", 2.5)
    assert sampler == Sampler(sample_momentum, {"method": "ghvb", "momentum": 2.5}, "ghvb (m=2.5)")


@pytest.mark.parametrize("method,momentum,function,options", [
    ("ghvb", 1.0, sample_momentum, {"method": "ghvb", "momentum": 1.0}),
    ("hb_plms", 3.8, sample_momentum, {"method": "hb_plms", "momentum": 3.8}),
    ("hb_dpmpp_2m", 0.8, sample_dpmpp_2m, {"beta": 0.8}),
])
def test_momentum_sampler_is_comfyuis_ksampler_inside_comfyui(inside_comfy, method, momentum, function, options):
    (sampler,) = AtelierMomentumSampler().get_sampler(method, momentum)
    assert isinstance(sampler, KSAMPLER)
    assert sampler.sampler_function is function and sampler.extra_options == options
    assert sampler.inpaint_options == {"random": False}


def test_momentum_sampler_validation_holds_hb_dpmpp_2m_beta_to_one():
    assert AtelierMomentumSampler.VALIDATE_INPUTS("hb_dpmpp_2m", 2.5) == \
        "momentum for 'hb_dpmpp_2m' must be in (0.0, 1.0]; got 2.5"
    assert AtelierMomentumSampler.VALIDATE_INPUTS("ghvb", 2.5) is True
    with pytest.raises(ValueError, match="got 1.5"):  # a linked value, checked when the node runs
        AtelierMomentumSampler().get_sampler("hb_dpmpp_2m", 1.5)


def _gaussian_denoiser(x, sigma, **_):
    """The exact x̂₀ for data N(0.3, 0.5²)."""
    variance = 0.25
    return 0.3 + (x - 0.3) * variance / (variance + sigma.reshape(-1, 1, 1, 1) ** 2)


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.0])
def test_hb_dpmpp_2m_sampler_is_the_vp_recurrence_of_dpm_solver(beta):
    """The SAMPLER's HB-DPM++2M (k-diffusion convention, VE latents) takes the steps of dpmpp_sample, the official
    recurrence on VP latents, on a grid into σ = 0 (where both end first order)."""
    sigmas = torch.tensor([14.6, 6.0, 2.0, 0.7, 0.2, 0.0])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    (sampler,) = AtelierMomentumSampler().get_sampler("hb_dpmpp_2m", beta)
    ours = run_sampler(sampler, _gaussian_denoiser, DiscreteModelSampling.from_beta_schedule(), sigmas, noise,
                       torch.zeros_like(noise), 0)

    def eps_fn(x_vp, sigma):  # the grid's "timesteps" are its sigmas, so that ε is taken at the same σ
        s = sigma.double().reshape(-1, 1, 1, 1)
        x = x_vp * (s ** 2 + 1).sqrt()
        return ((x - _gaussian_denoiser(x, s)) / s).float()

    start = noise * float(sigmas[0]) / (float(sigmas[0]) ** 2 + 1) ** 0.5  # VP latents at σ₀
    reference = dpmpp_sample(eps_fn, start, sigmas[:-1], sigmas.double(), order=2, beta=beta)
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-5)
    if beta < 1:
        plain = run_sampler("dpmpp_2m", _gaussian_denoiser, DiscreteModelSampling.from_beta_schedule(), sigmas,
                            noise, torch.zeros_like(noise), 0)
        assert (ours - plain).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [5, 8])
def test_f_scheduler_reads_comfyuis_model_sampling_inside_comfyui(inside_comfy, steps):
    (sigmas,) = AtelierFScheduler().get_sigmas(comfy_model(), steps)
    _, expected = f_scheduler_schedule(SD_SCHEDULE, steps, "sd1")
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    torch.testing.assert_close(sigmas.double(), expected, rtol=1e-6, atol=0)


def test_f_scheduler_follows_the_comfyui_models_family_and_schedule(inside_comfy):
    (sd1,) = AtelierFScheduler().get_sigmas(comfy_model(), 8)
    (sdxl,) = AtelierFScheduler().get_sigmas(comfy_model(config=SDXL), 8)
    _, expected = f_scheduler_schedule(SD_SCHEDULE, 8, "sdxl")  # SDXL's 8-step ramp ends lower (ρ 12, k 10)
    torch.testing.assert_close(sdxl.double(), expected, rtol=1e-6, atol=0)
    assert float(sdxl[-1]) < float(sd1[-1])
    other_betas = beta_schedule_alphas_cumprod("linear", 0.0001, 0.02)  # DDPM's linear betas: another table
    (other,) = AtelierFScheduler().get_sigmas(comfy_model(alphas_cumprod=other_betas), 5)
    assert abs(float(other[0]) - float(sd1[0])) > 1


@pytest.mark.parametrize("prediction,name", [(EPS, "epsilon"), (V_PREDICTION, "v_prediction"), (X0, "sample")])
def test_comfy_noise_schedule_keeps_the_prediction_type(inside_comfy, prediction, name):
    schedule = comfy_noise_schedule(comfy_model(prediction))
    assert schedule.prediction_type == name
    torch.testing.assert_close(schedule.alphas_cumprod, SD_SCHEDULE.alphas_cumprod, rtol=1e-6, atol=0)


def test_f_scheduler_refuses_models_it_is_not_defined_for(inside_comfy):
    flow = ModelPatcher(types.SimpleNamespace(sigmas=torch.ones(1000)), SD15())
    with pytest.raises(ValueError, match="discrete timestep schedule.*SimpleNamespace"):
        AtelierFScheduler().get_sigmas(flow, 5)
    with pytest.raises(ValueError, match="SD1, SD2 or SDXL model; got a object model"):
        AtelierFScheduler().get_sigmas(comfy_model(config=object), 5)


def test_f_scheduler_refuses_a_model_of_no_host():
    with pytest.raises(TypeError, match="got str"):
        AtelierFScheduler().get_sigmas("not a model", 5)
