"""Several workers behind one queue (``web/prompt_queue.py``, ``web/workers.py``; issue 22): prompts spread over the
idle workers, a prompt goes to the idle worker that holds its models, and a prompt whose worker dies runs once more
on another worker, then fails with the cause. The workers here are in-process executors; ``test_ray_workers.py``
runs the same queue on Ray actors."""

from __future__ import annotations

import pytest

from serving import EventLog, solid_prompt, wait_until_idle
from web.executor import Executor
from web.folders import DataFolders
from web.prompt_queue import PromptQueue
from web.registry import node_classes
from web.workers import LocalWorker, WorkerLost, model_files


class Recording(LocalWorker):
    """An in-process worker that records the prompts it ran, and can be told to die inside the next ones."""

    def __init__(self, executor: Executor, name: str):
        super().__init__(executor)
        self.name = name
        self.ran: list[str] = []
        self.deaths = 0

    def execute(self, prompt, prompt_id, outputs, listener, extra_data):
        if self.deaths:
            self.deaths -= 1
            raise WorkerLost(f"{self.name} was killed")
        self.ran.append(prompt_id)
        return super().execute(prompt, prompt_id, outputs, listener, extra_data)


def workers(tmp_path, count: int) -> list[Recording]:
    folders = DataFolders.under(str(tmp_path / "data"))
    return [Recording(Executor(node_classes(folders, str(tmp_path / "models"))), f"w{index}")
            for index in range(count)]


def run_all(queue: PromptQueue) -> None:
    wait_until_idle(queue, timeout=60)


@pytest.fixture
def events() -> EventLog:
    return EventLog()


def test_two_workers_share_the_queue_and_every_prompt_runs_once(tmp_path, events):
    pool = workers(tmp_path, 2)
    queue = PromptQueue(pool, events)
    queue.start()
    try:
        items = [queue.submit(solid_prompt(f"p{i}", width=512, color=i), ["2"], {}, None) for i in range(20)]
        run_all(queue)
    finally:
        queue.stop()
    ran = pool[0].ran + pool[1].ran
    assert sorted(ran) == sorted(item.prompt_id for item in items)  # each once, none lost
    assert pool[0].ran and pool[1].ran  # both took part
    history = queue.history()
    assert all(history[item.prompt_id]["status"]["status_str"] == "success" for item in items)
    finished = [data["prompt_id"] for event, data in events.received if event == "executing" and data["node"] is None]
    assert sorted(finished) == sorted(item.prompt_id for item in items)


def taken(queue: PromptQueue, worker: int) -> str | None:
    """Which pending prompt idle ``worker`` would take now (the queue's rule, without running anything)."""
    entry = queue._choice_of(worker)
    return None if entry is None else entry[2].prompt_id


def test_an_idle_worker_that_holds_the_prompts_models_takes_it():
    queue = PromptQueue([LocalWorker(None), LocalWorker(None)], lambda *_: None)
    prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}}}
    item = queue.submit(prompt, ["4"], {}, None)
    assert taken(queue, 0) == item.prompt_id  # nobody holds it: the first idle worker
    queue._held[1] = model_files(prompt)
    assert taken(queue, 0) is None and taken(queue, 1) == item.prompt_id
    queue._running[1] = object()  # worker 1 busy: the idle one takes it rather than wait
    assert taken(queue, 0) == item.prompt_id


def test_a_prompt_whose_worker_died_waits_for_another_worker_and_the_idle_one_takes_the_next():
    queue = PromptQueue([LocalWorker(None), LocalWorker(None)], lambda *_: None)
    lost = queue.submit(solid_prompt("lost"), ["2"], {}, None)
    later = queue.submit(solid_prompt("later"), ["2"], {}, None)
    lost.lost_on.append(0)
    queue._running[1] = object()  # the worker that did not lose it is busy
    assert taken(queue, 0) == later.prompt_id
    del queue._running[1]
    assert taken(queue, 1) == lost.prompt_id and taken(queue, 0) == later.prompt_id
    lost.lost_on.append(1)  # lost on every worker: any idle one may try (and the queue stops at two losses)
    assert taken(queue, 0) == lost.prompt_id


def test_a_prompt_whose_worker_dies_runs_again_on_the_other_worker(tmp_path, events):
    pool = workers(tmp_path, 2)
    pool[0].deaths = 1
    queue = PromptQueue(pool, events)
    queue.start()
    try:
        item = queue.submit(solid_prompt("survivor"), ["2"], {}, None)
        run_all(queue)
    finally:
        queue.stop()
    assert pool[0].ran == [] and pool[1].ran == [item.prompt_id]
    assert queue.history()[item.prompt_id]["status"]["status_str"] == "success"


def test_a_prompt_whose_workers_die_twice_fails_with_the_cause_and_the_queue_goes_on(tmp_path, events):
    pool = workers(tmp_path, 2)
    pool[0].deaths = pool[1].deaths = 1
    queue = PromptQueue(pool, events)
    queue.start()
    try:
        doomed = queue.submit(solid_prompt("doomed"), ["2"], {}, "client")
        run_all(queue)
        after = queue.submit(solid_prompt("after"), ["2"], {}, None)
        run_all(queue)
    finally:
        queue.stop()
    status = queue.history()[doomed.prompt_id]["status"]
    assert status["status_str"] == "error"
    (error,) = [data for event, data in status["messages"] if event == "execution_error"]
    assert error["exception_type"] == "WorkerLost"
    assert "died 2 times (w0, w1)" in error["exception_message"] and "was killed" in error["exception_message"]
    assert ("execution_error", error) in events.received  # the client hears it as a node's error
    assert queue.history()[after.prompt_id]["status"]["status_str"] == "success"
