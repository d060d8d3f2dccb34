"""Semantic correspondence: SD UNet, DINOv2 and dense-SIFT features, their fusion (SD + DINO), and matching."""
