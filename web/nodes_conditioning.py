"""ComfyUI's conditioning nodes in the standalone app: prompts encoded and CONDITIONING lists combined and scoped.

A CONDITIONING is ComfyUI's list of ``[embeds (1, L, D), options]``; these nodes build and edit it exactly as
ComfyUI's do (same class names, inputs, defaults and option keys), and :mod:`nodes.sampling.guidance` reads it.
"""

from __future__ import annotations

import torch

from nodes.common.limits import MAX_RESOLUTION
from nodes.models.clip import Clip
from nodes.sampling.guidance import check_conditioning

MIN_CLIP_LAYER = -24  # ComfyUI's limit for CLIPSetLastLayer


def set_values(conditioning: list, values: dict) -> list:
    """A copy of ``conditioning`` with ``values`` set in every entry's options (the tensors are shared)."""
    check_conditioning(conditioning)
    return [[embeds, {**options, **values}] for embeds, options in conditioning]


def _text(tooltip: str) -> tuple[str, dict]:
    return ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": tooltip})


def _pixels(default: int, tooltip: str) -> tuple[str, dict]:
    return ("INT", {"default": default, "min": 0, "max": MAX_RESOLUTION, "step": 1, "tooltip": tooltip})


class CLIPTextEncode:
    DESCRIPTION = ("Encodes a text prompt with a CLIP model into an embedding that guides the diffusion model. "
                   "Supports (word:1.2) weights and embedding:name textual inversions, as ComfyUI does.")
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"text": _text("The text to be encoded."),
                             "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."})}}

    def encode(self, clip: Clip, text: str) -> tuple[list]:
        if clip is None:
            raise ValueError("the clip input is empty: the checkpoint loaded has no text encoder")
        return (clip.encode_from_tokens_scheduled(clip.tokenize(text)),)


class CLIPTextEncodeSDXL:
    DESCRIPTION = "Encodes SDXL's two prompts (text_g for OpenCLIP bigG, text_l for CLIP-L) with its size conditioning."
    CATEGORY = "advanced/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The SDXL conditioning.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "clip": ("CLIP", {"tooltip": "An SDXL checkpoint's CLIP."}),
            "width": _pixels(1024, "The original image width SDXL is told."),
            "height": _pixels(1024, "The original image height SDXL is told."),
            "crop_w": _pixels(0, "The crop's left edge SDXL is told."),
            "crop_h": _pixels(0, "The crop's top edge SDXL is told."),
            "target_width": _pixels(1024, "The target width SDXL is told."),
            "target_height": _pixels(1024, "The target height SDXL is told."),
            "text_g": _text("The prompt for OpenCLIP bigG."),
            "text_l": _text("The prompt for CLIP-L."),
        }}

    def encode(self, clip: Clip, width: int, height: int, crop_w: int, crop_h: int, target_width: int,
               target_height: int, text_g: str, text_l: str) -> tuple[list]:
        tokens = clip.tokenize(text_g)
        if "l" not in tokens or "g" not in tokens:
            raise ValueError("CLIPTextEncodeSDXL needs an SDXL checkpoint's CLIP (CLIP-L and OpenCLIP bigG)")
        tokens["l"] = clip.tokenize(text_l)["l"]
        empty = clip.tokenize("")
        while len(tokens["l"]) < len(tokens["g"]):  # both encoders must give the same number of 77-token chunks
            tokens["l"] += empty["l"]
        while len(tokens["g"]) < len(tokens["l"]):
            tokens["g"] += empty["g"]
        return (clip.encode_from_tokens_scheduled(tokens, {
            "width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h, "target_width": target_width,
            "target_height": target_height}),)


class CLIPTextEncodeSDXLRefiner:
    DESCRIPTION = "Encodes a prompt for SDXL's refiner, with its aesthetic score and size conditioning."
    CATEGORY = "advanced/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The refiner conditioning.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "ascore": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 1000.0, "step": 0.01, "round": 0.001,
                                 "tooltip": "The aesthetic score the refiner is told (6 for a positive, 2.5 for a "
                                            "negative prompt are the usual values)."}),
            "width": _pixels(1024, "The image width the refiner is told."),
            "height": _pixels(1024, "The image height the refiner is told."),
            "text": _text("The prompt."),
            "clip": ("CLIP", {"tooltip": "The refiner checkpoint's CLIP."}),
        }}

    def encode(self, clip: Clip, ascore: float, width: int, height: int, text: str) -> tuple[list]:
        return (clip.encode_from_tokens_scheduled(clip.tokenize(text), {"aesthetic_score": ascore, "width": width,
                                                                         "height": height}),)


class CLIPSetLastLayer:
    DESCRIPTION = "Stops the text encoder at an earlier layer (-1 is the last, -2 the one before: 'CLIP skip 2')."
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("The CLIP model stopping at that layer.",)
    FUNCTION = "set_last_layer"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The CLIP model."}),
            "stop_at_clip_layer": ("INT", {"default": -1, "min": MIN_CLIP_LAYER, "max": -1, "step": 1,
                                           "tooltip": "The last layer to use, counted from the end."}),
        }}

    def set_last_layer(self, clip: Clip, stop_at_clip_layer: int) -> tuple[Clip]:
        clip = clip.clone()
        clip.clip_layer(stop_at_clip_layer)
        return (clip,)


class ConditioningCombine:
    DESCRIPTION = "Both conditionings: each is predicted, and where their areas overlap the predictions are averaged."
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Both conditionings' entries.",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"conditioning_1": ("CONDITIONING", {"tooltip": "The first conditioning."}),
                             "conditioning_2": ("CONDITIONING", {"tooltip": "The second conditioning."})}}

    def combine(self, conditioning_1: list, conditioning_2: list) -> tuple[list]:
        check_conditioning(conditioning_1, "conditioning_1")
        check_conditioning(conditioning_2, "conditioning_2")
        return (conditioning_1 + conditioning_2,)


class ConditioningZeroOut:
    DESCRIPTION = "The conditioning with its embeddings (and pooled output) set to zero, e.g. as SDXL-Turbo's negative."
    CATEGORY = "advanced/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The zeroed conditioning.",)
    FUNCTION = "zero_out"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"conditioning": ("CONDITIONING", {"tooltip": "The conditioning to zero."})}}

    def zero_out(self, conditioning: list) -> tuple[list]:
        check_conditioning(conditioning)
        zeroed = []
        for embeds, options in conditioning:
            options = dict(options)
            if options.get("pooled_output") is not None:
                options["pooled_output"] = torch.zeros_like(options["pooled_output"])
            zeroed.append([torch.zeros_like(embeds), options])
        return (zeroed,)


class ConditioningSetTimestepRange:
    DESCRIPTION = "Limits the conditioning to a part of sampling: from start to end, as fractions of the schedule."
    CATEGORY = "advanced/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The conditioning, active in that range only.",)
    FUNCTION = "set_range"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fraction = {"min": 0.0, "max": 1.0, "step": 0.001, "round": 0.001}
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The conditioning to limit."}),
            "start": ("FLOAT", {"default": 0.0, **fraction, "tooltip": "Where it starts (0 is the first step)."}),
            "end": ("FLOAT", {"default": 1.0, **fraction, "tooltip": "Where it ends (1 is the last step)."}),
        }}

    def set_range(self, conditioning: list, start: float, end: float) -> tuple[list]:
        return (set_values(conditioning, {"start_percent": start, "end_percent": end}),)


class ConditioningSetArea:
    DESCRIPTION = "Limits the conditioning to a rectangle of the image (pixels, multiples of 8), with a strength."
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The conditioning, limited to the area.",)
    FUNCTION = "append"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        def side(default: int, low: int, tooltip: str) -> tuple[str, dict]:
            return ("INT", {"default": default, "min": low, "max": MAX_RESOLUTION, "step": 8, "tooltip": tooltip})

        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The conditioning to place."}),
            "width": side(64, 64, "The area's width in pixels."),
            "height": side(64, 64, "The area's height in pixels."),
            "x": side(0, 0, "The area's left edge in pixels."),
            "y": side(0, 0, "The area's top edge in pixels."),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "round": 0.001,
                                   "tooltip": "The area prediction's weight where areas overlap."}),
        }}

    def append(self, conditioning: list, width: int, height: int, x: int, y: int, strength: float) -> tuple[list]:
        return (set_values(conditioning, {"area": (height // 8, width // 8, y // 8, x // 8), "strength": strength,
                                          "set_area_to_bounds": False}),)


class ConditioningSetMask:
    DESCRIPTION = "Limits the conditioning to a mask (or to the mask's bounding box), with a strength."
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The conditioning, limited to the mask.",)
    FUNCTION = "append"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The conditioning to place."}),
            "mask": ("MASK", {"tooltip": "Where the conditioning applies."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "round": 0.001,
                                   "tooltip": "The mask's weight where conditionings overlap."}),
            "set_cond_area": (["default", "mask bounds"], {
                "tooltip": "'mask bounds' runs the prediction on the mask's bounding box only."}),
        }}

    def append(self, conditioning: list, mask: torch.Tensor, strength: float, set_cond_area: str) -> tuple[list]:
        mask = mask.unsqueeze(0) if mask.ndim < 3 else mask
        return (set_values(conditioning, {"mask": mask, "set_area_to_bounds": set_cond_area != "default",
                                          "mask_strength": strength}),)


NODE_CLASSES = (CLIPTextEncode, CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner, CLIPSetLastLayer, ConditioningCombine,
                ConditioningZeroOut, ConditioningSetTimestepRange, ConditioningSetArea, ConditioningSetMask)
DISPLAY_NAMES = {"CLIPTextEncode": "CLIP Text Encode (Prompt)", "CLIPSetLastLayer": "CLIP Set Last Layer",
                 "ConditioningCombine": "Conditioning (Combine)", "ConditioningSetArea": "Conditioning (Set Area)",
                 "ConditioningSetMask": "Conditioning (Set Mask)"}
