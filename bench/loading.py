"""Real layouts: full-size single files with random weights load offline and run one sampler step at 64×64.

For each family a full-size original-layout ``.safetensors`` file (float16 on disk, as released checkpoints
are) is written from the shipped configs, loaded by ``load_model`` with ``HF_HUB_OFFLINE=1`` and the shipped
configs and tokenizers only, then a prompt is encoded and one Euler step is sampled and decoded at 64×64
through the generation nodes. There is no peer: this is the issue's real-layout check, timed.

    python bench/loading.py [--quick] [--families sd1 sd2 sdxl]

``--quick`` checks SD1.5 only (about 12 s on 2 CPU cores); the default checks SD1.5 and SDXL (SDXL peaks at
about 21 GB of memory in float32 on the CPU, while the file's tensors and the model coexist during loading). Ends with ``BENCH loading <family>_load_s=... <family>_step_s=... ...``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers is imported: nothing may reach a hub

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nodes.generation.nodes import (AtelierSampler, AtelierTextEncode, AtelierVAEDecode,  # noqa: E402
                                    ModelRef)
from nodes.common.denoiser import DiffusersCodec  # noqa: E402
from nodes.generation.latents import empty_latent  # noqa: E402
from nodes.models.export import write_random_single_file  # noqa: E402
from nodes.models.loading import load_model, unload_all  # noqa: E402

SIZE = 64  # the check: one step at 64×64


def check(family: str, folder: str) -> dict[str, float]:
    path = os.path.join(folder, f"random_{family}.safetensors")
    start = time.perf_counter()
    write_random_single_file(family, path)
    written = time.perf_counter()
    model = load_model(path)
    loaded = time.perf_counter()
    clip = ModelRef(model)
    (positive,) = AtelierTextEncode().encode(clip, "a red circle on a blue background", "auto")
    (negative,) = AtelierTextEncode().encode(clip, "", "auto")
    (latent,) = AtelierSampler().sample(ModelRef(model), positive, negative,
                                        {"samples": empty_latent(1, 4, SIZE, SIZE)}, seed=0, steps=1, cfg=7.5,
                                        sampler_name="euler", scheduler="normal", denoise=1.0, momentum=0.0)
    (image,) = AtelierVAEDecode().decode(latent, DiffusersCodec(model.vae), tiled=False, tile_size=512, overlap=64)
    stepped = time.perf_counter()
    if tuple(image.shape) != (1, SIZE, SIZE, 3):
        raise RuntimeError(f"{family}: decoded image has shape {tuple(image.shape)}, expected (1, {SIZE}, {SIZE}, 3)")
    result = {"file_gb": os.path.getsize(path) / 1e9, "write_s": written - start, "load_s": loaded - written,
              "step_s": stepped - loaded}
    os.remove(path)
    unload_all()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SD1.5 only")
    parser.add_argument("--families", nargs="+", choices=("sd1", "sd2", "sdxl"), help="default: sd1 and sdxl")
    args = parser.parse_args()
    families = args.families or (["sd1"] if args.quick else ["sd1", "sdxl"])
    figures = {}
    with tempfile.TemporaryDirectory(prefix="atelier_bench_") as folder:
        for family in families:
            result = check(family, folder)
            print(f"{family}: {result['file_gb']:.1f} GB file written in {result['write_s']:.1f} s, loaded offline in "
                  f"{result['load_s']:.1f} s, prompt + 1 step + decode at {SIZE}x{SIZE} in {result['step_s']:.1f} s",
                  flush=True)
            figures.update({f"{family}_{key}": value for key, value in result.items()})
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fields = " ".join(f"{key}={value:.2f}" for key, value in figures.items())
    print(f"BENCH loading {fields} peak_rss_mib={peak_mib:.0f}")


if __name__ == "__main__":
    main()
