"""Executor overhead on a 200-node graph of cheap nodes: cold, fully cached, and after one widget change; and,
with ``--against-comfyui``, POST /prompt → done through the server, ours against ComfyUI's.

In-process, the graph is 20 independent chains of 10 nodes: a source, 8 adders and an output node. Each figure is
the median over repeated runs of validation plus execution, divided by the 200 nodes.

Against ComfyUI, both servers run as their own processes on loopback (ours ``python -m web serve``, ComfyUI's
``main.py`` from the venv that ``tests/comfyui_host.py`` builds), and the graph is made of core nodes both have: 20
chains of EmptyImage (8×8), 8 ImageInvert and PreviewImage. Each round queues it on both servers, alternately,
with new colours so that nothing is cached (a cold run of all 200 nodes), and times POST → the websocket's
``executing`` null for that prompt. Needs ``ATELIER_COMFYUI`` (a ComfyUI v0.3.64 tree; ``.ci/run`` sets it).

    python bench/executor.py [--quick] [--against-comfyui]

Ends with ``BENCH executor nodes=200 cold_per_node_us=... cached_per_node_us=... rerun_one_change_executed=...``,
and with ``--against-comfyui`` also ``BENCH executor_server nodes=200 ours_ms=... comfyui_ms=... ratio_median=...
ratio_max=...`` (ours ÷ ComfyUI's; below 1 is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # comfyui_host: ComfyUI's venv and server

from web.executor import Executor  # noqa: E402

CHAINS, CHAIN_LENGTH = 20, 10
LIMIT = 1 << 30


class BenchSource:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": LIMIT, "step": 1})}}

    def run(self, value):
        return (value,)


class BenchAdd:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"forceInput": True}),
                             "b": ("INT", {"default": 1, "min": 0, "max": LIMIT, "step": 1})}}

    def run(self, a, b):
        return (a + b,)


class BenchOutput:
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True})}}

    def run(self, value):
        return {"ui": {"text": [str(value)]}}


CLASSES = {cls.__name__: cls for cls in (BenchSource, BenchAdd, BenchOutput)}


def build_graph(head_value: int = 0) -> dict:
    """20 chains of 10 nodes; ``head_value`` is the widget at the head of chain 0."""
    prompt = {}
    for chain in range(CHAINS):
        ids = [f"{chain}_{i}" for i in range(CHAIN_LENGTH)]
        prompt[ids[0]] = {"class_type": "BenchSource", "inputs": {"value": head_value if chain == 0 else chain}}
        for previous, node_id in zip(ids[:-2], ids[1:-1]):
            prompt[node_id] = {"class_type": "BenchAdd", "inputs": {"a": [previous, 0], "b": 1}}
        prompt[ids[-1]] = {"class_type": "BenchOutput", "inputs": {"value": [ids[-2], 0]}}
    return prompt


def run_once(executor: Executor, prompt: dict) -> tuple[float, list[str]]:
    start = time.perf_counter()
    checked = executor.validate(prompt)
    result = executor.execute(checked.prompt, "bench", checked.outputs)
    elapsed = time.perf_counter() - start
    if result.status != "success":
        raise RuntimeError(f"benchmark graph failed: {result.messages[-1]}")
    return elapsed, result.executed


def core_graph(round_: int) -> dict:
    """20 chains of EmptyImage → 8 ImageInvert → PreviewImage; ``round_`` picks colours no other round used."""
    prompt = {}
    for chain in range(CHAINS):
        ids = [f"{chain}_{i}" for i in range(CHAIN_LENGTH)]
        prompt[ids[0]] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                  "color": round_ * CHAINS + chain}}
        for previous, node_id in zip(ids[:-2], ids[1:-1]):
            prompt[node_id] = {"class_type": "ImageInvert", "inputs": {"image": [previous, 0]}}
        prompt[ids[-1]] = {"class_type": "PreviewImage", "inputs": {"images": [ids[-2], 0]}}
    return prompt


async def post_to_done(session: aiohttp.ClientSession, url: str, socket_: aiohttp.ClientWebSocketResponse,
                       client_id: str, prompt: dict) -> float:
    """Seconds from POST /prompt to the websocket's ``executing`` null for that prompt."""
    start = time.perf_counter()
    async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{url} refused the benchmark graph: {answer}")
    async for message in socket_:
        if message.type != aiohttp.WSMsgType.TEXT:
            continue
        event = message.json()
        if event["type"] == "execution_error":
            raise RuntimeError(f"{url} failed the benchmark graph: {event['data']}")
        if (event["type"] == "executing" and event["data"].get("node") is None
                and event["data"].get("prompt_id") == answer["prompt_id"]):
            return time.perf_counter() - start
    raise RuntimeError(f"{url} closed the websocket before the prompt finished")


async def compare_rounds(ours: str, comfyui: str, rounds: int) -> tuple[list[float], list[float]]:
    """POST → done on both servers, alternately, ``rounds`` times after one warm-up round each."""
    times: dict[str, list[float]] = {ours: [], comfyui: []}
    async with aiohttp.ClientSession() as session:
        sockets = {}
        for url in times:
            client_id = uuid.uuid4().hex
            sockets[url] = (client_id, await session.ws_connect(f"{url}/ws?clientId={client_id}", max_msg_size=0))
        for round_ in range(rounds + 1):
            order = (ours, comfyui) if round_ % 2 else (comfyui, ours)
            for url in order:
                client_id, socket_ = sockets[url]
                elapsed = await post_to_done(session, url, socket_, client_id, core_graph(round_))
                if round_:  # round 0 warms both up: imports, first files written
                    times[url].append(elapsed)
        for _, socket_ in sockets.values():
            await socket_.close()
    return times[ours], times[comfyui]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def atelier_server(data_dir: str):
    """``python -m web serve`` on a free loopback port; yields its URL once it answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "web", "serve", "--port", str(port), "--data-dir", data_dir],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"our server did not start (exit code {process.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def against_comfyui(rounds: int) -> None:
    from comfyui_host import COMFYUI_PATH_VARIABLE, ComfyUIServer, comfyui_source, prepare_environment

    source = comfyui_source()
    if source is None:
        raise SystemExit(f"--against-comfyui needs {COMFYUI_PATH_VARIABLE}: the path of ComfyUI v0.3.64's source")
    environment = prepare_environment(source)
    nodes = CHAINS * CHAIN_LENGTH
    with tempfile.TemporaryDirectory(prefix="bench_executor_") as scratch:
        os.makedirs(os.path.join(scratch, "models"))
        with ComfyUIServer(environment, os.path.join(scratch, "comfyui"), os.path.join(scratch, "models")) as comfy, \
                atelier_server(os.path.join(scratch, "atelier")) as ours_url:
            ours, comfyui = asyncio.run(compare_rounds(ours_url, comfy.url, rounds))
    ratios = [mine / theirs for mine, theirs in zip(ours, comfyui)]
    ours_ms, comfyui_ms = statistics.median(ours) * 1e3, statistics.median(comfyui) * 1e3
    print(f"POST -> done, {nodes} core nodes, cold, {rounds} rounds: ours {ours_ms:.1f} ms, "
          f"ComfyUI {comfyui_ms:.1f} ms (medians); ratio per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"ours per round (ms): {', '.join(f'{t * 1e3:.0f}' for t in ours)}; "
          f"ComfyUI's: {', '.join(f'{t * 1e3:.0f}' for t in comfyui)}")
    print(f"BENCH executor_server nodes={nodes} ours_ms={ours_ms:.1f} comfyui_ms={comfyui_ms:.1f} "
          f"ratio_median={statistics.median(ratios):.2f} ratio_max={max(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (well under 60 s)")
    parser.add_argument("--against-comfyui", action="store_true",
                        help="also time POST -> done through our server and ComfyUI's (needs ATELIER_COMFYUI)")
    args = parser.parse_args()
    repeats = 5 if args.quick else 30
    nodes = CHAINS * CHAIN_LENGTH

    cold, cached, rerun_executed = [], [], set()
    for repeat in range(repeats):
        executor = Executor(CLASSES)
        elapsed, executed = run_once(executor, build_graph())
        if len(executed) != nodes:
            raise RuntimeError(f"cold run executed {len(executed)} of {nodes} nodes")
        cold.append(elapsed)
        elapsed, executed = run_once(executor, build_graph())
        if executed:
            raise RuntimeError(f"fully cached run executed {executed}")
        cached.append(elapsed)
        _, executed = run_once(executor, build_graph(head_value=1000 + repeat))
        rerun_executed.add(len(executed))

    if len(rerun_executed) != 1:
        raise RuntimeError(f"re-runs after one change executed differing node counts: {sorted(rerun_executed)}")
    rerun_count = next(iter(rerun_executed))
    cold_us = statistics.median(cold) / nodes * 1e6
    cached_us = statistics.median(cached) / nodes * 1e6
    print(f"cold: {cold_us:.1f} us/node, cached: {cached_us:.1f} us/node, "
          f"rerun after one change executed {rerun_count} nodes ({repeats} repeats)")
    print(f"BENCH executor nodes={nodes} cold_per_node_us={cold_us:.1f} cached_per_node_us={cached_us:.1f} "
          f"rerun_one_change_executed={rerun_count}")
    if args.against_comfyui:
        against_comfyui(repeats)


if __name__ == "__main__":
    main()
