"""Feature inheritance: parts of the UNet reuse features from the last full step (A-SDM's idea; settings ours)."""
