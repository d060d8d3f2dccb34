"""The queue and history on disk (``web/queue_store.py``, issue 22 part 3): a queue opened on the file of a queue
that stopped without warning runs what that one had pending or running, once, and keeps its history.

The unit tests run the real :class:`PromptQueue` and executor on a real SQLite file; "a server killed" is a queue
whose worker never ran, or that stops writing mid-prompt, whose file a second queue then opens. The last test
kills a real server with SIGKILL during the 10th of 30 prompts and starts it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from PIL import Image

from comfyui_host import free_port
from serving import solid_prompt, wait_until_idle
from web.executor import Executor
from web.folders import DataFolders
from web.prompt_queue import PromptQueue
from web.queue_store import QueueStore
from web.registry import node_classes
from web.workers import LocalWorker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Gate:
    """An output node that waits until the test opens the gate: a prompt that is running for as long as needed."""

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    entered = threading.Event()
    release = threading.Event()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("INT", {"default": 0, "min": 0, "max": 100, "step": 1})}}

    def run(self, tag):
        Gate.entered.set()
        Gate.release.wait(timeout=30)
        return {"ui": {"text": [f"gate {tag}"]}}


def gate_prompt(tag: int) -> dict:
    return {"1": {"class_type": "Gate", "inputs": {"tag": tag}}}


def make_queue(tmp_path, store: QueueStore, **options) -> PromptQueue:
    folders = DataFolders.under(str(tmp_path / "data"))
    executor = Executor({**node_classes(folders, str(tmp_path / "models")), "Gate": Gate})
    return PromptQueue([LocalWorker(executor)], lambda event, data, client: None, store=store, **options)


def finish(queue: PromptQueue, timeout: float = 30) -> None:
    """Run the queue's worker until nothing is pending or running, then stop it."""
    queue.start()
    try:
        wait_until_idle(queue, timeout)
    finally:
        queue.stop()


@pytest.fixture(autouse=True)
def open_gate():
    Gate.entered.clear()
    Gate.release.set()
    yield
    Gate.release.set()


def test_pending_prompts_and_history_survive_and_run_once_in_order(tmp_path):
    path = str(tmp_path / "queue.sqlite3")
    first = make_queue(tmp_path, QueueStore(path))
    done = first.submit(solid_prompt("done"), ["2"], {}, "client-a")
    finish(first)
    later = [first.submit(solid_prompt(f"p{i}", color=i), ["2"], {"n": i}, "client-a") for i in range(3)]
    urgent = first.submit(solid_prompt("urgent"), ["2"], {}, None, front=True)
    first.delete([later[1].prompt_id])  # deleted before the crash: it must not come back

    second = make_queue(tmp_path, QueueStore(path))  # the first never ran these: as if it were killed
    running, pending = second.snapshot()
    assert running == []
    assert [item.prompt_id for item in pending] == [urgent.prompt_id, later[0].prompt_id, later[2].prompt_id]
    assert pending[1].extra_data == {"n": 0} and pending[1].client_id == "client-a"
    assert list(second.history()) == [done.prompt_id]
    assert second.history()[done.prompt_id]["status"]["status_str"] == "success"

    fresh = second.submit(solid_prompt("fresh"), ["2"], {}, None)
    assert fresh.number > max(abs(item.number) for item in pending)  # numbered after every stored prompt
    finish(second)
    assert list(second.history()) == [done.prompt_id, urgent.prompt_id, later[0].prompt_id, later[2].prompt_id,
                                      fresh.prompt_id]

    third = make_queue(tmp_path, QueueStore(path))
    assert third.snapshot() == ([], [])
    assert list(third.history()) == list(second.history())
    assert third.history() == second.history()  # the entries themselves, outputs and messages included


def test_a_prompt_running_when_the_server_died_runs_again_marked_as_restarted(tmp_path):
    path = str(tmp_path / "queue.sqlite3")
    Gate.release.clear()
    first = make_queue(tmp_path, QueueStore(path))
    stuck = first.submit(gate_prompt(1), ["1"], {}, None)
    waiting = first.submit(gate_prompt(2), ["1"], {}, None)
    first.start()
    assert Gate.entered.wait(timeout=30)
    assert first.snapshot()[0][0].prompt_id == stuck.prompt_id

    second = make_queue(tmp_path, QueueStore(path))  # opened while the first is still inside the prompt
    running, pending = second.snapshot()
    assert running == [] and [item.prompt_id for item in pending] == [stuck.prompt_id, waiting.prompt_id]
    assert [item.restarts for item in pending] == [1, 0]
    first.store = None  # the killed server writes nothing more
    Gate.release.set()
    first.stop()
    finish(second)
    history = second.history()
    assert [event for event, _ in history[stuck.prompt_id]["status"]["messages"]][:2] == ["execution_restarted",
                                                                                         "execution_start"]
    assert history[stuck.prompt_id]["status"]["messages"][0][1]["restarts"] == 1
    assert "execution_restarted" not in [event for event, _ in history[waiting.prompt_id]["status"]["messages"]]


def test_history_deletions_and_its_bound_reach_the_file(tmp_path):
    path = str(tmp_path / "queue.sqlite3")
    queue = make_queue(tmp_path, QueueStore(path), history_limit=2)
    items = [queue.submit(solid_prompt(f"h{i}", color=i), ["2"], {}, None) for i in range(4)]
    finish(queue)
    assert list(queue.history()) == [items[2].prompt_id, items[3].prompt_id]  # the bound dropped the oldest two
    assert list(make_queue(tmp_path, QueueStore(path)).history()) == [items[2].prompt_id, items[3].prompt_id]
    queue.delete_history([items[2].prompt_id])
    assert list(make_queue(tmp_path, QueueStore(path)).history()) == [items[3].prompt_id]
    queue.clear_history()
    queue.submit(solid_prompt("gone"), ["2"], {}, None)
    queue.clear()
    reopened = make_queue(tmp_path, QueueStore(path))
    assert reopened.history() == {} and reopened.snapshot() == ([], [])


def test_a_file_that_is_not_a_queue_store_is_refused(tmp_path):
    path = tmp_path / "queue.sqlite3"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(Exception, match="not a database"):
        QueueStore(str(path))


# --- a real server, killed -------------------------------------------------------------------------------------

PROMPTS = 30
KILLED_DURING = 10  # the 10th prompt (1-based)
# A 2048×1024 synthetic panorama saved as PNG takes a few hundred ms: long enough to be caught running.
ERP_HEIGHT = 1024


def slow_prompt(index: int) -> dict:
    """A synthetic panorama of its own frequency (so no prompt reuses another's result), saved as one PNG."""
    return {"1": {"class_type": "AtelierSyntheticPanorama", "inputs": {"erp_height": ERP_HEIGHT,
                                                                       "frequency": 4.0 + 0.5 * index}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"crash{index:02d}"}}}


class RunningServer:
    """``python -m web serve`` in a subprocess on a free loopback port, with ``options`` added."""

    def __init__(self, data_dir, models_dir, log_path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "web", "serve", "--port", str(self.port), "--listen", "127.0.0.1",
                 "--data-dir", str(data_dir), "--models-dir", str(models_dir), "--verbose", *options],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                self.get("/api/queue")
                return
            except OSError:
                assert self.process.poll() is None, self.log_path.read_text()[-3000:]
                time.sleep(0.2)
        raise AssertionError(f"the server did not start:\n{self.log_path.read_text()[-3000:]}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def test_a_server_killed_during_the_10th_of_30_prompts_finishes_all_30_once_after_a_restart(tmp_path):
    data_dir, models_dir = tmp_path / "data", tmp_path / "models"
    models_dir.mkdir()
    log_path = tmp_path / "server.log"
    server = RunningServer(data_dir, models_dir, log_path)
    try:
        ids = [server.post("/api/prompt", {"prompt": slow_prompt(i)})["prompt_id"] for i in range(PROMPTS)]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            running = server.get("/api/queue")["queue_running"]
            if running and running[0][1] == ids[KILLED_DURING - 1]:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the 10th prompt was never seen running")
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
    finally:
        server.stop()
    # The 9th was on disk as finished before the 10th started.
    assert len(server_history_on_disk(data_dir)) == KILLED_DURING - 1

    restarted = RunningServer(data_dir, models_dir, log_path)
    try:
        deadline = time.monotonic() + 600
        while restarted.get("/api/queue") != {"queue_running": [], "queue_pending": []}:
            assert time.monotonic() < deadline, "the restarted server did not finish the queue"
            time.sleep(0.2)
        history = restarted.get("/api/history")
    finally:
        restarted.stop()
    assert sorted(history) == sorted(ids)  # every prompt once: none lost, none twice
    assert all(history[prompt_id]["status"]["status_str"] == "success" for prompt_id in ids)
    killed = history[ids[KILLED_DURING - 1]]["status"]["messages"]
    assert killed[0][0] == "execution_restarted"
    for index, prompt_id in enumerate(ids):
        (saved,) = history[prompt_id]["outputs"]["2"]["images"]
        assert saved["filename"].startswith(f"crash{index:02d}")
    pngs = [name for name in os.listdir(data_dir / "output") if name.endswith(".png")]
    for name in pngs:  # every PNG in the folder opens, whole
        with Image.open(data_dir / "output" / name) as image:
            image.load()
    per_prompt = [sum(name.startswith(f"crash{index:02d}") for name in pngs) for index in range(PROMPTS)]
    # One file each; the killed prompt may have saved its picture before it died, and saved it again.
    assert per_prompt[:KILLED_DURING - 1] + per_prompt[KILLED_DURING:] == [1] * (PROMPTS - 1)
    assert per_prompt[KILLED_DURING - 1] in (1, 2)


def server_history_on_disk(data_dir) -> list[str]:
    """The prompts the killed server's file holds as finished (read only: opening it as a store would count the
    running prompt's restart)."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'queue.sqlite3'}?mode=ro", uri=True)) as db:
        return [prompt_id for (prompt_id,) in db.execute("SELECT prompt_id FROM prompts WHERE state = 'done'")]


def test_commits_never_checkpoint_and_a_background_thread_does(tmp_path):
    # SQLite's own checkpoint runs inside the commit that crosses 1000 WAL pages and stalls that prompt; the store
    # turns it off and checkpoints from its own thread, so the WAL's pages reach the database file without any
    # call from here.
    path = str(tmp_path / "queue.sqlite3")
    store = QueueStore(path)
    try:
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        before = os.path.getsize(path)
        for index in range(40):
            store.update({"prompt_id": f"p{index}", "padding": "x" * 20_000}, "pending")
        deadline = time.monotonic() + 10
        while os.path.getsize(path) < before + 40 * 20_000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.path.getsize(path) >= before + 40 * 20_000
    finally:
        store.close()
    assert not store._checkpointer.is_alive()
