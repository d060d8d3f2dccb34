"""The configs and tokenizers that describe a checkpoint's architecture: shipped for the real models, derived from a
file's tensor shapes for the same layouts at other widths or input channels.

A single file holds weights only. diffusers needs a config folder beside it (``from_single_file(config=...)``):
for each family we ship the published configs (``configs/``), and :func:`single_file_config_dir` picks them, or
the shipped embedded model's folder, or writes a derived folder for a file of the family's layout whose widths or
UNet input channels differ (a 9-channel inpainting UNet, a narrow test model), as ComfyUI reads a UNet's config
from its shapes (``comfy/model_detection.py``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from . import offline  # noqa: F401  (first: before diffusers and transformers import huggingface_hub)
from diffusers import (StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)
from transformers import CLIPTokenizer

from .families import (FAMILIES, SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_LABEL_EMB_PREFIX,
                       SDXL_REFINER_TEXT_PREFIX, SDXL_TEXT_PREFIXES, UNET_IN_CONV_KEY, UNET_PREFIX, CheckpointInfo,
                       family_from_diffusers_folder, read_json)
from .formats import SAFE_EXTENSION
from .sources import SHIPPED_MODELS

SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FAMILY_CONFIG_DIRS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl", "sdxl_refiner": "sdxl_refiner"}
# The one copy of CLIP's BPE vocabulary (environment.md §2); other tokenizer folders hold only their config.
SD1_TOKENIZER_DIR = os.path.join(SHIPPED_CONFIGS, "sd15", "tokenizer")
# Derived config folders are written here once per distinct architecture (named by a hash of their configs).
DERIVED_CONFIGS = os.path.join(tempfile.gettempdir(), "atelier_derived_configs")
VAE_IN_CONV_KEY = "first_stage_model.encoder.conv_in.weight"
# Each text encoder of a family: (its component folder, its prefix in the file, whether it is in OpenCLIP layout).
TEXT_ENCODERS = {
    "sd1": (("text_encoder", SD1_TEXT_PREFIX, False),),
    "sd2": (("text_encoder", SD2_TEXT_PREFIX, True),),
    "sdxl": (("text_encoder", SDXL_TEXT_PREFIXES[0], False), ("text_encoder_2", SDXL_TEXT_PREFIXES[1], True)),
    "sdxl_refiner": (("text_encoder_2", SDXL_REFINER_TEXT_PREFIX, True),),
}
# SDXL's added conditioning: the pooled text embedding and this many Fourier-embedded numbers (the base: original
# size, crop, target size; the refiner: original size, crop, aesthetic score).
ADDED_TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}
HEAD_WIDTH = 64  # the attention head width SD's released models use, for derived configs
# Shipped UNets that keep a family's layout and widths at other depths: KOALA's distilled SDXL UNets
# (nodes/fewstep/koala.py), which are published as UNet files as well as folders.
UNET_VARIANTS = {"sdxl": {"koala_700m": "KOALA-700M", "koala_1b": "KOALA-1B"}}


def shipped_config_dir(family: str) -> str:
    """The shipped configs-only diffusers folder for ``family`` at its published widths (SD1.5, SD2.1, SDXL base,
    SDXL refiner)."""
    if family not in FAMILY_CONFIG_DIRS:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    return os.path.join(SHIPPED_CONFIGS, FAMILY_CONFIG_DIRS[family])


def shipped_unet_config(family: str) -> dict:
    """The shipped UNet ``config.json`` of ``family`` (as :func:`shipped_config_dir` names it).

    Example:
        >>> shipped_unet_config("sd2")["cross_attention_dim"]
        1024
    """
    return read_json(os.path.join(shipped_config_dir(family), "unet", "config.json"))


def component_configs(config_dir: str) -> dict[str, dict]:
    """The ``config.json`` of every weight component of a config folder, by component name."""
    index = read_json(os.path.join(config_dir, "model_index.json"))
    return {name: read_json(os.path.join(config_dir, name, "config.json")) for name, entry in index.items()
            if isinstance(entry, list) and None not in entry and name in ("unet", "vae", *_text_components())}


CHECKPOINT_UNET = "the checkpoint's UNet"  # how unet_file_configs names the checkpoint's own UNet


def unet_file_configs(base_config: Mapping[str, Any], family: str) -> dict[str, dict]:
    """The UNet configs a UNet file used beside a checkpoint of ``family`` may have, by the name messages give
    them: the checkpoint's own UNet, then each of :data:`UNET_VARIANTS` (its depths at the checkpoint's widths, so a
    reduced-width test model has reduced-width variants too).

    Example:
        >>> configs = unet_file_configs(read_json(os.path.join(shipped_config_dir("sdxl"), "unet", "config.json")),
        ...                             "sdxl")
        >>> list(configs), configs["KOALA-700M"]["transformer_layers_per_block"]
        (["the checkpoint's UNet", 'KOALA-700M', 'KOALA-1B'], [1, 2, 5])
    """
    # without diffusers' bookkeeping: "_use_default_values" would put its defaults back over a variant's depths
    base_config = {key: value for key, value in base_config.items() if not key.startswith("_")}
    configs = {CHECKPOINT_UNET: base_config}
    if family in UNET_VARIANTS:
        family_config = shipped_unet_config(family)
        for variant, label in UNET_VARIANTS[family].items():
            variant_config = read_json(os.path.join(SHIPPED_CONFIGS, variant, "unet", "config.json"))
            depths = {key: value for key, value in variant_config.items()
                      if not key.startswith("_") and family_config.get(key) != value}
            configs[label] = {**base_config, **depths}
    return configs


def _text_components() -> set[str]:
    return {name for encoders in TEXT_ENCODERS.values() for name, _, _ in encoders}


def heads_for_width(width: int) -> int:
    """A head count for a derived width: one per 64 channels, and always a divisor of the width."""
    return math.gcd(width, max(1, width // HEAD_WIDTH))


def _text_shapes(shapes: Mapping[str, Sequence[int]], prefix: str, open_clip: bool) -> dict[str, int]:
    """Hidden and MLP widths of a text encoder in the file."""
    if open_clip:
        hidden = int(shapes[prefix + "token_embedding.weight"][1])
        mlp = int(shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0])
        return {"hidden_size": hidden, "intermediate_size": mlp}
    return {"hidden_size": int(shapes[prefix + "text_model.embeddings.token_embedding.weight"][1]),
            "intermediate_size": int(shapes[prefix + "text_model.encoder.layers.0.mlp.fc1.weight"][0])}


def derive_configs(family: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, dict]:
    """The component configs of a ``family`` single file, from the shipped ones and the file's tensor shapes.

    Only what the shapes show is derived: the UNet's first width (the other levels keep the family's multipliers),
    input channels, cross-attention and added-conditioning widths; the VAE's first width; each text encoder's
    hidden, MLP and projection widths. Depths and block types stay the family's. Where a width differs from the
    published one, the head counts become one per 64 channels (heads do not show in the shapes).

    Args:
        family: one of ``FAMILIES``.
        shapes: tensor name → shape for every tensor of an original-layout file of that family.
    Returns:
        component name → config dict (``unet``, ``vae`` and the family's text encoders).
    Raises:
        KeyError: a tensor the family's layout must have is missing (``families.family_from_shapes`` checks
            first, so this means a truncated file).
    """
    configs = copy.deepcopy(component_configs(shipped_config_dir(family)))
    unet = configs["unet"]
    width = int(shapes[UNET_IN_CONV_KEY][0])
    published = unet["block_out_channels"]
    if width != published[0]:
        unet["block_out_channels"] = [width * channels // published[0] for channels in published]
        unet["attention_head_dim"] = [heads_for_width(channels) for channels in unet["block_out_channels"]]
    unet["in_channels"] = int(shapes[UNET_IN_CONV_KEY][1])
    context = next(shape for key, shape in shapes.items()
                   if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight"))
    unet["cross_attention_dim"] = int(context[1])
    vae = configs["vae"]
    vae_width = int(shapes[VAE_IN_CONV_KEY][0])
    if vae_width != vae["block_out_channels"][0]:
        vae["block_out_channels"] = [vae_width * channels // vae["block_out_channels"][0]
                                     for channels in vae["block_out_channels"]]
    for component, prefix, open_clip in TEXT_ENCODERS[family]:
        text = configs[component]
        derived = _text_shapes(shapes, prefix, open_clip)
        if derived["hidden_size"] != text["hidden_size"]:
            text["num_attention_heads"] = heads_for_width(derived["hidden_size"])
        text.update(derived)
        if component == "text_encoder_2":  # the pooled projection that SDXL's added conditioning takes
            text["projection_dim"] = int(shapes[prefix + "text_projection"][1])
    if family in ADDED_TIME_IDS:
        added = int(shapes[SDXL_LABEL_EMB_PREFIX + "0.0.weight"][1])
        unet["projection_class_embeddings_input_dim"] = added
        pooled = configs["text_encoder_2"]["projection_dim"]
        unet["addition_time_embed_dim"] = (added - pooled) // ADDED_TIME_IDS[family]
    return configs


def write_config_dir(base_dir: str, configs: Mapping[str, dict], out_dir: str) -> None:
    """Copy the config folder ``base_dir`` (configs and tokenizer files, never weights) to ``out_dir`` with the
    component configs replaced by ``configs``."""
    shutil.copytree(base_dir, out_dir, ignore=shutil.ignore_patterns("*" + SAFE_EXTENSION, "*.bin", "*.ckpt"))
    for component, config in configs.items():
        with open(os.path.join(out_dir, component, "config.json"), "w", encoding="utf-8") as file:
            json.dump(config, file, indent=2, sort_keys=True)


def _derived_config_dir(family: str, configs: Mapping[str, dict]) -> str:
    """A config folder for ``configs``, written once under :data:`DERIVED_CONFIGS` (other processes may race to
    write it: each writes a private copy and renames it into place)."""
    text = json.dumps(configs, sort_keys=True)
    folder = os.path.join(DERIVED_CONFIGS, f"{family}-{hashlib.sha256(text.encode()).hexdigest()[:16]}")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    os.makedirs(DERIVED_CONFIGS, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=DERIVED_CONFIGS, prefix=".writing-")
    os.rmdir(scratch)
    write_config_dir(shipped_config_dir(family), configs, scratch)
    try:
        os.rename(scratch, folder)
    except OSError:  # another process renamed its copy first: the contents are the same
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def single_file_config_dir(info: CheckpointInfo) -> str:
    """The config folder for a single file given without one.

    In order: a shipped diffusers folder whose UNet has the file's family and parameter count (the embedded
    model's single file reads its architecture from its own folder); the shipped configs of its family when the
    file has the published shapes; else a folder derived from the file's shapes (:func:`derive_configs`).
    """
    shipped_folders = os.path.join(SHIPPED_MODELS, "diffusers")
    for name in sorted(os.listdir(shipped_folders)) if os.path.isdir(shipped_folders) else []:
        folder = os.path.join(shipped_folders, name)
        if (family_from_diffusers_folder(folder) == info.family
                and safetensors_parameters(os.path.join(folder, "unet")) == info.unet_parameters):
            return folder
    shipped = shipped_config_dir(info.family)
    configs = derive_configs(info.family, info.shapes)
    if configs == component_configs(shipped):
        return shipped
    return _derived_config_dir(info.family, configs)


def safetensors_parameters(folder: str) -> int:
    """How many numbers the ``.safetensors`` files of ``folder`` hold, read from their headers."""
    from safetensors import safe_open

    total = 0
    for name in os.listdir(folder):
        if name.endswith(SAFE_EXTENSION):
            with safe_open(os.path.join(folder, name), framework="pt") as file:
                total += sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys())
    return total


def load_tokenizer(config_dir: str | os.PathLike, subfolder: str = "tokenizer") -> CLIPTokenizer:
    """The CLIP tokenizer of a config folder's ``subfolder``, built offline.

    A folder that holds its own vocabulary (``vocab.json`` or ``tokenizer.json``) is loaded as it is. One that
    holds only ``tokenizer_config.json``, as the shipped SD2 and SDXL folders and test config folders do, gets the
    shipped SD1 CLIP vocabulary with that config's pad token and maximum length (SD2 and SDXL's second encoder pad
    with ``"!"``, SD1 with ``<|endoftext|>``).

    Raises:
        FileNotFoundError: ``subfolder`` has neither a vocabulary nor a ``tokenizer_config.json``.
    """
    folder = os.path.join(os.fspath(config_dir), subfolder)
    if any(os.path.isfile(os.path.join(folder, name)) for name in ("vocab.json", "tokenizer.json")):
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    config_path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder!r} has no vocab.json, tokenizer.json or tokenizer_config.json")
    config = read_json(config_path)
    pad = config.get("pad_token", "<|endoftext|>")
    pad = pad["content"] if isinstance(pad, dict) else pad
    return CLIPTokenizer.from_pretrained(SD1_TOKENIZER_DIR, local_files_only=True, pad_token=pad,
                                         model_max_length=int(config.get("model_max_length", 77)))


def pipeline_class(family: str, unet_in_channels: int = 4) -> type:
    """The diffusers pipeline class that holds a model of ``family``: its text-to-image pipeline, the
    inpainting one for a 9-channel UNet, and the image-to-image one for the SDXL refiner (which has no other)."""
    if family == "sdxl_refiner":
        return StableDiffusionXLImg2ImgPipeline
    if family == "sdxl":
        return StableDiffusionXLInpaintPipeline if unet_in_channels != 4 else StableDiffusionXLPipeline
    return StableDiffusionInpaintPipeline if unet_in_channels != 4 else StableDiffusionPipeline


def pipeline_extras(family: str) -> dict[str, Any]:
    """Keyword arguments every SD1/SD2 pipeline load needs: it has a safety checker slot, and we never load one
    (no weights are shipped for it)."""
    if family.startswith("sdxl"):
        return {}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
