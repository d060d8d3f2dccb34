"""Fixtures for tests against real ComfyUI (``comfyui_host.py``); ``conftest.py`` imports them.

- ``comfyui_environment`` (session): ComfyUI's venv, built on first use under ``.comfyui/`` and reused after.
  Tests that use it skip where ``ATELIER_COMFYUI`` does not name a ComfyUI tree (``.ci/run`` sets it when
  ``../shared/comfyui`` exists).
- ``random_sd15_models`` (session): a models folder holding one full-size random-weight SD1.5 single file
  (:func:`write_default_init_sd15`).
- ``comfyui_server`` (module): one ComfyUI server for a whole test module, on ``comfyui_models_dir``, which a
  module may override to serve other models (by default it is ``random_sd15_models``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from comfyui_host import COMFYUI_PATH_VARIABLE, ComfyUIEnvironment, ComfyUIServer, comfyui_source, prepare_environment

RANDOM_SD15_NAME = "random_sd15.safetensors"


@dataclass(frozen=True)
class CheckpointFolder:
    """A models folder laid out like ComfyUI's ``models/`` and the checkpoint file name inside checkpoints/."""

    path: str
    checkpoint: str


@pytest.fixture(scope="session")
def comfyui_environment() -> ComfyUIEnvironment:
    """ComfyUI's venv; the first run builds it (several minutes, see the report it prints), later runs reuse it."""
    source = comfyui_source()
    if source is None:
        pytest.skip(f"no ComfyUI tree: set {COMFYUI_PATH_VARIABLE} to ComfyUI v0.3.64's source "
                    "(.ci/run does when ../shared/comfyui exists)")
    if not os.path.isfile(os.path.join(source, "main.py")):
        pytest.skip(f"{COMFYUI_PATH_VARIABLE}={source} holds no ComfyUI tree (no main.py)")
    environment = prepare_environment(source)
    print(f"\nComfyUI environment at {environment.root}: ready in {environment.setup_seconds:.1f} s")
    return environment


# The UNet's last convolution is scaled by this much in the parity checkpoint. With the plain initialisation the
# image hardly depends on the update rule (dpmpp_2m and euler_ancestral land within 40 dB of euler, the parity
# target, so a wrong rule could pass); at 4 the samplers' images lie 17 to 43 dB apart (bench/comfy_parity.py).
PARITY_OUTPUT_GAIN = 4.0


def write_default_init_sd15(out_file: str | os.PathLike, seed: int = 0, output_gain: float = 1.0) -> None:
    """Write a full-size SD1.5 single file (float16) whose weights are the models' own random initialisation.

    ``export.write_random_single_file`` draws every tensor at std 0.02, norm scales included, which makes the
    UNet's prediction and the decoded image nearly independent of their inputs: its 64×64 images from two seeds
    differ by about one 8-bit level (47 dB), so no image comparison on it could fail. diffusers' and transformers'
    own initialisation (unit norm scales, fan-in-scaled weights) gives a noisy image that changes with the seed,
    the prompt, the sigmas and the update rule. ``output_gain`` scales the UNet's last convolution (weight and
    bias), which makes the image depend more on the update rule. Components are built one at a time to bound the
    memory.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from nodes.models.export import to_ldm
    from nodes.models.model_configs import component_configs, shipped_config_dir

    configs = component_configs(shipped_config_dir("sd1"))
    builders = {"unet": lambda: UNet2DConditionModel.from_config(configs["unet"]),
                "vae": lambda: AutoencoderKL.from_config(configs["vae"]),
                "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
    torch.manual_seed(seed)
    parts = {}
    gained = ("conv_out.weight", "conv_out.bias")
    for name, build in builders.items():
        model = build()
        state = {key: value * output_gain if name == "unet" and key in gained else value
                 for key, value in model.state_dict().items() if value.is_floating_point()}
        parts[name] = {key: value.half() for key, value in state.items()}
        del model
    save_file({key: value.contiguous() for key, value in to_ldm("sd1", parts, configs).items()}, os.fspath(out_file))


@pytest.fixture(scope="session")
def random_sd15_models(tmp_path_factory) -> CheckpointFolder:
    """A full-size SD1.5 checkpoint with random (default-initialised) weights, seed 0, its UNet's output scaled by
    :data:`PARITY_OUTPUT_GAIN`, written once per session."""
    folder = tmp_path_factory.mktemp("random_sd15_models")
    os.makedirs(folder / "checkpoints")
    write_default_init_sd15(folder / "checkpoints" / RANDOM_SD15_NAME, seed=0, output_gain=PARITY_OUTPUT_GAIN)
    return CheckpointFolder(str(folder), RANDOM_SD15_NAME)


@pytest.fixture(scope="module")
def comfyui_models_dir(random_sd15_models) -> str:
    """The models folder the module's ComfyUI server reads; override it in a module to serve other models."""
    return random_sd15_models.path


@pytest.fixture(scope="module")
def comfyui_server(comfyui_environment, comfyui_models_dir, tmp_path_factory) -> Iterator[ComfyUIServer]:
    """A ComfyUI server on a scratch base folder, up for the whole module and stopped after it."""
    with ComfyUIServer(comfyui_environment, str(tmp_path_factory.mktemp("comfyui_base")), comfyui_models_dir) as server:
        yield server
