"""What the server's handlers share: its configuration and its state, kept on the app under typed keys."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import sysconfig
from typing import Any

from aiohttp import web

from .executor import Executor
from .folders import DataFolders
from .limits import DEFAULT_LIMITS, Limits
from .prompt_queue import HISTORY_MAX_BYTES, PromptQueue

PROGRAM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_UPLOAD_BYTES = 100 << 20  # ComfyUI's default --max-upload-size: 100 MB
# A websocket client's queue: a preview is at most some 50 KB (512 px JPEG), so this holds a few hundred, and
# twenty clients that stop reading cost at most 160 MB before they are dropped.
CLIENT_QUEUE_MAX_BYTES = 8 << 20
CLIENT_QUEUE_MAX_MESSAGES = 2000
# What a slow client loses first, in this order: each is superseded by the next of its kind.
DROPPABLE_EVENTS = ("preview", "progress_text", "progress", "progress_state", "status")


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """``serve --ray``: where the workers run (``web/ray_workers.py``)."""

    address: str  # "auto": join the cluster started on this machine (`ray start --head`) or start one; else its address
    workers: int | None = None  # None: one per GPU of the cluster, or one on the CPU when it has none
    threads_per_worker: int | None = None  # torch threads of a CPU worker; None: the cluster's CPUs / workers


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    folders: DataFolders
    models_dir: str
    allowed_hosts: frozenset[str]
    token: str | None = None  # required on every request when set: listening beyond loopback
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    first_workflow: str | None = "text_to_image"  # a new user's first graph: a file of workflows/, without .json
    limits: Limits = DEFAULT_LIMITS  # the pixel budget of image and latent batches (--max-pixels)
    history_max_bytes: int = HISTORY_MAX_BYTES  # the history's size as JSON, besides its count
    queue_file: str | None = None  # the SQLite file that keeps the queue and history across restarts; None: memory
    ray: RaySettings | None = None  # None: prompts run in this process, Ray is not imported

    def shown_paths(self) -> dict[str, str]:
        """Server folders and the names error reports show for them: ``input``, ``models``, ``atelier`` (this
        program's folder, which tracebacks name) and the like, never an absolute path."""
        named = {**{getattr(self.folders, kind): kind for kind in ("input", "output", "temp", "user")},
                 self.models_dir: "models", PROGRAM_DIR: "atelier",
                 sysconfig.get_paths()["purelib"]: "site-packages", sysconfig.get_paths()["stdlib"]: "python"}
        return {variant: name for folder, name in named.items()
                for variant in {os.path.abspath(folder), os.path.realpath(folder)}}


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One message waiting for a client: JSON text, or a preview (JPEG bytes and their metadata)."""

    type: str  # the event type ("executed", "progress", ...); "preview" for a binary preview
    body: str | tuple[bytes, dict]
    size: int  # bytes it holds, counted against the client's queue bound


@dataclasses.dataclass
class Client:
    """One websocket connection, the feature flags it announced, and the messages waiting to be sent to it.

    Each client has its own bounded queue, drained by its own task, so a client that stops reading holds up
    no one else. Past the bound, the oldest message that a newer one supersedes goes first (previews, then
    progress, then progress maps and queue status); a client whose queue is full of results and lifecycle
    events, which are never dropped, is ``stuck`` and gets closed.
    """

    socket: web.WebSocketResponse
    transport: asyncio.BaseTransport | None = None  # aborted when the client is stuck: a close frame would wait
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)
    queue: collections.deque[Outgoing] = dataclasses.field(default_factory=collections.deque)
    queued_bytes: int = 0
    stuck: bool = False
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def enqueue(self, message: Outgoing) -> None:
        """Queue ``message``; past the bounds, drop superseded messages, or mark the client stuck."""
        self.queue.append(message)
        self.queued_bytes += message.size
        while len(self.queue) > CLIENT_QUEUE_MAX_MESSAGES or self.queued_bytes > CLIENT_QUEUE_MAX_BYTES:
            stale = next((m for kind in DROPPABLE_EVENTS for m in self.queue if m.type == kind), None)
            if stale is None:
                self.stuck = True
                break
            self.queue.remove(stale)
            self.queued_bytes -= stale.size
        self.wake.set()

    def next_message(self) -> Outgoing | None:
        if not self.queue:
            return None
        message = self.queue.popleft()
        self.queued_bytes -= message.size
        return message


@dataclasses.dataclass
class ServerState:
    executor: Executor
    queue: PromptQueue
    node_classes: dict[str, type]
    display_names: dict[str, str]
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue  # messages from the worker thread, sent in order by one task
    clients: dict[str, Client] = dataclasses.field(default_factory=dict)
    object_info: dict | None = None  # computed off the event loop, dropped when the input folder changes


CONFIG = web.AppKey("config", ServerConfig)
STATE = web.AppKey("state", ServerState)
