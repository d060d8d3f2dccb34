"""What the server tests share: node classes that report progress, and an app on a temporary data folder."""

import asyncio
import io
import threading
import time

from PIL import Image

from nodes.common.progress import progress, progress_text
from web.folders import DataFolders
from web.registry import node_classes
from web.server import create_app
from web.server_state import ServerConfig

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class Steps:
    """Reports ``steps`` progress calls with a preview each, sleeping ``pause_ms`` between them."""

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    started = threading.Event()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 3, "min": 1, "max": 10_000, "step": 1}),
                             "pause_ms": ("INT", {"default": 0, "min": 0, "max": 1000, "step": 1})}}

    def run(self, steps, pause_ms):
        for step in range(1, steps + 1):
            progress(step, steps, Image.new("RGB", (600, 300), (step % 255, 80, 160)))
            # Set after the first progress frame went out: an interrupt that a test sends on seeing ``started``
            # then lands after it, and not between this line and the frame (progress() checks for it first).
            Steps.started.set()
            time.sleep(pause_ms / 1000)
        return {"ui": {"text": [f"{steps} steps"]}}


class Says:
    """Shows ``text`` on itself in the editor (progress text), then ends."""

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hello"})}}

    def run(self, text):
        progress_text(text)
        return {}


class Explode:
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def run(self, image):
        raise RuntimeError("this node always fails")


def make_app(root, token=None, allowed_hosts=LOOPBACK):
    folders = DataFolders.under(str(root / "data"))
    config = ServerConfig(folders=folders, models_dir=str(root / "models"), allowed_hosts=allowed_hosts, token=token)
    return create_app(config, {**node_classes(folders, config.models_dir), "Steps": Steps, "Says": Says,
                                                                   "Explode": Explode})


def solid_prompt(prefix="test", width=16, color=0x336699):
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": 8, "batch_size": 1, "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def png_bytes(size=(8, 8), color=(255, 0, 0, 255)):
    buffer = io.BytesIO()
    Image.new("RGBA", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


async def messages_until_done(socket, prompt_id, timeout=60):
    """Every message on ``socket`` up to ``executing {node: null}`` for ``prompt_id``: JSON as dicts, binary as bytes."""
    received = []
    async with asyncio.timeout(timeout):
        while True:
            message = await socket.receive()
            if message.type.name == "BINARY":
                received.append(message.data)
                continue
            data = message.json()
            received.append(data)
            if data["type"] == "executing" and data["data"]["node"] is None and data["data"]["prompt_id"] == prompt_id:
                return received


async def connect(client, client_id, with_metadata=True):
    socket = await client.ws_connect(f"/ws?clientId={client_id}")
    hello = await socket.receive_json()
    assert hello["type"] == "status" and hello["data"]["sid"] == client_id
    if with_metadata:
        await socket.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        assert (await socket.receive_json())["type"] == "feature_flags"
    return socket


async def queue(client, prompt, client_id=None, **extra):
    response = await client.post("/api/prompt", json={"prompt": prompt, "client_id": client_id, **extra})
    assert response.status == 200, await response.text()
    return (await response.json())["prompt_id"]


class EventLog:
    """A prompt queue's ``send`` that records every ``(event, data)`` it is given, from any thread."""

    def __init__(self):
        self.received: list[tuple[str, dict]] = []
        self._lock = threading.Lock()

    def __call__(self, event: str, data: dict, client_id: str | None) -> None:
        with self._lock:
            self.received.append((event, data))


def wait_until_idle(queue, timeout: float) -> None:
    """Return once nothing is pending or running in the prompt ``queue``; fail, saying what is left, after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while queue.remaining():
        assert time.monotonic() < deadline, f"the queue did not finish: {queue.snapshot()}"
        time.sleep(0.01)


def tiled_prompt(size: int, seed: int, steps: int, cfg: float, tile: int, decode_overlap: int,
                 prefix: str) -> dict:
    """The embedded model, Tiled Sample (Mixture of Diffusers, euler) of ``size``² in ``tile``-px tiles
    overlapping by a quarter tile, one tile per UNet call, then VAE Decode (Tiled) in ``tile``-px tiles overlapping
    by ``decode_overlap`` px; saved (output node "9")."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "atelier_embedded_sd1.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle on the left"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {"class_type": "AtelierTiledSample", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "seed": seed,
            "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "mode": "mixture", "tile_size": tile, "overlap": tile // 4, "offset_stride": tile // 2,
            "tile_batch_size": 1}},
        "8": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["4", 2], "tile_size": tile,
                                                         "overlap": decode_overlap, "temporal_size": 64,
                                                         "temporal_overlap": 8}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }
