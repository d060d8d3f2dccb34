"""correspondence (being built)."""
