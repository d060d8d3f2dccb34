"""Normal maps from published weights: StableNormal's one-step YOSO (``stablenormal``: the ControlNet's forward and the
inference; ``nodes``: the loader and the normals node)."""
