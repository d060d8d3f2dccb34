"""NoiseShift: the noise level a network is told, recalibrated per resolution, with no training."""
