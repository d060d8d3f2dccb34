"""Tiny, randomly initialised SD1, SD2 and SDXL pipelines for tests, written as diffusers folders and single files.

Each layout keeps its family's structure (block types, levels, layers per block, text encoder layout, SDXL's
two encoders and size conditioning), only narrow, so the loaders and the exporter meet the real key layout.
The SD1 UNet and VAE are environment.md §3's ``"sd1"`` layout. Building one takes well under a second.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import torch
from safetensors.torch import save_file

from nodes.models.export import export_single_file
from nodes.models.loading import SD1_TOKENIZER_DIR

TINY_FAMILIES = ("sd1", "sd2", "sdxl")
_SD1_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD1_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """One tiny model on disk in every form the loader accepts."""

    family: str
    folder: str  # diffusers folder (save_pretrained, safetensors weights)
    config_dir: str  # the same folder's configs only: no weights, tokenizers without vocabulary files
    single_file: str  # original-layout (LDM) .safetensors


def _text_config(width: int, act: str, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act=act, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407, **extra)


def _vae(scaling_factor: float, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                         block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=scaling_factor,
                         **extra)


def build_tiny_pipeline(family: str, seed: int = 0):
    """A tiny randomly initialised pipeline of ``family`` ("sd1", "sd2" or "sdxl"), in float32 on the CPU.

    Widths: SD1 and SD2 text encoders 32 (SD2's in OpenCLIP style, gelu and linear projections); SDXL's two
    encoders 32 and 64 (they must differ: diffusers tells them apart in a single file by width), so its UNet's
    context is 96 wide, with a 32-wide pooled projection and 8-wide time embeddings.
    """
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}; got {family!r}")
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(SD1_TOKENIZER_DIR, model_max_length=77)
    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), use_linear_projection=True,
            cross_attention_dim=96, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8)
        return StableDiffusionXLPipeline(
            vae=_vae(0.13025, force_upcast=True),
            text_encoder=CLIPTextModel(_text_config(32, "quick_gelu")),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(64, "gelu", projection_dim=32)),
            tokenizer=tokenizer, tokenizer_2=CLIPTokenizer.from_pretrained(SD1_TOKENIZER_DIR, model_max_length=77,
                                                                           pad_token="!"),
            unet=unet, scheduler=EulerDiscreteScheduler(**_SCALED_LINEAR, timestep_spacing="leading"))
    sd2 = family == "sd2"
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=_SD1_DOWN, up_block_types=_SD1_UP, cross_attention_dim=32,
        attention_head_dim=(2, 2, 4, 4) if sd2 else 8, use_linear_projection=sd2, upcast_attention=sd2)
    if sd2:
        tokenizer = CLIPTokenizer.from_pretrained(SD1_TOKENIZER_DIR, model_max_length=77, pad_token="!")
    return StableDiffusionPipeline(
        vae=_vae(0.18215), text_encoder=CLIPTextModel(_text_config(32, "gelu" if sd2 else "quick_gelu")),
        tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**_SCALED_LINEAR, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _copy_configs(folder: str, config_dir: str) -> None:
    """Copy a pipeline folder's configs, but no weights and no tokenizer vocabulary, to ``config_dir``."""
    for current, _, names in os.walk(folder):
        target = os.path.join(config_dir, os.path.relpath(current, folder))
        os.makedirs(target, exist_ok=True)
        for name in names:
            if name in ("config.json", "scheduler_config.json", "model_index.json", "tokenizer_config.json"):
                shutil.copyfile(os.path.join(current, name), os.path.join(target, name))


def save_tiny_model(family: str, root: str | os.PathLike, seed: int = 0) -> TinyModel:
    """Build a tiny ``family`` pipeline; write it under ``root`` as a folder, a configs-only copy and a single file."""
    root = os.fspath(root)
    folder, config_dir = os.path.join(root, "diffusers"), os.path.join(root, "config")
    single_file = os.path.join(root, f"tiny_{family}.safetensors")
    build_tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    _copy_configs(folder, config_dir)
    export_single_file(folder, single_file)
    return TinyModel(family, folder, config_dir, single_file)


def write_tiny_lora(pipeline, out_file: str | os.PathLike, style: str = "kohya", seed: int = 0, rank: int = 4,
                    scale: float = 0.1) -> None:
    """Write a random LoRA for ``pipeline``'s architecture over every attention projection of its UNet and text
    encoder(s).

    ``style`` "kohya" writes A1111/kohya keys (``lora_unet_…``, ``lora_te_…``/``lora_te1_…``/``lora_te2_…``,
    with ``alpha``), the common format of downloaded LoRAs; "peft" writes diffusers/PEFT keys
    (``unet.….lora_A.weight``). Every projection of an attention is covered, as trainers do: diffusers cannot
    infer the format of a text-encoder part that lacks ``out_proj``.
    """
    if style not in ("kohya", "peft"):
        raise ValueError(f"style must be 'kohya' or 'peft'; got {style!r}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    encoders = [("text_encoder", pipeline.text_encoder)]
    if getattr(pipeline, "text_encoder_2", None) is not None:
        encoders.append(("text_encoder_2", pipeline.text_encoder_2))
    kohya_text = {"text_encoder": "lora_te1_" if len(encoders) == 2 else "lora_te_", "text_encoder_2": "lora_te2_"}
    parts = [("unet", "lora_unet_", pipeline.unet, ("to_q", "to_k", "to_v", "to_out.0"))]
    parts += [(name, kohya_text[name], encoder, ("q_proj", "k_proj", "v_proj", "out_proj"))
              for name, encoder in encoders]
    for component, kohya_prefix, model, suffixes in parts:
        for name, module in model.named_modules():
            if not (name.endswith(suffixes) and isinstance(module, torch.nn.Linear)):
                continue
            down = torch.randn(rank, module.in_features, generator=generator) * scale
            up = torch.randn(module.out_features, rank, generator=generator) * scale
            if style == "kohya":
                if component != "unet":
                    name = "text_model." + name.removeprefix("text_model.")
                key = kohya_prefix + name.replace(".", "_")
                tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                                f"{key}.alpha": torch.tensor(rank / 2)})
            else:
                tensors.update({f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up})
    save_file(tensors, os.fspath(out_file))


# LCM-LoRA's target modules (diffusers' train_lcm_distill_lora_sd.py), which Hyper-SD's published LoRAs adapt too:
# kohya keys over diffusers' module names, an alpha per module (test_fewstep_hypersd.py checks the layout against
# the published files' sizes).
HYPER_SD_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                         "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                         "time_emb_proj")


def hyper_sd_layout(unet: torch.nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a Hyper-SD LoRA of ``rank`` for ``unet`` (any width; a meta-device one works)."""
    shapes = {}
    for name, module in unet.named_modules():
        if not name.endswith(HYPER_SD_LORA_TARGETS) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        weight = module.weight.shape
        if isinstance(module, torch.nn.Conv2d):
            down, up = (rank, weight[1], *weight[2:]), (weight[0], rank, 1, 1)
        else:
            down, up = (rank, weight[1]), (weight[0], rank)
        shapes.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": ()})
    return shapes


def write_hyper_sd_lora(unet: torch.nn.Module, out_file: str | os.PathLike, rank: int = 4, seed: int = 0,
                        scale: float = 0.05) -> str:
    """Write a random LoRA in Hyper-SD's published layout for ``unet`` (alpha = rank: branch scale 1)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {key: torch.tensor(float(rank)) if not shape else torch.randn(shape, generator=generator) * scale
               for key, shape in hyper_sd_layout(unet, rank).items()}
    save_file(tensors, os.fspath(out_file))
    return os.fspath(out_file)


def save_tiny_koala(folder: str | os.PathLike, seed: int = 2) -> str:
    """Save a tiny SDXL diffusers folder whose UNet has KOALA-700M's depths (one ResNet per level, 5 transformer
    blocks at the lowest level, no mid block), laid out as the published KOALA folders are."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from nodes.fewstep.koala import KOALA_UNETS

    pipeline = build_tiny_pipeline("sdxl", seed)
    # diffusers re-applies its defaults to the keys "_use_default_values" lists (the mid block among them)
    config = {key: value for key, value in pipeline.unet.config.items() if key != "_use_default_values"}
    config.update(KOALA_UNETS["koala_700m"])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config)
    StableDiffusionXLPipeline(**{**pipeline.components, "unet": unet}).save_pretrained(os.fspath(folder))
    return os.fspath(folder)


def write_speedupnet_adapter(network: torch.nn.Module, out_file: str | os.PathLike, seed: int = 0,
                             scale: float = 0.05) -> str:
    """A SpeedUpNet adapter for ``network`` in the published layout (``nodes.fewstep.speedupnet.speedupnet_layout``:
    "{processor}.to_k_neg.weight" …), random projections of size ``scale``, α near 1 and β near 0 as trained ones
    start, written as ``.safetensors``."""
    from nodes.fewstep.speedupnet import speedupnet_layout

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in speedupnet_layout(network).items():
        noise = torch.randn(shape, generator=generator)
        tensors[key] = 1 + 0.1 * noise if key.endswith("_alpha") else 0.01 * noise if key.endswith("_beta") \
            else scale * noise
    save_file(tensors, os.fspath(out_file))
    return os.fspath(out_file)


def mixing_eps_network(alphas_cumprod: torch.Tensor, seed: int):
    """An ε-network on (VP latent, timestep) in float64 for comparing samplers' update rules: the exact ε of
    unit-Gaussian data, √(1 − ᾱ_t)·x, plus a channel-mixing term that depends on t, so that no step is trivial."""
    weight = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 0.3

    def network(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
        mixed = torch.einsum("ij,bjhw->bihw", weight, x) * torch.cos(t / 300)
        return (1 - alphas_cumprod[t.round().long().reshape(-1)]).sqrt().reshape(-1, 1, 1, 1) * x + mixed

    return network
