"""Load checkpoints, offline, with one shared copy per file: the loading cache.

Two formats are accepted: an original-layout (LDM) single ``.safetensors`` file, loaded with diffusers'
``from_single_file`` against a config folder (``model_configs.single_file_config_dir``, or an explicit one), and a
diffusers pipeline folder with safetensors weights. Nothing is ever fetched from a hub, and nothing is ever unpickled.

Loaded models are cached: two loads of the same file (same real path, size and modification time) with the same
dtype, device and options return the same :class:`~nodes.models.loaded.LoadedModel`. :func:`unload_all` empties
the cache.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from . import offline  # noqa: F401  (first: before diffusers imports huggingface_hub)
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from safetensors import safe_open

from ..common.denoiser import PREDICTION_TYPES, NoiseSchedule
from ..common.memory import MEMORY, Resident
from .devices import ACCEPTED_DTYPES, default_device, default_dtype
from .families import (CheckpointInfo, UnknownModelLayoutError, family_from_diffusers_folder, inspect_single_file,
                       prediction_type_from_diffusers_folder, read_json)
from .formats import (SAFE_EXTENSION, UnsafeModelFormatError, check_folder_weights, check_safetensors,
                      layout_difference, tensor_shapes)
from .loaded import LoadedModel
from .model_configs import (CHECKPOINT_UNET, component_configs, load_tokenizer, pipeline_class, pipeline_extras,
                            single_file_config_dir, unet_file_configs)
from .offline import quiet_loading
from .pruned_unet import prune_to_shapes
from .sources import resolve_checkpoint
from .vae import load_asymmetric_vae

logger = logging.getLogger(__name__)

_CACHE: dict[tuple, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()
def _file_signature(path: str) -> tuple:
    """(size, mtime) of a file, or of every file in a folder: a change of any of them is a different model."""
    if os.path.isfile(path):
        stat = os.stat(path)
        return ((stat.st_size, stat.st_mtime_ns),)
    entries = []
    for current, _, names in os.walk(path):
        for name in sorted(names):
            stat = os.stat(os.path.join(current, name))
            entries.append((os.path.relpath(os.path.join(current, name), path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def _load_single_file(path: str, info: CheckpointInfo, config_dir: str | None, dtype: torch.dtype,
                      **supplied: torch.nn.Module) -> Any:
    """The diffusers pipeline of a single file, from ``config_dir`` or the config folder found for it.

    Raises:
        UnknownModelLayoutError: the tensors have the family's names but shapes its layout cannot have (another
            number of levels or layers, other width multipliers), so no config folder describes them.
        ValueError: an explicit ``config_dir`` of another family or UNet input width.
    """
    given = config_dir is not None
    if config_dir is None:
        config_dir = single_file_config_dir(info)
    else:
        config_family = family_from_diffusers_folder(config_dir)
        if config_family != info.family:
            raise ValueError(f"{os.path.basename(path)!r} is a {info.family} checkpoint, but config_dir "
                             f"{config_dir!r} describes a {config_family} model; give a {info.family} config folder")
    index = read_json(os.path.join(config_dir, "model_index.json"))
    present = {name for name, entry in index.items() if isinstance(entry, list) and None not in entry}
    absent = {name: None for name, entry in index.items() if isinstance(entry, list) and None in entry}
    tokenizers = {name: load_tokenizer(config_dir, name) for name in ("tokenizer", "tokenizer_2") if name in present}
    unet_in_channels = component_configs(config_dir)["unet"]["in_channels"]
    if unet_in_channels != info.unet_in_channels:
        raise ValueError(f"{os.path.basename(path)!r} has a UNet of {info.unet_in_channels} input channels, but "
                         f"config_dir {config_dir!r} describes one of {unet_in_channels}")
    components = {**absent, **tokenizers, **pipeline_extras(info.family), **supplied}
    try:
        return pipeline_class(info.family, unet_in_channels).from_single_file(
            path, config=config_dir, local_files_only=True, dtype=dtype, **components)
    except (ValueError, RuntimeError, KeyError) as error:
        detail = str(error).split(". ")[0]  # diffusers goes on to suggest overwriting the weights with random ones
        described = f"config_dir {config_dir!r}" if given else f"the {info.family} layout (at any width)"
        raise UnknownModelLayoutError(
            f"{os.path.basename(path)!r} has the tensor names of a {info.family} checkpoint, but shapes that "
            f"{described} cannot hold: {detail}. A model of another architecture loads as a diffusers folder "
            f"(models/diffusers/), which carries its own configs") from error


def _load_folder(folder: str, family: str, dtype: torch.dtype, **supplied: torch.nn.Module) -> Any:
    variant = check_folder_weights(folder)
    unet_in_channels = read_json(os.path.join(folder, "unet", "config.json")).get("in_channels", 4)
    pipeline = pipeline_class(family, unet_in_channels).from_pretrained(
        folder, local_files_only=True, use_safetensors=True, dtype=dtype, variant=variant, **pipeline_extras(family),
        **supplied)
    return pipeline


def load_transformers_folder(folder: str | os.PathLike, model_class: type | None = None,
                             device: torch.device | str | None = None) -> tuple[Any, torch.nn.Module]:
    """A transformers model and its tokenizer or image processor from a ``save_pretrained`` folder, offline and
    from ``.safetensors`` weights only (a DINOv2 backbone in ``models/dinov2``, a sentence encoder in
    ``models/sentence_encoders``); one copy per folder, kept by the memory manager.

    Args:
        folder: holds ``config.json`` and ``model.safetensors`` (or sharded safetensors).
        model_class: the transformers class to build; by default ``AutoModel`` picks it from the config.
        device: by default :func:`default_device`. The model is in eval mode, in float32.
    Returns:
        (the tokenizer, or the image processor when the folder has no tokenizer, or None; the model). A caller
        that runs the model holds it with ``MEMORY.use_module(model)``, which reads it back if it was evicted.
    Raises:
        FileNotFoundError: no ``config.json`` in ``folder``.
        UnsafeModelFormatError: the folder has only pickle-based weights.
    """
    folder = os.path.realpath(os.fspath(folder))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder!r} is not a transformers model folder: it has no config.json")
    if not any(name.lower().endswith(SAFE_EXTENSION) for name in os.listdir(folder)):
        raise UnsafeModelFormatError(f"{folder!r} holds no .safetensors weights; only safetensors are loaded "
                                     f"(convert pickle-based weights first)")
    device = torch.device(device) if device is not None else default_device()
    name = os.path.basename(folder)

    def load() -> tuple[tuple[Any, torch.nn.Module], Resident]:
        MEMORY.make_room("cpu", weight_bytes(folder, torch.float32), name)
        preprocessor, model = _read_transformers_folder(folder, model_class)
        resident = Resident(name, {"model": model}, home=device,
                            reload=lambda: {"model": _read_transformers_folder(folder, model_class)[1]})
        return (preprocessor, model), resident

    return MEMORY.kept(("transformers", folder, _file_signature(folder), model_class, device), load)


def load_kept_asymmetric_vae(path: str | os.PathLike, device: torch.device | str | None = None) -> torch.nn.Module:
    """One of Asymmetric VQGAN's decoders (:func:`~nodes.models.vae.load_asymmetric_vae`, float32), one copy per
    file, kept by the memory manager, with room made for it before it is read. A caller that runs it holds it with
    ``MEMORY.use_module(vae)``, which reads it back if it was evicted."""
    path = os.path.realpath(os.fspath(path))
    device = torch.device(device) if device is not None else default_device()
    name = os.path.basename(path)

    def load() -> tuple[torch.nn.Module, Resident]:
        check_safetensors(path)
        MEMORY.make_room("cpu", weight_bytes(path, torch.float32), name)
        vae = load_asymmetric_vae(path, device="cpu")
        return vae, Resident(name, {"vae": vae}, home=device,
                             reload=lambda: {"vae": load_asymmetric_vae(path, device="cpu")})

    return MEMORY.kept(("asymmetric_vae", path, _file_signature(path), device), load)


def _read_transformers_folder(folder: str, model_class: type | None) -> tuple[Any, torch.nn.Module]:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = (model_class or AutoModel).from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                       dtype=torch.float32)
    preprocessor = None
    for loader in (AutoTokenizer, AutoImageProcessor):
        try:
            preprocessor = loader.from_pretrained(folder, local_files_only=True)
            break
        except (OSError, ValueError, KeyError):
            continue
    return preprocessor, model.eval()


def load_model(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
               prediction_type: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, unet_file: str | os.PathLike | None = None) -> LoadedModel:
    """Load a single ``.safetensors`` checkpoint or a diffusers folder, offline, sharing one copy per file.

    Args:
        path: an original-layout ``.safetensors`` file of one of ``families.FAMILIES`` (inpainting UNets
            included), or a diffusers pipeline folder.
        config_dir: single files only: the diffusers config folder describing the architecture; by default
            ``model_configs.single_file_config_dir`` finds or derives it.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; overrides what the weights (single
            files: see ``families.prediction_type_from_weights``) or the folder's scheduler config say.
        dtype: float32, float16 or bfloat16; by default :func:`default_dtype` of the device.
        device: by default :func:`default_device`.
        unet_file: a diffusers-layout UNet ``.safetensors`` file that replaces the checkpoint's UNet (a model
            published as its UNet alone: Rectified Diffusion's, KOALA's); its layout must be the checkpoint's UNet
            or one of the family's shipped variants (:func:`~.model_configs.unet_file_configs`). The model is then
            a copy of its own, text encoders and VAE included, which the memory manager keeps as any other.
    Returns:
        The :class:`LoadedModel`; the same object for a repeated call with the same file(s) (real path, size,
        modification time) and arguments, until :func:`unload_all`.
    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeModelFormatError: a file that is not ``.safetensors``, or a folder with only pickle-based weights.
        families.UnknownModelLayoutError: a layout that is none of ``families.FAMILIES``, or a ``unet_file``
            whose tensors fit no UNet the checkpoint can take.
        ValueError: a bad ``prediction_type`` or ``dtype``, or a ``config_dir`` of another family.
    """
    path = os.path.realpath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path!r}")
    is_folder = os.path.isdir(path)
    if not is_folder:
        check_safetensors(path)
    elif config_dir is not None:
        raise ValueError("config_dir applies to single files only; a diffusers folder carries its own configs")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} or None; got {prediction_type!r}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    if dtype not in ACCEPTED_DTYPES:
        raise ValueError(f"dtype must be one of {ACCEPTED_DTYPES}; got {dtype}")
    config_dir = os.path.realpath(os.fspath(config_dir)) if config_dir is not None else None
    if unet_file is not None:
        unet_file = os.path.realpath(os.fspath(unet_file))
        if not os.path.isfile(unet_file):
            raise FileNotFoundError(f"no UNet file at {unet_file!r}")
        check_safetensors(unet_file)
    info = None if is_folder else inspect_single_file(path)
    if info is not None:
        logger.info("%s: %s, %d-channel UNet, %s (%s)", os.path.basename(path), info.family, info.unet_in_channels,
                    info.prediction_type, info.reason)
    # Resolved before the cache lookup, so "auto" and the type it resolves to share one copy.
    resolved = prediction_type or (info.prediction_type if info else prediction_type_from_diffusers_folder(path))

    files = (path,) if unet_file is None else (path, unet_file)
    key = (path, unet_file, tuple(map(_file_signature, files)), config_dir, resolved, dtype, device)
    with _CACHE_LOCK:  # one load at a time: two nodes asking for the same file wait for one copy
        if key in _CACHE:
            return _CACHE[key]
        started = time.perf_counter()
        family = info.family if info is not None else family_from_diffusers_folder(path)
        label = LoadedModel.label_of(path, unet_file)
        MEMORY.make_room("cpu", sum(weight_bytes(file, dtype) for file in files), label)

        def build() -> Any:
            if unet_file is None:
                return _build_pipeline(path, info, family, config_dir, resolved, dtype)
            base_config = read_json(os.path.join(path if info is None else config_dir or single_file_config_dir(info),
                                                 "unet", "config.json"))
            unet = _unet_from_file(unet_file, base_config, family, dtype)  # the checkpoint's own UNet is not built
            return _build_pipeline(path, info, family, config_dir, resolved, dtype, unet=unet)

        pipeline = build()
        schedule = NoiseSchedule(pipeline.scheduler.alphas_cumprod.to(torch.float64), resolved)
        model = LoadedModel(pipeline=pipeline, family=family, schedule=schedule, dtype=dtype, device=device,
                            source=path, unet_source=unet_file)
        signatures = key[2]

        def rebuild() -> Any:
            if tuple(map(_file_signature, files)) != signatures:
                raise RuntimeError(f"{label} changed on disk since it was loaded; load it again (its node "
                                   f"reads the new file on the next run)")
            return build()

        model.resident = _resident(model, rebuild)
        _CACHE[key] = model
        logger.info("loaded %s (%s, %s, %s on %s) in %.1f s", label, family, resolved,
                    str(dtype).removeprefix("torch."), device, time.perf_counter() - started)
        return model


def _unet_from_file(path: str, base_config: Any, family: str, dtype: torch.dtype) -> torch.nn.Module:
    """The UNet of a diffusers-layout UNet file, built on the one of :func:`~.model_configs.unet_file_configs`
    whose parameter names and shapes are the file's (compared on the meta device, before anything is allocated),
    or else on the checkpoint's UNet structurally pruned to the file's widths and depth (APTP's experts,
    :func:`~.pruned_unet.prune_to_shapes`).

    Raises:
        families.UnknownModelLayoutError: no config fits the file, pruned or not; the message names the closest.
    """
    with safe_open(path, framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    name = os.path.basename(path)
    if any(key.startswith(("model.diffusion_model.", "input_blocks.")) for key in shapes):
        raise UnknownModelLayoutError(f"{name!r} holds a UNet in the original (LDM) layout; this loader reads "
                                      f"diffusers-layout UNet files (unet/diffusion_pytorch_model.safetensors)")
    configs = unet_file_configs(base_config, family)
    mismatches = {}
    for label, config in configs.items():
        unet = _meta_unet(config)
        expected = tensor_shapes(unet.state_dict())
        if expected == shapes:
            return _load_unet_weights(unet, path, dtype)
        mismatches[label] = layout_difference(expected, shapes)
    unet = _meta_unet(configs[CHECKPOINT_UNET])
    with torch.device("meta"):
        pruned = prune_to_shapes(unet, shapes, (ResnetBlock2D, Transformer2DModel))
    if pruned and tensor_shapes(unet.state_dict()) == shapes:
        logger.info("%s: a structurally pruned UNet (%d modules narrowed or dropped)", name, pruned)
        return _load_unet_weights(unet, path, dtype)
    closest = min(mismatches, key=lambda label: mismatches[label][0])
    raise UnknownModelLayoutError(
        f"{name!r} is not a UNet this {family} checkpoint can take: its tensors fit none of "
        f"{', '.join(mismatches)}, nor a pruning of the checkpoint's UNet; closest is {closest}, with "
        f"{mismatches[closest][1]}. Give the checkpoint the UNet was trained from (Rectified Diffusion's "
        f"rd/cm/phased: SD1.5; phasedxl and KOALA's: SDXL; APTP's experts: SD2.1 768-v)")


def _meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"), quiet_loading():
        return UNet2DConditionModel.from_config(config)


def _load_unet_weights(unet: torch.nn.Module, path: str, dtype: torch.dtype) -> torch.nn.Module:
    with safe_open(path, framework="pt") as handle:  # one tensor at a time: no second copy of the file
        tensors = {key: handle.get_tensor(key).to(dtype) for key in handle.keys()}
    unet.load_state_dict(tensors, assign=True)
    return unet.eval().requires_grad_(False)


def _build_pipeline(path: str, info: CheckpointInfo | None, family: str, config_dir: str | None, resolved: str,
                    dtype: torch.dtype, **supplied: torch.nn.Module) -> Any:
    """The pipeline of a file or folder on the CPU, ready to run: what a first load and a read-back both make;
    ``supplied`` components (a UNet from a UNet file) are taken as they are instead of the checkpoint's."""
    with quiet_loading():
        if info is None:
            pipeline = _load_folder(path, family, dtype, **supplied)
        else:
            pipeline = _load_single_file(path, info, config_dir, dtype, **supplied)
    if pipeline.scheduler.config.get("prediction_type") != resolved:
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, prediction_type=resolved)
    if getattr(pipeline.vae.config, "force_upcast", False) and dtype == torch.float16:
        pipeline.vae.to(torch.float32)  # SDXL's VAE overflows in float16; diffusers marks it force_upcast
        logger.info("%s: VAE kept in float32 (force_upcast)", os.path.basename(path))
    pipeline.set_progress_bar_config(disable=True)
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)  # inference only: no autograd graph even outside no_grad
    return pipeline


def _resident(model: LoadedModel, build: Callable[[], Any]) -> Resident | None:
    """Register ``model``'s components with the memory manager and move them to the model's device one by one
    (room made there first: on a small GPU the last ones may send the first back); None where the manager stands
    aside (inside ComfyUI), the components then simply moved."""
    pipeline = model.pipeline
    parts = {name: module for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}
    if not MEMORY.enabled:
        pipeline.to(model.device)
        return None

    def read_back() -> dict[str, torch.nn.Module]:
        fresh = build()
        return {name: getattr(fresh, name) for name in parts}

    resident = MEMORY.register(Resident(model.label, parts, reload=read_back,
                                        before_drop=model.remove_all_loras, home=model.device))
    for name in parts:
        with MEMORY.use(resident, (name,)):
            pass
    return resident


def weight_bytes(path: str, dtype: torch.dtype) -> int:
    """What the weights of a ``.safetensors`` file, or of a folder's, take once loaded in ``dtype``: read from the
    files' headers, before anything is allocated (tensors the loader skips, such as EMA copies, are counted too)."""
    files = [path]
    if os.path.isdir(path):  # the files the loader reads: the variant's where it has them, else the plain ones
        variant = check_folder_weights(path) if os.path.isfile(os.path.join(path, "model_index.json")) else None
        files = []
        for current, _, names in os.walk(path):
            safe = [name for name in names if name.endswith(SAFE_EXTENSION)]
            chosen = [name for name in safe if f".{variant}." in name] if variant else []
            plain = [name for name in safe if ".fp16." not in name]
            files += [os.path.join(current, name) for name in chosen or plain or safe]
    element = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape()) * element
    return total


def unload_all() -> int:
    """Drop every cached model and everything else the memory manager keeps (the server's ``/free`` calls this);
    returns how many models there were.

    Memory is freed once no node output still holds a model.
    """
    with _CACHE_LOCK:
        count = len(_CACHE)
        _CACHE.clear()
    MEMORY.free_all()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def cached_models() -> list[LoadedModel]:
    """The models the cache holds now."""
    with _CACHE_LOCK:
        return list(_CACHE.values())


def load_checkpoint(name: str, models_dir: str | os.PathLike | None = None, **options: Any) -> LoadedModel:
    """:func:`load_model` of a checkpoint named as :func:`list_checkpoints` names it; ``options`` go to load_model."""
    return load_model(resolve_checkpoint(name, models_dir), **options)
