"""Inpainting helpers: Asymmetric VQGAN's training-free idea, the unmasked region kept as it was
(``techniques.md`` §4.12)."""
