"""Export a diffusers SD1, SD2 or SDXL pipeline folder as one original-layout (LDM) ``.safetensors`` file.

diffusers ships no exporter in this direction, and the script in its repository's ``scripts/`` folder hard-codes
SD1.5's 4 levels × 2 layers and the old VAE attention names. This one is generic over the number of levels, the
layers per block and the transformer depth, so tests and benchmarks can write single files of narrow models.
It checks its own output by converting it back with diffusers' own LDM → diffusers converters.

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
- OpenCLIP text encoders (SD2; SDXL's second) → ``cond_stage_model.model.…`` (SDXL:
  ``conditioner.embedders.1.model.…``): ``q/k/v_proj`` → one ``attn.in_proj``, ``fc1/fc2`` → ``c_fc/c_proj``,
  ``layer_norm1/2`` → ``ln_1/2``, ``text_projection`` transposed.

Inside UNet attentions the transformer blocks keep their diffusers names.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from .families import (SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_TEXT_PREFIXES, UNET_PREFIX,
                       family_from_diffusers_folder, read_json)

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
    if family == "sd1":
        backs["text_encoder"] = convert_ldm_clip_checkpoint(dict(ldm))
    elif family == "sd2":
        model = _Config(CLIPTextConfig(**_read_config(folder, "text_encoder")))
        backs["text_encoder"] = convert_open_clip_checkpoint(model, dict(ldm), prefix=SD2_TEXT_PREFIX)
    else:
        first = {key: value for key, value in ldm.items() if key.startswith(SDXL_TEXT_PREFIXES[0])}
        backs["text_encoder"] = convert_ldm_clip_checkpoint(first)
        model = _Config(CLIPTextConfig(**_read_config(folder, "text_encoder_2")))
        backs["text_encoder_2"] = convert_open_clip_checkpoint(model, dict(ldm), prefix=SDXL_TEXT_PREFIXES[1])
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


def export_single_file(pipeline_dir: str | os.PathLike, out_file: str | os.PathLike, verify: bool = True) -> str:
    """Write a diffusers SD1/SD2/SDXL pipeline folder as one original-layout ``.safetensors`` checkpoint.

    Args:
        pipeline_dir: a folder written by ``save_pretrained`` with safetensors weights.
        out_file: the ``.safetensors`` file to write.
        verify: convert the result back with diffusers' converters and require a bit-exact round trip first.
    Returns:
        The family that was exported (``"sd1"``, ``"sd2"`` or ``"sdxl"``).
    Raises:
        FileNotFoundError: a component's config or weights are missing.
        RuntimeError: ``verify`` found a tensor that does not come back unchanged.
    """
    folder = os.fspath(pipeline_dir)
    family = family_from_diffusers_folder(folder)
    parts = {name: _load_weights(folder, name) for name in ("unet", "vae", "text_encoder")}
    ldm = {**unet_to_ldm(parts["unet"], _read_config(folder, "unet")),
           **vae_to_ldm(parts["vae"], _read_config(folder, "vae"))}
    if family == "sd1":
        ldm.update(clip_to_ldm(parts["text_encoder"], SD1_TEXT_PREFIX))
    elif family == "sd2":
        ldm.update(open_clip_to_ldm(parts["text_encoder"], SD2_TEXT_PREFIX))
    else:
        parts["text_encoder_2"] = _load_weights(folder, "text_encoder_2")
        ldm.update(clip_to_ldm(parts["text_encoder"], SDXL_TEXT_PREFIXES[0]))
        ldm.update(open_clip_to_ldm(parts["text_encoder_2"], SDXL_TEXT_PREFIXES[1]))
    if verify:
        _verify(family, folder, ldm, parts)
    save_file({key: value.contiguous() for key, value in ldm.items()}, os.fspath(out_file))
    return family


def write_random_single_file(family: str, out_file: str | os.PathLike, seed: int = 0,
                             dtype: torch.dtype = torch.float16) -> None:
    """Write a full-size ``family`` ("sd1", "sd2" or "sdxl") original-layout single file with random weights.

    For tests and benchmarks of real architectures: speed and memory do not depend on weight values. The models
    are built on the meta device from the shipped configs (no initialisation cost), and every tensor is a copy
    of a slice of one random block at its own offset, so the 1–3.5 B parameters cost a memory copy, not random
    number generation. ``float16`` on disk, as released checkpoints are (SD1.5 2.1 GB, SDXL 6.9 GB).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .loading import shipped_config_dir

    config_dir = shipped_config_dir(family)
    encoders = {"sd1": [("text_encoder", CLIPTextModel)], "sd2": [("text_encoder", CLIPTextModel)],
                "sdxl": [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)]}[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae"))
        texts = [cls(CLIPTextConfig(**_read_config(config_dir, name))) for name, cls in encoders]
    models = (unet, vae, *texts)
    largest = max(meta.numel() for model in models for meta in model.state_dict().values())
    offsets = 8191  # a prime: tensors start at different places in the block
    generator = torch.Generator().manual_seed(seed)
    block = (torch.randn(largest + offsets, generator=generator) * 0.02).to(dtype)

    def fill(model) -> dict[str, torch.Tensor]:
        tensors = {}
        for index, (name, meta) in enumerate(model.state_dict().items()):
            if meta.is_floating_point():
                start = index * 7919 % offsets
                tensors[name] = block[start:start + meta.numel()].reshape(meta.shape).clone()
        return tensors

    state = {**unet_to_ldm(fill(unet), dict(unet.config)), **vae_to_ldm(fill(vae), dict(vae.config))}
    if family == "sd1":
        state.update(clip_to_ldm(fill(texts[0]), SD1_TEXT_PREFIX))
    elif family == "sd2":
        state.update(open_clip_to_ldm(fill(texts[0]), SD2_TEXT_PREFIX))
    else:
        state.update(clip_to_ldm(fill(texts[0]), SDXL_TEXT_PREFIXES[0]))
        state.update(open_clip_to_ldm(fill(texts[1]), SDXL_TEXT_PREFIXES[1]))
    save_file(state, os.fspath(out_file))
