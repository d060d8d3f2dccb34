"""ComfyUI's own MODEL, CLIP and VAE for an SD1-layout single file at widths ComfyUI's detection does not know.

``comfy.sd.load_checkpoint_guess_config`` matches SD1.5 only at 320 UNet channels and a 768-wide text encoder, so
it refuses the shipped embedded model (32 channels, 64-wide text). ComfyUI can still hold it through its public
constructors when it is given the architecture explicitly (``interop.md`` §4): a ``BaseModel`` from a
``comfy.supported_models.SD15`` whose ``unet_config`` carries our widths and whose latent format carries our VAE's
scaling factor, a ``comfy.sd.VAE`` built from an LDM ``ddconfig``, and a ``comfy.sd.CLIP`` whose ``SDClipModel`` is
built from our text encoder's JSON config. The configs come from the model's diffusers folder
(``nodes/models/shipped/diffusers/<name>``), the one place its architecture is written down.

The translation of the diffusers configs into ComfyUI's (LDM) config vocabulary is pure (:func:`ldm_unet_config`,
:func:`ldm_vae_config`) and needs no ComfyUI; :func:`load_comfy_native` imports ``comfy`` and runs inside
ComfyUI only.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

from ..common.comfy_host import comfy_module
from ..models.families import UNET_PREFIX, read_json

# diffusers block types with a transformer after each ResNet; the others (DownBlock2D, UpBlock2D) have none.
CROSS_ATTENTION_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")


def ldm_unet_config(unet: Mapping[str, Any]) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` (the arguments of its ``openaimodel.UNetModel``) for an SD1-layout diffusers
    ``UNet2DConditionModel`` config.

    The per-ResNet transformer depths follow the block types: each down level has ``layers_per_block`` ResNets,
    each up level one more, and a cross-attention block puts one transformer after each. Both lists run from the
    shallowest level to the deepest, as ComfyUI's ``model_detection.detect_unet_config`` writes them. SD1's
    ``attention_head_dim`` is (in diffusers' historical naming) the number of heads, which ComfyUI's SD15 config
    sets as ``num_heads``.

    Args:
        unet: the ``unet/config.json`` of an SD1 diffusers folder (any widths, 4 or 9 input channels).
    Returns:
        the ``unet_config`` dict for ``comfy.supported_models.SD15(unet_config)``.
    Raises:
        ValueError: a config SD1's layout does not describe (linear projections, per-level layer counts,
            added conditioning, a mid block other than the cross-attention one).
    Example:
        >>> config = ldm_unet_config({"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
        ...     "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        ...     "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "in_channels": 4, "out_channels": 4,
        ...     "cross_attention_dim": 64, "attention_head_dim": 8, "use_linear_projection": False,
        ...     "mid_block_type": "UNetMidBlock2DCrossAttn"})
        >>> config["channel_mult"], config["transformer_depth"], config["transformer_depth_output"]
        ([1, 1, 2, 2], [1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0])
    """
    unsupported = {key: unet.get(key) for key in ("use_linear_projection", "addition_embed_type", "class_embed_type")
                   if unet.get(key)}
    if unsupported or unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"only SD1's UNet layout is accepted (no linear projections, no added conditioning, the "
                         f"cross-attention mid block); got {unsupported or unet.get('mid_block_type')}")
    layers = unet["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block must be one number for every level, as in SD1; got {layers!r}")
    widths = list(unet["block_out_channels"])
    base = widths[0]
    if any(width % base for width in widths):
        raise ValueError(f"block_out_channels must be multiples of the first level's width; got {widths}")
    down_depths = [int(kind in CROSS_ATTENTION_BLOCKS) for kind in unet["down_block_types"] for _ in range(layers)]
    # ComfyUI lists the output side by level from the shallowest, as the input side, and pops from the deepest.
    up_depths = [int(kind in CROSS_ATTENTION_BLOCKS) for kind in reversed(unet["up_block_types"])
                 for _ in range(layers + 1)]
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
        "in_channels": unet["in_channels"], "out_channels": unet["out_channels"], "model_channels": base,
        "channel_mult": [width // base for width in widths], "num_res_blocks": [layers] * len(widths),
        "transformer_depth": down_depths, "transformer_depth_output": up_depths, "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": unet["cross_attention_dim"],
        "num_heads": unet["attention_head_dim"], "num_head_channels": -1,
    }


def ldm_vae_config(vae: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config`` of ``comfy.sd.VAE`` (an LDM ``AutoencoderKL``'s arguments) for a diffusers ``AutoencoderKL``
    config.

    Example:
        >>> ldm_vae_config({"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "latent_channels": 4,
        ...                 "in_channels": 3, "out_channels": 3})["params"]["ddconfig"]["ch_mult"]
        [1, 2, 2, 2]
    """
    widths = list(vae["block_out_channels"])
    ddconfig = {"double_z": True, "z_channels": vae["latent_channels"], "resolution": 256,
                "in_channels": vae["in_channels"], "out_ch": vae["out_channels"], "ch": widths[0],
                "ch_mult": [width // widths[0] for width in widths], "num_res_blocks": vae["layers_per_block"],
                "attn_resolutions": [], "dropout": 0.0}
    return {"params": {"embed_dim": vae["latent_channels"], "ddconfig": ddconfig}}


def load_comfy_native(checkpoint: str, config_dir: str, embedding_directory: list[str] | None = None
                      ) -> tuple[Any, Any, Any]:
    """ComfyUI's ``(ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE)`` for an SD1-layout single file described by the
    diffusers folder ``config_dir`` (its ``unet``, ``vae``, ``text_encoder`` configs and its ``tokenizer``).

    Devices and dtypes are ComfyUI's choice, as for any checkpoint it loads (``--force-fp32`` and friends apply).

    Raises:
        RuntimeError: called outside ComfyUI.
        ValueError: the configs are not SD1's layout (see :func:`ldm_unet_config`), or the file's UNet or text
            encoder tensors do not fit them (missing VAE tensors ComfyUI itself logs as warnings).
    """
    model_management = comfy_module("comfy.model_management")
    if model_management is None:
        raise RuntimeError("load_comfy_native builds ComfyUI's objects and runs inside ComfyUI only")
    comfy_utils = comfy_module("comfy.utils")
    supported_models = comfy_module("comfy.supported_models")
    latent_formats = comfy_module("comfy.latent_formats")
    model_patcher = comfy_module("comfy.model_patcher")
    comfy_sd = comfy_module("comfy.sd")
    sd1_clip = comfy_module("comfy.sd1_clip")
    supported_models_base = comfy_module("comfy.supported_models_base")

    configs = {name: read_json(os.path.join(config_dir, name, "config.json")) for name in ("unet", "vae",
                                                                                          "text_encoder")}
    state_dict = comfy_utils.load_torch_file(checkpoint, safe_load=True)

    # The UNet: SD15's class (epsilon, its CLIP layout) with our widths and our VAE's latent scale.
    unet_config = ldm_unet_config(configs["unet"])
    model_config = supported_models.SD15(unet_config)
    model_config.unet_config.update(unet_config)  # SD15's constructor sets SD1.5's head layout over ours
    model_config.latent_format = latent_formats.SD15(scale_factor=configs["vae"]["scaling_factor"])
    parameters = comfy_utils.calculate_parameters(state_dict, UNET_PREFIX)
    load_device = model_management.get_torch_device()
    unet_dtype = model_management.unet_dtype(model_params=parameters,
                                             supported_dtypes=list(model_config.supported_inference_dtypes),
                                             weight_dtype=comfy_utils.weight_dtype(state_dict, UNET_PREFIX))
    model_config.set_inference_dtype(unet_dtype, model_management.unet_manual_cast(
        unet_dtype, load_device, model_config.supported_inference_dtypes))
    initial_device = model_management.unet_inital_load_device(parameters, unet_dtype)
    model = model_config.get_model(state_dict, UNET_PREFIX, device=initial_device)
    # ComfyUI only logs a UNet that does not fit its weights; a wrong config must not sample noise silently.
    expected = set(model.diffusion_model.state_dict())
    found = {key[len(UNET_PREFIX):] for key in state_dict if key.startswith(UNET_PREFIX)}
    if expected != found:
        raise ValueError(f"the UNet config of {config_dir} does not fit {os.path.basename(checkpoint)}: missing "
                         f"{sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]}")
    model.load_model_weights(state_dict, UNET_PREFIX)
    patcher = model_patcher.ModelPatcher(model, load_device=load_device,
                                         offload_device=model_management.unet_offload_device())

    vae_state = comfy_utils.state_dict_prefix_replace(
        state_dict, {prefix: "" for prefix in model_config.vae_key_prefix}, filter_keys=True)
    vae = comfy_sd.VAE(sd=vae_state, config=ldm_vae_config(configs["vae"]))

    # SD1's text encoder at our widths; the pooled output is not projected, as in SD1 checkpoints.
    text_width = configs["text_encoder"]["hidden_size"]
    target = supported_models_base.ClipTarget(
        functools.partial(sd1_clip.SD1Tokenizer, tokenizer=functools.partial(
            sd1_clip.SDTokenizer, tokenizer_path=os.path.join(config_dir, "tokenizer"), embedding_size=text_width)),
        sd1_clip.SD1ClipModel)
    target.params = {"clip_model": functools.partial(
        sd1_clip.SDClipModel, textmodel_json_config=configs["text_encoder"], return_projected_pooled=False)}
    clip_state = model_config.process_clip_state_dict(state_dict)  # cond_stage_model.* as clip_l.*, filtered
    clip = comfy_sd.CLIP(target, embedding_directory=embedding_directory, tokenizer_data=clip_state,
                         parameters=comfy_utils.calculate_parameters(clip_state))
    missing, _ = clip.load_sd(clip_state, full_model=True)
    missing = [key for key in missing if not key.endswith((".logit_scale", ".text_projection.weight"))]
    if missing:
        raise ValueError(f"{os.path.basename(checkpoint)} lacks text encoder tensors the config "
                         f"{os.path.join(config_dir, 'text_encoder')} asks for: {missing[:10]}")
    return patcher, clip, vae
