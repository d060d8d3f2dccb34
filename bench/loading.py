"""Real layouts: single files with random weights load offline and run one UNet step and a decode at 64×64.

For each family a single ``.safetensors`` file in the published layout (float16 on disk, as released checkpoints
are) is written by ``export.write_random_single_file``, loaded by ``load_model`` with ``HF_HUB_OFFLINE=1`` and the
shipped (or shape-derived) configs and tokenizers only; then a prompt is encoded, the UNet is called once on a
64×64 image's latent (with the mask and masked-image channels of an inpainting model, and SDXL's added
conditioning) and the result is decoded. There is no peer: this is the real-layout check, timed.

    python bench/loading.py [--quick] [--families sd1 sd1_inpainting sd2_768v sdxl sdxl_refiner] [--width W]

``--quick`` checks SD1.5 only (about 12 s on 2 idle CPU cores); the default checks SD1.5 and SDXL (SDXL peaks at
about 21 GB of memory in float32 on the CPU, while the file's tensors and the model coexist during loading).
``--width`` writes the families' layouts at reduced width instead (a multiple of 32). Ends with
``BENCH loading <name>_load_s=... <name>_step_s=... ...``.
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

import torch  # noqa: E402

from nodes.models.export import write_random_single_file  # noqa: E402
from nodes.models.loaded import LoadedModel  # noqa: E402
from nodes.models.loader import load_model, unload_all  # noqa: E402

SIZE = 64  # the check: one step at 64×64
# name → (family, writer options)
CHECKS = {
    "sd1": ("sd1", {}),
    "sd1_inpainting": ("sd1", {"unet_in_channels": 9}),
    "sd2_768v": ("sd2", {"prediction_type": "v_prediction"}),
    "sdxl": ("sdxl", {}),
    "sdxl_refiner": ("sdxl_refiner", {}),
}


def one_step(model: LoadedModel, prompt: str) -> torch.Tensor:
    """Encode ``prompt``, call the UNet once at 64×64 and decode its output; returns the image (1, 3, SIZE, SIZE)."""
    latent_size = SIZE // 8
    with torch.no_grad():
        encoded = []
        for tokenizer, encoder in zip(model.tokenizers, model.text_encoders, strict=True):
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids.to(model.device)
            encoded.append(encoder(ids, output_hidden_states=True))
        context = torch.cat([output.hidden_states[-2] for output in encoded], dim=-1).to(model.dtype)
        extra = {}
        if model.family.startswith("sdxl"):  # pooled text, then size and crop (base) or size, crop, score (refiner)
            ids = [SIZE, SIZE, 0, 0, SIZE, SIZE] if model.family == "sdxl" else [SIZE, SIZE, 0, 0, 6.0]
            extra["added_cond_kwargs"] = {"text_embeds": encoded[-1].text_embeds.to(model.dtype),
                                          "time_ids": torch.tensor([ids], device=model.device, dtype=model.dtype)}
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(1, model.unet_in_channels, latent_size, latent_size, generator=generator)
        timestep = torch.tensor([999], device=model.device)
        out = model.unet(sample.to(model.device, model.dtype), timestep, context, **extra).sample
        image = model.vae.decode(out.to(model.vae.dtype) / model.vae.config.scaling_factor).sample
    return image


def check(name: str, folder: str, width: int | None) -> dict[str, float]:
    family, options = CHECKS[name]
    path = os.path.join(folder, f"random_{name}.safetensors")
    start = time.perf_counter()
    write_random_single_file(family, path, width=width, **options)
    written = time.perf_counter()
    model = load_model(path)
    loaded = time.perf_counter()
    image = one_step(model, "a red circle on a blue background")
    stepped = time.perf_counter()
    if tuple(image.shape) != (1, 3, SIZE, SIZE) or not torch.isfinite(image).all():
        raise RuntimeError(f"{name}: decoded image has shape {tuple(image.shape)} or non-finite values; expected "
                           f"(1, 3, {SIZE}, {SIZE})")
    result = {"file_gb": os.path.getsize(path) / 1e9, "write_s": written - start, "load_s": loaded - written,
              "step_s": stepped - loaded}
    os.remove(path)
    unload_all()
    return result


def report(line: str) -> None:
    """The benchmark's one way to stdout."""
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SD1.5 only")
    parser.add_argument("--families", nargs="+", choices=sorted(CHECKS), help="default: sd1 and sdxl")
    parser.add_argument("--width", type=int, default=None, help="the UNet's first width (default: the published)")
    args = parser.parse_args()
    names = args.families or (["sd1"] if args.quick else ["sd1", "sdxl"])
    figures = {}
    with tempfile.TemporaryDirectory(prefix="atelier_bench_") as folder:
        for name in names:
            result = check(name, folder, args.width)
            report(f"{name}: {result['file_gb']:.2f} GB file written in {result['write_s']:.1f} s, loaded offline "
                   f"in {result['load_s']:.1f} s, prompt + 1 UNet call + decode at {SIZE}x{SIZE} in "
                   f"{result['step_s']:.1f} s")
            figures.update({f"{name}_{key}": value for key, value in result.items()})
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fields = " ".join(f"{key}={value:.2f}" for key, value in figures.items())
    report(f"BENCH loading {fields} peak_rss_mib={peak_mib:.0f}")


if __name__ == "__main__":
    main()
