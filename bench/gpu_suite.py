"""Everything that needs a GPU, measured by one command (issue #20): GPU time comes rarely and in short slices.

Seven parts run in this order, each in its own subprocess with its own time box, so that a part that hangs, crashes
or runs out of memory is reported as such and the suite goes on:

1. ``workflows``: every ``workflows/*.json`` whose nodes the app offers (an opt-in evaluation node's example only
   with its setting) runs through the CLI's path (``load_workflow``, then the executor's
   validate and execute) on the default device, CUDA in float16 where there is one; per workflow ok, failed (with
   the error), or interrupted at its own time box (30 s, or its share of what is left of the part's). It lists
   the registered node classes the runs executed and those no workflow exercised, and where the loaded models
   live (the device-mixing check).
2. ``sampler``: our sampler (:func:`nodes.sampling.generate.generate`, previews included) against diffusers'
   pipeline on the same random full-size model, SD1.5 at 512² and SDXL at 1024², 20 Euler steps, CFG 7.5, one
   warm-up each then alternating runs: seconds per image (medians), ``ratio_vs_diffusers`` (target <= 1.05), the
   peak ``torch.cuda.max_memory_allocated`` of each side (weights included), and ``model_s``: writing the random
   checkpoint and loading it.
3. ``highres``: the tiled 16K generator (:func:`nodes.highres.generate.generate_large`) on an SD1.5-size UNet with
   LinFusion's layers (random) mounted, 16384×16384, the staged recipe with the README's SD1.5 settings (base 1024,
   whole with LinFusion as the node runs it; then 512 px tiles, 128 px overlap, mixture blend; 16 tiles a batch
   where the node's default is 4), dpmpp_2m/karras, CFG 7.5, then the streamed tiled VAE decode (512 px tiles).
   A 2-step calibration at 2048² sets the number of steps that fits the time box (at least the recipe's minimum,
   10). Seconds per stage, decode seconds, peak memory.
4. ``correspondence``: SD1.5-size UNet features (960²) and DINOv2-B/14-size features (840²) of a pair, sd-dino's
   fusion (co-PCA 256 of the SD layers, DINOv2 whole) and the dense match; ms per pair (target <= 1000 on an
   H100) and per phase.
5. ``panorama``: OmniSSR ×2 to 1024×2048 (input 512×1024, 18 planes of 512², 20 steps, cfg 1) with an SD1.5-size
   model; the low-res panorama starts on the CPU as the node's IMAGE does. Seconds (cold, then warm when the box
   allows) and peak memory.
6. ``watermark``: post-hoc embed and detect ms at 512² (on the CPU, where the node's IMAGE lives; also on CUDA when
   there is one), and generative detection at 512²: VAE encode, 50-step DDIM inversion, Gaussian Shading decision.
7. ``memory``: two SDXL checkpoints (the sampler part's file under a second name) and a LoRA under a 10 GB GPU
   budget, prompts alternating between them through the app's nodes (``bench/memory.py``): the peak
   ``torch.cuda.max_memory_allocated`` over the budget, and seconds per switch.

Weights are random (speed and memory do not depend on their values): full-size original-layout single files
written once per run by :func:`nodes.models.export.write_random_single_file` and loaded by ``load_model``, as a
user's checkpoint is. Each part prints one ``BENCH gpu_suite_<part> status=...`` line, then a summary line
``BENCH gpu_suite ...``; with ``$OUT`` set, everything also goes to ``$OUT/gpu_suite.json`` and each part's log to
``$OUT/gpu_suite_logs/``. The exit status is 0 only when every part is ok.

    python bench/gpu_suite.py [--parts workflows sampler ...]   # a CUDA machine: about 8 minutes at most
    python bench/gpu_suite.py --cpu-smoke                        # tiny models and sizes on the CPU, < 2 minutes

``--cpu-smoke`` runs the same code with the tests' tiny model layouts and tiny sizes, on the CPU even where a GPU
is present, with one torch thread, and stops each workflow after 1.5 s; ``tests/test_gpu_suite.py`` runs it, so the
suite does not rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Before diffusers imports huggingface_hub (in the parts): everything here is built offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PARTS = ("workflows", "sampler", "highres", "correspondence", "panorama", "watermark", "memory")
RECORD_PREFIX = "GPU_SUITE_RECORD "  # how a part's process hands results to the suite, one JSON object a line
KILL_GRACE_S = 5  # after a part's time box, how long its process group gets to die before the suite moves on
LOG_TAIL_LINES = 12  # lines of a failed part's log shown on the console
WORKFLOWS_RESERVE_S = 5  # of part 1's box, kept for its summary after the last workflow
PROMPT = "a photo of a cat sitting on a wooden table, soft light"
NEGATIVE = "blurry, low quality"
SEED = 0
CFG = 7.5
WATERMARK_KEY = "gpu-suite-key"
WATERMARK_FPR = 1e-6
VAE_OVERLAP_DIVISOR = 8  # VAE tiles overlap by 1/8 of their side, as the generator node's decode does
# DINOv2 ViT-B/14 (facebook/dinov2-base's config.json); the smoke run's is the tests' tiny one.
DINOV2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   patch_size=14, image_size=518)
SMOKE_MEMORY_WIDTH = 32  # the memory part's checkpoints in the smoke run: SD1.5's layout at its smallest width
DINOV2_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
                   image_size=56)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The sizes of one suite run: the GPU run's, or the CPU smoke run's."""

    smoke: bool
    time_box_s: dict[str, int]  # per part, including its process start and imports
    workflow_time_box_s: float  # each workflow is interrupted after this long at most (part 1)
    sampler_cases: tuple[tuple[str, int], ...]  # (family, square side in pixels)
    sampler_steps: int
    sampler_runs: int  # timed runs per side, after one warm-up each
    highres_size: int
    highres_base: int
    highres_tile_px: int
    highres_overlap_px: int
    highres_stride_px: int
    highres_tile_batch: int
    highres_calibration_px: int
    highres_max_steps: int
    vae_tile_px: int
    sd_feature_px: int
    dino_feature_px: int
    pca_dims: tuple[int, int]  # co-PCA components per layer: SD, DINOv2 (0 keeps every channel)
    correspondence_runs: int
    panorama_height: int  # of the output
    panorama_plane_px: int
    panorama_scale: int
    panorama_steps: int
    watermark_px: int
    inversion_steps: int
    watermark_runs: int


GPU = Settings(
    smoke=False,
    # 470 s in all for parts 1-6, within issue 20's 8 minutes with the suite's own start; the memory part (issue
    # 28) adds 90 s. The sampler part writes and loads both random checkpoints (2.1 GB and 6.9 GB) that the later
    # parts reuse; the highres part sizes its steps to its box.
    time_box_s={"workflows": 60, "sampler": 130, "highres": 150, "correspondence": 35, "panorama": 60,
                "watermark": 35, "memory": 90},
    workflow_time_box_s=30,
    sampler_cases=(("sd1", 512), ("sdxl", 1024)), sampler_steps=20, sampler_runs=3,
    # README, Tiled 16K generator: SD1.5 at 16K takes base 1024, 512 px tiles, 128 px overlap, 256 px stride.
    highres_size=16384, highres_base=1024, highres_tile_px=512, highres_overlap_px=128, highres_stride_px=256,
    highres_tile_batch=16, highres_calibration_px=2048, highres_max_steps=50, vae_tile_px=512,
    sd_feature_px=960, dino_feature_px=840, pca_dims=(256, 0), correspondence_runs=3,  # sd-dino's co-PCA
    panorama_height=1024, panorama_plane_px=512, panorama_scale=2, panorama_steps=20,
    watermark_px=512, inversion_steps=50, watermark_runs=5)

CPU_SMOKE = Settings(
    smoke=True,
    time_box_s=dict.fromkeys(PARTS, 300),  # a hang guard only: the whole smoke run takes under 2 minutes
    workflow_time_box_s=1.5,
    sampler_cases=(("sd1", 64), ("sdxl", 64)), sampler_steps=2, sampler_runs=1,
    highres_size=128, highres_base=64, highres_tile_px=64, highres_overlap_px=16, highres_stride_px=32,
    highres_tile_batch=4, highres_calibration_px=64, highres_max_steps=4, vae_tile_px=64,
    sd_feature_px=128, dino_feature_px=56, pca_dims=(16, 0), correspondence_runs=1,
    panorama_height=64, panorama_plane_px=64, panorama_scale=2, panorama_steps=2,
    watermark_px=128, inversion_steps=2, watermark_runs=1)


# --- inside a part's process -----------------------------------------------------------------------------------------

def record(**fields: Any) -> None:
    """Hand results to the suite as soon as they exist: a part cut off by its time box still reports what it did."""
    print(RECORD_PREFIX + json.dumps(fields), flush=True)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last :func:`reset_peak`, in whole MiB; None on the CPU."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2 ** 20) if torch.cuda.is_available() else None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn``, the device synchronised on both sides so queued GPU work is counted."""
    synchronize()
    started = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - started, result


def device_fields() -> dict[str, str]:
    import torch

    from nodes.models.loading import default_device, default_dtype

    device = default_device()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": device.type, "device_name": name, "dtype": str(default_dtype(device)).removeprefix("torch.")}


def random_model(family: str, settings: Settings, work_dir: str):
    """A loaded model of ``family`` with random weights, on the default device in its default dtype.

    GPU run: a full-size original-layout single file, written once per suite run into ``work_dir`` (the parts share
    it) and loaded by ``load_model`` as a user's checkpoint is. Smoke run: the tests' tiny layout of the family,
    saved as a diffusers folder.
    """
    from nodes.models.loading import load_model

    if settings.smoke:
        from tests.tiny_models import build_tiny_pipeline

        path = os.path.join(work_dir, f"tiny_{family}")
        if not os.path.isdir(path):
            partial = path + ".partial"
            shutil.rmtree(partial, ignore_errors=True)  # left by a part killed at its time box
            build_tiny_pipeline(family).save_pretrained(partial, safe_serialization=True)
            os.replace(partial, path)
    else:
        from nodes.models.export import write_random_single_file

        path = os.path.join(work_dir, f"random_{family}.safetensors")
        if not os.path.isfile(path):
            partial = os.path.join(work_dir, f"partial_{family}.safetensors")
            write_random_single_file(family, partial)
            os.replace(partial, path)
    return load_model(path)


def model_parts(model) -> tuple[Any, Any]:
    """(denoiser, codec) of a loaded model, as the nodes build them."""
    from nodes.common.denoiser import DiffusersCodec, DiffusersDenoiser

    return DiffusersDenoiser(model.unet, model.schedule), DiffusersCodec(model.vae)


def encode(model, text: str, size: tuple[int, int] = (1024, 1024)):
    from nodes.models.text import encode_prompt

    return encode_prompt(model.tokenizers, model.text_encoders, model.family, text, size=size)


# --- part 1: every workflow ------------------------------------------------------------------------------------------

def part_workflows(settings: Settings, work_dir: str, deadline: float) -> None:
    import torch

    from nodes.models.loading import cached_models
    from web.cli import format_errors, load_workflow
    from web.executor import Executor
    from web.files import WORKFLOWS_DIR, example_workflows
    from web.folders import DataFolders
    from web.registry import node_classes

    from nodes.superres.adcsr import HALF_DECODER_WIDTHS
    from nodes.superres.nodes import sd21_unet_config

    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from nodes.loaders.nodes import EMBEDDED_CHECKPOINT, EMBEDDED_CONFIG_DIR
    from nodes.models.loading import load_model

    from tests.tiny_models import (save_aptp_stand_ins, save_diffdis_stand_ins, save_tiny_koala, save_tiny_yoso,
                                   save_tvt_stand_ins, write_adcsr_files, write_hyper_sd_lora,
                                   write_speedupnet_adapter, write_tiny_lora)

    record(**device_fields())
    # lora_when_ready.json names models/loras/style.safetensors: a random LoRA for the embedded model stands in.
    loras = os.path.join(work_dir, "models", "loras")
    os.makedirs(loras, exist_ok=True)
    embedded = load_model(EMBEDDED_CHECKPOINT)
    write_tiny_lora(embedded.pipeline, os.path.join(loras, "style.safetensors"))
    # hypersd.json names the published Hyper-SD15-8steps-CFG-lora.safetensors: one in its layout stands in.
    write_hyper_sd_lora(embedded.unet, os.path.join(loras, "Hyper-SD15-8steps-CFG-lora.safetensors"))
    # koala.json names models/diffusers/koala-lightning-700m: a tiny folder in its layout stands in.
    save_tiny_koala(os.path.join(work_dir, "models", "diffusers", "koala-lightning-700m"))
    # rectified_diffusion.json names models/diffusion_models/rd.safetensors and speedupnet.json the published
    # adapter: a UNet file and an adapter in the embedded UNet's layout stand in.
    for folder in ("diffusion_models", "speedupnet"):
        os.makedirs(os.path.join(work_dir, "models", folder), exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(EMBEDDED_CONFIG_DIR, "unet"))  # no adapter layers
    save_file(unet.state_dict(), os.path.join(work_dir, "models", "diffusion_models", "rd.safetensors"))
    write_speedupnet_adapter(embedded.unet, os.path.join(work_dir, "models", "speedupnet",
                                                         "sun_adapter_sdv15_4step_addpos.safetensors"))
    # aptp_experts.json names SD2.1, APTP-Base-CC3M and all-mpnet-base-v2: a small SD2 with experts of its UNet, a
    # random router and a tiny sentence encoder stand in.
    save_aptp_stand_ins(os.path.join(work_dir, "models"),
                        ["a watercolor painting of a lighthouse on a cliff at sunset"])
    # adcsr.json names AdcSR's two converted files: random full-size ones in the published layout stand in.
    write_adcsr_files(os.path.join(work_dir, "models", "adcsr"), sd21_unet_config(), HALF_DECODER_WIDTHS,
                      aliases=False)
    # diffdis.json names sd-turbo and DiffDIS's unet/: a small SD2 and a random DiffDIS UNet on its config stand in.
    save_diffdis_stand_ins(os.path.join(work_dir, "models"))
    # tvt.json names SD2.1-base and TVT's three files: a small SD2 and random TVT files (full-size VAE) stand in.
    save_tvt_stand_ins(os.path.join(work_dir, "models"))
    # stablenormal.json names the published yoso-normal-v0-3 folder: a random one in its layout stands in.
    save_tiny_yoso(os.path.join(work_dir, "models", "stablenormal", "yoso-normal-v0-3"))
    classes = node_classes(DataFolders.under(os.path.join(work_dir, "data")), os.path.join(work_dir, "models"))
    executed: set[str] = set()
    outcomes: dict[str, dict[str, Any]] = {}
    paths = [os.path.join(WORKFLOWS_DIR, f"{name}.json") for name in example_workflows(classes)]
    for index, path in enumerate(paths):
        name = os.path.splitext(os.path.basename(path))[0]
        # An equal share of what is left of the part's box, so that the summary below is always recorded.
        share = (deadline - WORKFLOWS_RESERVE_S - time.monotonic()) / (len(paths) - index)
        workflow_box = max(min(settings.workflow_time_box_s, share), 1.0)
        reset_peak()
        started = time.perf_counter()
        outcome: dict[str, Any] = {}
        try:
            prompt, extra_data = load_workflow(path, classes)
            executor = Executor(classes)
            checked = executor.validate(prompt)
            if not checked.ok:
                outcome = {"status": "failed", "error": format_errors(checked.error, checked.node_errors,
                                                                     checked.prompt)}
            else:
                errors: list[str] = []

                def listen(event: str, data: dict) -> None:
                    if event == "execution_error":
                        errors.append(f"node {data['node_id']} ({data['node_type']}): {data['exception_type']}: "
                                      f"{data['exception_message']}")

                # The executor stops at the next node boundary or progress call after an interrupt.
                box = threading.Timer(workflow_box, executor.interrupt)
                box.start()
                try:
                    result = executor.execute(checked.prompt, uuid.uuid4().hex, checked.outputs, listen, extra_data)
                finally:
                    box.cancel()
                ran = {checked.prompt[node_id]["class_type"] for node_id in result.executed}
                executed |= ran
                status = {"success": "ok", "interrupted": "interrupted"}.get(result.status, "failed")
                outcome = {"status": status, "executed": sorted(ran)}
                if errors:
                    outcome["error"] = "; ".join(errors)
        except Exception as error:  # a workflow the converter or the executor refuses: report it, run the next
            outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        outcome["seconds"] = round(time.perf_counter() - started, 2)
        peak = peak_mib()
        if peak is not None:
            outcome["peak_mib"] = peak
        outcomes[name] = outcome
        record(workflows=outcomes)
    models = sorted({f"{model.family} {str(model.dtype).removeprefix('torch.')} on {model.device}"
                     for model in cached_models()})
    counts = {status: sum(o["status"] == status for o in outcomes.values()) for status in ("ok", "failed",
                                                                                          "interrupted")}
    record(executed_classes=sorted(executed), not_exercised=sorted(set(classes) - executed), models=models,
           workflows_ok=counts["ok"], workflows_failed=counts["failed"], workflows_interrupted=counts["interrupted"],
           classes_executed=len(executed), classes_registered=len(classes),
           cuda=int(torch.cuda.is_available()))
    failed = sorted(name for name, o in outcomes.items() if o["status"] == "failed")
    if failed:
        record(error=f"{len(failed)} workflow(s) failed: {', '.join(failed)}")


# --- part 2: sampler against diffusers -------------------------------------------------------------------------------

def part_sampler(settings: Settings, work_dir: str, deadline: float) -> None:
    from nodes.models.loading import unload_all

    record(**device_fields())
    for family, size in settings.sampler_cases:
        record(**compare_sampler(family, size, settings, work_dir), steps=settings.sampler_steps, cfg=CFG,
               runs=settings.sampler_runs)
        unload_all()  # SD1.5 leaves the GPU before SDXL loads


def compare_sampler(family: str, size: int, settings: Settings, work_dir: str) -> dict[str, float]:
    """Ours against diffusers on one random model of ``family`` at ``size``², as ``{family}_...`` fields."""
    import torch
    from diffusers import EulerDiscreteScheduler

    from nodes.sampling.generate import generate
    from nodes.sampling.latents import empty_latent, seeded_noise

    model_s, model = timed(lambda: random_model(family, settings, work_dir))
    denoiser, codec = model_parts(model)
    positive, negative = encode(model, PROMPT, (size, size)), encode(model, NEGATIVE, (size, size))
    latent = empty_latent(1, codec.latent_channels, size, size, codec.downscale).to(model.device)
    noise = seeded_noise(SEED, tuple(latent.shape))[0].to(model.device, model.dtype)
    # The peer shares every module; its scheduler is Euler on the trailing grid, which our "normal" runs.
    scheduler = EulerDiscreteScheduler.from_config(model.pipeline.scheduler.config, timestep_spacing="trailing",
                                                   prediction_type="epsilon")
    peer = type(model.pipeline).from_pipe(model.pipeline, scheduler=scheduler)
    peer.set_progress_bar_config(disable=True)
    peer_inputs = {"prompt_embeds": positive.embeds.to(model.device, model.dtype),
                   "negative_prompt_embeds": negative.embeds.to(model.device, model.dtype)}
    if positive.pooled is not None:
        peer_inputs.update(pooled_prompt_embeds=positive.pooled.to(model.device, model.dtype),
                           negative_pooled_prompt_embeds=negative.pooled.to(model.device, model.dtype))

    def ours() -> torch.Tensor:
        sampled = generate(denoiser, codec, model.family, positive, negative, latent, SEED, settings.sampler_steps,
                           CFG, "euler", "normal")
        return (sampled - codec.shift_factor) * codec.scaling_factor  # diffusers' "latent" output is scaled

    def diffusers() -> torch.Tensor:
        return peer(**peer_inputs, height=size, width=size, num_inference_steps=settings.sampler_steps,
                    guidance_scale=CFG, latents=noise, output_type="latent").images

    sides = {"ours": ours, "diffusers": diffusers}
    times: dict[str, list[float]] = {name: [] for name in sides}
    peaks: dict[str, int] = dict.fromkeys(sides, 0)
    latents = {name: timed(fn)[1] for name, fn in sides.items()}  # warm-up: cuDNN and oneDNN pick kernels first
    for run in range(settings.sampler_runs):
        # Alternate who goes first, so that a drift in the machine's speed favours neither side.
        for name, fn in (list(sides.items()) if run % 2 == 0 else list(sides.items())[::-1]):
            reset_peak()
            times[name].append(timed(fn)[0])
            peaks[name] = max(peaks[name], peak_mib() or 0)
    ours_s, peer_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    difference = float((latents["ours"].float().cpu() - latents["diffusers"].float().cpu()).abs().max())
    fields = {"size": size, "model_s": round(model_s, 1), "ours_s": round(ours_s, 3), "diffusers_s": round(peer_s, 3),
              "ratio_vs_diffusers": round(ours_s / peer_s, 3), "max_abs_diff": float(f"{difference:.3g}")}
    if torch.cuda.is_available():
        fields.update(ours_peak_mib=peaks["ours"], diffusers_peak_mib=peaks["diffusers"])
    return {f"{family}_{key}": value for key, value in fields.items()}


# --- part 3: the tiled 16K generator ---------------------------------------------------------------------------------

class StageClock:
    """A progress sink that times the generator's stages: each stage's sampler reports ``step == total`` last."""

    def __init__(self, stages: list):
        self.stages = stages
        self.started = time.perf_counter()
        self.done: list[float] = []

    def progress(self, step: int, total: int, preview) -> None:
        if step == total and len(self.done) < len(self.stages):
            synchronize()
            now = time.perf_counter()
            stage = self.stages[len(self.done)]
            self.done.append(now - self.started)
            self.started = now
            record(**{f"stage_{len(self.done)}": {"size": f"{stage.width}x{stage.height}", "steps": stage.steps,
                                                  "strength": round(stage.strength, 3),
                                                  "seconds": round(self.done[-1], 2)}})

    def text(self, message: str) -> None:
        record(progress_text=message)  # an offload mode the memory budget chose

    def interrupted(self) -> bool:
        return False


def part_highres(settings: Settings, work_dir: str, deadline: float) -> None:
    import torch

    from nodes.common.progress import use_sink
    from nodes.common.tiled_vae import decode_dtype, tiled_decode
    from nodes.highres.generate import generate_large, plan_stages
    from nodes.highres.linfusion import build_linfusion, linfusion_config, mounted
    from nodes.highres.tiling import TileSettings, tile_calls_per_step

    record(**device_fields())
    model = random_model("sd1", settings, work_dir)
    denoiser, codec = model_parts(model)
    positive, negative = encode(model, PROMPT), encode(model, NEGATIVE)
    config = linfusion_config(model.unet, model.family)
    linfusion = build_linfusion(config).to(model.device, model.dtype).eval()  # random: LinFusion's shapes
    f = codec.downscale
    tiles = TileSettings("mixture", settings.highres_tile_px // f, settings.highres_overlap_px // f,
                         settings.highres_tile_batch, settings.highres_stride_px // f, SEED)
    size, sampler, scheduler = settings.highres_size, "dpmpp_2m", "karras"
    decode_type = decode_dtype("auto", codec)
    vae_tile = settings.vae_tile_px // f

    def staged(steps: int) -> list | None:
        try:
            return plan_stages(model.family, size, size, "staged", steps, settings.highres_base, f)
        except ValueError:  # a stage left with no step
            return None

    min_steps = next(steps for steps in range(1, settings.highres_max_steps + 1) if staged(steps))
    cycle = (tiles.tile // tiles.offset_stride) ** 2  # shifted tiles repeat their offsets after this many steps

    @functools.cache
    def tiles_per_step(stage_side: int) -> float:
        return tile_calls_per_step(stage_side // f, stage_side // f, tiles, cycle)

    with mounted(model.unet, linfusion, config):
        # Calibration: one direct 2-step run at a smaller size gives seconds per tile (both CFG halves) and the
        # decode's seconds per megapixel.
        side = settings.highres_calibration_px
        calibration = plan_stages(model.family, side, side, "direct", 2, side, f)
        sample_s, (latent, _) = timed(lambda: generate_large(denoiser, codec, model.family, positive, negative,
                                                             calibration, SEED, 2, CFG, sampler, scheduler, tiles,
                                                             model.device))
        tile_s = sample_s / (2 * tiles_per_step(side))
        decode_s, _ = timed(lambda: tiled_decode(codec, latent.cpu(), vae_tile, vae_tile // VAE_OVERLAP_DIVISOR,
                                                 dtype=decode_type))
        decode_s_per_mpix = decode_s / (side * side / 1e6)

        def predicted_s(steps: int) -> float:
            # The base stage runs whole (below): its cost in tiles is its area in tiles.
            base, *tiled = staged(steps)
            tile_count = base.steps * (base.width // f) ** 2 / tiles.tile ** 2
            tile_count += sum(stage.steps * tiles_per_step(stage.width) for stage in tiled)
            return tile_count * tile_s + decode_s_per_mpix * size * size / 1e6

        budget = 0.85 * (deadline - time.monotonic())  # the rest of the box, with a margin for noise
        steps = max([s for s in range(min_steps, settings.highres_max_steps + 1) if staged(s) and
                     predicted_s(s) <= budget], default=min_steps)
        stages = staged(steps)
        record(steps=steps, min_steps=min_steps, predicted_s=round(predicted_s(steps), 1),
               calibration_tile_ms=round(1000 * tile_s, 2), tile_px=settings.highres_tile_px,
               overlap_px=settings.highres_overlap_px, tile_batch=settings.highres_tile_batch, mode=tiles.mode,
               size=size, stages=len(stages), linfusion_layers=len(config))
        reset_peak()
        clock = StageClock(stages)
        with use_sink(clock):
            # With LinFusion the base stage runs on the whole latent, the later ones tiled, as the node runs them.
            sample_s, (latent, reports) = timed(lambda: generate_large(
                denoiser, codec, model.family, positive, negative, stages, SEED, steps, CFG, sampler, scheduler,
                tiles, model.device, untiled_base=True))
    record(sample_s=round(sample_s, 1), tiles_per_step=[round(r.tiles_per_step, 1) for r in reports],
           sample_peak_mib=peak_mib())
    reset_peak()
    image = torch.empty(1, 3, size, size)  # the IMAGE buffer the tiles stream into, as the node does
    decode_s, _ = timed(lambda: tiled_decode(codec, latent.cpu(), vae_tile, vae_tile // VAE_OVERLAP_DIVISOR, out=image,
                                             dtype=decode_type))
    record(decode_s=round(decode_s, 1), total_s=round(sample_s + decode_s, 1),
           decode_peak_mib=peak_mib())


# --- part 4: correspondence ------------------------------------------------------------------------------------------

def part_correspondence(settings: Settings, work_dir: str, deadline: float) -> None:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from nodes.correspondence.features import dinov2_features, sd_unet_features
    from nodes.correspondence.fusion import fuse_pair
    from nodes.correspondence.matching import match_dense

    record(**device_fields())
    model = random_model("sd1", settings, work_dir)
    _, codec = model_parts(model)
    empty = encode(model, "")
    torch.manual_seed(SEED)
    with torch.device(model.device):  # initialised where it runs: much faster on a GPU
        dino = Dinov2Model(Dinov2Config(**(DINOV2_TINY if settings.smoke else DINOV2_BASE)))
    dino = dino.to(model.dtype).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(SEED)
    side = settings.sd_feature_px
    image_a, image_b = (torch.rand(1, 3, side, side, generator=generator) for _ in range(2))  # IMAGEs: on the CPU

    def pair() -> dict[str, float]:
        phases = {}
        phases["sd_features"], sd = timed(lambda: [sd_unet_features(model.unet, codec, model.schedule, image, empty,
                                                                    size=side) for image in (image_a, image_b)])
        phases["dino_features"], dino_maps = timed(lambda: [dinov2_features(dino, image, settings.dino_feature_px)
                                                            for image in (image_a, image_b)])
        phases["fuse"], (fused_a, fused_b) = timed(lambda: fuse_pair([tuple(sd), tuple(dino_maps)], [0.5, 0.5],
                                                                     list(settings.pca_dims)))
        phases["match"], _ = timed(lambda: match_dense(fused_a, fused_b, (side, side), (side, side)))
        return phases

    pair()  # warm-up
    reset_peak()
    runs = [pair() for _ in range(settings.correspondence_runs)]
    totals = [sum(run.values()) for run in runs]
    median_run = runs[totals.index(statistics.median_low(totals))]
    record(ms_per_pair=round(1000 * statistics.median_low(totals), 1),
           **{f"{phase}_ms": round(1000 * seconds, 1) for phase, seconds in median_run.items()},
           peak_mib=peak_mib(), sd_px=side, dino_px=settings.dino_feature_px, sd_pca_dims=settings.pca_dims[0],
           dino_pca_dims=settings.pca_dims[1], runs=settings.correspondence_runs, target_ms=1000)


# --- part 5: OmniSSR -------------------------------------------------------------------------------------------------

def part_panorama(settings: Settings, work_dir: str, deadline: float) -> None:
    import torch

    from nodes.panorama.omnissr import GAMMA_E, GAMMA_L, omnissr_super_resolve
    from nodes.panorama.projection import omnissr_layout, synthetic_panorama

    record(**device_fields())
    model = random_model("sd1", settings, work_dir)
    denoiser, codec = model_parts(model)
    empty = encode(model, "")
    low_res = synthetic_panorama(settings.panorama_height // settings.panorama_scale)  # on the CPU, as an IMAGE
    layout = omnissr_layout(settings.panorama_plane_px)

    def run() -> torch.Tensor:
        return omnissr_super_resolve(denoiser, codec, low_res, settings.panorama_scale, layout, empty, empty, 1.0,
                                     settings.panorama_steps, 1.0, 1, GAMMA_L, GAMMA_E,
                                     torch.Generator().manual_seed(SEED))

    reset_peak()
    cold_s, result = timed(run)  # includes the layout's one-off grid and merge tables
    record(cold_s=round(cold_s, 1), output=f"{result.shape[-1]}x{result.shape[-2]}", planes=layout.count,
           plane_px=layout.size, steps=settings.panorama_steps, peak_mib=peak_mib())
    if deadline - time.monotonic() > 1.3 * cold_s:
        warm_s, _ = timed(run)
        record(warm_s=round(warm_s, 1))


# --- part 6: watermark -----------------------------------------------------------------------------------------------

def part_watermark(settings: Settings, work_dir: str, deadline: float) -> None:
    import torch

    from nodes.watermark.detect import (POSTHOC_DATA_BYTES, POSTHOC_PARITY_BYTES, detect_generative,
                                        detect_posthoc_payload, invert_image)
    from nodes.watermark.payload import encode_text
    from nodes.watermark.posthoc import embed_posthoc

    record(**device_fields())
    side = settings.watermark_px
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(SEED))
    bits = encode_text("gpu!", POSTHOC_DATA_BYTES, POSTHOC_PARITY_BYTES)

    def posthoc_ms(picture: torch.Tensor) -> tuple[float, float]:
        warm_up = embed_posthoc(picture, bits, WATERMARK_KEY)
        detect_posthoc_payload(warm_up, WATERMARK_KEY, None, WATERMARK_FPR)
        embed, detect = [], []
        for _ in range(settings.watermark_runs):
            seconds, marked = timed(lambda: embed_posthoc(picture, bits, WATERMARK_KEY))
            embed.append(seconds)
            seconds, found = timed(lambda: detect_posthoc_payload(marked, WATERMARK_KEY, None, WATERMARK_FPR))
            detect.append(seconds)
        if not found[0].detected:
            raise RuntimeError(f"the post-hoc mark was not detected on {picture.device}: {found[0].summary()}")
        return 1000 * statistics.median(embed), 1000 * statistics.median(detect)

    embed_ms, detect_ms = posthoc_ms(image)
    record(posthoc_embed_ms=round(embed_ms, 1), posthoc_detect_ms=round(detect_ms, 1), size=side)
    if torch.cuda.is_available():
        try:
            embed_ms, detect_ms = posthoc_ms(image.cuda())
            record(posthoc_cuda_embed_ms=round(embed_ms, 1), posthoc_cuda_detect_ms=round(detect_ms, 1))
        except Exception as error:  # the nodes keep IMAGEs on the CPU; whether the maths runs on CUDA is a finding
            record(posthoc_cuda_error=f"{type(error).__name__}: {error}")

    model = random_model("sd1", settings, work_dir)
    denoiser, codec = model_parts(model)
    empty = encode(model, "").to(model.device)

    def generative() -> list:
        initial = invert_image(image.to(model.device), denoiser, codec, empty, settings.inversion_steps)
        return detect_generative(initial, WATERMARK_KEY, "gaussian_shading", None, WATERMARK_FPR)

    generative()  # warm-up
    reset_peak()
    seconds = [timed(generative)[0] for _ in range(settings.watermark_runs)]
    record(generative_detect_ms=round(1000 * statistics.median(seconds), 1), inversion_steps=settings.inversion_steps,
           generative_peak_mib=peak_mib())


def part_memory(settings: Settings, work_dir: str, deadline: float) -> None:
    import torch

    from bench.memory import run
    from nodes.models.export import write_random_lora, write_random_single_file
    from nodes.models.loader import weight_bytes

    record(**device_fields())
    family = "sd1" if settings.smoke else "sdxl"
    models_dir = os.path.join(work_dir, "memory_models")
    checkpoints = os.path.join(models_dir, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)
    os.makedirs(os.path.join(models_dir, "loras"), exist_ok=True)
    width = SMOKE_MEMORY_WIDTH if settings.smoke else None
    if settings.smoke:
        for seed, name in enumerate("ab"):
            write_random_single_file(family, os.path.join(checkpoints, f"{name}.safetensors"), seed, width=width)
    else:
        random_model(family, settings, work_dir)  # writes the file if the sampler part did not
        for name in "ab":  # the same weights under two names: two models to the cache, no second write
            target = os.path.join(checkpoints, f"{name}.safetensors")
            if not os.path.exists(target):
                os.link(os.path.join(work_dir, f"random_{family}.safetensors"), target)
    write_random_lora(family, os.path.join(models_dir, "loras", "style.safetensors"), seed=3, rank=16, width=width)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = 10 << 30 if device == "cuda" else int(1.5 * weight_bytes(os.path.join(checkpoints, "a.safetensors"),
                                                                     torch.float32))
    figures = run(models_dir, 2, device, budget)
    record(family=family, budget_mb=round(budget / 2**20), switches=2,
           **{key: round(value, 2) for key, value in figures.items()})


# Each takes the settings, the suite's work folder (shared random checkpoints) and its box's time.monotonic() deadline.
PART_FUNCTIONS: dict[str, Callable[[Settings, str, float], None]] = {
    "workflows": part_workflows, "sampler": part_sampler, "highres": part_highres,
    "correspondence": part_correspondence, "panorama": part_panorama, "watermark": part_watermark,
    "memory": part_memory}


def run_part(part: str, settings: Settings, work_dir: str, time_box_s: float) -> int:
    """The body of a part's process: run it, record an error instead of dying silently, return the exit status."""
    deadline = time.monotonic() + time_box_s
    try:
        import torch

        # inference only, as the executor runs nodes; scoped, so that a caller in the same process (a test) keeps
        # its grad mode
        with torch.no_grad():
            PART_FUNCTIONS[part](settings, work_dir, deadline)
    except BaseException as error:  # an import error, a device mix, an OOM: the part fails, the suite goes on
        traceback.print_exc()
        record(error=f"{type(error).__name__}: {error}")
        return 1
    return 0


# --- the suite -------------------------------------------------------------------------------------------------------

def report(line: str) -> None:
    """The suite's one way to write to its stdout."""
    print(line, flush=True)


def run_in_child(part: str, settings: Settings, work_dir: str, log_path: str, elapsed_before: float) -> dict:
    """Run one part in a fresh process under its time box; its records, status, seconds and exit status."""
    time_box = settings.time_box_s[part]
    command = [sys.executable, os.path.abspath(__file__), "--run-part", part, "--work-dir", work_dir,
               "--time-box", str(time_box)] + (["--cpu-smoke"] if settings.smoke else [])
    environment = dict(os.environ)
    if settings.smoke:
        environment["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is the CPU's, even on a GPU machine
        # One thread: on a shared or busy CPU, OpenMP threads that spin at barriers while descheduled made the
        # tiny models 20x slower with 2 threads than with 1 (measured on this project's 2-core machine).
        environment["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        # A session of its own, so that the whole group (the part and anything it started) can be killed.
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=environment,
                                 start_new_session=True)
        try:
            returncode = child.wait(timeout=time_box)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            returncode = child.wait(timeout=KILL_GRACE_S)
            timed_out = True
    seconds = time.perf_counter() - started
    records: dict[str, Any] = {}
    with open(log_path, encoding="utf-8", errors="replace") as log:
        lines = log.read().splitlines()
    for line in lines:
        if line.startswith(RECORD_PREFIX):
            records.update(json.loads(line[len(RECORD_PREFIX):]))
    if timed_out:
        status = "timeout"
        records.setdefault("error", f"ran past its time box of {time_box} s (killed)")
    elif returncode != 0 or "error" in records:
        status = "failed"
        records.setdefault("error", f"exited with status {returncode} (crashed?)")
    else:
        status = "ok"
    if status != "ok":
        tail = [line for line in lines if not line.startswith(RECORD_PREFIX)][-LOG_TAIL_LINES:]
        report(f"{part}: {status}: {records['error']}\n" + "\n".join("    " + line for line in tail))
    return {"status": status, "seconds": round(seconds, 1), "time_box_s": time_box, "returncode": returncode,
            "started_at_s": round(elapsed_before, 1), "log": log_path, **records}


def bench_line(name: str, fields: dict[str, Any]) -> str:
    """``BENCH name key=value ...`` of the scalar fields (numbers, and strings without spaces); the rest is in the
    JSON file."""
    parts = []
    for key, value in fields.items():
        if key in ("log", "error") or isinstance(value, (dict, list)) or value is None:
            continue
        if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
            continue
        parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return f"BENCH {name} " + " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny models and sizes on the CPU (under 2 minutes): the suite's own test")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    parser.add_argument("--run-part", choices=PARTS, help=argparse.SUPPRESS)  # inside a part's process
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--time-box", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = CPU_SMOKE if args.cpu_smoke else GPU
    if args.run_part:
        return run_part(args.run_part, settings, args.work_dir, args.time_box)
    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            parser.error("this torch sees no CUDA device; on a CPU run --cpu-smoke")

    out_dir = os.environ.get("OUT")
    work_dir = tempfile.mkdtemp(prefix="atelier_gpu_suite_")  # random checkpoints: gigabytes, never under $OUT
    log_dir = os.path.join(out_dir, "gpu_suite_logs") if out_dir else os.path.join(work_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    parts = [part for part in PARTS if part in args.parts]
    started = time.perf_counter()
    results: dict[str, dict] = {}
    try:
        for part in parts:
            results[part] = run_in_child(part, settings, work_dir, os.path.join(log_dir, f"{part}.log"),
                                         time.perf_counter() - started)
            for key, value in results[part].items():  # per workflow, per stage, class lists: on the console too
                if isinstance(value, dict) and value and all(isinstance(entry, dict) for entry in value.values()):
                    for item, entry in value.items():
                        report(f"  {part} {key}.{item}: {json.dumps(entry)}")
                elif isinstance(value, (dict, list)):
                    report(f"  {part} {key}: {json.dumps(value)}")
            report(bench_line(f"gpu_suite_{part}", results[part]))
            summary = summarize(results, len(parts), time.perf_counter() - started, settings)
            if out_dir:  # after every part: if the suite itself is stopped, what it measured is kept
                with open(os.path.join(out_dir, "gpu_suite.json"), "w", encoding="utf-8") as file:
                    json.dump({"summary": summary, "settings": dataclasses.asdict(settings), "parts": results}, file,
                              indent=2)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report(bench_line("gpu_suite", {**summary, "device": summary["device"].replace(" ", "_")}))
    return 0 if all(result["status"] == "ok" for result in results.values()) else 1


def summarize(results: dict[str, dict], planned: int, seconds: float, settings: Settings) -> dict[str, Any]:
    """The suite's summary over the parts run so far (``planned`` in all)."""
    def named(status: str) -> str:
        return ",".join(part for part, result in results.items() if result["status"] == status) or "none"

    ok = sum(result["status"] == "ok" for result in results.values())
    device = next((result["device_name"] for result in results.values() if result.get("device_name")), "unknown")
    return {"parts_ok": f"{ok}/{planned}", "failed": named("failed"), "timed_out": named("timeout"),
            "total_s": round(seconds, 1), "device": device, "smoke": int(settings.smoke),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


if __name__ == "__main__":
    sys.exit(main())
