"""Super-resolution from published weights: AdcSR's and TVT's one-step ×4 (``adcsr`` and ``tvt``: the networks, their
loading and inference; ``nodes``: the loaders and the upscale nodes)."""
