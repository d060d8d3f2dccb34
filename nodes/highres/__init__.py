"""highres (being built)."""
