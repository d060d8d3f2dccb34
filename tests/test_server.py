"""The server's routes and websocket, through aiohttp's test client on a real loopback server."""

import dataclasses
import io
import json
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image

from nodes.correspondence.cache import FEATURE_CACHE
from nodes.correspondence.features import FeatureMaps
from serving import Steps, connect, make_app, messages_until_done, png_bytes, queue, solid_prompt
from web import server
from web.server import UUID_RE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    return await aiohttp_client(make_app(tmp_path))


def types_of(messages):
    return [m["type"] for m in messages if isinstance(m, dict)]


# --- boot routes ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "/api"])
@pytest.mark.parametrize("path, expected", [
    ("/users", {"storage": "server", "migrated": True}),
    ("/embeddings", []),
    ("/i18n", {}),
    ("/global_subgraphs", {}),
    ("/extensions", [f"/extensions/atelier/{name}.js" for name in ("atelier", "correspondence", "panorama_viewer",
                                                                   "tile_map", "watermark")]),
    ("/workflow_templates", {"atelier": ["adcsr", "aptp_experts", "correspondence", "diffdis", "diffeditor",
                                         "faster_diffusion", "feature_inheritance", "hypersd", "image_basics",
                                         "instaflow", "koala", "lora_when_ready",
                                         "magicface", "noisediffusion", "noiseshift", "panorama_superres",
                                         "panorama_tangent", "preserve_unmasked", "prompt_router",
                                         "rectified_diffusion", "sada", "seamless_tiling", "speedupnet",
                                         "stablenormal", "text_to_image", "tiled_16k", "tstitch", "tvt", "watermark"]}),
    ("/prompt", {"exec_info": {"queue_remaining": 0}}),
    ("/queue", {"queue_running": [], "queue_pending": []}),
    ("/history", {}),
    ("/models", []),
    ("/experiment/models", []),
    ("/jobs", {"jobs": [], "pagination": {"offset": 0, "limit": 100, "total": 0, "has_more": False}}),
])
async def test_json_routes_answer_with_and_without_api_prefix(client, prefix, path, expected):
    response = await client.get(prefix + path)
    assert response.status == 200 and await response.json() == expected


async def test_features_and_system_stats(client):
    assert await (await client.get("/api/features")).json() == {"supports_preview_metadata": True,
                                                                "max_upload_size": 100 << 20}
    stats = await (await client.get("/api/system_stats")).json()
    assert stats["system"]["required_frontend_version"] == "1.58.1" and stats["system"]["argv"] == ["atelier"]
    assert stats["devices"][0]["type"] in ("cpu", "cuda")


async def test_object_info(client):
    info = await (await client.get("/api/object_info")).json()
    save = info["SaveImage"]
    assert save["output_node"] is True and save["python_module"] == "nodes" and save["category"] == "image"
    assert save["input_order"] == {"required": ["images", "filename_prefix"], "hidden": ["prompt", "extra_pnginfo"]}
    assert info["Steps"]["input"]["required"]["steps"][1]["max"] == 10_000
    assert await (await client.get("/api/object_info/ImageInvert")).json() == {"ImageInvert": info["ImageInvert"]}
    assert await (await client.get("/api/object_info/Nope")).json() == {}


async def test_frontend_extension_and_templates_are_served(client):
    index = await client.get("/?template=image_basics&source=atelier")
    assert index.status == 200 and "<html" in (await index.text()).lower()
    script = await client.get("/extensions/atelier/atelier.js")
    assert script.status == 200 and "registerExtension" in await script.text()
    template = await client.get("/api/workflow_templates/atelier/image_basics.json")
    assert (await template.json())["nodes"][0]["type"] == "EmptyImage"
    assert (await client.get("/api/workflow_templates/atelier/missing.json")).status == 404
    assert await (await client.get("/templates/index.json")).json() == []
    assert (await client.get("/scripts/app.js")).status == 200  # the shim our extension imports


async def test_a_new_user_starts_on_the_example_workflow(client):
    first = await client.get("/", allow_redirects=False)
    assert first.status == 302 and first.headers["Location"] == "./?template=text_to_image&source=atelier"
    await client.post("/api/settings/Comfy.TutorialCompleted", data="true")
    assert (await client.get("/", allow_redirects=False)).status == 200


async def test_the_fallback_graph_is_the_first_workflow_or_null(client, aiohttp_client, tmp_path):
    """What js/atelier.js shows in place of the frontend's default graph: the example, or null (a blank graph)."""
    graph = await (await client.get("/api/atelier/default_graph")).json()
    assert graph == json.loads((ROOT / "workflows" / "text_to_image.json").read_text(encoding="utf-8"))
    app = make_app(tmp_path / "no_example")
    app[server.CONFIG] = dataclasses.replace(app[server.CONFIG], first_workflow=None)
    bare = await aiohttp_client(app)
    response = await bare.get("/api/atelier/default_graph")
    assert response.status == 200 and await response.json() is None


async def test_unknown_routes_are_404_not_500(client):
    for path in ("/api/nope", "/internal/logs/raw", "/api/view_metadata/checkpoints", "/api/jobs/unknown"):
        assert (await client.get(path)).status == 404, path


# --- settings and user files -------------------------------------------------------------------------------------

async def test_settings_persist_per_user(aiohttp_client, tmp_path):
    client = await aiohttp_client(make_app(tmp_path))
    assert (await client.post("/api/settings/Comfy.Theme", data='"dark"')).status == 200  # text/plain, as the editor
    assert (await client.post("/api/settings", data=json.dumps({"a": 1, "b": [2]}))).status == 200
    assert await (await client.get("/api/settings/Comfy.Theme")).json() == "dark"
    again = await aiohttp_client(make_app(tmp_path))  # a restart reads them back from disk
    settings = await (await again.get("/api/settings")).json()
    assert settings["Comfy.Theme"] == "dark" and settings["a"] == 1 and settings["b"] == [2]
    assert await (await again.get("/api/settings/missing")).json() is None


async def test_userdata_save_list_open_rename_delete(client, tmp_path):
    body = json.dumps({"nodes": [], "links": []})
    saved = await client.post("/api/userdata/workflows%2Fmine.json?overwrite=false&full_info=true", data=body)
    assert saved.status == 200
    info = await saved.json()
    assert info["path"] == "workflows/mine.json" and info["size"] == len(body) and info["modified"] > 1e12
    assert (await client.post("/api/userdata/workflows%2Fmine.json?overwrite=false", data="x")).status == 409
    listing = await (await client.get("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")).json()
    assert [entry["path"] for entry in listing] == ["mine.json"]
    assert await (await client.get("/api/userdata?dir=workflows")).json() == ["mine.json"]
    assert await (await client.get("/api/userdata/workflows%2Fmine.json")).text() == body
    moved = await client.post("/api/userdata/workflows%2Fmine.json/move/workflows%2Fsub%2Ftheirs.json")
    assert await moved.json() == "workflows/sub/theirs.json"
    assert await (await client.get("/api/userdata?dir=workflows&recurse=true&split=true")).json() == [
        ["sub/theirs.json", "sub", "theirs.json"]]
    assert await (await client.get("/api/v2/userdata?path=workflows")).json() == [
        {"name": "sub", "path": "workflows/sub", "type": "directory"}]
    assert (await client.delete("/api/userdata/workflows%2Fsub%2Ftheirs.json")).status == 204
    assert (await client.get("/api/userdata/workflows%2Fsub%2Ftheirs.json")).status == 404
    assert await (await client.get("/api/userdata?dir=nothing")).json() == []
    assert (tmp_path / "data" / "user" / "default" / "workflows" / "sub").is_dir()


# --- images ------------------------------------------------------------------------------------------------------

def upload_form(data, name="cat.png", **fields):
    from aiohttp import FormData
    form = FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    return form


async def test_upload_then_view_and_deduplicate(client, tmp_path):
    first = await (await client.post("/api/upload/image", data=upload_form(png_bytes()))).json()
    assert first == {"name": "cat.png", "subfolder": "", "type": "input"}
    same = await (await client.post("/api/upload/image", data=upload_form(png_bytes()))).json()
    assert same["name"] == "cat.png"  # identical bytes are kept once
    other = await (await client.post("/api/upload/image", data=upload_form(png_bytes(color=(0, 0, 255, 128))))).json()
    assert other["name"] == "cat (1).png"
    replaced = await client.post("/api/upload/image", data=upload_form(png_bytes((4, 4)), overwrite="true",
                                                                       subfolder="pets"))
    assert await replaced.json() == {"name": "cat.png", "subfolder": "pets", "type": "input"}
    assert await (await client.get("/internal/files/input")).json() == ["cat (1).png", "cat.png"]
    info = await (await client.get("/api/object_info/LoadImage")).json()  # the new files show up in LoadImage
    assert {"cat.png", "cat (1).png", "pets/cat.png"} <= set(info["LoadImage"]["input"]["required"]["image"][0])

    viewed = await client.get("/api/view?filename=cat%20(1).png&type=input")
    assert viewed.status == 200 and viewed.content_type == "image/png"
    assert await viewed.read() == (tmp_path / "data" / "input" / "cat (1).png").read_bytes()
    webp = await client.get("/api/view?filename=cat.png&type=input&subfolder=pets&preview=webp;80")
    assert webp.content_type == "image/webp" and Image.open(io.BytesIO(await webp.read())).size == (4, 4)
    alpha = await client.get("/api/view?filename=cat%20(1).png&type=input&channel=a")
    assert Image.open(io.BytesIO(await alpha.read())).getpixel((0, 0))[3] == 128
    annotated = await client.get("/api/view?filename=cat.png%20[input]")
    assert annotated.status == 200
    assert (await client.get("/api/view?filename=missing.png&type=input")).status == 404
    assert (await client.get("/api/view?filename=cat.png&type=secret")).status == 400


async def test_upload_refuses_what_is_not_an_image(client):
    response = await client.post("/api/upload/image", data=upload_form(b"<script>alert(1)</script>", "x.png"))
    assert response.status == 400 and "not an image" in (await response.json())["error"]


async def test_upload_mask_puts_the_alpha_on_the_original(client, tmp_path):
    await client.post("/api/upload/image", data=upload_form(png_bytes((8, 8), (10, 20, 30, 255)), "photo.png"))
    mask = png_bytes((8, 8), (0, 0, 0, 40))
    response = await client.post("/api/upload/mask", data=upload_form(
        mask, "clipspace-mask.png", original_ref=json.dumps({"filename": "photo.png", "type": "input"}),
        subfolder="clipspace", overwrite="true"))
    assert await response.json() == {"name": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"}
    result = Image.open(tmp_path / "data" / "input" / "clipspace" / "clipspace-mask.png")
    assert result.getpixel((3, 3)) == (10, 20, 30, 40)


# --- prompts and the websocket -------------------------------------------------------------------------------------

async def test_prompt_event_sequence_and_cached_rerun(client, monkeypatch):
    monkeypatch.setattr(server, "PROGRESS_STATE_INTERVAL_S", 3600)  # so that only the first and last maps go out
    socket = await connect(client, "alice")
    prompt_id = await queue(client, solid_prompt(), "alice", extra_data={"extra_pnginfo": {"workflow": {"id": "w1"}}})
    messages = await messages_until_done(socket, prompt_id)
    sequence = [t for t in types_of(messages) if t != "status"]
    assert sequence == ["execution_start", "execution_cached",
                        "progress_state", "executing",  # node 1 (EmptyImage) starts: the first map goes at once
                        "executing",  # node 2 (SaveImage) starts: its map waits for the interval
                        "executed",  # node 2 finished, with its images
                        "progress_state",  # the last map, before the prompt's end
                        "execution_success", "executing"]
    first_state = next(m for m in messages if m["type"] == "progress_state")["data"]["nodes"]
    assert {node: entry["state"] for node, entry in first_state.items()} == {"1": "running"}
    executed = next(m for m in messages if m["type"] == "executed")["data"]
    assert executed["node"] == "2" and executed["output"]["images"][0]["filename"] == "test_00001_.png"
    last_state = [m for m in messages if m["type"] == "progress_state"][-1]["data"]["nodes"]
    assert {node: entry["state"] for node, entry in last_state.items()} == {"1": "finished", "2": "finished"}
    image = await client.get("/api/view", params=executed["output"]["images"][0])
    assert image.status == 200

    again = await queue(client, solid_prompt(), "alice")
    messages = await messages_until_done(socket, again)
    cached = next(m for m in messages if m["type"] == "execution_cached")["data"]
    assert sorted(cached["nodes"]) == ["1", "2"] and "executing" not in types_of(messages)[:-1]
    assert next(m for m in messages if m["type"] == "executed")["data"]["output"] == executed["output"]

    history = await (await client.get(f"/api/history/{prompt_id}")).json()
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["2"] == executed["output"]
    assert entry["prompt"][1] == prompt_id and list(entry["prompt"][2]) == ["1", "2"]
    jobs = await (await client.get("/api/jobs?status=completed&limit=1")).json()
    assert jobs["pagination"] == {"offset": 0, "limit": 1, "total": 2, "has_more": True}
    [job] = jobs["jobs"]
    assert job["id"] == again and job["status"] == "completed" and job["outputs_count"] == 1
    assert job["preview_output"] == {"filename": "test_00001_.png", "subfolder": "", "type": "output",
                                     "nodeId": "2", "mediaType": "images"}
    detail = await (await client.get(f"/api/jobs/{prompt_id}")).json()
    assert detail["workflow_id"] == "w1" and detail["outputs"]["2"] == executed["output"]


async def test_progress_state_is_coalesced_on_a_large_graph_and_ends_complete(client, monkeypatch):
    """Within one interval the node map goes out once however many nodes run, and the last map, sent before
    execution_success, shows every node finished."""
    monkeypatch.setattr(server, "PROGRESS_STATE_INTERVAL_S", 3600)
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
    for index in range(2, 41):
        prompt[str(index)] = {"class_type": "ImageInvert", "inputs": {"image": [str(index - 1), 0]}}
    prompt["41"] = {"class_type": "PreviewImage", "inputs": {"images": ["40", 0]}}
    socket = await connect(client, "alice")
    prompt_id = await queue(client, prompt, "alice")
    messages = [m for m in await messages_until_done(socket, prompt_id) if isinstance(m, dict)]
    sequence = types_of(messages)
    assert sequence.count("executing") == 42 and sequence.count("progress_state") == 2, sequence
    assert sequence.index("progress_state", sequence.index("progress_state") + 1) == \
        sequence.index("execution_success") - 1
    last_state = [m for m in messages if m["type"] == "progress_state"][-1]["data"]
    assert last_state["prompt_id"] == prompt_id
    assert {entry["state"] for entry in last_state["nodes"].values()} == {"finished"}
    assert sorted(last_state["nodes"], key=int) == [str(index) for index in range(1, 42)]


async def test_a_held_back_progress_state_goes_out_when_its_interval_ends(client, monkeypatch):
    """A node that reports step 1 right after it starts and then works a while without events: its step-1 map
    is held back by the interval, and a timer sends it before step 2 comes."""
    monkeypatch.setattr(server, "PROGRESS_STATE_INTERVAL_S", 0.2)
    socket = await connect(client, "alice")
    prompt_id = await queue(client, {"1": {"class_type": "Steps", "inputs": {"steps": 2, "pause_ms": 1000}}}, "alice")
    messages = [m for m in await messages_until_done(socket, prompt_id) if isinstance(m, dict)]
    seen = [(m["type"], m["data"]["nodes"]["1"]["value"] if m["type"] == "progress_state" else m["data"]["value"])
            for m in messages if m["type"] in ("progress_state", "progress")]
    assert ("progress_state", 1) in seen, seen
    assert seen.index(("progress_state", 1)) < seen.index(("progress", 2)), seen


async def test_previews_are_framed_per_client_flags(client):
    modern = await connect(client, "modern", with_metadata=True)
    legacy = await connect(client, "legacy", with_metadata=False)
    prompt = {"1": {"class_type": "Steps", "inputs": {"steps": 2, "pause_ms": 0}}}
    first = await queue(client, prompt, "modern")
    frames = [m for m in await messages_until_done(modern, first) if isinstance(m, bytes)]
    assert len(frames) == 2
    kind, length = struct.unpack(">II", frames[0][:8])
    meta = json.loads(frames[0][8:8 + length])
    assert kind == 4 and meta == {"node_id": "1", "prompt_id": first, "display_node_id": "1",
                                  "parent_node_id": None, "real_node_id": "1", "image_type": "image/jpeg"}
    jpeg = Image.open(io.BytesIO(frames[0][8 + length:]))
    assert jpeg.format == "JPEG" and jpeg.size == (512, 256)  # bounded to 512 px, aspect kept

    prompt["1"]["inputs"]["steps"] = 3
    second = await queue(client, prompt, "legacy")
    frames = [m for m in await messages_until_done(legacy, second) if isinstance(m, bytes)]
    assert len(frames) == 3 and struct.unpack(">II", frames[0][:8]) == (1, 1)
    assert Image.open(io.BytesIO(frames[0][8:])).format == "JPEG"


async def test_a_nodes_progress_text_reaches_its_client_as_comfyuis_text_frame(client):
    socket = await connect(client, "alice")
    prompt_id = await queue(client, {"1": {"class_type": "Says", "inputs": {"text": "low memory: ünïcode"}}}, "alice")
    frames = [m for m in await messages_until_done(socket, prompt_id) if isinstance(m, bytes)]
    assert len(frames) == 1
    kind, length = struct.unpack(">II", frames[0][:8])
    assert (kind, frames[0][8:8 + length], frames[0][8 + length:].decode()) == (3, b"1", "low memory: ünïcode")


async def test_two_clients_do_not_see_each_others_events(client):
    alice, bob = await connect(client, "alice"), await connect(client, "bob")
    alice_prompt = await queue(client, solid_prompt("a"), "alice")
    bob_prompt = await queue(client, solid_prompt("b"), "bob")
    alice_messages = await messages_until_done(alice, alice_prompt)
    bob_messages = await messages_until_done(bob, bob_prompt)
    for messages, own in ((alice_messages, alice_prompt), (bob_messages, bob_prompt)):
        ids = {m["data"].get("prompt_id") for m in messages if isinstance(m, dict) and m["type"] != "status"}
        assert ids == {own}


async def test_bad_prompt_gets_400_with_node_errors_the_editor_highlights(client):
    prompt = solid_prompt()
    prompt["1"]["inputs"]["width"] = 0
    response = await client.post("/api/prompt", json={"prompt": prompt})
    assert response.status == 400
    body = await response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min"
    assert body["node_errors"]["1"]["class_type"] == "EmptyImage"
    assert body["node_errors"]["1"]["dependent_outputs"] == ["2"]
    for bad in ({"prompt": {"1": {"class_type": "Nope", "inputs": {}}}}, {"prompt": []}, [1, 2],
                {"prompt": solid_prompt(), "prompt_id": "not-a-uuid"}):
        response = await client.post("/api/prompt", json=bad)
        assert response.status == 400 and "error" in await response.json()


async def test_unknown_node_types_get_400_with_one_node_error_each_naming_its_type(client):
    prompt = solid_prompt()
    prompt["3"] = {"class_type": "UltimateSDUpscale", "inputs": {"image": ["1", 0]}, "_meta": {"title": "Upscale"}}
    prompt["4"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["3", 0]}}
    prompt["2"]["inputs"]["images"] = ["3", 0]
    response = await client.post("/api/prompt", json={"prompt": prompt})
    assert response.status == 400
    body = await response.json()
    assert body["error"]["type"] == "missing_node_type"
    assert "SaveImageWebsocket, UltimateSDUpscale" in body["error"]["message"]
    assert sorted(body["node_errors"]) == ["3", "4"]
    upscale = body["node_errors"]["3"]
    assert upscale["class_type"] == "UltimateSDUpscale" and upscale["dependent_outputs"] == ["2"]
    [error] = upscale["errors"]
    assert error == {"type": "missing_node_type", "message": "Node type 'UltimateSDUpscale' is not installed",
                     "details": "Node ID '#3'", "extra_info": {"node_id": "3", "class_type": "UltimateSDUpscale",
                                                              "node_title": "Upscale"}}
    assert body["node_errors"]["4"]["errors"][0]["extra_info"]["node_title"] == "SaveImageWebsocket"


@pytest.mark.parametrize("headers", [
    {},  # comfy-api-simplified sends no Content-Type
    {"Content-Type": "application/x-www-form-urlencoded"},  # what urllib sends: ComfyUI's basic_api_example.py
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/json; charset=utf-8"},
])
async def test_prompt_body_is_read_as_json_whatever_its_content_type(client, headers):
    body = json.dumps({"prompt": solid_prompt(), "client_id": "script"}).encode()
    response = await client.post("/api/prompt", data=body, headers=headers, skip_auto_headers=["Content-Type"])
    assert response.request_info.headers.get("Content-Type") == headers.get("Content-Type")
    assert response.status == 200, await response.text()
    assert UUID_RE.match((await response.json())["prompt_id"])
    response = await client.post("/api/prompt", data=b"prompt=1", headers=headers, skip_auto_headers=["Content-Type"])
    assert response.status == 400 and "not valid JSON" in (await response.json())["error"]


async def test_interrupt_stops_the_running_prompt_and_the_next_runs(client):
    socket = await connect(client, "alice")
    Steps.started.clear()
    slow = await queue(client, {"1": {"class_type": "Steps", "inputs": {"steps": 500, "pause_ms": 20}}}, "alice")
    early = []  # progress frames arrive while it runs; those read before the interrupt count too
    while not Steps.started.is_set():
        message = await socket.receive()
        if message.type.name == "TEXT":
            early.append(message.json())
    other = await client.post("/api/interrupt", json={"prompt_id": "0" * 8 + "-0000-0000-0000-" + "0" * 12})
    assert other.status == 200  # not the running prompt: nothing happens
    assert (await client.post("/api/interrupt")).status == 200
    messages = early + await messages_until_done(socket, slow)
    interrupted = next(m for m in messages if isinstance(m, dict) and m["type"] == "execution_interrupted")["data"]
    assert interrupted["node_id"] == "1" and interrupted["node_type"] == "Steps"
    steps = [m["data"]["value"] for m in messages if isinstance(m, dict) and m["type"] == "progress"]
    assert steps and max(steps) < 500
    history = await (await client.get(f"/api/history/{slow}")).json()
    assert history[slow]["status"]["status_str"] == "error"
    job = await (await client.get(f"/api/jobs/{slow}")).json()
    assert job["status"] == "cancelled"
    after = await queue(client, solid_prompt("after"), "alice")
    assert "execution_success" in types_of(await messages_until_done(socket, after))


async def test_failing_node_reports_and_the_server_goes_on(client):
    socket = await connect(client, "alice")
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0}},
              "2": {"class_type": "Explode", "inputs": {"image": ["1", 0]}}}
    failing = await queue(client, prompt, "alice")
    messages = await messages_until_done(socket, failing)
    error = next(m for m in messages if m["type"] == "execution_error")["data"]
    assert error["node_id"] == "2" and error["exception_message"] == "this node always fails"
    [job] = (await (await client.get("/api/jobs?status=failed")).json())["jobs"]
    assert job["execution_error"]["node_id"] == "2" and job["execution_error"]["exception_type"] == "RuntimeError"
    after = await queue(client, solid_prompt(), "alice")
    assert "execution_success" in types_of(await messages_until_done(socket, after))


async def test_queue_delete_clear_and_history_delete(client):
    socket = await connect(client, "alice")
    Steps.started.clear()
    running = await queue(client, {"1": {"class_type": "Steps", "inputs": {"steps": 1000, "pause_ms": 10}}}, "alice")
    waiting = [await queue(client, solid_prompt(f"w{i}", width=8 + i), "alice") for i in range(3)]
    queued = await (await client.get("/api/queue")).json()
    assert [task[1] for task in queued["queue_pending"]] == waiting
    jobs = await (await client.get("/api/jobs?status=in_progress,pending")).json()
    assert [job["id"] for job in jobs["jobs"]] == [*reversed(waiting), running]  # newest first
    assert (await client.post("/api/queue", json={"delete": [waiting[0]]})).status == 200
    assert await (await client.post(f"/api/jobs/{waiting[1]}/cancel")).json() == {"cancelled": True}
    assert (await client.post("/api/queue", json={"clear": True})).status == 200
    assert (await (await client.get("/api/queue")).json())["queue_pending"] == []
    assert await (await client.post(f"/api/jobs/{running}/cancel")).json() == {"cancelled": True}
    await messages_until_done(socket, running)
    assert list(await (await client.get("/api/history")).json()) == [running]
    assert (await client.post("/api/history", json={"delete": [running]})).status == 200
    assert await (await client.get("/api/history")).json() == {}


async def test_free_memory_empties_the_cache(client):
    socket = await connect(client, "alice")
    await messages_until_done(socket, await queue(client, solid_prompt(), "alice"))
    FEATURE_CACHE.get_or_compute(("test", "free"), lambda: FeatureMaps((torch.zeros(1, 2, 2),), "test", (4, 4)))
    assert (await client.post("/api/free", json={"free_memory": True})).status == 200
    messages = await messages_until_done(socket, await queue(client, solid_prompt(), "alice"))
    assert next(m for m in messages if m["type"] == "execution_cached")["data"]["nodes"] == []
    assert len(FEATURE_CACHE) == 0


async def test_secrets_are_never_stored_or_echoed(client):
    socket = await connect(client, "alice")
    extra = {"auth_token_comfy_org": "SECRET-TOKEN", "api_key_comfy_org": "SECRET-KEY"}
    prompt_id = await queue(client, solid_prompt(), "alice", extra_data=extra)
    await messages_until_done(socket, prompt_id)
    for path in ("/api/queue", "/api/history", f"/api/history/{prompt_id}", "/api/jobs", f"/api/jobs/{prompt_id}"):
        assert "SECRET" not in await (await client.get(path)).text(), path
