"""Few-step models from published weights (issue 25): wall time per image of each preset against SD1.5's DDIM-25
with CFG, side by side in one run.

One full-size SD1.5 pipeline with random weights (``bench/sampler.py``'s builder; speed does not depend on the
weights' values) serves every arm, so the ratios measure the presets' step counts, guidance and any extra layers:

- **reference**: KSampler, ComfyUI's ``ddim`` on ``ddim_uniform`` (diffusers' DDIM grid), 25 steps, CFG 7.5;
- **Hyper-SD** presets, through the node (a random LoRA in the published layout, rank 64 over LCM-LoRA's modules,
  run beside the base weights as Atelier runs every LoRA): the 1-step unified LoRA (TCD), 2, 4 and 8 steps without
  guidance, 8 and 12 steps with CFG 5, each through SamplerCustom;
- **InstaFlow / 2-Rectified Flow**, through the node (the same UNet sampled as a flow): InstaFlow-0.9B's one step
  without guidance, 2-Rectified Flow's 25 steps at guidance 1.5 and at 4 steps;
- **Rectified Diffusion**, through the node (the same UNet, as the published UNets are SD1.5's): rd's 2 DDIM steps
  at guidance 1.5 on its linear betas, cm's 1 step without guidance, phased's 4 steps at 1.5;
- **SpeedUpNet**, through the node (a random adapter in the published layout on the same UNet): 4 steps of
  DPM-Solver++(2M) without guidance, the negative prompt's tokens appended to the prompt.

KOALA's UNets are SDXL-family: they are timed apart, UNet calls only (a whole random SDXL pipeline beside them does
not fit this machine's memory), against SDXL's own UNet at the same size: wall time of one guided call (batch 2)
of each, random full-size weights from the shipped configs, and per image the card's steps times that (SDXL at
Euler-25 CFG, the KOALA models at 25, the Lightning ones at 10).

APTP's experts are SD2.1-family: timed apart the same way (:func:`aptp_calls`), SD2.1's UNet against a random
expert pruned as APTP prunes, at the experts' 768×768 (256×256 with ``--quick``).

Per image: sampling from the encoded prompts, then the VAE decode (the same for every arm); the runs alternate
between arms after one warm-up each, and the medians of three runs give the speedup. The full run: every arm at
512×512, and KOALA's UNets at 512×512; ``--quick``: the reference, Hyper-SD's 1-step, 4-step and 8-step CFG
presets, InstaFlow, 2-Rectified Flow at 4 steps, Rectified Diffusion's rd at 2 and SpeedUpNet, at 64×64, without
KOALA (a random SDXL UNet takes a minute to build).

    python bench/few_step.py [--quick]

Ends with ``BENCH few_step hypersd_8steps_cfg_speedup=... ...`` (reference seconds over the arm's, decode
included), the sampling-only ratios (``…_sampling_speedup``) and the seconds per image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.sampler import build_pipeline, median_seconds, pipeline_ref, report  # noqa: E402
from nodes.common.denoiser import DiffusersCodec  # noqa: E402
from nodes.fewstep.koala import KOALA_PRESETS, koala_config_dir  # noqa: E402
from nodes.fewstep.nodes import (AtelierHyperSD, AtelierRectifiedDiffusion, AtelierRectifiedFlow,  # noqa: E402
                                 AtelierSpeedUpNet)
from nodes.models.model_configs import SHIPPED_CONFIGS  # noqa: E402
from nodes.models.clip import Clip  # noqa: E402
from tests.tiny_models import write_hyper_sd_lora, write_speedupnet_adapter  # noqa: E402
from web.nodes_latent import EmptyLatentImage, VAEDecode  # noqa: E402
from web.nodes_sampling import KSampler, SamplerCustom  # noqa: E402

QUICK = {"size": 64, "runs": 3, "koala_size": None, "aptp_size": 256,
         "arms": ("hypersd_1step", "hypersd_4steps", "hypersd_8steps_cfg", "instaflow_1step", "rectified_flow_4steps",
                  "rectified_diffusion_2steps", "speedupnet_4steps")}
FULL = {"size": 512, "runs": 3, "koala_size": 512, "aptp_size": 768, "arms": None}
SDXL_REFERENCE_STEPS = 25
SEED = 0
REFERENCE = ("ddim", "ddim_uniform", 25, 7.5)  # sampler, scheduler, steps, CFG
PROMPT, NEGATIVE = "a lighthouse on a cliff at sunset, detailed oil painting", "blurry"
PUBLISHED_RANK = 64
HYPER_SD_ARMS = {"hypersd_1step": "Hyper-SD15-1step-lora", "hypersd_2steps": "Hyper-SD15-2steps-lora",
                 "hypersd_4steps": "Hyper-SD15-4steps-lora", "hypersd_8steps": "Hyper-SD15-8steps-lora",
                 "hypersd_8steps_cfg": "Hyper-SD15-8steps-CFG-lora",
                 "hypersd_12steps_cfg": "Hyper-SD15-12steps-CFG-lora"}
FLOW_ARMS = {"instaflow_1step": ("InstaFlow-0.9B", 0), "rectified_flow_25steps": ("2-Rectified Flow", 0),
             "rectified_flow_4steps": ("2-Rectified Flow", 4)}
RECTIFIED_DIFFUSION_ARMS = {"rectified_diffusion_2steps": ("rd", 0), "rectified_diffusion_cm_1step": ("cm", 1),
                            "rectified_diffusion_phased_4steps": ("phased", 0)}
SPEEDUPNET_ARM = "speedupnet_4steps"
ARMS = (*HYPER_SD_ARMS, *FLOW_ARMS, *RECTIFIED_DIFFUSION_ARMS, SPEEDUPNET_ARM)


def arms(model, models_dir: str, positive, negative, latent: dict,
         chosen: tuple[str, ...]) -> dict[str, Callable[[], dict]]:
    """The reference and each chosen arm as a function that samples one latent."""
    sampler_name, scheduler, steps, cfg = REFERENCE
    runs = {"reference": lambda: KSampler().sample(model, SEED, steps, cfg, sampler_name, scheduler, positive,
                                                   negative, latent, 1.0)[0]}
    AtelierHyperSD.models_dir = models_dir
    outputs = {name: AtelierHyperSD().apply(model, "random.safetensors", preset, 1.0, 0, 1.0)["result"]
               for name, preset in HYPER_SD_ARMS.items() if name in chosen}
    outputs.update({name: AtelierRectifiedFlow().apply(model, weights, steps)
                    for name, (weights, steps) in FLOW_ARMS.items() if name in chosen})
    outputs.update({name: AtelierRectifiedDiffusion().apply(model, weights, steps)
                    for name, (weights, steps) in RECTIFIED_DIFFUSION_ARMS.items() if name in chosen})
    arm_prompts = dict.fromkeys(outputs, positive)
    if SPEEDUPNET_ARM in chosen:
        AtelierSpeedUpNet.models_dir = models_dir
        patched, joined, sampler, sigmas, preset_cfg = AtelierSpeedUpNet().apply(model, positive, negative,
                                                                                 "random.safetensors", 0)
        outputs[SPEEDUPNET_ARM], arm_prompts[SPEEDUPNET_ARM] = (patched, sampler, sigmas, preset_cfg), joined
    for name, (patched, sampler, sigmas, preset_cfg) in outputs.items():
        runs[name] = (lambda patched=patched, prompt=arm_prompts[name], sampler=sampler, sigmas=sigmas,
                      preset_cfg=preset_cfg: SamplerCustom().sample(patched, True, SEED, preset_cfg, prompt, negative,
                                                                    sampler, sigmas, latent)[0])
    return runs


def measure(size: int, runs: int, chosen: tuple[str, ...]) -> dict[str, float]:
    torch.set_grad_enabled(False)
    pipeline = build_pipeline("sd15", torch.device("cpu"), torch.float32)
    model = pipeline_ref(pipeline, "sd1", torch.device("cpu"), torch.float32, "random sd15")
    clip, codec = Clip(model), DiffusersCodec(pipeline.vae)
    positive, negative = clip.encode(PROMPT), clip.encode(NEGATIVE)
    latent = EmptyLatentImage().generate(size, size, 1)[0]
    with tempfile.TemporaryDirectory() as models_dir:
        os.makedirs(os.path.join(models_dir, "loras"))
        write_hyper_sd_lora(pipeline.unet, os.path.join(models_dir, "loras", "random.safetensors"),
                            rank=PUBLISHED_RANK)
        os.makedirs(os.path.join(models_dir, "speedupnet"))
        write_speedupnet_adapter(pipeline.unet, os.path.join(models_dir, "speedupnet", "random.safetensors"))
        samplers = arms(model, models_dir, positive, negative, latent, chosen)
        sampling: dict[str, list[float]] = {name: [] for name in samplers}
        total: dict[str, list[float]] = {name: [] for name in samplers}
        for name, run in samplers.items():  # warm-up: the LoRA is read and injected once
            run()
        for index in range(runs):
            order = list(samplers.items()) if index % 2 == 0 else list(samplers.items())[::-1]
            for name, run in order:
                started = time.perf_counter()
                sampled = run()
                sampled_at = time.perf_counter()
                VAEDecode().decode(codec, sampled)
                finished = time.perf_counter()
                sampling[name].append(sampled_at - started)
                total[name].append(finished - started)
                report(f"  {name}: {total[name][-1]:.2f} s ({sampling[name][-1]:.2f} s sampling)")
    reference_total, reference_sampling = statistics.median(total["reference"]), statistics.median(
        sampling["reference"])
    figures = {"reference_s": reference_total}
    for name in chosen:
        seconds, sampled = statistics.median(total[name]), statistics.median(sampling[name])
        report(f"SD1.5 {size}² {name}: {seconds:.1f} s per image against DDIM-25 CFG's {reference_total:.1f} s: "
               f"{reference_total / seconds:.2f}x ({reference_sampling / sampled:.2f}x sampling only)")
        figures.update({f"{name}_speedup": reference_total / seconds,
                        f"{name}_sampling_speedup": reference_sampling / sampled, f"{name}_s": seconds})
    return figures


def koala_calls(size: int, runs: int) -> dict[str, float]:
    """Seconds per guided UNet call (batch 2) of SDXL's UNet and KOALA's, and per image at the cards' steps."""
    from diffusers import UNet2DConditionModel

    torch.set_grad_enabled(False)
    latent = torch.randn(2, 4, size // 8, size // 8)
    context, pooled = torch.randn(2, 77, 2048), torch.randn(2, 1280)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)}
    seconds = {}
    for name, folder in (("sdxl", os.path.join(SHIPPED_CONFIGS, "sdxl")), ("koala_1b", koala_config_dir("koala_1b")),
                         ("koala_700m", koala_config_dir("koala_700m"))):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")).eval()
        seconds[name] = median_seconds(lambda unet=unet: unet(latent, torch.tensor([500.0] * 2),
                                                              encoder_hidden_states=context,
                                                              added_cond_kwargs=added).sample, runs)
        report(f"  {name} UNet, {size}², one guided call: {seconds[name]:.2f} s")
        del unet
    figures = {f"{name}_call_s": value for name, value in seconds.items()}
    reference = SDXL_REFERENCE_STEPS * seconds["sdxl"]
    for weights, preset in KOALA_PRESETS.items():
        key = weights.lower().replace("-", "_")
        per_image = preset.steps * seconds[preset.unet]
        report(f"SDXL {size}² {weights}: {per_image:.1f} s of UNet per image against SDXL Euler-25 CFG's "
               f"{reference:.1f} s: {reference / per_image:.2f}x")
        figures[f"{key}_unet_speedup"] = reference / per_image
    return figures


def aptp_calls(size: int, runs: int) -> dict[str, float]:
    """Seconds per guided UNet call (batch 2) of SD2.1's UNet and of an APTP expert of it, and their parameters.

    No published expert is at hand, so the expert is a random one pruned as APTP prunes
    (``tests.tiny_models.aptp_expert``: each ResNet channel group, attention head and GEGLU group kept with
    probability 0.6, six of the 14 depth-gated blocks dropped), rebuilt at its widths as the loader rebuilds one.
    Both sample with the same steps and guidance, so the call ratio is the per-image one.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from nodes.models.formats import tensor_shapes
    from nodes.models.pruned_unet import prune_to_shapes
    from tests.tiny_models import aptp_expert

    torch.set_grad_enabled(False)
    config = UNet2DConditionModel.load_config(os.path.join(SHIPPED_CONFIGS, "sd21"), subfolder="unet")
    torch.manual_seed(SEED)
    full = UNet2DConditionModel.from_config(config).eval()
    state, _ = aptp_expert(full, seed=SEED)
    with torch.device("meta"):
        expert = UNet2DConditionModel.from_config(config)
        prune_to_shapes(expert, tensor_shapes(state), (ResnetBlock2D, Transformer2DModel))
    expert.load_state_dict(state, assign=True)
    del state
    latent, context = torch.randn(2, 4, size // 8, size // 8), torch.randn(2, 77, 1024)
    seconds = {}
    for name, unet in (("sd21", full), ("aptp_expert", expert.eval())):
        seconds[name] = median_seconds(lambda unet=unet: unet(latent, torch.tensor([500.0] * 2),
                                                              encoder_hidden_states=context).sample, runs)
        report(f"  {name} UNet, {size}², one guided call: {seconds[name]:.2f} s")
    parameters = {name: sum(parameter.numel() for parameter in unet.parameters())
                  for name, unet in (("sd21", full), ("aptp_expert", expert))}
    report(f"SD2.1 {size}²: a random APTP expert ({parameters['aptp_expert'] / 1e6:.0f}M parameters against "
           f"{parameters['sd21'] / 1e6:.0f}M) calls in {seconds['aptp_expert']:.2f} s against {seconds['sd21']:.2f} s")
    return {"aptp_expert_call_s": seconds["aptp_expert"], "sd21_call_s": seconds["sd21"],
            "aptp_expert_unet_speedup": seconds["sd21"] / seconds["aptp_expert"],
            "aptp_expert_parameter_ratio": parameters["aptp_expert"] / parameters["sd21"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['size']}², {QUICK['runs']} timed run per arm")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    figures = measure(mode["size"], mode["runs"], mode["arms"] or ARMS)
    if mode["koala_size"]:
        figures.update(koala_calls(mode["koala_size"], mode["runs"]))
    figures.update(aptp_calls(mode["aptp_size"], mode["runs"]))
    fields = " ".join(f"{key}={value:.3f}" for key, value in figures.items())
    report(f"BENCH few_step {fields} size={mode['size']} device=cpu quick={int(args.quick)}")


if __name__ == "__main__":
    main()
