"""The editor in a real browser: the official ComfyUI frontend on our server, driven by headless Chromium.

One server (``python -m web serve`` on a free loopback port, with an empty data folder, so a brand-new user) and
one Chromium for the whole module. The tests run in file order on the same page, as a user would: the example
workflow opens, a node is added and connected, Run shows its image, the workflow is saved and reopened, an
output PNG dropped on the canvas brings its graph back, and ComfyUI's own default.json dropped there runs. Then a
second, new browser profile comes back as the same (now returning) user and must open a graph that runs. The last
test checks the first page's console and every HTTP answer.

Chromium is Debian's (``apt-get install chromium``), driven by the ``playwright`` package; ``playwright install``
is never needed. Every request that does not go to loopback is aborted and listed. Screenshots go to
``tests/e2e/screenshots/`` (gitignored).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.resources
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from comfyui_host import free_port

try:
    from playwright.sync_api import Error as PlaywrightError, TimeoutError as PlaywrightTimeoutError, expect, \
        sync_playwright
except ImportError:  # reported by the chromium fixture, with how to install it
    sync_playwright = None

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "tests" / "e2e" / "screenshots"
EXAMPLE_NAME = "text_to_image"  # the first graph: the embedded model draws a batch of 64×64 images
EXAMPLE = json.loads((ROOT / "workflows" / f"{EXAMPLE_NAME}.json").read_text(encoding="utf-8"))
SKIP_VARIABLE = "ATELIER_SKIP_BROWSER"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SERVER_START_TIMEOUT_S = 240  # importing torch and the nodes on a loaded 2-core machine takes minutes
STEP_TIMEOUT_MS = 20_000  # any one wait in the page; a healthy run needs well under a second for each
RUN_TIMEOUT_MS = 600_000  # a wait that includes running the example: seconds alone, minutes on a loaded CPU
VIEWPORT = {"width": 1280, "height": 800}
SEARCH_OPEN_ATTEMPTS, SEARCH_OPEN_WAIT_MS = 3, 5_000
EMPTY_SPOT = (400, 650)  # viewport pixels below the example's nodes and left of the minimap: empty canvas
SAVED_NAME = "browser_test"
# ComfyUI's own first graph (comfyui-workflow-templates 0.1.95), and the checkpoint it names, written here with
# random weights in SD1.5's layout at reduced width (the file's 512 px and 20 steps stay; full width would take
# minutes on a CPU).
COMFY_DEFAULT = json.loads((importlib.resources.files("comfyui_workflow_templates") / "templates" / "default.json")
                           .read_text(encoding="utf-8"))
COMFY_CHECKPOINT, COMFY_CHECKPOINT_WIDTH = "v1-5-pruned-emaonly-fp16.safetensors", 32
COMFY_SAVE_NODE, COMFY_IMAGE_SIZE = "9", (512, 512)
NEW_WIDTH = 96  # set on the example's empty latent before Run, so the output proves the edited graph ran
LATENT_NODE, SAMPLER_NODE, DECODE_NODE, SAVE_NODE = "4", "5", "6", "7"  # the example's node ids
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]

# 4xx answers the frontend asks for and handles, each with why it is fine. Matched on path plus query.
TOLERATED_4XX = {
    r"/user\.css": "index.html links an optional user stylesheet; ComfyUI answers 404 too",
    r"/api/userdata/user\.css": "the same optional stylesheet, looked up in the user's files",
    r"/api/userdata/comfy\.templates\.json": "the core nodeTemplates extension's saved node templates; none yet",
    r"/api/userdata/workflows%2F\.index\.json": "the workflow bookmarks file, written on the first bookmark",
    r"/api/workflow_templates/atelier/[\w.-]+\.jpg":
        "template thumbnails are optional; the templates dialog draws a placeholder",
}

# Serialized graph of the live page: what the assertions compare. Links as [origin, slot, target, slot].
GRAPH_JS = """() => {
    const graph = app.graph.serialize();
    return {
        nodes: graph.nodes.map(n => ({id: String(n.id), type: n.type, widgets: n.widgets_values ?? []})),
        links: graph.links.map(l => Array.isArray(l)
            ? [String(l[1]), l[2], String(l[3]), l[4]]
            : [String(l.origin_id), l.origin_slot, String(l.target_id), l.target_slot]),
    };
}"""


def graph_summary(workflow: dict) -> dict:
    """A UI workflow's nodes (id, type, widget values) and links, in the form GRAPH_JS returns."""
    nodes = [{"id": str(n["id"]), "type": n["type"], "widgets": n.get("widgets_values") or []}
             for n in workflow["nodes"]]
    links = [[str(link[1]), link[2], str(link[3]), link[4]] for link in workflow["links"]]
    return {"nodes": nodes, "links": links}


def canonical(summary: dict) -> dict:
    """Order-independent form of a graph summary."""
    return {"nodes": sorted(summary["nodes"], key=lambda n: int(n["id"])),
            "links": sorted(summary["links"], key=lambda link: (int(link[0]), link[1], int(link[2]), link[3]))}


# --- the server and the browser ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Server:
    url: str
    data_dir: Path
    log_path: Path

    def log_tail(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, and the playwright package that drives it; missing means a failure, not a skip."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    missing = []
    if not os.access(path, os.X_OK):
        missing.append("Chromium is not installed: apt-get install chromium (Debian's package; never run "
                       "'playwright install')")
    if sync_playwright is None:
        missing.append("the playwright package is missing: pip install -r requirements-test.txt")
    if missing:
        if os.environ.get(SKIP_VARIABLE) == "1":
            pytest.skip(f"{SKIP_VARIABLE}=1 and " + "; ".join(missing))
        pytest.fail("; ".join(missing) + f" (or set {SKIP_VARIABLE}=1 to skip the browser tests)")
    return path


@pytest.fixture(scope="module")
def server(chromium: str, tmp_path_factory: pytest.TempPathFactory):
    """The real server in a subprocess, on a free loopback port, with an empty data folder (a new user) and a
    models folder holding the checkpoint that ComfyUI's default.json names."""
    from nodes.models.export import write_random_single_file

    data_dir = tmp_path_factory.mktemp("browser_data")
    models_dir = tmp_path_factory.mktemp("browser_models")
    (models_dir / "checkpoints").mkdir()
    write_random_single_file("sd1", models_dir / "checkpoints" / COMFY_CHECKPOINT, width=COMFY_CHECKPOINT_WIDTH)
    log_path = data_dir.parent / f"{data_dir.name}_server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "web", "serve", "--port", str(port), "--listen", "127.0.0.1",
             "--data-dir", str(data_dir), "--models-dir", str(models_dir)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    running = Server(url, data_dir, log_path)
    try:
        wait_until_ready(process, running)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_ready(process: subprocess.Popen, running: Server) -> None:
    """Poll GET /api/users until it answers 200; the wait between polls also watches the process."""
    deadline = SERVER_START_TIMEOUT_S * 10
    for _ in range(deadline):
        try:
            with urllib.request.urlopen(f"{running.url}/api/users", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        try:
            code = process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"the server exited with {code} before answering /api/users:\n{running.log_tail()}")
    pytest.fail(f"the server did not answer /api/users within {SERVER_START_TIMEOUT_S} s:\n{running.log_tail()}")


@dataclasses.dataclass
class Editor:
    """The one page of the module, what it recorded, and what earlier steps left for later ones."""

    page: object
    server: Server
    console_errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (text, location url)
    page_errors: list[str] = dataclasses.field(default_factory=list)
    bad_responses: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)  # (status, method, url)
    blocked: list[str] = dataclasses.field(default_factory=list)
    first_response: object = None
    done: set[str] = dataclasses.field(default_factory=set)
    added_node_id: str | None = None
    ran_graph: dict | None = None
    output_file: Path | None = None

    def require(self, step: str) -> None:
        if step not in self.done:
            pytest.skip(f"needs the step {step!r}, which failed or did not run")

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))

    def wait_until(self, expression: str, failure: str, arg=None, timeout_ms: int = STEP_TIMEOUT_MS) -> None:
        """Wait for a JS condition in the page; on timeout fail with ``failure``, not a bare timeout."""
        try:
            self.page.wait_for_function(expression, arg=arg, timeout=timeout_ms)
        except PlaywrightTimeoutError:
            pytest.fail(f"{failure} (waited {timeout_ms / 1000:.0f} s for {expression.strip()}); "
                        f"page errors: {self.page_errors[-3:]}; console errors: {self.console_errors[-3:]}; "
                        f"HTTP errors: {self.bad_responses[-3:]}")

    def graph(self) -> dict:
        return canonical(self.page.evaluate(GRAPH_JS))

    def to_screen(self, node_id: str, is_input: bool, slot: int) -> tuple[float, float]:
        """Viewport position of a node's slot, from litegraph's canvas coordinates."""
        x, y = self.page.evaluate("""([id, isInput, slot]) => {
            const node = app.graph.getNodeById(id);
            const offset = app.canvas.ds.convertOffsetToCanvas(node.getConnectionPos(isInput, slot));
            const box = app.canvas.canvas.getBoundingClientRect();
            return [box.left + offset[0], box.top + offset[1]];
        }""", [node_id, is_input, slot])
        return x, y


@pytest.fixture(scope="module")
def browser(chromium: str):
    """Headless Chromium for the module; each context it opens is a new browser profile (see :func:`new_context`)."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def new_context(browser, blocked: list[str]):
    """A fresh profile (no cookies, no localStorage) in which every non-loopback request is aborted and listed."""
    context = browser.new_context(service_workers="block", viewport=VIEWPORT)

    def only_loopback(route) -> None:
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    return context


@pytest.fixture(scope="module")
def editor(browser, server: Server):
    """One page opened on ``/`` as a brand-new user, with what it logs recorded."""
    blocked: list[str] = []
    context = new_context(browser, blocked)
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    session = Editor(page, server, blocked=blocked)
    page.on("console", lambda message: session.console_errors.append(
        (message.text, message.location.get("url", ""))) if message.type == "error" else None)
    page.on("pageerror", lambda error: session.page_errors.append(str(error)))
    page.on("response", lambda response: session.bad_responses.append(
        (response.status, response.request.method, response.url)) if response.status >= 400 else None)
    try:
        session.first_response = page.goto(server.url + "/")
        session.wait_until("window.app && window.app.graph && window.app.vueAppReady", "the editor did not boot")
        page.locator("#splash-loader").wait_for(state="hidden")  # it covers the canvas and eats clicks
        yield session
    finally:
        # The frontend may call external hosts (api.comfy.org and the like); list them, do not fail on them.
        logger.log(logging.WARNING if blocked else logging.INFO, "aborted requests to non-loopback hosts: %s",
                   blocked or "none")
        try:
            session.screenshot("last")
        except PlaywrightError as error:  # the screenshot only helps debugging; a dead page must not hide why
            logger.warning("no final screenshot: %s", error)
        finally:
            context.close()


# --- the steps -----------------------------------------------------------------------------------------------------

def test_new_user_is_redirected_to_the_example_workflow(editor: Editor):
    response = editor.first_response
    assert response is not None and response.ok, f"GET / failed: {response and response.status}"
    redirected = response.request.redirected_from
    assert redirected is not None and urlsplit(redirected.url).path == "/", \
        f"a new user's GET / was not redirected; it ended at {response.url}"
    query = parse_qs(urlsplit(response.url).query)
    assert query == {"template": [EXAMPLE_NAME], "source": ["atelier"]}, f"redirected to {response.url}"

    editor.wait_until("app.graph.nodes.length > 0", "the first graph is empty")
    assert editor.graph() == canonical(graph_summary(EXAMPLE)), \
        f"the first graph is not workflows/{EXAMPLE_NAME}.json (node types, widget values or links differ)"
    assert EXAMPLE_NAME in editor.page.title(), f"the active tab is {editor.page.title()!r}, not the example"
    dialogs = editor.page.locator("[role=dialog]:visible")
    assert dialogs.count() == 0, f"a dialog covers the example workflow: {dialogs.all_inner_texts()}"
    editor.screenshot("1_example_workflow")
    editor.done.add("boot")


def test_node_added_from_search_box_is_connected(editor: Editor):
    editor.require("boot")
    page = editor.page
    before = {n["id"] for n in editor.graph()["nodes"]}

    search = page.get_by_role("combobox", name="Add a node...")
    # litegraph tells a double-click from two clicks by the time between them; on a loaded machine the two
    # clicks can arrive too far apart, so a double-click that opened nothing is tried again.
    for attempt in range(SEARCH_OPEN_ATTEMPTS):
        page.mouse.dblclick(*EMPTY_SPOT)
        try:
            search.wait_for(state="visible", timeout=SEARCH_OPEN_WAIT_MS)
            break
        except PlaywrightTimeoutError:
            if attempt == SEARCH_OPEN_ATTEMPTS - 1:
                raise AssertionError(f"{SEARCH_OPEN_ATTEMPTS} double-clicks on the canvas opened no search box")
    search.fill("Preview Image")
    # The list filters as the query is typed; Enter adds the first result once it is the one asked for.
    expect(page.locator("#results-list [role=option]").first).to_have_text(re.compile(r"^Preview Image"),
                                                                           timeout=STEP_TIMEOUT_MS)
    search.press("Enter")
    search.wait_for(state="hidden")
    # The new node follows the cursor (Comfy.NodeSearchBoxImpl.FollowCursor) until a click places it.
    page.mouse.click(*EMPTY_SPOT)
    editor.wait_until("app.canvas.state.ghostNodeId == null", "a click on the canvas did not place the new node")
    added = [n for n in editor.graph()["nodes"] if n["id"] not in before]
    assert [n["type"] for n in added] == ["PreviewImage"], f"nodes added by the search box: {added}"
    node_id = added[0]["id"]

    # Drag from VAE Decode's output to the new node's input, as a user connects two nodes.
    page.mouse.move(*editor.to_screen(DECODE_NODE, False, 0))
    page.mouse.down()
    page.mouse.move(*editor.to_screen(node_id, True, 0), steps=10)
    page.mouse.up()
    assert [DECODE_NODE, 0, node_id, 0] in editor.graph()["links"], \
        f"dragging VAE Decode's output onto node {node_id}'s input made no link"
    editor.added_node_id = node_id
    editor.screenshot("2_node_added")
    editor.done.add("node")


def test_run_shows_the_output_image_in_the_node(editor: Editor):
    editor.require("node")
    page, node_id = editor.page, editor.added_node_id
    # Edit a widget so the output's size proves that the edited graph ran, not the example as shipped.
    page.evaluate("""([id, width]) => {
        const widget = app.graph.getNodeById(id).widgets.find(w => w.name === "width");
        widget.value = width;
        widget.callback?.(width);
    }""", [int(LATENT_NODE), NEW_WIDTH])
    editor.ran_graph = editor.graph()

    with page.expect_response(lambda r: urlsplit(r.url).path == "/api/prompt" and r.request.method == "POST") as info:
        page.get_by_test_id("queue-button").click()
    answer = info.value
    assert answer.status == 200, f"POST /api/prompt answered {answer.status}: {answer.text()}"
    assert answer.json()["node_errors"] == {}, f"the server refused nodes: {answer.json()['node_errors']}"

    editor.wait_until("(id) => app.nodeOutputs[id]?.images?.length > 0",
                      f"no 'executed' images reached the added node {node_id}", node_id, RUN_TIMEOUT_MS)
    editor.wait_until("(id) => app.graph.getNodeById(id).imgs?.[0]?.naturalWidth > 0",
                      f"the added node {node_id} got an output but its image did not load (GET /api/view)", node_id)
    shown = page.evaluate("(id) => { const img = app.graph.getNodeById(id).imgs[0];"
                          " return [img.naturalWidth, img.naturalHeight, img.src] }", node_id)
    [latent] = [node for node in EXAMPLE["nodes"] if str(node["id"]) == LATENT_NODE]
    expected = (NEW_WIDTH, latent["widgets_values"][1])  # the empty latent's width (edited) and height
    assert tuple(shown[:2]) == expected, f"the image in node {node_id} is {shown}"
    assert "/api/view?" in shown[2], f"the node's image does not come from /api/view: {shown[2]}"

    editor.wait_until("(id) => app.nodeOutputs[id]?.images?.length > 0", "no 'executed' images reached SaveImage",
                      SAVE_NODE)
    saved = page.evaluate("(id) => app.nodeOutputs[id].images[0]", SAVE_NODE)
    assert saved["type"] == "output" and saved["filename"].startswith(f"{EXAMPLE_NAME}_"), f"SaveImage output: {saved}"
    editor.output_file = editor.server.data_dir / "output" / saved["subfolder"] / saved["filename"]
    with Image.open(editor.output_file) as image:
        assert image.size == expected, f"{editor.output_file} is {image.size}"
    editor.screenshot("3_after_run")
    editor.done.add("run")


def test_workflow_saved_from_file_menu_reopens_from_workflows_sidebar(editor: Editor):
    editor.require("run")
    page = editor.page
    page.get_by_test_id("comfy-menu-button").click()
    page.get_by_role("menuitem", name="File").hover()
    # The accessible name carries the shortcut ("Save Ctrl + s"); "Save As" is another item.
    page.get_by_role("menuitem", name=re.compile(r"^Save(?! As)")).click()
    name_input = page.locator(".prompt-dialog-content input")
    name_input.fill(SAVED_NAME)
    with page.expect_response(lambda r: r.request.method == "POST"
                              and f"/api/userdata/workflows%2F{SAVED_NAME}.json" in r.url) as info:
        name_input.press("Enter")
    assert info.value.status == 200, f"saving answered {info.value.status}: {info.value.text()}"
    editor.wait_until("(name) => document.title.startsWith(name + ' - ')",
                      "the tab did not take the saved workflow's name", SAVED_NAME)

    saved_file = editor.server.data_dir / "user" / "default" / "workflows" / f"{SAVED_NAME}.json"
    assert saved_file.is_file(), f"{saved_file} was not written"
    try:
        saved = canonical(graph_summary(json.loads(saved_file.read_text(encoding="utf-8"))))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        pytest.fail(f"{saved_file} is not the workflow the editor sent: {error!r}")
    assert saved == editor.graph(), "the saved file differs from the graph in the editor"

    page.evaluate("() => app.extensionManager.command.execute('Workspace.CloseWorkflow')")
    editor.wait_until("(name) => !document.title.startsWith(name + ' - ')",
                      "Workspace.CloseWorkflow did not close the saved workflow", SAVED_NAME)
    assert editor.added_node_id not in {n["id"] for n in editor.graph()["nodes"]}, "the saved workflow is still open"

    page.get_by_test_id("workflows-tab-button").click()
    item = page.locator(".comfyui-workflows-browse").get_by_role("treeitem", name=SAVED_NAME)
    with page.expect_response(lambda r: r.request.method == "GET"
                              and f"/api/userdata/workflows%2F{SAVED_NAME}.json" in r.url) as info:
        item.click()
    assert info.value.status == 200, f"reading the saved workflow answered {info.value.status}"
    editor.wait_until("(name) => document.title.startsWith(name + ' - ')",
                      "clicking the saved workflow in the Workflows sidebar did not open it", SAVED_NAME)
    assert editor.graph() == saved, "the reopened workflow differs from the saved file"
    editor.screenshot("4_reopened")
    page.get_by_test_id("workflows-tab-button").click()
    editor.done.add("save")


def test_dropping_a_saved_output_png_restores_its_graph(editor: Editor):
    editor.require("run")
    page = editor.page
    data = editor.output_file.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        assert "workflow" in image.text, f"{editor.output_file.name} carries no workflow: {sorted(image.text)}"

    page.evaluate("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    editor.wait_until("app.graph.nodes.length == 0", "Comfy.NewBlankWorkflow did not open an empty graph")
    page.evaluate("""([name, encoded]) => {
        const bytes = Uint8Array.from(atob(encoded), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        const canvas = document.getElementById("graph-canvas");
        const box = canvas.getBoundingClientRect();
        canvas.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true,
                                                    clientX: box.x + box.width / 2, clientY: box.y + box.height / 2}));
    }""", [editor.output_file.name, base64.b64encode(data).decode()])
    editor.wait_until("app.graph.nodes.length > 0", f"dropping {editor.output_file.name} loaded no graph")
    assert editor.graph() == editor.ran_graph, "the dropped PNG restored a different graph than the one that ran"
    editor.screenshot("5_png_dropped")
    editor.done.add("drop")


def test_comfyui_default_json_dropped_on_the_canvas_runs_and_shows_its_image(editor: Editor):
    """ComfyUI's default.json, as a user drops the file from ComfyUI's templates: it loads unchanged (its SaveImage
    has no widgets_values), runs, and its 512×512 image shows in its Save Image node."""
    editor.require("boot")
    page = editor.page
    page.evaluate("""(text) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([text], "default.json", {type: "application/json"}));
        const canvas = document.getElementById("graph-canvas");
        const box = canvas.getBoundingClientRect();
        canvas.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true,
                                                    clientX: box.x + box.width / 2, clientY: box.y + box.height / 2}));
    }""", json.dumps(COMFY_DEFAULT))
    editor.wait_until("(id) => app.graph.getNodeById(id)?.type === 'SaveImage'",
                      "dropping default.json loaded no graph", int(COMFY_SAVE_NODE))
    assert {n["id"]: n["type"] for n in editor.graph()["nodes"]} == \
        {str(n["id"]): n["type"] for n in COMFY_DEFAULT["nodes"]}, "the dropped graph is not default.json"

    with page.expect_response(lambda r: urlsplit(r.url).path == "/api/prompt" and r.request.method == "POST") as info:
        page.get_by_test_id("queue-button").click()
    assert info.value.status == 200, f"POST /api/prompt answered {info.value.status}: {info.value.text()}"
    assert info.value.json()["node_errors"] == {}, f"the server refused nodes: {info.value.json()['node_errors']}"
    editor.wait_until("(id) => app.graph.getNodeById(id).imgs?.[0]?.naturalWidth > 0",
                      "default.json's Save Image node shows no image", COMFY_SAVE_NODE, RUN_TIMEOUT_MS)
    shown = page.evaluate("(id) => { const img = app.graph.getNodeById(id).imgs[0];"
                          " return [img.naturalWidth, img.naturalHeight] }", COMFY_SAVE_NODE)
    assert tuple(shown) == COMFY_IMAGE_SIZE, f"default.json's image is {shown}"
    editor.screenshot("6_comfyui_default_json")


def test_our_extension_colours_atelier_nodes(editor: Editor):
    """js/atelier.js is served, listed, imported and registered: a new Atelier node gets the pack's colours."""
    editor.require("boot")
    colours = editor.page.evaluate("""() => {
        const node = LiteGraph.createNode("AtelierSyntheticPanorama");
        const plain = LiteGraph.createNode("EmptyImage");
        return [node.color, node.bgcolor, plain.color ?? null];
    }""")
    assert colours == ["#2f4a5c", "#1d2f3b", None], f"(Atelier color, bgcolor, a core node's color): {colours}"


def test_our_widgets_show_their_nodes_results(editor: Editor):
    """js/watermark.js, tile_map.js and correspondence.js, as the frontend loaded them, take their nodes' messages:
    the detector's verdict, the tiled nodes' progress (cleared when the prompt ends), the matcher's picture and a
    hover over image A; every one then draws without an error."""
    editor.require("boot")
    seen = editor.page.evaluate("""async () => {
        const { api } = await import("/scripts/api.js");
        const ctx = document.createElement("canvas").getContext("2d");
        const add = (type) => { const node = LiteGraph.createNode(type); app.graph.add(node); return node; };

        const detector = add("AtelierDetectWatermark");
        detector.onExecuted({text: ["watermarked, p = 1e-09", "no watermark, p = 0.41"]});
        detector.onDrawForeground(ctx);

        const tiled = add("AtelierTiledSample");
        api.dispatchEvent(new CustomEvent("progress", {detail: {node: String(tiled.id), value: 3, max: 16}}));
        const during = {...tiled.atelierTileMap};
        tiled.onDrawForeground(ctx);
        api.dispatchEvent(new CustomEvent("executing", {detail: null}));

        const matcher = add("AtelierMatchFeatures");
        const side_by_side = document.createElement("canvas");
        [side_by_side.width, side_by_side.height] = [8, 4];
        matcher.onExecuted({atelier_correspondence: [{picture: side_by_side.toDataURL(), scale: 1, size_a: [4, 4],
                                                      size_b: [4, 4], grid: [1, 1], targets: [1.5, 2.5],
                                                      confidence: [0.9]}]});
        await new Promise((resolve) => { const poll = () => matcher.atelierMatch ? resolve() : setTimeout(poll, 20);
                                         poll(); });
        const scale = (matcher.size[0] - 12) / 8, top = (matcher.widgets?.length ?? 0) * 24 + 36;
        matcher.onMouseMove({}, [6 + 2 * scale, top + 2 * scale]);  // the centre of image A's pixel (1.5, 1.5)
        matcher.onDrawForeground(ctx);

        const seen = {verdict: detector.atelierVerdict, during, after: tiled.atelierTileMap ?? null,
                      hover: matcher.atelierHover, grew: matcher.size[1] > top};
        for (const node of [detector, tiled, matcher]) app.graph.remove(node);
        return seen;
    }""")
    assert seen["verdict"] == ["watermarked, p = 1e-09", "no watermark, p = 0.41"], seen
    assert seen["during"] == {"value": 3, "max": 16} and seen["after"] is None, seen
    assert seen["hover"] == pytest.approx([1.5, 1.5]) and seen["grew"], seen


def test_panorama_viewer_opens_on_a_2_to_1_output_only(editor: Editor):
    """js/panorama_viewer.js: a Preview Image node that shows a 2:1 image gets the drag-to-look view, read back
    through /view; a square image gets none."""
    editor.require("boot")
    output = editor.server.data_dir / "output"
    output.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 16), (200, 40, 40)).save(output / "viewer_panorama.png")
    Image.new("RGB", (16, 16), (40, 40, 200)).save(output / "viewer_square.png")
    widths = editor.page.evaluate("""async () => {
        const show = async (filename) => {
            const node = LiteGraph.createNode("PreviewImage");
            app.graph.add(node);
            node.onExecuted({images: [{filename, subfolder: "", type: "output"}]});
            for (let waited = 0; waited < 5000 && !node.atelierPanorama?.source; waited += 50) {
                await new Promise((resolve) => setTimeout(resolve, 50));
            }
            const width = node.atelierPanorama?.source?.width ?? null;
            app.graph.remove(node);
            return width;
        };
        return [await show("viewer_panorama.png"), await show("viewer_square.png")];
    }""")
    assert widths == [32, None], f"(2:1 panorama, square image) source widths: {widths}"


def test_a_new_browser_of_a_returning_user_opens_a_graph_that_runs(browser, server: Server):
    """A returning user (settings saved, tutorial done) in a new browser: no redirect and no stored graph, so the
    frontend falls back on its built-in default graph, whose nodes (UNETLoader, ...) this server lacks. js/atelier.js
    puts the example workflow in its place, and it runs, its sampler's progress bar filling step by step from the
    server's coalesced progress_state (no bar left once the run ends); "Load Default Workflow" gives the example
    too."""
    settings_path = server.data_dir / "user" / "default" / "comfy.settings.json"
    settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.exists() else {}
    settings_path.parent.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps({**settings, "Comfy.TutorialCompleted": True}), encoding="utf-8")
    context = new_context(browser, [])
    try:
        session = Editor(context.new_page(), server)
        page = session.page
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.on("pageerror", lambda error: session.page_errors.append(str(error)))
        response = page.goto(server.url + "/")
        assert response.ok and response.request.redirected_from is None, \
            f"a returning user's GET / answered {response.status} at {response.url}"
        session.wait_until("window.app && window.app.graph && window.app.vueAppReady", "the editor did not boot")
        page.locator("#splash-loader").wait_for(state="hidden")
        session.wait_until("app.graph.nodes.length > 0", "the editor opened an empty graph")
        missing = page.evaluate("() => app.graph.nodes.map(n => n.type)"
                                ".filter(t => !(t in LiteGraph.registered_node_types))")
        assert missing == [], f"the editor opened on node types this server lacks: {missing}"
        assert session.graph() == canonical(graph_summary(EXAMPLE)), \
            f"the first graph is not workflows/{EXAMPLE_NAME}.json"
        session.screenshot("7_returning_user_new_browser")

        # One image in 4 steps is enough to see the bar move, and keeps the run short on a loaded CPU.
        page.evaluate("""([latent, sampler]) => {
            for (const [id, name, value] of [[latent, "batch_size", 1], [sampler, "steps", 4]]) {
                const widget = app.graph.getNodeById(id).widgets.find(w => w.name === name);
                widget.value = value;
                widget.callback?.(value);
            }
        }""", [int(LATENT_NODE), int(SAMPLER_NODE)])
        # The sampler node's progress bar (litegraph's node.progress, which the frontend sets from progress_state)
        # as the page draws it, sampled every 10 ms through the run.
        page.evaluate("""(id) => {
            window.atelierTestBars = [];
            window.atelierTestSampler = setInterval(() => {
                const bar = app.graph.getNodeById(id)?.progress;
                if (bar != null) window.atelierTestBars.push(bar);
            }, 10);
        }""", int(SAMPLER_NODE))
        with page.expect_response(lambda r: urlsplit(r.url).path == "/api/prompt"
                                  and r.request.method == "POST") as info:
            page.get_by_test_id("queue-button").click()
        assert info.value.status == 200, f"POST /api/prompt answered {info.value.status}: {info.value.text()}"
        session.wait_until("(id) => app.nodeOutputs[id]?.images?.length > 0", "the example's run showed no image",
                           SAVE_NODE, RUN_TIMEOUT_MS)
        session.wait_until("app.graph.nodes.every(n => n.progress == null)", "a progress bar stayed after the run")
        bars = page.evaluate("() => { clearInterval(window.atelierTestSampler); return window.atelierTestBars; }")
        assert any(0 < bar < 1 for bar in bars), f"the sampler's bar never showed a step in between: {bars}"
        assert bars == sorted(bars), f"the sampler's bar went backwards: {bars}"

        page.evaluate("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
        session.wait_until("app.graph.nodes.length == 0", "Comfy.NewBlankWorkflow did not open an empty graph")
        page.evaluate("() => app.extensionManager.command.execute('Comfy.LoadDefaultWorkflow')")
        session.wait_until("app.graph.nodes.length > 0", "Load Default Workflow opened an empty graph")
        assert session.graph() == canonical(graph_summary(EXAMPLE)), "Load Default Workflow is not the example"
        assert session.page_errors == [], f"uncaught errors in the page: {session.page_errors}"
    finally:
        context.close()


def test_no_console_errors_or_failed_responses_from_our_routes(editor: Editor):
    """Every 4xx is one the frontend asks for and handles (TOLERATED_4XX); no 5xx; no page errors."""
    server_errors = [r for r in editor.bad_responses if r[0] >= 500]
    assert server_errors == [], f"5xx answers: {server_errors}"

    def relative(url: str) -> str:
        parts = urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def tolerated(url: str) -> bool:
        return any(re.fullmatch(pattern, relative(url)) for pattern in TOLERATED_4XX)

    unexpected = [r for r in editor.bad_responses if not tolerated(r[2])]
    assert unexpected == [], f"4xx answers the frontend does not expect: {unexpected}"
    assert editor.page_errors == [], f"uncaught errors in the page: {editor.page_errors}"

    blocked_hosts = {urlsplit(url).hostname for url in editor.blocked}

    def explained(text: str, location: str) -> bool:
        """A failed load we allowed above, or anything that names a host we blocked."""
        if any(host and host in text + location for host in blocked_hosts):
            return True
        # The optional user.css answers 404 in JSON; with nosniff on every response Chrome also says it refused
        # that answer as a stylesheet.
        refused_style = re.match(r"Refused to apply style from '([^']+)'", text)
        if refused_style:
            return tolerated(refused_style.group(1))
        return text.startswith("Failed to load resource") and (
            urlsplit(location).hostname not in LOOPBACK or tolerated(location))

    ours = [(text, location) for text, location in editor.console_errors if not explained(text, location)]
    assert ours == [], f"console errors: {ours}"
