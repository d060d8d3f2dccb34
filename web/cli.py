"""Atelier's command line.

    python -m web [serve] [--port 8188] [--listen ADDR] [--data-dir D] [--models-dir M] [--open]
                  [--ray auto|ADDRESS [--workers N]]
    python -m web run WORKFLOW.json [--set NODE.INPUT=VALUE ...] [--output-dir D] [--data-dir D] [--models-dir M]

``serve`` (also a bare ``python -m web``) starts the editor's server and prints its URL. Bound to 127.0.0.1 it
needs no token; with ``--listen`` beyond loopback it makes a per-launch token and prints a URL that carries it.

``run`` executes a workflow file headlessly, in the API format or in the editor's UI format. It shows a
progress bar per node and per step on stderr and prints one ``output: PATH`` line on stdout for each file it
saved. A workflow that fails validation or cannot be converted exits with 1 and lists the errors per node, every
node whose type is not installed among them; a usage error (an unreadable file, not JSON, a bad ``--set``) exits
with 2.
"""

from __future__ import annotations

import logging

# Importing the nodes imports diffusers' SD pipelines, which import transformers' image processors; without
# torchvision (never installed: Atelier uses none of them) transformers says once per class that it falls back to
# the PIL one. That is not about the user's work, so this one notice is dropped before the first import, and
# every other transformers message still shows.
TORCHVISION_FALLBACK_NOTICE = "requires torchvision (not installed); falling back to"
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: TORCHVISION_FALLBACK_NOTICE not in record.getMessage())

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
import webbrowser  # noqa: E402
from typing import Any  # noqa: E402

from aiohttp import web  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nodes.common.memory import MEMORY  # noqa: E402
from nodes.common.paths import confine  # noqa: E402

from .executor import Executor  # noqa: E402
from .folders import DataFolders  # noqa: E402
from .json_io import parse_json  # noqa: E402
from .limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_OPTION, Limits, bind_limits  # noqa: E402
from .node_info import input_specs  # noqa: E402
from .registry import node_classes  # noqa: E402
from .security import LOOPBACK_HOSTS, is_loopback  # noqa: E402
from .server import create_app  # noqa: E402
from .server_state import MAX_UPLOAD_BYTES, RaySettings, ServerConfig  # noqa: E402
from .validation import ancestors  # noqa: E402
from .workflow import WorkflowError, is_ui_workflow, ui_to_api  # noqa: E402

logger = logging.getLogger(__name__)

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_PORT = 8188  # ComfyUI's, so existing ComfyUI clients and scripts find us
WILDCARD_ADDRESSES = ("0.0.0.0", "::")
QUEUE_FILE = "queue.sqlite3"  # in the data folder, beside input/ and output/: the queue and history of `serve`


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]  # a bare `python -m web` starts the editor
    parser = argparse.ArgumentParser(prog="python -m web", description="Atelier: the editor's server, or "
                                     "workflows run headlessly.")
    commands = parser.add_subparsers(dest="command", required=True)
    folders = argparse.ArgumentParser(add_help=False)  # what both commands take
    folders.add_argument("--data-dir", default="data",
                         help="folder holding input/, output/, temp/, user/ and the server's queue and history "
                              "(queue.sqlite3)")
    folders.add_argument("--models-dir", default="models", help="folder laid out like ComfyUI's models/")
    folders.add_argument("--verbose", action="store_true", help="log engine and server details")
    folders.add_argument(MAX_PIXELS_OPTION, type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                         help=f"pixel budget of an image or latent batch, batch × height × width "
                              f"(default {DEFAULT_MAX_PIXELS}, one 16384² image)")
    for device, default in (("cpu", "the machine's memory less 4 GB"), ("gpu", "the GPU's memory less 2 GB")):
        folders.add_argument(f"--{device}-memory", type=float, metavar="GB",
                             help=f"budget for the models, LoRAs, encoders and feature caches kept in {device.upper()} "
                                  f"memory; the least recently used go first (default: {default})")
    serve = commands.add_parser("serve", parents=[folders], help="start the editor's server (the default)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    serve.add_argument("--listen", default="127.0.0.1", metavar="ADDR",
                       help="address to listen on; beyond loopback every request needs the printed token")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="another host name browsers may use to reach the server (repeatable)")
    serve.add_argument("--max-upload-mb", type=int, default=MAX_UPLOAD_BYTES >> 20,
                       help=f"largest upload accepted, in MB (default {MAX_UPLOAD_BYTES >> 20})")
    serve.add_argument("--open", action="store_true", help="open the editor in the default browser")
    serve.add_argument("--ray", metavar="auto|ADDRESS",
                       help="run prompts on Ray workers: 'auto' joins this machine's cluster (ray start --head) or "
                            "starts one on loopback; ADDRESS joins that cluster (pip install -r requirements-ray.txt)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="Ray workers (default: one per GPU of the cluster, or one on the CPU)")
    run = commands.add_parser("run", parents=[folders],
                              help="run a workflow file (API or UI format) and save its outputs")
    run.add_argument("workflow", help="path of the workflow .json file")
    run.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override an input; NODE is a node id or title, VALUE is JSON or plain text")
    run.add_argument("--output-dir", help="where saved images go (default: DATA_DIR/output)")
    args = parser.parse_args(argv)
    if args.command == "serve" and args.workers is not None and args.ray is None:
        parser.error("--workers needs --ray")
    if args.command == "serve" and args.ray is not None and importlib.util.find_spec("ray") is None:
        parser.error("--ray needs Ray: pip install -r requirements-ray.txt (or python install.py --ray)")
    for device, budget in (("cpu", args.cpu_memory), ("gpu", args.gpu_memory)):
        if budget is not None and budget <= 0:
            parser.error(f"--{device}-memory must be a positive number of GB; got {budget}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    set_memory_budgets(args.cpu_memory, args.gpu_memory)
    return serve_editor(args) if args.command == "serve" else run_workflow(args)


def set_memory_budgets(cpu_gb: float | None, gpu_gb: float | None) -> None:
    """This process's memory manager budgets (``nodes.common.memory``), where given; each GPU gets the GPU one."""
    if cpu_gb is not None:
        MEMORY.set_budget("cpu", int(cpu_gb * 2**30))
    if gpu_gb is not None:
        for index in range(torch.cuda.device_count()):
            MEMORY.set_budget(f"cuda:{index}", int(gpu_gb * 2**30))


def say(line: str) -> None:
    """Write one result line on stdout without breaking the progress bars on stderr."""
    tqdm.write(line, file=sys.stdout)


def serve_editor(args: argparse.Namespace) -> int:
    loopback = is_loopback(args.listen)
    token = None if loopback else secrets.token_urlsafe(24)
    allowed = set(LOOPBACK_HOSTS) | set(args.allow_host)
    if args.listen not in WILDCARD_ADDRESSES:
        allowed.add(args.listen)
    config = ServerConfig(folders=DataFolders.under(args.data_dir), models_dir=os.path.realpath(args.models_dir),
                          allowed_hosts=frozenset(allowed), token=token, max_upload_bytes=args.max_upload_mb << 20,
                          limits=Limits(args.max_pixels), queue_file=os.path.join(args.data_dir, QUEUE_FILE),
                          ray=None if args.ray is None else RaySettings(args.ray, args.workers))
    shown_host = "127.0.0.1" if loopback or args.listen in WILDCARD_ADDRESSES else args.listen
    url = f"http://{shown_host}:{args.port}/" + (f"?token={token}" if token else "")
    app = create_app(config)

    async def announce(_app) -> None:
        say(f"Atelier is running: open {url}")
        if token and args.listen in WILDCARD_ADDRESSES:
            say("Listening on every interface: start with --allow-host NAME for each host name or address "
                "that browsers use to reach this machine.")
        if args.open:
            webbrowser.open(url)

    app.on_startup.append(announce)
    web.run_app(app, host=args.listen, port=args.port, print=None)
    return 0


def run_workflow(args: argparse.Namespace) -> int:
    folders = DataFolders.under(args.data_dir, args.output_dir)
    classes = bind_limits(node_classes(folders, args.models_dir), Limits(args.max_pixels))
    try:
        prompt, extra_data = load_workflow(args.workflow, classes)
    except WorkflowError as error:  # a workflow that cannot run, as one that fails validation
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        for assignment in args.set:
            apply_override(prompt, assignment, classes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    executor = Executor(classes)
    checked = executor.validate(prompt)
    if checked.node_errors or checked.error:
        print(format_errors(checked.error, checked.node_errors, checked.prompt), file=sys.stderr)
    if not checked.ok:
        return EXIT_FAILED

    needed = set().union(*(ancestors(checked.prompt, output) for output in checked.outputs))
    progress = _Progress(len(needed), checked.prompt, folders)
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("result", executor.execute(
        checked.prompt, uuid.uuid4().hex, checked.outputs, progress.on_event, extra_data)))
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        executor.interrupt()
        worker.join()
    finally:
        progress.close()
    result = outcome["result"]
    if result.status == "interrupted":
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if result.status == "success" else EXIT_FAILED


def load_workflow(path: str, classes: dict[str, type]) -> tuple[dict, dict]:
    """Read a workflow file as an API prompt, plus the ``extra_data`` that saved images embed.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not JSON.
        WorkflowError: it is a UI workflow that cannot be converted (malformed, or with a subgraph).
    """
    with open(path, "rb") as file:
        try:
            data = parse_json(file.read())
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
    if is_ui_workflow(data):
        try:
            return ui_to_api(data, classes), {"extra_pnginfo": {"workflow": data}}
        except WorkflowError as error:
            raise WorkflowError(f"{path}: {error}") from error
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):  # the body of a POST /prompt
        data = data["prompt"]
    return data, {}


def apply_override(prompt: dict, assignment: str, classes: dict[str, type]) -> None:
    """Apply one ``NODE.INPUT=VALUE``, where NODE is a node id or a node title.

    Example:
        >>> prompt = {"4": {"class_type": "EmptyImage", "inputs": {"width": 64}, "_meta": {"title": "Canvas"}}}
        >>> from web.builtin_nodes import EmptyImage
        >>> apply_override(prompt, "Canvas.width=128", {"EmptyImage": EmptyImage})
        >>> prompt["4"]["inputs"]["width"]
        128
    """
    target, equals, text = assignment.partition("=")
    node, dot, name = target.rpartition(".")
    if not equals or not dot or not node or not name:
        raise ValueError(f"--set takes NODE.INPUT=VALUE; got {assignment!r}")
    malformed = [i for i, n in prompt.items() if not isinstance(n, dict) or not isinstance(n.get("class_type"), str)
                 or not isinstance(n.get("inputs"), dict)]
    if malformed:
        raise ValueError(f"--set {assignment!r}: the prompt's nodes {malformed} are not objects with a class_type "
                         "and inputs")
    if node in prompt:
        node_id = node
    else:
        matches = [i for i, n in prompt.items() if n.get("_meta", {}).get("title") == node]
        if len(matches) != 1:
            known = ", ".join(f"{i} ({n.get('_meta', {}).get('title', n['class_type'])})" for i, n in prompt.items())
            reason = "no node" if not matches else f"{len(matches)} nodes ({', '.join(matches)})"
            raise ValueError(f"--set {assignment!r}: {reason} has the id or title {node!r}; nodes: {known}")
        node_id = matches[0]
    class_type = prompt[node_id]["class_type"]
    if class_type not in classes:
        raise ValueError(f"--set {assignment!r}: node {node_id} has the unknown type {class_type!r}")
    names = [spec.name for spec in input_specs(classes[class_type]) if spec.section != "hidden"]
    if name not in names:
        raise ValueError(f"--set {assignment!r}: {class_type} has no input {name!r}; it has {names}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    prompt[node_id]["inputs"][name] = value


def format_errors(error: dict | None, node_errors: dict, prompt: dict) -> str:
    """The validation result as readable lines, one per node error."""
    lines = [f"error: {error['message']}"] if error else []
    if error and not node_errors and error.get("details"):
        lines.append(f"  {error['details']}")
    for node_id, entry in node_errors.items():
        title = prompt.get(node_id, {}).get("_meta", {}).get("title")
        label = f"node {node_id} ({entry['class_type']}{', ' + repr(title) if title else ''})"
        for item in entry["errors"]:
            lines.append(f"  {label}: {item['message']}: {item['details']}")
    return "\n".join(lines)


class _Progress:
    """Two bars on stderr, nodes done and the running node's steps, plus the ``output:`` lines on stdout."""

    def __init__(self, total_nodes: int, prompt: dict, folders: DataFolders):
        self.prompt = prompt
        self.folders = folders
        self.nodes = tqdm(total=total_nodes, desc="nodes", unit="node", position=0, file=sys.stderr)
        self.steps: tqdm | None = None

    def on_event(self, event: str, data: dict) -> None:
        if event == "execution_cached":
            self.nodes.update(len(data["nodes"]))
        elif event == "executing":
            self._close_steps()
            self.nodes.set_postfix_str(f"{data['node']} {self.prompt[data['node']]['class_type']}")
            self.nodes.update(1)
        elif event == "progress":
            if self.steps is None:
                self.steps = tqdm(total=data["max"], desc="steps", unit="step", position=1, leave=False,
                                  file=sys.stderr)
            self.steps.total = data["max"]
            self.steps.n = data["value"]
            self.steps.refresh()
        elif event == "executed":
            for image in (data["output"] or {}).get("images", []):
                if image.get("type") == "output":
                    say(f"output: {confine(self.folders.output, os.path.join(image['subfolder'], image['filename']))}")
        elif event == "execution_error":
            self._close_steps()
            message = f"error in node {data['node_id']} ({data['node_type']}): {data['exception_type']}: " \
                        f"{data['exception_message']}"
            tqdm.write(message, file=sys.stderr)

    def _close_steps(self) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None

    def close(self) -> None:
        self._close_steps()
        self.nodes.close()
