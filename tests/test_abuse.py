"""Issue 19, hardening the server: bounded memory, no stalls, no 500s, no lost uploads.

Each test here failed before its fix. Memory is measured in this process by sampling its resident set
(``/proc/self/statm``) while the work runs, so a test states a ceiling for the growth it allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import zlib

import pytest
import torch
from aiohttp import FormData
from PIL import Image

from serving import LOOPBACK, Explode, Steps, connect, messages_until_done, png_bytes, queue, solid_prompt
from test_security import raw_multipart
from web import server
from web.folders import DataFolders
from web.image_files import load_image_file, save_png_batch
from web.limits import Limits
from web.registry import node_classes
from web.server import create_app
from web.server_state import CLIENT_QUEUE_MAX_BYTES, STATE, ServerConfig

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class NotANumber:
    """An output node whose UI output holds NaN and Infinity, as a metric node's might."""

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        return {"ui": {"score": [float("nan"), float("inf"), 0.5]}}


class MissingFile:
    """Fails the way a loader does on a missing file: the message holds the file's absolute path."""

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    folders: DataFolders

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        path = os.path.join(self.folders.input, "sub", "gone.png")
        raise FileNotFoundError(f"no such file: {path}")


def make_app(root, **options):
    """An app on ``root/data`` with the test nodes, and any ServerConfig options (``limits``, ...)."""
    folders = DataFolders.under(str(root / "data"))
    config = ServerConfig(folders=folders, models_dir=str(root / "models"), allowed_hosts=LOOPBACK, **options)
    missing = type("MissingFile", (MissingFile,), {"folders": folders})
    return create_app(config, {**node_classes(folders, config.models_dir), "Steps": Steps, "Explode": Explode,
                               "NotANumber": NotANumber, "MissingFile": missing})


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    return await aiohttp_client(make_app(tmp_path))


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


class PeakResidentGrowth:
    """Samples this process's resident set every millisecond inside the block; ``growth`` is peak - start."""

    def __enter__(self):
        self.start = self.peak = resident_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, resident_bytes())
        self.growth = self.peak - self.start


async def run_prompt(client, prompt, **extra):
    """Queue ``prompt`` and return its history entry once it has finished."""
    socket = await connect(client, "runner")
    prompt_id = await queue(client, prompt, "runner", **extra)
    await messages_until_done(socket, prompt_id)
    await socket.close()
    return (await (await client.get(f"/api/history/{prompt_id}")).json())[prompt_id]


def error_message(entry) -> str:
    return next(data for event, data in entry["status"]["messages"] if event == "execution_error")["exception_message"]


def animated_png(path, frames: int, size: int) -> None:
    images = [Image.new("RGBA", (size, size), (index * 30 % 256, 90, 200, 255)) for index in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], format="PNG")


# --- 1. small inputs that take all the memory ---------------------------------------------------------------------

def test_load_image_refuses_frames_over_the_pixel_budget_before_decoding_19(tmp_path):
    path = tmp_path / "frames.png"
    animated_png(path, frames=6, size=64)
    with pytest.raises(ValueError, match=r"6 × 64 × 64 = 24576 pixels exceeds the pixel budget of 16384 .*"
                                         r"--max-pixels"):
        load_image_file(str(path), Limits(max_pixels=4 * 64 * 64))
    image, mask = load_image_file(str(path), Limits(max_pixels=6 * 64 * 64))  # the control: within budget
    assert image.shape == (6, 64, 64, 3) and mask.shape == (6, 64, 64)


def test_load_image_memory_stays_near_the_batch_size_19(tmp_path):
    path = tmp_path / "frames.png"
    animated_png(path, frames=8, size=1024)
    batch_bytes = 8 * 1024 * 1024 * (3 + 1) * 4  # float32 RGB and mask
    with PeakResidentGrowth() as memory:
        image, mask = load_image_file(str(path))
    assert image.shape == (8, 1024, 1024, 3) and mask.shape == (8, 1024, 1024)
    # Before: every frame as float32 RGB and alpha, then np.stack copied them all (about twice the batch).
    assert memory.growth < 1.4 * batch_bytes, (memory.growth, batch_bytes)


def test_save_converts_band_by_band_without_full_size_float_copies_19(tmp_path):
    images = torch.rand(1, 2048, 2048, 3)
    image_bytes = images.numel() * 4
    with PeakResidentGrowth() as memory:
        saved = save_png_batch(images, str(tmp_path), "big", "output", compress_level=0)
    assert len(saved) == 1 and Image.open(tmp_path / saved[0]["filename"]).size == (2048, 2048)
    # Before: clamp, * 255 and round made full-size float copies before the uint8 one (2.1 times the image;
    # now 0.85: the 8-bit image and its PNG).
    assert memory.growth < 1.2 * image_bytes, (memory.growth, image_bytes)


async def test_empty_image_over_the_pixel_budget_is_refused_with_the_option_to_raise_it_19(aiohttp_client, tmp_path):
    client = await aiohttp_client(make_app(tmp_path, limits=Limits(max_pixels=1 << 20)))
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 4096, "height": 4096, "batch_size": 1,
                                                           "color": 0}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}}}
    with PeakResidentGrowth() as memory:
        entry = await run_prompt(client, prompt)
    assert entry["status"]["status_str"] == "error"
    message = error_message(entry)
    assert "1 × 4096 × 4096 = 16777216 pixels exceeds the pixel budget of 1048576" in message
    assert "--max-pixels" in message
    assert memory.growth < 64 << 20  # nothing of the 200 MB image was allocated
    assert not os.listdir(tmp_path / "data" / "output")


async def test_load_image_node_over_the_budget_fails_with_the_budget_message_19(aiohttp_client, tmp_path):
    client = await aiohttp_client(make_app(tmp_path, limits=Limits(max_pixels=4 * 64 * 64)))
    animated_png(tmp_path / "data" / "input" / "frames.png", frames=30, size=64)
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "frames.png"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    entry = await run_prompt(client, prompt)
    assert "'frames.png' (30 frames) of 30 × 64 × 64" in error_message(entry)


async def test_history_is_bounded_by_bytes_as_well_as_by_count_19(aiohttp_client, tmp_path):
    client = await aiohttp_client(make_app(tmp_path, history_max_bytes=3 << 20))
    socket = await connect(client, "runner")
    padding = "x" * (1 << 20)  # 1 MB of extra_data per prompt
    with PeakResidentGrowth() as memory:
        for index in range(12):
            prompt_id = await queue(client, {"1": {"class_type": "Steps", "inputs": {"steps": 1, "pause_ms": 0}}},
                                    "runner", extra_data={"padding": padding, "index": index})
            await messages_until_done(socket, prompt_id)
    history = await (await client.get("/api/history")).json()
    assert 1 <= len(history) <= 3
    kept = [entry["prompt"][3]["index"] for entry in history.values()]
    assert kept == list(range(12 - len(kept), 12))  # the newest are kept
    assert client.app[STATE].queue.history_bytes() <= 3 << 20
    assert memory.growth < 64 << 20, memory.growth


# --- 2. one slow client freezes everyone ----------------------------------------------------------------------------

async def test_a_client_that_stops_reading_stalls_no_one_and_is_cut_off_19(client, monkeypatch):
    monkeypatch.setattr(server, "CLIENT_SEND_TIMEOUT_S", 1.0, raising=False)
    slow = await connect(client, "slow")
    stuck = asyncio.Event()

    async def never_returns(*args, **kwargs):  # a send to a client that stopped reading waits for ever
        await stuck.wait()

    slow_client = client.app[STATE].clients["slow"]
    monkeypatch.setattr(slow_client.socket, "send_str", never_returns)
    monkeypatch.setattr(slow_client.socket, "send_bytes", never_returns)
    reader = await connect(client, "reader")
    for steps in (20, 21, 22):  # every prompt broadcasts queue status to the slow client too
        prompt_id = await queue(client, {"1": {"class_type": "Steps", "inputs": {"steps": steps, "pause_ms": 0}}},
                                "reader")
        received = await messages_until_done(reader, prompt_id, timeout=20)
        assert sum(isinstance(message, bytes) for message in received) == steps  # every preview, in time
        assert "executed" in [m["type"] for m in received if isinstance(m, dict)]
        assert slow_client.queued_bytes <= CLIENT_QUEUE_MAX_BYTES
    async with asyncio.timeout(20):
        while "slow" in client.app[STATE].clients:  # cut off once a send waited past the timeout
            await asyncio.sleep(0.05)
    await slow.close()


async def test_shutdown_closes_connected_websockets_even_one_that_stopped_reading_19(aiohttp_client, tmp_path,
                                                                                      monkeypatch):
    client = await aiohttp_client(make_app(tmp_path))
    reader, stuck = await connect(client, "reader"), await connect(client, "stuck")
    never = asyncio.Event()

    async def never_returns(*args, **kwargs):
        await never.wait()

    monkeypatch.setattr(client.app[STATE].clients["stuck"].socket, "close", never_returns)
    async with asyncio.timeout(20):
        await client.server.close()  # shutdown: on_shutdown closes every socket (it raised AttributeError)
        message = await reader.receive()
    assert message.type.name == "CLOSE" and message.data == 1001  # GOING_AWAY
    assert (await stuck.receive()).type.name in ("CLOSE", "CLOSED", "ERROR")


def test_a_full_queue_drops_previews_and_progress_first_never_results_19():
    from web.server_state import Client, Outgoing
    client = Client(socket=None)
    preview = Outgoing("preview", (b"j" * (1 << 20), {}), 1 << 20)
    client.enqueue(Outgoing("executed", "{}", 2))
    for _ in range(20):
        client.enqueue(preview)
        client.enqueue(Outgoing("progress", "{}", 2))
    client.enqueue(Outgoing("execution_success", "{}", 2))
    kinds = [message.type for message in client.queue]
    assert kinds[0] == "executed" and kinds[-1] == "execution_success" and not client.stuck
    assert client.queued_bytes <= CLIENT_QUEUE_MAX_BYTES and kinds.count("preview") < 20
    for _ in range(CLIENT_QUEUE_MAX_BYTES // 1000 + 1):  # results only: nothing to drop, so the client is stuck
        client.enqueue(Outgoing("executed", "x" * 1000, 1000))
    assert client.stuck and "executed" in [message.type for message in client.queue]


# --- 3. NaN and Infinity poison the history -------------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/api/prompt", '{"prompt": %s, "number": NaN}'),
    ("/api/prompt", '{"prompt": %s, "extra_data": {"x": Infinity}}'),
    ("/api/prompt", '{"prompt": %s, "extra_data": {"x": 1e999}}'),
    ("/api/settings", "NaN"),
    ("/api/settings", '{"a": -Infinity}'),
    ("/api/settings/Comfy.X", "NaN"),
    ("/api/jobs/cancel", '{"job_ids": [NaN]}'),
])
async def test_non_finite_numbers_are_refused_and_every_reply_stays_parseable_19(client, path, body):
    response = await client.post(path, data=body.replace("%s", json.dumps(solid_prompt())),
                                 headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert "finite" in (await response.text())
    await asyncio.sleep(0.2)  # a prompt that slipped through would be in the history by now
    for route in ("/api/history", "/api/jobs", "/api/settings", "/api/queue"):
        json.loads(await (await client.get(route)).text(), parse_constant=pytest.fail)


async def test_non_finite_node_outputs_are_written_as_null_19(client):
    entry = await run_prompt(client, {"1": {"class_type": "NotANumber", "inputs": {}}})
    assert entry["outputs"]["1"]["score"] == [None, None, 0.5]
    for route in ("/api/history", "/api/jobs"):
        json.loads(await (await client.get(route)).text(), parse_constant=pytest.fail)


# --- 4. concurrent uploads lose files -------------------------------------------------------------------------------

async def test_concurrent_uploads_of_one_name_keep_every_file_19(client, tmp_path):
    uploads = [png_bytes(color=(index, 0, 0, 255)) for index in range(20)]

    async def upload(data):
        response = await client.post("/api/upload/image", data=_form(data, "same.png"))
        assert response.status == 200
        return (await response.json())["name"]

    names = await asyncio.gather(*(upload(data) for data in uploads))
    assert len(set(names)) == 20
    folder = tmp_path / "data" / "input"
    for name, data in zip(names, uploads):
        assert (folder / name).read_bytes() == data  # each reply names its own bytes
    assert len([name for name in os.listdir(folder) if not name.startswith(".")]) == 20


async def test_concurrent_userdata_writes_without_overwrite_keep_the_first_19(client, tmp_path):
    async def write(index):
        response = await client.post("/api/userdata/workflows%2Fsame.json?overwrite=false", data=f'{{"n": {index}}}')
        return response.status

    statuses = await asyncio.gather(*(write(index) for index in range(20)))
    assert sorted(statuses) == [200] + [409] * 19
    stored = json.loads((tmp_path / "data" / "user" / "default" / "workflows" / "same.json").read_text())
    assert statuses[stored["n"]] == 200  # the file holds the bytes of the one write that was told it succeeded


def _form(data: bytes, name: str, **fields) -> FormData:
    form = FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    return form


# --- 5. every bad input is a 4xx, never a 500 -----------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "1" * 5000


@pytest.mark.parametrize("body", [
    {"prompt": {"1": {"class_type": ["EmptyImage"], "inputs": {}}}},
    {"prompt": {"1": {"class_type": {"a": 1}, "inputs": {}}}},
    {"prompt": {"1": {"class_type": 3, "inputs": {}}}},
])
async def test_class_type_that_is_not_a_string_is_a_400_19(client, body):
    response = await client.post("/api/prompt", json=body)
    assert response.status == 400
    assert "class_type" in (await response.text())


@pytest.mark.parametrize("path", ["/api/prompt", "/api/queue", "/api/history", "/api/interrupt", "/api/free",
                                  "/api/settings", "/api/settings/x", "/api/jobs/cancel"])
@pytest.mark.parametrize("body", [HUGE, f'{{"number": {HUGE}}}', DEEP, '{"a":' * 1000 + "1" + "}" * 1000])
async def test_huge_integers_and_deep_nesting_are_a_400_on_every_json_route_19(client, path, body):
    response = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400, (path, response.status)


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG header announcing far more pixels than Pillow accepts, with a tiny image stream."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


async def test_decompression_bombs_are_a_400_on_upload_and_preview_19(client, tmp_path):
    response = await client.post("/api/upload/image", data=_form(bomb_png(), "bomb.png"))
    assert response.status == 400 and "bomb.png" in await response.text()
    (tmp_path / "data" / "input" / "bomb.png").write_bytes(bomb_png())
    for query in ("preview=webp;80", "channel=a"):
        response = await client.get(f"/api/view?filename=bomb.png&type=input&{query}")
        assert response.status == 400, query


async def test_view_preview_over_the_pixel_budget_is_a_400_19(aiohttp_client, tmp_path):
    client = await aiohttp_client(make_app(tmp_path, limits=Limits(max_pixels=64 * 64)))
    (tmp_path / "data" / "input" / "big.png").write_bytes(png_bytes((128, 128)))
    response = await client.get("/api/view?filename=big.png&type=input&preview=webp;80")
    assert response.status == 400 and "pixel budget" in await response.text()


@pytest.mark.parametrize("name", [".", "..", "a\x00b.png", "a\nb.png", "a\rb.png", "tab\t.png", "bell\x07.png",
                                  "del\x7f.png"])
async def test_upload_names_that_are_dots_or_hold_control_characters_are_a_400_19(client, tmp_path, name):
    body, content_type = raw_multipart(name, "")
    response = await client.post("/api/upload/image", data=body, headers={"Content-Type": content_type})
    assert response.status == 400, response.status
    assert not [entry for entry in os.listdir(tmp_path / "data" / "input") if not entry.startswith(".")]


async def test_writing_or_moving_onto_a_folder_is_a_409_19(client, tmp_path):
    user = tmp_path / "data" / "user" / "default"
    (user / "workflows").mkdir(parents=True)
    (user / "a.json").write_text("{}")
    assert (await client.post("/api/userdata/workflows", data="{}")).status == 409
    assert (await client.post("/api/userdata/workflows?overwrite=false", data="{}")).status == 409
    assert (await client.post("/api/userdata/a.json/move/workflows")).status == 409
    assert (await client.post("/api/userdata/a.json/move/workflows?overwrite=false")).status == 409
    assert (user / "a.json").read_text() == "{}" and (user / "workflows").is_dir()
    (tmp_path / "data" / "input" / "dir.png").mkdir()
    response = await client.post("/api/upload/image", data=_form(png_bytes(), "dir.png", overwrite="true"))
    assert response.status == 409


@pytest.mark.parametrize("content", ["[1, 2]", "not json", "NaN", '"text"'])
async def test_settings_file_that_is_not_a_json_object_is_a_4xx_never_a_500_19(client, tmp_path, content):
    response = await client.post("/api/userdata/comfy.settings.json", data=content)
    assert response.status == 400  # refused on the way in
    settings = tmp_path / "data" / "user" / "default" / "comfy.settings.json"
    settings.write_text(content)  # and written by hand
    for response in (await client.get("/api/settings"), await client.get("/api/settings/x"),
                     await client.post("/api/settings", json={"a": 1})):
        assert response.status == 409 and "comfy.settings.json" in await response.text()
    assert settings.read_text() == content  # nothing lost


# --- 6. smaller things ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, inline_type", [("x.svg", None), ("x.xhtml", None), ("x.html", None),
                                               ("x.png", "image/png"), ("x.webp", "image/webp")])
async def test_view_serves_only_raster_images_inline_and_never_lets_browsers_sniff_19(client, tmp_path, name,
                                                                                   inline_type):
    (tmp_path / "data" / "input" / name).write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'><script/></svg>")
    response = await client.get(f"/api/view?filename={name}&type=input")
    assert response.status == 200 and response.headers["X-Content-Type-Options"] == "nosniff"
    if inline_type:
        assert response.content_type == inline_type
        assert response.headers["Content-Disposition"].startswith("inline")
    else:
        assert response.content_type == "application/octet-stream"
        assert response.headers["Content-Disposition"].startswith("attachment")


async def test_view_of_a_file_whose_name_holds_control_characters_keeps_the_connection_19(client, tmp_path):
    (tmp_path / "data" / "input" / "a\nb\x07.png").write_bytes(png_bytes())  # stored before names were checked
    response = await client.get("/api/view?filename=a%0Ab%07.png&type=input")
    assert response.status == 200 and await response.read() == png_bytes()
    assert response.headers["Content-Disposition"] == 'inline; filename="ab.png"'


async def test_userdata_is_served_as_an_attachment_with_nosniff_19(client):
    assert (await client.post("/api/userdata/x.html", data="<script>alert(1)</script>")).status == 200
    response = await client.get("/api/userdata/x.html")
    assert response.content_type == "application/octet-stream"
    assert response.headers["Content-Disposition"].startswith("attachment")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/api/queue", "/api/userdata/missing.json", "/"):  # on every response, errors included
        assert (await client.get(path)).headers["X-Content-Type-Options"] == "nosniff"


async def test_execution_errors_show_paths_relative_to_the_data_folder_19(client, tmp_path):
    socket = await connect(client, "runner")
    prompt_id = await queue(client, {"1": {"class_type": "MissingFile", "inputs": {}}}, "runner")
    received = await messages_until_done(socket, prompt_id)
    sent = next(m["data"] for m in received if isinstance(m, dict) and m["type"] == "execution_error")
    history = await (await client.get(f"/api/history/{prompt_id}")).text()
    job = await (await client.get(f"/api/jobs/{prompt_id}")).text()
    assert sent["exception_message"] == "no such file: input/sub/gone.png"
    root = os.path.realpath(tmp_path)
    for text in (json.dumps(sent), history, job):
        assert root not in text and os.path.dirname(os.path.abspath(server.__file__)) not in text
    assert any("atelier/web/" in line for line in sent["traceback"])  # our own files, named from the program


# --- the route-wide fuzz --------------------------------------------------------------------------------------------

FUZZ_CASES = 10_000
FUZZ_SEED = 19
NAMES = ["a.png", "same.json", "x", ".", "..", "../up.json", "%2e%2e%2fup", "sub%2Fb.json", "comfy.settings.json",
         "workflows", "a%00b", "tab%09", "new%0Aline", "é.png", "", "a" * 300, "CON", "x.svg", "%ff"]
CLASS_TYPES = ["EmptyImage", "SaveImage", "PreviewImage", "LoadImage", "ImageScale", "ImageCrop", "ImageInvert",
               "Steps", "NotANumber", "Nope"]
INPUT_NAMES = ["images", "image", "width", "height", "batch_size", "color", "filename_prefix", "upscale_method",
               "crop", "x", "y", "steps", "pause_ms"]


class JsonFuzzer:
    """Random JSON text, built by hand so that it can hold what json.dumps cannot: NaN, Infinity, integers of
    thousands of digits, nesting thousands deep, lone surrogates and broken syntax."""

    def __init__(self, rng):
        self.rng = rng

    def scalar(self) -> str:
        rng = self.rng
        return rng.choice([
            "null", "true", "false", "0", "-1", "3", "7.5", "1e999", "-1e999", "NaN", "Infinity", "-Infinity",
            "1" * rng.choice([10, 4300, 4301, 20_000]), "0.1", "16384", "4096", "-0", "1e-400",
            json.dumps(rng.choice(NAMES + CLASS_TYPES + INPUT_NAMES)), '"\\ud800"', '"\\u0000"', '"a\\nb"',
            json.dumps(rng.choice(["1", "2", "x"])),
        ])

    def value(self, depth: int = 0) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.03:
            levels = rng.choice([99, 100, 101, 1000, 50_000])
            return "[" * levels + "]" * levels
        if depth > 3 or roll < 0.45:
            return self.scalar()
        if roll < 0.6:
            return "[" + ",".join(self.value(depth + 1) for _ in range(rng.randint(0, 3))) + "]"
        if roll < 0.65:
            return json.dumps([rng.choice(["1", "2", "3", "x"]), rng.randint(-1, 3)])  # a link
        return self.object(depth)

    def object(self, depth: int, keys=None) -> str:
        keys = keys or NAMES + INPUT_NAMES + ["prompt", "client_id", "number", "extra_data", "front", "delete",
                                              "clear", "job_ids", "prompt_id", "unload_models", "free_memory"]
        items = [f"{json.dumps(self.rng.choice(keys))}:{self.value(depth + 1)}" for _ in range(self.rng.randint(0, 4))]
        return "{" + ",".join(items) + "}"

    def prompt(self) -> str:
        nodes = []
        for node_id in self.rng.sample(["1", "2", "3"], self.rng.randint(0, 3)):
            class_type = self.rng.choice([json.dumps(self.rng.choice(CLASS_TYPES)), self.value(2)])
            inputs = self.object(1, INPUT_NAMES)
            nodes.append(f'"{node_id}":{{"class_type":{class_type},"inputs":{inputs}}}')
        return "{" + ",".join(nodes) + "}"

    def body(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            return rng.choice(["", "{", "[1,", '{"a":}', "\xff\xfe", "null", '"text"', "[]"])
        if roll < 0.5:
            fields = [f'"prompt":{self.prompt() if rng.random() < 0.8 else self.value(1)}']
            for key in ("client_id", "number", "extra_data", "front", "prompt_id", "partial_execution_targets"):
                if rng.random() < 0.3:
                    fields.append(f'"{key}":{self.value(1)}')
            return "{" + ",".join(fields) + "}"
        return self.value() if roll < 0.7 else self.object(0)


def fuzz_request(rng, fuzzer: JsonFuzzer) -> tuple[str, str, dict]:
    """One random request: method, path with query, and aiohttp request options."""
    name, other = rng.choice(NAMES) or "x", rng.choice(NAMES) or "y"
    flag = rng.choice(["", "?overwrite=false", "?overwrite=true&full_info=true", "?full_info=1"])
    json_routes = ["/prompt", "/queue", "/history", "/interrupt", "/free", "/settings", f"/settings/{name}",
                   "/jobs/cancel", f"/jobs/{name}/cancel", "/users"]
    roll = rng.random()  # uploads are a sixth of the cases: each one is written and fsynced
    if roll < 0.6:
        headers = {"Content-Type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])}
        return "POST", rng.choice(json_routes), {"data": fuzzer.body().encode("utf-8", "surrogatepass"),
                                                 "headers": headers}
    if roll < 0.75:
        body = rng.choice([fuzzer.body(), fuzzer.object(0), "{}", '{"a": 1}', "[1, 2]", "NaN"])
        method, path = rng.choice([("POST", f"/userdata/{name}{flag}"),
                                   ("POST", f"/userdata/{name}/move/{other}{flag}"), ("DELETE", f"/userdata/{name}")])
        return method, path, {"data": body.encode("utf-8", "surrogatepass")}
    if roll < 0.8:  # multipart written by hand: aiohttp's client refuses control characters in a file name
        body, content_type = raw_multipart(rng.choice(["a\x00.png", "a\n.png", ".", " ", "ok.png", "é.png"]),
                                           rng.choice(["", "../x", "s\x01", "sub"]))
        return "POST", rng.choice(["/upload/image", "/upload/mask"]), {"data": body,
                                                                      "headers": {"Content-Type": content_type}}
    if roll < 0.9:
        form = FormData()
        image = rng.choice([png_bytes(), bomb_png(), b"not an image", b"", png_bytes((70, 70))])
        filename = rng.choice([n for n in NAMES if n] + ["cat.png", "a\\b.png"])
        form.add_field(rng.choice(["image", "file", "mask"]), image, filename=filename, content_type="image/png")
        for key in rng.sample(["type", "subfolder", "overwrite", "original_ref"], rng.randint(0, 4)):
            form.add_field(key, rng.choice(["input", "output", "temp", "bad", "../x", "true", "", "sub",
                                            fuzzer.object(0), '{"filename": "cat.png"}']))
        return "POST", rng.choice(["/upload/image", "/upload/mask"]), {"data": form}
    pick = rng.choice
    query = pick([f"/view?filename={name}&type={pick(['input', 'output', 'x', ''])}&subfolder={other}"
                  f"&preview={pick(['webp;90', 'jpeg;x', 'gif', ''])}&channel={pick(['rgba', 'rgb', 'a', 'z'])}",
                  f"/history?max_items={pick(['1', '-5', 'x', '9' * 5000])}&offset={pick(['0', '-1'])}",
                  f"/jobs?status={pick(['pending', 'x', 'completed,failed'])}&limit={pick(['1', '-1', 'z'])}",
                  f"/userdata?dir={name}&recurse=true&split={pick(['true', '0'])}", f"/v2/userdata?path={name}",
                  f"/settings/{name}", f"/object_info/{name}", f"/jobs/{name}", f"/history/{name}",
                  f"/models/{name}", f"/experiment/models/{name}", f"/userdata/{name}", f"/internal/files/{name}"])
    return "GET", query, {}


async def test_route_wide_fuzz_never_gets_a_server_error_19(aiohttp_client, tmp_path):
    """10,000 random requests over every JSON and multipart route (and the GET routes that read names and
    numbers): every answer is below 500, and the server still answers afterwards. The pixel budget is small, so
    a fuzzed prompt that happens to be valid runs quickly."""
    import random
    client = await aiohttp_client(make_app(tmp_path, limits=Limits(max_pixels=1 << 16)))
    (tmp_path / "data" / "input" / "cat.png").write_bytes(png_bytes())
    rng = random.Random(FUZZ_SEED)
    fuzzer = JsonFuzzer(rng)
    server_errors, statuses = [], {}
    for _ in range(FUZZ_CASES):
        method, path, options = fuzz_request(rng, fuzzer)
        async with client.request(method, "/api" + path if rng.random() < 0.5 else path, **options) as response:
            await response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status >= 500:
                server_errors.append((method, path[:120], response.status))
    assert server_errors == [], (len(server_errors), server_errors[:10])
    assert sum(statuses.values()) == FUZZ_CASES and len(statuses) > 5  # the fuzz reached many outcomes
    assert (await client.get("/api/queue")).status == 200
