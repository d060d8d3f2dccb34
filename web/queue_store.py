"""The prompt queue and its history on disk, so that a server killed at any moment loses no prompt.

One SQLite file (stdlib ``sqlite3``, WAL journal) holds every prompt the queue accepted, in one of three states:
``pending``, ``running`` or ``done`` (with its history entry). Each change is one committed transaction, made
under the queue's lock before the change is announced: what a client was told is on disk. A server started on the
same file re-queues what was pending and what was running (counted as a restart), and keeps its history.

WAL with ``synchronous=NORMAL`` survives a killed process (SIGKILL, a crash) with every committed transaction;
only a power cut may lose the last few, never corrupt the file. SQLite's automatic checkpoint would copy the WAL
into the database inside the commit that crosses 1000 pages, with an fsync (commits of 30 kB prompts: median
0.11 ms, but up to 8 ms on this machine's disk, more on a slow one); a background thread checkpoints instead,
passively (writers go on meanwhile), every ``CHECKPOINT_INTERVAL_S`` (the same commits: at most 0.3 ms).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from typing import Any

from .executor import ExecutionResult
from .json_io import finite_json

CHECKPOINT_INTERVAL_S = 1.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order, which breaks ties between equal numbers
    prompt_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done')),
    item TEXT NOT NULL,  -- the QueueItem's fields as JSON
    result TEXT,  -- done: the ExecutionResult and end time as JSON
    finished INTEGER  -- done: the order in which prompts finished, the history's order
)
"""


@dataclasses.dataclass
class StoredPrompts:
    """What a store held when it was opened."""

    queued: list[dict]  # items' fields, pending and formerly running alike, in submission order
    history: list[tuple[dict, ExecutionResult, int]]  # (item fields, result, end time), oldest first


class QueueStore:
    """The queue's prompts in one SQLite file. Not thread-safe by itself: the queue calls it under its lock."""

    def __init__(self, path: str):
        """Open (or create) the store at ``path``.

        Raises:
            sqlite3.DatabaseError: ``path`` is not a queue store.
        """
        self.path = path
        # isolation_level=None: no implicit transactions; each write below is one explicit transaction.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.execute(SCHEMA)
        self._closing = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_until_closed, name="queue-store-checkpoint",
                                              daemon=True)
        self._checkpointer.start()

    def _checkpoint_until_closed(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)  # its own connection, on this thread only
        try:
            while not self._closing.wait(CHECKPOINT_INTERVAL_S):
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    def close(self) -> None:
        self._closing.set()
        self._checkpointer.join()
        self._db.close()  # the last connection to close checkpoints what is left

    def load(self) -> StoredPrompts:
        """Everything held, with prompts that were running marked pending again and their restart count raised:
        the process that ran them is gone."""
        with self._db:
            for prompt_id, item in self._db.execute("SELECT prompt_id, item FROM prompts WHERE state = 'running'"):
                fields = json.loads(item)
                fields["restarts"] = fields.get("restarts", 0) + 1
                fields["start_time"] = None
                self._db.execute("UPDATE prompts SET state = 'pending', item = ? WHERE prompt_id = ?",
                                 (finite_json(fields), prompt_id))
        queued = [json.loads(item) for (item,) in
                  self._db.execute("SELECT item FROM prompts WHERE state = 'pending' ORDER BY seq")]
        history = []
        for item, result in self._db.execute("SELECT item, result FROM prompts WHERE state = 'done' ORDER BY finished"):
            stored = json.loads(result)
            history.append((json.loads(item), ExecutionResult(
                stored["status"], stored["outputs"], [tuple(message) for message in stored["messages"]],
                stored["executed"]), stored["end_time"]))
        return StoredPrompts(queued, history)

    def update(self, fields: dict[str, Any], state: str) -> None:
        """A prompt queued ("pending"), taken by a worker ("running") or queued again after its worker died
        ("pending"), with its fields as they are now."""
        with self._db:
            self._db.execute("INSERT INTO prompts (prompt_id, state, item) VALUES (?, ?, ?) ON CONFLICT (prompt_id) "
                             "DO UPDATE SET state = excluded.state, item = excluded.item",
                             (fields["prompt_id"], state, finite_json(fields)))

    def finish(self, prompt_id: str, result: ExecutionResult, end_time: int) -> None:
        """The prompt ended (success, error or interrupted) and joins the history."""
        stored = {"status": result.status, "outputs": result.outputs, "messages": result.messages,
                  "executed": result.executed, "end_time": end_time}
        with self._db:
            self._db.execute("UPDATE prompts SET state = 'done', result = ?, "
                             "finished = (SELECT COALESCE(MAX(finished), 0) + 1 FROM prompts) WHERE prompt_id = ?",
                             (finite_json(stored), prompt_id))

    def remove(self, prompt_ids: list[str], state: str) -> None:
        """Forget the prompts of ``prompt_ids`` that are in ``state`` ("pending" or "done")."""
        with self._db:
            self._db.executemany("DELETE FROM prompts WHERE prompt_id = ? AND state = ?",
                                 [(prompt_id, state) for prompt_id in prompt_ids])

    def clear(self, state: str) -> None:
        """Forget every prompt in ``state`` ("pending" or "done")."""
        with self._db:
            self._db.execute("DELETE FROM prompts WHERE state = ?", (state,))
