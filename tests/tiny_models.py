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

    return CLIPTextConfig(**{"vocab_size": 49408, "hidden_size": width, "intermediate_size": 2 * width,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                             "hidden_act": act, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
                             **extra})


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


# APTP's depth gates: the last ResNet and the last transformer of a level may be dropped; these are a mix of both,
# in down and up levels, with and without a skip connection to cut off (rezashkv/diffusion_pruning, blocks.py:
# the *HalfDepthGated blocks gate their last layer).
APTP_DROPPED_BLOCKS = ("down_blocks.1.resnets.1", "down_blocks.2.attentions.1", "down_blocks.3.resnets.1",
                       "up_blocks.0.resnets.2", "up_blocks.2.attentions.2", "up_blocks.3.resnets.2")


def aptp_expert(unet: torch.nn.Module, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """An APTP expert of ``unet`` with random hard gates, two ways: the state dict the published expert files hold
    (the pruning of ``UNet2DConditionModelPruned`` written out: kept ResNet channel groups of ``norm2``, attention
    heads, GEGLU channels in 32 groups, :data:`APTP_DROPPED_BLOCKS` left out), and, as the reference, a copy of the
    full UNet in which what was pruned contributes nothing (zero weights; a dropped up-level ResNet's shortcut
    passes the first channels of its input on, without the skip connection's).
    """
    import copy

    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    generator = torch.Generator().manual_seed(seed)

    def gate(groups: int, width: int) -> torch.Tensor:
        kept = torch.rand(groups, generator=generator) < 0.6
        kept[torch.randint(groups, (1,), generator=generator)] = True
        return kept.repeat_interleave(width)

    reference = copy.deepcopy(unet)
    state = {key: value.clone() for key, value in unet.state_dict().items()}
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name in APTP_DROPPED_BLOCKS:
                state = {key: value for key, value in state.items() if not key.startswith(name + ".")}
                if isinstance(module, ResnetBlock2D):
                    module.conv2.weight.zero_(), module.conv2.bias.zero_()
                    if module.conv_shortcut is not None:
                        module.conv_shortcut.weight.copy_(torch.eye(*module.conv_shortcut.weight.shape[:2])[..., None,
                                                                                                          None])
                        module.conv_shortcut.bias.zero_()
                else:
                    module.proj_out.weight.zero_(), module.proj_out.bias.zero_()
            elif any(name.startswith(dropped + ".") for dropped in APTP_DROPPED_BLOCKS):
                continue
            elif isinstance(module, ResnetBlock2D):
                kept = gate(module.norm2.num_groups, module.norm2.num_channels // module.norm2.num_groups)
                for part in ("conv1", "time_emb_proj", "norm2"):
                    for kind in ("weight", "bias"):
                        state[f"{name}.{part}.{kind}"] = state[f"{name}.{part}.{kind}"][kept]
                        getattr(getattr(module, part), kind)[~kept] = 0
                state[f"{name}.conv2.weight"] = state[f"{name}.conv2.weight"][:, kept]
            elif isinstance(module, Attention):
                kept = gate(module.heads, module.to_q.out_features // module.heads)
                for part in ("to_q", "to_k", "to_v"):
                    state[f"{name}.{part}.weight"] = state[f"{name}.{part}.weight"][kept]
                    getattr(module, part).weight[~kept] = 0
                state[f"{name}.to_out.0.weight"] = state[f"{name}.to_out.0.weight"][:, kept]
            elif name.endswith(".ff"):
                inner = module.net[2].in_features
                kept = gate(32, inner // 32)
                both = torch.cat([kept, kept])
                for kind in ("weight", "bias"):
                    state[f"{name}.net.0.proj.{kind}"] = state[f"{name}.net.0.proj.{kind}"][both]
                    getattr(module.net[0].proj, kind)[~both] = 0
                state[f"{name}.net.2.weight"] = state[f"{name}.net.2.weight"][:, kept]
    return {key: value.contiguous() for key, value in state.items()}, reference


def save_tiny_sentence_encoder(folder: str | os.PathLike, sentences: list[str]) -> None:
    """A 2-layer BERT, 32 wide, with a word-level vocabulary of ``sentences``, saved as sentence-transformers saves
    all-mpnet-base-v2 (safetensors weights, tokenizer files, 1_Pooling/config.json)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = os.fspath(folder)
    words = sorted({word.strip(",") for sentence in sentences for word in sentence.split()})
    os.makedirs(os.path.join(folder, "1_Pooling"))
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as file:
        file.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *words]) + "\n")
    BertTokenizerFast(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 6, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w", encoding="utf-8") as file:
        file.write('{"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}')


# A small APTP structure in the published config's form: per block (ResNet, transformer, ...) its width gates' group
# counts and whether it has a depth gate; depth_order as configs/pruning/*.yaml writes it (negative indices).
APTP_STRUCTURE = {"width": [[4], [2, 8], [4], [2, 8], [4], [4]], "depth": [[0], [0], [1], [1], [0], [1]]}
APTP_DEPTH_ORDER = [-1, 0, 1]


def write_aptp_router(folder: str | os.PathLike, width: int, experts: int = 8, weight_norm: bool = False,
                      resource_aware: bool = False, seed: int = 0) -> None:
    """A random APTP router in the published layout: hypernet/ and quantizer/ with diffusers' config.json and
    diffusion_pytorch_model.safetensors (HyperStructure: mh_fc.<i> per width gate, then one depth head;
    StructureVectorQuantizer: embedding and embedding_gs)."""
    import json

    folder = os.fspath(folder)
    generator = torch.Generator().manual_seed(seed)
    widths = [count for block in APTP_STRUCTURE["width"] for count in block]
    depths = sum(depth[0] for depth in APTP_STRUCTURE["depth"])
    hypernet = {}
    for index, count in enumerate([*widths, depths]):
        weight = torch.randn(count, width, generator=generator) * 0.5
        if weight_norm:
            hypernet[f"mh_fc.{index}.parametrizations.weight.original0"] = weight.norm(dim=1, keepdim=True) * 2
            hypernet[f"mh_fc.{index}.parametrizations.weight.original1"] = weight
        else:
            hypernet[f"mh_fc.{index}.weight"] = weight
        hypernet[f"mh_fc.{index}.bias"] = torch.randn(count, generator=generator) - 1.5
    codes = torch.randn(experts, sum(widths) + depths, generator=generator)
    quantizer = {"embedding.weight": codes, "embedding_gs": torch.sigmoid((codes + 0.5) / 0.4)}
    configs = {"hypernet": {"_class_name": "HyperStructure", "structure": APTP_STRUCTURE, "input_dim": width,
                            "wn_flag": weight_norm, "linear_bias": True, "single_arch_param": False},
               "quantizer": {"_class_name": "StructureVectorQuantizer", "n_e": experts, "structure": APTP_STRUCTURE,
                             "temperature": 0.4, "base": 3, "depth_order": APTP_DEPTH_ORDER, "non_zero_width": True,
                             "resource_aware_normalization": resource_aware, "optimal_transport": True}}
    for part, tensors in (("hypernet", hypernet), ("quantizer", quantizer)):
        os.makedirs(os.path.join(folder, part), exist_ok=True)
        save_file(tensors, os.path.join(folder, part, "diffusion_pytorch_model.safetensors"))
        with open(os.path.join(folder, part, "config.json"), "w", encoding="utf-8") as file:
            json.dump(configs[part], file)


# What workflows/aptp_experts.json names: the SD2.1 checkpoint, APTP's folder and its sentence encoder.
APTP_WORKFLOW_MODELS = ("checkpoints/v2-1_768-ema-pruned.safetensors", "aptp/APTP-Base-CC3M",
                        "sentence_encoders/all-mpnet-base-v2")


def save_sd21_stand_in(checkpoint: str | os.PathLike, models_dir: str | os.PathLike) -> torch.nn.Module:
    """A small SD2 model as a single-file checkpoint at ``checkpoint``, read at SD2.1's proportions (widths ×1, ×2,
    ×4, ×4 of the first, a head per 64 channels and at least one; 23 text encoder layers), which the tiny SD2
    layout's are not: a stand-in for SD2.1 and sd-turbo. Returns its UNet."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipeline = build_tiny_pipeline("sd2")
    torch.manual_seed(1)
    widths = (32, 64, 128, 128)
    unet = UNet2DConditionModel.from_config({**pipeline.unet.config, "block_out_channels": widths,
                                             "attention_head_dim": (1, 1, 2, 2)})
    vae = AutoencoderKL.from_config({**pipeline.vae.config, "block_out_channels": widths})
    diffusers_dir = os.path.join(os.fspath(models_dir), ".sd21_stand_in")
    text_encoder = CLIPTextModel(_text_config(32, "gelu", num_hidden_layers=23))
    parts = {**pipeline.components, "unet": unet, "vae": vae, "text_encoder": text_encoder}
    StableDiffusionPipeline(**parts).save_pretrained(diffusers_dir, safe_serialization=True)
    os.makedirs(os.path.dirname(os.fspath(checkpoint)), exist_ok=True)
    export_single_file(diffusers_dir, checkpoint)
    shutil.rmtree(diffusers_dir)
    return unet


def save_aptp_stand_ins(models_dir: str | os.PathLike, prompts: list[str], experts: int = 8) -> None:
    """Stand-ins for :data:`APTP_WORKFLOW_MODELS` under ``models_dir``: the SD2.1 stand-in as the checkpoint, a
    pruning folder with a random router and ``experts`` experts of its UNet, a tiny sentence encoder knowing the
    words of ``prompts``."""
    checkpoint, folder, encoder = (os.path.join(os.fspath(models_dir), name) for name in APTP_WORKFLOW_MODELS)
    unet = save_sd21_stand_in(checkpoint, models_dir)
    for expert in range(experts):
        unet_dir = os.path.join(folder, f"arch{expert}", "checkpoint-30000", "unet")
        os.makedirs(unet_dir)
        save_file(aptp_expert(unet, seed=expert)[0], os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
    write_aptp_router(folder, width=32, experts=experts)
    save_tiny_sentence_encoder(encoder, prompts)


def write_adcsr_files(folder: str | os.PathLike, unet_config: dict, decoder_widths: tuple[int, ...],
                      seed: int = 0, aliases: bool = True) -> tuple[str, str]:
    """Random AdcSR weights for ``unet_config`` in the published layout, converted to ``.safetensors``: the
    distilled network as ``DataParallel(Net)`` saves it (``module.body.1.*`` the UNet, with, if ``aliases``, its
    ``body.<i>.*`` aliases of the same tensors, which double a converted file's size; ``module.body.2.*`` the
    decoder middle) and the half decoder's state dict (``decoder.*`` and ``encoder.*``). Returns the two paths."""
    from diffusers.models.autoencoders.vae import Decoder

    from nodes.superres.adcsr import build_adcsr

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    def random_like(key: str, value: torch.Tensor) -> torch.Tensor:
        """Fan-in scaled weights, unit norms, zero biases: a full-size network is written in seconds."""
        if value.ndim == 1:
            return torch.ones(value.shape) if "norm" in key and key.endswith("weight") else torch.zeros(value.shape)
        return torch.randn(value.shape, generator=generator) / value[0].numel() ** 0.5

    with torch.device("meta"):
        net = build_adcsr(unet_config, decoder_widths)
    unet = {key: random_like(key, value) for key, value in net.unet.state_dict().items()}
    network = {"module.body.1." + key: value for key, value in unet.items()}
    body = [*[f"down_blocks.{index}" for index in range(len(net.unet.down_blocks))], "mid_block",
            *[f"up_blocks.{index}" for index in range(len(net.unet.up_blocks))], "conv_norm_out", "conv_act",
            "conv_out"]  # model.py: unet.body = Sequential(down blocks, mid block, up blocks, norm, act, conv_out)
    for position, name in enumerate(body if aliases else ()):
        for key, value in unet.items():
            if key.startswith(name + "."):
                network[f"module.body.1.body.{position}." + key.removeprefix(name + ".")] = value.clone()
    for key, value in net.mid_block.state_dict().items():
        network["module.body.2." + key] = random_like(key, value)
    with torch.device("meta"):
        decoder = Decoder(in_channels=4, out_channels=3, up_block_types=("UpDecoderBlock2D",) * len(decoder_widths),
                          block_out_channels=tuple(decoder_widths), layers_per_block=2, norm_num_groups=32,
                          act_fn="silu", norm_type="group", mid_block_add_attention=True)
    half_decoder = {"decoder." + key: random_like(key, value) for key, value in decoder.state_dict().items()}
    half_decoder["encoder.conv_in.weight"] = torch.zeros(decoder_widths[0], 3, 3, 3)  # the ckpt's VAE encoder
    paths = os.path.join(folder, "adcsr_net.safetensors"), os.path.join(folder, "adcsr_half_decoder.safetensors")
    save_file(network, paths[0])
    save_file(half_decoder, paths[1])
    return paths


def write_diffdis_unet(folder: str | os.PathLike, base_config: dict, seed: int = 0) -> str:
    """Random DiffDIS weights as the authors publish them: ``unet/config.json`` (the base UNet's config, which
    ``run_inference.py`` overrides) and ``unet/diffusion_pytorch_model.safetensors`` (every tensor of the UNet,
    batch-norm statistics included). The SWCI projections are not zero (trained ones are not). Returns the file's
    path."""
    import json

    from nodes.cutout.diffdis import build_diffdis_unet

    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet = build_diffdis_unet(base_config)
    tensors = {}
    for key, value in unet.state_dict().items():
        if not value.is_floating_point():  # num_batches_tracked
            tensors[key] = torch.zeros(value.shape, dtype=value.dtype)
        elif key.endswith("running_var"):
            tensors[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif value.ndim == 1:
            scale = key.endswith("weight") and "norm" in key or key.endswith(".1.weight")  # norms' and BNs' gains
            tensors[key] = float(scale) + 0.1 * torch.randn(value.shape, generator=generator)
        else:
            tensors[key] = torch.randn(value.shape, generator=generator) / value[0].numel() ** 0.5
    unet_dir = os.path.join(os.fspath(folder), "unet")
    os.makedirs(unet_dir, exist_ok=True)
    with open(os.path.join(unet_dir, "config.json"), "w", encoding="utf-8") as file:
        json.dump(dict(base_config), file)
    path = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")
    save_file(tensors, path)
    return path


# What workflows/diffdis.json names: sd-turbo's checkpoint and DiffDIS's UNet (the authors' unet/ folder).
DIFFDIS_WORKFLOW_MODELS = ("checkpoints/sd_turbo.safetensors", "diffdis/unet/diffusion_pytorch_model.safetensors")


def save_diffdis_stand_ins(models_dir: str | os.PathLike) -> None:
    """Stand-ins for :data:`DIFFDIS_WORKFLOW_MODELS` under ``models_dir``: the SD2.1 stand-in as sd-turbo, and a
    random DiffDIS UNet on its UNet's config (``unet/config.json`` beside it, as the authors ship it)."""
    checkpoint = os.path.join(os.fspath(models_dir), DIFFDIS_WORKFLOW_MODELS[0])
    unet = save_sd21_stand_in(checkpoint, models_dir)
    write_diffdis_unet(os.path.join(os.fspath(models_dir), "diffdis"), dict(unet.config))


def save_tiny_yoso(folder: str | os.PathLike, seed: int = 0) -> str:
    """A random StableNormal YOSO folder on the tiny SD2 layout, as the authors publish ``yoso-normal-v0-3``:
    ``model_index.json`` naming their pipeline and ``ControlNetVAEModel``, float16 ``*.fp16.safetensors`` weights
    for every part, the ControlNet's config under the authors' class name, the tokenizer. The ControlNet starts from
    the UNet's encoder, every weight then moved at random (the zero convolutions stay zero, as trained ones do where
    the forward never reaches them). Returns the folder."""
    import json

    from diffusers import ControlNetModel

    folder = os.fspath(folder)
    pipeline = build_tiny_pipeline("sd2", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    controlnet = ControlNetModel.from_unet(pipeline.unet)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if not name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    for part, module in (("unet", pipeline.unet), ("controlnet", controlnet), ("vae", pipeline.vae)):
        module.half().save_pretrained(os.path.join(folder, part), variant="fp16", safe_serialization=True)
    encoder_dir = os.path.join(folder, "text_encoder")
    pipeline.text_encoder.config.save_pretrained(encoder_dir)
    save_file({key: value.half().contiguous() for key, value in pipeline.text_encoder.state_dict().items()},
              os.path.join(encoder_dir, "model.fp16.safetensors"), metadata={"format": "pt"})
    pipeline.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    config_path = os.path.join(folder, "controlnet", "config.json")
    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    with open(config_path, "w", encoding="utf-8") as file:
        json.dump({**config, "_class_name": "ControlNetVAEModel"}, file)
    index = {"_class_name": "YOSONormalsPipeline", "_diffusers_version": "0.28.0",
             "controlnet": ["controlnetvae", "ControlNetVAEModel"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as file:
        json.dump(index, file)
    return folder


# A small TVTUNet: SD2.1-base's layout with a level in front (the published config.json was not at hand).
TINY_TVT_UNET = {"sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                 "block_out_channels": (32, 32, 32, 64, 64),
                 "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
                 "attention_head_dim": (1, 2, 2, 4, 4), "cross_attention_dim": 32, "use_linear_projection": True}
# A narrow VAED4 for tests that run the VAE (the published widths take a minute per 512² image on two cores).
NARROW_VAED4 = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                "block_out_channels": (32, 32, 32), "down_block_types": ("DownEncoderBlock2D",) * 3,
                "up_block_types": ("UpDecoderBlock2D",) * 3, "norm_num_groups": 32, "act_fn": "silu"}
TVT_TRAINED = ("down_blocks.0", "up_blocks.3.upsamplers.0", "up_blocks.4", "conv_in", "conv_out")
TVT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                    "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")


def write_tvt_files(folder: str | os.PathLike, unet_config: dict | None = None, rank: int = 4, seed: int = 0,
                    vae_config: dict | None = None) -> tuple[tuple[str, str, str], torch.nn.Module]:
    """Random TVT weights in the published layouts, converted to ``.safetensors``: ``tvt_vae.safetensors``
    (VAED4's tensors under ``vae.ckpt``'s ``vaeDe4.`` prefix), ``TVTUNet/unet/`` (config and weights) and
    ``model_TVT.safetensors``, made as ``TVTModel.py`` makes it: PEFT adapters ``default_encoder``,
    ``default_decoder`` and ``default_others`` on the modules its patterns pick (random, B included), the trained
    groups moved at random, and the state dict's LoRA and trained-group tensors kept. ``vae_config``: VAED4's by
    default. Returns the three paths and the PEFT-wrapped UNet they stand for, the reference."""
    import copy
    import json

    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from nodes.superres.tvt import build_vaed4

    folder = os.fspath(folder)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = build_vaed4(vae_config)
    vae_path = os.path.join(folder, "tvt_vae.safetensors")
    os.makedirs(folder, exist_ok=True)
    save_file({"vaeDe4." + key: value.contiguous() for key, value in vae.state_dict().items()}, vae_path)
    unet = UNet2DConditionModel(**(unet_config or TINY_TVT_UNET))
    unet_dir = os.path.join(folder, "TVTUNet", "unet")
    unet.save_pretrained(unet_dir, safe_serialization=True)
    groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "others": []}
    for name, _ in unet.named_parameters():  # TVTModel.py initialize_unet_TVT's selection
        if "bias" in name or "norm" in name:
            continue
        pattern = next((pattern for pattern in TVT_LORA_TARGETS if pattern in name), None)
        if pattern is None:
            continue
        group = ("encoder" if "down_blocks" in name or "conv_in" in name else
                 "decoder" if "up_blocks" in name else "others")
        groups[group].append(name.removesuffix(".weight"))
    reference = copy.deepcopy(unet)
    for group, modules in groups.items():
        reference.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=modules),
                              adapter_name=f"default_{group}")
    reference.set_adapters([f"default_{group}" for group in groups])
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "lora" in name or any(group in name for group in TVT_TRAINED):
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator)
                                + (parameter if "lora" not in name else 0))
    kept = {key: value.contiguous() for key, value in reference.state_dict().items()
            if "lora" in key or any(group in key for group in TVT_TRAINED)}
    weights_path = os.path.join(folder, "model_TVT.safetensors")
    save_file(kept, weights_path)
    with open(os.path.join(folder, "TVTUNet", "unet", "config.json"), encoding="utf-8") as file:
        assert json.load(file)["block_out_channels"]
    return (vae_path, os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"), weights_path), reference.eval()


# What workflows/tvt.json names: SD2.1-base's checkpoint and TVT's three converted files.
TVT_WORKFLOW_MODELS = ("checkpoints/v2-1_512-ema-pruned.safetensors", "tvt/tvt_vae.safetensors",
                       "tvt/TVTUNet/unet/diffusion_pytorch_model.safetensors", "tvt/model_TVT.safetensors")


def save_tvt_stand_ins(models_dir: str | os.PathLike, vae_config: dict | None = None) -> None:
    """Stand-ins for :data:`TVT_WORKFLOW_MODELS` under ``models_dir``: the SD2.1 stand-in as SD2.1-base, and random
    TVT files on a small TVTUNet of its text encoder's width (with ``vae_config``'s VAE, VAED4's by default)."""
    checkpoint = os.path.join(os.fspath(models_dir), TVT_WORKFLOW_MODELS[0])
    text_width = save_sd21_stand_in(checkpoint, models_dir).config.cross_attention_dim
    write_tvt_files(os.path.join(os.fspath(models_dir), "tvt"), {**TINY_TVT_UNET, "cross_attention_dim": text_width},
                    vae_config=vae_config)


TINY_IMAGE_ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
                      "patch_size": 32, "image_size": 224, "projection_dim": 16, "hidden_act": "gelu"}


def write_diffeditor_image_prompt(models_dir: str | os.PathLike, cross_attention_widths: tuple[int, ...],
                                  text_width: int, seed: int = 0) -> tuple[str, str]:
    """DiffEditor's image-prompt files for a UNet of those cross-attentions (in the published order) over
    ``text_width``-wide text, under ``models_dir``: a random adapter in ip_sd15_64's layout (2 Resampler layers),
    ``diffeditor/ip_tiny.safetensors``, over a small CLIP vision tower, ``clip_vision/tiny_vit/model.safetensors``
    with its ``config.json`` beside it. Returns the two names."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from nodes.dragedit.image_prompt import ImagePromptAdapter

    torch.manual_seed(seed)
    adapter = ImagePromptAdapter(cross_attention_widths, text_width, TINY_IMAGE_ENCODER["hidden_size"], depth=2,
                                 heads=2)
    for parameter in adapter.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    os.makedirs(os.path.join(models_dir, "diffeditor"), exist_ok=True)
    save_file(adapter.state_dict(), os.path.join(models_dir, "diffeditor", "ip_tiny.safetensors"))
    config = CLIPVisionConfig(**TINY_IMAGE_ENCODER)
    encoder = CLIPVisionModelWithProjection(config)
    folder = os.path.join(models_dir, "clip_vision", "tiny_vit")
    os.makedirs(folder, exist_ok=True)
    config.to_json_file(os.path.join(folder, "config.json"))
    save_file({key: value.contiguous() for key, value in encoder.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    return "ip_tiny.safetensors", "tiny_vit/model.safetensors"
