import os
import tempfile

# Set before anything imports huggingface_hub, which reads them once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))  # an empty cache: nothing to fall back on

import netguard  # noqa: E402  first, before torch, diffusers, transformers and aiohttp
import pytest  # noqa: E402
from comfyui_fixtures import (  # noqa: E402, F401  (fixtures for tests against real ComfyUI)
    comfyui_environment, comfyui_models_dir, comfyui_server, random_sd15_models)


@pytest.fixture(autouse=True)
def no_network():
    """Fails any test during which code tried to reach a host that is not loopback."""
    netguard.ATTEMPTS.clear()
    yield
    assert netguard.ATTEMPTS == [], f"non-loopback network attempts: {netguard.ATTEMPTS}"
