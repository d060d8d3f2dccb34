"""Samplers and schedules for the sampler node: diffusers' schedulers, HB/GHVB momentum, the F-scheduler, previews.

``samplers.sample`` is the one entry point; ``previews.progress_reporter`` is the per-step callback a node gives it.
Node classes belong in ``nodes.py`` beside this file; this package holds the maths only.
"""
