"""Dense feature maps for semantic correspondence: a weight-free dense SIFT descriptor, Stable Diffusion UNet decoder
features taken with forward hooks, and DINOv2 last-layer tokens.

Every extractor returns a :class:`FeatureMaps`: one or more layers ``(C_i, h_i, w_i)`` whose grids cover the whole
image, cell ``(i, j)`` centred on pixel ``((j + 0.5)·W/w − 0.5, (i + 0.5)·H/h − 0.5)``.

Source: "A Tale of Two Features" (Zhang et al., NeurIPS 2023, arXiv 2305.15347); official code Junyi42/sd-dino
(commit b85df18), read for its defaults only (it ships no licence; nothing is copied). Departure, for all three
extractors: the anchor resizes the long side and zero-pads to a square; we keep the aspect ratio and round each side
to a multiple of the model's stride, so the grid covers only the image and no token is spent on padding.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..common.denoiser import Conditioning, Denoiser, DiffusersDenoiser, LatentCodec, NoiseSchedule
from ..common.memory import runs_on
from ..common.unet_split import module_outputs
from ..sampling.latents import seeded_noise

# Source: sd-dino, --SIZE 960 (SD input) and 840 (DINOv2 input, 60×60 tokens of ViT-B/14).
SD_IMAGE_SIZE = 960
DINO_IMAGE_SIZE = 840
# Source: sd-dino, --TIMESTEP 100 and the fixed noise buffer seeded 42.
SD_TIMESTEP = 100
SD_NOISE_SEED = 42
# Source: sd-dino, decoder_only features of ldm output_blocks 2, 5 and 8 (the tensors entering those blocks).
SD_LAYERS = (2, 5, 8)
SD_LAYER_CHOICES = (2, 5, 8, 11)  # the inputs of each decoder level's last block
SD_FAMILIES = ("sd1", "sd2")  # the anchor's SD v1-3/1-4/1-5 and 2-1-base; SDXL's decoder has other levels
SD_SIDE_MULTIPLE = 64  # VAE ×8, then the UNet halves the latent three times: every decoder grid is whole
# DINOv2's input normalisation: ImageNet's mean and std (facebookresearch/dinov2, data/transforms.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Dense SIFT: 4×4 spatial bins of 4 px (SIFT's layout, kornia's default), sampled every bin width, so that the grid is
# image/4 and neighbouring descriptors overlap by three quarters. 240 px gives the paper's 60×60 grid.
SIFT_IMAGE_SIZE = 240
SIFT_STRIDE = 4
SIFT_OCTAVES = 3  # bins of 4, 8 and 16 px: see dense_sift_features
# kornia's pooling convolution spans 13 px (4 taps, dilation 4) after a 4-px bin pooling that shifts by half a pixel;
# 4 px of padding centres output cell i on pixel 4i + 1.5, the grid convention above.
_SIFT_PADDING = 4


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureMaps:
    """The dense features of one image (the ``ATELIER_FEATURES`` socket).

    ``layers`` are ``(C_i, h_i, w_i)`` maps over the whole image of size ``image_size`` = (H, W); ``source`` names
    the extractor and its settings, so that fusion can refuse to mix features of different kinds.
    """

    layers: tuple[torch.Tensor, ...]
    source: str
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        if not self.layers or any(layer.ndim != 3 for layer in self.layers):
            raise ValueError(f"layers must be one or more (C, h, w) maps; got shapes "
                             f"{[tuple(layer.shape) for layer in self.layers]}")


def check_image(image: torch.Tensor, name: str = "image") -> None:
    """Refuse anything but one RGB image ``(1, 3, H, W)`` with values in 0..1."""
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"{name} must be one RGB image of shape (1, 3, H, W); got {tuple(image.shape)} "
                         f"(split a batch into single images first)")
    if image.shape[-1] < 2 or image.shape[-2] < 2:
        raise ValueError(f"{name} must be at least 2×2 pixels; got {tuple(image.shape[-2:])}")


def fit_size(height: int, width: int, long_side: int, multiple: int) -> tuple[int, int]:
    """The size with the long side ``long_side`` and the aspect ratio kept, each side rounded to ``multiple``.

    Example:
        >>> fit_size(480, 640, 960, 64)
        (704, 960)
    """
    scale = long_side / max(height, width)
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) in 0..1 resized to ``size`` = (h, w), bicubic with antialiasing; unchanged if already that size."""
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


# --- weight-free: dense SIFT ---------------------------------------------------------------------------------------

def dense_sift_features(image: torch.Tensor, size: int = SIFT_IMAGE_SIZE) -> FeatureMaps:
    """Dense RootSIFT descriptors at three scales on regular grids: features that need no weights.

    Args:
        image: (1, 3, H, W) RGB in 0..1.
        size: the long side, in pixels, the image is resized to first; a multiple of 16 in [64, 4096]. The finest
            grid is size / 4 cells on the long side: 240 gives the paper's 60.
    Returns:
        Three layers (128, h_k, w_k) of L2-normalised RootSIFT descriptors with bins of 4, 8 and 16 px of the
        resized image (the image resized again to size / 2 and size / 4), finest first.
    Raises:
        ValueError: a bad ``image`` or ``size``.
    Source:
        Lowe's SIFT layout (4×4 bins × 8 orientations) as kornia's ``DenseSIFTDescriptor`` computes it, stacked over
        octaves as dense multi-scale SIFT does. Departure: the paper matches learned features; this is the
        no-weights stand-in. One scale alone is ambiguous on repeated texture (PCK@0.05 0.78–0.83 against 0.95–0.99
        for three scales on the tests' warped textures).
    Example:
        >>> maps = dense_sift_features(torch.rand(1, 3, 40, 64), size=64)
        >>> [tuple(layer.shape) for layer in maps.layers]
        [(128, 10, 16), (128, 5, 8), (128, 2, 4)]
    """
    from kornia.color import rgb_to_grayscale
    from kornia.feature import DenseSIFTDescriptor

    check_image(image)
    smallest = SIFT_STRIDE * 2 ** (SIFT_OCTAVES - 1)
    if not 64 <= size <= 4096 or size % smallest:
        raise ValueError(f"size must be a multiple of {smallest} in [64, 4096]; got {size}")
    descriptor = DenseSIFTDescriptor(stride=SIFT_STRIDE, padding=_SIFT_PADDING).to(image.device)
    gray = rgb_to_grayscale(image.float())
    layers = []
    with torch.no_grad():
        for octave in range(SIFT_OCTAVES):
            side = size // 2 ** octave
            layers.append(descriptor(resize_image(gray, fit_size(*image.shape[-2:], side, SIFT_STRIDE)))[0])
    return FeatureMaps(tuple(layers), f"dense_sift size={size}", tuple(image.shape[-2:]))


# --- Stable Diffusion UNet decoder features -------------------------------------------------------------------------

def sd_layer_modules(unet: torch.nn.Module, layers: tuple[int, ...]) -> list[torch.nn.Module]:
    """The modules whose outputs are the tensors entering ldm ``output_blocks[i]`` for ``i`` in ``layers``, in a
    diffusers ``UNet2DConditionModel`` or in the original LDM ``UNetModel`` (ComfyUI's ``diffusion_model``).

    ldm's decoder has three blocks per level: diffusers' ``up_blocks[k]`` holds ldm's ``output_blocks[3k]`` to
    ``[3k + 2]``, its ``resnets[j]`` (and ``attentions[j]``) being ``output_blocks[3k + j]``. The tensor entering
    ``output_blocks[3k + 2]`` (before the skip connection is concatenated to it) is the output of the level's second
    block, ``output_blocks[3k + 1]``: in diffusers ``up_blocks[k].attentions[1]`` (levels with cross-attention) or
    ``up_blocks[k].resnets[1]`` (the first level of SD1/SD2, which has none); in ldm the block's last layer,
    ``output_blocks[3k + 1][-1]``, hooked rather than the block itself because ComfyUI runs a block's layers one by
    one without calling the block. For SD1.5 that gives idx 2: 1280 channels at 1/64, idx 5: 1280 at 1/32, idx 8:
    640 at 1/16 (correspondence.md §1.1).

    Raises:
        ValueError: bad ``layers``, or a network of neither layout.
    """
    bad = [layer for layer in layers if layer not in SD_LAYER_CHOICES]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct ldm output_blocks indices from {SD_LAYER_CHOICES}; got {layers}")
    if hasattr(unet, "output_blocks"):
        return [unet.output_blocks[layer - 1][-1] for layer in layers]
    if not hasattr(unet, "up_blocks"):
        raise ValueError(f"unet must be a diffusers UNet2DConditionModel or an ldm UNetModel; got "
                         f"{type(unet).__name__}")
    modules = []
    for layer in layers:
        block = unet.up_blocks[(layer - 2) // 3]
        attentions = getattr(block, "attentions", None)
        modules.append(attentions[1] if attentions is not None else block.resnets[1])
    return modules


def sd_unet_features(unet: torch.nn.Module, codec: LatentCodec, schedule: NoiseSchedule, image: torch.Tensor,
                     conditioning: Conditioning, timestep: int = SD_TIMESTEP, seed: int = SD_NOISE_SEED,
                     size: int = SD_IMAGE_SIZE, layers: tuple[int, ...] = SD_LAYERS) -> FeatureMaps:
    """:func:`sd_denoiser_features` of a diffusers ``UNet2DConditionModel`` and its training ``schedule``."""
    return sd_denoiser_features(DiffusersDenoiser(unet, schedule), unet, codec, image, conditioning, timestep, seed,
                                size, layers)


def sd_denoiser_features(denoiser: Denoiser, unet: torch.nn.Module, codec: LatentCodec, image: torch.Tensor,
                         conditioning: Conditioning, timestep: int = SD_TIMESTEP, seed: int = SD_NOISE_SEED,
                         size: int = SD_IMAGE_SIZE, layers: tuple[int, ...] = SD_LAYERS) -> FeatureMaps:
    """Stable Diffusion UNet decoder features of an image, noised once to ``timestep`` with seeded noise.

    The image is encoded by the VAE (posterior mean), noised to x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε with ε drawn from
    ``seed`` on the CPU (the same on every device), and denoised once; forward hooks on ``unet`` take the decoder
    tensors, and the UNet stops after the deepest one asked for.

    Args:
        denoiser: the model: Atelier's ``DiffusersDenoiser`` or the ``ComfyDenoiser`` over ComfyUI's MODEL; ᾱ comes
            from its ``schedule`` (inside ComfyUI, the model's ``model_sampling``).
        unet: the SD1/SD2-layout network the denoiser runs, where the hooks go (see :func:`sd_layer_modules`).
        codec: its VAE.
        image: (1, 3, H, W) RGB in 0..1.
        conditioning: the prompt, batch 1 (the empty prompt in the paper's setting).
        timestep: t in [0, T − 1]; the paper uses 100.
        seed: seeds ε; the paper's is 42.
        size: the long side the image is resized to, a multiple of 64; the paper's 960.
        layers: ldm ``output_blocks`` indices from (2, 5, 8, 11); the paper's (2, 5, 8).
    Returns:
        One (C_i, h_i, w_i) map per layer, in the order of ``layers``, float32.
    Raises:
        ValueError: bad ``layers``, ``timestep``, ``size`` or image.
    Source:
        sd-dino's extractor (ODISE's LdmImplicitCaptionerExtractor, decoder_only). Departures: one 960² UNet pass
        instead of four 512² windows; ε drawn at the latent's size instead of a fixed buffer resized bicubically; the
        empty prompt or the user's text instead of ODISE's implicit captioner (which CleanDIFT measured at −0.3 PCK).
    """
    check_image(image)
    schedule = denoiser.schedule
    if not 0 <= timestep < schedule.num_train_timesteps:
        raise ValueError(f"timestep must be in [0, {schedule.num_train_timesteps - 1}]; got {timestep}")
    if size % SD_SIDE_MULTIPLE or not SD_SIDE_MULTIPLE <= size <= 4096:
        raise ValueError(f"size must be a multiple of {SD_SIDE_MULTIPLE} in [64, 4096]; got {size}")
    if conditioning.batch_size != 1:
        raise ValueError(f"conditioning must have batch 1; got {conditioning.batch_size}")
    modules = sd_layer_modules(unet, tuple(layers))
    pixels = resize_image(image.float(), fit_size(*image.shape[-2:], size, SD_SIDE_MULTIPLE))
    latent = (codec.encode(pixels) - codec.shift_factor) * codec.scaling_factor
    noise, _ = seeded_noise(seed, tuple(latent.shape), device=latent.device, dtype=latent.dtype)
    alpha_bar = float(schedule.alphas_cumprod[timestep])
    x_t = math.sqrt(alpha_bar) * latent + math.sqrt(1 - alpha_bar) * noise

    try:
        taken = module_outputs(modules, lambda: denoiser(x_t, torch.tensor([timestep], device=x_t.device),
                                                         conditioning))
    except ValueError:
        raise ValueError(f"the UNet ran without reaching layers {layers}; is it an SD1/SD2 UNet?") from None
    source = f"sd t={timestep} seed={seed} size={size} layers={','.join(map(str, layers))}"
    return FeatureMaps(tuple(layer[0].float() for layer in taken), source, tuple(image.shape[-2:]))


# --- DINOv2 ----------------------------------------------------------------------------------------------------------

def dinov2_features(model: torch.nn.Module, image: torch.Tensor, size: int = DINO_IMAGE_SIZE) -> FeatureMaps:
    """DINOv2 patch tokens of the last layer, as a map over the image.

    Args:
        model: a transformers ``Dinov2Model``.
        image: (1, 3, H, W) RGB in 0..1.
        size: the long side the image is resized to, a multiple of the patch size; the paper's 840 (60×60 tokens).
    Returns:
        One layer (D, H'/p, W'/p): the output of the last transformer block, before the final layer norm (the
        anchor's hook on block 11 of ViT-B/14, facet "token"), without the CLS token.
    Raises:
        ValueError: a bad ``size`` or image.
    Source:
        sd-dino, DINOv2 ViT-B/14, layer 11, facet token, input 840.
    """
    check_image(image)
    patch = int(model.config.patch_size)
    if size % patch or not patch <= size <= 4096:
        raise ValueError(f"size must be a multiple of the patch size {patch} in [{patch}, 4096]; got {size}")
    height, width = fit_size(*image.shape[-2:], size, patch)
    device = runs_on(model)
    pixels = resize_image(image.float(), (height, width)).to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=((pixels - mean) / std).to(next(model.parameters()).dtype),
                       output_hidden_states=True).hidden_states[-1]
    grid = (height // patch, width // patch)
    tokens = hidden[0, -grid[0] * grid[1]:].float()  # patch tokens come after the CLS (and any register) tokens
    return FeatureMaps((tokens.T.reshape(-1, *grid),), f"dinov2 {model.config.hidden_size}d size={size}",
                       tuple(image.shape[-2:]))
