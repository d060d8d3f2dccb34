"""Load SD1, SD2 and SDXL checkpoints fully offline, and find them in a models folder or through ComfyUI.

Two formats are accepted: an original-layout (LDM) single ``.safetensors`` file, loaded with diffusers'
``from_single_file`` against the configs shipped in ``configs/`` (or an explicit config folder), and a diffusers
pipeline folder with safetensors weights. Nothing is ever fetched from a hub, and nothing is ever unpickled.

Loaded models are cached: two loads of the same file (same real path, size and modification time) with the same
dtype, device and options return the same :class:`LoadedModel`. :func:`unload_all` empties the cache.
"""

from __future__ import annotations

import os

# huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported, so this must run before diffusers (which
# imports it). Without it, a from_single_file that finds no local config switches local_files_only off by itself
# and tries the Hub (environment.md §4). setdefault: a user who sets it to 0 on purpose keeps their choice.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import huggingface_hub.constants  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from ..common.denoiser import PREDICTION_TYPES, NoiseSchedule  # noqa: E402
from ..common.paths import confine  # noqa: E402
from .families import (FAMILIES, CheckpointInfo, UnknownModelLayoutError,  # noqa: E402
                       family_from_diffusers_folder, inspect_single_file, prediction_type_from_diffusers_folder,
                       read_json)

if TYPE_CHECKING:
    from .lora import LoraAdapter, LoraSpec

logger = logging.getLogger(__name__)

if not huggingface_hub.constants.HF_HUB_OFFLINE:
    logger.warning("huggingface_hub was imported with HF_HUB_OFFLINE unset or 0; the loaders still pass "
                   "local_files_only=True, but diffusers may try the Hub when a config is missing")

SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# Models that ship with Atelier (the embedded default model), laid out like a models folder; listed after the
# user's own, so a user's model of the same name wins.
SHIPPED_MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")
FAMILY_CONFIG_DIRS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
# The one copy of CLIP's BPE vocabulary (environment.md §2); other tokenizer folders hold only their config.
SD1_TOKENIZER_DIR = os.path.join(SHIPPED_CONFIGS, "sd15", "tokenizer")

SAFE_EXTENSION = ".safetensors"
# Formats read with torch.load / pickle, which can run arbitrary code while loading.
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MODEL_FOLDERS = ("checkpoints", "diffusers", "loras", "vae", "dinov2", "sentence_encoders")
# The folders whose models are themselves folders, each known by the file it holds; the others hold files.
FOLDER_MODEL_MARKERS = {"diffusers": "model_index.json", "dinov2": "config.json", "sentence_encoders": "config.json"}
DIFFUSERS_PREFIX = "diffusers/"  # how diffusers folders are named in the checkpoint list
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class UnsafeModelFormatError(ValueError):
    """A model file in a pickle-based format, which we refuse to load."""


@dataclasses.dataclass(eq=False)
class LoadedModel:
    """A checkpoint in memory: the diffusers pipeline that holds its parts, and what the techniques need to know.

    ``unet``, ``vae``, ``text_encoders``, ``tokenizers`` and ``scheduler_config`` read through to ``pipeline``.
    One object is shared by every node that loads the same file (see :func:`load_model`); LoRAs live on it as
    named adapters (``nodes.models.lora``), never merged into its weights.
    """

    pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline = dataclasses.field(repr=False)
    family: str  # "sd1", "sd2" or "sdxl"
    schedule: NoiseSchedule = dataclasses.field(repr=False)  # the training schedule and what the UNet predicts
    dtype: torch.dtype
    device: torch.device
    source: str  # the real path of the file or folder it came from
    # LoRAs resident as adapters (by adapter name) and the ones running now; managed by nodes.models.lora.
    lora_adapters: dict[str, LoraAdapter] = dataclasses.field(default_factory=dict, repr=False)
    active_loras: tuple[LoraSpec, ...] = ()
    # Held while choosing LoRAs and running the model: the model is shared, and a LoRA switch in another thread
    # must not land in the middle of a sampling loop.
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock, repr=False)

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """SD1/SD2: ``(text_encoder,)``; SDXL: ``(text_encoder, text_encoder_2)``."""
        if self.family == "sdxl":
            return self.pipeline.text_encoder, self.pipeline.text_encoder_2
        return (self.pipeline.text_encoder,)

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        if self.family == "sdxl":
            return self.pipeline.tokenizer, self.pipeline.tokenizer_2
        return (self.pipeline.tokenizer,)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler config (betas, timestep spacing, prediction type) to build diffusers schedulers from."""
        return dict(self.pipeline.scheduler.config)


# --- formats ---------------------------------------------------------------------------------------------------------

def check_safetensors(path: str | os.PathLike) -> None:
    """Refuse any model file that is not ``.safetensors``.

    Raises:
        UnsafeModelFormatError: another extension; pickle-based formats (.ckpt, .pt, .pth, .bin, .pkl) are
            named as such, because unpickling a file can run any code it carries.
    Example:
        >>> check_safetensors("model.safetensors")
        >>> check_safetensors("model.ckpt")
        Traceback (most recent call last):
        ...
        nodes.models.loading.UnsafeModelFormatError: 'model.ckpt' is a pickle-based file (.ckpt): loading it could ...
    """
    name = os.path.basename(os.fspath(path))
    extension = os.path.splitext(name)[1].lower()
    if extension == SAFE_EXTENSION:
        return
    if extension in PICKLE_EXTENSIONS:
        raise UnsafeModelFormatError(
            f"{name!r} is a pickle-based file ({extension}): loading it could run any code it carries. Only "
            f"{SAFE_EXTENSION} is loaded; convert it to {SAFE_EXTENSION} with a tool you trust")
    raise UnsafeModelFormatError(f"{name!r} has extension {extension or '(none)'!r}; only {SAFE_EXTENSION} "
                                 f"files (or diffusers folders of them) are loaded")


def _check_folder_weights(folder: str) -> str | None:
    """Require safetensors weights for every model component of a diffusers folder; return the variant to load.

    Returns:
        ``None`` when every component has plain ``*.safetensors`` weights, ``"fp16"`` when some have only
        ``*.fp16.safetensors`` (diffusers then falls back to the plain files where there is no fp16 one).
    Raises:
        UnsafeModelFormatError: a component holds only pickle-based weights (``.bin``, ``.ckpt``, …).
        FileNotFoundError: a component holds no weights at all.
    """
    index = read_json(os.path.join(folder, "model_index.json"))
    variant = None
    for component in WEIGHT_COMPONENTS:
        if component not in index:
            continue
        directory = os.path.join(folder, component)
        names = os.listdir(directory) if os.path.isdir(directory) else []
        safe = [name for name in names if name.endswith((SAFE_EXTENSION, SAFE_EXTENSION + ".index.json"))]
        if not safe:
            pickled = sorted(name for name in names if name.lower().endswith(PICKLE_EXTENSIONS))
            if pickled:
                raise UnsafeModelFormatError(
                    f"{directory!r} holds only pickle-based weights {pickled}: loading them could run any code "
                    f"they carry. Only {SAFE_EXTENSION} weights are loaded; convert the folder with a tool you trust")
            raise FileNotFoundError(f"{directory!r} holds no {SAFE_EXTENSION} weights; found {sorted(names)}")
        if all(".fp16." in name for name in safe):
            variant = "fp16"
    return variant


# --- tokenizers and configs ------------------------------------------------------------------------------------------

def shipped_config_dir(family: str) -> str:
    """The shipped configs-only diffusers folder for ``family`` (real SD1.5, SD2.1 or SDXL-base widths)."""
    if family not in FAMILY_CONFIG_DIRS:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    return os.path.join(SHIPPED_CONFIGS, FAMILY_CONFIG_DIRS[family])


def single_file_config_dir(info: CheckpointInfo) -> str:
    """The config folder for a single file given without one: a shipped diffusers folder whose UNet has the file's
    family and parameter count (the embedded model's single file reads its architecture from its own folder), or
    else the shipped configs of its family at SD's real widths.

    Raises:
        UnknownModelLayoutError: a UNet that is neither: no shipped config describes it.
    """
    shipped_folders = os.path.join(SHIPPED_MODELS, "diffusers")
    for name in sorted(os.listdir(shipped_folders)) if os.path.isdir(shipped_folders) else []:
        folder = os.path.join(shipped_folders, name)
        if (family_from_diffusers_folder(folder) == info.family
                and _safetensors_parameters(os.path.join(folder, "unet")) == info.unet_parameters):
            return folder
    folder = shipped_config_dir(info.family)
    if read_json(os.path.join(folder, "unet", "config.json"))["block_out_channels"][0] == info.unet_width:
        return folder
    raise UnknownModelLayoutError(
        f"a {info.family} checkpoint whose UNet is {info.unet_width} channels wide ({info.unet_parameters:,} "
        f"parameters), which no shipped config describes: use it as a diffusers folder (models/diffusers/), which "
        f"carries its own configs")


def _safetensors_parameters(folder: str) -> int:
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


def _pipeline_class(family: str) -> type:
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _sd_extras(family: str) -> dict[str, Any]:
    # SD1/SD2 pipelines have a safety checker slot; we never load one (no weights are shipped for it).
    if family == "sdxl":
        return {}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


# --- devices ---------------------------------------------------------------------------------------------------------

def default_device() -> torch.device:
    """CUDA when this torch build sees a GPU, else the CPU; decided at run time, safe on CPU-only torch."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on a GPU (SD's released precision; SDXL's VAE is marked ``force_upcast`` for decoding), float32 on
    the CPU, where half precision is slow and diffusers' own default is float32."""
    return torch.float16 if device.type == "cuda" else torch.float32


# --- loading ---------------------------------------------------------------------------------------------------------

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


def _load_single_file(path: str, config_dir: str | None, dtype: torch.dtype) -> tuple[Any, str]:
    info = inspect_single_file(path)
    if config_dir is None:
        config_dir = single_file_config_dir(info)
    else:
        config_family = family_from_diffusers_folder(config_dir)
        if config_family != info.family:
            raise ValueError(f"{os.path.basename(path)!r} is a {info.family} checkpoint, but config_dir "
                             f"{config_dir!r} describes a {config_family} model; give a {info.family} config folder")
    index = read_json(os.path.join(config_dir, "model_index.json"))
    tokenizers = {name: load_tokenizer(config_dir, name) for name in ("tokenizer", "tokenizer_2") if name in index}
    pipeline = _pipeline_class(info.family).from_single_file(
        path, config=config_dir, local_files_only=True, dtype=dtype, **tokenizers, **_sd_extras(info.family))
    return pipeline, info.family


def _load_folder(folder: str, dtype: torch.dtype) -> tuple[Any, str]:
    family = family_from_diffusers_folder(folder)
    variant = _check_folder_weights(folder)
    pipeline = _pipeline_class(family).from_pretrained(
        folder, local_files_only=True, use_safetensors=True, dtype=dtype, variant=variant,
        **_sd_extras(family))
    return pipeline, family


def _prediction_type(path: str, is_folder: bool) -> str:
    """What the model predicts, read from the folder's scheduler config or the file's weights."""
    if is_folder:
        return prediction_type_from_diffusers_folder(path)
    info = inspect_single_file(path)
    logger.info("%s: %s, %s (%s)", os.path.basename(path), info.family, info.prediction_type, info.reason)
    return info.prediction_type


def load_transformers_folder(folder: str | os.PathLike, model_class: type | None = None,
                             device: torch.device | str | None = None) -> tuple[Any, torch.nn.Module]:
    """A transformers model and its tokenizer or image processor from a ``save_pretrained`` folder, offline and
    from ``.safetensors`` weights only (a DINOv2 backbone in ``models/dinov2``, a sentence encoder in
    ``models/sentence_encoders``).

    Args:
        folder: holds ``config.json`` and ``model.safetensors`` (or sharded safetensors).
        model_class: the transformers class to build; by default ``AutoModel`` picks it from the config.
        device: by default :func:`default_device`. The model is in eval mode, in float32.
    Returns:
        (the tokenizer, or the image processor when the folder has no tokenizer, or None; the model).
    Raises:
        FileNotFoundError: no ``config.json`` in ``folder``.
        UnsafeModelFormatError: the folder has only pickle-based weights.
    """
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    folder = os.path.realpath(os.fspath(folder))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder!r} is not a transformers model folder: it has no config.json")
    if not any(name.lower().endswith(SAFE_EXTENSION) for name in os.listdir(folder)):
        raise UnsafeModelFormatError(f"{folder!r} holds no .safetensors weights; only safetensors are loaded "
                                     f"(convert pickle-based weights first)")
    model = (model_class or AutoModel).from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                       dtype=torch.float32)
    preprocessor = None
    for loader in (AutoTokenizer, AutoImageProcessor):
        try:
            preprocessor = loader.from_pretrained(folder, local_files_only=True)
            break
        except (OSError, ValueError, KeyError):
            continue
    return preprocessor, model.to(device if device is not None else default_device()).eval()


def load_model(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
               prediction_type: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> LoadedModel:
    """Load a single ``.safetensors`` checkpoint or a diffusers folder, offline, sharing one copy per file.

    Args:
        path: an original-layout SD1/SD2/SDXL ``.safetensors`` file, or a diffusers pipeline folder.
        config_dir: single files only: the diffusers config folder describing the architecture; by default the
            shipped one of the detected family. Tests pass the config folder of a narrow model.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; overrides what the weights (single
            files: see ``families.prediction_type_from_weights``) or the folder's scheduler config say.
        dtype: float32, float16 or bfloat16; by default :func:`default_dtype` of the device.
        device: by default :func:`default_device`.
    Returns:
        The :class:`LoadedModel`; the same object for a repeated call with the same file (real path, size,
        modification time) and arguments, until :func:`unload_all`.
    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeModelFormatError: a file that is not ``.safetensors``, or a folder with only pickle-based weights.
        families.UnknownModelLayoutError: a layout that is not SD1, SD2 or SDXL.
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
    # Resolved before the cache lookup, so "auto" and the type it resolves to share one copy.
    resolved = prediction_type or _prediction_type(path, is_folder)

    key = (path, _file_signature(path), config_dir, resolved, dtype, device)
    with _CACHE_LOCK:  # one load at a time: two nodes asking for the same file wait for one copy
        if key in _CACHE:
            return _CACHE[key]
        started = time.perf_counter()
        if is_folder:
            pipeline, family = _load_folder(path, dtype)
        else:
            pipeline, family = _load_single_file(path, config_dir, dtype)
        if pipeline.scheduler.config.get("prediction_type") != resolved:
            pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config,
                                                                      prediction_type=resolved)
        pipeline.to(device)
        if getattr(pipeline.vae.config, "force_upcast", False) and dtype == torch.float16:
            pipeline.vae.to(torch.float32)  # SDXL's VAE overflows in float16; diffusers marks it force_upcast
            logger.info("%s: VAE kept in float32 (force_upcast)", os.path.basename(path))
        pipeline.set_progress_bar_config(disable=True)
        for module in pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)  # inference only: no autograd graph even outside no_grad
        schedule = NoiseSchedule(pipeline.scheduler.alphas_cumprod.to(torch.float64), resolved)
        model = LoadedModel(pipeline=pipeline, family=family, schedule=schedule, dtype=dtype, device=device,
                            source=path)
        _CACHE[key] = model
        logger.info("loaded %s (%s, %s, %s on %s) in %.1f s", os.path.basename(path), family, resolved,
                    str(dtype).removeprefix("torch."), device, time.perf_counter() - started)
        return model


def unload_all() -> int:
    """Drop every cached model (the server's ``/free`` calls this); returns how many there were.

    Memory is freed once no node output still holds a model.
    """
    with _CACHE_LOCK:
        count = len(_CACHE)
        _CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def cached_models() -> list[LoadedModel]:
    """The models the cache holds now."""
    with _CACHE_LOCK:
        return list(_CACHE.values())


# --- where models come from ------------------------------------------------------------------------------------------

def comfy_folder_paths():
    """ComfyUI's ``folder_paths`` module when running inside ComfyUI, else None."""
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def _check_folder_name(folder: str) -> None:
    if folder not in MODEL_FOLDERS:
        raise ValueError(f"model folder must be one of {MODEL_FOLDERS}; got {folder!r}")


def _bases(folder: str, models_dir: str | os.PathLike | None) -> list[str]:
    """The folders that hold ``folder``'s models: ``models_dir/folder``, or ComfyUI's paths for it, then the
    shipped models' ``folder``."""
    shipped = os.path.join(SHIPPED_MODELS, folder)
    if models_dir is not None:
        return [os.path.join(os.fspath(models_dir), folder), shipped]
    folder_paths = comfy_folder_paths()
    if folder_paths is None:
        raise ValueError(f"no models folder to look in for {folder!r}: pass models_dir (standalone, "
                         f"--models-dir) or run inside ComfyUI")
    if folder not in folder_paths.folder_names_and_paths:  # a kind ComfyUI has no setting for: its models/<folder>
        return [os.path.join(folder_paths.models_dir, folder), shipped]
    return [*folder_paths.get_folder_paths(folder), shipped]


def resolve_model_path(folder: str, name: str, models_dir: str | os.PathLike | None = None) -> str:
    """The absolute path of model ``name`` in ``folder`` (one of :data:`MODEL_FOLDERS`).

    With ``models_dir``, the name is confined to ``models_dir/folder`` (no ``..``, absolute paths or symlinks
    out). Without it, inside ComfyUI, ComfyUI's ``folder_paths`` resolves it (``get_full_path``; for folder models
    such as diffusers folders, each of :func:`_bases`). The shipped models (:data:`SHIPPED_MODELS`) come last.

    Raises:
        ValueError: an unknown ``folder``, or no ``models_dir`` outside ComfyUI.
        nodes.common.paths.PathOutsideFolderError: ``name`` leaves its folder.
        FileNotFoundError: no such model.
    """
    _check_folder_name(folder)
    folder_paths = comfy_folder_paths() if models_dir is None else None
    if folder_paths is not None and folder not in FOLDER_MODEL_MARKERS:
        path = folder_paths.get_full_path(folder, name)
        candidates = ([path] if path else []) + [confine(os.path.join(SHIPPED_MODELS, folder), name)]
    else:
        candidates = [confine(base, name) for base in _bases(folder, models_dir)]
    for path in candidates:
        if os.path.isdir(path) if folder in FOLDER_MODEL_MARKERS else os.path.isfile(path):
            return path
    available = list_models(folder, models_dir)
    raise FileNotFoundError(f"no {folder} model {name!r}; available: {available[:20] or 'none'}")


def list_models(folder: str, models_dir: str | os.PathLike | None = None) -> list[str]:
    """The model names in ``folder``, for a combo: files with a model extension (relative paths with ``/``), or
    for the folders of :data:`FOLDER_MODEL_MARKERS` the sub-folders holding their marker file (a diffusers
    folder's ``model_index.json``, a transformers model's ``config.json``). The user's models come first, sorted, then the
    shipped ones, so a loader's default is the user's own model when there is one.

    Pickle-based files are listed too, so that choosing one explains why it is refused instead of hiding it.
    """
    _check_folder_name(folder)
    *user_bases, shipped_base = _bases(folder, models_dir)
    users = sorted(set().union(*(_model_names(folder, base) for base in user_bases)))
    return users + sorted(_model_names(folder, shipped_base) - set(users))


def _model_names(folder: str, base: str) -> set[str]:
    """The names :func:`list_models` lists from one base folder."""
    marker = FOLDER_MODEL_MARKERS.get(folder)
    if marker is None:
        return files_under(base, (SAFE_EXTENSION, *PICKLE_EXTENSIONS))
    names: set[str] = set()
    for current, directories, files in os.walk(base, followlinks=True):
        directories[:] = [name for name in directories if not name.startswith(".")]
        relative = os.path.relpath(current, base).replace(os.sep, "/")
        if marker in files and relative != ".":
            names.add(relative)
            directories[:] = []
    return names


def files_under(base: str, extensions: tuple[str, ...]) -> set[str]:
    """The files under ``base`` whose names end with one of ``extensions`` (any case), as relative paths with
    ``/``; hidden files and folders are skipped, and a missing ``base`` holds none."""
    names: set[str] = set()
    for current, directories, files in os.walk(base, followlinks=True):
        directories[:] = [name for name in directories if not name.startswith(".")]
        relative = os.path.relpath(current, base).replace(os.sep, "/")
        names.update(name if relative == "." else f"{relative}/{name}" for name in files
                     if name.lower().endswith(extensions) and not name.startswith("."))
    return names


def list_checkpoints(models_dir: str | os.PathLike | None = None) -> list[str]:
    """Every checkpoint a loader can offer: single files in ``checkpoints/``, then the folders in ``diffusers/``
    as ``"diffusers/<folder>"``."""
    return list_models("checkpoints", models_dir) + [DIFFUSERS_PREFIX + name for name in list_models("diffusers",
                                                                                                      models_dir)]


def resolve_checkpoint(name: str, models_dir: str | os.PathLike | None = None) -> str:
    """The path of a name from :func:`list_checkpoints`: ``"diffusers/<folder>"`` is a diffusers folder, anything
    else a file in ``checkpoints/``."""
    if name.startswith(DIFFUSERS_PREFIX) and not name.lower().endswith((SAFE_EXTENSION, *PICKLE_EXTENSIONS)):
        return resolve_model_path("diffusers", name[len(DIFFUSERS_PREFIX):], models_dir)
    return resolve_model_path("checkpoints", name, models_dir)


def load_checkpoint(name: str, models_dir: str | os.PathLike | None = None, **options: Any) -> LoadedModel:
    """:func:`load_model` of a checkpoint named as :func:`list_checkpoints` names it; ``options`` go to load_model."""
    return load_model(resolve_checkpoint(name, models_dir), **options)
