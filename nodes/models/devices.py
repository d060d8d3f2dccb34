"""Where models run and in which precision, by default."""

from __future__ import annotations

import torch

ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def default_device() -> torch.device:
    """CUDA when this torch build sees a GPU, else the CPU; decided at run time, safe on CPU-only torch."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on a GPU (SD's released precision; SDXL's VAE is marked ``force_upcast`` for decoding), float32 on
    the CPU, where half precision is slow and diffusers' own default is float32."""
    return torch.float16 if device.type == "cuda" else torch.float32
