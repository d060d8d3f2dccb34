"""Stand-ins for the parts of ComfyUI's ``comfy`` package that Atelier's host checks and adapters read, for the tests
that run the pack's ComfyUI side without ComfyUI (``test_comfy_host.py``, ``test_comfy_adapters.py``): the model
sampling classes (k-diffusion view: the network sees x/√(σ² + 1); ε-models give x̂₀ = x − σ·ε, v-models
x̂₀ = x/(σ² + 1) − v·σ/√(σ² + 1)) and the model configs that name a family. Real ComfyUI runs the same nodes in the
``test_comfy_pack*.py`` modules.
"""

from __future__ import annotations

import sys
import types

import torch

from nodes.sampling.model_sampling import beta_schedule_alphas_cumprod

SD_ALPHAS = beta_schedule_alphas_cumprod()


class ModelSamplingDiscrete:
    """Stands in for comfy.model_sampling.ModelSamplingDiscrete: float32 VE sigmas, as ComfyUI keeps them, and the
    σ ↔ t map (nearest training timestep in log σ)."""

    def __init__(self, alphas_cumprod: torch.Tensor = SD_ALPHAS):
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.num_timesteps = self.sigmas.shape[0]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma.log()[None, :] - self.sigmas.log()[:, None]).abs().argmin(dim=0).float()

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x / (sigma ** 2 + 1).sqrt().reshape(-1, 1, 1, 1)


class EPS:
    def calculate_denoised(self, sigma, output, x):
        return x - output * sigma.reshape(-1, 1, 1, 1)


class V_PREDICTION(EPS):  # noqa: N801  (ComfyUI's class names)
    def calculate_denoised(self, sigma, output, x):
        sigma = sigma.reshape(-1, 1, 1, 1)
        return x / (sigma ** 2 + 1) - output * sigma / (sigma ** 2 + 1).sqrt()


class X0(EPS):
    pass


class SD15:
    pass


class SD20:
    pass


class SDXL:
    pass


class SDXLRefiner:
    pass


def install_comfy(monkeypatch, attributes: dict[str, dict[str, object]]) -> dict[str, types.ModuleType]:
    """Put stand-in ``comfy`` modules in ``sys.modules`` for the test, as ComfyUI has them when it runs the pack:
    ``comfy``, ``comfy.model_sampling`` (the classes above) and ``comfy.supported_models`` (the configs), plus
    ``attributes``' modules with their attributes. Returns the modules by name."""
    modules = {"comfy": types.ModuleType("comfy"),
               "comfy.model_sampling": types.ModuleType("comfy.model_sampling"),
               "comfy.supported_models": types.ModuleType("comfy.supported_models")}
    for cls in (ModelSamplingDiscrete, EPS, V_PREDICTION, X0):
        setattr(modules["comfy.model_sampling"], cls.__name__, cls)
    for cls in (SD15, SD20, SDXL, SDXLRefiner):
        setattr(modules["comfy.supported_models"], cls.__name__, cls)
    for name, values in attributes.items():
        module = modules.setdefault(name, types.ModuleType(name))
        for attribute, value in values.items():
            setattr(module, attribute, value)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules
