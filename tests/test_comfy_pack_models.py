"""Atelier's model-driven techniques on the user's own ComfyUI MODEL, CLIP and VAE (issue 21, part 2): OmniSSR, the
Tiled 16K generator and the prompt router's text embeddings, inside real ComfyUI on what CheckpointLoaderSimple
loaded (the random-weight SD1.5 file of ``random_sd15_models``), through the adapters of
``nodes/models/comfy_adapters.py``, each against the same prompt standalone on Atelier's loader of the same file.

The server tests skip where ``ATELIER_COMFYUI`` names no ComfyUI tree (``.ci/run`` sets it when
``../shared/comfyui`` exists). Both hosts run float32 (ComfyUI with ``FLOAT32_FLAGS``), so their images differ by
float32 arithmetic only.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from comfyui_parity import AtelierRunner, psnr
from fixtures_models import tiny_sd1  # noqa: F401  (session fixture)
from nodes.common.denoiser import DiffusersCodec
from nodes.highres.linfusion import build_linfusion, linfusion_config
from nodes.highres.nodes import AtelierTiled16KGenerator, LinFusion, denoiser_and_codec_with
from nodes.models.comfy_adapters import model_family
from nodes.models.loading import load_model
from nodes.models.refs import ModelRef
from nodes.router.router_files import load_router

SEED = 7
SAVE_NODE = "9"
# Both hosts run the same float32 graph; the OmniSSR run below measured 92 dB between them (2 DDIM steps on six
# planes, each step's planes merged, projected and re-encoded). 40 dB is issue 17's parity target.
TARGET_PSNR_DB = 40.0


@pytest.fixture(scope="module")
def atelier(random_sd15_models, tmp_path_factory) -> AtelierRunner:
    """One standalone executor for the module, so one standalone copy of the full-size SD1.5 sits beside ComfyUI's:
    a runner per test kept a copy each and ran the test machine out of memory."""
    return AtelierRunner(random_sd15_models.path, str(tmp_path_factory.mktemp("atelier")))

def test_model_family_reads_ateliers_model_and_refuses_anything_else(tiny_sd1):  # noqa: F811
    assert model_family(ModelRef(load_model(tiny_sd1.folder))) == "sd1"
    with pytest.raises(TypeError, match="got str"):
        model_family("sd1")


def test_16k_generator_refuses_a_vae_precision_comfyuis_vae_cannot_take_before_any_work():
    """ComfyUI's VAE decodes in the dtype ComfyUI chose; only 'auto' leaves it so (a stand-in VAE: nothing runs)."""
    inputs = dict(positive=[], negative=[], width=256, height=256, schedule="direct", base_size=256, seed=0, steps=1,
                  cfg=1.0, sampler_name="euler", scheduler="normal", mode="mixture", tile_size=128, overlap=32,
                  offset_stride=64, tile_batch_size=1, vae_tile_size=512)
    with pytest.raises(ValueError, match="vae_precision 'bfloat16'.*choose 'auto'"):
        AtelierTiled16KGenerator().generate(object(), object(), **inputs, vae_precision="bfloat16")


def test_linfusion_is_refused_with_a_model_that_is_not_ateliers(tiny_sd1):  # noqa: F811
    """LinFusion's layers replace a diffusers UNet's attention: with any other MODEL the run stops at once."""
    linfusion = LinFusion(load_model(tiny_sd1.folder), torch.nn.ModuleList(), ())
    with pytest.raises(TypeError, match="linfusion mounts on Atelier's own MODEL.*type object"):
        with denoiser_and_codec_with(object(), object(), linfusion):
            pass


def test_16k_generator_on_ateliers_model_still_samples_with_linfusion(tiny_sd1):  # noqa: F811
    """Standalone, LinFusion is mounted for the generator's run (inside the adapters' lock) and taken off after:
    the image changes with it, and the same run without it gives the plain image back."""
    model = load_model(tiny_sd1.folder)
    torch.manual_seed(4)
    config = tuple(linfusion_config(model.unet, "sd1"))
    linfusion = LinFusion(model, build_linfusion(list(config)), config)
    prompt = [[torch.randn(1, 77, model.text_encoders[0].config.hidden_size), {}]]
    inputs = dict(positive=prompt, negative=prompt, width=64, height=64, schedule="direct", base_size=64, seed=1,
                  steps=2, cfg=1.0, sampler_name="euler", scheduler="normal", mode="mixture", tile_size=64, overlap=0,
                  offset_stride=32, tile_batch_size=1, vae_tile_size=64, vae_precision="float32")
    run = AtelierTiled16KGenerator().generate
    plain, _ = run(ModelRef(model), DiffusersCodec(model.vae), **inputs)
    linear, _ = run(ModelRef(model), DiffusersCodec(model.vae), **inputs, linfusion=linfusion)
    again, _ = run(ModelRef(model), DiffusersCodec(model.vae), **inputs)
    assert not torch.allclose(plain, linear) and torch.equal(plain, again)


def omnissr_prompt(checkpoint: str) -> dict:
    """CheckpointLoaderSimple's MODEL and VAE, empty prompts through CLIPTextEncode, and OmniSSR ×2 on a 32×64
    synthetic panorama over a cube of six 64² planes (8×8 latents, the least an SD1.5 UNet's three downsamplings
    take), 2 steps: a 64×128 panorama, saved."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "20": {"class_type": "AtelierSyntheticPanorama", "inputs": {"erp_height": 32, "frequency": 6.0}},
        "21": {"class_type": "AtelierPlaneLayout", "inputs": {"preset": "cube_6", "plane_size": 64, "fov_deg": 90.0,
                                                              "erp_height": 64}},
        "22": {"class_type": "AtelierOmniSSR", "inputs": {
            "model": ["4", 0], "vae": ["4", 2], "positive": ["6", 0], "negative": ["6", 0], "panorama": ["20", 0],
            "layout": ["21", 0], "scale": 2, "steps": 2, "cfg": 1.0, "strength": 1.0, "every_k": 1, "gamma_l": 0.5,
            "gamma_e": 1.0, "seed": SEED}},
        SAVE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "omnissr", "images": ["22", 0]}},
    }


def test_omnissr_runs_on_comfyuis_own_model_and_matches_the_standalone_run(comfyui_server, random_sd15_models,
                                                                          atelier):
    """OmniSSR runs to success inside ComfyUI on its MODEL and VAE (through ``denoiser_and_codec``), and Atelier's
    own loader of the same file gives the same panorama: the adapters are the same model, step for step."""
    prompt = omnissr_prompt(random_sd15_models.checkpoint)
    (comfy_image,) = comfyui_server.run(prompt)[SAVE_NODE]
    (atelier_image,) = atelier.run(prompt)[SAVE_NODE]
    assert comfy_image.shape == atelier_image.shape == (64, 128, 3)
    measured = psnr(comfy_image, atelier_image)
    print(f"OmniSSR, ComfyUI against Atelier: {measured:.1f} dB")
    assert measured >= TARGET_PSNR_DB


def generator_prompt(checkpoint: str) -> dict:
    """CheckpointLoaderSimple's MODEL and VAE and CLIPTextEncode's prompts into the Tiled 16K generator: one direct
    256² pass in 128-px tiles overlapping by 32 (nine 16×16 latent tiles, all in one UNet call), 2 euler steps
    without guidance, then the tiled decode in one 512-px tile; saved."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "30": {"class_type": "AtelierTiled16KGenerator", "inputs": {
            "model": ["4", 0], "vae": ["4", 2], "positive": ["6", 0], "negative": ["7", 0], "width": 256,
            "height": 256, "schedule": "direct", "base_size": 256, "seed": SEED, "steps": 2, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "mode": "mixture", "tile_size": 128, "overlap": 32,
            "offset_stride": 64, "tile_batch_size": 9, "vae_tile_size": 512, "vae_precision": "auto"}},
        SAVE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "generator", "images": ["30", 0]}},
    }


def test_16k_generator_runs_on_comfyuis_own_model_and_matches_the_standalone_run(comfyui_server, random_sd15_models,
                                                                                atelier):
    """The Tiled 16K generator runs to success inside ComfyUI on its MODEL and VAE (tiled diffusion over the
    adapters' denoiser, ComfyUI's tiled decode), and gives the standalone run's image."""
    prompt = generator_prompt(random_sd15_models.checkpoint)
    (comfy_image,) = comfyui_server.run(prompt)[SAVE_NODE]
    (atelier_image,) = atelier.run(prompt)[SAVE_NODE]
    assert comfy_image.shape == atelier_image.shape == (256, 256, 3)
    measured = psnr(comfy_image, atelier_image)
    print(f"16K generator, ComfyUI against Atelier: {measured:.1f} dB")
    assert measured >= TARGET_PSNR_DB


ROUTER_PROMPTS = ("a cat", "a red car", "a dog on grass",
                  "an intricate baroque cathedral interior at golden hour, volumetric light, ornate gilded columns",
                  "a detailed cyberpunk market street at night, neon signs, rain reflections, crowds of people",
                  "a hyperrealistic portrait of an old fisherman, weathered skin, knitted hat, stormy harbour behind")
ROUTE_NODE, FITTED_NODE = "42", "41"
# Both hosts' prototypes are means of float32 pooled CLIP states of the same weights: they differed by 4.4e-8 at
# most (entries of order 1); a projected or wrongly pooled state moves them by far more.
PROTOTYPE_TOLERANCE = 1e-5


def router_prompt(checkpoint: str, router_file: str) -> dict:
    """CheckpointLoaderSimple's CLIP fits a two-variant router on six prompts and saves it as ``router_file``; the
    router then routes a long prompt, and Route Switch passes on the chosen branch's image (black for the cheap
    variant, white for the dear one), which is saved."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        FITTED_NODE: {"class_type": "AtelierFitRouter", "inputs": {
            "clip": ["4", 1], "prompts": "\n".join(ROUTER_PROMPTS), "variants": "4 steps = 0.2\n20 steps = 1.0",
            "method": "kmeans", "cluster_seed": 0}},
        "43": {"class_type": "AtelierSaveRouter", "inputs": {"router": [FITTED_NODE, 0], "filename": router_file}},
        ROUTE_NODE: {"class_type": "AtelierRoutePrompt", "inputs": {
            "clip": ["4", 1], "router": [FITTED_NODE, 0], "prompt": ROUTER_PROMPTS[4], "budget": 0.6}},
        "44": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "45": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0xFFFFFF}},
        "46": {"class_type": "AtelierRouteSwitch", "inputs": {"branch": [ROUTE_NODE, 0], "branch_0": ["44", 0],
                                                              "branch_1": ["45", 0]}},
        SAVE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "routed", "images": ["46", 0]}},
    }


def test_router_fits_and_routes_on_comfyuis_own_clip_as_on_ateliers(comfyui_server, random_sd15_models, atelier):
    """Inside ComfyUI the router embeds prompts with ComfyUI's CLIP (``tokenize`` + ``encode_from_tokens(...,
    return_pooled=True)``) and counts tokens with its tokenizer; fitted on the same prompts, the router it saves has
    the standalone router's prototypes, difficulty order and bias, and it routes the prompt to the same branch."""
    comfy_images = comfyui_server.run(router_prompt(random_sd15_models.checkpoint, "comfy_fitted"))
    atelier_images = atelier.run(router_prompt(random_sd15_models.checkpoint, "atelier_fitted"))
    comfy_router, atelier_router = (load_router(os.path.join(random_sd15_models.path, "routers", f"{name}.safetensors"))
                                    for name in ("comfy_fitted", "atelier_fitted"))
    assert comfy_router.embedding == "ComfyUI's SD1ClipModel text encoder", comfy_router.embedding
    assert comfy_router.labels == atelier_router.labels
    largest = (comfy_router.prototypes - atelier_router.prototypes).abs().max().item()
    print(f"router prototypes, ComfyUI against Atelier: largest difference {largest:.2e}")
    assert largest <= PROTOTYPE_TOLERANCE
    assert torch.allclose(comfy_router.bias_lambdas, atelier_router.bias_lambdas, atol=1e-6)
    assert np.array_equal(comfy_images[SAVE_NODE][0], atelier_images[SAVE_NODE][0])


LONG_PROMPT = ("A lighthouse stands on a black cliff above a stormy sea. Waves break white against the rocks below it. "
               "Its lamp throws a long beam across low clouds at dusk. A small fishing boat with a red hull heads "
               "for the harbour. Gulls circle the tower, and rain streaks the glass of the lamp room. On the path "
               "below, a keeper in a yellow coat carries a lantern toward the door. Far behind, the lights of a "
               "town glow along the bay.")
LONGALIGN_NODE, CUT_NODE = "9", "10"


def long_prompt_sampler_prompt(checkpoint: str) -> dict:
    """CheckpointLoaderSimple's CLIP encodes a prompt of more than 77 tokens with Encode Long Prompt (LongAlign) and,
    for comparison, with CLIPTextEncode (ComfyUI's 77-token chunks); Atelier's Sampler runs TCD on the MODEL for
    each, 2 steps at 64×64, and both images are saved."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "AtelierTextEncode", "inputs": {"clip": ["4", 1], "text": LONG_PROMPT,
                                                            "encoding": "auto"}},
        "7": {"class_type": "AtelierTextEncode", "inputs": {"clip": ["4", 1], "text": "", "encoding": "longalign"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": LONG_PROMPT}},
    }
    for save, positive in ((LONGALIGN_NODE, "6"), (CUT_NODE, "8")):
        prompt[f"{save}1"] = {"class_type": "AtelierSampler", "inputs": {
            "model": ["4", 0], "positive": [positive, 0], "negative": ["7", 0], "latent_image": ["5", 0],
            "seed": SEED, "steps": 2, "cfg": 1.5, "sampler_name": "tcd", "scheduler": "normal", "denoise": 1.0,
            "momentum": 0.0}}
        prompt[f"{save}2"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{save}1", 0], "vae": ["4", 2]}}
        prompt[save] = {"class_type": "SaveImage", "inputs": {"filename_prefix": f"long{save}",
                                                              "images": [f"{save}2", 0]}}
    return prompt


def test_long_prompt_encoder_and_ateliers_sampler_run_on_comfyuis_own_clip_and_model(comfyui_server,
                                                                                     random_sd15_models, atelier):
    """Inside ComfyUI, Encode Long Prompt encodes with ComfyUI's CLIP (sentence by sentence through its tokenizer and
    ``encode_from_tokens``) and Atelier's Sampler runs diffusers' TCD on ComfyUI's MODEL (through ``ComfyDenoiser``):
    the picture is the standalone run's. The same prompt through CLIPTextEncode gives another picture, so the match
    is LongAlign's encoding and not a prompt the random model ignores."""
    prompt = long_prompt_sampler_prompt(random_sd15_models.checkpoint)
    comfy_images = comfyui_server.run(prompt)
    atelier_images = atelier.run(prompt)
    (comfy_long,), (atelier_long,) = comfy_images[LONGALIGN_NODE], atelier_images[LONGALIGN_NODE]
    assert comfy_long.shape == atelier_long.shape == (64, 64, 3)
    measured = psnr(comfy_long, atelier_long)
    against_cut = psnr(comfy_long, comfy_images[CUT_NODE][0])
    print(f"LongAlign + TCD, ComfyUI against Atelier: {measured:.1f} dB; against CLIPTextEncode's: {against_cut:.1f} dB")
    assert measured >= TARGET_PSNR_DB
    assert against_cut < TARGET_PSNR_DB - 10


def noiseshift_prompt(checkpoint: str) -> dict:
    """A plain 2-step KSampler run; its latents as the clean latents of NoiseShift Calibrate (2 levels); NoiseShift
    Apply's MODEL into a second KSampler with the same seed, decoded and saved."""
    sampling = {"seed": SEED, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **sampling}},
        "11": {"class_type": "AtelierNoiseShiftCalibrate", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "latent": ["10", 0], "levels": 2, "seed": 0}},
        "12": {"class_type": "AtelierNoiseShiftApply", "inputs": {"model": ["4", 0], "table": ["11", 0]}},
        "13": {"class_type": "KSampler", "inputs": {"model": ["12", 0], **sampling}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["4", 2]}},
        SAVE_NODE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "noiseshift", "images": ["14", 0]}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}},
        "16": {"class_type": "SaveImage", "inputs": {"filename_prefix": "plain", "images": ["15", 0]}},
    }


def test_noiseshift_calibrates_and_patches_comfyuis_own_model_as_standalone(comfyui_server, random_sd15_models,
                                                                            atelier):
    """NoiseShift Calibrate runs on ComfyUI's MODEL (through ``denoiser_and_latent_space``) and Apply's object
    patch of its ``model_sampling`` drives ComfyUI's own KSampler; the standalone run of the same prompt (its
    KSampler follows the ref's table) gives the same picture."""
    prompt = noiseshift_prompt(random_sd15_models.checkpoint)
    comfy_images = comfyui_server.run(prompt)
    (comfy_image,), (comfy_plain,) = comfy_images[SAVE_NODE], comfy_images["16"]
    (atelier_image,) = atelier.run(prompt)[SAVE_NODE]
    assert comfy_image.shape == atelier_image.shape == (64, 64, 3)
    measured = psnr(comfy_image, atelier_image)
    print(f"NoiseShift, ComfyUI against Atelier: {measured:.1f} dB; shifted against plain in ComfyUI: "
          f"{psnr(comfy_image, comfy_plain):.1f} dB")
    assert measured >= TARGET_PSNR_DB
    assert not np.array_equal(comfy_image, comfy_plain)  # the patch reached ComfyUI's sampler


def acceleration_prompt(checkpoint: str) -> dict:
    """DDIM at 8 steps four times with one seed: on the plain MODEL, through Faster Diffusion with every step a key
    step and no injection, through Faster Diffusion's defaults (the paper's set scaled to 8 steps: keys 0, 1, 2, 4,
    6; parallel decoding), through T-Stitch with the model itself as the small model, and through feature
    inheritance with every step full and with its defaults; and SamplerCustom with SADA's MODEL and SAMPLER (Euler,
    16 steps, its ranges shrunk to them)."""
    sampling = {"seed": SEED, "steps": 8, "cfg": 7.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
                "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "20": {"class_type": "AtelierFasterDiffusion", "inputs": {
            "model": ["4", 0], "key_steps": "uniform", "interval": 1, "noise_alpha": 0.0, "noise_tau": 500,
            "parallel": False, "max_group": 10}},
        "21": {"class_type": "AtelierFasterDiffusion", "inputs": {
            "model": ["4", 0], "key_steps": "paper", "interval": 4, "noise_alpha": 0.003, "noise_tau": 500,
            "parallel": True, "max_group": 10}},
        "22": {"class_type": "AtelierTStitch", "inputs": {"model": ["4", 0], "small_model": ["4", 0], "ratio": 0.4}},
        "25": {"class_type": "AtelierFeatureInheritance", "inputs": {
            "model": ["4", 0], "granularity": "layer", "mode": "uniform", "interval": 1, "front": 0.0,
            "min_level": 0}},
        "26": {"class_type": "AtelierFeatureInheritance", "inputs": {
            "model": ["4", 0], "granularity": "layer", "mode": "front_dense", "interval": 2, "front": 0.2,
            "min_level": 2}},
        "23": {"class_type": "AtelierSADA", "inputs": {
            "model": ["4", 0], "solver": "euler", "acc_start": 3, "acc_end": 14, "lagrange_step": 8,
            "lagrange_int": 4, "lagrange_term": 4, "max_interval": 4, "sx": 3, "sy": 3, "max_downsample": 1,
            "max_fix": 5120}},
        "24": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": 16,
                                                         "denoise": 1.0}},
        "71": {"class_type": "SamplerCustom", "inputs": {
            "model": ["23", 0], "add_noise": True, "noise_seed": SEED, "cfg": 7.0, "positive": ["6", 0],
            "negative": ["7", 0], "sampler": ["23", 1], "sigmas": ["24", 0], "latent_image": ["5", 0]}},
        "72": {"class_type": "VAEDecode", "inputs": {"samples": ["71", 0], "vae": ["4", 2]}},
        SADA_SAVE: {"class_type": "SaveImage", "inputs": {"filename_prefix": "sada", "images": ["72", 0]}},
    }
    for save, model in ((FD_PLAIN, ["4", 0]), (FD_EVERY_STEP, ["20", 0]), (FD_PAPER, ["21", 0]),
                        (TSTITCH_SAME, ["22", 0]), (FI_EVERY_STEP, ["25", 0]), (FI_DEFAULT, ["26", 0])):
        sample, decode = str(int(save) + 1), str(int(save) + 2)
        prompt[sample] = {"class_type": "KSampler", "inputs": {"model": model, **sampling}}
        prompt[decode] = {"class_type": "VAEDecode", "inputs": {"samples": [sample, 0], "vae": ["4", 2]}}
        prompt[save] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "fd" + save,
                                                              "images": [decode, 0]}}
    return prompt


# the SaveImage nodes of acceleration_prompt
FD_PLAIN, FD_EVERY_STEP, FD_PAPER, TSTITCH_SAME, SADA_SAVE, FI_EVERY_STEP, FI_DEFAULT = "30", "40", "50", "60", "70", \
    "80", "90"


def test_acceleration_patches_run_under_comfyuis_own_ksampler_as_standalone(comfyui_server, random_sd15_models,
                                                                            atelier):
    """SADA's sampler and token pruning run under ComfyUI's SamplerCustom as standalone; Faster Diffusion's, T-Stitch's and feature
    inheritance's wrappers run under ComfyUI's own KSampler through the UNet split of ComfyUI's UNetModel (every
    step full, or the model stitched to itself: the plain picture, bit for bit; feature inheritance's defaults:
    the standalone picture): with every step a key step, or with the model stitched to itself, the picture is the unpatched
    KSampler's, bit for bit; with the paper's set it changes, and it is the standalone run's picture (Atelier's split
    of the diffusers UNet, Atelier's KSampler)."""
    prompt = acceleration_prompt(random_sd15_models.checkpoint)
    comfy_images = comfyui_server.run(prompt)
    (plain,), (every_step,), (paper,), (stitched,) = (comfy_images[node] for node in (FD_PLAIN, FD_EVERY_STEP,
                                                                                      FD_PAPER, TSTITCH_SAME))
    assert np.array_equal(every_step, plain)
    assert np.array_equal(stitched, plain)
    assert np.array_equal(comfy_images[FI_EVERY_STEP][0], plain)
    assert not np.array_equal(paper, plain)
    atelier_images = atelier.run(prompt)
    measured = psnr(paper, atelier_images[FD_PAPER][0])
    print(f"Faster Diffusion, ComfyUI against Atelier: {measured:.1f} dB; against ComfyUI's plain KSampler: "
          f"{psnr(paper, plain):.1f} dB")
    assert measured >= TARGET_PSNR_DB
    inherited = psnr(comfy_images[FI_DEFAULT][0], atelier_images[FI_DEFAULT][0])
    print(f"Feature inheritance, ComfyUI against Atelier: {inherited:.1f} dB; against ComfyUI's plain KSampler: "
          f"{psnr(comfy_images[FI_DEFAULT][0], plain):.1f} dB")
    assert inherited >= TARGET_PSNR_DB and not np.array_equal(comfy_images[FI_DEFAULT][0], plain)
    sada = psnr(comfy_images[SADA_SAVE][0], atelier_images[SADA_SAVE][0])
    print(f"SADA under SamplerCustom, ComfyUI against Atelier: {sada:.1f} dB")
    assert sada >= TARGET_PSNR_DB


def test_lora_when_ready_applies_comfyuis_own_lora_inside_comfyui_and_matches_the_standalone_run(
        comfyui_server, random_sd15_models, atelier):
    """Load LoRA When Ready inside ComfyUI is ComfyUI's own LoRA patch on its MODEL (the same picture as ComfyUI's
    LoraLoaderModelOnly, bit for bit); standalone (Atelier's adapter beside the base weights) the picture is the
    same within float32 arithmetic."""
    from nodes.models.export import write_random_lora
    from nodes.models.lora import LORA_READS

    loras = os.path.join(random_sd15_models.path, "loras")
    os.makedirs(loras, exist_ok=True)
    write_random_lora("sd1", os.path.join(loras, "style.safetensors"), seed=3, rank=8, scale=0.3)
    sampling = {"seed": SEED, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_sd15_models.checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "AtelierLoraWhenReady", "inputs": {"model": ["4", 0], "lora_name": "style.safetensors",
                                                                "strength_model": 1.0}},
        "20": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": "style.safetensors",
                                                               "strength_model": 1.0}},
    }
    for save, model in (("13", ["10", 0]), ("23", ["20", 0]), ("33", ["4", 0])):
        sample, decode = str(int(save) - 2), str(int(save) - 1)
        prompt[sample] = {"class_type": "KSampler", "inputs": {"model": model, **sampling}}
        prompt[decode] = {"class_type": "VAEDecode", "inputs": {"samples": [sample, 0], "vae": ["4", 2]}}
        prompt[save] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "lora" + save,
                                                              "images": [decode, 0]}}
    comfy_images = comfyui_server.run(prompt)
    (when_ready,), (waited,), (plain,) = (comfy_images[node] for node in ("13", "23", "33"))
    assert np.array_equal(when_ready, waited) and not np.array_equal(when_ready, plain)
    # Standalone, a file still being read when sampling starts comes in at a later step (test_lora_when_ready.py);
    # read first here, the when-ready picture is the waited one.
    LORA_READS.start(os.path.join(loras, "style.safetensors")).result()
    standalone = atelier.run(prompt)
    measured = psnr(when_ready, standalone["13"][0])
    assert np.array_equal(standalone["13"][0], standalone["23"][0])
    print(f"LoRA when ready, ComfyUI against Atelier: {measured:.1f} dB; with against without the LoRA in ComfyUI: "
          f"{psnr(when_ready, plain):.1f} dB")
    assert measured >= TARGET_PSNR_DB


def test_seamless_tiling_runs_under_comfyuis_own_ksampler_and_vae_as_standalone(comfyui_server, random_sd15_models,
                                                                               atelier):
    """Seamless Tiling's wrapper runs under ComfyUI's KSampler on ComfyUI's UNetModel (its Conv2d cast layers wrap
    around; with native_size 8 on a 16×16 latent its SpatialTransformers run on rolled 2×2 patches) and Seamless VAE
    Decode on ComfyUI's VAE: start_fraction 1 is ComfyUI's plain picture bit for bit; the default is the standalone
    picture, and its 3×3 preview is the picture tiled."""
    sampling = {"seed": SEED, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_sd15_models.checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a tiled floor", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "10": {"class_type": "AtelierSeamlessTiling", "inputs": {"model": ["4", 0], "start_fraction": 1.0,
                                                                 "axes": "both", "patched_attention": False,
                                                                 "native_size": 0}},
        "20": {"class_type": "AtelierSeamlessTiling", "inputs": {"model": ["4", 0], "start_fraction": 0.25,
                                                                 "axes": "both", "patched_attention": True,
                                                                 "native_size": 8}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["10", 0], **sampling}},
        "21": {"class_type": "KSampler", "inputs": {"model": ["20", 0], **sampling}},
        "31": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **sampling}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
        "32": {"class_type": "VAEDecode", "inputs": {"samples": ["31", 0], "vae": ["4", 2]}},
        "22": {"class_type": "AtelierSeamlessVAEDecode", "inputs": {"samples": ["21", 0], "vae": ["4", 2],
                                                                    "axes": "both", "context": 0.125}},
        "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": "never", "images": ["12", 0]}},
        "33": {"class_type": "SaveImage", "inputs": {"filename_prefix": "plain", "images": ["32", 0]}},
        "23": {"class_type": "SaveImage", "inputs": {"filename_prefix": "seamless", "images": ["22", 0]}},
        "24": {"class_type": "SaveImage", "inputs": {"filename_prefix": "tiled", "images": ["22", 1]}},
    }
    comfy_images = comfyui_server.run(prompt)
    (never,), (plain,), (seamless,), (tiled,) = (comfy_images[node] for node in ("13", "33", "23", "24"))
    assert np.array_equal(never, plain)
    assert not np.array_equal(seamless, plain)
    assert tiled.shape == (384, 384, 3) and np.array_equal(tiled[128:256, 256:384], seamless)
    standalone = atelier.run(prompt)["23"][0]
    measured = psnr(seamless, standalone)
    print(f"Seamless tiling, ComfyUI against Atelier: {measured:.1f} dB; against ComfyUI's plain KSampler: "
          f"{psnr(seamless, plain):.1f} dB")
    assert measured >= TARGET_PSNR_DB


def test_inpainting_nodes_run_on_comfyuis_own_model_and_vae_as_standalone(comfyui_server, random_sd15_models,
                                                                           atelier, tmp_path):
    """An inpainting graph of core nodes (SolidMask and MaskComposite draw the mask; SetLatentNoiseMask, KSampler,
    VAEDecode), then Preserve Unmasked and Asymmetric VQGAN's decoder (a random one in the published layout, at
    half width, in models/vae): in ComfyUI as standalone; outside the feathered mask the preserved picture is the
    original bit for bit in both hosts."""
    from test_preserve_unmasked import _write_asymmetric_vae

    vaes = os.path.join(random_sd15_models.path, "vae")
    os.makedirs(vaes, exist_ok=True)
    if not os.path.exists(os.path.join(vaes, "asym_test.safetensors")):
        _write_asymmetric_vae(os.path.join(vaes, "asym_test.safetensors"))
    sampling = {"seed": SEED, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                "negative": ["7", 0]}
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_sd15_models.checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a harbour", "clip": ["4", 1]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a boat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["6", 0], "latent_image": ["5", 0],
                                                    "denoise": 1.0, **sampling}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}},
        "20": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "21": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 24, "height": 24}},
        "22": {"class_type": "MaskComposite", "inputs": {"destination": ["20", 0], "source": ["21", 0], "x": 36,
                                                         "y": 20, "operation": "add"}},
        "30": {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}},
        "31": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["30", 0], "mask": ["22", 0]}},
        "32": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["8", 0], "latent_image": ["31", 0],
                                                    "denoise": 0.9, **sampling}},
        "33": {"class_type": "VAEDecode", "inputs": {"samples": ["32", 0], "vae": ["4", 2]}},
        "40": {"class_type": "AtelierPreserveUnmasked", "inputs": {"decoded": ["33", 0], "original": ["11", 0],
                                                                   "mask": ["22", 0], "dilate": 4, "feather": 2.0}},
        "50": {"class_type": "AtelierAsymmetricVAELoader", "inputs": {"vae_name": "asym_test.safetensors"}},
        "51": {"class_type": "AtelierAsymmetricVAEDecode", "inputs": {"asym_vae": ["50", 0], "samples": ["32", 0],
                                                                      "image": ["11", 0], "mask": ["22", 0]}},
        "60": {"class_type": "SaveImage", "inputs": {"filename_prefix": "original", "images": ["11", 0]}},
        "61": {"class_type": "SaveImage", "inputs": {"filename_prefix": "preserved", "images": ["40", 0]}},
        "62": {"class_type": "SaveImage", "inputs": {"filename_prefix": "asymmetric", "images": ["51", 0]}},
    }
    outside = np.ones((64, 64), dtype=bool)
    outside[20 - 4 - 6:44 + 4 + 6, 36 - 4 - 6:] = False  # the square, grown by dilate and the blur's reach
    hosts = {"ComfyUI": comfyui_server.run(prompt), "Atelier": atelier.run(prompt)}
    for host, images in hosts.items():
        (original,), (preserved,), (asymmetric,) = (images[node] for node in ("60", "61", "62"))
        assert np.array_equal(preserved[outside], original[outside]), host
        assert asymmetric.shape == (64, 64, 3)
    for node in ("61", "62"):
        measured = psnr(hosts["ComfyUI"][node][0], hosts["Atelier"][node][0])
        print(f"inpainting node {node}, ComfyUI against Atelier: {measured:.1f} dB")
        assert measured >= TARGET_PSNR_DB


def test_noisediffusion_runs_on_comfyuis_own_model_and_vae_as_standalone(comfyui_server, random_sd15_models,
                                                                         atelier):
    """NoiseDiffusion's inversion, mixing and sampling through ComfyUI's MODEL and VAE (the denoiser and codec
    adapters): the same sequence as standalone."""
    sampling = {"seed": SEED, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_sd15_models.checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a harbour", "clip": ["4", 1]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a forest", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["6", 0], **sampling}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["8", 0], **sampling}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
        "20": {"class_type": "AtelierNoiseDiffusion", "inputs": {
            "model": ["4", 0], "vae": ["4", 2], "image_a": ["12", 0], "image_b": ["13", 0], "positive": ["6", 0],
            "negative": ["7", 0], "frames": 1, "include_ends": True, "steps": 6, "depth": 0.5, "cfg": 7.5,
            "gamma": 0.0, "clip": 2.0, "inject": 1.2, "seed": 0}},
        "21": {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["4", 2]}},
        "22": {"class_type": "SaveImage", "inputs": {"filename_prefix": "nd", "images": ["21", 0]}},
    }
    comfy_images, atelier_images = comfyui_server.run(prompt)["22"], atelier.run(prompt)["22"]
    assert len(comfy_images) == len(atelier_images) == 3
    for comfy_image, atelier_image in zip(comfy_images, atelier_images):
        measured = psnr(comfy_image, atelier_image)
        print(f"NoiseDiffusion, ComfyUI against Atelier: {measured:.1f} dB")
        assert measured >= TARGET_PSNR_DB


def _drawn_picture_and_box(checkpoint: str, text: str, box: tuple[int, int, int, int]) -> dict:
    """Prompt nodes drawing a 64×64 picture of ``text`` (node "12"; "6" the prompt, "7" the empty one, "4" the
    checkpoint) and a mask of 1 in ``box`` = (x, y, width, height), else 0 (node "15")."""
    x, y, width, height = box
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "seed": SEED,
            "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}},
        "13": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "14": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": width, "height": height}},
        "15": {"class_type": "MaskComposite", "inputs": {"destination": ["13", 0], "source": ["14", 0], "x": x,
                                                         "y": y, "operation": "add"}},
    }


def test_magicface_runs_on_comfyuis_own_model_and_vae_as_standalone(comfyui_server, random_sd15_models, atelier):
    """MagicFace's hooked attention on ComfyUI's own UNet (its LDM attention modules, in the order they run) and its
    VAE: the same picture as standalone."""
    prompt = {
        **_drawn_picture_and_box(random_sd15_models.checkpoint, "a red hat", (0, 0, 32, 64)),
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a woman wearing a hat", "clip": ["4", 1]}},
        "16": {"class_type": "AtelierMagicFaceReference", "inputs": {
            "image": ["12", 0], "mask": ["15", 0], "prompt": ["6", 0], "token_index": 5, "mask_weight": 3.0}},
        "20": {"class_type": "AtelierMagicFaceSampler", "inputs": {
            "model": ["4", 0], "vae": ["4", 2], "positive": ["8", 0], "negative": ["7", 0], "references": ["16", 0],
            "latent_image": ["5", 0], "seed": 0, "steps": 5, "cfg": 7.5, "inject_step": 2, "layers": "auto",
            "ca_scale": 0.0, "adaptive_guidance": True}},
        "21": {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["4", 2]}},
        "22": {"class_type": "SaveImage", "inputs": {"filename_prefix": "mf", "images": ["21", 0]}},
    }
    # the same with the references seen by the first block only: the hooks are what changes the picture
    prompt["30"] = {"class_type": "AtelierMagicFaceSampler",
                    "inputs": {**prompt["20"]["inputs"], "layers": "0", "adaptive_guidance": False}}
    prompt["31"] = {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["4", 2]}}
    prompt["32"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "mf_first", "images": ["31", 0]}}
    comfy_images, atelier_images = comfyui_server.run(prompt), atelier.run(prompt)
    (comfy_image,), (atelier_image,), (comfy_first,) = comfy_images["22"], atelier_images["22"], comfy_images["32"]
    assert comfy_image.std() > 1 and not np.array_equal(comfy_image, comfy_first)
    measured = psnr(comfy_image, atelier_image)
    print(f"MagicFace, ComfyUI against Atelier: {measured:.1f} dB")
    assert measured >= TARGET_PSNR_DB


def test_hyper_sd_presets_run_under_comfyuis_sampler_custom_as_standalone(comfyui_server, random_sd15_models, atelier):
    """Hyper-SD's node inside ComfyUI gives ComfyUI's own LoRA patch, a KSAMPLER and sigmas that ComfyUI's
    SamplerCustom runs, its cfg output linked to SamplerCustom's cfg: the 8-step CFG preset (DDIM, cfg 5) and the
    unified 1-step LoRA at 4 TCD steps (γ 0.5, the sampler reading ComfyUI's sigma table through its guider) give
    the standalone pictures, and the LoRA changes them."""
    import json

    from diffusers import UNet2DConditionModel

    from nodes.models.model_configs import SHIPPED_CONFIGS
    from tiny_models import write_hyper_sd_lora

    with open(os.path.join(SHIPPED_CONFIGS, "sd15", "unet", "config.json")) as file:
        config = json.load(file)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)  # the layout's shapes only
    loras = os.path.join(random_sd15_models.path, "loras")
    os.makedirs(loras, exist_ok=True)
    for seed, name in enumerate(("Hyper-SD15-8steps-CFG-lora", "Hyper-SD15-1step-lora")):
        write_hyper_sd_lora(unet, os.path.join(loras, f"{name}.safetensors"), rank=8, seed=seed, scale=0.05)
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_sd15_models.checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    branches = (("13", "Hyper-SD15-8steps-CFG-lora", 0, 1.0), ("23", "Hyper-SD15-1step-lora", 4, 0.5),
                ("33", "Hyper-SD15-8steps-CFG-lora", 0, 1.0))
    for save, lora, steps, eta in branches:
        preset, sample, decode = (str(int(save) - offset) for offset in (3, 2, 1))
        prompt[preset] = {"class_type": "AtelierHyperSD", "inputs": {
            "model": ["4", 0], "lora_name": f"{lora}.safetensors", "preset": "auto",
            "strength_model": 0.0 if save == "33" else 1.0, "steps": steps, "eta": eta}}
        prompt[sample] = {"class_type": "SamplerCustom", "inputs": {
            "model": [preset, 0], "add_noise": True, "noise_seed": SEED, "cfg": [preset, 3], "positive": ["6", 0],
            "negative": ["7", 0], "sampler": [preset, 1], "sigmas": [preset, 2], "latent_image": ["5", 0]}}
        prompt[decode] = {"class_type": "VAEDecode", "inputs": {"samples": [sample, 0], "vae": ["4", 2]}}
        prompt[save] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "hypersd" + save,
                                                              "images": [decode, 0]}}
    comfy_images = comfyui_server.run(prompt)
    standalone = atelier.run(prompt)
    for save, lora, _, _ in branches:
        measured = psnr(comfy_images[save][0], standalone[save][0])
        print(f"Hyper-SD {lora} ({save}), ComfyUI against Atelier: {measured:.1f} dB; levels "
              f"{comfy_images[save][0].min()}–{comfy_images[save][0].max()}, std {comfy_images[save][0].std():.1f}")
        assert measured >= TARGET_PSNR_DB
    assert not np.array_equal(comfy_images["13"][0], comfy_images["33"][0])  # strength 0 leaves the base model


def test_rectified_flow_runs_under_comfyuis_sampler_custom_as_standalone(comfyui_server, random_sd15_models, atelier):
    """InstaFlow's node inside ComfyUI patches ComfyUI's model_sampling to the flow (velocity toward the data) and
    gives its Euler and sigmas: 2-Rectified Flow at 3 steps and guidance 1.5 gives the standalone picture."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_sd15_models.checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "AtelierRectifiedFlow", "inputs": {"model": ["4", 0], "weights": "2-Rectified Flow",
                                                                "steps": 3}},
        "11": {"class_type": "SamplerCustom", "inputs": {
            "model": ["10", 0], "add_noise": True, "noise_seed": SEED, "cfg": ["10", 3], "positive": ["6", 0],
            "negative": ["7", 0], "sampler": ["10", 1], "sigmas": ["10", 2], "latent_image": ["5", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": "flow", "images": ["12", 0]}},
    }
    _same_picture(comfyui_server, atelier, prompt, "13", "2-Rectified Flow")


def _same_picture(comfyui_server, atelier, prompt: dict, node: str, label: str) -> np.ndarray:
    """``prompt`` run in ComfyUI and in the standalone app: the pictures ``node`` saves agree within
    :data:`TARGET_PSNR_DB` (the figure is printed, with the picture's levels). Returns ComfyUI's picture."""
    comfy_picture, standalone_picture = comfyui_server.run(prompt)[node][0], atelier.run(prompt)[node][0]
    measured = psnr(comfy_picture, standalone_picture)
    print(f"{label}, ComfyUI against Atelier: {measured:.1f} dB; its levels {comfy_picture.min()}–"
          f"{comfy_picture.max()}, std {comfy_picture.std():.1f}")
    assert measured >= TARGET_PSNR_DB
    return comfy_picture


def _free_both(comfyui_server, atelier) -> None:
    """Both hosts' models and cached results dropped: the full-size tests below hold a second full-size model in each
    host, which beside what the module's earlier prompts keep runs a 24 GB machine out of memory."""
    from nodes.models.loading import unload_all

    comfyui_server.free()
    atelier.executor.free()
    unload_all()


def test_rectified_diffusion_loads_its_unet_file_and_samples_under_comfyuis_sampler_custom_as_standalone(
        comfyui_server, random_sd15_models, atelier):
    """Load Checkpoint + UNet File inside ComfyUI (ComfyUI's load_diffusion_model of a diffusers-layout file beside
    the checkpoint's CLIP and VAE) and rd's preset (the linear betas as a model_sampling object patch, DDIM on the
    trailing grid) under ComfyUI's SamplerCustom give the standalone picture, whose UNet is the file's (the
    checkpoint's with its output layer halved; tests/test_fewstep_rectified_diffusion.py shows the standalone loader
    takes the file's weights bit for bit), so ComfyUI ran the file's UNet too."""
    from safetensors.torch import save_file

    _free_both(comfyui_server, atelier)
    base = load_model(os.path.join(random_sd15_models.path, "checkpoints", random_sd15_models.checkpoint))
    with ModelRef(base).in_use("unet") as loaded:  # a fresh copy (no LoRA adapter layers), its UNet held
        tensors = {key: value.to(torch.float16).contiguous() for key, value in loaded.unet.state_dict().items()}
    tensors["conv_out.weight"] = tensors["conv_out.weight"] * 0.5
    os.makedirs(os.path.join(random_sd15_models.path, "diffusion_models"), exist_ok=True)
    save_file(tensors, os.path.join(random_sd15_models.path, "diffusion_models", "rd.safetensors"))
    del tensors
    prompt = {
        "4": {"class_type": "AtelierCheckpointWithUNet", "inputs": {"ckpt_name": random_sd15_models.checkpoint,
                                                                   "unet_name": "rd.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "AtelierRectifiedDiffusion", "inputs": {"model": ["4", 0], "weights": "rd", "steps": 2}},
        "11": {"class_type": "SamplerCustom", "inputs": {
            "model": ["10", 0], "add_noise": True, "noise_seed": SEED, "cfg": ["10", 3], "positive": ["6", 0],
            "negative": ["7", 0], "sampler": ["10", 1], "sigmas": ["10", 2], "latent_image": ["5", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": "rd", "images": ["12", 0]}},
    }
    del base, loaded  # the file is written: the standalone copy of the checkpoint may go before the prompts
    _free_both(comfyui_server, atelier)
    _same_picture(comfyui_server, atelier, prompt, "13", "Rectified Diffusion rd")
    _free_both(comfyui_server, atelier)


def test_speedupnet_runs_under_comfyuis_sampler_custom_as_standalone(comfyui_server, random_sd15_models, atelier):
    """SpeedUpNet's node inside ComfyUI: SUN's processors in ComfyUI's own cross-attention layers (through the
    sampling patch's diffusion_model wrapper), the negative's tokens appended to the positive, DPM-Solver++(2M) on
    the trailing grid at cfg 1 under ComfyUI's SamplerCustom: the standalone picture; the adapter changes it."""
    from nodes.fewstep.speedupnet import speedupnet_layout

    from tiny_models import write_speedupnet_adapter

    _free_both(comfyui_server, atelier)
    folder = os.path.join(random_sd15_models.path, "speedupnet")
    os.makedirs(folder, exist_ok=True)
    name = "sun_adapter_sdv15_4step_addpos.safetensors"
    base = load_model(os.path.join(random_sd15_models.path, "checkpoints", random_sd15_models.checkpoint))
    with ModelRef(base).in_use("unet") as loaded:  # a fresh copy (no LoRA adapter layers), its UNet held
        assert len(speedupnet_layout(loaded.unet)) == 128  # 16 cross-attentions, two branches of four tensors each
        write_speedupnet_adapter(loaded.unet, os.path.join(folder, name), scale=0.05)
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_sd15_models.checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "AtelierSpeedUpNet", "inputs": {"model": ["4", 0], "positive": ["6", 0],
                                                             "negative": ["7", 0], "adapter_name": name, "steps": 0}},
        "11": {"class_type": "SamplerCustom", "inputs": {
            "model": ["10", 0], "add_noise": True, "noise_seed": SEED, "cfg": ["10", 4], "positive": ["10", 1],
            "negative": ["7", 0], "sampler": ["10", 2], "sigmas": ["10", 3], "latent_image": ["5", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sun", "images": ["12", 0]}},
    }
    prompt["21"] = {"class_type": "SamplerCustom", "inputs": {**prompt["11"]["inputs"], "model": ["4", 0]}}
    prompt["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["4", 2]}}
    prompt["23"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "sun_plain", "images": ["22", 0]}}
    comfy_images = comfyui_server.run(prompt)
    measured = psnr(comfy_images["13"][0], atelier.run(prompt)["13"][0])
    print(f"SpeedUpNet, ComfyUI against Atelier: {measured:.1f} dB")
    assert measured >= TARGET_PSNR_DB
    assert not np.array_equal(comfy_images["13"][0], comfy_images["23"][0])  # the adapter acts
    _free_both(comfyui_server, atelier)


def test_a_pruned_unet_file_loads_and_samples_inside_comfyui_as_standalone(comfyui_server, random_sd15_models,
                                                                           atelier):
    """A UNet file pruned as APTP prunes (channel groups, heads, GEGLU groups, six dropped blocks;
    tests/tiny_models.aptp_expert) beside the checkpoint, through Load Checkpoint + UNet File: inside ComfyUI,
    whose detection cannot place it, the checkpoint's own ComfyUI model is rebuilt at the file's widths
    (nodes/models/checkpoint_unet.py) and samples under ComfyUI's KSampler the standalone picture, whose UNet is the
    file's (tests/test_router_aptp.py: bit for bit, and equal to the full UNet with the pruned parts zeroed). SD1.5
    stands in for SD2.1 here: the pruning is the same, and this module's checkpoint is SD1.5."""
    from safetensors.torch import save_file

    from tiny_models import aptp_expert

    _free_both(comfyui_server, atelier)
    base = load_model(os.path.join(random_sd15_models.path, "checkpoints", random_sd15_models.checkpoint))
    with ModelRef(base).in_use("unet") as loaded:  # a fresh copy (no LoRA adapter layers), its UNet held
        state, reference = aptp_expert(loaded.unet, seed=5)
        del reference
    os.makedirs(os.path.join(random_sd15_models.path, "diffusion_models"), exist_ok=True)
    save_file({key: value.to(torch.float16) for key, value in state.items()},
              os.path.join(random_sd15_models.path, "diffusion_models", "pruned.safetensors"))
    del state, base, loaded
    _free_both(comfyui_server, atelier)
    prompt = {
        "4": {"class_type": "AtelierCheckpointWithUNet", "inputs": {"ckpt_name": random_sd15_models.checkpoint,
                                                                   "unet_name": "pruned.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": SEED, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": "pruned", "images": ["12", 0]}},
    }
    _same_picture(comfyui_server, atelier, prompt, "13", "Pruned UNet file")
    _free_both(comfyui_server, atelier)


def test_adcsr_upscales_inside_comfyui_as_standalone(comfyui_server, random_sd15_models, atelier):
    """Load AdcSR and AdcSR Upscale inside ComfyUI (Atelier's own network on ComfyUI's IMAGE, the models folder's
    adcsr/ resolved under ComfyUI's models folder) give the standalone picture, on random full-size files in the
    published layout and a synthetic picture as the low-resolution input."""
    from nodes.superres.adcsr import HALF_DECODER_WIDTHS
    from nodes.superres.nodes import sd21_unet_config

    from tiny_models import write_adcsr_files

    _free_both(comfyui_server, atelier)
    network, decoder = write_adcsr_files(os.path.join(random_sd15_models.path, "adcsr"), sd21_unet_config(),
                                         HALF_DECODER_WIDTHS, aliases=False)
    prompt = {
        "1": {"class_type": "AtelierSyntheticPanorama", "inputs": {"erp_height": 32, "frequency": 6.0}},
        "2": {"class_type": "AtelierLoadAdcSR", "inputs": {"network_name": os.path.basename(network),
                                                           "decoder_name": os.path.basename(decoder)}},
        "3": {"class_type": "AtelierAdcSRUpscale", "inputs": {"adcsr": ["2", 0], "image": ["1", 0], "tile": 512,
                                                              "overlap": 32}},
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "adcsr", "images": ["3", 0]}},
    }
    assert _same_picture(comfyui_server, atelier, prompt, "4", "AdcSR").shape == (128, 256, 3)
    _free_both(comfyui_server, atelier)


def test_diffdis_cuts_out_inside_comfyui_as_standalone(comfyui_server, random_sd15_models, atelier):
    """Load DiffDIS and DiffDIS Cut-out inside ComfyUI (Atelier's UNet, ComfyUI's CLIP for the empty prompt and its
    VAE, the models folder's diffdis/ resolved under ComfyUI's) give the standalone mask. SD1.5's CLIP and VAE stand
    in for sd-turbo's (this module's checkpoint is SD1.5), under a small random DiffDIS UNet of 768-wide
    cross-attention; one view keeps it short."""
    from tiny_models import build_tiny_pipeline, write_diffdis_unet

    _free_both(comfyui_server, atelier)
    config = {**build_tiny_pipeline("sd2").unet.config, "cross_attention_dim": 768}
    write_diffdis_unet(os.path.join(random_sd15_models.path, "diffdis"), config, seed=7)
    prompt = {
        "1": {"class_type": "AtelierSyntheticPanorama", "inputs": {"erp_height": 32, "frequency": 6.0}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_sd15_models.checkpoint}},
        "3": {"class_type": "AtelierLoadDiffDIS", "inputs": {"unet_name": "unet/diffusion_pytorch_model.safetensors"}},
        "4": {"class_type": "AtelierDiffDISCutout", "inputs": {
            "diffdis": ["3", 0], "clip": ["2", 1], "vae": ["2", 2], "image": ["1", 0], "seed": SEED,
            "resolution": 256, "test_time_augmentation": False, "threshold": 0.0}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"filename_prefix": "diffdis", "images": ["5", 0]}},
    }
    assert _same_picture(comfyui_server, atelier, prompt, "6", "DiffDIS").shape == (32, 64, 3)
    _free_both(comfyui_server, atelier)


def test_stablenormal_estimates_normals_inside_comfyui_as_standalone(comfyui_server, random_sd15_models, atelier):
    """Load StableNormal and StableNormal Normals inside ComfyUI (Atelier's modules from the published folder layout,
    resolved under ComfyUI's models/stablenormal) give the standalone normal map, on a random YOSO folder."""
    from tiny_models import save_tiny_yoso

    _free_both(comfyui_server, atelier)
    save_tiny_yoso(os.path.join(random_sd15_models.path, "stablenormal", "yoso-normal-v0-3"), seed=3)
    prompt = {
        "1": {"class_type": "AtelierSyntheticPanorama", "inputs": {"erp_height": 32, "frequency": 6.0}},
        "2": {"class_type": "AtelierLoadStableNormal", "inputs": {"folder_name": "yoso-normal-v0-3"}},
        "3": {"class_type": "AtelierStableNormalNormals", "inputs": {
            "stablenormal": ["2", 0], "image": ["1", 0], "seed": SEED, "timestep": 0, "processing_resolution": 256}},
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "stablenormal", "images": ["3", 0]}},
    }
    assert _same_picture(comfyui_server, atelier, prompt, "4", "StableNormal").shape == (32, 64, 3)
    _free_both(comfyui_server, atelier)


def test_tvt_upscales_inside_comfyui_as_standalone(comfyui_server, random_sd15_models, atelier):
    """Load TVT and TVT Upscale inside ComfyUI (Atelier's UNet and 4× VAE, ComfyUI's CLIP for the prompt, the models
    folder's tvt/ resolved under ComfyUI's) give the standalone picture. SD1.5's CLIP stands in for SD2.1-base's
    (this module's checkpoint is SD1.5), under a small random TVTUNet of 768-wide cross-attention and the full-size
    VAED4."""
    from tiny_models import TINY_TVT_UNET, write_tvt_files

    _free_both(comfyui_server, atelier)
    write_tvt_files(os.path.join(random_sd15_models.path, "tvt"), {**TINY_TVT_UNET, "cross_attention_dim": 768},
                    seed=4)
    prompt = {
        "1": {"class_type": "AtelierSyntheticPanorama", "inputs": {"erp_height": 32, "frequency": 6.0}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_sd15_models.checkpoint}},
        "3": {"class_type": "AtelierLoadTVT", "inputs": {
            "vae_name": "tvt_vae.safetensors", "unet_name": "TVTUNet/unet/diffusion_pytorch_model.safetensors",
            "weights_name": "model_TVT.safetensors"}},
        "4": {"class_type": "AtelierTVTUpscale", "inputs": {
            "tvt": ["3", 0], "clip": ["2", 1], "image": ["1", 0], "prompt": "clean, high-resolution, 8k,",
            "tile": 96, "overlap": 32, "vae_tile": 1024, "colour_fix": True}},
        "5": {"class_type": "SaveImage", "inputs": {"filename_prefix": "tvt", "images": ["4", 0]}},
    }
    assert _same_picture(comfyui_server, atelier, prompt, "5", "TVT").shape == (128, 256, 3)
    _free_both(comfyui_server, atelier)


def test_diffeditor_drags_on_comfyuis_own_model_and_vae_as_standalone(comfyui_server, random_sd15_models, atelier):
    """DiffEditor's memory bank on ComfyUI's own LDM self-attention, its features from ComfyUI's decoder upsamplers
    and its guidance through copies of ComfyUI's weights: the standalone picture; the energy changes it. Its image
    prompt on ComfyUI's cross-attentions: the standalone picture too."""
    from tiny_models import write_diffeditor_image_prompt

    from nodes.dragedit.image_prompt import SD15_CROSS_ATTENTION_WIDTHS

    prompt = {
        **_drawn_picture_and_box(random_sd15_models.checkpoint, "a red ball on the left", (0, 16, 48, 32)),
        "20": {"class_type": "AtelierDiffEditorDrag", "inputs": {
            "model": ["4", 0], "vae": ["4", 2], "image": ["12", 0], "mask": ["15", 0], "positive": ["6", 0],
            "negative": ["7", 0], "drags": "16,32 -> 32,32", "seed": 0, "steps": 10, "cfg": 4.0,
            "energy_scale": 2000.0, "w_edit": 4.0, "w_content": 6.0, "w_inpaint": 0.2, "sde_strength": 0.4,
            "resolution": 64, "method": "DiffEditor"}},
        "22": {"class_type": "SaveImage", "inputs": {"filename_prefix": "drag", "images": ["20", 0]}},
    }
    prompt["30"] = {"class_type": "AtelierDiffEditorDrag", "inputs": {**prompt["20"]["inputs"], "energy_scale": 0.0}}
    prompt["32"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "drag_none", "images": ["30", 0]}}
    # with a random image-prompt encoder, its adapter in models/diffeditor and its CLIP tower in ComfyUI's clip_vision
    adapter_name, encoder_name = write_diffeditor_image_prompt(random_sd15_models.path, SD15_CROSS_ATTENTION_WIDTHS,
                                                               768)
    prompt["40"] = {"class_type": "AtelierLoadDiffEditorImagePrompt",
                    "inputs": {"adapter_name": adapter_name, "encoder_name": encoder_name}}
    prompt["41"] = {"class_type": "AtelierDiffEditorDrag",
                    "inputs": {**prompt["20"]["inputs"], "image_prompt": ["40", 0], "ip_scale": 0.5}}
    prompt["42"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "drag_ip", "images": ["41", 0]}}
    dragged = _same_picture(comfyui_server, atelier, prompt, "22", "DiffEditor")
    reconstructed = _same_picture(comfyui_server, atelier, prompt, "32", "DiffEditor at energy 0")
    effect = psnr(dragged, reconstructed)
    print(f"DiffEditor inside ComfyUI, the energy's effect: {effect:.1f} dB from the energy-0 picture")
    assert dragged.shape == (64, 64, 3) and effect < TARGET_PSNR_DB  # gradients flow inside ComfyUI's inference mode
    prompted = _same_picture(comfyui_server, atelier, prompt, "42", "DiffEditor with an image prompt")
    assert psnr(prompted, dragged) < TARGET_PSNR_DB
