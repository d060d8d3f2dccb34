"""Super-resolution from published weights: AdcSR's one-step ×4 (``adcsr``: the network and its loading; ``nodes``:
the loader and the upscale node)."""
