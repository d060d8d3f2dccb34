"""Faster Diffusion: the UNet's encoder features reused across sampling steps, with no training."""
