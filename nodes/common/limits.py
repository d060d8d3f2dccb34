"""The limits every node's widgets share, ComfyUI's where ComfyUI has one, so workflows move between the hosts."""

MAX_RESOLUTION = 16384  # ComfyUI's MAX_RESOLUTION: the largest side a node accepts, in pixels
MAX_BATCH = 4096  # ComfyUI's EmptyLatentImage limit
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's: seeds are 64-bit
MAX_STEPS = 10_000  # ComfyUI's KSampler limit
MAX_CFG = 100.0  # ComfyUI's KSampler limit
