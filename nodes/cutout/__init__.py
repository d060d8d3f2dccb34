"""High-resolution cut-outs from published weights: DiffDIS (``diffdis``: the UNet, its forward and inference;
``nodes``: the loader and the cut-out node)."""
