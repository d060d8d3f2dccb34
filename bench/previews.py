"""Preview latency: from a node's progress call to the binary frame a websocket client receives.

A bench node calls ``progress(step, total, preview)`` 200 times with a 512×512 RGB preview. The real server
(``create_app``) runs on a loopback port in this process and event loop, next to an aiohttp websocket client
that announces ``supports_preview_metadata`` as the ComfyUI frontend does and queues the node with POST /prompt.
The i-th binary frame received is matched to the i-th progress call; both instants come from
``time.perf_counter`` in one process, so the worker thread's clock and the client's agree. The full run repeats
the 200 frames three times and quotes the median of the per-run p50 and p95.

    python bench/previews.py [--quick]

Ends with ``BENCH previews frames=200 p50_ms=... p95_ms=... jpeg_kb=... quick=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import struct
import sys
import tempfile
import time

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nodes.common.progress import progress  # noqa: E402
from web.folders import DataFolders  # noqa: E402
from web.server import BINARY_PREVIEW_WITH_METADATA, create_app  # noqa: E402
from web.server_state import ServerConfig  # noqa: E402

FRAMES = 200
MAX_FRAMES = 10_000
WARMUP_FRAMES = 20  # enough to open the connection, import lazily-loaded encoders and warm PIL's JPEG path
PREVIEW_SIZE = 512  # the server's preview limit: the largest preview that is sent without a resize
IMAGE_VARIANTS = 8  # distinct previews cycled through, so the encoder never sees the same frame twice in a row
STEP_SECONDS = 0.02  # a fast sampler step's duration; without it frames queue behind each other and we would
# measure the backlog, not the delivery of one frame
RUN_TIMEOUT_S = 60.0  # a run that stalls (a lost frame, a dead worker) fails instead of hanging
TARGET_P95_MS = 20.0  # the target
CLIENT_ID = "bench"
NODE_CLASS = "BenchPreviewSteps"


def preview_images(count: int, size: int) -> list[Image.Image]:
    """``count`` RGB images of ``size``×``size``: smooth colour fields with fine noise, like a preview mid-way
    through denoising, so that JPEG encoding does realistic work (neither flat nor pure noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for index in range(count):
        phase = 2 * math.pi * index / count
        fields = [np.sin(2 * math.pi * 3 * x + phase), np.sin(2 * math.pi * (2 * y + x) - phase),
                  np.cos(2 * math.pi * 4 * x * y + phase)]
        rgb = 127.5 + 100 * np.stack(fields, axis=-1) + rng.normal(0, 12, (size, size, 3))
        images.append(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB"))
    return images


def preview_node(calls: list[float], images: list[Image.Image]) -> type:
    """A node class that reports ``frames`` steps with a preview each, appending each call's instant to
    ``calls`` just before it calls :func:`progress`."""

    class BenchPreviewSteps:
        DESCRIPTION = "Reports progress with a preview image at every step, like a sampler."
        CATEGORY = "bench"
        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls) -> dict[str, dict]:
            return {"required": {"frames": ("INT", {"default": FRAMES, "min": 1, "max": MAX_FRAMES, "step": 1,
                                                    "tooltip": "How many steps, and so previews, to send."})}}

        @classmethod
        def IS_CHANGED(cls, frames: int) -> float:
            return float("nan")  # every run must execute: a cached result sends no previews

        def run(self, frames: int) -> tuple:
            for step in range(1, frames + 1):
                calls.append(time.perf_counter())
                progress(step, frames, images[step % len(images)])
                time.sleep(STEP_SECONDS)
            return ()

    return BenchPreviewSteps


def parse_preview(frame: bytes) -> tuple[dict, bytes]:
    """The metadata and JPEG bytes of a type-4 binary preview frame (``comfyui-protocol.md`` §2).

    Raises:
        ValueError: the frame is not a type-4 preview.
    """
    kind, header_length = struct.unpack(">II", frame[:8])
    if kind != BINARY_PREVIEW_WITH_METADATA:
        raise ValueError(f"binary frame type must be {BINARY_PREVIEW_WITH_METADATA} (preview with metadata); "
                         f"got {kind}")
    meta = json.loads(frame[8:8 + header_length])
    jpeg = frame[8 + header_length:]
    if meta.get("image_type") != "image/jpeg" or not jpeg.startswith(b"\xff\xd8"):
        raise ValueError(f"preview must be a JPEG; got image_type {meta.get('image_type')!r}, "
                         f"first bytes {jpeg[:4]!r}")
    return meta, jpeg


async def run_frames(session: aiohttp.ClientSession, socket: aiohttp.ClientWebSocketResponse, base: str,
                     calls: list[float], frames: int) -> tuple[list[float], list[int]]:
    """Queue one run of ``frames`` previews and wait for its end.

    Returns:
        Each frame's latency in ms (receive instant minus progress-call instant) and each JPEG's size in bytes.
    Raises:
        RuntimeError: the prompt was refused or failed, or frames went missing.
    """
    calls.clear()
    prompt = {"1": {"class_type": NODE_CLASS, "inputs": {"frames": frames}}}
    async with session.post(f"{base}/prompt", json={"prompt": prompt, "client_id": CLIENT_ID}) as response:
        if response.status != 200:
            raise RuntimeError(f"POST /prompt answered {response.status}: {await response.text()}")
        prompt_id = (await response.json())["prompt_id"]
    received, sizes = [], []
    async with asyncio.timeout(RUN_TIMEOUT_S):
        while True:
            message = await socket.receive()
            arrived = time.perf_counter()
            if message.type == aiohttp.WSMsgType.BINARY:
                meta, jpeg = parse_preview(message.data)
                if meta["prompt_id"] != prompt_id:
                    raise RuntimeError(f"preview of prompt {meta['prompt_id']} arrived during {prompt_id}")
                received.append(arrived)
                sizes.append(len(jpeg))
            elif message.type == aiohttp.WSMsgType.TEXT:
                event = json.loads(message.data)
                if event["type"] == "execution_error":
                    raise RuntimeError(f"bench prompt failed: {event['data'].get('exception_message')}")
                if event["type"] == "executing" and event["data"]["node"] is None \
                        and event["data"]["prompt_id"] == prompt_id:
                    break
            else:
                raise RuntimeError(f"websocket ended during the run: {message.type.name} {message.data!r}")
    if len(received) != frames or len(calls) != frames:
        raise RuntimeError(f"expected {frames} progress calls and frames; got {len(calls)} calls and "
                           f"{len(received)} frames")
    return [(arrive - call) * 1000 for call, arrive in zip(calls, received)], sizes


def percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p95 of ``latencies``."""
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49], cuts[94]


async def measure(warmups: int, repeats: int) -> tuple[list[tuple[float, float]], list[int], float]:
    """Per-run (p50, p95) in ms over ``repeats`` runs of :data:`FRAMES` frames after ``warmups`` short runs,
    every JPEG size, and the worst latency seen."""
    calls: list[float] = []
    classes = {NODE_CLASS: preview_node(calls, preview_images(IMAGE_VARIANTS, PREVIEW_SIZE))}
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as data:
        config = ServerConfig(folders=DataFolders.under(data), models_dir=data,
                              allowed_hosts=frozenset({"127.0.0.1", "localhost"}))
        runner = web.AppRunner(create_app(config, classes))
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            base = f"http://{host}:{port}"
            async with aiohttp.ClientSession() as session, \
                    session.ws_connect(f"{base}/ws?clientId={CLIENT_ID}") as socket:
                hello = await socket.receive_json()
                if hello["type"] != "status":
                    raise RuntimeError(f"the websocket's first message must be status; got {hello['type']!r}")
                await socket.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
                answer = await socket.receive_json()
                if answer["type"] != "feature_flags":
                    raise RuntimeError(f"feature_flags must be answered in kind; got {answer['type']!r}")
                for _ in range(warmups):
                    await run_frames(session, socket, base, calls, WARMUP_FRAMES)
                runs, sizes, worst = [], [], 0.0
                for _ in range(repeats):
                    latencies, run_sizes = await run_frames(session, socket, base, calls, FRAMES)
                    runs.append(percentiles(latencies))
                    sizes.extend(run_sizes)
                    worst = max(worst, max(latencies))
        finally:
            await runner.cleanup()
    return runs, sizes, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one warm-up and one run of 200 frames (well under 60 s)")
    quick = parser.parse_args().quick
    warmups, repeats = (1, 1) if quick else (3, 3)

    runs, sizes, worst = asyncio.run(measure(warmups, repeats))
    p50 = statistics.median(p50 for p50, _ in runs)
    p95 = statistics.median(p95 for _, p95 in runs)
    jpeg_kb = statistics.mean(sizes) / 1024
    verdict = "met" if p95 <= TARGET_P95_MS else "MISSED"
    print(f"progress call to websocket frame, {FRAMES} frames of {PREVIEW_SIZE}x{PREVIEW_SIZE} ({repeats} runs): "
          f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, worst {worst:.1f} ms, mean JPEG {jpeg_kb:.1f} KB; "
          f"target p95 <= {TARGET_P95_MS:.0f} ms {verdict}")
    print(f"BENCH previews frames={FRAMES} p50_ms={p50:.1f} p95_ms={p95:.1f} jpeg_kb={jpeg_kb:.1f} quick={int(quick)}")


if __name__ == "__main__":
    main()
