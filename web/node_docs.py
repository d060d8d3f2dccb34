"""The node help pages ComfyUI's frontend shows: ``js/docs/<NodeName>.md``, one per node of the pack.

The frontend fetches ``/extensions/<pack>/docs/<NodeName>.md`` (``WEB_DIRECTORY`` is ``js/``) and shows it in
place of the node's description. The pages are generated from each node's own definition, so a tooltip has one
source; only the short "paper / departures" notes below are written by hand. Regenerate after changing a node:

    python -m web.node_docs
"""

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import nodes

DOCS_DIR = Path(__file__).resolve().parent.parent / "js" / "docs"
REGENERATE_COMMAND = "python -m web.node_docs"

# Per technique (the node's module): the README section it is described in, and 1-3 lines on the paper and where
# Atelier departs from it. The README holds the full account; these lines only point there.
TECHNIQUE_NOTES: dict[str, tuple[str, str]] = {
    "nodes.loaders.nodes": ("The embedded model",
                            "Atelier's own tiny SD 1.x-layout model, trained from scratch, so every workflow runs "
                            "with no download; not a published checkpoint. Load Checkpoint + UNet File serves the "
                            "few-step models published as a UNet alone (see their README section)."),
    "nodes.generation.nodes": ("Generating images",
                               "ComfyUI's core sampling, with extra solvers (HB-PLMS, GHVB, heavy-ball DPM++ 2M) "
                               "and the F-scheduler; workflows saved by ComfyUI run unchanged."),
    "nodes.highres.nodes": ("Tiled 16K generator (highres): tiled diffusion, LinFusion, streaming tiled VAE",
                            "Mixture of Diffusers, MultiDiffusion and FSTD-style shifted tiles, LinFusion "
                            "attention and a streaming tiled VAE; the tile blends are exact partitions of unity."),
    "nodes.panorama.nodes": ("360° panoramas: tangent planes and WS-PSNR (`atelier/panorama`)",
                             "OmniSSR (Li et al., ECCV 2024), `multi_viewer.py`: one pixel-centre convention both "
                             "ways, so an ERP ↔ tangent-plane round trip needs no pre-upsampling."),
    "nodes.correspondence.nodes": ("Semantic correspondence (SD + DINOv2 feature fusion)",
                                   "\"A Tale of Two Features\" (Zhang et al., NeurIPS 2023), rebuilt without ODISE "
                                   "or detectron2; adds window soft-argmax, a mutual-NN confidence, a feature cache "
                                   "and a weight-free dense SIFT descriptor."),
    "nodes.watermark.nodes": ("Invisible watermarks (`atelier/watermark`)",
                              "Gaussian Shading (CVPR 2024), Tree-Ring and Safe-SD's trigger word, without "
                              "training; one key per user with a fresh nonce per image, and χ² tests on ring means "
                              "so the null is calibrated (see \"Departures from the papers\")."),
    "nodes.noiseshift.nodes": ("NoiseShift: the noise level at other resolutions (`atelier/noiseshift`)",
                               "NoiseShift (techniques.md row 29; no official code): a grid-searched noise-level "
                               "table per model and resolution, applied as a model-sampling patch; calibrated on a "
                               "σ grid rather than per sampler step, on SD UNets rather than flow models."),
    "nodes.router.nodes": ("The prompt router",
                           "After APTP (ICLR 2025): routes each prompt to one of your pipeline variants under a "
                           "compute budget, with no training; prompts are embedded by the checkpoint's own text "
                           "encoder."),
    "nodes.fewstep.nodes": ("Few-step models from published weights (`atelier/fewstep`)",
                            "Hyper-SD (ByteDance, 2024): the authors' LoRAs with their model card's sampler, steps "
                            "and guidance, schedules ending at σ 0 as ComfyUI's (diffusers' last step stops at "
                            "ᾱ_0). InstaFlow (ICLR 2024): Euler on the flow, the authors' loop exactly. KOALA: the "
                            "authors' Euler settings; the base models' scheduler is assumed to be SDXL's. "
                            "Rectified Diffusion (2024): the authors' trailing DDIM on their betas (linear for rd and "
                            "cm), schedules ending at σ 0; default steps chosen among those they evaluated. "
                            "SpeedUpNet (ECCV 2024): the official processor's rule and DPM-Solver++ on trailing "
                            "steps; its attention norms taken per sample rather than over the batch."),
}


def readme_anchor(heading: str) -> str:
    """GitHub's anchor for a README heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`" if not isinstance(value, str) or value else "(empty)"


def _input_row(name: str, spec: tuple) -> str:
    kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    if isinstance(kind, (list, tuple)):
        shown = ", ".join(f"`{choice}`" for choice in kind[:12]) + (", …" if len(kind) > 12 else "")
        kind_text = f"one of {shown}" if kind else "a choice"
        if kind:  # the frontend starts a combo on its first choice unless the node names another
            options.setdefault("default", kind[0])
    else:
        kind_text = f"`{kind}`"
    limits = [f"{label} {_format_value(options[key])}" for key, label in
              (("default", "default"), ("min", "min"), ("max", "max"), ("step", "step")) if key in options]
    tooltip = options.get("tooltip", "").replace("|", "\\|").replace("\n", " ")
    return f"| `{name}` | {kind_text} | {', '.join(limits)} | {tooltip} |"


def node_page(name: str, cls: type, display_name: str) -> str:
    """The Markdown help page of one node."""
    lines = [f"# {display_name}", "", f"`{name}` · category `{cls.CATEGORY}`", "", cls.DESCRIPTION.strip(), ""]
    input_types = cls.INPUT_TYPES()
    for section, title in (("required", "Inputs"), ("optional", "Optional inputs")):
        specs = input_types.get(section, {})
        if specs:
            lines += [f"## {title}", "", "| input | type | value | what it does |", "|---|---|---|---|"]
            lines += [_input_row(input_name, spec) for input_name, spec in specs.items()]
            lines.append("")
    return_names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    tooltips = getattr(cls, "OUTPUT_TOOLTIPS", None) or [""] * len(cls.RETURN_TYPES)
    if cls.RETURN_TYPES:
        lines += ["## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
        lines += [f"| `{output}` | `{kind}` | {tooltip} |"
                  for output, kind, tooltip in zip(return_names, cls.RETURN_TYPES, tooltips)]
        lines.append("")
    note = TECHNIQUE_NOTES.get(cls.__module__)
    if note is not None:
        heading, text = note
        lines += ["## Paper and departures", "", text, "",
                  f"More in the README, section \"{heading}\" (`README.md#{readme_anchor(heading)}`).", ""]
    return "\n".join(lines)


def generate_pages() -> dict[str, str]:
    """File name -> page for every node of the pack.

    Model combos are listed from an empty models folder, so a page shows the shipped models only and does not
    depend on what the machine that generated it had installed.
    """
    with tempfile.TemporaryDirectory() as empty_models_dir:
        pages = {}
        for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
            bound = (type(name, (cls,), {"models_dir": empty_models_dir, "__module__": cls.__module__})
                     if hasattr(cls, "models_dir") else cls)
            pages[f"{name}.md"] = node_page(name, bound, nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name))
        return pages


def write_pages(docs_dir: Path = DOCS_DIR) -> None:
    """Writes every page and removes pages of nodes that no longer exist."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    pages = generate_pages()
    for stale in set(os.listdir(docs_dir)) - set(pages):
        if stale.endswith(".md"):
            (docs_dir / stale).unlink()
    for file_name, text in pages.items():
        (docs_dir / file_name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write_pages()
    print(f"wrote {len(nodes.NODE_CLASS_MAPPINGS)} pages to {DOCS_DIR}", file=sys.stderr)
