"""A checkpoint with its UNet replaced by a UNet file, in whichever host runs it: MODEL, CLIP and VAE.

Standalone, :func:`~.loader.load_model` with ``unet_file`` builds the model (the file's layout matched on the meta
device, pruned experts included). Inside ComfyUI, ``comfy.sd.load_diffusion_model`` reads the files it recognises
(the checkpoint's layout, KOALA's); a structurally pruned file (APTP's experts), which ComfyUI's detection cannot
place, is loaded into the checkpoint's own ComfyUI model rebuilt at the file's widths
(:func:`~.pruned_unet.prune_to_shapes` on ComfyUI's modules, diffusers names mapped by ``comfy.utils``).
"""

from __future__ import annotations

import os
from typing import Any

from safetensors import safe_open

from ..common.comfy_host import comfy_model_family, comfy_module, inside_comfyui
from ..common.denoiser import DiffusersCodec
from .clip import Clip
from .families import UnknownModelLayoutError, family_from_diffusers_folder, inspect_single_file
from .formats import check_folder_weights, check_safetensors, layout_difference, tensor_shapes
from .loader import load_model
from .pruned_unet import prune_to_shapes
from .refs import ModelRef
from .sources import comfy_folder_paths

EMBEDDINGS_FOLDER = "embeddings"


def load_checkpoint_with_unet(checkpoint: str, unet_file: str, models_dir: str | None) -> tuple[Any, Any, Any]:
    """MODEL, CLIP and VAE of ``checkpoint`` (a path) with the UNet of ``unet_file`` (a diffusers-layout
    ``.safetensors`` path); ``models_dir`` is the standalone models folder (for textual-inversion embeddings)."""
    check_safetensors(unet_file)
    if inside_comfyui():
        return _comfy_checkpoint_with_unet(checkpoint, unet_file)
    ref = ModelRef(load_model(checkpoint, unet_file=unet_file))
    embedding_dirs = () if models_dir is None else (os.path.join(models_dir, EMBEDDINGS_FOLDER),)
    return ref, Clip(ref, embedding_dirs=embedding_dirs), DiffusersCodec(ref.model.vae, recipe=ref.recipe())


def _comfy_checkpoint_with_unet(checkpoint: str, unet_file: str) -> tuple[Any, Any, Any]:
    """ComfyUI's MODEL of the UNet file with the checkpoint's CLIP and VAE; the two must be of one family."""
    embeddings = comfy_folder_paths().get_folder_paths(EMBEDDINGS_FOLDER)
    if os.path.isdir(checkpoint):
        check_folder_weights(checkpoint)  # ComfyUI's reader would fall back to a folder's pickles
        base, clip, vae = comfy_module("comfy.diffusers_load").load_diffusers(
            checkpoint, output_vae=True, output_clip=True, embedding_directory=embeddings)
        family = family_from_diffusers_folder(checkpoint)
    else:
        check_safetensors(checkpoint)
        base, clip, vae, _ = comfy_module("comfy.sd").load_checkpoint_guess_config(
            checkpoint, output_vae=True, output_clip=True, output_model=True, embedding_directory=embeddings)
        family = inspect_single_file(checkpoint).family
    try:
        model = comfy_module("comfy.sd").load_diffusion_model(unet_file)
    except RuntimeError:  # ComfyUI's detection knows no such layout: a pruning of the checkpoint's UNet, or none
        model = _comfy_pruned_unet(base, unet_file)
    unet_family = comfy_model_family(model)
    if unet_family != family:
        raise ValueError(f"{os.path.basename(unet_file)!r} is a {unet_family} UNet and "
                         f"{os.path.basename(checkpoint)!r} a {family} checkpoint: give the checkpoint the UNet was "
                         f"trained from")
    return model, clip, vae


def _comfy_pruned_unet(base: Any, unet_file: str) -> Any:
    """A new ModelPatcher of the checkpoint's ComfyUI model (``base``) rebuilt at a pruned file's widths and depth,
    holding the file's weights. ComfyUI's transformer blocks keep their ``n_heads`` (the full count), which they only
    hand to attention patches as ``extra_options``; the attention layers themselves count their pruned heads (a
    block's two attentions may keep different counts, so no one value would fit).

    Raises:
        families.UnknownModelLayoutError: the file is no pruning of the checkpoint's UNet.
    """
    comfy_utils = comfy_module("comfy.utils")
    openaimodel = comfy_module("comfy.ldm.modules.diffusionmodules.openaimodel")
    attention = comfy_module("comfy.ldm.modules.attention")
    model = base.model
    ldm_names = comfy_utils.unet_to_diffusers(model.model_config.unet_config)  # diffusers name → ComfyUI's
    name = os.path.basename(unet_file)
    with safe_open(unet_file, framework="pt") as handle:
        names = list(handle.keys())
        unknown = [key for key in names if key not in ldm_names]
        if unknown:
            raise UnknownModelLayoutError(f"{name!r} is not a UNet this checkpoint can take: {len(unknown)} of its "
                                          f"tensors are no part of it, such as {unknown[0]!r}")
        shapes = {ldm_names[key]: tuple(handle.get_slice(key).get_shape()) for key in names}
    network = model.diffusion_model
    expected = tensor_shapes(network.state_dict())
    prune_to_shapes(network, shapes, (openaimodel.ResBlock, attention.SpatialTransformer))
    if tensor_shapes(network.state_dict()) != shapes:
        raise UnknownModelLayoutError(f"{name!r} is not a UNet this checkpoint can take, pruned or not: "
                                      f"{layout_difference(expected, shapes)[1]}")
    dtype = next(network.parameters()).dtype
    with safe_open(unet_file, framework="pt") as handle:
        network.load_state_dict({ldm_names[key]: handle.get_tensor(key).to(dtype) for key in names})
    network.requires_grad_(False)
    patcher = comfy_module("comfy.model_patcher")
    return patcher.ModelPatcher(model, load_device=base.load_device, offload_device=base.offload_device)

