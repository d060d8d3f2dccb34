"""Few-step models from the papers' published weights: Hyper-SD's LoRAs with their model card's sampler settings."""
