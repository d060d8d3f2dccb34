"""What the server's handlers share: its configuration and its state, kept on the app under typed keys."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from aiohttp import web

from .executor import Executor
from .folders import DataFolders
from .prompt_queue import PromptQueue

MAX_UPLOAD_BYTES = 100 << 20  # ComfyUI's default --max-upload-size: 100 MB


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    folders: DataFolders
    models_dir: str
    allowed_hosts: frozenset[str]
    token: str | None = None  # required on every request when set: listening beyond loopback
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    first_workflow: str | None = "text_to_image"  # a new user's first graph: a file of workflows/, without .json


@dataclasses.dataclass
class Client:
    """One websocket connection and the feature flags it announced."""

    socket: web.WebSocketResponse
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)


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


def json_error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    """An HTTP error with a ``{"error": message}`` JSON body, for a handler's helpers to raise."""
    return status(text=json.dumps({"error": message}), content_type="application/json")


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; a body that is not UTF-8 JSON is a 400 that says so, never a 500."""
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise json_error(web.HTTPBadRequest, f"the body is not valid JSON: {error}") from None
