"""ComfyUI's own example workflows run unchanged in Atelier: ``python -m web run F`` for twelve files of
``comfyui-workflow-templates`` 0.1.95 (the version ComfyUI v0.3.64 pins; later versions dropped the SD1.5 examples).

The files' sizes stay, and their self-attention at 768² and more costs seconds per step on two CPU cores whatever
the width: so the test caps KSampler's and BasicScheduler's steps at :data:`TEST_STEPS` (``--set``) and leaves
out ``area_composition`` (704×1280, then 1088×1920: minutes per step). ``bench/comfy_templates.py`` runs all
twelve files as they are.

Every checkpoint, LoRA, VAE, embedding and image a file names is written under that name: random weights of the
right family and layout, at reduced width (the files' own sizes and step counts stay, so full widths would take
hours on a CPU), and images made here.
"""

from __future__ import annotations

import importlib.resources
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from nodes.models.export import configs_at_width, write_random_lora, write_random_single_file, write_random_vae
from web.cli import main as web_cli

TEMPLATES = ("default", "image2image", "hiresfix_latent_workflow", "lora", "lora_multiple", "sdxl_simple_example",
             "sdxl_refiner_prompt_example", "inpaint_example", "embedding_example", "area_composition",
             "latent_upscale_different_prompt_model", "sdxlturbo_example")
TOO_SLOW_FOR_TESTS = ("area_composition",)
TEST_STEPS = 3
STEPS_WIDGET = {"KSampler": 2, "BasicScheduler": 1}  # the position of "steps" in their widgets_values
WIDTH = 32  # every UNet's first width: the families' layouts at a tenth of SD1.5's 320
# checkpoint file name -> (family, what marks its variant)
CHECKPOINTS = {
    "v1-5-pruned-emaonly-fp16.safetensors": ("sd1", {}),
    "DreamShaper_8_pruned.safetensors": ("sd1", {}),
    "dreamshaper_8.safetensors": ("sd1", {}),
    "512-inpainting-ema.safetensors": ("sd2", {"unet_in_channels": 9}),  # SD2's 512-px inpainting model
    "v2-1_768-ema-pruned.safetensors": ("sd2", {"prediction_type": "v_prediction"}),
    "sd_xl_base_1.0.safetensors": ("sdxl", {}),
    "sd_xl_refiner_1.0.safetensors": ("sdxl_refiner", {}),
    "sd_xl_turbo_1.0_fp16.safetensors": ("sdxl", {}),
}
LORAS = {"MoXinV1.safetensors": "sd1", "blindbox_v1_mix.safetensors": "sd1"}  # kohya-format SD1.5 LoRAs
VAES = ("vae-ft-mse-840000-ema-pruned.safetensors",)
# embedding_example says "embedding:SDA768.pt"; like ComfyUI, Atelier then tries that name plus ".safetensors",
# and reads no pickle-based .pt file.
EMBEDDINGS = {"SDA768.pt.safetensors": "sd2"}
EMBEDDING_VECTORS = 2


def template_path(name: str) -> str:
    return str(importlib.resources.files("comfyui_workflow_templates") / "templates" / f"{name}.json")


def write_image(path: str, size: int, with_hole: bool) -> None:
    """A smooth colour image; ``with_hole`` makes its centre transparent (LoadImage's mask, for inpainting)."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 1 - x * y], axis=-1)
    alpha = np.ones((size, size, 1))
    if with_hole:
        alpha[size // 4:3 * size // 4, size // 4:3 * size // 4] = 0
    Image.fromarray((np.concatenate([rgb, alpha], axis=-1) * 255).astype(np.uint8), "RGBA").save(path)


def write_template_files(models: str, data: str) -> None:
    """Every file the twelve templates name: models under ``models``, input images under ``data``/input."""
    for folder in ("checkpoints", "loras", "vae", "embeddings"):
        os.makedirs(os.path.join(models, folder), exist_ok=True)
    for seed, (name, (family, variant)) in enumerate(CHECKPOINTS.items()):
        write_random_single_file(family, os.path.join(models, "checkpoints", name), seed=seed, width=WIDTH, **variant)
    for seed, (name, family) in enumerate(LORAS.items()):
        write_random_lora(family, os.path.join(models, "loras", name), layout="kohya", seed=seed, width=WIDTH)
    for name in VAES:
        write_random_vae(os.path.join(models, "vae", name), layout="ldm", width=WIDTH)
    for name, family in EMBEDDINGS.items():
        width = configs_at_width(family, WIDTH)["text_encoder"]["hidden_size"]
        vectors = torch.randn(EMBEDDING_VECTORS, width, generator=torch.Generator().manual_seed(0)) * 0.02
        save_file({"emb_params": vectors.half()}, os.path.join(models, "embeddings", name))  # A1111's layout
    os.makedirs(os.path.join(data, "input"), exist_ok=True)
    write_image(os.path.join(data, "input", "example.png"), 512, with_hole=False)
    write_image(os.path.join(data, "input", "input.png"), 512, with_hole=True)


@pytest.fixture(scope="module")
def template_folders(tmp_path_factory) -> tuple[str, str]:
    """(models folder, data folder) holding every file the twelve templates name."""
    models, data = str(tmp_path_factory.mktemp("template_models")), str(tmp_path_factory.mktemp("template_data"))
    write_template_files(models, data)
    return models, data


def run_template(name: str, models: str, data: str, output: str, overrides: list[str] = ()) -> int:
    """``python -m web run`` on the template (the same function, in this process), with ``--set`` for each of
    ``overrides``: its exit status."""
    sets = [argument for override in overrides for argument in ("--set", override)]
    return web_cli(["run", template_path(name), "--models-dir", models, "--data-dir", data, "--output-dir", output,
                    *sets])


def capped_steps(name: str, steps: int) -> list[str]:
    """``--set`` overrides that cap the template's KSampler and BasicScheduler steps at ``steps``."""
    workflow = json.load(open(template_path(name)))
    return [f"{node['id']}.steps={steps}" for node in workflow["nodes"] if node["type"] in STEPS_WIDGET
            and node["widgets_values"][STEPS_WIDGET[node["type"]]] > steps]


def saved_images(output: str) -> list[str]:
    return [file for _, _, files in os.walk(output) for file in files if file.endswith(".png")]


def named_files(workflow: dict) -> set[tuple[str, str]]:
    """(folder, file name) of every model file the workflow's nodes declare in their ``properties.models``."""
    return {(model["directory"], model["name"]) for node in workflow["nodes"]
            for model in node.get("properties", {}).get("models", [])}


def test_the_models_folder_holds_every_file_the_templates_name(template_folders):
    models, _ = template_folders
    named = set().union(*(named_files(json.load(open(template_path(name)))) for name in TEMPLATES))
    missing = sorted(f"{folder}/{name}" for folder, name in named
                     if not os.path.isfile(os.path.join(models, folder, name)))
    assert not missing


@pytest.mark.parametrize("name", [name for name in TEMPLATES if name not in TOO_SLOW_FOR_TESTS])
def test_template_runs(template_folders, name, capsys):
    """``python -m web run F`` (the same function, in this process) succeeds and saves its images, the file as it
    is but for its steps."""
    models, data = template_folders
    output = os.path.join(data, "output", name)
    code = run_template(name, models, data, output, capped_steps(name, TEST_STEPS))
    assert code == 0, capsys.readouterr().err[-4000:]
    assert saved_images(output), f"{name} saved no image"
