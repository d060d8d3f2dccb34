"""The P4D audit node (opt-in, both hosts): a problematic prompt and the reference's pictures of it in, the hard
prompt that makes the model under test match them out, with the log of what it tried. See :mod:`.optimize`.

Inside ComfyUI, whose weights are inference tensors, the model under test and the text encoder run on copies of
their weights made for the audit (twice their memory while it runs).
"""

from __future__ import annotations

from typing import Any

import torch

from ..common.images import to_channels_first
from ..common.limits import MAX_SEED
from ..models.clip import CHUNK_TOKENS
from ..models.comfy_adapters import (denoiser_and_codec, differentiable_denoiser, model_device, model_family,
                                     prompt_vectors)
from ..models.refs import ModelRef
from ..sampling.guidance import to_conditioning
from .optimize import (DEFAULT_EVAL_EVERY, DEFAULT_EVERY_K, DEFAULT_FREE_TOKENS, DEFAULT_GUIDANCE, DEFAULT_ITERATIONS,
                       DEFAULT_LR, DEFAULT_WEIGHT_DECAY, VARIANTS, P4DProblem, initial_prompt, p4d_optimize)

CATEGORY = "atelier/evaluation"
# The setting that puts evaluation nodes in the node list (dual-use tools stay out of it by default)
EVALUATION_SETTING = "ATELIER_EVALUATION_NODES"
MAX_ITERATIONS = 100_000


class AtelierP4D:
    DESCRIPTION = ("Prompting4Debugging (Chin et al., ICML 2024), an evaluation tool for maintainers: audits a "
                   "safety mechanism (a concept-erased model, or a negative prompt) by optimising a hard prompt "
                   "with which the model under test predicts what the unconstrained reference predicts for a "
                   "problematic prompt, on the reference's pictures of it. Logs every evaluation; gives the prompt "
                   "found, to check what the safe model makes of it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("prompt", "log")
    OUTPUT_TOOLTIPS = ("The hard prompt with the lowest evaluation loss.", "Every evaluation: iteration, loss, "
                       "prompt; the best last.")
    OUTPUT_NODE = True  # shows the prompt found on the node
    FUNCTION = "audit"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "reference_model": ("MODEL", {"tooltip": "The unconstrained model (the paper: SD 1.4)."}),
            "safe_model": ("MODEL", {"tooltip": "The model under test (a concept-erased checkpoint; or the "
                                                "reference itself with a safe_negative prompt)."}),
            "clip": ("CLIP", {"tooltip": "The text encoder (SD1 or SD2) both models read."}),
            "vae": ("VAE", {"tooltip": "Encodes the target pictures."}),
            "targets": ("IMAGE", {"tooltip": "The reference model's pictures of the prompt (the paper: ones the "
                                             "safe model refuses to make)."}),
            "prompt": ("STRING", {"multiline": True, "default": "",
                                  "tooltip": "The problematic prompt P (its pictures are the targets)."}),
            "safe_negative": ("STRING", {"multiline": True, "default": "",
                                         "tooltip": "The negative prompt when it is the mechanism under test (the "
                                                    "safe model's noise is then its guided combination); empty: "
                                                    "none."}),
            "variant": (list(VARIANTS), {"default": VARIANTS[0],
                                         "tooltip": "P4D-N: free_tokens tokens from scratch; P4D-K: P's tokens "
                                                    "kept, a free one inserted before every every_k of them."}),
            "free_tokens": ("INT", {"default": DEFAULT_FREE_TOKENS, "min": 1, "max": CHUNK_TOKENS - 2, "step": 1,
                                    "tooltip": "P4D-N's prompt length (the authors': 16)."}),
            "every_k": ("INT", {"default": DEFAULT_EVERY_K, "min": 1, "max": CHUNK_TOKENS - 2, "step": 1,
                                "tooltip": "P4D-K: one free token per this many of P's (the authors': 3)."}),
            "iterations": ("INT", {"default": DEFAULT_ITERATIONS, "min": 1, "max": MAX_ITERATIONS, "step": 1,
                                   "tooltip": "Optimisation steps (the authors': 3000)."}),
            "learning_rate": ("FLOAT", {"default": DEFAULT_LR, "min": 0.0001, "max": 10.0, "step": 0.01,
                                        "round": 0.0001, "tooltip": "AdamW's (the authors': 0.1)."}),
            "weight_decay": ("FLOAT", {"default": DEFAULT_WEIGHT_DECAY, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "round": 0.0001, "tooltip": "AdamW's (the authors': 0.1)."}),
            "eval_every": ("INT", {"default": DEFAULT_EVAL_EVERY, "min": 1, "max": MAX_ITERATIONS, "step": 1,
                                   "tooltip": "Evaluate and log the current prompt this often (the authors': 50)."}),
            "guidance": ("FLOAT", {"default": DEFAULT_GUIDANCE, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                   "tooltip": "The safe model's guidance with safe_negative (the authors': 7.5)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1,
                             "tooltip": "Seed of the start, the draws of targets, timesteps and noise."}),
        }}

    def audit(self, reference_model: Any, safe_model: Any, clip: Any, vae: Any, targets: torch.Tensor, prompt: str,
              safe_negative: str, variant: str, free_tokens: int, every_k: int, iterations: int,
              learning_rate: float, weight_decay: float, eval_every: int, guidance: float, seed: int) -> dict:
        if not prompt.strip():
            raise ValueError("prompt: give the problematic prompt the targets were made from")
        _refuse_shared_loras(reference_model, safe_model, clip)
        family = model_family(reference_model)
        if model_family(safe_model) != family:
            raise ValueError(f"the two models must be of one family; got {family} and {model_family(safe_model)}")
        generator = torch.Generator().manual_seed(seed)
        # ComfyUI runs nodes in inference mode, where no gradient is recorded; the optimisation alone records them
        with torch.inference_mode(False), torch.no_grad():
            encoder = prompt_vectors(clip)
            prompt_ids = encoder.ids(prompt)
            ids, free = initial_prompt(variant, prompt_ids, len(encoder.table), generator, free_tokens, every_k)
            if len(ids) > CHUNK_TOKENS - 2:
                raise ValueError(f"the {variant} prompt would have {len(ids)} tokens; at most {CHUNK_TOKENS - 2} "
                                 "fit (shorten the prompt or raise every_k)")
            conditionings = [to_conditioning(clip.encode_from_tokens_scheduled(clip.tokenize(text)), family, name)
                             if text.strip() else None
                             for text, name in ((prompt, "prompt"), (safe_negative, "safe_negative"))]
            with denoiser_and_codec(reference_model, vae) as (reference, codec), \
                    differentiable_denoiser(safe_model) as safe:
                pixels = to_channels_first(targets, "targets")[:, :3].float().clone()
                latents = (codec.encode(pixels.to(codec.device)) - codec.shift_factor) * codec.scaling_factor
                problem = P4DProblem(reference, safe, encoder.encode, encoder.table, encoder.decode,
                                     conditionings[0], latents.to(model_device(reference_model)).clone(),
                                     conditionings[1], guidance)
                with torch.enable_grad():
                    result = p4d_optimize(problem, ids, free, generator, iterations, learning_rate, weight_decay,
                                          eval_every)
        found, log = encoder.decode(result.ids), "\n".join(result.log)
        return {"ui": {"text": [found]}, "result": (found, log)}


def _refuse_shared_loras(reference_model: Any, safe_model: Any, clip: Any) -> None:
    """Standalone, LoRAs run in place on a shared checkpoint: two sets on one would switch under each other."""
    refs = [ref for ref in (reference_model, safe_model, getattr(clip, "ref", None)) if isinstance(ref, ModelRef)]
    if any(a.model is b.model and a.loras != b.loras for a in refs for b in refs):
        raise ValueError("the reference model, the model under test and the CLIP share a checkpoint with different "
                         "LoRAs, which run in place on it: load the model under test from its own checkpoint")


NODE_CLASS_MAPPINGS = {"AtelierP4D": AtelierP4D}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierP4D": "Prompting4Debugging Audit (evaluation)"}
