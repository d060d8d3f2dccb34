"""T-Stitch: a small model for the first steps of a trajectory, the user's model for the rest, with no training."""
