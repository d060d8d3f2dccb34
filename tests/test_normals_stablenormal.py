"""StableNormal's YOSO (issue 26): the published folder's layout loads (float16 variants, the authors' ControlNet class
name); the ControlNetVAE forward against diffusers' own ControlNet forward with its conditioning embedding silenced
and its zero convolutions made identities; the turbo entry point's sizes; the nodes; the example workflow."""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch

from nodes.models.formats import UnsafeModelFormatError
from nodes.models.model_configs import shipped_unet_config
from nodes.normals.nodes import (AtelierLoadStableNormal, AtelierStableNormalNormals, empty_prompt_states,
                                 load_kept_yoso, read_yoso_folder)
from nodes.normals.stablenormal import controlnet_vae_residuals, hub_size, stablenormal_turbo, yoso_normals
from tiny_models import save_tiny_yoso

# Source: diffusers' ControlNetModel at SD2.1's UNet config (the published controlnet/ holds every one of its
# tensors): 364,228,240 parameters, 728,456,480 bytes in float16, the published
# diffusion_pytorch_model.fp16.safetensors's 728,496,840 less its 40 KB header. The UNet is SD2.1's, 865,910,724.
CONTROLNET_PARAMETERS = 364_228_240
UNET_PARAMETERS = 865_910_724


def test_the_full_size_networks_have_the_published_parameter_counts():
    from diffusers import ControlNetModel, UNet2DConditionModel

    config = shipped_unet_config("sd2")
    accepted = inspect.signature(ControlNetModel.__init__).parameters
    with torch.device("meta"):
        controlnet = ControlNetModel(**{key: value for key, value in config.items() if key in accepted})
        unet = UNet2DConditionModel.from_config(config)
    assert sum(parameter.numel() for parameter in controlnet.parameters()) == CONTROLNET_PARAMETERS
    assert sum(parameter.numel() for parameter in unet.parameters()) == UNET_PARAMETERS


@pytest.fixture(scope="module")
def tiny_yoso(tmp_path_factory) -> str:
    """A random YOSO folder in the published layout under a models folder: the models folder."""
    root = tmp_path_factory.mktemp("stablenormal_models")
    save_tiny_yoso(root / "stablenormal" / "yoso-normal-v0-3")
    return str(root)


def _reference_residuals(controlnet, image_latent, timestep, states):
    """ControlNetVAEModel's forward as diffusers' own ControlNetModel.forward gives it once the conditioning embedding
    adds nothing and the zero convolutions pass their input through."""
    patched = copy.deepcopy(controlnet)
    with torch.no_grad():
        for block in (*patched.controlnet_down_blocks, patched.controlnet_mid_block):
            block.weight.copy_(torch.eye(block.out_channels).view(block.out_channels, block.in_channels, 1, 1))
            block.bias.zero_()
    patched.controlnet_cond_embedding.forward = lambda condition: torch.zeros(())
    condition = torch.zeros(image_latent.shape[0], 3, *(8 * size for size in image_latent.shape[-2:]))
    return patched(image_latent, timestep, encoder_hidden_states=states, controlnet_cond=condition,
                   return_dict=False)


def test_the_published_folder_loads_and_runs_the_official_forward(tiny_yoso):
    model = read_yoso_folder(os.path.join(tiny_yoso, "stablenormal", "yoso-normal-v0-3"))
    assert all(parameter.dtype == torch.float32 for parameter in model.unet.parameters())
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 96, generator=generator) * 2 - 1
    noise = torch.randn(1, 4, 8, 12, generator=generator)
    with torch.no_grad():
        states = empty_prompt_states(model, torch.device("cpu"))
        assert states.shape == (1, 77, 32)
        latent = model.vae.encode(image).latent_dist.mode() * model.vae.config.scaling_factor
        timestep = torch.tensor([401])
        down, mid = controlnet_vae_residuals(model.controlnet, latent, timestep, states)
        reference_down, reference_mid = _reference_residuals(model.controlnet, latent, timestep, states)
        assert len(down) == 12
        for ours, theirs in zip([*down, mid], [*reference_down, reference_mid]):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        x0 = model.unet(noise, timestep, encoder_hidden_states=states, down_block_additional_residuals=reference_down,
                        mid_block_additional_residual=reference_mid).sample
        decoded = model.vae.decode(x0 / model.vae.config.scaling_factor).sample
        expected = decoded / decoded.norm(dim=1, keepdim=True).clamp(min=1e-6)
        normals = yoso_normals(model.unet, model.controlnet, model.vae, states, image, noise, 401)
        torch.testing.assert_close(normals, expected, rtol=0, atol=1e-5)
        other = yoso_normals(model.unet, model.controlnet, model.vae, states, image, noise, 0)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(1, 64, 96), rtol=0, atol=1e-5)
    assert (other - normals).abs().max() > 1e-3  # the timestep reaches both networks
    with pytest.raises(ValueError, match="multiples of 8"):
        yoso_normals(model.unet, model.controlnet, model.vae, states, image[..., :60, :], noise, 0)


def test_the_turbo_entry_point_resizes_pads_and_maps_normals_to_colours():
    """hubconf: the long side to 1024 (each side a multiple of 64), then the pipeline's 768 long side, padded to 8."""
    assert hub_size(50, 70) == (704, 1024) and hub_size(1000, 1000) == (1024, 1024) and hub_size(10, 1000) == (64, 1024)
    seen = []

    def facing_the_camera(padded):
        seen.append(padded)
        normals = torch.zeros(padded.shape[0], 3, *padded.shape[-2:])
        normals[:, 2] = 2.0  # not yet unit: the entry point normalises again after its resize
        return normals

    image = torch.rand(2, 3, 50, 70, generator=torch.Generator().manual_seed(1))
    shown = stablenormal_turbo(facing_the_camera, image)
    assert seen[0].shape == (2, 3, 528, 768)  # 704 × 1024 → long side 768 → 528 × 768, already a multiple of 8
    assert -1 <= seen[0].min() and seen[0].max() <= 1
    assert shown.shape == (2, 3, 50, 70)
    torch.testing.assert_close(shown, torch.tensor([0.5, 0.5, 1.0]).view(1, 3, 1, 1).expand_as(shown))
    stablenormal_turbo(facing_the_camera, torch.rand(1, 3, 100, 100), processing_resolution=100)
    assert seen[-1].shape == (1, 3, 104, 104)  # 100 padded (replicate) to 104, and cropped back


def test_the_nodes_load_the_folder_and_give_a_normal_map_of_the_inputs_size(tiny_yoso):
    AtelierLoadStableNormal.models_dir = tiny_yoso
    try:
        assert "yoso-normal-v0-3" in AtelierLoadStableNormal.INPUT_TYPES()["required"]["folder_name"][0]
        (model,) = AtelierLoadStableNormal().load("yoso-normal-v0-3")
    finally:
        AtelierLoadStableNormal.models_dir = None
    image = torch.rand(1, 40, 24, 3, generator=torch.Generator().manual_seed(2))
    node = AtelierStableNormalNormals()
    (normals,) = node.estimate(model, image, seed=1, timestep=0, processing_resolution=64)
    assert normals.shape == (1, 40, 24, 3) and 0 <= normals.min() and normals.max() <= 1
    vectors = normals * 2 - 1
    # unit normals, averaged by the resize to a much smaller input (random weights give rough normals)
    assert vectors.norm(dim=-1).max() <= 1 + 1e-2 and vectors.norm(dim=-1).median() > 0.5
    (again,) = node.estimate(model, image, 1, 0, 64)
    (other,) = node.estimate(model, image, 2, 0, 64)
    assert torch.equal(again, normals) and (other - normals).abs().max() > 1e-3


def test_pickled_or_incomplete_folders_are_refused(tmp_path, tiny_yoso):
    import shutil

    folder = tmp_path / "yoso"
    shutil.copytree(os.path.join(tiny_yoso, "stablenormal", "yoso-normal-v0-3"), folder)
    for name in os.listdir(folder / "controlnet"):
        if name.endswith(".safetensors"):
            os.remove(folder / "controlnet" / name)
    (folder / "controlnet" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(UnsafeModelFormatError, match="controlnet"):
        read_yoso_folder(str(folder))
    os.remove(folder / "model_index.json")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_kept_yoso(str(folder))
    newer = tmp_path / "yoso-normal-v1-8-1"
    shutil.copytree(os.path.join(tiny_yoso, "stablenormal", "yoso-normal-v0-3"), newer)
    with pytest.raises(ValueError, match="v1.8: from v1.5 on"):
        load_kept_yoso(str(newer))


def test_the_example_workflow_runs_headless_on_stand_ins(tmp_path):
    """workflows/stablenormal.json with a random YOSO folder in the published layout for what it names."""
    from PIL import Image

    from web.cli import main

    save_tiny_yoso(tmp_path / "models" / "stablenormal" / "yoso-normal-v0-3")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert main(["run", os.path.join(root, "workflows", "stablenormal.json"), "--models-dir",
                 str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")]) == 0
    saved = sorted((tmp_path / "data" / "output").glob("stablenormal_*.png"))
    assert len(saved) == 1 and Image.open(saved[0]).size == (64, 64)
