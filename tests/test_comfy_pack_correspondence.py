"""Atelier's correspondence on the user's MODEL inside real ComfyUI (issue 21, "Must show" (d)): SD Features takes
the MODEL and VAE that ComfyUI's CheckpointLoaderSimple loaded (the random-weight SD1.5 file of
``random_sd15_models``) and the empty prompt from ComfyUI's CLIPTextEncode, hooks the decoder of ComfyUI's own LDM
UNet (``diffusion_model.output_blocks``), and Match Features matches two images on those features.

The same prompt then runs in Atelier's standalone executor, on Atelier's loader of the same file (diffusers' UNet,
hooked on ``up_blocks``): the matches of every cell agree, which they would not if the hooks took other layers, the
noise another timestep or the image another latent scale. A second match fuses those SD features with DINOv2's, as
the paper does, from the tiny random DINOv2 that ``test_correspondence.py`` writes, given to both hosts. Skipped where ``ATELIER_COMFYUI`` names no ComfyUI tree
(``.ci/run`` sets it when ``../shared/comfyui`` exists).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from comfyui_fixtures import CheckpointFolder
from comfyui_parity import AtelierRunner, psnr
from nodes.correspondence.synthetic import texture, warp_with_truth
from test_correspondence import TINY_DINOV2_NAME, write_tiny_dinov2

IMAGE_SIZE = 256  # the SD working size too: a 32×32 latent, decoder grids of 4, 8 and 16 cells
DINO_SIZE = 252  # the largest multiple of DINOv2's 14-px patch within the image: 18×18 tokens
IMAGE_NAMES = ("correspondence_a.png", "correspondence_b.png")
MATCH_NODE, PICTURE_NODE, FLOW_NODE = "40", "50", "51"  # SD features alone
FUSED_MATCH_NODE, FUSED_PICTURE_NODE = "41", "52"  # SD + DINOv2
SPARSE_MATCHES = 16
# A wide, warm soft-argmax: each target is a smooth average over 9×9 cells of B weighted by feature distances, so it
# moves with the features themselves and not only with which cell is nearest. Hooking the ResBlock before each
# level's last attention layer (same shapes, other tensors) moves targets by up to 1.8 px with these settings and by
# only 0.13 px with the sharp defaults (radius 3, 0.04); a 1e-6 relative change of the features, by 5e-5 px.
SOFT_WINDOW = 4
SOFT_TEMPERATURE = 0.5
# The match widget rounds targets to 0.1 px and confidences to 0.001: the two hosts' float32 features differ by
# rounding only, which moves a soft-argmax target by far less than that unless a nearest neighbour flips.
TARGET_TOLERANCE_PX = 0.1
CONFIDENCE_TOLERANCE = 0.001


def write_image_pair(folders: list[str]) -> None:
    """A seeded texture and the same texture under a mild homography, as PNGs in each input folder."""
    image_a = texture(IMAGE_SIZE, 0)
    image_b, _, _ = warp_with_truth(image_a, "homography", 1.0)
    for name, image in zip(IMAGE_NAMES, (image_a, image_b)):
        pixels = (image[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        for folder in folders:
            Image.fromarray(pixels).save(os.path.join(folder, name))


def correspondence_prompt(checkpoint: str) -> dict:
    """CheckpointLoaderSimple → SD Features of two loaded images (the empty prompt, the paper's t = 100, seed 42 and
    layers 2, 5, 8, at 256 px) → Fuse Features (raw channels, no PCA) → Match Features (the wide soft-argmax above)
    → SaveImage of its picture and flow; and the same SD features fused with DINOv2's (α = 0.5, no PCA) → Match
    Features → SaveImage."""
    def sd_features(image_node: str) -> dict:
        return {"class_type": "AtelierSDFeatures", "inputs": {
            "model": ["4", 0], "vae": ["4", 2], "conditioning": ["6", 0], "image": [image_node, 0],
            "timestep": 100, "fixed_noise_seed": 42, "size": IMAGE_SIZE, "layers": "2,5,8"}}

    def dinov2_features(image_node: str) -> dict:
        return {"class_type": "AtelierDINOv2Features", "inputs": {
            "dinov2": ["60", 0], "image": [image_node, 0], "size": DINO_SIZE}}

    def match(fuse_node: str) -> dict:
        return {"class_type": "AtelierMatchFeatures", "inputs": {
            "descriptor_a": [fuse_node, 0], "descriptor_b": [fuse_node, 1], "image_a": ["10", 0],
            "image_b": ["11", 0], "soft_window": SOFT_WINDOW, "temperature": SOFT_TEMPERATURE,
            "max_matches": SPARSE_MATCHES, "min_confidence": 0.0}}

    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "10": {"class_type": "LoadImage", "inputs": {"image": IMAGE_NAMES[0]}},
        "11": {"class_type": "LoadImage", "inputs": {"image": IMAGE_NAMES[1]}},
        "20": sd_features("10"),
        "21": sd_features("11"),
        "30": {"class_type": "AtelierFuseFeatures", "inputs": {
            "features_a": ["20", 0], "features_b": ["21", 0], "weight": 1.0, "pca_dims": 0}},
        MATCH_NODE: match("30"),
        PICTURE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "matches", "images": [MATCH_NODE, 3]}},
        FLOW_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "flow", "images": [MATCH_NODE, 0]}},
        "60": {"class_type": "AtelierLoadDINOv2", "inputs": {"dinov2_name": TINY_DINOV2_NAME}},
        "61": dinov2_features("10"),
        "62": dinov2_features("11"),
        "31": {"class_type": "AtelierFuseFeatures", "inputs": {
            "features_a": ["20", 0], "features_b": ["21", 0], "weight": 0.5, "pca_dims": 0,
            "features_a_2": ["61", 0], "features_b_2": ["62", 0], "weight_2": 0.5, "pca_dims_2": 0}},
        FUSED_MATCH_NODE: match("31"),
        FUSED_PICTURE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "fused_matches",
                                                                   "images": [FUSED_MATCH_NODE, 3]}},
    }


@pytest.fixture(scope="module")
def comfyui_models_dir(random_sd15_models: CheckpointFolder, tmp_path_factory) -> str:
    """The random SD1.5 checkpoint and the tiny DINOv2, in one models folder that both hosts read. The checkpoint is
    hard-linked: Atelier's loader refuses a symlink that leads out of its models folder."""
    models = tmp_path_factory.mktemp("correspondence_models")
    os.makedirs(models / "checkpoints")
    os.link(os.path.join(random_sd15_models.path, "checkpoints", random_sd15_models.checkpoint),
               models / "checkpoints" / random_sd15_models.checkpoint)
    write_tiny_dinov2(models)
    return str(models)


@pytest.fixture(scope="module")
def both_hosts(comfyui_server, comfyui_models_dir, random_sd15_models, tmp_path_factory
               ) -> tuple[dict, dict, AtelierRunner]:
    """The prompt's /history outputs from ComfyUI and from Atelier's executor (and the runner, to read its files)."""
    atelier = AtelierRunner(comfyui_models_dir, str(tmp_path_factory.mktemp("atelier")))
    write_image_pair([comfyui_server.folder("input"), atelier.folders.folder("input")])
    prompt = correspondence_prompt(random_sd15_models.checkpoint)
    comfy_outputs = comfyui_server.wait(comfyui_server.queue(prompt))["outputs"]
    checked = atelier.executor.validate(prompt)
    assert checked.ok, (checked.error, checked.node_errors)
    result = atelier.executor.execute(checked.prompt, "correspondence", checked.outputs)
    assert result.status == "success", result.messages
    return comfy_outputs, result.outputs, atelier


def test_correspondence_runs_on_comfyuis_checkpoint_loader_model(both_hosts, comfyui_server):
    """(d): SD Features on ComfyUI's own MODEL and VAE, then matching, alone and fused with DINOv2, to success: the
    pictures are A beside B, the flow has A's size, and each widget's grid is its finest source's: SD's layer 8 at
    1/16 of 256 px, then DINOv2's 18×18 tokens."""
    comfy_outputs, _, _ = both_hosts
    for node in (PICTURE_NODE, FUSED_PICTURE_NODE):
        (picture,) = comfy_outputs[node]["images"]
        assert comfyui_server.image(picture).shape == (IMAGE_SIZE, 2 * IMAGE_SIZE, 3)
    (flow,) = comfy_outputs[FLOW_NODE]["images"]
    assert comfyui_server.image(flow).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    for node, cells in ((MATCH_NODE, IMAGE_SIZE // 16), (FUSED_MATCH_NODE, DINO_SIZE // 14)):
        (widget,) = comfy_outputs[node]["atelier_correspondence"]
        assert widget["grid"] == [cells, cells]


def widget_differences(comfy_outputs: dict, atelier_outputs: dict, node: str) -> tuple[int, float, float]:
    """How many cells the hosts' match widgets of ``node`` hold, and their largest differences in target (px) and in
    confidence."""
    (comfy_widget,), (atelier_widget,) = (outputs[node]["atelier_correspondence"]
                                          for outputs in (comfy_outputs, atelier_outputs))
    differences = (float(np.abs(np.array(comfy_widget[key]) - np.array(atelier_widget[key])).max())
                   for key in ("targets", "confidence"))
    return len(comfy_widget["confidence"]), *differences


def test_features_inside_comfyui_match_like_ateliers_own_model(both_hosts, comfyui_server):
    """The hooks on ComfyUI's ``output_blocks`` take the features the hooks on diffusers' ``up_blocks`` take: every
    cell of A matches the same place in B in both hosts, with the same confidence, on SD features alone and fused
    with DINOv2, and the saved flow images agree."""
    comfy_outputs, atelier_outputs, atelier = both_hosts
    (comfy_flow,), (atelier_flow,) = comfy_outputs[FLOW_NODE]["images"], atelier_outputs[FLOW_NODE]["images"]
    flow_psnr = psnr(comfyui_server.image(comfy_flow), atelier._read(atelier_flow))
    for node, name in ((MATCH_NODE, "SD"), (FUSED_MATCH_NODE, "SD + DINOv2")):
        cells, target_difference, confidence_difference = widget_differences(comfy_outputs, atelier_outputs, node)
        print(f"ComfyUI vs Atelier, {name}, {cells} cells: max target difference "
              f"{target_difference:.2f} px, max confidence difference {confidence_difference:.3f}")
        assert target_difference <= TARGET_TOLERANCE_PX + 1e-9, name
        assert confidence_difference <= CONFIDENCE_TOLERANCE + 1e-9, name
    print(f"SD flow image PSNR {flow_psnr:.1f} dB")
