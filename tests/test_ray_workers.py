"""Prompts on Ray workers (``web/ray_workers.py``, issue 22 part 1), on a real Ray cluster on loopback with 2 CPUs
(``environment.md`` §11: usage stats off, token authentication on, every socket on 127.0.0.1).

The first test starts the real server with ``--ray auto --workers 2``. Then one cluster serves the rest of the module
(starting Ray costs seconds): the queue runs on two actors as the server's does, and one test kills an actor in the
middle of a prompt.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

from serving import EventLog, solid_prompt, tiled_prompt, wait_until_idle
from test_queue_store import RunningServer, slow_prompt
from web.executor import Executor
from web.folders import DataFolders
from web.limits import DEFAULT_LIMITS, bind_limits
from web.prompt_queue import PromptQueue
from web.ray_workers import import_ray, init_ray, start_workers
from web.registry import node_classes
from web.server_state import RaySettings

if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is not installed: pip install -r requirements-ray.txt", allow_module_level=True)
ray = import_ray()

WORKERS = 2


@pytest.fixture(scope="module")
def cluster():
    settings = RaySettings("auto", WORKERS)
    init_ray(settings)
    try:
        yield settings
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[DataFolders, str]:
    root = tmp_path_factory.mktemp("ray")
    return DataFolders.under(str(root / "data")), str(root / "models")


@pytest.fixture(scope="module")
def workers(cluster, folders):
    data, models = folders
    return start_workers(cluster, data, models, DEFAULT_LIMITS)


def run_all(queue: PromptQueue) -> None:
    wait_until_idle(queue, timeout=300)


def test_the_server_runs_prompts_on_ray_workers(tmp_path):
    """``python -m web serve --ray auto --workers 2``: prompts posted over HTTP run on two actors and their
    results arrive as without Ray. First in the module: with the module's cluster up, ``auto`` would join it."""
    data_dir, models_dir = tmp_path / "data", tmp_path / "models"
    models_dir.mkdir()
    server = RunningServer(data_dir, models_dir, tmp_path / "server.log", "--ray", "auto", "--workers", "2")
    try:
        ids = [server.post("/api/prompt", {"prompt": solid_prompt(f"srv{i}", color=i)})["prompt_id"]
               for i in range(6)]
        deadline = time.monotonic() + 300
        while server.get("/api/queue") != {"queue_running": [], "queue_pending": []}:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        history = server.get("/api/history")
    finally:
        server.stop()
    assert all(history[prompt_id]["status"]["status_str"] == "success" for prompt_id in ids)
    assert "2 Ray workers ready" in (tmp_path / "server.log").read_text()


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    found, frontier = {pid}, [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier and child not in found]
        found.update(children)
        frontier = children
    return found


def test_every_ray_socket_listens_on_loopback(workers):
    """The cluster this process started (GCS, raylet, agents, workers) listens on 127.0.0.1 only."""
    pids = descendants(os.getpid())
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    ours = [line for line in listening if any(f"pid={pid}," in line for pid in pids)]
    assert len(ours) >= 3, listening  # at least the GCS, the raylet and the actors
    addresses = [line.split()[3] for line in ours]
    assert all(address.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")) for address in addresses), ours


def test_two_ray_workers_run_twenty_prompts_and_every_output_arrives(workers, folders):
    events = EventLog()
    queue = PromptQueue(workers, events)
    queue.start()
    try:
        items = [queue.submit(solid_prompt(f"ray{i:02d}", width=256, color=i), ["2"], {}, None) for i in range(20)]
        run_all(queue)
    finally:
        queue.stop()
    history = queue.history()
    assert all(history[item.prompt_id]["status"]["status_str"] == "success" for item in items)
    executed = [data["prompt_id"] for event, data in events.received if event == "executed"]
    assert sorted(executed) == sorted(item.prompt_id for item in items)  # streamed from the workers as they ran
    output = folders[0].output
    for index, item in enumerate(items):
        (saved,) = history[item.prompt_id]["outputs"]["2"]["images"]
        with Image.open(os.path.join(output, saved["filename"])) as image:
            assert image.getpixel((0, 0)) == (0, 0, index)
    assert {event for event, _ in events.received} >= {"execution_start", "executing", "executed", "status"}


def spread_prompt(seed: int) -> dict:
    """Tiled Sample at 256² in 128-px tiles overlapping by 32 (nine 16×16 latent tiles, one per UNet call, with and
    without the prompt: CFG 2), 3 steps, then VAE Decode (Tiled) in 128-px tiles (three rows of three)."""
    return tiled_prompt(256, seed, steps=3, cfg=2.0, tile=128, decode_overlap=32, prefix=f"tiled{seed}")


def test_a_tiled_sample_spread_over_two_workers_equals_the_single_process_run(workers, folders):
    """The worker that runs the prompt hands a run of tile batches to its idle peer every step, and part of each
    row of the tiled decode; the picture is the one this process draws alone, bit for bit (the same float32 model,
    one torch thread in every process)."""
    queue = PromptQueue(workers, lambda *_: None)
    queue.start()
    try:
        def done_for_peers() -> collections.Counter:
            return sum((collections.Counter(counts) for counts in
                        ray.get([worker.actor.tile_statistics.remote() for worker in workers])), collections.Counter())

        before = done_for_peers()
        item = queue.submit(spread_prompt(11), ["9"], {}, None)
        run_all(queue)
        spread = done_for_peers() - before
    finally:
        queue.stop()
    entry = queue.history()[item.prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"][-1]
    (saved,) = entry["outputs"]["9"]["images"]
    assert spread["tile_batches"] > 0 and spread["decode_windows"] > 0, spread  # the idle peer took its share

    data, models = folders
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = Executor(bind_limits(node_classes(data, models), DEFAULT_LIMITS))
        checked = alone.validate(spread_prompt(11))
        result = alone.execute(checked.prompt, "alone", checked.outputs)
    finally:
        torch.set_num_threads(threads)
    (mine,) = result.outputs["9"]["images"]
    with Image.open(os.path.join(data.output, saved["filename"])) as spread_image, \
            Image.open(os.path.join(data.output, mine["filename"])) as alone_image:
        assert np.array_equal(np.asarray(spread_image), np.asarray(alone_image))


def test_killing_a_worker_mid_prompt_loses_no_prompt(workers):
    """ray.kill on the actor running a prompt: Ray restarts the actor, the queue runs the prompt again on the
    other worker, and every prompt ends (none lost, none stuck)."""
    queue = PromptQueue(workers, lambda *_: None)
    queue.start()
    try:
        items = [queue.submit(slow_prompt(index), ["2"], {}, None) for index in range(4)]
        deadline = time.monotonic() + 120
        while not queue.snapshot()[0]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        victim = queue.snapshot()[0][0]
        index = next(i for i, item in queue._running.items() if item is victim)
        ray.kill(workers[index].actor, no_restart=False)
        run_all(queue)
    finally:
        queue.stop()
    history = queue.history()
    assert sorted(history) == sorted(item.prompt_id for item in items)
    failed = {key: entry["status"]["messages"][-1] for key, entry in history.items()
              if entry["status"]["status_str"] != "success"}
    assert failed == {}, [message[1]["exception_message"] for message in failed.values()]
    assert victim.lost_on == [index]

