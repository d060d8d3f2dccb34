"""MagicFace's multi-concept personalization without training: reference self-attention, then region-bound
attention and per-region guidance (``techniques.md`` §4.10)."""
