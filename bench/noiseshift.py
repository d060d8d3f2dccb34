"""NoiseShift (issue 23) on the embedded model at twice its native size: colour and position accuracy with and
without the calibrated table, side by side in one run.

The embedded model was trained at 64×64. Calibration: 8 captions (held out from the scored ones) generated at 64,
upscaled bicubically to 128, VAE-encoded: the clean latents (16×16) NoiseShift Calibrate fits its table to (16
levels, the node's default). Then each scored caption (the ``bench/embedded_model.py`` set: 200, ``--quick``
40) is generated at 128×128 with the same seed by KSampler (euler, normal, 20 steps, CFG 7.5) on the plain model
and on NoiseShift Apply's, decoded, area-downscaled to 64 and scored by ``nodes.embedded.dataset.score_image``.

    python bench/noiseshift.py [--quick] [--size 128]

Ends with ``BENCH noiseshift size=... colour_acc_off=... colour_acc_on=... position_acc_off=...
position_acc_on=... colour_diff=... position_diff=... calibration_s=... n=... quick=...``. The issue asks for the
difference, whichever way it goes: the paper measures flow-matching models only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.embedded_model import FULL_CAPTIONS, QUICK_CAPTIONS, SAMPLER, SCHEDULER, NodeGenerator, accuracy  # noqa: E402
from nodes.embedded.dataset import IMAGE_SIZE, held_out_captions  # noqa: E402
from nodes.embedded.train import SHIPPED_NAME  # noqa: E402
from nodes.models.loading import SHIPPED_MODELS  # noqa: E402
from nodes.noiseshift.nodes import AtelierNoiseShiftApply, AtelierNoiseShiftCalibrate  # noqa: E402
from web.nodes_latent import EmptyLatentImage, VAEEncode  # noqa: E402

CALIBRATION_CAPTIONS = 8
STEPS, CFG, SEED = 20, 7.5, 0


def generate(generator: NodeGenerator, model, caption: str, seed: int, size: int) -> torch.Tensor:
    """(3, size, size) in 0..1 through the KSampler and VAE Decode nodes."""
    positive = generator.encode.encode(generator.clip, caption)[0]
    latent = EmptyLatentImage().generate(size, size, 1)[0]
    sampled = generator.sampler.sample(model, seed, STEPS, CFG, SAMPLER, SCHEDULER, positive, generator.negative,
                                       latent, 1.0)[0]
    return generator.decoder.decode(generator.codec, sampled)[0][0].permute(2, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CAPTIONS} captions instead of {FULL_CAPTIONS}")
    parser.add_argument("--size", type=int, default=2 * IMAGE_SIZE, help="the sampled size (default 128)")
    args = parser.parse_args()
    count = QUICK_CAPTIONS if args.quick else FULL_CAPTIONS
    scenes = held_out_captions(count + CALIBRATION_CAPTIONS)
    scored, calibration = scenes[:count], scenes[count:]
    generator = NodeGenerator(os.path.join(SHIPPED_MODELS, "diffusers", SHIPPED_NAME), STEPS, CFG)
    plain = generator.ref

    started = time.perf_counter()
    natives = torch.stack([generate(generator, plain, scene.caption, SEED + 1000 + index, IMAGE_SIZE)
                           for index, scene in enumerate(calibration)])
    upscaled = F.interpolate(natives, size=(args.size, args.size), mode="bicubic").clamp(0, 1)
    clean = VAEEncode().encode(generator.codec, upscaled.permute(0, 2, 3, 1))[0]
    # one prompt for the batch: the empty one, as the scored captions vary
    table, report = AtelierNoiseShiftCalibrate().calibrate(plain, generator.negative, clean, 16, SEED)
    calibration_s = time.perf_counter() - started
    print(report, flush=True)
    shifted = AtelierNoiseShiftApply().apply(plain, table)[0]

    images = {"off": [], "on": []}
    for index, scene in enumerate(scored):
        for arm, model in (("off", plain), ("on", shifted)):
            image = generate(generator, model, scene.caption, SEED + index, args.size)
            images[arm].append(F.interpolate(image[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")[0])
    results = {arm: accuracy(scored, arm_images) for arm, arm_images in images.items()}
    (colour_off, position_off), (colour_on, position_on) = results["off"], results["on"]
    print(f"at {args.size}x{args.size}: colour {colour_off:.3f} -> {colour_on:.3f}, position {position_off:.3f} -> "
          f"{position_on:.3f} with NoiseShift ({count} captions)", flush=True)
    print(f"BENCH noiseshift size={args.size} colour_acc_off={colour_off:.3f} colour_acc_on={colour_on:.3f} "
          f"position_acc_off={position_off:.3f} position_acc_on={position_on:.3f} "
          f"colour_diff={colour_on - colour_off:+.3f} position_diff={position_on - position_off:+.3f} "
          f"calibration_s={calibration_s:.1f} n={count} quick={int(args.quick)}", flush=True)


if __name__ == "__main__":
    main()
