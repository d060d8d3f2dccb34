"""Two checkpoints and a LoRA under a memory budget that holds one and a half of them (issue 28).

Two full-size random SD1.5 single files (float16 on disk, as released) and a random rank-16 LoRA are written by
a child process; this process then runs prompts that alternate between them (the second with the LoRA), each
through the standalone app's own nodes: Load Checkpoint, Load LoRA, CLIP Text Encode, KSampler (2 Euler steps at
64×64, CFG 7) and VAE Decode, as the executor runs a workflow. The memory manager's CPU budget is 1.5 times one
model's weights in float32 (what the CPU runs), so every switch evicts the other model and reads the file back.

Measured: the process's peak resident set over the run less its resident set before the first model (the
imports), against the budget. The manager makes room before it reads a file, but reading itself holds the file's
tensors and the copies diffusers' conversion makes beside the model being built, which no budget counts: the
stated margin is one model's weights (about 4 GB for SD1.5 in float32; measured, about half of it is used).
``switch_s`` is the mean time of a prompt after a switch less that of a prompt on the model already in
memory. There is no peer: ComfyUI's model management is the comparison the issue names for a GPU, where its
partial offloading applies; here the bound itself is the figure.

    python bench/memory.py [--quick] [--family sd1|sdxl] [--device cpu|cuda] [--budget-gb GB]

``--quick`` alternates 4 times (about 2 minutes on 2 CPU cores, 8.5 GB of disk), the default 8. On a GPU
(``--device cuda``, as ``bench/gpu_suite.py`` runs it: SDXL under a 10 GB GPU budget) the GPU budget is the one
bounded and its peak is ``torch.cuda.max_memory_allocated``. Ends with
``BENCH memory peak_over_budget_mb=... margin_mb=... switch_s=... same_model_s=... budget_mb=... switches=N``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers is imported: nothing may reach a hub

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nodes.common.memory import MEMORY  # noqa: E402
from nodes.models.export import write_random_lora, write_random_single_file  # noqa: E402
from nodes.models.loader import unload_all, weight_bytes  # noqa: E402
from web.nodes_conditioning import CLIPTextEncode  # noqa: E402
from web.nodes_latent import EmptyLatentImage, VAEDecode  # noqa: E402
from web.nodes_loaders import CheckpointLoaderSimple, LoraLoader  # noqa: E402
from web.nodes_sampling import KSampler  # noqa: E402

SIZE_PX = 64
STEPS = 2
LORA_RANK = 16
PROMPTS = ("a red circle on a blue background", "a green square on a white background")


def report(line: str) -> None:
    """The benchmark's one way to stdout."""
    print(line, flush=True)


def write_models(folder: str, family: str) -> None:
    """The two checkpoints and the LoRA, written in a child process so that its memory stays out of this one's
    peak (building a full-size model to write it takes several GB)."""
    os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
    os.makedirs(os.path.join(folder, "loras"), exist_ok=True)
    for seed, name in enumerate(("a", "b"), start=1):
        write_random_single_file(family, os.path.join(folder, "checkpoints", f"{name}.safetensors"), seed=seed)
    write_random_lora(family, os.path.join(folder, "loras", "style.safetensors"), seed=3, rank=LORA_RANK)


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def prompt(models_dir: str, name: str, with_lora: bool, text: str) -> float:
    """One prompt on checkpoint ``name`` through the app's nodes; returns its seconds."""
    started = time.perf_counter()
    for node in (CheckpointLoaderSimple, LoraLoader):
        node.models_dir = models_dir
    model, clip, vae = CheckpointLoaderSimple().load_checkpoint(f"{name}.safetensors")
    if with_lora:
        model, clip = LoraLoader().load_lora(model, clip, "style.safetensors", 0.8, 0.8)
    (positive,) = CLIPTextEncode().encode(clip, text)
    (negative,) = CLIPTextEncode().encode(clip, "")
    (latent,) = EmptyLatentImage().generate(SIZE_PX, SIZE_PX, 1)
    (samples,) = KSampler().sample(model, 0, STEPS, 7.0, "euler", "normal", positive, negative, latent, 1.0)
    (image,) = VAEDecode().decode(vae, samples)
    if not torch.isfinite(image).all():
        raise RuntimeError("the decoded image has non-finite values")
    return time.perf_counter() - started


def run(models_dir: str, switches: int, device: str, budget: int) -> dict[str, float]:
    """Alternate prompts between the two checkpoints under ``budget`` bytes on ``device``; the figures."""
    MEMORY.set_budget(device if device == "cpu" else "cuda:0", budget)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    before = current_rss()
    times = []
    for index in range(switches + 1):
        name = "ab"[index % 2]
        times.append(prompt(models_dir, name, name == "b", PROMPTS[index % 2]))
        report(f"prompt {index + 1} on {name}{' + LoRA' if name == 'b' else ''}: {times[-1]:.1f} s, "
               f"{MEMORY.evictions} evictions so far, {MEMORY.used(device) / 2**20:.0f} MB counted")
    same = [prompt(models_dir, "a", False, PROMPTS[0]) for _ in range(2)]  # the second runs on a resident "a"
    peak = peak_rss() - before if device == "cpu" else torch.cuda.max_memory_allocated()
    unload_all()
    return {"peak_over_budget_mb": (peak - budget) / 2**20, "switch_s": statistics.mean(times[1:]) - same[1],
            "same_model_s": same[1], "counted_peak_mb": MEMORY.peak.get(device if device == "cpu" else "cuda:0", 0)
            / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 switches instead of 8")
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--budget-gb", type=float,
                        help="the budget on --device (default: 1.5 models' weights on the CPU, 10 GB on a GPU)")
    parser.add_argument("--models-dir", help="reuse (or keep) the written files here instead of a temporary folder")
    args = parser.parse_args()
    switches = 4 if args.quick else 8
    with tempfile.TemporaryDirectory(prefix="atelier_bench_memory_") as scratch:
        models_dir = args.models_dir or scratch
        checkpoint = os.path.join(models_dir, "checkpoints", "a.safetensors")
        if not os.path.exists(checkpoint):
            started = time.perf_counter()
            writer = multiprocessing.get_context("spawn").Process(target=write_models, args=(models_dir, args.family))
            writer.start()
            writer.join()
            if writer.exitcode != 0:
                raise SystemExit(f"writing the random models failed (exit {writer.exitcode})")
            report(f"wrote two {args.family} checkpoints and a LoRA in {time.perf_counter() - started:.0f} s")
        dtype = torch.float32 if args.device == "cpu" else torch.float16
        model_bytes = weight_bytes(checkpoint, dtype)
        budget = int(args.budget_gb * 2**30) if args.budget_gb else (
            int(1.5 * model_bytes) if args.device == "cpu" else 10 << 30)
        margin = model_bytes  # what reading a file holds beside the budget (the module docstring)
        report(f"one model: {model_bytes / 2**20:.0f} MB in {str(dtype).removeprefix('torch.')}; budget "
               f"{budget / 2**20:.0f} MB on {args.device}; stated margin {margin / 2**20:.0f} MB")
        figures = run(models_dir, switches, args.device, budget)
    within = figures["peak_over_budget_mb"] <= margin / 2**20
    report(f"peak {figures['peak_over_budget_mb']:+.0f} MB over the budget ({'within' if within else 'OVER'} the "
           f"margin), counted peak {figures['counted_peak_mb']:.0f} MB; a switch costs {figures['switch_s']:.1f} s "
           f"over a prompt on a resident model ({figures['same_model_s']:.1f} s)")
    report(f"BENCH memory peak_over_budget_mb={figures['peak_over_budget_mb']:.0f} margin_mb={margin / 2**20:.0f} "
           f"within_margin={int(within)} switch_s={figures['switch_s']:.2f} same_model_s={figures['same_model_s']:.2f} "
           f"counted_peak_mb={figures['counted_peak_mb']:.0f} budget_mb={budget / 2**20:.0f} switches={switches} "
           f"family={args.family} device={args.device} quick={int(args.quick)}")


if __name__ == "__main__":
    main()
