"""The standalone app's ComfyUI-compatible image nodes (``web/builtin_nodes.py``, ``image_maths.py``,
``image_files.py``) and their data folders."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nodes.common.paths import PathOutsideFolderError, atomic_write
from web.builtin_nodes import BUILTIN_DISPLAY_NAMES, LoadImage, builtin_nodes
from web.image_files import load_image_file, read_png_metadata
from web.image_maths import MAX_RESOLUTION, UPSCALE_METHODS, crop_image, empty_image, invert_image, scale_image
from web.executor import Executor
from web.folders import DataFolders
from web.node_info import input_specs, object_info


@pytest.fixture
def folders(tmp_path) -> DataFolders:
    return DataFolders.under(str(tmp_path / "data"))


@pytest.fixture
def node(folders):
    classes = builtin_nodes(folders)
    return lambda name: classes[name]


def _png_chunks(path: str) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, read by hand so the test does not trust Pillow's reader."""
    with open(path, "rb") as file:
        data = file.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        offset += 12 + length
    return chunks


def _gradient(height: int, width: int, batch: int = 1) -> torch.Tensor:
    """An IMAGE whose pixels all differ, in steps of 1/255, so 8-bit round trips are exact."""
    values = torch.arange(batch * height * width * 3, dtype=torch.float32).reshape(batch, height, width, 3)
    return (values % 256) / 255


# --- data folders and atomic writes -------------------------------------------------------------------------------


def test_data_folders_under_creates_the_four_folders(tmp_path):
    folders = DataFolders.under(str(tmp_path / "data"))
    for kind in ("input", "output", "temp", "user"):
        path = getattr(folders, kind)
        assert path == os.path.realpath(tmp_path / "data" / kind)
        assert os.path.isdir(path)
    assert folders.folder("temp") == folders.temp


def test_data_folders_output_dir_replaces_output(tmp_path):
    folders = DataFolders.under(str(tmp_path / "data"), output_dir=str(tmp_path / "elsewhere"))
    assert folders.output == os.path.realpath(tmp_path / "elsewhere")
    assert os.path.isdir(folders.output)
    assert not os.path.exists(tmp_path / "data" / "output")


def test_data_folders_folder_refuses_other_kinds(folders):
    with pytest.raises(ValueError, match="'user'"):
        folders.folder("user")


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write(str(path), b"old")
    atomic_write(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_atomic_write_failure_removes_temp_file(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_bytes(b"")  # a non-empty folder cannot be replaced by a file
    with pytest.raises(OSError):
        atomic_write(str(tmp_path / "taken"), b"data")
    assert sorted(os.listdir(tmp_path)) == ["taken"]


# --- node declarations --------------------------------------------------------------------------------------------


def test_builtin_nodes_declare_their_face(folders):
    classes = builtin_nodes(folders)
    assert set(classes) == set(BUILTIN_DISPLAY_NAMES)
    for name, cls in classes.items():
        assert cls.__name__ == name
        assert cls.folders is folders
        for attribute in ("RETURN_TYPES", "RETURN_NAMES", "OUTPUT_TOOLTIPS", "FUNCTION", "CATEGORY", "DESCRIPTION"):
            assert hasattr(cls, attribute), f"{name} lacks {attribute}"
        assert len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), name
        assert cls.CATEGORY.split("/")[0] == "image", name
        assert callable(getattr(cls(), cls.FUNCTION))
        for spec in input_specs(cls):
            if spec.section == "hidden":
                continue
            assert spec.options.get("tooltip"), f"{name}.{spec.name} has no tooltip"
            if spec.type in ("INT", "FLOAT"):
                assert {"default", "min", "max", "step"} <= set(spec.options), f"{name}.{spec.name}"
            if spec.type == "FLOAT":
                assert "round" in spec.options, f"{name}.{spec.name}"
        info = object_info(name, cls, BUILTIN_DISPLAY_NAMES[name], "web.builtin_nodes")
        json.dumps(info)  # /object_info must serialise


def test_builtin_nodes_bind_each_call_to_its_own_folders(tmp_path):
    first = builtin_nodes(DataFolders.under(str(tmp_path / "one")))
    second = builtin_nodes(DataFolders.under(str(tmp_path / "two")))
    assert first["SaveImage"].folders.output != second["SaveImage"].folders.output
    with pytest.raises(TypeError, match="builtin_nodes"):
        LoadImage.INPUT_TYPES()  # the unbound module-level class has no folders


def test_builtin_nodes_use_comfyui_input_names(node):
    names = {cls: [s.name for s in input_specs(node(cls))] for cls in BUILTIN_DISPLAY_NAMES}
    assert names == {
        "LoadImage": ["image"],
        "SaveImage": ["images", "filename_prefix", "prompt", "extra_pnginfo"],
        "PreviewImage": ["images", "prompt", "extra_pnginfo"],
        "EmptyImage": ["width", "height", "batch_size", "color"],
        "ImageScale": ["image", "upscale_method", "width", "height", "crop"],
        "ImageInvert": ["image"],
        "ImageCrop": ["image", "width", "height", "x", "y"],
    }


# --- LoadImage ----------------------------------------------------------------------------------------------------


def test_load_image_lists_images_recursively_sorted(folders, node, tmp_path):
    Image.new("RGB", (2, 2)).save(os.path.join(folders.input, "b.png"))
    os.makedirs(os.path.join(folders.input, "sub"))
    Image.new("RGB", (2, 2)).save(os.path.join(folders.input, "sub", "a.jpg"))
    Image.new("RGB", (2, 2)).save(os.path.join(folders.input, "A.webp"))
    with open(os.path.join(folders.input, "notes.txt"), "w") as file:
        file.write("not an image")
    Image.new("RGB", (2, 2)).save(os.path.join(folders.input, ".hidden.png"))
    Image.new("RGB", (2, 2)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", os.path.join(folders.input, "link.png"))
    spec = node("LoadImage").INPUT_TYPES()["required"]["image"]
    assert spec[0] == ["A.webp", "b.png", "sub/a.jpg"]
    assert spec[1]["image_upload"] is True


def test_load_image_rgba_gives_image_and_one_minus_alpha(folders, node):
    pixels = np.array([[[255, 0, 0, 255], [0, 255, 0, 0]],
                       [[0, 0, 255, 51], [255, 255, 255, 204]]], dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(os.path.join(folders.input, "rgba.png"))
    image, mask = node("LoadImage")().load_image("rgba.png")
    assert image.dtype == mask.dtype == torch.float32
    assert image.shape == (1, 2, 2, 3) and mask.shape == (1, 2, 2)
    torch.testing.assert_close(image[0], torch.from_numpy(pixels[..., :3] / 255).float())
    torch.testing.assert_close(mask[0], torch.tensor([[0.0, 1.0], [0.8, 0.2]]))


def test_load_image_without_alpha_gives_64_square_zero_mask(folders, node):
    Image.new("RGB", (5, 3), (10, 20, 30)).save(os.path.join(folders.input, "rgb.png"))
    image, mask = node("LoadImage")().load_image("rgb.png")
    assert image.shape == (1, 3, 5, 3)
    torch.testing.assert_close(image[0, 0, 0], torch.tensor([10, 20, 30]) / 255)
    assert mask.shape == (1, 64, 64) and mask.abs().sum() == 0


def test_load_image_applies_exif_orientation(folders, node):
    stored = Image.new("RGB", (32, 16), (255, 0, 0))
    stored.paste((0, 0, 255), (16, 0, 32, 16))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored.save(os.path.join(folders.input, "turned.jpg"), "JPEG", exif=exif.tobytes(), quality=95)
    image, _ = node("LoadImage")().load_image("turned.jpg")
    assert image.shape == (1, 32, 16, 3)  # displayed portrait: the stored left half is now on top
    torch.testing.assert_close(image[0, 4, 8], torch.tensor([1.0, 0.0, 0.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(image[0, 28, 8], torch.tensor([0.0, 0.0, 1.0]), atol=0.05, rtol=0)


def test_load_image_frames_become_a_batch(folders):
    frames = [Image.new("RGB", (4, 3), (value, 0, 0)) for value in (0, 100, 200)]
    path = os.path.join(folders.input, "pages.tiff")
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image, mask = load_image_file(path)
    assert image.shape == (3, 3, 4, 3) and mask.shape == (3, 64, 64)
    torch.testing.assert_close(image[:, 0, 0, 0], torch.tensor([0, 100, 200]) / 255)


def test_load_image_refuses_frames_of_different_sizes(folders):
    path = os.path.join(folders.input, "mixed.tiff")
    Image.new("RGB", (4, 3)).save(path, save_all=True, append_images=[Image.new("RGB", (5, 3))])
    with pytest.raises(ValueError, match="frame 1 is 5x3 but frame 0 is 4x3"):
        load_image_file(path)


def test_load_image_mpo_gives_its_first_image_only(folders):
    path = os.path.join(folders.input, "photo.mpo")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path, "MPO", save_all=True,
                                               append_images=[Image.new("RGB", (4, 4))])
    image, _ = load_image_file(path)
    assert image.shape == (1, 8, 8, 3)
    assert image[0, 4, 4, 0] > 0.9


def test_load_image_reads_16_bit_greyscale_at_full_range(folders):
    path = os.path.join(folders.input, "deep.png")
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    image, _ = load_image_file(path)
    torch.testing.assert_close(image[0, 0, :, 1], torch.tensor([0.0, 32768 / 65535, 1.0]))


def test_load_image_reads_annotated_output_names(folders, node):
    Image.new("RGB", (2, 2), (0, 255, 0)).save(os.path.join(folders.output, "made.png"))
    cls = node("LoadImage")
    assert cls.VALIDATE_INPUTS("made.png [output]") is True
    assert cls.VALIDATE_INPUTS("made.png") != True  # noqa: E712 - an error string, not in the input folder
    image, _ = cls().load_image("made.png [output]")
    torch.testing.assert_close(image[0, 0, 0], torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize("name_kind", ["dotdot", "absolute", "symlink"])
def test_load_image_refuses_names_outside_the_input_folder(folders, node, tmp_path, name_kind):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(outside)
    if name_kind == "symlink":
        os.symlink(outside, os.path.join(folders.input, "innocent.png"))
        name = "innocent.png"
    else:
        name = str(outside) if name_kind == "absolute" else "../../secret.png"
        assert os.path.isfile(os.path.join(folders.input, name))  # the file is really there to be reached
    cls = node("LoadImage")
    verdict = cls.VALIDATE_INPUTS(name)
    assert isinstance(verdict, str) and "Invalid image file" in verdict and repr(name) in verdict
    with pytest.raises(PathOutsideFolderError):
        cls().load_image(name)
    with pytest.raises(PathOutsideFolderError):
        cls.IS_CHANGED(name)


def test_load_image_validate_refuses_missing_file(node):
    verdict = node("LoadImage").VALIDATE_INPUTS("missing.png")
    assert isinstance(verdict, str) and "'missing.png'" in verdict


def test_load_image_is_changed_follows_file_bytes(folders, node):
    path = os.path.join(folders.input, "x.png")
    Image.new("RGB", (2, 2), (0, 0, 0)).save(path)
    cls = node("LoadImage")
    first = cls.IS_CHANGED("x.png")
    with open(path, "rb") as file:
        assert first == hashlib.sha256(file.read()).hexdigest()
    assert cls.IS_CHANGED("x.png") == first
    Image.new("RGB", (2, 2), (1, 0, 0)).save(path)
    assert cls.IS_CHANGED("x.png") != first


# --- SaveImage and PreviewImage -----------------------------------------------------------------------------------


def test_save_image_numbers_files_after_existing_ones(folders, node):
    save = node("SaveImage")()
    first = save.save_images(_gradient(2, 2), "shot")["ui"]["images"]
    second = save.save_images(_gradient(2, 2, batch=2), "shot")["ui"]["images"]
    assert [item["filename"] for item in first] == ["shot_00001_.png"]
    assert [item["filename"] for item in second] == ["shot_00002_.png", "shot_00003_.png"]
    assert first[0] == {"filename": "shot_00001_.png", "subfolder": "", "type": "output"}
    Image.new("RGB", (1, 1)).save(os.path.join(folders.output, "shot_00041_.png"))
    Image.new("RGB", (1, 1)).save(os.path.join(folders.output, "other_00099_.png"))
    third = save.save_images(_gradient(2, 2), "shot")["ui"]["images"]
    assert third[0]["filename"] == "shot_00042_.png"
    assert sorted(os.listdir(folders.output)) == ["other_00099_.png", "shot_00001_.png", "shot_00002_.png",
                                                  "shot_00003_.png", "shot_00041_.png", "shot_00042_.png"]


def test_save_image_pixels_round_trip_through_load_image(folders, node):
    images = _gradient(3, 5, batch=2)
    saved = node("SaveImage")().save_images(images, "trip")["ui"]["images"]
    for index, item in enumerate(saved):
        loaded, _ = load_image_file(os.path.join(folders.output, item["filename"]))
        torch.testing.assert_close(loaded[0], images[index], atol=1e-6, rtol=0)


def test_save_image_truncates_to_8_bit_levels_and_clips_as_comfyui_does(folders, node):
    images = torch.tensor([[[[0.6 / 255, 10.4 / 255, 200.9 / 255], [-0.2, 1.3, 0.5]]]])
    saved = node("SaveImage")().save_images(images, "levels")["ui"]["images"]
    with Image.open(os.path.join(folders.output, saved[0]["filename"])) as png:
        assert np.asarray(png).tolist() == [[[0, 10, 200], [0, 255, 127]]]


def test_save_image_embeds_prompt_and_workflow_as_text_chunks(folders, node):
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 2, "height": 2, "batch_size": 1,
                                                             "color": 0, "note": "é ü"}}}
    workflow = {"nodes": [{"id": 1, "type": "EmptyImage", "title": "ünïcode"}], "links": [], "version": 0.4}
    saved = node("SaveImage")().save_images(_gradient(2, 2), "meta", prompt, {"workflow": workflow})
    path = os.path.join(folders.output, saved["ui"]["images"][0]["filename"])
    assert read_png_metadata(path) == {"prompt": prompt, "workflow": workflow}
    texts = {body.split(b"\0", 1)[0]: body.split(b"\0", 1)[1] for kind, body in _png_chunks(path) if kind == b"tEXt"}
    assert texts == {b"prompt": json.dumps(prompt).encode("ascii"), b"workflow": json.dumps(workflow).encode("ascii")}


def test_save_image_through_the_executor_embeds_the_queued_prompt(folders):
    executor = Executor(builtin_nodes(folders))
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 3, "height": 2, "batch_size": 1, "color": 0xFF}},
              "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "run"}}}
    workflow = {"nodes": [{"id": 3, "type": "SaveImage"}], "links": []}
    checked = executor.validate(json.loads(json.dumps(prompt)))
    assert checked.ok and checked.node_errors == {}
    result = executor.execute(checked.prompt, "p1", checked.outputs,
                              extra_data={"extra_pnginfo": {"workflow": workflow}})
    assert result.status == "success"
    assert result.outputs == {"3": {"images": [{"filename": "run_00001_.png", "subfolder": "", "type": "output"}]}}
    path = os.path.join(folders.output, "run_00001_.png")
    assert read_png_metadata(path) == {"prompt": prompt, "workflow": workflow}
    with Image.open(path) as png:
        assert np.asarray(png)[0, 0].tolist() == [255, 255, 0]


def test_save_image_prefix_with_subfolder(folders, node):
    saved = node("SaveImage")().save_images(_gradient(2, 2), "runs/day1/cat")["ui"]["images"]
    assert saved == [{"filename": "cat_00001_.png", "subfolder": "runs/day1", "type": "output"}]
    assert os.path.isfile(os.path.join(folders.output, "runs", "day1", "cat_00001_.png"))


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/tmp/escape", "a/..", ""])
def test_save_image_refuses_prefix_leaving_output_folder(folders, node, prefix):
    cls = node("SaveImage")
    verdict = cls.VALIDATE_INPUTS(prefix)
    assert isinstance(verdict, str) and repr(prefix) in verdict
    with pytest.raises(ValueError, match=repr(prefix).replace(".", r"\.")):
        cls().save_images(_gradient(2, 2), prefix)
    parent = os.path.dirname(folders.output)
    assert sorted(os.listdir(parent)) == ["input", "output", "temp", "user"]
    assert os.listdir(folders.output) == []


def test_save_image_refuses_non_finite_pixels(folders, node):
    images = _gradient(2, 2)
    images[0, 1, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        node("SaveImage")().save_images(images, "bad")
    assert os.listdir(folders.output) == []


def test_preview_image_writes_into_temp(folders, node):
    preview = node("PreviewImage")()
    saved = preview.save_images(_gradient(2, 2), {"1": {}}, {"workflow": {"nodes": []}})["ui"]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "temp" and saved[0]["subfolder"] == ""
    assert saved[0]["filename"].startswith("AtelierPreview_") and saved[0]["filename"].endswith("_00001_.png")
    assert os.listdir(folders.temp) == [saved[0]["filename"]]
    assert os.listdir(folders.output) == []
    again = preview.save_images(_gradient(2, 2))["ui"]["images"]
    assert again[0]["filename"].endswith("_00002_.png")
    assert read_png_metadata(os.path.join(folders.temp, saved[0]["filename"])) == {
        "prompt": {"1": {}}, "workflow": {"nodes": []}}
    assert node("PreviewImage").OUTPUT_NODE is True


# --- EmptyImage, ImageScale, ImageInvert, ImageCrop ----------------------------------------------------------------


def test_empty_image_fills_the_colour(node):
    (image,) = node("EmptyImage")().generate(width=4, height=3, batch_size=2, color=0x123456)
    assert image.shape == (2, 3, 4, 3) and image.dtype == torch.float32
    expected = torch.tensor([0x12, 0x34, 0x56]) / 255
    torch.testing.assert_close(image, expected.expand(2, 3, 4, 3))


def test_empty_image_refuses_colour_out_of_range():
    with pytest.raises(ValueError, match="16777216"):
        empty_image(2, 2, 1, 0x1000000)


@pytest.mark.parametrize("method", UPSCALE_METHODS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(7, 5), (16, 24)])
def test_scale_image_shape_and_range(method, batch, size):
    width, height = size
    image = torch.rand(batch, 10, 12, 3, generator=torch.Generator().manual_seed(0))
    out = scale_image(image, width, height, method)
    assert out.shape == (batch, height, width, 3) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("method", UPSCALE_METHODS)
def test_scale_image_keeps_a_constant_image(method):
    image = torch.full((1, 9, 13, 3), 0.3)
    torch.testing.assert_close(scale_image(image, 5, 4, method), torch.full((1, 4, 5, 3), 0.3))


def test_scale_image_area_averages_blocks():
    image = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4, 1).expand(1, 4, 4, 3) / 16
    out = scale_image(image, 2, 2, "area")
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]]) / 16
    torch.testing.assert_close(out[0, ..., 0], expected)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_scale_image_antialiases_when_shrinking(method):
    stripes = (torch.arange(12) % 2).float().reshape(1, 1, 12, 1).expand(1, 3, 12, 3)  # 1-pixel stripes
    out = scale_image(stripes, 4, 3, method)  # sampled without a filter, a 3x shrink gives 1, 0, 1, 0
    torch.testing.assert_close(out[0, 0, :, 0], torch.full((4,), 0.5), atol=0.06, rtol=0)


@pytest.mark.parametrize(("width", "height", "expected"), [(40, 0, (20, 40)), (0, 10, (10, 20)), (0, 1, (1, 2)),
                                                           (30, 30, (30, 30))])
def test_scale_image_zero_size_keeps_aspect(width, height, expected):
    out = scale_image(torch.rand(1, 50, 100, 3), width, height, "bilinear")
    assert tuple(out.shape[1:3]) == expected


def test_scale_image_center_crop_takes_the_middle():
    columns = torch.arange(8, dtype=torch.float32) / 8
    image = columns.reshape(1, 1, 8, 1).expand(1, 2, 8, 3)  # 8 wide, 2 high: each column its own value
    out = scale_image(image, 2, 2, "nearest-exact", crop="center")  # square target: the middle 2x2
    torch.testing.assert_close(out[0, 0, :, 0], columns[3:5])
    stretched = scale_image(image, 2, 2, "nearest-exact")
    torch.testing.assert_close(stretched[0, 0, :, 0], columns[[2, 6]])


def test_scale_image_refuses_both_sizes_zero(node):
    with pytest.raises(ValueError, match="both 0"):
        scale_image(torch.rand(1, 4, 4, 3), 0, 0, "bilinear")
    verdict = node("ImageScale").VALIDATE_INPUTS(width=0, height=0)
    assert isinstance(verdict, str) and "both 0" in verdict
    assert node("ImageScale").VALIDATE_INPUTS(width=0, height=5) is True
    # Naming width and height switches off the built-in range checks, so the node checks them itself.
    assert "width must be in [0, 16384]; got 16385" in node("ImageScale").VALIDATE_INPUTS(width=16385, height=5)
    assert node("ImageScale").VALIDATE_INPUTS(width=None, height=0) is True  # linked: checked at run time


def test_scale_image_refuses_aspect_size_beyond_max_resolution():
    with pytest.raises(ValueError, match=str(MAX_RESOLUTION)):
        scale_image(torch.rand(1, 1, 4, 3), 0, MAX_RESOLUTION, "nearest-exact")


@pytest.mark.parametrize("method", UPSCALE_METHODS)
@pytest.mark.parametrize("crop", ["disabled", "center"])
def test_image_scale_node_equals_function(node, method, crop):
    image = torch.rand(2, 9, 14, 3, generator=torch.Generator().manual_seed(1))
    (out,) = node("ImageScale")().upscale(image, method, 6, 0, crop)
    torch.testing.assert_close(out, scale_image(image, 6, 0, method, crop), rtol=0, atol=0)
    assert out.shape == (2, 4, 6, 3)


def test_image_invert_is_one_minus_image(node):
    image = torch.rand(2, 3, 4, 3, generator=torch.Generator().manual_seed(2))
    (out,) = node("ImageInvert")().invert(image)
    torch.testing.assert_close(out, 1 - image, rtol=0, atol=0)
    torch.testing.assert_close(invert_image(out), image)


def test_image_crop_takes_the_rectangle(node):
    image = _gradient(6, 8, batch=2)
    (out,) = node("ImageCrop")().crop(image, width=3, height=2, x=4, y=1)
    torch.testing.assert_close(out, image[:, 1:3, 4:7, :], rtol=0, atol=0)
    torch.testing.assert_close(crop_image(image, 8, 6, 0, 0), image)


@pytest.mark.parametrize(("width", "height", "x", "y"), [(3, 2, 6, 0), (3, 2, 0, 5), (9, 1, 0, 0), (1, 7, 0, 0)])
def test_image_crop_refuses_rectangle_leaving_the_image(node, width, height, x, y):
    with pytest.raises(ValueError, match=f"crop {width}x{height} at x={x}, y={y} .* 8x6 image"):
        node("ImageCrop")().crop(_gradient(6, 8), width, height, x, y)


def test_image_functions_refuse_a_non_image_shape():
    with pytest.raises(ValueError, match=r"\(1, 4, 4, 4\)"):
        invert_image(torch.rand(1, 4, 4, 4))
