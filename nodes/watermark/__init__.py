"""Invisible watermarks, training-free: Gaussian Shading and Tree-Ring in the initial latent (read back by DDIM
inversion), a corrected post-hoc DWT-DCT mark for any image, and Safe-SD's prompt trigger and QR payload."""
