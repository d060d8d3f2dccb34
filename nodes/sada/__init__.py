"""SADA: stability-guided adaptive acceleration, skipping the network calls where the trajectory is stable."""
