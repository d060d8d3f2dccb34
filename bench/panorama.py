"""Panorama projection (issue #7): ERP -> 18 tangent planes and the merge back, against py360convert and
pytorch360convert.

A 4096×2048 float32 ERP of the synthetic texture (``synthetic_panorama``, frequency 24) goes to OmniSSR's 18 planes
of 512², FOV 66.41°, bilinear (``--quick``: 2048×1024 to 18 × 256²). The three e2p implementations run interleaved
in one process, after a warm-up call each (so py360convert's LRU-cached sampler, and our cached grid, are warm;
pytorch360convert rebuilds its grid on every call by design), and the medians of the runs are compared. The peers
have no inverse, so the merge (``planes_to_erp``) is timed alone. Our one-off setup (grid and merge tables) is
reported separately. ``roundtrip_db`` is the WS-PSNR of ERP -> planes -> ERP against the input. ``agree_db`` is the
PSNR between our planes and py360convert's: the two differ by the pixel-centre convention only.

    python bench/panorama.py [--quick] [--runs N]

Ends with ``BENCH panorama e2p_speedup_vs_py360convert=... e2p_speedup_vs_pytorch360convert=... merge_s=...
roundtrip_db=...``; the issue's targets are a speedup of at least 3 over py360convert and merge_s <= 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import py360convert  # noqa: E402
import pytorch360convert  # noqa: E402
import torch  # noqa: E402

from nodes.panorama.metrics import ws_psnr  # noqa: E402
from nodes.panorama.projection import erp_to_planes, omnissr_layout, planes_to_erp, synthetic_panorama  # noqa: E402

FREQUENCY = 24.0  # the round-trip test's texture
MIN_RUNS = 7  # the issue: medians of at least 7 interleaved runs


def say(line: str) -> None:
    print(line, flush=True)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2048×1024 to 256² planes, for a check within 60 s")
    parser.add_argument("--runs", type=int, default=MIN_RUNS, help=f"interleaved runs per case, at least {MIN_RUNS}")
    args = parser.parse_args()
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be at least {MIN_RUNS}; got {args.runs}")
    height, size = (1024, 256) if args.quick else (2048, 512)
    layout = omnissr_layout(size)
    erp = synthetic_panorama(height, FREQUENCY)
    erp_hwc = np.ascontiguousarray(erp[0].permute(1, 2, 0).numpy())
    erp_chw = erp[0]

    setup = timed(lambda: planes_to_erp(erp_to_planes(erp, layout), layout, height))
    say(f"ERP {2 * height}x{height} -> 18 x {size}^2, FOV {layout.fov_deg:.2f}, bilinear, float32, "
        f"{torch.get_num_threads()} torch threads; our one-off setup (grid + merge tables) {setup:.2f} s")

    def ours() -> torch.Tensor:
        return erp_to_planes(erp, layout)

    def py360() -> list[np.ndarray]:
        return [py360convert.e2p(erp_hwc, layout.fov_deg, lon, lat, (size, size), mode="bilinear")
                for lon, lat in layout.centres]

    def torch360() -> list[torch.Tensor]:
        return [pytorch360convert.e2p(erp_chw, layout.fov_deg, lon, lat, (size, size), mode="bilinear")
                for lon, lat in layout.centres]

    planes = ours()
    cases = {"ours": ours, "py360convert": py360, "pytorch360convert": torch360,
             "ours merge": lambda: planes_to_erp(planes, layout, height)}
    for case in cases.values():
        case()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, case in cases.items():
            times[name].append(timed(case))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        say(f"{name:>18}: median {median[name]:.3f} s, min {min(values):.3f}, max {max(values):.3f} "
            f"({args.runs} runs)")

    peer = torch.from_numpy(np.stack(py360())).permute(0, 3, 1, 2)
    agree_db = 10 * torch.log10(1 / ((peer - planes[0]) ** 2).mean()).item()
    roundtrip_db = ws_psnr(planes_to_erp(planes, layout, height), erp).item()
    say(f"planes vs py360convert: {agree_db:.1f} dB PSNR (pixel-centre convention); round trip WS-PSNR "
        f"{roundtrip_db:.2f} dB")
    say(f"BENCH panorama e2p_speedup_vs_py360convert={median['py360convert'] / median['ours']:.2f} "
        f"e2p_speedup_vs_pytorch360convert={median['pytorch360convert'] / median['ours']:.2f} "
        f"merge_s={median['ours merge']:.3f} roundtrip_db={roundtrip_db:.2f} e2p_s={median['ours']:.3f} "
        f"setup_s={setup:.2f} agree_db={agree_db:.1f} quick={int(args.quick)}")


if __name__ == "__main__":
    main()
