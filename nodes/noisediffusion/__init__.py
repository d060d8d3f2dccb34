"""NoiseDiffusion: interpolation between two images by noise mixing at a partial DDIM inversion
(``techniques.md`` §4.8)."""
