"""The standalone server: ComfyUI's HTTP and websocket API (``comfyui-protocol.md`` §1, §2, §7), so that the
official ComfyUI frontend runs on it unchanged, plus our ``js/`` extensions.

``create_app(config)`` builds the aiohttp application; ``python -m web serve`` runs it. Every API route answers
both at ``/path`` and at ``/api/path``. One worker thread executes prompts (``prompt_queue.py``); its events
reach the websockets through one queue drained by one task, so they keep their order.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import importlib.resources
import io
import json
import logging
import math
import os
import platform
import re
import struct
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
from aiohttp import WSCloseCode, web
from PIL import Image

import nodes

from .executor import Executor
from .node_info import object_info
from .prompt_queue import PromptQueue
from .queue_store import QueueStore
from .workers import LocalWorker
from .registry import display_names, node_classes
from .security import security_middleware
from .json_io import finite_json, json_response, parse_json, read_json
from .limits import bind_limits
from .server_state import CONFIG, STATE, Client, Outgoing, ServerConfig, ServerState
from . import files, jobs

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JS_DIR = os.path.join(ROOT, "js")
EXTENSION_NAME = "atelier"
PACK_MODULE = f"custom_nodes.{EXTENSION_NAME}"
FRONTEND_PACKAGE = "comfyui-frontend-package"
COMFYUI_VERSION = "0.3.64"  # the ComfyUI API version whose contract we implement (comfyui-protocol.md §0)
PREVIEW_MAX_SIZE = 512  # ComfyUI's default --preview-size
PREVIEW_JPEG_QUALITY = 85  # a preview is looked at once, while the next step is being computed
BINARY_PREVIEW, BINARY_TEXT, BINARY_PREVIEW_WITH_METADATA, JPEG = 1, 3, 4, 1  # websocket binary event types, image format
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# Execution events that go to the submitting client only, and nowhere when the prompt named no client.
DIRECT_EVENTS = frozenset({"execution_start", "execution_cached", "executing", "executed", "execution_success",
                           "execution_error"})
END_EVENTS = frozenset({"execution_success", "execution_error", "execution_interrupted"})
# progress_state carries every node of the prompt (the editor replaces its map with each one), so one per event
# would cost O(nodes²) on a large graph; changes within this interval are sent together, and the editor draws at
# most one per frame anyway.
PROGRESS_STATE_INTERVAL_S = 0.1

# A websocket send that waits this long means the client stopped reading (a live one takes milliseconds); it is
# cut off rather than left to hold its queue and the server's write buffer.
CLIENT_SEND_TIMEOUT_S = 30.0
SHUTDOWN_CLOSE_TIMEOUT_S = 2.0  # shutting down waits this long per client for its close frame to go out

routes = web.RouteTableDef()
CLASSES = web.AppKey("classes", dict)


def pinned_frontend_version() -> str:
    """The frontend version that requirements-app.txt pins: what /system_stats reports as required."""
    with open(os.path.join(ROOT, "requirements-app.txt"), encoding="utf-8") as file:
        for line in file:
            if line.startswith(f"{FRONTEND_PACKAGE}=="):
                return line.split("==", 1)[1].strip()
    raise RuntimeError(f"requirements-app.txt pins no {FRONTEND_PACKAGE} version")


def frontend_root() -> str:
    return str(importlib.resources.files("comfyui_frontend_package") / "static")


def create_app(config: ServerConfig, classes: dict[str, type] | None = None) -> web.Application:
    """The aiohttp application for ``config``; start and stop it with aiohttp's runner or test client.

    ``classes`` replaces the registry's node classes (built-ins and Atelier's pack), for tests and benchmarks
    that bring node classes of their own.
    """
    app = web.Application(middlewares=[security_middleware(config.allowed_hosts, config.token)],
                          client_max_size=config.max_upload_bytes)
    app[CONFIG] = config
    app[CLASSES] = bind_limits(node_classes(config.folders, config.models_dir) if classes is None else classes,
                               config.limits)
    app.cleanup_ctx.append(_worker_context)
    app.on_shutdown.append(_close_sockets)
    api = [*routes, *files.routes, *jobs.routes]
    app.add_routes(api)
    app.add_routes([web.RouteDef(r.method, "/api" + r.path, r.handler, r.kwargs) for r in api
                    if isinstance(r, web.RouteDef)])
    app.add_routes([web.get("/", _index), web.get("/templates/index.json", _core_templates),
                    web.get("/templates/index_logo.json", _core_templates),
                    web.get("/internal/files/{kind}", files.internal_files),
                    web.static(f"/extensions/{EXTENSION_NAME}", JS_DIR), web.static("/", frontend_root())])
    return app


async def _worker_context(app: web.Application) -> AsyncIterator[None]:
    """Start the executor's worker thread and the task that sends its events; stop both on shutdown."""
    installed, pinned = importlib.metadata.version(FRONTEND_PACKAGE), pinned_frontend_version()
    if installed != pinned:
        logger.warning("%s %s is installed but requirements-app.txt pins %s; run install.py", FRONTEND_PACKAGE,
                       installed, pinned)
    classes = app[CLASSES]
    executor = Executor(classes)
    loop = asyncio.get_running_loop()
    state = ServerState(executor=executor, queue=None, node_classes=classes, display_names=display_names(),
                        loop=loop, outbox=asyncio.Queue())
    config = app[CONFIG]
    ray = None
    if config.ray is None:
        workers = [LocalWorker(executor)]
    else:  # imported here only: without --ray, Ray is never imported
        from .ray_workers import init_ray, start_workers

        ray = await loop.run_in_executor(None, init_ray, config.ray)
        workers = await loop.run_in_executor(None, start_workers, config.ray, config.folders, config.models_dir,
                                             config.limits)
    store = None if config.queue_file is None else QueueStore(config.queue_file)
    state.queue = PromptQueue(workers, _Sender(state), history_max_bytes=config.history_max_bytes,
                              shown_paths=config.shown_paths(), store=store)
    app[STATE] = state
    # Everything imported so far (torch, diffusers, transformers: a few hundred thousand objects) lives as long as
    # the server: frozen, the cyclic collector stops walking it on every full collection, which otherwise stalled
    # one prompt in about thirty by 0.2 s (issue 18's executor benchmark).
    gc.collect()
    gc.freeze()
    state.queue.start()
    publisher = asyncio.create_task(_publish(state))
    yield
    publisher.cancel()
    await loop.run_in_executor(None, state.queue.stop)
    if store is not None:
        store.close()
    if ray is not None:
        await loop.run_in_executor(None, ray.shutdown)


async def _close_sockets(app: web.Application) -> None:
    """Close every websocket with GOING_AWAY; one that does not take its close frame in time is cut off."""
    for client in list(app[STATE].clients.values()):
        try:
            async with asyncio.timeout(SHUTDOWN_CLOSE_TIMEOUT_S):
                await client.socket.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
        except TimeoutError:
            _cut_off(client, "it did not take its close frame at shutdown")


# --- events to websockets ------------------------------------------------------------------------------------------

class _Sender:
    """Turns queue and executor events into websocket messages; runs on the worker thread.

    It adds ``progress_state`` (the per-node progress map of newer frontends) and encodes previews as JPEG
    here, off the event loop. A ``progress_state`` is sent at once when none went out in the last
    ``PROGRESS_STATE_INTERVAL_S``, else once that interval is over (by a timer on the event loop, so a node that
    runs long without events still shows as running), and always just before the prompt's last event.
    """

    def __init__(self, state: ServerState):
        self.state = state
        self.nodes: dict[str, dict] = {}  # entries are replaced, never changed, so a shallow copy is a snapshot
        self.running: str | None = None
        # The worker thread changes the map; a delayed send reads it on the event loop.
        self.lock = threading.Lock()
        self.unsent: tuple[str, str | None] | None = None  # (prompt_id, client_id) of a change not sent yet
        self.send_scheduled = False
        self.last_sent = -math.inf

    def __call__(self, event: str, data: dict, client_id: str | None) -> None:
        if event == "status":
            self._post("json", {"type": "status", "data": data}, None)
            return
        prompt_id = data.get("prompt_id")
        if event == "execution_start":
            with self.lock:
                self.nodes, self.running, self.unsent = {}, None, None
        elif event == "executing" and data["node"] is not None:
            self._finish_running(prompt_id)
            self.running = data["node"]
            self._node_state(prompt_id, data["node"], "running", 0, 1)
            self._progress_state(prompt_id, client_id)
        elif event in ("executed", "execution_success"):
            if self._finish_running(prompt_id):
                self._progress_state(prompt_id, client_id)
        elif event in ("execution_error", "execution_interrupted") and self.running is not None:
            self._node_state(prompt_id, self.running, "error", 0, 1)
            self.running = None
            self._progress_state(prompt_id, client_id)
        if event == "preview":
            self._post("preview", self._encode_preview(data), client_id)
            return
        if event == "progress_text":
            self._post("progress_text", (data["node"], data["text"]), client_id)
            return
        if event in END_EVENTS:
            with self.lock:
                self._send_progress_state()  # the final map, before the event that ends the prompt
        self._route(event, data, client_id)
        if event == "execution_cached" and data["nodes"]:
            for node in data["nodes"]:
                self._node_state(prompt_id, node, "finished", 1, 1)
            self._progress_state(prompt_id, client_id)
        elif event == "progress":
            self._node_state(prompt_id, data["node"], "running", data["value"], data["max"])
            self._progress_state(prompt_id, client_id)

    def _route(self, event: str, data: dict, client_id: str | None) -> None:
        if client_id is None and event in DIRECT_EVENTS:
            return  # ComfyUI sends these only to the client that queued the prompt
        self._post("json", {"type": event, "data": data}, client_id)

    def _node_state(self, prompt_id: str, node: str, state: str, value: int, maximum: int) -> None:
        entry = {"value": value, "max": maximum, "state": state, "node_id": node, "prompt_id": prompt_id,
                 "display_node_id": node, "parent_node_id": None, "real_node_id": node}
        with self.lock:
            self.nodes[node] = entry

    def _finish_running(self, prompt_id: str) -> bool:
        if self.running is None:
            return False
        done = self.nodes.get(self.running, {})
        self._node_state(prompt_id, self.running, "finished", done.get("max", 1), done.get("max", 1))
        self.running = None
        return True

    def _progress_state(self, prompt_id: str, client_id: str | None) -> None:
        """Note that the map changed; send it now, or schedule its sending at the end of the interval."""
        with self.lock:
            self.unsent = (prompt_id, client_id)
            wait = self.last_sent + PROGRESS_STATE_INTERVAL_S - time.monotonic()
            if wait <= 0:
                self._send_progress_state()
            elif not self.send_scheduled:
                self.send_scheduled = True
                self.state.loop.call_soon_threadsafe(self.state.loop.call_later, wait, self._scheduled_send)

    def _scheduled_send(self) -> None:
        with self.lock:
            self.send_scheduled = False
            self._send_progress_state()

    def _send_progress_state(self) -> None:
        """Send the whole map if it changed since the last one sent; the caller holds the lock."""
        if self.unsent is None:
            return
        prompt_id, client_id = self.unsent
        self.unsent, self.last_sent = None, time.monotonic()
        self._route("progress_state", {"prompt_id": prompt_id, "nodes": dict(self.nodes)}, client_id)

    @staticmethod
    def _encode_preview(data: dict) -> tuple[bytes, dict]:
        image: Image.Image = data["image"]
        if image.mode != "RGB":
            image = image.convert("RGB")  # a new image, ours to shrink in place
        elif max(image.size) > PREVIEW_MAX_SIZE:
            image = image.copy()  # never shrink the node's own image
        if max(image.size) > PREVIEW_MAX_SIZE:
            image.thumbnail((PREVIEW_MAX_SIZE, PREVIEW_MAX_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
        node = data["node"]
        meta = {"node_id": node, "prompt_id": data["prompt_id"], "display_node_id": node, "parent_node_id": None,
                "real_node_id": node, "image_type": "image/jpeg"}
        return buffer.getvalue(), meta

    def _post(self, kind: str, payload: Any, client_id: str | None) -> None:
        self.state.loop.call_soon_threadsafe(self.state.outbox.put_nowait, (kind, payload, client_id))


def text_frame(node_id: str, text: str) -> bytes:
    """A binary progress-text message, as ComfyUI's ``send_progress_text`` frames it: the event type, the node id's
    length and the node id, then the text; the editor shows it on the node.

    Example:
        >>> text_frame("3", "ok")
        b'\\x00\\x00\\x00\\x03\\x00\\x00\\x00\\x013ok'
    """
    node = node_id.encode("utf-8")
    return struct.pack(">II", BINARY_TEXT, len(node)) + node + text.encode("utf-8")


def preview_frame(jpeg: bytes, meta: dict, with_metadata: bool) -> bytes:
    """A binary preview message: type 4 with its metadata header, or the plain type 1 (§2).

    Example:
        >>> preview_frame(b"JPEG", {"node_id": "3"}, False)
        b'\\x00\\x00\\x00\\x01\\x00\\x00\\x00\\x01JPEG'
        >>> preview_frame(b"JPEG", {"node_id": "3"}, True)[:8]
        b'\\x00\\x00\\x00\\x04\\x00\\x00\\x00\\x0f'
    """
    if with_metadata:
        header = json.dumps(meta, separators=(",", ":")).encode()
        return struct.pack(">II", BINARY_PREVIEW_WITH_METADATA, len(header)) + header + jpeg
    return struct.pack(">II", BINARY_PREVIEW, JPEG) + jpeg


async def _publish(state: ServerState) -> None:
    """Hand the worker's messages, in order, to each target client's own queue; never waits on a client."""
    while True:
        kind, payload, client_id = await state.outbox.get()
        if kind == "json":
            text = finite_json(payload)  # serialised once for every client
            message = Outgoing(payload["type"], text, len(text))
        elif kind == "progress_text":
            frame = text_frame(*payload)
            message = Outgoing("progress_text", frame, len(frame))
        else:
            jpeg, meta = payload
            message = Outgoing("preview", payload, len(jpeg))
        if client_id is None:
            targets = list(state.clients.values())
        else:
            targets = [state.clients[client_id]] if client_id in state.clients else []
        for client in targets:
            if not client.socket.closed:
                client.enqueue(message)


async def _send_to(client: Client) -> None:
    """Drain one client's queue; a client that is stuck, or whose send takes over CLIENT_SEND_TIMEOUT_S (it
    stopped reading), is cut off so that its queue and the server's write buffer stop growing."""
    while True:
        await client.wake.wait()
        client.wake.clear()
        while (message := client.next_message()) is not None:
            if client.stuck:
                _cut_off(client, "its queue filled with events that are never dropped")
                return
            try:
                async with asyncio.timeout(CLIENT_SEND_TIMEOUT_S):
                    if message.type == "preview":
                        jpeg, meta = message.body
                        await client.socket.send_bytes(preview_frame(
                            jpeg, meta, bool(client.flags.get("supports_preview_metadata"))))
                    elif message.type == "progress_text":
                        await client.socket.send_bytes(message.body)
                    else:
                        await client.socket.send_str(message.body)
            except TimeoutError:
                _cut_off(client, f"a send took over {CLIENT_SEND_TIMEOUT_S} s")
                return
            except (ConnectionError, RuntimeError) as error:  # the socket closed under us
                logger.debug("stopped sending to a closed websocket: %s", error)
                return


def _cut_off(client: Client, why: str) -> None:
    logger.warning("closed a websocket client that stopped reading: %s", why)
    client.queue.clear()
    client.queued_bytes = 0
    if client.transport is not None:
        client.transport.abort()  # not close(): its close frame would wait behind the unread data


@routes.get("/ws")
async def websocket(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    socket = web.WebSocketResponse(heartbeat=30)
    await socket.prepare(request)
    client_id = request.query.get("clientId") or uuid.uuid4().hex
    client = Client(socket, request.transport)
    await socket.send_json({"type": "status", "data": {
        "status": {"exec_info": {"queue_remaining": state.queue.remaining()}}, "sid": client_id}})
    state.clients[client_id] = client  # a reconnecting client takes its id back
    sender = asyncio.create_task(_send_to(client))  # from now on the only writer to this socket
    try:
        first = True
        async for message in socket:
            if first and message.type == web.WSMsgType.TEXT:
                first = False
                try:
                    announced = parse_json(message.data)
                except ValueError:
                    continue
                if isinstance(announced, dict) and announced.get("type") == "feature_flags":
                    flags = announced.get("data")
                    client.flags = flags if isinstance(flags, dict) else {}
                    reply = finite_json({"type": "feature_flags", "data": feature_flags(request.app[CONFIG])})
                    client.enqueue(Outgoing("feature_flags", reply, len(reply)))
    finally:
        if state.clients.get(client_id) is client:
            del state.clients[client_id]
        sender.cancel()
    return socket


# --- the editor's boot routes -----------------------------------------------------------------------------------

async def _index(request: web.Request) -> web.StreamResponse:
    """The editor's page; a new user is sent to our example workflow instead of the template browser."""
    first = request.app[CONFIG].first_workflow
    if first and set(request.query) <= {"token"} and files.is_new_user(request):
        # A response, not a raised HTTPFound, so that the security middleware can still set the token cookie.
        return web.Response(status=302, headers={"Location": f"./?template={first}&source={files.TEMPLATE_MODULE}"})
    return web.FileResponse(os.path.join(frontend_root(), "index.html"), headers={"Cache-Control": "no-cache"})


@routes.get("/atelier/default_graph")
async def default_graph(request: web.Request) -> web.StreamResponse:
    """The graph the editor shows when it has none of the user's: ``js/atelier.js`` puts it in place of the
    frontend's built-in default graph, whose nodes this server lacks. It is the new user's first workflow, or
    null when the server names none (the editor then opens a blank graph)."""
    first = request.app[CONFIG].first_workflow
    if first is None:
        return web.json_response(None)
    return web.FileResponse(os.path.join(files.WORKFLOWS_DIR, f"{first}.json"), headers={"Cache-Control": "no-cache"})


async def _core_templates(request: web.Request) -> web.Response:
    """The core template index: we ship none of ComfyUI's templates, so it is empty, not missing."""
    return web.json_response({} if request.path.endswith("index_logo.json") else [])


def feature_flags(config: ServerConfig) -> dict[str, Any]:
    return {"supports_preview_metadata": True, "max_upload_size": config.max_upload_bytes}


@routes.get("/features")
async def features(request: web.Request) -> web.Response:
    return web.json_response(feature_flags(request.app[CONFIG]))


@routes.get("/extensions")
async def extensions(request: web.Request) -> web.Response:
    scripts = sorted(os.path.relpath(os.path.join(folder, name), JS_DIR).replace(os.sep, "/")
                     for folder, _, names in os.walk(JS_DIR) for name in names if name.endswith(".js"))
    return web.json_response([f"/extensions/{EXTENSION_NAME}/{script}" for script in scripts])


@routes.get("/object_info")
async def all_object_info(request: web.Request) -> web.Response:
    return web.json_response(await _object_info(request.app))


@routes.get("/object_info/{node_class}")
async def one_object_info(request: web.Request) -> web.Response:
    info = await _object_info(request.app)
    name = request.match_info["node_class"]
    return web.json_response({name: info[name]} if name in info else {})


async def _object_info(app: web.Application) -> dict:
    """Every node's metadata, computed off the event loop (INPUT_TYPES may scan folders) and kept."""
    state = app[STATE]
    if state.object_info is None:
        state.object_info = await state.loop.run_in_executor(None, _compute_object_info, state)
    return state.object_info


def _compute_object_info(state: ServerState) -> dict:
    info = {}
    for name, cls in state.node_classes.items():
        module = PACK_MODULE if name in nodes.NODE_CLASS_MAPPINGS else "nodes"
        try:
            info[name] = object_info(name, cls, state.display_names.get(name), module)
        except Exception as error:  # one broken node class must not hide every other node from the editor
            logger.error("node %s left out of object_info: %s", name, error)
    return info


@routes.get("/system_stats")
async def system_stats(request: web.Request) -> web.Response:
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    devices = [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0,
                "torch_vram_total": 0, "torch_vram_free": 0}]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        devices = [{"name": torch.cuda.get_device_name(), "type": "cuda", "index": torch.cuda.current_device(),
                    "vram_total": total, "vram_free": free, "torch_vram_total": torch.cuda.memory_reserved(),
                    "torch_vram_free": torch.cuda.memory_reserved() - torch.cuda.memory_allocated()}]
    return web.json_response({
        "system": {
            "os": sys.platform, "ram_total": pages * page_size,
            "ram_free": os.sysconf("SC_AVPHYS_PAGES") * page_size,
            "comfyui_version": COMFYUI_VERSION, "required_frontend_version": pinned_frontend_version(),
            "installed_templates_version": None, "required_templates_version": None,
            "python_version": platform.python_version(), "pytorch_version": torch.__version__,
            "embedded_python": False, "argv": ["atelier"],  # never the real argv: it may hold paths and tokens
        },
        "devices": devices,
    })


@routes.get("/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    return web.json_response([])


@routes.get("/i18n")
async def i18n(request: web.Request) -> web.Response:
    return web.json_response({})


@routes.get("/global_subgraphs")
async def global_subgraphs(request: web.Request) -> web.Response:
    return web.json_response({})


# --- running prompts ----------------------------------------------------------------------------------------------

def _bad_request(message: str, type_: str = "invalid_prompt") -> web.Response:
    return web.json_response({"error": {"type": type_, "message": message, "details": "", "extra_info": {}},
                              "node_errors": {}}, status=400)


@routes.get("/prompt")
async def prompt_status(request: web.Request) -> web.Response:
    return web.json_response({"exec_info": {"queue_remaining": request.app[STATE].queue.remaining()}})


@routes.post("/prompt")
async def queue_prompt(request: web.Request) -> web.Response:
    """Validate and queue a prompt. The body is read as JSON whatever its Content-Type, as ComfyUI reads it:
    clients send none (comfy-api-simplified) or form-urlencoded (ComfyUI's own script examples). Cross-site
    browser posts are stopped before this, by the Origin and Host checks."""
    body = await read_json(request)
    if not isinstance(body, dict):
        return _bad_request(f"the body must be a JSON object; got {type(body).__name__}")
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not (isinstance(prompt_id, str) and UUID_RE.match(prompt_id)):
        return _bad_request(f"prompt_id must be a lowercase canonical UUID; got {prompt_id!r}", "invalid_prompt_id")
    extra_data = body.get("extra_data", {})
    client_id = body.get("client_id")
    number = body.get("number")
    targets = body.get("partial_execution_targets")
    if not isinstance(extra_data, dict) or not isinstance(client_id, (str, type(None))) \
            or not isinstance(number, (int, float, type(None))) or isinstance(number, bool) \
            or not isinstance(targets, (list, type(None))):
        return _bad_request("extra_data must be an object, client_id a string, number a number and "
                            "partial_execution_targets a list")
    state = request.app[STATE]
    checked = await state.loop.run_in_executor(None, state.executor.validate, body.get("prompt"), targets)
    if not checked.ok:
        return web.json_response({"error": checked.error, "node_errors": checked.node_errors}, status=400)
    item = state.queue.submit(checked.prompt, checked.outputs, extra_data, client_id, number,
                              front=bool(body.get("front")), prompt_id=prompt_id)
    return web.json_response({"prompt_id": item.prompt_id, "number": item.number, "node_errors": checked.node_errors})


@routes.get("/queue")
async def get_queue(request: web.Request) -> web.Response:
    running, pending = request.app[STATE].queue.snapshot()
    return web.json_response({"queue_running": [item.as_task() for item in running],
                              "queue_pending": [item.as_task() for item in pending]})


@routes.post("/queue")
async def change_queue(request: web.Request) -> web.Response:
    queue = request.app[STATE].queue
    return await _clear_or_delete(request, queue.clear, queue.delete)


@routes.post("/interrupt")
async def interrupt(request: web.Request) -> web.Response:
    body = await _json_object(request)
    request.app[STATE].queue.interrupt(body.get("prompt_id"))
    return web.Response()


@routes.post("/free")
async def free(request: web.Request) -> web.Response:
    body = await _json_object(request)
    request.app[STATE].queue.free(bool(body.get("unload_models")), bool(body.get("free_memory")))
    return web.Response()


@routes.get("/history")
async def get_history(request: web.Request) -> web.Response:
    try:
        max_items = int(request.query["max_items"]) if "max_items" in request.query else None
        offset = int(request.query["offset"]) if "offset" in request.query else None
    except ValueError:
        return web.json_response({"error": "max_items and offset must be integers"}, status=400)
    return json_response(request.app[STATE].queue.history(max_items, offset))


@routes.get("/history/{prompt_id}")
async def get_history_item(request: web.Request) -> web.Response:
    record = request.app[STATE].queue.history_record(request.match_info["prompt_id"])
    return json_response({record.item.prompt_id: record.as_history()} if record else {})


@routes.post("/history")
async def change_history(request: web.Request) -> web.Response:
    queue = request.app[STATE].queue
    return await _clear_or_delete(request, queue.clear_history, queue.delete_history)


async def _clear_or_delete(request: web.Request, clear, delete) -> web.Response:
    """POST /queue and POST /history: ``{"clear": true}`` and/or ``{"delete": [prompt ids]}``."""
    body = await _json_object(request)
    if body.get("clear"):
        clear()
    if isinstance(body.get("delete"), list):
        delete([str(i) for i in body["delete"]])
    return web.Response()


async def _json_object(request: web.Request) -> dict:
    """An optional JSON object body; anything else counts as empty, as ComfyUI's routes treat it."""
    if not request.can_read_body:
        return {}
    body = await read_json(request)
    return body if isinstance(body, dict) else {}
