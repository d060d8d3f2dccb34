"""Issue 24's creative techniques on the embedded model, each against the plain run in one go.

Seamless tiling (StableMaterials): each caption (the held-out set, 32 by default, ``--quick`` 8) is generated with
one seed by KSampler (euler, normal, 20 steps, CFG 7.5) on the plain model, decoded by VAE Decode, and on Seamless
Tiling's model (the authors' start fraction 0.25), decoded by Seamless VAE Decode with the whole 3×3 context (the
example workflow's setting for the embedded model's 8×8 latents) and with the authors' (an eighth of the side);
each image's wrap-around seam
score (``nodes.seamless.tiling.wrap_seam_ratio``: the second difference across the left/right and top/bottom
borders over the interior's) is averaged per arm. The issue asks for ≤ 1.1 with tiling and clearly above without.

NoiseDiffusion: pairs of held-out scenes (rendered by the dataset, so the inputs are exact; 8 pairs, ``--quick`` 3)
are interpolated by the NoiseDiffusion node with the authors' settings (250 DDIM steps, ``--quick`` 50, inverted to
56 %, CFG 7.5, clip 2, inject 1.2, γ 0; five in-betweens and the two ends) and, for comparison, by the two
baselines the paper
names: the inverted latents slerped (no clipping, no injection) and sampled back the same way, and plain linear
interpolation of the clean latents, decoded. ``nodes.embedded.dataset.score_image`` looks at each in-between:
"found" when it finds a shape, "kept" when its colour is one of the two inputs', "matched" when its colour and
position are one input's. The ends (the inputs inverted and sampled back) are compared with the inputs (PSNR).

MagicFace: one prompt that names no colour ("a large star on the left") sampled with 32 seeds (``--quick`` 8) by
MagicFace Sampler with the authors' settings (DDIM 50, CFG 7.5, inject step 20, auto layers, mask weight 3) and one
reference, the dataset's exact blue star with the left half as its mask, and by KSampler's DDIM with the same
steps, guidance and seeds. Reported per arm: how often the scorer finds a shape of the reference's colour, and the
share of the left half's pixels nearest to it (backgrounds included).

    python bench/creative.py [--quick] [--size 64] [--only seams|noisediffusion|magicface]

Ends with ``BENCH creative nd_found=... nd_kept=... nd_matched=... (slerp_ and linear_ alike) nd_end_psnr=...
nd_s=... pairs=... nd_steps=... mf_rate_on=... mf_share_on=... mf_s_on=... (mf_*_off alike) mf_seeds=...
seam_ratio_on=... seam_ratio_off=... seam_ratio_on_max=... seam_ratio_on_authors=... seam_s_on=... seam_s_off=...
n=... size=... quick=...`` (seconds per image, sampling and decoding).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.embedded_model import SAMPLER, SCHEDULER, NodeGenerator  # noqa: E402
from nodes.common.denoiser import DiffusersDenoiser  # noqa: E402
from nodes.embedded.dataset import IMAGE_SIZE, PALETTE, Scene, held_out_captions, render, score_image  # noqa: E402
from nodes.noisediffusion.interpolate import DEFAULT_DEPTH, DEFAULT_STEPS, fractions_of  # noqa: E402
from nodes.noisediffusion.nodes import AtelierNoiseDiffusion  # noqa: E402
from nodes.sampling.ddim import ddim_invert_partial, ddim_sample_partial, ldm_ddim_timesteps  # noqa: E402
from nodes.sampling.guidance import to_conditioning  # noqa: E402
from nodes.embedded.train import SHIPPED_NAME  # noqa: E402
from nodes.magicface.nodes import AtelierMagicFaceReference, AtelierMagicFaceSampler  # noqa: E402
from nodes.models.loading import SHIPPED_MODELS  # noqa: E402
from nodes.seamless.nodes import AtelierSeamlessTiling, AtelierSeamlessVAEDecode  # noqa: E402
from nodes.seamless.tiling import DEFAULT_CONTEXT, DEFAULT_START_FRACTION, wrap_seam_ratio  # noqa: E402
from web.nodes_latent import EmptyLatentImage  # noqa: E402

FULL_IMAGES, QUICK_IMAGES = 32, 8
STEPS, CFG, SEED = 20, 7.5, 0
FULL_PAIRS, QUICK_PAIRS = 8, 3
QUICK_ND_STEPS = 50  # --quick: a 50-step grid (the authors' 250 in the full run)
# MagicFace: the reference (shape, colour, size, position), its prompt, the target prompt with no colour and the
# position of its word "star" (after the start token, "a", "large"); the authors' 50 DDIM steps
MF_REFERENCE = ("star", "blue", "large", "left")
MF_REFERENCE_PROMPT, MF_PROMPT, MF_TOKEN, MF_STEPS = "a blue star", "a large star on the left", 3, 50


def seam_ratios(generator: NodeGenerator, captions: list[str], size: int) -> dict[str, tuple[list[float], float]]:
    """Per arm: each image's wrap seam ratio and the arm's seconds per image (sampling and decoding). "off": the
    plain model and VAE Decode; "on": Seamless Tiling's model and Seamless VAE Decode with the whole 3×3 context
    (what the example workflow sets for the embedded model); "on_authors": the same latents decoded with the
    authors' context (an eighth of the side). The arms alternate caption by caption."""
    tiling = AtelierSeamlessTiling().patch(generator.ref, DEFAULT_START_FRACTION, "both", True, 0)[0]
    seamless_decoder = AtelierSeamlessVAEDecode()
    latent = EmptyLatentImage().generate(size, size, 1)[0]
    ratios = {"off": [], "on": [], "on_authors": []}
    seconds = dict.fromkeys(ratios, 0.0)
    for index, caption in enumerate(captions):
        positive = generator.encode.encode(generator.clip, caption)[0]
        for model, decodes in ((generator.ref, {"off": lambda z: generator.decoder.decode(generator.codec, z)[0]}),
                               (tiling, {"on": lambda z: seamless_decoder.decode(z, generator.codec, "both", 1.0)[0],
                                         "on_authors": lambda z: seamless_decoder.decode(z, generator.codec, "both",
                                                                                         DEFAULT_CONTEXT)[0]})):
            started = time.perf_counter()
            sampled = generator.sampler.sample(model, SEED + index, STEPS, CFG, SAMPLER, SCHEDULER, positive,
                                               generator.negative, latent, 1.0)[0]
            sampling_s = time.perf_counter() - started
            for arm, decode in decodes.items():
                started = time.perf_counter()
                image = decode(sampled)
                seconds[arm] += sampling_s + time.perf_counter() - started
                ratios[arm].append(wrap_seam_ratio(image.permute(0, 3, 1, 2)).item())
    return {arm: (values, seconds[arm] / len(captions)) for arm, values in ratios.items()}


def slerp(p0: torch.Tensor, p1: torch.Tensor, fraction: float) -> torch.Tensor:
    """Spherical interpolation of two latents (in float64, as the paper's baseline computes it)."""
    a, b = p0.double(), p1.double()
    cosine = ((a * b).sum() / (a.norm() * b.norm())).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.arccos(cosine)
    return ((torch.sin((1 - fraction) * theta) * a + torch.sin(fraction * theta) * b) / torch.sin(theta)).to(p0)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((image - reference) ** 2).mean()))


def noisediffusion(generator: NodeGenerator, pairs: int, steps: int) -> dict[str, float]:
    """Shape-found, colour-kept and label-matched rates of the in-betweens per method, the ends' PSNR, seconds per
    pair, on a ``steps`` grid inverted to the authors' depth."""
    scenes = held_out_captions(2 * pairs, seed=99)
    codec, clip = generator.codec, generator.clip
    denoiser = DiffusersDenoiser(generator.ref.model.unet, generator.ref.model.schedule)
    timesteps, depth = ldm_ddim_timesteps(steps), round(steps * DEFAULT_DEPTH)
    inner = fractions_of(5)
    counts = {f"{method}_{what}": 0 for method in ("nd", "slerp", "linear") for what in ("found", "kept", "matched")}
    end_psnr, seconds = [], 0.0
    for index in range(pairs):
        scene_a, scene_b = scenes[2 * index], scenes[2 * index + 1]
        image_a, image_b = render(scene_a)[None], render(scene_b)[None]
        prompt = f"{scene_a.caption} and {scene_b.caption}"
        positive, negative = clip.encode(prompt), generator.negative
        started = time.perf_counter()
        (latent,) = AtelierNoiseDiffusion().interpolate(generator.ref, codec, image_a.permute(0, 2, 3, 1),
                                                         image_b.permute(0, 2, 3, 1), positive, negative, 5, True,
                                                         steps, DEFAULT_DEPTH, 7.5, 0.0, 2.0, 1.2, SEED)
        seconds += time.perf_counter() - started
        decoded = codec.decode(latent["samples"])
        end_psnr += [psnr(decoded[0], image_a[0]), psnr(decoded[-1], image_b[0])]
        clean = torch.cat([codec.encode(image) for image in (image_a, image_b)]) * codec.scaling_factor
        conditioning = to_conditioning(positive, "sd1")
        inverted = ddim_invert_partial(denoiser, clean, conditioning, timesteps, depth)
        slerped = torch.cat([slerp(inverted[:1], inverted[1:], fraction) for fraction in inner])
        slerp_images = codec.decode(ddim_sample_partial(denoiser, slerped, conditioning, to_conditioning(
            negative, "sd1"), 7.5, timesteps, depth) / codec.scaling_factor)
        linear_images = codec.decode(torch.cat([torch.lerp(clean[:1], clean[1:], fraction) for fraction in inner])
                                     / codec.scaling_factor)
        colours = {scene_a.colour, scene_b.colour}
        labels = {(scene_a.colour, scene_a.position), (scene_b.colour, scene_b.position)}
        for method, images in (("nd", decoded[1:-1]), ("slerp", slerp_images), ("linear", linear_images)):
            for image in images:
                score = score_image(image)
                counts[f"{method}_found"] += score.colour is not None
                counts[f"{method}_kept"] += score.colour in colours
                counts[f"{method}_matched"] += (score.colour, score.position) in labels
    frames = pairs * len(inner)
    return {**{key: value / frames for key, value in counts.items()},
            "nd_end_psnr": sum(end_psnr) / len(end_psnr), "nd_s": seconds / pairs}


def magicface(generator: NodeGenerator, seeds: int) -> dict[str, float]:
    """Per arm over ``seeds`` seeds of one prompt that names no colour: the share of images in which the scorer
    finds a shape of the reference's colour, the mean share of the left half's pixels nearest to that colour, and
    seconds per image. "on": MagicFace Sampler with the authors' settings and one reference (the dataset's exact
    blue star, its mask the left half); "off": KSampler's DDIM (ddim_uniform) with the same steps, guidance and
    seed (the same starting noise)."""
    scene = Scene(*MF_REFERENCE, "plain", "white", None, (0.0, 0.0), "")
    encode, clip = generator.encode, generator.clip
    half = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE)
    half[..., :IMAGE_SIZE // 2] = 1
    (references,) = AtelierMagicFaceReference().add(render(scene).permute(1, 2, 0)[None], half,
                                                    encode.encode(clip, MF_REFERENCE_PROMPT)[0], MF_TOKEN, 3.0)
    positive = encode.encode(clip, MF_PROMPT)[0]
    palette = torch.tensor(list(PALETTE.values())).float() / 255
    arms = {
        "on": lambda seed: AtelierMagicFaceSampler().sample(
            generator.ref, generator.codec, positive, generator.negative, references, generator.latent, seed,
            MF_STEPS, 7.5, 20, "auto", 0.0, True)[0],
        "off": lambda seed: generator.sampler.sample(generator.ref, seed, MF_STEPS, 7.5, "ddim", "ddim_uniform",
                                                     positive, generator.negative, generator.latent, 1.0)[0],
    }
    results = {}
    for arm, sample in arms.items():
        found, share, started = 0, 0.0, time.perf_counter()
        for seed in range(seeds):
            image = generator.decoder.decode(generator.codec, sample(SEED + seed))[0][0].permute(2, 0, 1)
            found += score_image(image).colour == scene.colour
            left = image[:, :, :IMAGE_SIZE // 2].reshape(3, -1).T
            share += float((torch.cdist(left, palette).argmin(1) == list(PALETTE).index(scene.colour)).float().mean())
        results |= {f"mf_rate_{arm}": found / seeds, f"mf_share_{arm}": share / seeds,
                    f"mf_s_{arm}": (time.perf_counter() - started) / seeds}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images instead of {FULL_IMAGES}")
    parser.add_argument("--size", type=int, default=IMAGE_SIZE, help="the generated size (default: native, 64)")
    parser.add_argument("--only", choices=("seams", "noisediffusion", "magicface"), help="run one part")
    args = parser.parse_args()
    generator = NodeGenerator(os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME), STEPS, CFG)
    fields = []

    if args.only in (None, "noisediffusion"):
        pairs = QUICK_PAIRS if args.quick else FULL_PAIRS
        nd_steps = QUICK_ND_STEPS if args.quick else DEFAULT_STEPS
        nd = noisediffusion(generator, pairs, nd_steps)
        print(f"NoiseDiffusion over {pairs} pairs, 5 in-betweens each: a shape found in {nd['nd_found']:.0%} "
              f"(slerp {nd['slerp_found']:.0%}, linear {nd['linear_found']:.0%}), an input's colour in "
              f"{nd['nd_kept']:.0%} (slerp {nd['slerp_kept']:.0%}, linear {nd['linear_kept']:.0%}), an input's "
              f"colour and position in {nd['nd_matched']:.0%} (slerp {nd['slerp_matched']:.0%}, linear "
              f"{nd['linear_matched']:.0%}); the ends {nd['nd_end_psnr']:.1f} dB from the inputs; "
              f"{nd['nd_s']:.1f} s per pair", flush=True)
        fields += [f"{key}={value:.3f}" for key, value in nd.items()] + [f"pairs={pairs}", f"nd_steps={nd_steps}"]

    if args.only in (None, "magicface"):
        seeds = QUICK_IMAGES if args.quick else FULL_IMAGES
        mf = magicface(generator, seeds)
        print(f"MagicFace over {seeds} seeds of '{MF_PROMPT}', a {' '.join(MF_REFERENCE[1::-1])} reference masked to "
              f"the left half: a {MF_REFERENCE[1]} shape in {mf['mf_rate_on']:.0%} of the images (without the "
              f"reference {mf['mf_rate_off']:.0%}); {MF_REFERENCE[1]} in {mf['mf_share_on']:.0%} of the left half "
              f"(without {mf['mf_share_off']:.0%}); {mf['mf_s_on']:.2f} s per image ({mf['mf_s_off']:.2f} s)",
              flush=True)
        fields += [f"{key}={value:.3f}" for key, value in mf.items()] + [f"mf_seeds={seeds}"]

    if args.only in (None, "seams"):
        count = QUICK_IMAGES if args.quick else FULL_IMAGES
        captions = [scene.caption for scene in held_out_captions(count)]
        seams = seam_ratios(generator, captions, args.size)
        means = {arm: float(torch.tensor(values).mean()) for arm, (values, _) in seams.items()}
        on, off = seams["on"][0], seams["off"][0]
        print(f"seam ratio over {count} images at {args.size}px: {means['off']:.3f} plain, {means['on']:.3f} with "
              f"seamless tiling (max {max(on):.3f}; {sum(r <= 1.1 for r in on)}/{count} at or under 1.1, plain "
              f"{sum(r <= 1.1 for r in off)}/{count}); with the authors' decode context: "
              f"{means['on_authors']:.3f}", flush=True)
        fields += [f"seam_ratio_on={means['on']:.3f}", f"seam_ratio_off={means['off']:.3f}",
                   f"seam_ratio_on_max={max(on):.3f}", f"seam_ratio_on_authors={means['on_authors']:.3f}",
                   f"seam_s_on={seams['on'][1]:.3f}", f"seam_s_off={seams['off'][1]:.3f}", f"n={count}",
                   f"size={args.size}"]
    print(f"BENCH creative {' '.join(fields)} quick={int(args.quick)}")

if __name__ == "__main__":
    main()
