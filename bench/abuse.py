"""Issue 19's abuse inputs against the standalone server, before and after the hardening: status, peak RSS, time.

Each case runs in a fresh process on an in-process server (aiohttp's test server, loopback only), with the code
of one source tree on its path, so the same script measures an older checkout too:

    python bench/abuse.py [--before /path/to/old/checkout] [--cases apng30 empty16k ...] [--cap-gb 6]

Peak RSS is the process's resident set, sampled every 2 ms, shown with its baseline after the imports; time is
the case's own, after the imports. A case whose RSS passes ``--cap-gb`` is stopped there (reported as
``capped``), so no run can take the machine. The client runs in the same process, so its copies of large
bodies count too. ``--quick`` runs the cheap cases only (under a
minute on 2 cores). Ends with ``BENCH abuse <case>_<tree>_peak_mb=... <case>_<tree>_s=... ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CASES = ("apng30", "apng4", "empty16k", "extra_data", "slow_client", "nan_history", "uploads")
QUICK_CASES = ("extra_data", "slow_client", "nan_history", "uploads")
FILES = os.path.join(tempfile.gettempdir(), "atelier_abuse_inputs")  # the big inputs are made once and kept


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def watch_memory(cap_bytes: int, peak: list[int]) -> None:
    """Keep ``peak[0]`` at the highest RSS seen; stop the process at ``cap_bytes``."""
    def sample():
        while True:
            rss = resident_bytes()
            peak[0] = max(peak[0], rss)
            if rss > cap_bytes:
                print(json.dumps({"status": f"capped at {cap_bytes >> 20} MB", "peak_mb": rss >> 20,
                                  "seconds": round(time.perf_counter() - STARTED[0], 1)}), flush=True)
                os._exit(3)
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()


STARTED = [0.0]


def animated_png(path: str, frames: int, size: int) -> None:
    """An animated PNG of solid-colour frames: tiny on disk, ``frames × size²`` pixels decoded."""
    from PIL import Image
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images = [Image.new("RGB", (size, size), (index * 40 % 256, 90, 200)) for index in range(frames)]
    images[0].save(path + ".part", save_all=True, append_images=images[1:], format="PNG")
    os.replace(path + ".part", path)


async def run_case(case: str) -> dict:
    """One case on a fresh server; returns what the client saw."""
    from aiohttp.test_utils import TestClient, TestServer
    from web.folders import DataFolders
    from web.server import create_app
    from web.server_state import ServerConfig

    with tempfile.TemporaryDirectory() as root:
        config = ServerConfig(folders=DataFolders.under(os.path.join(root, "data")),
                              models_dir=os.path.join(root, "models"),
                              allowed_hosts=frozenset({"127.0.0.1", "localhost"}))
        from web.registry import node_classes
        classes = {**node_classes(config.folders, config.models_dir), "NoisyPreviews": NoisyPreviews}
        client = TestClient(TestServer(create_app(config, classes), host="127.0.0.1"))
        await client.start_server()
        try:
            return await CASE_FUNCTIONS[case](client, config)
        finally:
            try:
                await client.close()
            except Exception as error:  # an older checkout's shutdown may fail; the case's result stands
                print(f"shutdown failed: {error!r}", file=sys.stderr)


async def finished(client, prompt_id: str, timeout: float = 600) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            history = await (await client.get(f"/api/history/{prompt_id}")).json()
            if prompt_id in history:
                return history[prompt_id]
            await asyncio.sleep(0.1)


async def run_prompt(client, prompt: dict, **extra) -> dict:
    response = await client.post("/api/prompt", json={"prompt": prompt, **extra})
    if response.status != 200:
        return {"status": f"http {response.status}"}
    entry = await finished(client, (await response.json())["prompt_id"])
    errors = [data.get("exception_message", "") for event, data in entry["status"]["messages"]
              if event == "execution_error"]
    return {"status": entry["status"]["status_str"] + (f": {errors[0][:90]}" if errors else "")}


async def load_frames(client, config, name: str, frames: int, size: int) -> dict:
    source = os.path.join(FILES, name)
    animated_png(source, frames, size)
    shutil.copyfile(source, os.path.join(config.folders.input, name))  # a link out of the folder is refused
    return await run_prompt(client, {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                                     "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})


async def case_apng30(client, config) -> dict:
    return await load_frames(client, config, "frames_30x4000.png", 30, 4000)


async def case_apng4(client, config) -> dict:
    return await load_frames(client, config, "frames_4x8000.png", 4, 8000)


async def case_empty16k(client, config) -> dict:
    return await run_prompt(client, {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16384, "height": 16384, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}}})


async def case_extra_data(client, config) -> dict:
    padding = "x" * (10 << 20)
    for index in range(20):
        result = await run_prompt(client, {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": index}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}, extra_data={"padding": padding})
    history = await (await client.get("/api/history")).json()
    return {"status": f"{result['status']}; {len(history)} history entries kept"}


class NoisyPreviews:
    """Sends ``steps`` previews of noise (about 100 KB of JPEG each), as a sampler on a large image would."""

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "bench"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 100, "min": 1, "max": 10_000, "step": 1})}}

    def run(self, steps):
        import numpy as np
        from PIL import Image
        from nodes.common.progress import progress
        noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        for step in range(1, steps + 1):
            progress(step, steps, Image.fromarray(noise))
        return {"ui": {"text": [f"{steps} previews"]}}


async def case_slow_client(client, config) -> dict:
    """A websocket client that queues a prompt with 300 noise previews and never reads (a raw socket with a small
    receive buffer); then another client queues 5 small prompts. Its time is what the slow client costs it."""
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", client.port))
    slow.sendall(b"GET /ws?clientId=slow HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    await asyncio.sleep(0.5)
    await client.post("/api/prompt", json={"client_id": "slow", "prompt": {
        "1": {"class_type": "NoisyPreviews", "inputs": {"steps": 300}}}})
    reader = await client.ws_connect("/ws?clientId=reader")
    await reader.receive_json()
    started = time.perf_counter()
    status = "ok"
    try:
        async with asyncio.timeout(120):
            for index in range(5):
                response = await client.post("/api/prompt", json={"client_id": "reader", "prompt": {
                    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                                 "color": index}},
                    "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}})
                prompt_id = (await response.json())["prompt_id"]
                while True:
                    message = await reader.receive()
                    if message.type.name != "TEXT":
                        continue
                    data = json.loads(message.data)
                    if data["type"] == "executing" and data["data"]["node"] is None \
                            and data["data"]["prompt_id"] == prompt_id:
                        break
    except TimeoutError:
        status = "reader stalled past 120 s"
    slow.close()
    return {"status": f"{status}; reader's 5 prompts took {time.perf_counter() - started:.1f} s"}


async def case_nan_history(client, config) -> dict:
    body = json.dumps({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}}).replace("}}}", '}}}, "number": NaN', 1)
    response = await client.post("/api/prompt", data=body, headers={"Content-Type": "application/json"})
    await asyncio.sleep(1)
    text = await (await client.get("/api/history")).text()
    try:
        json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
        readable = "readable"
    except ValueError:
        readable = "unreadable by browsers"
    return {"status": f"POST {response.status}, /history {readable}"}


async def case_uploads(client, config) -> dict:
    from aiohttp import FormData
    from PIL import Image

    def form(index):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (index, 0, 0)).save(buffer, format="PNG")
        data = FormData()
        data.add_field("image", buffer.getvalue(), filename="same.png", content_type="image/png")
        return data, buffer.getvalue()

    forms = [form(index) for index in range(20)]
    replies = await asyncio.gather(*(client.post("/api/upload/image", data=data) for data, _ in forms))
    names = [(await reply.json())["name"] for reply in replies]
    own = sum(open(os.path.join(config.folders.input, name), "rb").read() == data
              for name, (_, data) in zip(names, forms))
    kept = len([name for name in os.listdir(config.folders.input) if not name.startswith(".")])
    return {"status": f"{kept} files kept, {own} of 20 replies name their own bytes"}


CASE_FUNCTIONS = {name: globals()[f"case_{name}"] for name in CASES}


def child(case: str, cap_bytes: int) -> None:
    importlib.import_module("web.server")  # imports (torch, the node pack) before the clock and the baseline
    if case.startswith("apng"):
        animated_png(*{"apng30": (os.path.join(FILES, "frames_30x4000.png"), 30, 4000),
                       "apng4": (os.path.join(FILES, "frames_4x8000.png"), 4, 8000)}[case])
    peak = [resident_bytes()]
    baseline = peak[0]
    watch_memory(cap_bytes, peak)
    STARTED[0] = time.perf_counter()
    result = asyncio.run(run_case(case))
    print(json.dumps({**result, "peak_mb": max(peak[0], resident_bytes()) >> 20, "baseline_mb": baseline >> 20,
                      "seconds": round(time.perf_counter() - STARTED[0], 1)}), flush=True)


def measure(tree: str, case: str, cap_gb: float) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, "--cap-gb", str(cap_gb)],
                          cwd=tree, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"status": f"crashed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}",
                "peak_mb": 0, "seconds": 0}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="an older checkout to measure beside this one")
    parser.add_argument("--cases", nargs="+", choices=CASES)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cap-gb", type=float, default=6.0)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, int(args.cap_gb * (1 << 30)))
        return
    cases = args.cases or (QUICK_CASES if args.quick else CASES)
    trees = [("before", args.before)] if args.before else []
    trees.append(("after", ROOT))
    keys = []
    print("| input | tree | status | peak RSS MB | time s |\n| --- | --- | --- | --- | --- |")
    for case in cases:
        for label, tree in trees:
            result = measure(tree, case, args.cap_gb)
            print(f"| {case} | {label} | {result['status']} | {result['peak_mb']} (from {result.get('baseline_mb')})"
                  f" | {result['seconds']} |", flush=True)
            keys.append(f"{case}_{label}_peak_mb={result['peak_mb']} {case}_{label}_s={result['seconds']}")
    print(f"BENCH abuse {' '.join(keys)} quick={int(args.quick)}")


if __name__ == "__main__":
    main()
