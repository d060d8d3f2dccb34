"""The tiled 16K generator: tiled diffusion (MultiDiffusion, Mixture of Diffusers, shifted tiles), LinFusion and
the staged recipe with a streaming tiled VAE decode."""
