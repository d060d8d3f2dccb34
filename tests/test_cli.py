"""The headless command line: python -m web run."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from PIL import Image

from web.builtin_nodes import read_png_metadata
from web.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_BASICS = os.path.join(ROOT, "workflows", "image_basics.json")


def output_paths(stdout):
    return [line.removeprefix("output: ") for line in stdout.splitlines() if line.startswith("output: ")]


def not_progress_bars(stderr):
    """What stderr holds besides the tqdm bars (``nodes: ...``, ``steps: ...``), which redraw with carriage returns."""
    return [part for part in re.split(r"[\r\n]+", stderr)
            if part.strip() and not part.lstrip("\x1b[A").startswith(("nodes", "steps"))]


def within_a_level(pixel: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """SaveImage truncates as ComfyUI's does, so a level that float32 arithmetic leaves at 143.99998 saves as 143."""
    return all(want - 1 <= got <= want for got, want in zip(pixel, expected, strict=True))


def test_image_basics_runs_as_the_readme_says(tmp_path):
    done = subprocess.run([sys.executable, "-m", "web", "run", IMAGE_BASICS, "--data-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not_progress_bars(done.stderr) == [], "warnings that are not about the user's work"
    [path] = output_paths(done.stdout)
    assert path == str(tmp_path / "output" / "image_basics_00001_.png")
    with Image.open(path) as image:
        assert image.size == (256, 192)  # 512x384 scaled to width 256, aspect kept
        assert within_a_level(image.getpixel((10, 10)), (255 - 0x2A, 255 - 0x6F, 255 - 0x97))  # the inverted canvas
    metadata = read_png_metadata(path)
    assert metadata["workflow"] == json.load(open(IMAGE_BASICS))
    assert metadata["prompt"]["1"]["inputs"] == {"width": 512, "height": 384, "batch_size": 1, "color": 0x2A6F97}


def test_set_by_title_and_by_id(tmp_path, capsys):
    code = main(["run", IMAGE_BASICS, "--data-dir", str(tmp_path), "--set", "Canvas.width=1024",
                 "--set", "4.filename_prefix=night/sky", "--set", "Canvas.color=16711680"])
    assert code == 0
    [path] = output_paths(capsys.readouterr().out)
    assert path == str(tmp_path / "output" / "night" / "sky_00001_.png")
    with Image.open(path) as image:
        assert image.size == (256, 96) and within_a_level(image.getpixel((0, 0)), (0, 255, 255))


def test_output_dir(tmp_path, capsys):
    assert main(["run", IMAGE_BASICS, "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")]) == 0
    assert output_paths(capsys.readouterr().out) == [str(tmp_path / "out" / "image_basics_00001_.png")]


def test_invalid_workflow_exits_non_zero_with_readable_node_errors(tmp_path, capsys):
    code = main(["run", IMAGE_BASICS, "--data-dir", str(tmp_path), "--set", "Canvas.width=0",
                 "--set", "3.upscale_method=sideways"])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: Prompt outputs failed validation" in err
    assert "node 1 (EmptyImage, 'Canvas'): Value 0 smaller than min of 1: width" in err
    assert "node 3 (ImageScale, 'ImageScale'): Value not in list: upscale_method: 'sideways' not in" in err


def test_api_format_file(tmp_path, capsys):
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 0}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "api"}}}
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(prompt))
    assert main(["run", str(path), "--data-dir", str(tmp_path)]) == 0
    assert [os.path.basename(p) for p in output_paths(capsys.readouterr().out)] == ["api_00001_.png", "api_00002_.png"]


def test_unknown_set_target_is_a_usage_error(tmp_path, capsys):
    assert main(["run", IMAGE_BASICS, "--data-dir", str(tmp_path), "--set", "Nowhere.width=3"]) == 2
    assert "no node has the id or title 'Nowhere'" in capsys.readouterr().err
    assert main(["run", IMAGE_BASICS, "--data-dir", str(tmp_path), "--set", "Canvas.depth=3"]) == 2
    assert "EmptyImage has no input 'depth'" in capsys.readouterr().err


def test_every_unknown_node_type_is_listed_and_exits_1(tmp_path, capsys):
    workflow = json.load(open(IMAGE_BASICS))
    types = {node["id"]: node for node in workflow["nodes"]}
    types[2]["type"], types[5]["type"] = "UltimateSDUpscale", "FaceDetailer"
    path = tmp_path / "custom_nodes.json"
    path.write_text(json.dumps(workflow))
    assert main(["run", str(path), "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error: Cannot execute because 2 node(s) have types that are not installed: FaceDetailer, " \
           "UltimateSDUpscale" in err
    assert "node 2 (UltimateSDUpscale, 'UltimateSDUpscale'): Node type 'UltimateSDUpscale' is not installed" in err
    assert "node 5 (FaceDetailer, 'FaceDetailer'): Node type 'FaceDetailer' is not installed" in err


def test_a_workflow_that_cannot_be_converted_exits_1_and_a_missing_file_2(tmp_path, capsys):
    path = tmp_path / "dangling.json"
    path.write_text(json.dumps({"nodes": [{"id": 1, "type": "SaveImage", "inputs": [{"name": "images", "link": 7}]}],
                                "links": []}))
    assert main(["run", str(path), "--data-dir", str(tmp_path)]) == 1
    assert "node 1 input 'images' refers to link 7" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "absent.json"), "--data-dir", str(tmp_path)]) == 2


def test_the_app_starts_without_warnings(tmp_path):
    """``python -m web`` prints its URL and nothing else: no library notices that are not about the user's work."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "web", "--port", str(port), "--data-dir", str(tmp_path)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first_line = process.stdout.readline()
    finally:
        process.terminate()
        rest, _ = process.communicate(timeout=30)
    assert first_line == f"Atelier is running: open http://127.0.0.1:{port}/\n", first_line + rest
    assert rest == ""


def test_max_pixels_sets_the_pixel_budget_that_nodes_check_before_allocating(tmp_path, capsys):
    workflow = os.path.join(ROOT, "workflows", "text_to_image.json")
    code = main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                 "--max-pixels", "1000"])
    assert code == 1
    message = capsys.readouterr().err
    assert "exceeds the pixel budget of 1000 pixels" in message and "--max-pixels" in message


def _ui(preview_inputs) -> dict:
    return {"last_node_id": 2, "last_link_id": 1, "links": [[1, 1, 0, 2, 0, "IMAGE"]], "version": 0.4, "nodes": [
        {"id": 1, "type": "EmptyImage", "widgets_values": [8, 8, 1, 0], "inputs": [],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}]},
        {"id": 2, "type": "PreviewImage", "inputs": preview_inputs, "widgets_values": []}]}


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("content, args, message", [
    (json.dumps(_ui({"images": {"link": 1}})), [], "inputs must be a list of sockets"),
    (json.dumps(_ui([{"name": "images", "type": "IMAGE", "link": [1]}])), [], "refers to link [1]"),
    (_nested(100_000), [], "nested too deep"),
    (json.dumps({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}, "2": ["not", "a", "dict"]}),
     ["--set", "1.width=16"], "are not objects with a class_type"),
])
def test_malformed_workflows_get_a_message_and_no_traceback(tmp_path, capsys, content, args, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    code = main(["run", str(path), "--data-dir", str(tmp_path / "data"), *args])
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err
