"""Loaders for the models that ship with Atelier, giving each host's own MODEL, CLIP and VAE objects."""
