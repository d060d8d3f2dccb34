"""Our sampler node against a plain diffusers pipeline on the same full-size random-weight model, in one process.

One pipeline is built from the shipped configs (``nodes/models/configs/sd15`` or ``sdxl``) with seeded random
weights: float32 on the CPU, float16 on CUDA. Both sides share its UNet, the prompt embeddings (encoded once by
our text-encode node), the start noise (``seeded_noise`` of one seed), guidance 7.5 and the scheduler: Euler on
the "normal" grid, which is diffusers' ``EulerDiscreteScheduler`` with ``timestep_spacing="trailing"``. Ours is
``AtelierSampler().sample`` on a ``ModelRef``, the node's whole path (LoRA switch, guidance, preview callback,
return to the CPU); the peer is ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL) with
``output_type="latent"``, so neither side decodes. After one warm-up each, runs alternate (ours, diffusers,
diffusers, ours, ...) and the medians are compared. So are the two results: same shape, and the largest difference.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` per side (weights included); on the CPU, the process's
peak RSS from ``getrusage``, which covers both sides and the model build, so it cannot tell them apart.

    python bench/sampler.py [--quick] [--family sd15|sdxl] [--size PX] [--steps N] [--runs N] [--device cuda|cpu]

``--quick`` (256², 2 steps, 2 timed runs each) finishes within 60 s on 2 CPU cores; the full run is 512², 4 steps,
3 timed runs each. Ends with ``BENCH sampler ratio_vs_diffusers=... ours_s=... diffusers_s=... size=... steps=...
device=...``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Before diffusers imports huggingface_hub, as nodes.models.loading does: everything here is built offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,  # noqa: E402
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from nodes.common.denoiser import NoiseSchedule  # noqa: E402
from nodes.sampling.latents import empty_latent, seeded_noise  # noqa: E402
from nodes.generation.nodes import AtelierSampler, AtelierTextEncode  # noqa: E402
from nodes.models.refs import ModelRef  # noqa: E402
from nodes.models.clip import Clip  # noqa: E402
from nodes.models.loading import LoadedModel, load_tokenizer, shipped_config_dir  # noqa: E402

FAMILIES = {"sd15": "sd1", "sdxl": "sdxl"}  # benchmark name -> our family name
SEED = 0
CFG = 7.5  # diffusers' StableDiffusionPipeline default guidance
PROMPT = "a photo of a cat sitting on a wooden table, soft light"
NEGATIVE = "blurry, low quality"
TARGET_RATIO = 1.05  # the target
# At 128² a CPU UNet step costs about half of a 256² one: reading the weights, not the image's activations,
# dominates it there. 256² keeps the activations the main cost and the quick run inside 60 s.
QUICK = {"size": 256, "steps": 2, "runs": 2}
FULL = {"size": 512, "steps": 4, "runs": 3}


def report(line: str) -> None:
    """The one place this benchmark writes to stdout."""
    print(line, flush=True)


def median_seconds(call: Callable[[], object], runs: int) -> float:
    """The median wall time of ``runs`` calls of ``call``, after one warm-up call."""
    call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def build_pipeline(family: str, device: torch.device, dtype: torch.dtype):
    """A diffusers pipeline of ``family`` ("sd15" or "sdxl") with seeded random weights at full size.

    The modules are created on ``device`` (default initialisation there is much faster on a GPU), then cast to
    ``dtype``. Its scheduler is Euler on the trailing grid, the one our "normal" scheduler runs.
    """
    config_dir = shipped_config_dir(FAMILIES[family])
    encoder_classes = {"text_encoder": CLIPTextModel}
    if family == "sdxl":
        encoder_classes["text_encoder_2"] = CLIPTextModelWithProjection
    torch.manual_seed(SEED)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae"))
        encoders = {name: cls(CLIPTextConfig.from_pretrained(config_dir, subfolder=name))
                    for name, cls in encoder_classes.items()}
    if dtype != torch.float32:  # the modules are made in float32; diffusers warns on every cast, so cast if needed
        for module in (unet, vae, *encoders.values()):
            module.to(dtype)
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(config_dir,
                                                                                      subfolder="scheduler"),
                                                   timestep_spacing="trailing", prediction_type="epsilon")
    tokenizers = {name.replace("text_encoder", "tokenizer"): load_tokenizer(config_dir,
                                                                            name.replace("text_encoder", "tokenizer"))
                  for name in encoders}
    if family == "sdxl":
        pipeline = StableDiffusionXLPipeline(unet=unet, vae=vae, scheduler=scheduler, **encoders, **tokenizers)
    else:
        pipeline = StableDiffusionPipeline(unet=unet, vae=vae, scheduler=scheduler, **encoders, **tokenizers,
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    for module in (unet, vae, *encoders.values()):
        module.requires_grad_(False)  # as load_model leaves a loaded model
    return pipeline


def pipeline_ref(pipeline, family: str, device: torch.device, dtype: torch.dtype, source: str) -> ModelRef:
    """Atelier's MODEL around a benchmark's pipeline (its own schedule, ε-prediction), without the loader's cache."""
    schedule = NoiseSchedule(pipeline.scheduler.alphas_cumprod.to(torch.float64), "epsilon")
    return ModelRef(LoadedModel(pipeline=pipeline, family=family, schedule=schedule, dtype=dtype, device=device,
                                source=source))


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor, int]:
    """Seconds ``fn`` takes (the device synchronised), its result, and the CUDA peak bytes during it (0 on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return elapsed, result, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['size']}², {QUICK['steps']} steps, {QUICK['runs']} timed runs each (<= 60 s on "
                             f"2 CPU cores)")
    parser.add_argument("--family", choices=tuple(FAMILIES), default="sd15", help="the architecture (default sd15)")
    parser.add_argument("--size", type=int, help=f"square image side in pixels, a multiple of 8 (default "
                                                  f"{FULL['size']}; {QUICK['size']} with --quick)")
    parser.add_argument("--steps", type=int, help=f"sampling steps (default {FULL['steps']}; {QUICK['steps']} "
                                                   f"with --quick)")
    parser.add_argument("--runs", type=int, help=f"timed runs per side (default {FULL['runs']}; {QUICK['runs']} "
                                                  f"with --quick)")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    size, steps, runs = args.size or mode["size"], args.steps or mode["steps"], args.runs or mode["runs"]
    if size < 64 or size % 8:
        parser.error(f"--size must be a multiple of 8, at least 64; got {size}")
    if steps < 1 or runs < 1:
        parser.error(f"--steps and --runs must be >= 1; got {steps} and {runs}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    family = FAMILIES[args.family]

    # 1. One pipeline with random weights; ours wraps the same modules
    started = time.perf_counter()
    pipeline = build_pipeline(args.family, device, dtype)
    model = pipeline_ref(pipeline, family, device, dtype, f"random {args.family}")
    unet_params = sum(p.numel() for p in pipeline.unet.parameters())
    report(f"built {args.family} ({unet_params / 1e6:.0f} M UNet parameters, {str(dtype).removeprefix('torch.')} "
           f"on {device}) in {time.perf_counter() - started:.1f} s")

    # 2. The same inputs for both sides
    clip = Clip(model)
    positive, = AtelierTextEncode().encode(clip, PROMPT, "auto")
    negative, = AtelierTextEncode().encode(clip, NEGATIVE, "auto")
    latent_image = {"samples": empty_latent(1, pipeline.unet.config.in_channels, size, size)}
    noise = seeded_noise(SEED, tuple(latent_image["samples"].shape))[0].to(device, dtype)
    peer_inputs = {"prompt_embeds": positive.embeds.to(device, dtype),
                   "negative_prompt_embeds": negative.embeds.to(device, dtype)}
    if family == "sdxl":
        peer_inputs.update(pooled_prompt_embeds=positive.pooled.to(device, dtype),
                           negative_pooled_prompt_embeds=negative.pooled.to(device, dtype))
    scaling = pipeline.vae.config.scaling_factor
    sampler = AtelierSampler()

    def ours() -> torch.Tensor:
        latent, = sampler.sample(model, positive, negative, latent_image, SEED, steps, CFG, "euler", "normal",
                                 1.0, 0.0)
        return latent["samples"] * scaling  # LATENT is unscaled; diffusers' "latent" output is scaled

    def diffusers() -> torch.Tensor:
        return pipeline(**peer_inputs, height=size, width=size, num_inference_steps=steps, guidance_scale=CFG,
                        latents=noise, output_type="latent").images

    # 3. One full warm-up each (oneDNN / cuDNN pick their kernels on the first calls: environment.md §3), then
    #    alternate
    sides = {"ours": ours, "diffusers": diffusers}
    times: dict[str, list[float]] = {name: [] for name in sides}
    peaks: dict[str, int] = dict.fromkeys(sides, 0)
    results: dict[str, torch.Tensor] = {}
    for name, fn in sides.items():
        elapsed, results[name], _ = timed(fn, device)
        report(f"warm-up {name}: {elapsed:.2f} s")
    for run in range(1, runs + 1):
        # Alternate who goes first (ours, diffusers, diffusers, ours, ...), so that a drift in the machine's speed
        # during the run does not favour one side.
        order = list(sides.items()) if run % 2 else list(sides.items())[::-1]
        for name, fn in order:
            elapsed, _, peak = timed(fn, device)
            times[name].append(elapsed)
            peaks[name] = max(peaks[name], peak)
            report(f"run {run}/{runs} {name}: {elapsed:.2f} s")

    # 4. Compare
    ours_latent, peer_latent = results["ours"].float().cpu(), results["diffusers"].float().cpu()
    if ours_latent.shape != peer_latent.shape:
        raise RuntimeError(f"the two sides' latents differ in shape: ours {tuple(ours_latent.shape)}, "
                           f"diffusers {tuple(peer_latent.shape)}")
    max_abs_diff = float((ours_latent - peer_latent).abs().max())
    peer_std = float(peer_latent.std())
    ours_s, peer_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    ratio = ours_s / peer_s
    if device.type == "cuda":
        memory = {"ours_peak_mib": peaks["ours"] / 2**20, "diffusers_peak_mib": peaks["diffusers"] / 2**20}
        memory_text = f"peak CUDA memory ours {memory['ours_peak_mib']:.0f} MiB, diffusers " \
                      f"{memory['diffusers_peak_mib']:.0f} MiB"
    else:
        memory = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
        memory_text = f"peak RSS {memory['peak_rss_mib']:.0f} MiB (whole process, both sides)"
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    report(f"{args.family} {size}x{size}, {steps} Euler steps, cfg {CFG}, {device}: ours {ours_s:.2f} s, "
           f"diffusers {peer_s:.2f} s (medians of {runs}), ratio {ratio:.3f}, target <= {TARGET_RATIO} {verdict}; "
           f"latents {tuple(peer_latent.shape)}, max |ours - diffusers| {max_abs_diff:.2e} "
           f"(diffusers' std {peer_std:.3f}); {memory_text}")
    memory_fields = " ".join(f"{key}={value:.0f}" for key, value in memory.items())
    report(f"BENCH sampler ratio_vs_diffusers={ratio:.3f} ours_s={ours_s:.3f} diffusers_s={peer_s:.3f} size={size} "
           f"steps={steps} device={device.type} family={args.family} max_abs_diff={max_abs_diff:.2e} "
           f"{memory_fields} quick={int(args.quick)}")


if __name__ == "__main__":
    main()
