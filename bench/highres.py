"""Tiled 16K generator (issue #6): UNet tile calls per step, and wall time and memory by output size.

(a) **Tile calls per step**, shifted mode (FSTD-style, seeded offset cycle, stride T/2) against each overlapped
    method at its own paper's default, on a 1024² latent (8K px) with SD1.5's 64-latent tile: MultiDiffusion at
    stride 8 (overlap 56, its official ``get_views``), Mixture of Diffusers at overlap 32 (its pipeline's
    ``tile_row_overlap=256`` px of a 512 px tile), and a quarter-tile overlap (16: ``TileSettings``' default, the
    low end of the A1111 wiki's 16–32 for Mixture of Diffusers) as a third line. Counted from the tile plans the tiled denoiser runs (no model needed), as the mean over
    one offset cycle. ``tile_call_ratio_<baseline>`` = that baseline's calls / shifted calls (target ≥ 1.5 against
    the quarter-tile overlap, the cheapest of the three).
(b) **Wall time and peak RSS by output size** with the shipped embedded model (a tiny SD1-layout model trained at
    64 px, so its tiles are 64 px: 8 latent): a direct text-to-image run (shifted tiles, ``--steps`` steps,
    CFG 1), then the tiled VAE decode streamed into the IMAGE buffer. Sizes run in increasing order in one process,
    so the process's peak RSS after each size is that size's peak. ``work_mb`` = peak RSS − RSS before the first
    size − the float32 output image: the memory beyond the output buffer. ``mem_growth_4k_to_16k_mb`` is its growth
    from 4K to 16K (quick mode runs 256 and 512 px at one step, reports their growth, and prints nan for it).
    Up to 1024 px the tiled VAE's statistics pass decodes the whole image once (exact GroupNorm statistics), so
    work memory grows up to 1024 px and stays flat above it, where that pass runs on a 1024 px copy.
    ``s_per_mpix`` is the largest size's wall time per output megapixel.
(c) A 16K image: ``--sizes 16384`` (59 min on this shared 2-core CPU at one step, bfloat16 decode).

There is no peer to run side by side here: ComfyUI-TiledDiffusion and LinFusion are not installable (highres.md
§6); (a) compares our modes on the same plans.

    python bench/highres.py [--quick] [--sizes 1024 2048 4096 8192 16384] [--steps 2] [--decode-precision auto]

Ends with ``BENCH highres tile_call_ratio_multidiffusion=... tile_call_ratio_mixture=... tile_call_ratio_quarter=...
mem_growth_4k_to_16k_mb=... s_per_mpix=...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nodes.common.denoiser import Conditioning, DiffusersCodec, DiffusersDenoiser  # noqa: E402
from nodes.common.tiled_vae import DECODE_PRECISIONS, decode_dtype, tiled_decode  # noqa: E402
from nodes.models.text import encode_prompt  # noqa: E402
from nodes.highres.generate import generate_large, plan_stages  # noqa: E402
from nodes.highres.tiling import TileSettings, tile_calls_per_step  # noqa: E402
from nodes.models.loading import load_checkpoint  # noqa: E402

EMBEDDED = "atelier_embedded_sd1.safetensors"
PROMPT = "a small red circle on the left over a blue background"


def report(line: str) -> None:
    """The benchmark's one way to write a result line."""
    print(line, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# (name, mode, overlap in latent px) of each overlapped baseline, on SD1.5's 64-latent tile.
BASELINES = (
    ("multidiffusion", "multidiffusion", 56),  # Source: MultiDiffusion's get_views, window 64, stride 8
    ("mixture", "mixture", 32),  # Source: Mixture of Diffusers' tile 512 px, tile_row/col_overlap 256 px
    ("quarter", "multidiffusion", 16),  # TileSettings' default overlap, a quarter tile (highres.md §3)
)


def tile_call_ratios() -> tuple[float, dict[str, tuple[int, float]]]:
    """Shifted calls per step, and each baseline's (overlap, calls per step) on a 1024² latent, tile 64."""
    steps = 4  # one offset cycle: (64 / 32)² offsets
    shifted = tile_calls_per_step(1024, 1024, TileSettings("shifted", tile=64, overlap=0, offset_stride=32), steps)
    baselines = {name: (overlap, tile_calls_per_step(1024, 1024, TileSettings(mode, tile=64, overlap=overlap), steps))
                 for name, mode, overlap in BASELINES}
    return shifted, baselines


def run_size(model, codec: DiffusersCodec, positive: Conditioning, negative: Conditioning, size: int,
             steps: int, decode_precision: str) -> tuple[float, float]:
    """(wall seconds, tiles per step) of one direct text-to-image run and streamed tiled decode at size²."""
    start = time.perf_counter()
    stages = plan_stages("sd1", size, size, "direct", steps, size, codec.downscale)
    settings = TileSettings("shifted", tile=8, overlap=0, tile_batch_size=64, offset_stride=4)
    latent, reports = generate_large(DiffusersDenoiser(model.unet, model.schedule), codec, "sd1", positive,
                                     negative, stages, 0, steps, 1.0, "euler", "normal", settings)
    image = torch.empty(1, size, size, 3)
    tiled_decode(codec, latent, 64, 8, out=image.permute(0, 3, 1, 2), dtype=decode_dtype(decode_precision, codec))
    return time.perf_counter() - start, reports[0].tiles_per_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 256 and 512 px, one step")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="auto",
                        help="the tiled decode's precision (the generator node's vae_precision)")
    parser.add_argument("--models-dir", default=os.path.join("/tmp", "atelier_bench_models"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = [256, 512] if args.quick else sorted(args.sizes)
    steps = 1 if args.quick else args.steps

    shifted, baselines = tile_call_ratios()
    ratios = {name: calls / shifted for name, (_, calls) in baselines.items()}
    report(f"(a) tile calls per step, 1024² latent, tile 64: shifted {shifted:g}")
    for name, (overlap, calls) in baselines.items():
        report(f"    {name} (overlap {overlap}): {calls:g} calls, ratio {ratios[name]:.3f}")

    model = load_checkpoint(EMBEDDED, args.models_dir)
    codec = DiffusersCodec(model.vae)
    positive, negative = (encode_prompt(model.tokenizers, model.text_encoders, "sd1", text) for text in (PROMPT, ""))
    run_size(model, codec, positive, negative, 64, 1, args.decode_precision)  # warm-up
    baseline = current_rss_mb()
    report("(b) size_px  wall_s  tiles_per_step  peak_rss_mb  output_mb  work_mb")
    work, seconds = {}, {}
    for size in sizes:
        seconds[size], tiles = run_size(model, codec, positive, negative, size, steps, args.decode_precision)
        output_mb = size * size * 3 * 4 / 2 ** 20
        work[size] = peak_rss_mb() - baseline - output_mb
        report(f"    {size:6d}  {seconds[size]:6.1f}  {tiles:14g}  {peak_rss_mb():11.0f}  {output_mb:9.0f}  "
               f"{work[size]:7.0f}")
    growth = work[16384] - work[4096] if {4096, 16384} <= work.keys() else float("nan")
    largest = sizes[-1]
    s_per_mpix = seconds[largest] / (largest * largest / 1e6)
    small_growth = (f" mem_growth_{sizes[0]}px_to_{largest}px_mb={work[largest] - work[sizes[0]]:.0f}"
                    if len(sizes) > 1 else "")
    ratio_fields = " ".join(f"tile_call_ratio_{name}={ratio:.3f}" for name, ratio in ratios.items())
    report(f"BENCH highres {ratio_fields} mem_growth_4k_to_16k_mb={growth:.0f} "
           f"s_per_mpix={s_per_mpix:.2f}{small_growth} steps={steps} decode={args.decode_precision} "
           f"quick={int(args.quick)}")


if __name__ == "__main__":
    main()
