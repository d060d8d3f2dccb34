"""StableMaterials' seamless tiling for any SD checkpoint: circular convolutions from a quarter of the steps on,
rolled patch attention for large latents, and a decode with wrapped context (``techniques.md`` §4.11)."""
