"""Image tasks from published weights (issue 26): AdcSR's and TVT's ×4 against bicubic ×4 on the same inputs.

AdcSR runs with random full-size weights written in the published layout and read through its loader (speed and
memory do not depend on the values). TVT runs its full-size 4× VAE and a **stand-in TVTUNet**: the published
config.json was not at hand, so SD2.1-base's UNet with a 320-wide level in front (:data:`TVT_UNET_STAND_IN`), as the
official code's trained groups imply it; its figures are the stand-in's. Figures:

- **time per output megapixel** of AdcSR Upscale, TVT Upscale and bicubic ×4 (``F.interpolate``, clamped), on
  random RGB inputs, the median of the runs after one warm-up each;
- **bounded memory**: the peak resident-memory growth of a tiled ×4 of a 1024² input (``--quick``: 512² for AdcSR,
  tile 128, overlap 32; 256² for TVT, its UNet on the tiled script's 192-latent-pixel tiles and its VAE in 1024-pixel
  tiles), beside the size of its float32 output, which is the part that grows with the image.

    python bench/image_tasks.py [--quick] [--skip-tvt | --skip-adcsr]

Ends with ``BENCH image_tasks adcsr_s_per_mp=... tvt_s_per_mp=... bicubic_s_per_mp=... adcsr_over_bicubic=...
tiled_input=... tiled_peak_rss_growth_mib=... tvt_tiled_input=... tvt_tiled_peak_rss_growth_mib=...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.correspondence import resident_growth_mib  # noqa: E402
from bench.sampler import median_seconds, report  # noqa: E402
from nodes.superres.adcsr import HALF_DECODER_WIDTHS, SCALE, load_adcsr  # noqa: E402
from nodes.superres.nodes import TVTModel, adcsr_upscale, sd21_unet_config, tvt_upscale_image  # noqa: E402
from nodes.superres.tvt import build_vaed4  # noqa: E402
from tests.tiny_models import write_adcsr_files  # noqa: E402

QUICK = {"size": 128, "runs": 2, "tiled_size": 512, "tvt_size": 128, "tvt_tiled_size": 256}
FULL = {"size": 256, "runs": 3, "tiled_size": 1024, "tvt_size": 256, "tvt_tiled_size": 1024}
# SD2.1-base's UNet with a level in front for TVT's finer latents (down_blocks.0 and up_blocks.4 are new, as the
# official trained groups say); the widths of the new level are this bench's guess.
TVT_UNET_STAND_IN = {**sd21_unet_config(), "block_out_channels": (320, 320, 640, 1280, 1280),
                     "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
                     "attention_head_dim": (5, 5, 10, 20, 20)}
TILE, OVERLAP = 128, 32  # a CPU-sized tile: a window of 192² attends over 96² tokens at the top level


def bicubic(image: torch.Tensor) -> torch.Tensor:
    return F.interpolate(image, scale_factor=SCALE, mode="bicubic", align_corners=False).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['size']}² timings, a {QUICK['tiled_size']}² "
                                                             f"tiled run")
    parser.add_argument("--skip-tvt", action="store_true", help="AdcSR and bicubic only")
    parser.add_argument("--skip-adcsr", action="store_true", help="TVT and bicubic only")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    torch.set_grad_enabled(False)
    image = torch.rand(1, 3, mode["size"], mode["size"], generator=torch.Generator().manual_seed(0))
    megapixels = (SCALE * mode["size"]) ** 2 / 1e6
    bicubic_s_per_mp = median_seconds(lambda: bicubic(image), mode["runs"]) / megapixels
    report(f"bicubic ×4 of {mode['size']}²: {bicubic_s_per_mp:.4f} s per output megapixel")
    fields = f"bicubic_s_per_mp={bicubic_s_per_mp:.4f}"
    if not args.skip_adcsr:
        fields += " " + adcsr_arm(mode, image, bicubic_s_per_mp)
    if not args.skip_tvt:
        fields += " " + tvt_arm(mode, bicubic_s_per_mp)
    report(f"BENCH image_tasks {fields} device=cpu quick={int(args.quick)}")


def adcsr_arm(mode: dict, image: torch.Tensor, bicubic_s_per_mp: float) -> str:
    """AdcSR's figures (random full-size weights through its loader) as BENCH fields."""
    with tempfile.TemporaryDirectory() as folder:
        network, decoder = write_adcsr_files(folder, sd21_unet_config(), HALF_DECODER_WIDTHS, aliases=False)
        net = load_adcsr(network, decoder, sd21_unet_config())
    report(f"AdcSR: {sum(parameter.numel() for parameter in net.parameters()) / 1e6:.1f}M parameters, random")
    megapixels = (SCALE * mode["size"]) ** 2 / 1e6
    per_mp = median_seconds(lambda: adcsr_upscale(net, image, mode["size"], OVERLAP), mode["runs"]) / megapixels
    report(f"adcsr ×4 of {mode['size']}²: {per_mp:.3f} s per output megapixel")
    large = torch.rand(1, 3, mode["tiled_size"], mode["tiled_size"], generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    growth, result = resident_growth_mib(lambda: adcsr_upscale(net, large, TILE, OVERLAP))
    tiled_seconds = time.perf_counter() - started
    output_mib = result.numel() * result.element_size() / 2 ** 20
    report(f"tiled ×4 of {mode['tiled_size']}² (tile {TILE}, overlap {OVERLAP}): {tiled_seconds:.1f} s, peak "
           f"resident growth {growth:.0f} MiB for a {output_mib:.0f} MiB float32 output")
    return (f"adcsr_s_per_mp={per_mp:.3f} adcsr_over_bicubic={per_mp / bicubic_s_per_mp:.0f} size={mode['size']} "
            f"tiled_input={mode['tiled_size']} tiled_s={tiled_seconds:.1f} tiled_peak_rss_growth_mib={growth:.0f} "
            f"tiled_output_mib={output_mib:.0f}")


def tvt_arm(mode: dict, bicubic_s_per_mp: float) -> str:
    """TVT's figures (full-size VAED4, the stand-in UNet, random weights, random 1024-wide prompt states) as BENCH
    fields."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = TVTModel(unet=UNet2DConditionModel(**{key: value for key, value in TVT_UNET_STAND_IN.items()
                                                   if not key.startswith("_")}).eval(), vae=build_vaed4().eval())
    report(f"TVT: {sum(parameter.numel() for parameter in model.unet.parameters()) / 1e6:.1f}M-parameter stand-in "
           f"UNet, {sum(parameter.numel() for parameter in model.vae.parameters()) / 1e6:.1f}M VAE, random")
    states = torch.randn(1, 77, 1024)
    image = torch.rand(1, 3, mode["tvt_size"], mode["tvt_size"], generator=torch.Generator().manual_seed(2))
    megapixels = (SCALE * mode["tvt_size"]) ** 2 / 1e6
    seconds = median_seconds(lambda: tvt_upscale_image(model, states, image), mode["runs"])
    report(f"tvt ×4 of {mode['tvt_size']}²: {seconds:.3f} s, {seconds / megapixels:.3f} s per output megapixel")
    large = torch.rand(1, 3, mode["tvt_tiled_size"], mode["tvt_tiled_size"], generator=torch.Generator().manual_seed(3))
    started = time.perf_counter()
    growth, result = resident_growth_mib(lambda: tvt_upscale_image(model, states, large))
    tiled_seconds = time.perf_counter() - started
    output_mib = result.numel() * result.element_size() / 2 ** 20
    report(f"TVT tiled ×4 of {mode['tvt_tiled_size']}²: {tiled_seconds:.1f} s, peak resident growth {growth:.0f} MiB "
           f"for a {output_mib:.0f} MiB float32 output")
    return (f"tvt_s_per_mp={seconds / megapixels:.3f} tvt_over_bicubic={seconds / megapixels / bicubic_s_per_mp:.0f}"
            f" tvt_size={mode['tvt_size']} tvt_unet=stand_in tvt_tiled_input={mode['tvt_tiled_size']}"
            f" tvt_tiled_s={tiled_seconds:.1f} tvt_tiled_peak_rss_growth_mib={growth:.0f}"
            f" tvt_tiled_output_mib={output_mib:.0f}")


if __name__ == "__main__":
    main()
