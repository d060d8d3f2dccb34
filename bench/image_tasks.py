"""Image tasks from published weights (issue 26): AdcSR's ×4 against bicubic ×4 on the same inputs, side by side.

AdcSR runs with random full-size weights written in the published layout and read through its loader (speed and
memory do not depend on the values). Two figures:

- **time per output megapixel** of AdcSR Upscale and of bicubic ×4 (``F.interpolate``, clamped), on random
  RGB inputs, the median of the runs after one warm-up each;
- **bounded memory**: the peak resident-memory growth of a tiled ×4 (tile 128, overlap 32) of a 1024² input
  (``--quick``: 512²), beside the size of its float32 output, which is the part that grows with the image.

    python bench/image_tasks.py [--quick]

Ends with ``BENCH image_tasks adcsr_s_per_mp=... bicubic_s_per_mp=... adcsr_over_bicubic=...
tiled_input=... tiled_peak_rss_growth_mib=... tiled_output_mib=...``.
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
from nodes.superres.nodes import adcsr_upscale, sd21_unet_config  # noqa: E402
from tests.tiny_models import write_adcsr_files  # noqa: E402

QUICK = {"size": 128, "runs": 2, "tiled_size": 512}
FULL = {"size": 256, "runs": 3, "tiled_size": 1024}
TILE, OVERLAP = 128, 32  # a CPU-sized tile: a window of 192² attends over 96² tokens at the top level


def bicubic(image: torch.Tensor) -> torch.Tensor:
    return F.interpolate(image, scale_factor=SCALE, mode="bicubic", align_corners=False).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['size']}² timings, a {QUICK['tiled_size']}² "
                                                             f"tiled run")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        network, decoder = write_adcsr_files(folder, sd21_unet_config(), HALF_DECODER_WIDTHS, aliases=False)
        net = load_adcsr(network, decoder, sd21_unet_config())
    report(f"AdcSR: {sum(parameter.numel() for parameter in net.parameters()) / 1e6:.1f}M parameters, random")
    image = torch.rand(1, 3, mode["size"], mode["size"], generator=torch.Generator().manual_seed(0))
    megapixels = (SCALE * mode["size"]) ** 2 / 1e6
    seconds = {"adcsr": median_seconds(lambda: adcsr_upscale(net, image, mode["size"], OVERLAP), mode["runs"]),
               "bicubic": median_seconds(lambda: bicubic(image), mode["runs"])}
    per_mp = {name: value / megapixels for name, value in seconds.items()}
    for name, value in per_mp.items():
        report(f"{name} ×4 of {mode['size']}²: {seconds[name]:.3f} s, {value:.3f} s per output megapixel")

    large = torch.rand(1, 3, mode["tiled_size"], mode["tiled_size"], generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    growth, result = resident_growth_mib(lambda: adcsr_upscale(net, large, TILE, OVERLAP))
    tiled_seconds = time.perf_counter() - started
    output_mib = result.numel() * result.element_size() / 2 ** 20
    report(f"tiled ×4 of {mode['tiled_size']}² (tile {TILE}, overlap {OVERLAP}): {tiled_seconds:.1f} s, peak "
           f"resident growth {growth:.0f} MiB for a {output_mib:.0f} MiB float32 output")
    report(f"BENCH image_tasks adcsr_s_per_mp={per_mp['adcsr']:.3f} bicubic_s_per_mp={per_mp['bicubic']:.4f} "
           f"adcsr_over_bicubic={per_mp['adcsr'] / per_mp['bicubic']:.0f} size={mode['size']} "
           f"tiled_input={mode['tiled_size']} tiled_s={tiled_seconds:.1f} tiled_peak_rss_growth_mib={growth:.0f} "
           f"tiled_output_mib={output_mib:.0f} device=cpu quick={int(args.quick)}")


if __name__ == "__main__":
    main()
