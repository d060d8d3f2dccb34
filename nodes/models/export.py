"""Export a diffusers pipeline folder (SD1, SD2, SDXL, SDXL refiner) as one original-layout (LDM) ``.safetensors``
file, and write random-weight files of the published layouts: checkpoints, separate VAEs and LoRAs.

diffusers ships no exporter in this direction, and the script in its repository's ``scripts/`` folder hard-codes
SD1.5's 4 levels × 2 layers and the old VAE attention names. This one is generic over the number of levels, the
layers per block and the transformer depth, so tests and benchmarks can write single files of narrow models.
It checks its own output by converting it back with diffusers' own LDM → diffusers converters.

The random writers (:func:`write_random_single_file`, :func:`write_random_vae`, :func:`write_random_lora`) write
the files that ComfyUI's template workflows name, at the published widths or at reduced width
(:func:`configs_at_width`), so that tests can run those workflows offline.

The key map, diffusers → LDM (``n`` levels, ``L`` = layers_per_block; environment.md §5). UNet keys go under
``model.diffusion_model.``, VAE keys under ``first_stage_model.``:

- ``time_embedding.linear_1/2``, ``conv_in``, ``conv_norm_out``, ``conv_out`` → ``time_embed.0/2``,
  ``input_blocks.0.0``, ``out.0``, ``out.2``; SDXL's ``add_embedding.linear_1/2`` → ``label_emb.0.0/2``.
- ``down_blocks.i.resnets.j`` / ``.attentions.j`` → ``input_blocks.{1+i(L+1)+j}.0`` / ``.1``;
  ``down_blocks.i.downsamplers.0.conv`` → ``input_blocks.{(i+1)(L+1)}.0.op``.
- ``up_blocks.i.resnets.j`` / ``.attentions.j`` → ``output_blocks.{i(L+1)+j}.0`` / ``.1``;
  ``up_blocks.i.upsamplers.0`` → ``output_blocks.{i(L+1)+L}.{2 if the block has attention else 1}``.
- ``mid_block.resnets.0/1``, ``mid_block.attentions.0`` → ``middle_block.0/2``, ``middle_block.1``.
- In UNet resnets: ``norm1 conv1 norm2 conv2 time_emb_proj conv_shortcut`` → ``in_layers.0 in_layers.2
  out_layers.0 out_layers.3 emb_layers.1 skip_connection``.
- VAE: ``encoder.down_blocks.i.resnets.j`` → ``encoder.down.i.block.j`` (``downsamplers.0`` → ``downsample``);
  ``decoder.up_blocks.i.…`` → ``decoder.up.{n−1−i}.…`` (reversed); ``mid_block.resnets.0/1`` →
  ``mid.block_1/2``; ``mid_block.attentions.0`` → ``mid.attn_1`` with ``group_norm/to_q/to_k/to_v/to_out.0`` →
  ``norm/q/k/v/proj_out`` as 1×1 convs; ``conv_shortcut`` → ``nin_shortcut``, ``conv_norm_out`` → ``norm_out``.
- OpenAI CLIP text encoders (SD1; SDXL's first) → ``cond_stage_model.transformer.text_model.…`` (SDXL:
  ``conditioner.embedders.0.transformer.text_model.…``).
- OpenCLIP text encoders (SD2; SDXL's second; the refiner's only one) → ``cond_stage_model.model.…`` (SDXL:
  ``conditioner.embedders.1.model.…``, the refiner: ``conditioner.embedders.0.model.…``): ``q/k/v_proj`` → one
  ``attn.in_proj``, ``fc1/fc2`` → ``c_fc/c_proj``, ``layer_norm1/2`` → ``ln_1/2``, ``text_projection`` transposed.

Inside UNet attentions the transformer blocks keep their diffusers names.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from .families import (FAMILIES, UNET_INPUT_CHANNELS, UNET_PREFIX, V_PREDICTION_MARKER_KEY, V_PREDICTION_PROBE_KEY,
                       family_from_diffusers_folder, read_json)
from .model_configs import (ADDED_TIME_IDS, HEAD_WIDTH, TEXT_ENCODERS, component_configs, heads_for_width,
                            shipped_config_dir)

VAE_PREFIX = "first_stage_model."
UNET_RESNET_RENAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                       ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                       ("conv_shortcut", "skip_connection"))
UNET_TOP_RENAMES = (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                    ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
                    ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"))
OPEN_CLIP_LAYER_RENAMES = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                           ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))


def _unet_block_prefixes(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every UNet block, for any number of levels and layers per block."""
    layers, levels = config["layers_per_block"], len(config["block_out_channels"])
    up_has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    prefixes = []
    for i in range(levels):
        for j in range(layers):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * (layers + 1) + j}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * (layers + 1) + j}.1."))
        if i < levels - 1:
            prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op."))
        for j in range(layers + 1):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (layers + 1) + j}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (layers + 1) + j}.1."))
        if i < levels - 1:
            slot = 2 if up_has_attention[i] else 1
            prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (layers + 1) + layers}.{slot}."))
    prefixes += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
                 ("mid_block.resnets.1.", "middle_block.2.")]
    return prefixes


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to the LDM layout, under ``model.diffusion_model.``.

    Args:
        state_dict: the UNet's tensors, diffusers names.
        config: the UNet's ``config.json`` (``layers_per_block``, ``block_out_channels``, ``up_block_types``).
    Returns:
        The same tensors under LDM names.
    """
    prefixes = _unet_block_prefixes(config)
    out = {}
    for key, value in state_dict.items():
        new = key
        for old, ldm in UNET_TOP_RENAMES:
            if new.startswith(old + "."):
                new = ldm + new[len(old):]
        for old, ldm in prefixes:
            if new.startswith(old):
                rest = new[len(old):]
                if ".resnets." in old:
                    for resnet_old, resnet_ldm in UNET_RESNET_RENAMES:
                        if rest.startswith(resnet_old + "."):
                            rest = resnet_ldm + rest[len(resnet_old):]
                new = ldm + rest
                break
        out[UNET_PREFIX + new] = value
    return out


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to the LDM layout, under ``first_stage_model.``.

    The mid-block attention's linear weights become LDM's 1×1 convolutions ``(C, C, 1, 1)``.
    """
    levels, out = len(config["block_out_channels"]), {}
    for key, value in state_dict.items():
        new = key
        for i in range(levels):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, ldm in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                             ("to_out.0.", "proj_out.")):
                new = new.replace(old, ldm)
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def _strip_text_model(key: str) -> str:
    # transformers 5 saves CLIPTextModel keys without "text_model." (CLIPTextModelWithProjection keeps it).
    return key.removeprefix("text_model.")


def clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI-CLIP text encoder (transformers ``CLIPTextModel``) under ``prefix + "text_model."``.

    Accepts keys with or without ``text_model.`` (older and newer transformers).
    """
    return {prefix + "text_model." + _strip_text_model(key): value for key, value in state_dict.items()
            if _strip_text_model(key) != "embeddings.position_ids"}


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder written in OpenCLIP's layout under ``prefix``, as SD2 and SDXL store it.

    q, k and v projections are concatenated into ``attn.in_proj_weight``/``in_proj_bias`` (in that order);
    ``text_projection.weight`` (a Linear weight, (P, D)) becomes OpenCLIP's ``text_projection`` (D, P).

    Raises:
        ValueError: a tensor this layout has no place for.
    """
    out: dict[str, torch.Tensor] = {}
    tensors = {_strip_text_model(key): value for key, value in state_dict.items()}
    tensors.pop("embeddings.position_ids", None)
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    layers = sorted({int(key.split(".")[2]) for key in tensors if key.startswith("encoder.layers.")})
    for key, ldm in fixed.items():
        out[prefix + ldm] = tensors.pop(key)
    if "text_projection.weight" in tensors:
        out[prefix + "text_projection"] = tensors.pop("text_projection.weight").T.contiguous()
    for layer in layers:
        source, target = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [tensors.pop(f"{source}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")])
        for key in [key for key in tensors if key.startswith(source)]:
            rest = key[len(source):]
            for old, ldm in OPEN_CLIP_LAYER_RENAMES:
                if rest.startswith(old):
                    rest = ldm + rest[len(old):]
                    break
            else:
                raise ValueError(f"text encoder tensor {key!r} has no place in the OpenCLIP layout")
            out[target + rest] = tensors.pop(key)
    if tensors:
        raise ValueError(f"text encoder tensors {sorted(tensors)[:5]} have no place in the OpenCLIP layout")
    return out


def _read_config(folder: str, component: str, name: str = "config.json") -> dict:
    return read_json(os.path.join(folder, component, name))


def _load_weights(folder: str, component: str) -> dict[str, torch.Tensor]:
    directory = os.path.join(folder, component)
    names = [name for name in os.listdir(directory) if name.endswith(".safetensors")]
    if len(names) != 1:
        raise FileNotFoundError(f"{directory!r} must hold one .safetensors weight file; found {sorted(names)}")
    return load_file(os.path.join(directory, names[0]))


def _verify(family: str, folder: str, ldm: dict[str, torch.Tensor], parts: dict[str, dict]) -> None:
    """Convert ``ldm`` back with diffusers' own converters and require every tensor to come back bit-exact."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig

    class _Config:  # convert_open_clip_checkpoint reads only config.hidden_size from the model it is given
        def __init__(self, config):
            self.config = config

    backs = {"unet": convert_ldm_unet_checkpoint(dict(ldm), _read_config(folder, "unet")),
             "vae": convert_ldm_vae_checkpoint(dict(ldm), _read_config(folder, "vae"))}
    for component, prefix, open_clip in TEXT_ENCODERS[family]:
        if open_clip:
            model = _Config(CLIPTextConfig(**_read_config(folder, component)))
            backs[component] = convert_open_clip_checkpoint(model, dict(ldm), prefix=prefix)
        else:
            own = {key: value for key, value in ldm.items() if key.startswith(prefix)}
            backs[component] = convert_ldm_clip_checkpoint(own)
    for name, reference in parts.items():
        back = backs[name]
        if name.startswith("text_encoder"):
            reference = {_strip_text_model(k): v for k, v in reference.items() if not k.endswith("position_ids")}
            back = {_strip_text_model(k): v for k, v in back.items()}
        if set(reference) != set(back):
            raise RuntimeError(f"export of {name} does not round-trip: keys differ, for example "
                               f"{sorted(set(reference) ^ set(back))[:5]}")
        for key, value in reference.items():
            if not torch.equal(value, back[key].reshape(value.shape)):
                raise RuntimeError(f"export of {name} does not round-trip: tensor {key!r} differs")


def to_ldm(family: str, parts: Mapping[str, dict[str, torch.Tensor]], configs: Mapping[str, dict]) -> dict:
    """A whole checkpoint in the LDM layout from its components' diffusers state dicts."""
    ldm = {**unet_to_ldm(parts["unet"], configs["unet"]), **vae_to_ldm(parts["vae"], configs["vae"])}
    for component, prefix, open_clip in TEXT_ENCODERS[family]:
        ldm.update((open_clip_to_ldm if open_clip else clip_to_ldm)(parts[component], prefix))
    return ldm


def export_single_file(pipeline_dir: str | os.PathLike, out_file: str | os.PathLike, verify: bool = True) -> str:
    """Write a diffusers pipeline folder of any of ``families.FAMILIES`` as one original-layout ``.safetensors``
    checkpoint.

    Args:
        pipeline_dir: a folder written by ``save_pretrained`` with safetensors weights.
        out_file: the ``.safetensors`` file to write.
        verify: convert the result back with diffusers' converters and require a bit-exact round trip first.
    Returns:
        The family that was exported.
    Raises:
        FileNotFoundError: a component's config or weights are missing.
        RuntimeError: ``verify`` found a tensor that does not come back unchanged.
    """
    folder = os.fspath(pipeline_dir)
    family = family_from_diffusers_folder(folder)
    components = ("unet", "vae", *(component for component, _, _ in TEXT_ENCODERS[family]))
    parts = {name: _load_weights(folder, name) for name in components}
    ldm = to_ldm(family, parts, {name: _read_config(folder, name) for name in ("unet", "vae")})
    if verify:
        _verify(family, folder, ldm, parts)
    save_file({key: value.contiguous() for key, value in ldm.items()}, os.fspath(out_file))
    return family


# --- random-weight files of the published layouts --------------------------------------------------------------------

RANDOM_STD = 0.02  # the spread of embeddings (CLIP's initialisation) and of tensors no layer type explains
# A 768-v SD2 file as ComfyUI's heuristic reads it: the probe tensor's std above its 0.09 threshold.
V_PREDICTION_PROBE_STD = 0.2
OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature; no layer SD uses reads it
LORA_TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def configs_at_width(family: str, width: int | None = None) -> dict[str, dict]:
    """The component configs of ``family`` with the UNet's first width ``width`` (None: the published widths).

    The family's layout at reduced width: every UNet level keeps its multiplier of the first width, the text
    encoders and the VAE narrow by the same factor (text widths rounded to multiples of 64, VAE widths to 32, so
    heads of 64 and 32-group norms still fit), depths and block types stay. A file written from these configs
    loads through ``model_configs.single_file_config_dir``, which derives the same widths back from its shapes.

    Raises:
        ValueError: an unknown family, or a width that is not a positive multiple of 32.
    """
    configs = copy.deepcopy(component_configs(shipped_config_dir(family)))
    if width is None:
        return configs
    published = configs["unet"]["block_out_channels"]
    if width <= 0 or width % 32:
        raise ValueError(f"width must be a positive multiple of 32 (GroupNorm's 32 groups); got {width}")
    factor = width / published[0]
    unet = configs["unet"]
    unet["block_out_channels"] = [width * channels // published[0] for channels in published]
    unet["attention_head_dim"] = [heads_for_width(channels) for channels in unet["block_out_channels"]]
    vae = configs["vae"]
    vae_width = max(32, round(vae["block_out_channels"][0] * factor / 32) * 32)
    vae["block_out_channels"] = [vae_width * channels // vae["block_out_channels"][0]
                                 for channels in vae["block_out_channels"]]
    for component, _, _ in TEXT_ENCODERS[family]:
        text = configs[component]
        hidden = max(HEAD_WIDTH, round(text["hidden_size"] * factor / HEAD_WIDTH) * HEAD_WIDTH)
        text.update(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // HEAD_WIDTH)
        if component == "text_encoder_2":
            text["projection_dim"] = hidden
    unet["cross_attention_dim"] = sum(configs[component]["hidden_size"] for component, _, _ in TEXT_ENCODERS[family])
    if family in ADDED_TIME_IDS:
        unet["projection_class_embeddings_input_dim"] = (configs["text_encoder_2"]["projection_dim"]
                                                         + ADDED_TIME_IDS[family] * unet["addition_time_embed_dim"])
    return configs


def build_on_meta(family: str, configs: Mapping[str, dict], extra_text_layers: int = 0) -> dict[str, torch.nn.Module]:
    """The components of ``family`` on the meta device (shapes only, no memory), by component name.

    Args:
        extra_text_layers: layers to add to each OpenCLIP text encoder: the published SD2 files hold the 24th layer
            of OpenCLIP ViT-H that diffusers' 23-layer config drops (SD2 uses the penultimate layer).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                  "vae": AutoencoderKL.from_config(configs["vae"])}
        for component, _, open_clip in TEXT_ENCODERS[family]:
            config = dict(configs[component])
            if open_clip:
                config["num_hidden_layers"] += extra_text_layers
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            models[component] = cls(CLIPTextConfig(**config))
    return models


class _RandomBlock:
    """Standard-normal tensors of any shape as slices of one random block at varying offsets, so that billions of
    parameters cost a memory copy, not random number generation."""

    OFFSETS = 8191  # a prime: tensors start at different places in the block

    def __init__(self, numel: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.block = torch.randn(numel + self.OFFSETS, generator=generator)
        self.count = 0

    def take(self, shape: Sequence[int]) -> torch.Tensor:
        start = self.count * 7919 % self.OFFSETS
        self.count += 1
        return self.block[start:start + math.prod(shape)].reshape(tuple(shape))


def _spreads(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """(mean, std) for each parameter of ``model``, as the libraries initialise it: norm scales 1 and shifts 0,
    linear and convolution weights and biases at std 1/√(3·fan_in) (PyTorch's default uniform), embeddings at std
    0.02 (CLIP's). With weights this spread a random model's output depends on its input, as a trained one's does;
    at one small std everywhere the norms' scales are near 0 and the image hardly depends on the seed."""
    spreads = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, _ in module.named_parameters(recurse=False):
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                spreads[prefix + name] = (1.0, 0.0) if name == "weight" else (0.0, 0.0)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                spreads[prefix + name] = (0.0, 1 / math.sqrt(3 * module.weight[0].numel()))
            elif isinstance(module, torch.nn.Embedding):
                spreads[prefix + name] = (0.0, RANDOM_STD)
    return spreads


def _random_state(models: Mapping[str, torch.nn.Module], seed: int, dtype: torch.dtype) -> dict[str, dict]:
    """Random floating-point tensors for every state-dict entry of each model (meta tensors give the shapes),
    spread as :func:`_spreads` says (:data:`RANDOM_STD` for any other)."""
    largest = max(meta.numel() for model in models.values() for meta in model.state_dict().values())
    block = _RandomBlock(largest, seed)
    state = {}
    for name, model in models.items():
        spreads = _spreads(model)
        state[name] = {}
        for key, meta in model.state_dict().items():
            if meta.is_floating_point():
                mean, std = spreads.get(key, (0.0, RANDOM_STD))
                state[name][key] = (block.take(meta.shape) * std + mean).to(dtype)
    return state


def write_random_single_file(family: str, out_file: str | os.PathLike, seed: int = 0,
                             dtype: torch.dtype = torch.float16, *, width: int | None = None,
                             unet_in_channels: int = 4, prediction_type: str = "epsilon") -> None:
    """Write an original-layout single file of ``family`` with random weights, in the published key layout.

    For tests and benchmarks of real layouts. The models are built on the meta device (no initialisation cost) and
    filled from one random block (:class:`_RandomBlock`), each tensor spread as the libraries initialise it
    (:func:`_spreads`), so that the output depends on the seed, the prompt and the sampler.
    ``float16`` on disk, as released checkpoints are (SD1.5 2.1 GB, SDXL 6.9 GB at the published widths).

    Args:
        family: one of ``families.FAMILIES``.
        out_file: the ``.safetensors`` file to write.
        seed: the random block's seed.
        dtype: the tensors' dtype on disk.
        width: the UNet's first width for the family's layout at reduced width (:func:`configs_at_width`);
            None writes the published widths (SD1.5 320, SDXL 320, refiner 384).
        unet_in_channels: 4, or 9 for an inpainting model (``512-inpainting-ema``, ``sd-v1-5-inpainting``).
        prediction_type: ``"v_prediction"`` writes what marks a v model for ComfyUI and for
            ``families.prediction_type_from_weights``: for SD2 (768-v) the probe tensor at std 0.2, as the real
            768-v files have it above 0.09; for SDXL ComfyUI's empty ``v_pred`` tensor.
    Raises:
        ValueError: an unknown family, a bad width, input channels other than 4 or 9, or v-prediction for a
            family that cannot mark it (SD1, the refiner) or for an SD2 inpainting model (ComfyUI reads those as
            epsilon whatever they hold).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    if unet_in_channels not in UNET_INPUT_CHANNELS:
        raise ValueError(f"unet_in_channels must be one of {UNET_INPUT_CHANNELS}; got {unet_in_channels}")
    markable = {"sd2": unet_in_channels == 4, "sdxl": True}
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction'; got {prediction_type!r}")
    if prediction_type == "v_prediction" and not markable.get(family, False):
        raise ValueError(f"a {family} file with a {unet_in_channels}-channel UNet cannot be marked as "
                         f"v-prediction (ComfyUI reads it as epsilon); v-prediction files are SD2 or SDXL")
    configs = configs_at_width(family, width)
    configs["unet"]["in_channels"] = unet_in_channels
    models = build_on_meta(family, configs, extra_text_layers=1 if family == "sd2" else 0)
    parts = _random_state(models, seed, dtype)
    state = to_ldm(family, parts, configs)
    generator = torch.Generator().manual_seed(seed)
    for component, prefix, open_clip in TEXT_ENCODERS[family]:
        if open_clip:  # the rest of OpenCLIP's text tower that the LDM embedders keep (they drop only .visual)
            hidden = configs[component]["hidden_size"]
            projection = torch.randn(hidden, hidden, generator=generator) * RANDOM_STD
            state.setdefault(prefix + "text_projection", projection.to(dtype))  # SD2's: SDXL's are written above
            state[prefix + "logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE, dtype=dtype)
    if prediction_type == "v_prediction" and family == "sd2":
        probe = state[V_PREDICTION_PROBE_KEY]
        probe_values = torch.randn(probe.shape, generator=generator) * V_PREDICTION_PROBE_STD
        state[V_PREDICTION_PROBE_KEY] = probe_values.to(dtype)
    elif prediction_type == "v_prediction":
        state[V_PREDICTION_MARKER_KEY] = torch.tensor([], dtype=dtype)
    save_file(state, os.fspath(out_file))


def write_random_vae(out_file: str | os.PathLike, layout: str = "ldm", seed: int = 0,
                     dtype: torch.dtype = torch.float16, *, width: int | None = None) -> None:
    """Write a separate VAE file with random weights, as ``models/vae`` holds them.

    Args:
        layout: ``"ldm"``, the layout of ``vae-ft-mse-840000-ema-pruned.safetensors`` and ``sdxl_vae.safetensors``
            (``encoder.``, ``decoder.``, ``quant_conv.``, ``post_quant_conv.``, attention as 1×1 convolutions), or
            ``"diffusers"`` (``AutoencoderKL``'s own names, ``encoder.down_blocks.…``).
        width: the encoder's first width (None: the published 128); a positive multiple of 32.
    Raises:
        ValueError: another layout, or a bad width.
    """
    if layout not in ("ldm", "diffusers"):
        raise ValueError(f"layout must be 'ldm' or 'diffusers'; got {layout!r}")
    config = copy.deepcopy(component_configs(shipped_config_dir("sd1"))["vae"])
    if width is not None:
        if width <= 0 or width % 32:
            raise ValueError(f"width must be a positive multiple of 32; got {width}")
        config["block_out_channels"] = [width * channels // config["block_out_channels"][0]
                                        for channels in config["block_out_channels"]]
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    tensors = _random_state({"vae": vae}, seed, dtype)["vae"]
    if layout == "ldm":
        tensors = {key.removeprefix(VAE_PREFIX): value for key, value in vae_to_ldm(tensors, config).items()}
    save_file(tensors, os.fspath(out_file))


def _lora_targets(family: str, models: Mapping[str, torch.nn.Module]) -> list[tuple[str, str, torch.nn.Module]]:
    """(component, module name, module) of every layer kohya's sd-scripts trains in a LoRA (``networks/lora.py``):
    the linear and 1×1 convolution layers inside the UNet's transformer blocks (``attentions.``: proj_in,
    proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2) and the text encoders' attention and
    MLP projections."""
    targets = []
    for component, model in models.items():
        for name, module in model.named_modules():
            if component == "unet":
                wanted = ".attentions." in name and (
                    isinstance(module, torch.nn.Linear)
                    or isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1))
            else:
                wanted = isinstance(module, torch.nn.Linear) and name.endswith(LORA_TEXT_MODULES)
            if wanted:
                targets.append((component, name, module))
    return targets


def write_random_lora(family: str, out_file: str | os.PathLike, layout: str = "kohya", seed: int = 0,
                      dtype: torch.dtype = torch.float16, *, width: int | None = None, rank: int = 4,
                      alpha: float = 2.0, scale: float = 0.1) -> None:
    """Write a random LoRA for ``family``'s layout (at the published widths or :func:`configs_at_width`).

    The same seed gives the same LoRA in either layout:

    - ``"kohya"``: the layout of LoRAs downloaded for SD1.5 and SDXL (kohya's sd-scripts, A1111): ``lora_unet_…``
      and ``lora_te_…`` (SDXL: ``lora_te1_…``, ``lora_te2_…``) module names with ``_`` for ``.`` (SD1/SD2:
      diffusers' UNet names, ``down_blocks_0_attentions_0_…``; SDXL: the LDM ones, ``input_blocks_4_1_…``), each
      with ``.lora_down.weight`` (rank, in[, 1, 1]), ``.lora_up.weight`` (out, rank[, 1, 1]) and ``.alpha``; the
      branch acts as (alpha / rank)·up·down. sd-scripts' ``ss_network_module`` metadata is set.
    - ``"peft"``: diffusers' own layout, ``unet.<module>.lora_A.weight`` and ``lora_B.weight`` (text encoders
      under ``text_encoder.``/``text_encoder_2.``), with alpha / rank folded into ``lora_B``.

    Args:
        rank: the LoRA rank; alpha: kohya's alpha; scale: the spread of the random down and up weights.
    Raises:
        ValueError: an unknown family or layout.
    """
    if layout not in ("kohya", "peft"):
        raise ValueError(f"layout must be 'kohya' or 'peft'; got {layout!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    configs = configs_at_width(family, width)
    models = build_on_meta(family, configs)
    del models["vae"]
    ldm_blocks = _unet_block_prefixes(configs["unet"])
    text_names = {component for component, _, _ in TEXT_ENCODERS[family]}
    kohya_text = ({"text_encoder": "lora_te_"} if len(text_names) == 1 and "text_encoder" in text_names
                  else {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"})
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for component, name, module in _lora_targets(family, models):
        weight_shape = tuple(module.weight.shape)
        kernel = weight_shape[2:]  # (1, 1) for a 1×1 convolution, () for a linear layer
        down = torch.randn(rank, weight_shape[1], *kernel, generator=generator) * scale
        up = torch.randn(weight_shape[0], rank, *kernel, generator=generator) * scale
        if layout == "kohya":
            if component != "unet":
                module_name = "text_model." + name.removeprefix("text_model.")
            elif family.startswith("sdxl"):  # sd-scripts trains SDXL on its own UNet, with the LDM block names
                old, ldm = next((old, ldm) for old, ldm in ldm_blocks if name.startswith(old))
                module_name = ldm + name[len(old):]
            else:  # and SD1/SD2 on diffusers' UNet
                module_name = name
            key = ("lora_unet_" if component == "unet" else kohya_text[component]) + module_name.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down.to(dtype), f"{key}.lora_up.weight": up.to(dtype),
                            f"{key}.alpha": torch.tensor(alpha, dtype=dtype)})
        else:
            tensors.update({f"{component}.{name}.lora_A.weight": down.to(dtype),
                            f"{component}.{name}.lora_B.weight": (up * (alpha / rank)).to(dtype)})
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    save_file(tensors, os.fspath(out_file), metadata=metadata if layout == "kohya" else None)
