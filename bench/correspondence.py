"""Semantic correspondence (issue #8): dense matching time and memory against brute-force ``torch.cdist``, and
PCK@0.05 of the weight-free descriptor on image pairs related by known warps.

1. **Time per pair.** Two random descriptor maps of 60×60 and of 120×120 cells (the paper's grid, and twice it),
   D channels each (the paper's fused 1536 in full mode; 64 with ``--quick``, so that a 2-core CPU finishes in a
   minute), L2-normalised like fused descriptors. Ours is the whole dense match, :func:`match_dense`: chunked nearest
   neighbours both ways, the mutual-NN confidence and 7×7 window soft-argmax. The peer is the anchor's matcher: a
   plain ``torch.cdist`` of all cells against all, then ``argmin`` (hard nearest neighbour only, one way).
   Interleaved, a warm-up each (on the 60×60 grid), then the median of ``--runs`` runs. ``speedup_vs_cdist_60``
   and ``_120`` are the peer's time over ours on each grid, ``speedup_vs_cdist`` the lower of the two (issue 18's
   target: at least 1 on both).
2. **Peak memory** of one 120×120 match (60×60 with ``--quick``), ours (chunks of at most 2^24 distances, 2^20 on
   the CPU) and the peer's (the whole 14400² distance matrix), each measured in a fresh process as the growth of its
   peak resident memory (CPU) or as ``torch.cuda.max_memory_allocated`` (GPU).
3. **Accuracy.** Dense SIFT (no weights) on seeded multi-scale textures warped by mild homographies and TPS
   (:mod:`nodes.correspondence.synthetic`); ``pck05`` is the mean PCK@0.05 of the dense flow B → A over the pairs.

    python bench/correspondence.py [--quick] [--runs 3] [--device cpu|cuda]

Ends with ``BENCH correspondence pck05=... ms_per_pair_60=... ms_per_pair_120=... speedup_vs_cdist=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nodes.correspondence.features import dense_sift_features  # noqa: E402
from nodes.correspondence.fusion import fuse_pair, l2_normalise  # noqa: E402
from nodes.correspondence.matching import flow_field, match_dense  # noqa: E402
from nodes.correspondence.synthetic import pck, texture, warp_with_truth  # noqa: E402

GRIDS = (60, 120)
FULL_DIMS, QUICK_DIMS = 1536, 64  # the paper's fused descriptor (768 SD + 768 DINOv2); a quick CPU stand-in
PCK_SIZE = {True: 128, False: 240}  # image side; 240 gives the paper's 60-cell grid
WARPS = (("homography", 1.0), ("homography", 1.5), ("tps", 1.0), ("tps", 1.5))


def report(line: str) -> None:
    """The benchmark's only output channel."""
    print(line, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def descriptors(grid: int, dims: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return l2_normalise(torch.randn(dims, grid, grid, generator=generator)).to(device)


def ours(a: torch.Tensor, b: torch.Tensor) -> object:
    grid = (a.shape[1] * 4, a.shape[2] * 4)
    return match_dense(a, b, grid, grid)


def peer(a: torch.Tensor, b: torch.Tensor) -> object:
    return torch.cdist(a.flatten(1).T, b.flatten(1).T).argmin(1)


def interleaved_medians(work: dict[str, Callable[[], object]], runs: int, device: torch.device,
                        warm_up: bool) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in work}
    for call in work.values() if warm_up else ():
        call()
    for _ in range(runs):
        for name, call in work.items():
            _sync(device)
            started = time.perf_counter()
            call()
            _sync(device)
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_mb(kind: str, grid: int, dims: int, device: torch.device) -> float:
    """Peak memory growth of one match in this process (called in a fresh one by :func:`measure_in_child`)."""
    a, b = descriptors(grid, dims, device, 0), descriptors(grid, dims, device, 1)
    call = ours if kind == "ours" else peer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call(a, b)
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    return resident_growth_mib(lambda: call(a, b))[0]


def resident_growth_mib(work: Callable[[], object]) -> tuple[float, object]:
    """How far this process's resident memory peaked above where it stood while ``work`` ran, in MiB, and what
    ``work`` returned (Linux)."""
    before = _resident_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # Linux: resets the peak resident size (VmHWM) to the current one
    result = work()
    return _resident_mib("VmHWM") - before, result


def _resident_mib(field: str) -> float:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise ValueError(f"/proc/self/status has no {field}")


def measure_in_child(kind: str, grid: int, dims: int, device: torch.device) -> float:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", kind, str(grid), str(dims),
                           "--device", device.type], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def pck05(size: int) -> float:
    scores = []
    for seed, (kind, strength) in enumerate(WARPS):
        image = texture(size, seed)
        warped, truth, valid = warp_with_truth(image, kind, strength)
        maps_b, maps_a = dense_sift_features(warped, size), dense_sift_features(image, size)
        descriptor_b, descriptor_a = fuse_pair([(maps_b, maps_a)], [1.0], pca_dims=0)
        flow, _ = flow_field(match_dense(descriptor_b, descriptor_a, (size, size), (size, size)))
        scores.append(pck(flow, truth, valid))
    return statistics.mean(scores)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_DIMS}-d descriptors, 128 px PCK images")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-child", nargs=3, metavar=("KIND", "GRID", "DIMS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.memory_child:
        kind, grid, dims = args.memory_child
        report(f"{peak_memory_mb(kind, int(grid), int(dims), device):.1f}")
        return
    dims = QUICK_DIMS if args.quick else FULL_DIMS
    torch.manual_seed(0)
    timings = {}
    for grid in GRIDS:
        a, b = descriptors(grid, dims, device, 0), descriptors(grid, dims, device, 1)
        # One warm-up per method, on the first grid: it pays for lazy initialisation, which a larger grid does not
        # repeat.
        timings[grid] = interleaved_medians({"ours": lambda: ours(a, b), "cdist": lambda: peer(a, b)}, args.runs,
                                            device, warm_up=grid == GRIDS[0])
        report(f"{grid}x{grid} cells, {dims} d on {device}: ours {timings[grid]['ours']:.1f} ms per pair "
               f"(NN both ways + confidence + soft-argmax), cdist+argmin {timings[grid]['cdist']:.1f} ms")
    memory_grid = GRIDS[0] if args.quick else GRIDS[-1]
    memory_ours = measure_in_child("ours", memory_grid, dims, device)
    memory_peer = measure_in_child("cdist", memory_grid, dims, device)
    report(f"peak memory of one {memory_grid}x{memory_grid} match: ours {memory_ours:.0f} MB, "
           f"cdist {memory_peer:.0f} MB")
    score = pck05(PCK_SIZE[args.quick])
    report(f"PCK@0.05, dense SIFT on {len(WARPS)} warped {PCK_SIZE[args.quick]} px textures: {score:.3f}")
    speedup = {grid: timings[grid]["cdist"] / timings[grid]["ours"] for grid in GRIDS}
    report(f"BENCH correspondence pck05={score:.3f} ms_per_pair_60={timings[60]['ours']:.1f} "
           f"ms_per_pair_120={timings[120]['ours']:.1f} speedup_vs_cdist={min(speedup.values()):.2f} "
           f"speedup_vs_cdist_60={speedup[60]:.2f} speedup_vs_cdist_120={speedup[120]:.2f} "
           f"cdist_ms_per_pair_60={timings[60]['cdist']:.1f} cdist_ms_per_pair_120={timings[120]['cdist']:.1f} "
           f"peak_mb={memory_ours:.0f} cdist_peak_mb={memory_peer:.0f} memory_grid={memory_grid} dims={dims} "
           f"gpu={int(device.type == 'cuda')} quick={int(args.quick)}")


if __name__ == "__main__":
    main()
