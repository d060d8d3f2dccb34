"""Issue 17's parity sweep: the same prompt, checkpoint and seed through real ComfyUI and through Atelier.

ComfyUI v0.3.64 (``--comfyui``, default ``$ATELIER_COMFYUI`` or ``../shared/comfyui``) runs as a server from its
own venv (``tests/comfyui_host.py``, float32 everywhere); Atelier runs the same API prompt through its executor in
this process. The checkpoint is a full-size random-weight SD1.5 single file (``tests/comfyui_fixtures.py``, its
UNet output scaled by ``PARITY_OUTPUT_GAIN`` so that the image depends on the update rule); the prompt is ComfyUI's
default text-to-image graph at 64×64, 4 steps, CFG 7 (``tests/comfyui_parity.py``). For every pair it prints the
PSNR between ComfyUI's and Atelier's images (target >= 40 dB), and, as the measure of what the comparison can
tell apart, the PSNR between Atelier's image for that pair and for euler/normal.

    python bench/comfy_parity.py [--quick] [--comfyui PATH]

The full sweep is every sampler of issue 17 with the normal scheduler and every scheduler with euler (24 pairs,
about 10 minutes on 2 CPU cores once ComfyUI's venv exists); ``--quick`` runs the six pairs of the test. Ends with
``BENCH comfy_parity min_psnr_db=... median_psnr_db=... pairs=... below_target=... quick=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from comfyui_fixtures import PARITY_OUTPUT_GAIN, write_default_init_sd15  # noqa: E402
from comfyui_host import COMFYUI_PATH_VARIABLE, ComfyUIServer, prepare_environment  # noqa: E402
from comfyui_parity import (PAIRS, TARGET_PSNR_DB, TEST_PAIRS, AtelierRunner, only_image, psnr,  # noqa: E402
                            txt2img_prompt)

CHECKPOINT = "random_sd15.safetensors"
REFERENCE_PAIR = ("euler", "normal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the test's pairs")
    parser.add_argument("--comfyui", default=os.environ.get(COMFYUI_PATH_VARIABLE,
                                                            os.path.join(ROOT, "..", "shared", "comfyui")),
                        help="ComfyUI v0.3.64's source tree")
    args = parser.parse_args()
    pairs = TEST_PAIRS if args.quick else PAIRS

    started = time.monotonic()
    environment = prepare_environment(os.path.abspath(args.comfyui))
    print(f"ComfyUI venv ready in {environment.setup_seconds:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        models = os.path.join(scratch, "models")
        os.makedirs(os.path.join(models, "checkpoints"))
        write_default_init_sd15(os.path.join(models, "checkpoints", CHECKPOINT), output_gain=PARITY_OUTPUT_GAIN)
        atelier = AtelierRunner(models, os.path.join(scratch, "atelier"))
        reference = only_image(atelier.run(txt2img_prompt(CHECKPOINT, *REFERENCE_PAIR, prefix="reference")))
        results = {}
        with ComfyUIServer(environment, os.path.join(scratch, "comfyui"), models) as server:
            print(f"{'sampler':<20} {'scheduler':<17} {'vs ComfyUI dB':>13} {'vs euler/normal dB':>19}", flush=True)
            for sampler_name, scheduler in pairs:
                prompt = txt2img_prompt(CHECKPOINT, sampler_name, scheduler, prefix=f"{sampler_name}-{scheduler}")
                ours = only_image(atelier.run(prompt))
                results[sampler_name, scheduler] = value = psnr(ours, only_image(server.run(prompt)))
                print(f"{sampler_name:<20} {scheduler:<17} {value:13.2f} {psnr(ours, reference):19.2f}", flush=True)
    values = list(results.values())
    below = [f"{sampler}/{scheduler}" for (sampler, scheduler), value in results.items() if value < TARGET_PSNR_DB]
    print(f"{len(values)} pairs in {time.monotonic() - started:.0f} s; below {TARGET_PSNR_DB} dB: {below or 'none'}")
    print(f"BENCH comfy_parity min_psnr_db={min(values):.2f} median_psnr_db={statistics.median(values):.2f} "
          f"pairs={len(values)} below_target={len(below)} quick={int(args.quick)}")


if __name__ == "__main__":
    main()
