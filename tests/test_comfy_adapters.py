"""The adapters of ComfyUI's MODEL, VAE and CLIP (``nodes/models/comfy_adapters.py``), without ComfyUI: stand-in
``comfy`` modules in ``sys.modules`` (``comfy_stand_ins.py``) put the process on ComfyUI's side, and a stand-in
model samples as ComfyUI's ``model_sampling`` does. Real ComfyUI runs them in ``test_comfy_pack_watermark.py``."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from comfy_stand_ins import EPS, SD15, SD_ALPHAS, SDXL, V_PREDICTION, ModelSamplingDiscrete, install_comfy
from nodes.common.comfy_host import SAMPLING_PATCH_KEY
from nodes.common.denoiser import Conditioning, DiffusersCodec, NoiseSchedule
from nodes.models.comfy_adapters import ComfyCodec, ComfyDenoiser, ComfyLatentSpace, denoiser_and_codec, \
    text_conditioning


def network(x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The stand-in UNet's raw output: depends on the input, the timestep and the text."""
    return 0.7 * x + 0.001 * timestep.reshape(-1, 1, 1, 1) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


class BaseModel:
    """Stands in for comfy.model_base.BaseModel.apply_model: x̂₀ from x and σ through its model_sampling."""

    def __init__(self, model_sampling, model_config):
        self.model_sampling = model_sampling
        self.model_config = model_config
        self.calls = []

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, transformer_options={}):  # noqa: B006
        self.calls.append({"sigma": t, "transformer_options": transformer_options})
        xc = self.model_sampling.calculate_input(t, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)[:, :x.shape[1]]
        return self.model_sampling.calculate_denoised(t, network(xc, self.model_sampling.timestep(t), c_crossattn), x)


class ModelPatcher:
    """Stands in for ComfyUI's MODEL."""

    def __init__(self, prediction=EPS, config=SD15, model_options=None):
        sampling = type("ModelSampling", (ModelSamplingDiscrete, prediction), {})()
        self.model = BaseModel(sampling, config())
        self.model_options = model_options or {}
        self.wrappers = {}  # ComfyUI's wrapper registry, by kind and key (an Atelier sampling patch registers here)
        self.load_device = torch.device("cpu")
        self.latent_format = types.SimpleNamespace(scale_factor=0.18215, latent_channels=4)

    def get_model_object(self, name):
        return {"model_sampling": self.model.model_sampling, "latent_format": self.latent_format}[name]


class VAE:
    """Stands in for comfy.sd.VAE: IMAGE (B, H, W, 3) in, latents out (a fixed linear map per 8×8 block)."""

    latent_channels, downscale_ratio = 4, 8

    def encode(self, pixels):
        assert pixels.shape[-1] == 3, pixels.shape  # ComfyUI's VAE takes channels last
        pooled = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)

    def decode(self, latent):
        return torch.nn.functional.interpolate(latent[:, :3], scale_factor=8).movedim(1, -1)


class CLIP:
    """Stands in for comfy.sd.CLIP: tokens and a (1, 77, 8) encoding that depends on the text."""

    def tokenize(self, text):
        return {"l": [[(len(text), 1.0)]]}

    def encode_from_tokens(self, tokens):
        return torch.full((1, 77, 8), float(tokens["l"][0][0][0]))


@pytest.fixture
def inside_comfy(monkeypatch):
    """The stand-in comfy modules in sys.modules, as ComfyUI has them when it runs the pack; records the models
    load_models_gpu was asked for."""
    loaded = []
    install_comfy(monkeypatch, {
        "comfy.model_management": {"load_models_gpu": lambda models: loaded.append(list(models))},
        "comfy.model_patcher": {"ModelPatcher": ModelPatcher}, "comfy.sd": {"VAE": VAE, "CLIP": CLIP}})
    return loaded


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.tensor([20.0, 981.0][:batch])
    return x_t, t, Conditioning(torch.randn(1, 77, 8, generator=generator))


def test_comfy_denoiser_gives_an_eps_models_own_eps(inside_comfy):
    """For an ε-model the network sees x_VE/√(σ² + 1) = x_VP, so the ε the adapter's x̂₀ implies is the network's."""
    x_t, t, conditioning = _inputs()
    denoiser = ComfyDenoiser(ModelPatcher(EPS))
    eps = denoiser.schedule.eps_from_prediction(x_t, t, denoiser(x_t, t, conditioning))
    torch.testing.assert_close(eps, network(x_t, t, conditioning.embeds.expand(2, -1, -1)), rtol=1e-4, atol=1e-4)


def test_comfy_denoiser_gives_the_eps_a_v_models_v_implies(inside_comfy):
    """v-prediction through ComfyUI's model_sampling lands on the ε that Atelier's VP formula ε = σ_t·x_t + √ᾱ·v
    gives for the same network output."""
    x_t, t, conditioning = _inputs()
    denoiser = ComfyDenoiser(ModelPatcher(V_PREDICTION))
    eps = denoiser.schedule.eps_from_prediction(x_t, t, denoiser(x_t, t, conditioning))
    v = network(x_t, t, conditioning.embeds.expand(2, -1, -1))
    expected = NoiseSchedule(SD_ALPHAS, "v_prediction").eps_from_prediction(x_t, t, v)
    torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-4)


def test_comfy_denoiser_loads_the_model_through_comfyui_and_passes_sigma(inside_comfy):
    x_t, t, conditioning = _inputs()
    patcher = ModelPatcher()
    ComfyDenoiser(patcher)(x_t, t, conditioning)
    assert inside_comfy == [[patcher]]
    (call,) = patcher.model.calls
    torch.testing.assert_close(call["sigma"], patcher.model.model_sampling.sigmas[t.long()])


def test_comfy_denoiser_runs_the_users_unet_wrapper(inside_comfy):
    """A MODEL patched with set_model_unet_function_wrapper is evaluated through the wrapper, as in a KSampler."""
    seen = []

    def doubling_wrapper(apply_model, arguments):
        seen.append(arguments["cond_or_uncond"])
        return 2 * apply_model(arguments["input"], arguments["timestep"], **arguments["c"])

    x_t, t, conditioning = _inputs()
    plain = ComfyDenoiser(ModelPatcher())(x_t, t, conditioning)
    wrapped = ComfyDenoiser(ModelPatcher(model_options={"model_function_wrapper": doubling_wrapper}))(
        x_t, t, conditioning)
    assert seen == [[0]]
    torch.testing.assert_close(wrapped, 2 * plain)


def test_comfy_denoiser_refuses_sdxl_and_pooled_conditioning(inside_comfy):
    with pytest.raises(ValueError, match="'sdxl'"):
        ComfyDenoiser(ModelPatcher(config=SDXL))
    x_t, t, conditioning = _inputs()
    pooled = Conditioning(conditioning.embeds, torch.zeros(1, 1280), torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"pooled \(1, 1280\)"):
        ComfyDenoiser(ModelPatcher())(x_t, t, pooled)


def test_comfy_denoiser_refuses_a_model_with_an_atelier_sampling_patch(inside_comfy):
    """The patch's wrappers run under ComfyUI's samplers only: Atelier's own samplers would drop it silently."""
    patched = ModelPatcher()
    patched.wrappers = {"apply_model": {SAMPLING_PATCH_KEY: [lambda *args: None]}}
    with pytest.raises(ValueError, match="does not run a sampling patch"):
        ComfyDenoiser(patched)
    patched.wrappers = {"apply_model": {"someone_elses": [lambda *args: None]}}
    ComfyDenoiser(patched)


def test_comfy_latent_space_is_the_models_latent_format_without_a_vae(inside_comfy):
    """What a sampler needs of ComfyUI's MODEL alone: the channels and scale of its latent format, SD's 8× size."""
    assert ComfyLatentSpace.of(ModelPatcher()) == ComfyLatentSpace(4, 8, 0.18215, 0.0)
    with pytest.raises(ValueError, match="'sdxl'"):
        ComfyLatentSpace.of(ModelPatcher(config=SDXL))


def test_comfy_codec_converts_the_layout_and_takes_the_models_scale(inside_comfy):
    image = torch.rand(2, 3, 16, 24)
    codec = ComfyCodec(VAE(), ModelPatcher().latent_format)
    latent = codec.encode(image)
    assert latent.shape == (2, 4, 2, 3) and codec.scaling_factor == 0.18215 and codec.shift_factor == 0.0
    torch.testing.assert_close(latent[:, :3], torch.nn.functional.avg_pool2d(image, 8))
    assert codec.decode(latent).shape == (2, 3, 16, 24)


def test_sockets_inside_comfyui_become_the_adapters(inside_comfy):
    patcher, vae = ModelPatcher(), VAE()
    with denoiser_and_codec(patcher, vae) as (denoiser, codec):
        assert isinstance(denoiser, ComfyDenoiser) and denoiser.patcher is patcher
        assert isinstance(codec, ComfyCodec) and codec.vae is vae
    assert torch.equal(text_conditioning(CLIP(), "abc").embeds, torch.full((1, 77, 8), 3.0))


def test_sockets_refuse_a_mix_of_hosts_and_comfyuis_objects_standalone(inside_comfy, monkeypatch):
    atelier_codec = DiffusersCodec.__new__(DiffusersCodec)
    with pytest.raises(TypeError, match="ModelPatcher and DiffusersCodec"):
        with denoiser_and_codec(ModelPatcher(), atelier_codec):
            pass
    monkeypatch.delitem(sys.modules, "comfy.model_management")  # standalone: ComfyUI's objects are not known
    with pytest.raises(TypeError, match="ModelPatcher and VAE"):
        with denoiser_and_codec(ModelPatcher(), VAE()):
            pass
    with pytest.raises(TypeError, match="got CLIP"):
        text_conditioning(CLIP(), "")
