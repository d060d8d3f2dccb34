"""The SADA node: a MODEL (token pruning) and a SAMPLER (step skipping) that work as a pair, for SamplerCustom and
SamplerCustomAdvanced in both hosts (``interop.md`` §4). See :mod:`.solver` and :mod:`.tokens`."""

from __future__ import annotations

import dataclasses

from ..sampling.k_samplers import Sampler
from ..sampling.patches import patch_model
from .solver import DEFAULTS, SOLVERS, SadaSettings, sample_sada
from .tokens import DEFAULT_MAX_DOWNSAMPLE, DEFAULT_MAX_FIX, DEFAULT_WINDOW, TokenPruning, TokenScores

CATEGORY = "atelier/acceleration"
MAX_STEP_INDEX = 1000
MAX_WINDOW, MAX_DOWNSAMPLE, MAX_FIX = 8, 8, 1 << 20


def _step_input(name: str, tooltip: str, minimum: int = 0) -> tuple:
    return ("INT", {"default": DEFAULTS[name], "min": minimum, "max": MAX_STEP_INDEX, "step": 1, "tooltip": tooltip})


class AtelierSADA:
    DESCRIPTION = ("SADA (Jiang et al., ICML 2025): a SAMPLER (Euler or DPM++ 2M) that skips the network call at "
                   "steps where a stability test on the trajectory finds the next state predictable, and a MODEL "
                   "whose full-resolution transformer blocks run on a subset of the tokens at the other steps "
                   "(about 1.8x faster at 50 steps in the paper). Use both in SamplerCustom; the step settings are "
                   "the authors' for 50 steps.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "SAMPLER")
    RETURN_NAMES = ("model", "sampler")
    OUTPUT_TOOLTIPS = ("The model with SADA's token pruning, driven by this sampler (with another sampler it runs "
                       "unchanged); the input model is unchanged.",
                       "The sampler, for SamplerCustom or SamplerCustomAdvanced, with the model beside it.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to sample (an SD1, SD2 or SDXL UNet)."}),
            "solver": (list(SOLVERS), {"tooltip": "The solver SADA accelerates (the paper's two)."}),
            "acc_start": _step_input("acc_start", "First step (from 0) whose test may skip the next step's call; "
                                                  "below 3 counts as 3 (three drift values are needed)."),
            "acc_end": _step_input("acc_end", "No skip is decided from this step on: the steps after it are computed "
                                              "(the last ones stay exact); at or below acc_start SADA never skips "
                                              "and never prunes: the plain solver."),
            "lagrange_step": _step_input("lagrange_step", "From this step (a multiple of lagrange_int) every step "
                                                          "that is not a multiple of lagrange_int is skipped, its "
                                                          "estimate a Lagrange extrapolation."),
            "lagrange_int": _step_input("lagrange_int", "Interval of the kept estimates and of the computed steps "
                                                        "in the Lagrange phase.", 1),
            "lagrange_term": _step_input("lagrange_term", "Points of the Lagrange extrapolation (0: no Lagrange "
                                                          "phase, the stability test up to acc_end)."),
            "max_interval": _step_input("max_interval", "Never more than this many skipped steps in a row; the "
                                                        "pruned blocks run in full this often.", 1),
            "sx": ("INT", {"default": DEFAULT_WINDOW, "min": 1, "max": MAX_WINDOW, "step": 1,
                           "tooltip": "Token windows' width: one random token per window is kept (1 with sy 1: "
                                      "every token, no pruning)."}),
            "sy": ("INT", {"default": DEFAULT_WINDOW, "min": 1, "max": MAX_WINDOW, "step": 1,
                           "tooltip": "Token windows' height."}),
            "max_downsample": ("INT", {"default": DEFAULT_MAX_DOWNSAMPLE, "min": 1, "max": MAX_DOWNSAMPLE, "step": 1,
                                       "tooltip": "Prune the blocks whose maps are at most this many times smaller "
                                                  "than the latent (1: full resolution only)."}),
            "max_fix": ("INT", {"default": DEFAULT_MAX_FIX, "min": 0, "max": MAX_FIX, "step": 1,
                                "tooltip": "At most this many unstable tokens are always kept."}),
        }}

    def build(self, model, solver: str, acc_start: int, acc_end: int, lagrange_step: int, lagrange_int: int,
              lagrange_term: int, max_interval: int, sx: int, sy: int, max_downsample: int, max_fix: int) -> tuple:
        settings = SadaSettings(acc_start, acc_end, lagrange_int, lagrange_step, lagrange_term, max_interval)
        scores = TokenScores(settings, max_fix)
        patched = patch_model(model, TokenPruning(scores, sx, sy, max_downsample))
        options = {"solver": solver, "tokens": scores, **dataclasses.asdict(settings)}
        return patched, Sampler(sample_sada, options, f"sada_{solver}").for_host()


NODE_CLASS_MAPPINGS = {"AtelierSADA": AtelierSADA}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierSADA": "SADA"}
