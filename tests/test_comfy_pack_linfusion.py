"""Atelier's LinFusion Patch inside real ComfyUI (issue 21): CheckpointLoaderSimple's MODEL → the patch → ComfyUI's
own KSampler → VAEDecode, on the random-weight SD1.5 file of ``random_sd15_models`` and a random LinFusion file of
the published layout, and the same picture from Atelier standalone (Load LinFusion into the Tiled Sampler with one
tile as large as the latent: standalone, LinFusion has no MODEL → MODEL form).

The ComfyUI tests skip where ``ATELIER_COMFYUI`` names no ComfyUI tree; the first test runs everywhere.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from comfyui_parity import AtelierRunner, psnr
from nodes.highres.linfusion import GeneralizedLinearAttention, LdmSelfAttention, build_linfusion, linfusion_config

LINFUSION_NAME = "random_linfusion.safetensors"
SIZE_PX = 64
STEPS = 2
SEED = 5
CFG = 7.0
# Standalone, the Tiled Sampler with one tile is itself 35.6 dB from ComfyUI's KSampler on this checkpoint (its
# batching differs; Atelier's own KSampler is bit-exact, but it takes no LinFusion). LinFusion must add nothing
# beyond that (LinFusion itself moves the picture 23 dB away from the plain one, so misplaced layers have room to
# show).
LINFUSION_MARGIN_DB = 1.0


def test_ldm_self_attention_called_as_comfyuis_attn1_equals_the_diffusers_layer():
    """The module ComfyUI's BasicTransformerBlock calls as ``attn1(n, context=None, value=None,
    transformer_options=...)`` gives what the same LinFusion layer gives mounted in a diffusers UNet (called
    ``attn1(hidden_states)``), also with ComfyUI's attn1_patch form (n as context and value); it refuses
    cross-attention."""
    torch.manual_seed(0)
    layer = GeneralizedLinearAttention(dim=64, heads=4, mid_dim=64).eval()
    x = torch.randn(2, 96, 64)
    with torch.no_grad():
        diffusers_out = layer(x)
        comfy_out = LdmSelfAttention(layer)(x, context=None, value=None, transformer_options={})
        patched_form = LdmSelfAttention(layer)(x, context=x, value=x, transformer_options={})
        half = LdmSelfAttention(layer)(x.half(), transformer_options={})
    assert torch.equal(comfy_out, diffusers_out) and torch.equal(patched_form, diffusers_out)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="self-attention only"):
        LdmSelfAttention(layer)(x, context=torch.randn(2, 77, 64))


def test_linfusion_patch_standalone_points_to_load_linfusion():
    """Standalone, Atelier's MODEL has no submodule hook; the node says which nodes do the same there."""
    from nodes.highres.nodes import AtelierLinFusionPatch

    with pytest.raises(TypeError, match="Load LinFusion"):
        AtelierLinFusionPatch().patch(object(), LINFUSION_NAME)


def write_random_linfusion(out_file: str, seed: int = 0) -> None:
    """A LinFusion file for full-size SD1.5 with the published key names (float16), as test_highres writes them."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from nodes.models.model_configs import component_configs, shipped_config_dir

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(component_configs(shipped_config_dir("sd1"))["unet"])
    torch.manual_seed(seed)
    layers = build_linfusion(linfusion_config(unet, "sd1"))
    save_file({key: value.half().contiguous() for key, value in layers.state_dict().items()}, out_file)


@pytest.fixture(scope="module")
def comfyui_models_dir(random_sd15_models, tmp_path_factory) -> str:
    """random_sd15_models' checkpoint and a random LinFusion file, in one models folder both hosts read."""
    folder = tmp_path_factory.mktemp("linfusion_models")
    os.makedirs(folder / "checkpoints")
    os.makedirs(folder / "linfusion")
    # A hard link: Atelier's loader refuses a symlink that leads out of its folder.
    os.link(os.path.join(random_sd15_models.path, "checkpoints", random_sd15_models.checkpoint),
            folder / "checkpoints" / random_sd15_models.checkpoint)
    write_random_linfusion(str(folder / "linfusion" / LINFUSION_NAME))
    return str(folder)


def text_prompt(checkpoint: str) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE_PX, "height": SIZE_PX, "batch_size": 1}},
    }


def sampling(model: list) -> dict:
    return {"model": model, "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
            "denoise": 1.0}


def decoded(prompt: dict, branch: str, samples: list) -> None:
    prompt[f"{branch}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": ["4", 2]}}
    prompt[f"{branch}_image"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": branch,
                                                                       "images": [f"{branch}_decode", 0]}}


def comfyui_prompt(checkpoint: str) -> dict:
    """The patched MODEL into ComfyUI's KSampler, and the incoming MODEL into another KSampler after it."""
    prompt = text_prompt(checkpoint)
    prompt["patch"] = {"class_type": "AtelierLinFusionPatch", "inputs": {"model": ["4", 0],
                                                                         "linfusion_name": LINFUSION_NAME}}
    prompt["linfusion_sample"] = {"class_type": "KSampler", "inputs": sampling(["patch", 0])}
    decoded(prompt, "linfusion", ["linfusion_sample", 0])
    prompt["plain_sample"] = {"class_type": "KSampler", "inputs": sampling(["4", 0])}
    decoded(prompt, "plain", ["plain_sample", 0])
    return prompt


def atelier_prompt(checkpoint: str) -> dict:
    """Standalone: Load LinFusion into the Tiled Sampler, one tile covering the latent; and the same sampler
    without LinFusion, the hosts' baseline."""
    prompt = text_prompt(checkpoint)
    prompt["load"] = {"class_type": "AtelierLoadLinFusion", "inputs": {"model": ["4", 0],
                                                                       "linfusion_name": LINFUSION_NAME}}
    prompt["linfusion_sample"] = {"class_type": "AtelierTiledSample", "inputs": {
        **sampling(["4", 0]), "linfusion": ["load", 0], "mode": "mixture", "tile_size": SIZE_PX, "overlap": 0,
        "offset_stride": SIZE_PX, "tile_batch_size": 1}}
    decoded(prompt, "linfusion", ["linfusion_sample", 0])
    prompt["plain_sample"] = {"class_type": "AtelierTiledSample", "inputs": {
        **sampling(["4", 0]), "mode": "mixture", "tile_size": SIZE_PX, "overlap": 0,
        "offset_stride": SIZE_PX, "tile_batch_size": 1}}
    decoded(prompt, "plain", ["plain_sample", 0])
    return prompt


@pytest.fixture(scope="module")
def comfyui_images(comfyui_server, random_sd15_models) -> dict[str, np.ndarray]:
    images = comfyui_server.run(comfyui_prompt(random_sd15_models.checkpoint))
    return {node.removesuffix("_image"): found[0] for node, found in images.items()}


def test_linfusion_patch_runs_in_comfyuis_ksampler(comfyui_images):
    """CheckpointLoaderSimple → LinFusion Patch → KSampler → VAEDecode at 64×64, 2 steps, to success; the patch
    changes the picture, and the incoming MODEL in the same prompt stays unpatched."""
    linfusion, plain = comfyui_images["linfusion"], comfyui_images["plain"]
    assert linfusion.shape == plain.shape == (SIZE_PX, SIZE_PX, 3)
    print(f"ComfyUI, LinFusion vs plain: {psnr(linfusion, plain):.1f} dB")
    assert psnr(linfusion, plain) < 30.0


def test_linfusion_patch_in_comfyui_equals_atelier_standalone(comfyui_images, comfyui_models_dir, random_sd15_models,
                                                              tmp_path):
    """The same checkpoint and LinFusion file standalone (diffusers UNet, layers mounted by Load LinFusion's
    index order) give the same picture, as close as the Tiled Sampler without LinFusion comes to ComfyUI's plain
    KSampler: the LDM paths carry the published layers' weights."""
    atelier = AtelierRunner(comfyui_models_dir, str(tmp_path / "atelier_data"))
    ours = atelier.run(atelier_prompt(random_sd15_models.checkpoint))
    figure = psnr(comfyui_images["linfusion"], ours["linfusion_image"][0])
    baseline = psnr(comfyui_images["plain"], ours["plain_image"][0])
    print(f"LinFusion, ComfyUI patch vs Atelier standalone: {figure:.1f} dB (without LinFusion: {baseline:.1f} dB)")
    assert figure >= baseline - LINFUSION_MARGIN_DB
