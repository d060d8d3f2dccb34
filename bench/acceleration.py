"""Faster sampling without training (issue 23), each technique against the plain sampler, side by side in one run.

Two models:

1. **A full-size SD1.5 UNet with random weights** (the shipped config, ``bench/sampler.py``'s builder) at 256×256:
   wall time per image of KSampler on the plain MODEL and on each technique's, at DDIM-50 (ComfyUI's ``ddim``
   sampler on the ``ddim_uniform`` schedule) and DPM++(2M) 20 (``normal``), CFG 7.5, one seed, runs alternating
   between the sides after one warm-up each; the medians' ratio is the speedup. Network calls are counted by hooks
   on the UNet's input and output convolutions: encoder passes and decoder passes (a parallel decoder batch counts
   once), against the plain sampler's full passes. Speed does not depend on the weights' values.
2. **The embedded model** (64×64, trained): the same, plus colour and position accuracy of each arm's pictures
   (``bench/embedded_model.py``'s held-out captions and scorer, DDIM-50, CFG 7.5, one seed per caption, the same
   for every arm).

Arms: Faster Diffusion with the node's defaults (the paper's key steps, prior noise injection, parallel decoding in
groups of at most 10), and with the encoder every second step (uniform, m = 2); SADA with its defaults, step
skipping and token pruning (Euler at DDIM-50's sigmas, DPM++ 2M at 20 steps; through SamplerCustom), and without
its Lagrange phase (the stability criterion up to step 47); feature
inheritance with the node's defaults (our settings); T-Stitch at r = 0.4 with a small model of a quarter the width (full-size model only: the embedded family
has no trained small model; the passes counted are the large UNet's).

    python bench/acceleration.py [--quick]

``--quick``: 128×128 for the full-size model, one timed run per side, 40 captions; the full run: 256×256, two timed
runs per side, 200 captions. Ends with ``BENCH acceleration faster_diffusion_speedup=... ...``; the issue's targets
on this CPU: Faster Diffusion >= 1.6x and SADA >= 1.5x at DDIM-50, each losing at most 0.03 of colour or position
accuracy; T-Stitch >= 1.4x.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402

from bench.embedded_model import FULL_CAPTIONS, QUICK_CAPTIONS, NodeGenerator, accuracy  # noqa: E402
from bench.sampler import build_pipeline, pipeline_ref  # noqa: E402
from nodes.embedded.dataset import IMAGE_SIZE, held_out_captions  # noqa: E402
from nodes.embedded.train import SHIPPED_NAME  # noqa: E402
from nodes.fasterdiffusion.nodes import AtelierFasterDiffusion  # noqa: E402
from nodes.generation.nodes import AtelierTextEncode  # noqa: E402
from nodes.models.clip import Clip  # noqa: E402
from nodes.models.loading import SHIPPED_MODELS  # noqa: E402
from nodes.models.refs import ModelRef  # noqa: E402
from nodes.inheritance.nodes import AtelierFeatureInheritance  # noqa: E402
from nodes.sada.nodes import AtelierSADA  # noqa: E402
from nodes.tstitch.nodes import AtelierTStitch  # noqa: E402
from web.nodes_latent import EmptyLatentImage  # noqa: E402
from web.nodes_sampling import BasicScheduler, KSampler, SamplerCustom  # noqa: E402

CFG, SEED = 7.5, 0
TSTITCH_RATIO = 0.4  # the r
PROMPT, NEGATIVE = "a photo of a cat sitting on a wooden table, soft light", "blurry, low quality"
SOLVERS = {"ddim50": ("ddim", "ddim_uniform", 50), "dpmpp20": ("dpmpp_2m", "normal", 20)}
QUICK = {"size": 128, "runs": 1, "captions": QUICK_CAPTIONS}
FULL = {"size": 256, "runs": 2, "captions": FULL_CAPTIONS}


def report(line: str) -> None:
    print(line, flush=True)


def node_defaults(node: type, *sockets: str) -> dict:
    """A node's widget defaults, all its inputs but ``sockets``."""
    return {name: spec[1]["default"] for name, spec in node.INPUT_TYPES()["required"].items() if name not in sockets}


def faster_diffusion(**settings) -> Callable[[ModelRef], ModelRef]:
    """The Faster Diffusion node with its defaults, except ``settings``."""
    defaults = node_defaults(AtelierFasterDiffusion, "model")
    return lambda model: AtelierFasterDiffusion().patch(model, **{**defaults, **settings})[0]


def feature_inheritance(model: ModelRef) -> ModelRef:
    """The Feature Inheritance node with its defaults."""
    return AtelierFeatureInheritance().patch(model, **node_defaults(AtelierFeatureInheritance, "model"))[0]


@dataclasses.dataclass(frozen=True)
class Arm:
    """What an arm samples with: its MODEL, and with ``sada`` SADA's node (its MODEL and SAMPLER, through
    SamplerCustom), its defaults but for ``sada``'s settings, instead of the solver."""

    model: ModelRef
    sada: dict | None = None


# arm -> how it is made from the plain MODEL; each runs at both solvers. faster_diffusion_uniform2: the encoder every
# second step, the setting that keeps the embedded model's accuracy (README, "Faster Diffusion")
TECHNIQUES: dict[str, Callable[[ModelRef], Arm]] = {
    "faster_diffusion": lambda model: Arm(faster_diffusion()(model)),
    "faster_diffusion_uniform2": lambda model: Arm(faster_diffusion(key_steps="uniform", interval=2)(model)),
    "sada": lambda model: Arm(model, sada={}),
    "sada_no_lagrange": lambda model: Arm(model, sada={"lagrange_term": 0}),
    "feature_inheritance": lambda model: Arm(feature_inheritance(model)),
}


class CallCounter:
    """Counts a UNet's encoder passes (its input convolution) and decoder passes (its output convolution)."""

    def __init__(self, unet):
        self.encoder = self.decoder = 0
        unet.conv_in.register_forward_hook(lambda *_: self._count("encoder"))
        unet.conv_out.register_forward_hook(lambda *_: self._count("decoder"))

    def _count(self, part: str) -> None:
        setattr(self, part, getattr(self, part) + 1)

    def reset(self) -> tuple[int, int]:
        counts = (self.encoder, self.decoder)
        self.encoder = self.decoder = 0
        return counts


def sample(arm: Arm, solver: str, positive, negative, latent: dict, seed: int) -> torch.Tensor:
    """KSampler at the solver's settings; SADA's arm: SamplerCustom with the SADA node's MODEL and SAMPLER on the
    solver's sigmas (DDIM is Euler on the ddim_uniform schedule)."""
    sampler_name, scheduler, steps = SOLVERS[solver]
    if arm.sada is None:
        return KSampler().sample(arm.model, seed, steps, CFG, sampler_name, scheduler, positive, negative, latent,
                                 1.0)[0]["samples"]
    defaults = node_defaults(AtelierSADA, "model", "solver")
    model, sampler = AtelierSADA().build(arm.model, "dpmpp_2m" if sampler_name == "dpmpp_2m" else "euler",
                                         **{**defaults, **arm.sada})
    (sigmas,) = BasicScheduler().get_sigmas(arm.model, scheduler, steps, 1.0)
    return SamplerCustom().sample(model, True, seed, CFG, positive, negative, sampler, sigmas, latent)[0]["samples"]


def time_arms(arms: dict[str, Arm], solver: str, positive, negative, latent: dict, runs: int,
              counter: CallCounter) -> dict[str, tuple[float, tuple[int, int]]]:
    """Median seconds per image and (encoder, decoder) passes of each arm, runs alternating between arms."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    counts = {}
    for name, model in arms.items():  # warm-up, and the pass counts
        counter.reset()
        sample(model, solver, positive, negative, latent, SEED)
        counts[name] = counter.reset()
    for run in range(runs):
        order = list(arms.items()) if run % 2 == 0 else list(arms.items())[::-1]
        for name, model in order:
            started = time.perf_counter()
            sample(model, solver, positive, negative, latent, SEED)
            times[name].append(time.perf_counter() - started)
            report(f"  {solver} {name}: {times[name][-1]:.2f} s")
    return {name: (statistics.median(times[name]), counts[name]) for name in arms}


def quarter_width(pipeline) -> ModelRef:
    """T-Stitch's small model: SD1.5's UNet at a quarter of its widths (80, 160, 320, 320; GroupNorm in 16 groups,
    as 32 does not divide 80), random weights, with the large model's text encoder, VAE and schedule."""
    config = dict(pipeline.unet.config)
    config.update(block_out_channels=[width // 4 for width in config["block_out_channels"]], norm_num_groups=16)
    torch.manual_seed(SEED + 1)
    unet = UNet2DConditionModel.from_config(config).requires_grad_(False)
    small = StableDiffusionPipeline(**{**pipeline.components, "unet": unet})
    report(f"T-Stitch small model: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters against "
           f"{sum(p.numel() for p in pipeline.unet.parameters()) / 1e6:.0f} M")
    return pipeline_ref(small, "sd1", torch.device("cpu"), torch.float32, "random sd15 quarter width")


def full_size(size: int, runs: int) -> dict[str, float]:
    """Speedups and pass counts on the random full-size SD1.5 UNet."""
    torch.set_grad_enabled(False)
    pipeline = build_pipeline("sd15", torch.device("cpu"), torch.float32)
    plain = pipeline_ref(pipeline, "sd1", torch.device("cpu"), torch.float32, "random sd15")
    counter = CallCounter(pipeline.unet)
    clip = Clip(plain)
    positive, = AtelierTextEncode().encode(clip, PROMPT, "auto")
    negative, = AtelierTextEncode().encode(clip, NEGATIVE, "auto")
    latent = EmptyLatentImage().generate(size, size, 1)[0]
    stitched = AtelierTStitch().patch(plain, quarter_width(pipeline), TSTITCH_RATIO)[0]
    figures = {}
    for solver in SOLVERS:
        arms = {"plain": Arm(plain), **{name: make(plain) for name, make in TECHNIQUES.items()},
                "tstitch": Arm(stitched)}
        results = time_arms(arms, solver, positive, negative, latent, runs, counter)
        plain_s, (plain_passes, _) = results.pop("plain")
        for name, (seconds, (encoder, decoder)) in results.items():
            speedup = plain_s / seconds
            report(f"SD1.5 {size}² {solver}: {name} {seconds:.1f} s against {plain_s:.1f} s: {speedup:.2f}x; "
                   f"{encoder} encoder and {decoder} decoder passes against {plain_passes} full passes")
            figures[f"{name}_speedup{'' if solver == 'ddim50' else '_' + solver}"] = speedup
            figures[f"{name}_encoder_passes_{solver}"] = encoder
            figures[f"{name}_decoder_passes_{solver}"] = decoder
    return figures


def embedded(captions: int) -> dict[str, float]:
    """Speedups and accuracies on the embedded model at DDIM-50."""
    generator = NodeGenerator(os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME), 50, CFG)
    scenes = held_out_captions(captions)
    arms = {"plain": Arm(generator.ref), **{name: make(generator.ref) for name, make in TECHNIQUES.items()}}
    images: dict[str, list[torch.Tensor]] = {name: [] for name in arms}
    seconds: dict[str, float] = dict.fromkeys(arms, 0.0)
    sample(arms["plain"], "ddim50", generator.negative, generator.negative, generator.latent, SEED)  # warm-up
    for index, scene in enumerate(scenes):
        positive = generator.encode.encode(generator.clip, scene.caption)[0]
        for name, model in arms.items():
            started = time.perf_counter()
            latent = sample(model, "ddim50", positive, generator.negative, generator.latent, SEED + index)
            seconds[name] += time.perf_counter() - started
            images[name].append(generator.decoder.decode(generator.codec, {"samples": latent})[0][0].permute(2, 0, 1))
    figures = {}
    plain_colour, plain_position = accuracy(scenes, images["plain"])
    report(f"embedded {IMAGE_SIZE}² ddim50 plain: colour {plain_colour:.3f}, position {plain_position:.3f}, "
           f"{seconds['plain'] / captions * 1000:.0f} ms per image")
    figures.update(colour_acc_plain=plain_colour, position_acc_plain=plain_position)
    for name in arms.keys() - {"plain"}:
        colour, position = accuracy(scenes, images[name])
        speedup = seconds["plain"] / seconds[name]
        report(f"embedded {IMAGE_SIZE}² ddim50 {name}: colour {colour:.3f} ({colour - plain_colour:+.3f}), position "
               f"{position:.3f} ({position - plain_position:+.3f}), {speedup:.2f}x")
        figures.update({f"{name}_colour_acc": colour, f"{name}_position_acc": position,
                        f"{name}_speedup_embedded": speedup})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['size']}² full-size runs, {QUICK['runs']} "
                                                             f"timed run per side, {QUICK['captions']} captions")
    parser.add_argument("--size", type=int, help="the full-size runs' image side (default 256; 128 with --quick)")
    args = parser.parse_args()
    mode = {**(QUICK if args.quick else FULL), **({"size": args.size} if args.size else {})}
    torch.set_grad_enabled(False)
    figures = {**full_size(mode["size"], mode["runs"]), **embedded(mode["captions"])}
    fields = " ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                      for key, value in figures.items())
    report(f"BENCH acceleration {fields} size={mode['size']} captions={mode['captions']} quick={int(args.quick)}")


if __name__ == "__main__":
    main()
