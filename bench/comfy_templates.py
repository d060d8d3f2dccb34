"""ComfyUI's own example workflows through Atelier's CLI, all twelve of issue 17, timed one by one.

The files come from ``comfyui-workflow-templates`` 0.1.95 and run unchanged; every model, LoRA, VAE, embedding
and image they name is written as ``tests/test_comfy_templates.py`` writes them (random weights of each family's
layout at a UNet width of 32). ``area_composition`` is here and not in the test: it samples 704×1280 and then
1088×1920, minutes per step on two CPU cores.

    python bench/comfy_templates.py [--quick]

``--quick`` runs the eleven the test runs. Ends with ``BENCH comfy_templates ok=... failed=... total_s=...
slowest=... slowest_s=... quick=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from test_comfy_templates import (TEMPLATES, TOO_SLOW_FOR_TESTS, run_template, saved_images,  # noqa: E402
                                  write_template_files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the templates the test runs")
    args = parser.parse_args()
    names = [name for name in TEMPLATES if not (args.quick and name in TOO_SLOW_FOR_TESTS)]
    seconds, failed = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        models, data = os.path.join(scratch, "models"), os.path.join(scratch, "data")
        write_template_files(models, data)
        for name in names:
            output = os.path.join(data, "output", name)
            errors = io.StringIO()
            started = time.perf_counter()
            with contextlib.redirect_stderr(errors):
                code = run_template(name, models, data, output)
            seconds[name] = time.perf_counter() - started
            ok = code == 0 and bool(saved_images(output))
            if not ok:
                failed.append(name)
            print(f"{name:<40} {'ok' if ok else 'FAILED'} {seconds[name]:8.1f} s", flush=True)
            if not ok:
                print(errors.getvalue()[-2000:], flush=True)
    slowest = max(seconds, key=seconds.get)
    print(f"BENCH comfy_templates ok={len(names) - len(failed)} failed={len(failed)} total_s={sum(seconds.values()):.1f} "
          f"slowest={slowest} slowest_s={seconds[slowest]:.1f} quick={int(args.quick)}")


if __name__ == "__main__":
    main()
