"""The prompt queue, its worker thread and the history (``comfyui-protocol.md`` §5.1).

Each worker (``web/workers.py``: one in this process, or one Ray actor each with ``--ray``) has a thread that takes
the next prompt in priority order, preferring, among idle workers, one that already holds the prompt's models.
Every change to the queue and every execution event goes out through one ``send(event, data, client_id)``
callback, which the server turns into websocket messages; it is called from the worker threads and from request
handlers alike, so it must be thread-safe. A prompt whose worker dies runs once more on another worker, then is
reported as an ``execution_error`` that names the cause.

With a :class:`~web.queue_store.QueueStore` every change is on disk before it is announced, and a queue opened on
the store of a killed server runs what that server had pending or running (a restarted prompt's history entry
begins with an ``execution_restarted`` message) and keeps its history.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .executor import ExecutionResult
from .json_io import finite_json
from .queue_store import QueueStore
from .workers import Worker, WorkerLost, model_files

logger = logging.getLogger(__name__)

Send = Callable[[str, dict[str, Any], str | None], None]
HISTORY_LIMIT = 10_000  # ComfyUI's: the oldest entries go first beyond this
# The history's size as JSON: the oldest entries go first beyond this too. An ordinary entry is a few tens of KB
# (the editor's workflow rides in extra_data), so count rules it; a client that posts megabytes of extra_data
# meets this bound instead of growing the server by that much per prompt.
HISTORY_MAX_BYTES = 64 << 20
SECRET_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")  # comfy.org credentials: never stored, never echoed
WORKER_LOSSES = 2  # a prompt whose worker dies runs once more, on another worker where there is one


def hide_paths(value: Any, shown_paths: Mapping[str, str]) -> Any:
    """``value`` with every string's server folders (keys of ``shown_paths``) replaced by their shown names, so
    error reports say ``input/cat.png``, never where the data lives on the server.

    Example:
        >>> hide_paths({"message": "no file /srv/data/input/cat.png", "n": 3}, {"/srv/data/input": "input"})
        {'message': 'no file input/cat.png', 'n': 3}
    """
    if isinstance(value, str):
        for folder in sorted(shown_paths, key=len, reverse=True):  # the innermost folder names a path
            value = value.replace(folder + os.sep, shown_paths[folder] + "/").replace(folder, shown_paths[folder])
        return value
    if isinstance(value, dict):
        return {key: hide_paths(item, shown_paths) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [hide_paths(item, shown_paths) for item in value]
    return value


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclasses.dataclass
class QueueItem:
    """One queued prompt, already validated."""

    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs: list[str]
    client_id: str | None
    create_time: int = dataclasses.field(default_factory=now_ms)
    start_time: int | None = None  # set when the worker takes it
    restarts: int = 0  # how many times a server stopped while it ran (a stored queue re-queues it)
    lost_on: list[int] = dataclasses.field(default_factory=list)  # the workers that died while running it

    def as_task(self) -> list:
        """ComfyUI's raw queue entry: ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclasses.dataclass
class HistoryRecord:
    item: QueueItem
    result: ExecutionResult
    end_time: int
    size: int = 0  # bytes of :meth:`as_history` as JSON, counted against the history's byte bound

    def as_history(self) -> dict:
        """ComfyUI's history entry."""
        return {
            "prompt": self.item.as_task(),
            "outputs": self.result.outputs,
            "status": {"status_str": "success" if self.result.status == "success" else "error",
                       "completed": self.result.status == "success",
                       "messages": [[event, data] for event, data in self.result.messages]},
            "meta": {node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
                     for node in self.result.outputs},
        }


class PromptQueue:
    """Queued prompts, the running ones, and the history of finished ones."""

    def __init__(self, workers: Sequence[Worker], send: Send, history_limit: int = HISTORY_LIMIT,
                 history_max_bytes: int = HISTORY_MAX_BYTES, shown_paths: Mapping[str, str] | None = None,
                 store: QueueStore | None = None):
        """``workers`` run the prompts, one each at a time; ``shown_paths`` maps server folders to the names error
        reports show instead (see :func:`hide_paths`); ``store`` keeps the queue and history on disk, and what it
        holds is queued and shown again."""
        if not workers:
            raise ValueError("a queue needs at least one worker")
        self.workers = list(workers)
        self.send = send
        self.history_limit = history_limit
        self.history_max_bytes = history_max_bytes
        self.shown_paths = dict(shown_paths or {})
        self._history_bytes = 0
        self._lock = threading.Condition()
        self._pending: list[tuple[float, int, QueueItem]] = []  # a heap; the counter keeps equal numbers in order
        self._order = itertools.count()
        self._numbers = itertools.count()
        self._running: dict[int, QueueItem] = {}  # worker index -> its prompt
        self._held: list[frozenset[str]] = [frozenset()] * len(self.workers)  # model files each worker has loaded
        self._history: collections.OrderedDict[str, HistoryRecord] = collections.OrderedDict()
        self._free_after: dict[str, bool] = {}
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.store = store
        if store is not None:
            self._restore(store)

    def _restore(self, store: QueueStore) -> None:
        stored = store.load()
        for fields, result, end_time in stored.history:
            self._keep(HistoryRecord(QueueItem(**fields), result, end_time))
        for fields in stored.queued:
            item = QueueItem(**fields)
            heapq.heappush(self._pending, (item.number, next(self._order), item))
        # New prompts number after every stored one, as they would have in the server that stored them.
        numbers = [record.item.number for record in self._history.values()] + [entry[0] for entry in self._pending]
        self._numbers = itertools.count(int(max(map(abs, numbers), default=-1)) + 1)
        if stored.queued:
            logger.info("queued again %d prompts a stopped server left (%d of them were running)",
                        len(stored.queued), sum(1 for fields in stored.queued if fields["restarts"]))

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._work, args=(index,), name=f"atelier-worker-{index}",
                                          daemon=True) for index in range(len(self.workers))]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            running = list(self._running)
        for index in running:
            self.workers[index].interrupt()
        for thread in self._threads:
            thread.join()

    # --- queue ---------------------------------------------------------------------------------------------------

    def submit(self, prompt: dict, outputs: list[str], extra_data: dict, client_id: str | None,
               number: float | None = None, front: bool = False, prompt_id: str | None = None) -> QueueItem:
        """Queue a validated prompt; ``front`` puts it before everything pending."""
        extra_data = {key: value for key, value in extra_data.items() if key not in SECRET_KEYS}
        with self._lock:
            counter = next(self._numbers)
            if number is None:
                number = -counter if front else counter
            item = QueueItem(number, prompt_id or str(uuid.uuid4()), prompt, extra_data, outputs, client_id)
            self._stored(item, "pending")
            heapq.heappush(self._pending, (item.number, next(self._order), item))
            self._lock.notify_all()
        self._queue_changed()
        return item

    def remaining(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._running)

    def snapshot(self) -> tuple[list[QueueItem], list[QueueItem]]:
        """The running items (one per busy worker, oldest first) and the pending ones in the order they will run."""
        with self._lock:
            running = sorted(self._running.values(), key=lambda item: item.start_time or 0)
            return running, [item for *_, item in sorted(self._pending)]

    def delete(self, prompt_ids: list[str]) -> None:
        """Drop pending prompts; a running one is stopped with :meth:`interrupt` instead."""
        with self._lock:
            self._pending = [entry for entry in self._pending if entry[2].prompt_id not in set(prompt_ids)]
            heapq.heapify(self._pending)
            if self.store is not None:
                self.store.remove(prompt_ids, "pending")
        self._queue_changed()

    def clear(self) -> None:
        with self._lock:
            self._pending = []
            if self.store is not None:
                self.store.clear("pending")
        self._queue_changed()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Stop the running prompts, or only ``prompt_id`` if it runs; returns whether an interrupt was sent."""
        with self._lock:
            chosen = [index for index, item in self._running.items()
                      if prompt_id is None or item.prompt_id == prompt_id]
        for index in chosen:
            self.workers[index].interrupt()
        return bool(chosen)

    def free(self, unload_models: bool = False, free_memory: bool = False) -> None:
        """Drop cached results (and loaded models) once the running prompt, if any, has finished."""
        with self._lock:
            self._free_after["unload_models"] = self._free_after.get("unload_models", False) or unload_models
            self._free_after["free_memory"] = self._free_after.get("free_memory", False) or free_memory
            idle = not self._running
        if idle:
            self._apply_free()

    # --- history -------------------------------------------------------------------------------------------------

    def history(self, max_items: int | None = None, offset: int | None = None) -> dict[str, dict]:
        """Finished prompts, oldest first; ``max_items`` without ``offset`` gives the newest ones, as ComfyUI does."""
        with self._lock:
            records = list(self._history.values())
        if max_items is not None and offset is None:
            records = records[-max_items:] if max_items > 0 else []
        elif offset is not None:
            records = records[offset:] if max_items is None else records[offset:offset + max_items]
        return {record.item.prompt_id: record.as_history() for record in records}

    def history_records(self) -> list[HistoryRecord]:
        with self._lock:
            return list(self._history.values())

    def history_record(self, prompt_id: str) -> HistoryRecord | None:
        with self._lock:
            return self._history.get(prompt_id)

    def delete_history(self, prompt_ids: list[str]) -> None:
        with self._lock:
            for prompt_id in prompt_ids:
                record = self._history.pop(prompt_id, None)
                if record is not None:
                    self._history_bytes -= record.size
            if self.store is not None:
                self.store.remove(prompt_ids, "done")

    def clear_history(self) -> None:
        with self._lock:
            self._history.clear()
            self._history_bytes = 0
            if self.store is not None:
                self.store.clear("done")

    def history_bytes(self) -> int:
        """The history's size as JSON, which stays within ``history_max_bytes``."""
        with self._lock:
            return self._history_bytes

    # --- the worker ----------------------------------------------------------------------------------------------

    def _queue_changed(self) -> None:
        self.send("status", {"status": {"exec_info": {"queue_remaining": self.remaining()}}}, None)

    def _work(self, index: int) -> None:
        worker = self.workers[index]
        while True:
            with self._lock:
                while not self._stopping and (entry := self._choice_of(index)) is None:
                    self._lock.wait()
                if self._stopping:
                    return
                self._pending.remove(entry)
                heapq.heapify(self._pending)
                item = entry[2]
                item.start_time = now_ms()
                self._running[index] = item
                self._stored(item, "running")
                self._lock.notify_all()  # the next prompt may be another idle worker's to take
            self._queue_changed()
            try:
                result = worker.execute(item.prompt, item.prompt_id, item.outputs,
                                        lambda event, data: self.send(event, self._shown(event, data),
                                                                      item.client_id),
                                        item.extra_data)
            except WorkerLost as lost:
                if self._queued_again(index, item, lost):
                    continue
                result = self._failed(item, "WorkerLost", f"the worker running this prompt died {WORKER_LOSSES} "
                                      f"times ({', '.join(self.workers[i].name for i in item.lost_on)}); last: {lost}")
            except Exception as error:  # the worker's own failure, not a node's: this prompt fails, the queue goes on
                logger.exception("worker %s failed outside the prompt's nodes", worker.name)
                result = self._failed(item, type(error).__name__, f"worker {worker.name} failed: {error}")
            result.messages = [(event, self._shown(event, data)) for event, data in result.messages]
            if item.restarts:
                result.messages.insert(0, ("execution_restarted", {
                    "prompt_id": item.prompt_id, "timestamp": item.start_time, "restarts": item.restarts}))
            record = HistoryRecord(item, result, now_ms())
            with self._lock:
                if self.store is not None:
                    self.store.finish(item.prompt_id, result, record.end_time)
                self._keep(record)
                self._running.pop(index, None)
                self._held[index] = self._held[index] | model_files(item.prompt)
                idle = not self._running
                self._lock.notify_all()
            self._queue_changed()
            self.send("executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id)
            if idle:
                self._apply_free()

    def _choice_of(self, index: int) -> tuple[float, int, QueueItem] | None:
        """The pending entry that idle worker ``index`` takes now (under the lock), or None.

        Prompts go in priority order, each to an idle worker that did not die running it (while any worker did
        not, the prompt waits for one of those), preferring one that holds its models, then the first.
        """
        if index in self._running:
            return None
        idle = [worker for worker in range(len(self.workers)) if worker not in self._running]
        for entry in sorted(self._pending):
            item = entry[2]
            untried = [worker for worker in range(len(self.workers)) if worker not in item.lost_on]
            allowed = [worker for worker in idle if worker in untried] if untried else idle
            if not allowed:
                continue
            wanted = model_files(item.prompt)
            chosen = min(allowed, key=lambda worker: (not wanted <= self._held[worker], worker))
            if chosen == index:
                return entry
            idle.remove(chosen)  # that worker takes this prompt; look on for one of this worker's
        return None

    def _queued_again(self, index: int, item: QueueItem, lost: WorkerLost) -> bool:
        """After worker ``index`` died running ``item``: queue it again at its place, unless it has used up its
        tries. The worker (restarted by its engine) has lost its models."""
        logger.warning("worker %s died running prompt %s: %s", self.workers[index].name, item.prompt_id, lost)
        with self._lock:
            item.lost_on.append(index)
            self._running.pop(index, None)
            self._held[index] = frozenset()
            again = len(item.lost_on) < WORKER_LOSSES and not self._stopping
            if again:
                item.start_time = None
                self._stored(item, "pending")
                heapq.heappush(self._pending, (item.number, next(self._order), item))
            self._lock.notify_all()
        if again:
            self._queue_changed()
        return again

    def _failed(self, item: QueueItem, exception_type: str, message: str) -> ExecutionResult:
        """The result of a prompt that no node failed, its worker did; its error goes to the client as a node's
        would."""
        error = {"prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
                 "exception_message": message, "exception_type": exception_type, "traceback": [],
                 "current_inputs": {}, "current_outputs": {}, "timestamp": now_ms()}
        self.send("execution_error", error, item.client_id)
        return ExecutionResult("error", {}, [("execution_start", {"prompt_id": item.prompt_id,
                                                                  "timestamp": item.start_time}),
                                             ("execution_error", error)], [])

    def _stored(self, item: QueueItem, state: str) -> None:
        if self.store is not None:
            self.store.update(dataclasses.asdict(item), state)

    def _keep(self, record: HistoryRecord) -> None:
        """Add ``record`` to the history (under the lock), dropping the oldest entries past its bounds."""
        record.size = len(finite_json(record.as_history()))
        self._history[record.item.prompt_id] = record
        self._history_bytes += record.size
        dropped = []
        while len(self._history) > self.history_limit or self._history_bytes > self.history_max_bytes:
            prompt_id, oldest = self._history.popitem(last=False)
            self._history_bytes -= oldest.size
            dropped.append(prompt_id)
        if dropped and self.store is not None:
            self.store.remove(dropped, "done")

    def _shown(self, event: str, data: dict) -> dict:
        """An ``execution_error`` as clients see it: server folders shown by their names, not their paths."""
        return hide_paths(data, self.shown_paths) if event == "execution_error" else data

    def _apply_free(self) -> None:
        with self._lock:
            flags, self._free_after = self._free_after, {}
        if flags.get("free_memory") or flags.get("unload_models"):
            for index, worker in enumerate(self.workers):
                worker.release(bool(flags.get("unload_models")))
                if flags.get("unload_models"):
                    self._held[index] = frozenset()
