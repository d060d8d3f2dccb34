"""Sampling, shared by the techniques and the standalone app's core nodes.

ComfyUI's way (the KSampler nodes): ``model_sampling`` (the VE view of a model's schedule), ``sigmas`` (its
schedulers), ``noise`` (its seeded noise and Brownian tree), ``k_samplers`` (its update rules and ``run_sampler``),
``guidance`` (its CONDITIONING rules and classifier-free guidance) and ``guiders`` (the GUIDER a KSampler runs).
Atelier's own samplers on diffusers' schedulers, for techniques that step on timesteps: ``samplers.sample`` with
HB/GHVB momentum (``momentum``, ``dpm_solver``) and the F-scheduler (``schedules``), driven by ``generate``.
``previews.progress_reporter`` is the per-step callback; this package holds no node classes.
"""
