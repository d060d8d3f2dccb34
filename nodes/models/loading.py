"""Load SD1, SD2, SDXL and SDXL-refiner checkpoints fully offline, and find them in a models folder or through
ComfyUI: the names of the modules below, importable from here as they were before the split.

- ``formats``: only ``.safetensors`` is loaded (``check_safetensors``, ``UnsafeModelFormatError``).
- ``model_configs``: the shipped and derived config folders and the offline tokenizers.
- ``devices``: the default device and dtype.
- ``loaded``: ``LoadedModel``, what a loaded checkpoint is.
- ``loader``: ``load_model`` and its cache, ``load_checkpoint``, ``load_transformers_folder``,
  ``load_kept_asymmetric_vae``.
- ``sources``: where models come from (``--models-dir``, ComfyUI's ``folder_paths``, the shipped models).

New code imports from those modules directly.
"""

from __future__ import annotations

from .devices import ACCEPTED_DTYPES, default_device, default_dtype
from .formats import (PICKLE_EXTENSIONS, SAFE_EXTENSION, WEIGHT_COMPONENTS, UnsafeModelFormatError,
                      check_folder_weights, check_safetensors)
from .loaded import LoadedModel
from .loader import cached_models, load_checkpoint, load_model, load_transformers_folder, unload_all
from .model_configs import (FAMILY_CONFIG_DIRS, SD1_TOKENIZER_DIR, SHIPPED_CONFIGS, load_tokenizer,
                            shipped_config_dir, single_file_config_dir)
from .sources import (DIFFUSERS_PREFIX, FOLDER_MODEL_MARKERS, MODEL_FOLDERS, SHIPPED_MODELS, comfy_folder_paths,
                      files_under, list_checkpoints, list_models, resolve_checkpoint, resolve_model_path)

__all__ = [
    "ACCEPTED_DTYPES", "DIFFUSERS_PREFIX", "FAMILY_CONFIG_DIRS", "FOLDER_MODEL_MARKERS", "MODEL_FOLDERS",
    "PICKLE_EXTENSIONS", "SAFE_EXTENSION", "SD1_TOKENIZER_DIR", "SHIPPED_CONFIGS", "SHIPPED_MODELS",
    "WEIGHT_COMPONENTS", "LoadedModel", "UnsafeModelFormatError", "cached_models", "check_folder_weights",
    "check_safetensors", "comfy_folder_paths", "default_device", "default_dtype", "files_under", "list_checkpoints",
    "list_models", "load_checkpoint", "load_model", "load_tokenizer", "load_transformers_folder",
    "resolve_checkpoint", "resolve_model_path", "shipped_config_dir", "single_file_config_dir", "unload_all",
]
