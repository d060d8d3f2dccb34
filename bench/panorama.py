"""Panorama projection (issue #7): ERP -> 18 tangent planes and the merge back, against py360convert and
pytorch360convert.

A 4096×2048 float32 ERP of the synthetic texture (``synthetic_panorama``, frequency 24) goes to OmniSSR's 18 planes
of 512², FOV 66.41°, bilinear (``--quick``: 2048×1024 to 18 × 256²). The three e2p implementations run interleaved
in one process, and the medians of the runs are compared:

- **warm**: after a warm-up call each, so our cached grid is warm. py360convert caches its samplers in an LRU of 8,
  which 18 planes in turn always miss, so each of its calls builds them again; pytorch360convert rebuilds its grid on
  every call by design.
- **cold** (``cold_speedup``): the first call, setup included: our caches and py360convert's are cleared before each
  of its runs. ``merge_table_s`` is the merge tables' build alone (caches cleared), ``merge_s`` the warm merge.

The peers have no inverse, so the merge (``planes_to_erp``) is timed alone. ``roundtrip_db`` is the WS-PSNR of
ERP -> planes -> ERP against the input. ``agree_db`` is the PSNR between our planes and py360convert's: the two
differ by the pixel-centre convention only. ``*_cpu_s`` fields are process CPU seconds (all threads), which a
loaded machine inflates less than wall time.

    python bench/panorama.py [--quick] [--runs N]

Ends with ``BENCH panorama e2p_speedup_vs_py360convert=... e2p_speedup_vs_pytorch360convert=... cold_speedup=...
merge_s=... merge_table_s=... roundtrip_db=...``; the issues' targets: a warm speedup of at least 3 over
py360convert (issue 7), a cold one of at least 2, merge_s <= 1 and merge_table_s <= 1 (issue 18).
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
from nodes.panorama import projection  # noqa: E402
from nodes.panorama.projection import erp_to_planes, omnissr_layout, planes_to_erp, synthetic_panorama  # noqa: E402

FREQUENCY = 24.0  # the round-trip test's texture
MIN_RUNS = 7  # the issue: medians of at least 7 interleaved runs


def say(line: str) -> None:
    print(line, flush=True)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def cpu_timed(function: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def clear_setup_caches() -> None:
    """Forgets our grids and merge tables and py360convert's samplers, so that the next calls are first calls."""
    projection._e2p_grid.cache_clear()
    projection._merge_tables.cache_clear()
    py360convert.utils.EquirecSampler.from_perspective.__func__.cache_clear()


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
        f"{torch.get_num_threads()} torch threads; our first round trip (grid and merge tables built) {setup:.2f} s")

    def ours() -> torch.Tensor:
        return erp_to_planes(erp, layout)

    def py360() -> list[np.ndarray]:
        return [py360convert.e2p(erp_hwc, layout.fov_deg, lon, lat, (size, size), mode="bilinear")
                for lon, lat in layout.centres]

    def torch360() -> list[torch.Tensor]:
        return [pytorch360convert.e2p(erp_chw, layout.fov_deg, lon, lat, (size, size), mode="bilinear")
                for lon, lat in layout.centres]

    def merge_table() -> None:
        projection._merge_tables(layout, height, erp.device, erp.dtype)

    cold_cases = {"ours": ours, "py360convert": py360, "merge table": merge_table}
    cold: dict[str, list[tuple[float, float]]] = {name: [] for name in cold_cases}
    for _ in range(args.runs):
        for name, case in cold_cases.items():
            clear_setup_caches()
            cold[name].append(cpu_timed(case))
    cold_median = {name: statistics.median(wall for wall, _ in values) for name, values in cold.items()}
    cold_cpu = {name: statistics.median(cpu for _, cpu in values) for name, values in cold.items()}
    for name, values in cold.items():
        say(f"{'cold ' + name:>18}: median {cold_median[name]:.3f} s ({cold_cpu[name]:.3f} CPU s), "
            f"min {min(wall for wall, _ in values):.3f}, max {max(wall for wall, _ in values):.3f} ({args.runs} runs)")

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
        f"cold_speedup={cold_median['py360convert'] / cold_median['ours']:.2f} "
        f"merge_s={median['ours merge']:.3f} merge_table_s={cold_median['merge table']:.3f} "
        f"merge_table_cpu_s={cold_cpu['merge table']:.3f} roundtrip_db={roundtrip_db:.2f} e2p_s={median['ours']:.3f} "
        f"cold_e2p_s={cold_median['ours']:.3f} cold_e2p_cpu_s={cold_cpu['ours']:.3f} "
        f"py360convert_cold_s={cold_median['py360convert']:.3f} setup_s={setup:.2f} agree_db={agree_db:.1f} "
        f"threads={torch.get_num_threads()} quick={int(args.quick)}")


if __name__ == "__main__":
    main()
