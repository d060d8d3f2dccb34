"""The UI → API converter: link formats, widget values, muted, bypassed and virtual nodes, and refusals."""

import copy

import pytest

from web.workflow import WorkflowError, is_ui_workflow, ui_to_api

MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_RESOLUTION = 16384


# Node classes written as a ComfyUI pack writes them; the converter reads only their INPUT_TYPES.

class CheckpointLoaderSimple:
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (["v1-5-pruned-emaonly.safetensors", "sdxl.safetensors"],)}}

    def load_checkpoint(self, ckpt_name):
        return (None, None, None)


class CLIPTextEncode:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                             "clip": ("CLIP",)}}

    def encode(self, clip, text):
        return (text,)


class EmptyLatentImage:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = "latent"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                             "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    def generate(self, width, height, batch_size=1):
        return ({"samples": None},)


class KSampler:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (["euler", "euler_ancestral", "dpmpp_2m"],),
            "scheduler": (["normal", "karras"],),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise):
        return (latent_image,)


class VAEDecode:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "latent"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    def decode(self, vae, samples):
        return (samples,)


class SaveImage:
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        return {"ui": {"images": []}}


class LoadImage:
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (["cat.png", "dog.png"], {"image_upload": True})}}

    def load_image(self, image):
        return (None, None)


class ImageScaleBy:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "upscale_method": (["nearest-exact", "bilinear", "area"],),
                             "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}}

    def upscale(self, image, upscale_method, scale_by):
        return (image,)


class ImageInvert:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "invert"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def invert(self, image):
        return (1.0 - image,)


class SeedGenerator:
    RETURN_TYPES = ("INT",)
    FUNCTION = "generate"
    CATEGORY = "utils"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED})}}

    def generate(self, seed):
        return (seed,)


class ShowText:
    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True
    CATEGORY = "utils"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True}),
                             "max_lines": ("INT", {"default": 10, "min": 1, "max": 1000})}}

    def show(self, text, max_lines):
        return {"ui": {"text": [text]}}


class VideoCombine:
    RETURN_TYPES = ()
    FUNCTION = "combine"
    OUTPUT_NODE = True
    CATEGORY = "video"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",),
                             "frame_rate": ("FLOAT", {"default": 8.0, "min": 1.0, "max": 120.0, "step": 1.0}),
                             "filename_prefix": ("STRING", {"default": "clip"}),
                             "format": (["image/gif", "video/mp4"],)}}

    def combine(self, images, frame_rate, filename_prefix, format):
        return {"ui": {"gifs": []}}


class TagPicker:
    RETURN_TYPES = ("STRING",)
    FUNCTION = "pick"
    CATEGORY = "utils"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tags": ("COMBO", {"options": ["cat", "dog", "bird"], "multi_select": {}})}}

    def pick(self, tags):
        return (", ".join(tags),)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, SaveImage, LoadImage,
    ImageScaleBy, ImageInvert, SeedGenerator, ShowText, VideoCombine, TagPicker)}


def ui_node(node_id, type_, widgets_values=None, inputs=(), mode=0, title=None):
    """A node as the editor saves it; ``inputs`` are ``(name, type, link id or None)``."""
    node = {"id": node_id, "type": type_, "pos": [100 * node_id, 0], "size": [300, 100], "flags": {},
            "order": node_id, "mode": mode,
            "inputs": [{"name": name, "type": socket_type, "link": link} for name, socket_type, link in inputs],
            "outputs": [], "properties": {"Node name for S&R": type_}}
    if widgets_values is not None:
        node["widgets_values"] = widgets_values
    if title is not None:
        node["title"] = title
    return node


def ui_workflow(nodes, links, **extra):
    """A version 0.4 workflow; ``links`` are ``[id, origin_id, origin_slot, target_id, target_slot, type]``."""
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max((link[0] for link in links), default=0),
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4, **extra}


def api_node(class_type, inputs, title=None):
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title or class_type}}


# The editor's default text-to-image workflow, as it saves it, with one node renamed.
TEXT_TO_IMAGE = {
    "last_node_id": 9, "last_link_id": 9,
    "nodes": [
        {"id": 7, "type": "CLIPTextEncode", "pos": [413, 389], "size": [425, 180], "flags": {}, "order": 3, "mode": 0,
         "inputs": [{"name": "clip", "type": "CLIP", "link": 5},
                    {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": None}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6], "slot_index": 0}],
         "properties": {"Node name for S&R": "CLIPTextEncode"}, "widgets_values": ["text, watermark"]},
        {"id": 6, "type": "CLIPTextEncode", "pos": [415, 186], "size": [422, 164], "flags": {}, "order": 2, "mode": 0,
         "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4], "slot_index": 0}],
         "title": "Positive Prompt", "properties": {"Node name for S&R": "CLIPTextEncode"},
         "widgets_values": ["beautiful scenery nature glass bottle landscape"]},
        {"id": 5, "type": "EmptyLatentImage", "pos": [473, 609], "size": [315, 106], "flags": {}, "order": 1,
         "mode": 0, "outputs": [{"name": "LATENT", "type": "LATENT", "links": [2], "slot_index": 0}],
         "properties": {"Node name for S&R": "EmptyLatentImage"}, "widgets_values": [512, 512, 1]},
        {"id": 3, "type": "KSampler", "pos": [863, 186], "size": [315, 262], "flags": {}, "order": 4, "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                    {"name": "positive", "type": "CONDITIONING", "link": 4},
                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                    {"name": "latent_image", "type": "LATENT", "link": 2},
                    {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7], "slot_index": 0}],
         "properties": {"Node name for S&R": "KSampler"},
         "widgets_values": [156680208700286, "randomize", 20, 8, "euler", "normal", 1]},
        {"id": 8, "type": "VAEDecode", "pos": [1209, 188], "size": [210, 46], "flags": {}, "order": 5, "mode": 0,
         "inputs": [{"name": "samples", "type": "LATENT", "link": 7}, {"name": "vae", "type": "VAE", "link": 8}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [9], "slot_index": 0}],
         "properties": {"Node name for S&R": "VAEDecode"}},
        {"id": 9, "type": "SaveImage", "pos": [1451, 189], "size": [210, 58], "flags": {}, "order": 6, "mode": 0,
         "inputs": [{"name": "images", "type": "IMAGE", "link": 9}], "properties": {}, "widgets_values": ["ComfyUI"]},
        {"id": 4, "type": "CheckpointLoaderSimple", "pos": [26, 474], "size": [315, 98], "flags": {}, "order": 0,
         "mode": 0,
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1], "slot_index": 0},
                     {"name": "CLIP", "type": "CLIP", "links": [3, 5], "slot_index": 1},
                     {"name": "VAE", "type": "VAE", "links": [8], "slot_index": 2}],
         "properties": {"Node name for S&R": "CheckpointLoaderSimple"},
         "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
    ],
    "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
              [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
              [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
    "groups": [], "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4,
}

TEXT_TO_IMAGE_PROMPT = {
    "3": api_node("KSampler", {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler",
                               "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0],
                               "negative": ["7", 0], "latent_image": ["5", 0]}),
    "4": api_node("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
    "5": api_node("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
    "6": api_node("CLIPTextEncode", {"text": "beautiful scenery nature glass bottle landscape", "clip": ["4", 1]},
                  title="Positive Prompt"),
    "7": api_node("CLIPTextEncode", {"text": "text, watermark", "clip": ["4", 1]}),
    "8": api_node("VAEDecode", {"samples": ["3", 0], "vae": ["4", 2]}),
    "9": api_node("SaveImage", {"images": ["8", 0], "filename_prefix": "ComfyUI"}),
}


def test_is_ui_workflow_tells_ui_from_api():
    assert is_ui_workflow(TEXT_TO_IMAGE)
    assert not is_ui_workflow(TEXT_TO_IMAGE_PROMPT)
    assert not is_ui_workflow({"nodes": {"3": {}}})
    assert not is_ui_workflow([TEXT_TO_IMAGE])


def test_ui_to_api_converts_default_workflow_skipping_seed_control_value():
    assert ui_to_api(TEXT_TO_IMAGE, NODE_CLASS_MAPPINGS) == TEXT_TO_IMAGE_PROMPT


def test_ui_to_api_reads_version_1_link_objects():
    workflow = copy.deepcopy(TEXT_TO_IMAGE)
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    workflow["links"] = [dict(zip(keys, link)) for link in workflow["links"]]
    workflow["version"] = 1
    workflow["state"] = {"lastGroupId": 0, "lastNodeId": 9, "lastLinkId": 9, "lastRerouteId": 0}
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS) == TEXT_TO_IMAGE_PROMPT


def test_ui_to_api_ignores_native_reroutes_on_links():
    workflow = ui_workflow(
        [ui_node(1, "LoadImage", ["cat.png", "image"]),
         ui_node(2, "SaveImage", ["out"], inputs=[("images", "IMAGE", 1)])],
        [])
    workflow["version"] = 1
    workflow["links"] = [{"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0,
                          "type": "IMAGE", "parentId": 2}]
    workflow["reroutes"] = [{"id": 1, "pos": [50, 50], "linkIds": [1]},
                            {"id": 2, "parentId": 1, "pos": [80, 50], "linkIds": [1]}]
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS)["2"]["inputs"] == {"images": ["1", 0], "filename_prefix": "out"}


def test_ui_to_api_skips_image_upload_value():
    workflow = ui_workflow(
        [ui_node(1, "LoadImage", ["dog.png", "image"]),
         ui_node(2, "ImageScaleBy", ["bilinear", 1.5], inputs=[("image", "IMAGE", 1)])],
        [[1, 1, 0, 2, 0, "IMAGE"]])
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS) == {
        "1": api_node("LoadImage", {"image": "dog.png"}),
        "2": api_node("ImageScaleBy", {"upscale_method": "bilinear", "scale_by": 1.5, "image": ["1", 0]}),
    }


def test_ui_to_api_leaves_out_muted_node_and_drops_its_links():
    workflow = ui_workflow(
        [ui_node(1, "LoadImage", ["cat.png", "image"], mode=2),
         ui_node(2, "ImageInvert", inputs=[("image", "IMAGE", 1)]),
         ui_node(3, "SaveImage", ["out"], inputs=[("images", "IMAGE", 2)]),
         ui_node(4, "SeedGenerator", [7, "fixed"], mode=2),
         ui_node(5, "ShowText", [3], inputs=[("text", "STRING", None), ("max_lines", "INT", 3)]),
         ui_node(6, "NodeFromAPackThatIsNotInstalled", [1, 2], mode=2)],
        [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 4, 0, 5, 1, "INT"]])
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS) == {
        "2": api_node("ImageInvert", {}),
        "3": api_node("SaveImage", {"filename_prefix": "out", "images": ["2", 0]}),
        "5": api_node("ShowText", {}),  # a widget linked from a muted node loses its value too, as in the editor
    }


def test_ui_to_api_rewires_links_through_bypassed_nodes_and_reroutes():
    workflow = ui_workflow(
        [ui_node(1, "LoadImage", ["cat.png", "image"]),
         ui_node(2, "ImageInvert", inputs=[("image", "IMAGE", 1)], mode=4),
         ui_node(3, "Reroute", inputs=[("", "*", 2)]),
         ui_node(4, "ImageScaleBy", ["area", 2.0], inputs=[("image", "IMAGE", 3)], mode=4),
         ui_node(5, "SaveImage", ["out"], inputs=[("images", "IMAGE", 4)])],
        [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"], [4, 4, 0, 5, 0, "IMAGE"]])
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS) == {
        "1": api_node("LoadImage", {"image": "cat.png"}),
        "5": api_node("SaveImage", {"filename_prefix": "out", "images": ["1", 0]}),
    }


def test_ui_to_api_bypass_prefers_input_at_output_index():
    # A two-in two-out node (from some pack): its output 1 stands for its input 1, not for the first IMAGE input.
    workflow = ui_workflow(
        [ui_node(1, "LoadImage", ["cat.png", "image"]),
         ui_node(2, "LoadImage", ["dog.png", "image"]),
         ui_node(3, "SwapImages", inputs=[("image_a", "IMAGE", 1), ("image_b", "IMAGE", 2)], mode=4),
         ui_node(4, "SaveImage", ["out"], inputs=[("images", "IMAGE", 3)])],
        [[1, 1, 0, 3, 0, "IMAGE"], [2, 2, 0, 3, 1, "IMAGE"], [3, 3, 1, 4, 0, "IMAGE"]])
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS)["4"]["inputs"] == {"images": ["2", 0], "filename_prefix": "out"}


def test_ui_to_api_bypass_falls_back_to_first_input_of_matching_type():
    workflow = ui_workflow(
        [ui_node(1, "LoadImage", ["cat.png", "image"]),
         ui_node(2, "ApplyMask", inputs=[("mask", "MASK", 1), ("image", "IMAGE", 2)], mode=4),
         ui_node(3, "SaveImage", ["out"], inputs=[("images", "IMAGE", 3)])],
        [[1, 1, 1, 2, 0, "MASK"], [2, 1, 0, 2, 1, "IMAGE"], [3, 2, 0, 3, 0, "IMAGE"]])
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS)["3"]["inputs"] == {"images": ["1", 0], "filename_prefix": "out"}


def test_ui_to_api_bypass_without_matching_input_drops_the_link():
    workflow = ui_workflow(
        [ui_node(1, "EmptyLatentImage", [512, 512, 1]),
         ui_node(2, "VAEDecode", inputs=[("samples", "LATENT", 1), ("vae", "VAE", None)], mode=4),
         ui_node(3, "SaveImage", ["out"], inputs=[("images", "IMAGE", 2)])],
        [[1, 1, 0, 2, 0, "LATENT"], [2, 2, 0, 3, 0, "IMAGE"]])
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS)["3"]["inputs"] == {"filename_prefix": "out"}


def test_ui_to_api_follows_reroute_chain_and_drops_unconnected_reroute():
    workflow = ui_workflow(
        [ui_node(1, "LoadImage", ["cat.png", "image"]),
         ui_node(2, "Reroute", inputs=[("", "*", 1)]),
         ui_node(3, "Reroute", inputs=[("", "*", 2)]),
         ui_node(4, "SaveImage", ["first"], inputs=[("images", "IMAGE", 3)]),
         ui_node(5, "Reroute", inputs=[("", "*", None)]),
         ui_node(6, "SaveImage", ["second"], inputs=[("images", "IMAGE", 4)])],
        [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"], [4, 5, 0, 6, 0, "*"]])
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS) == {
        "1": api_node("LoadImage", {"image": "cat.png"}),
        "4": api_node("SaveImage", {"filename_prefix": "first", "images": ["1", 0]}),
        "6": api_node("SaveImage", {"filename_prefix": "second"}),
    }


def test_ui_to_api_primitive_node_value_feeds_every_linked_widget():
    workflow = ui_workflow(
        [ui_node(1, "PrimitiveNode", [768, "fixed"], title="size"),
         ui_node(2, "EmptyLatentImage", [512, 512, 1],
                 inputs=[("width", "INT", 1), ("height", "INT", 3)]),
         ui_node(3, "Reroute", inputs=[("", "*", 2)])],
        [[1, 1, 0, 2, 0, "INT"], [2, 1, 0, 3, 0, "INT"], [3, 3, 0, 2, 1, "INT"]])
    for socket in workflow["nodes"][1]["inputs"]:
        socket["widget"] = {"name": socket["name"]}
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS) == {
        "2": api_node("EmptyLatentImage", {"width": 768, "height": 768, "batch_size": 1}),
    }


def test_ui_to_api_ignores_notes():
    workflow = ui_workflow(
        [ui_node(1, "Note", ["Load a checkpoint first."]),
         ui_node(2, "MarkdownNote", ["# Usage\nPick a model."]),
         ui_node(3, "CheckpointLoaderSimple", ["sdxl.safetensors"])],
        [])
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS) == {
        "3": api_node("CheckpointLoaderSimple", {"ckpt_name": "sdxl.safetensors"}),
    }


def test_ui_to_api_linked_widget_takes_the_link_and_keeps_later_widgets_in_place():
    workflow = copy.deepcopy(TEXT_TO_IMAGE)
    workflow["nodes"].append(ui_node(10, "SeedGenerator", [99, "increment"]))
    sampler = next(node for node in workflow["nodes"] if node["id"] == 3)
    sampler["inputs"][4]["link"] = 10
    workflow["links"].append([10, 10, 0, 3, 4, "INT"])
    prompt = ui_to_api(workflow, NODE_CLASS_MAPPINGS)
    assert prompt["3"]["inputs"] == {**TEXT_TO_IMAGE_PROMPT["3"]["inputs"], "seed": ["10", 0]}
    assert prompt["10"] == api_node("SeedGenerator", {"seed": 99})


def test_ui_to_api_force_input_takes_no_widget_value():
    workflow = ui_workflow(
        [ui_node(1, "TagPicker", [["cat", "bird"]]),
         ui_node(2, "ShowText", [25], inputs=[("text", "STRING", 1)])],
        [[1, 1, 0, 2, 0, "STRING"]])
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS) == {
        "1": api_node("TagPicker", {"tags": {"__value__": ["cat", "bird"]}}),
        "2": api_node("ShowText", {"max_lines": 25, "text": ["1", 0]}),
    }


def test_ui_to_api_reads_widgets_values_by_name_from_a_dict():
    workflow = ui_workflow(
        [ui_node(1, "LoadImage", ["cat.png", "image"]),
         ui_node(2, "VideoCombine", {"format": "video/mp4", "frame_rate": 24, "filename_prefix": "walk",
                                     "videopreview": {"hidden": False, "paused": False}},
                 inputs=[("images", "IMAGE", 1)])],
        [[1, 1, 0, 2, 0, "IMAGE"]])
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS)["2"] == api_node(
        "VideoCombine", {"frame_rate": 24, "filename_prefix": "walk", "format": "video/mp4", "images": ["1", 0]})


def test_ui_to_api_keeps_unknown_node_types_with_their_links_for_validation_to_name():
    workflow = ui_workflow([ui_node(1, "CheckpointLoaderSimple", ["sdxl.safetensors"]),
                            ui_node(7, "UltimateSDUpscale", [2.0], inputs=[("model", "MODEL", 1)], title="Up"),
                            ui_node(8, "FaceDetailer", None)],
                           [[1, 1, 0, 7, 0, "MODEL"]])
    prompt = ui_to_api(workflow, NODE_CLASS_MAPPINGS)
    assert prompt["7"] == api_node("UltimateSDUpscale", {"model": ["1", 0]}, title="Up")
    assert prompt["8"] == api_node("FaceDetailer", {})


def test_ui_to_api_rejects_subgraph():
    uuid = "4b5c8f2e-1d3a-4c6b-9e7f-0a1b2c3d4e5f"
    workflow = ui_workflow([ui_node(12, uuid, [])], [],
                           definitions={"subgraphs": [{"id": uuid, "name": "Upscale twice", "nodes": [],
                                                       "links": [], "inputs": [], "outputs": []}]})
    with pytest.raises(WorkflowError, match=r"node 12 is an instance of subgraph 'Upscale twice'.*"
                                            r"subgraphs are not supported yet"):
        ui_to_api(workflow, NODE_CLASS_MAPPINGS)


def test_ui_to_api_gives_widgets_without_a_saved_value_their_defaults():
    """As the editor does: a short widgets_values leaves later widgets at their defaults (a combo without one at
    its first choice), and a node saved without widgets_values, as SaveImage in ComfyUI's default.json, gets
    every default."""
    workflow = ui_workflow([ui_node(3, "KSampler", [5, "randomize", 12]), ui_node(9, "SaveImage", None),
                            ui_node(10, "SaveImage", [])], [])
    assert "widgets_values" not in workflow["nodes"][1]
    prompt = ui_to_api(workflow, NODE_CLASS_MAPPINGS)
    assert prompt["3"]["inputs"] == {"seed": 5, "steps": 12, "cfg": 8.0, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0}
    assert prompt["9"]["inputs"] == prompt["10"]["inputs"] == {"filename_prefix": "ComfyUI"}
    workflow["nodes"][1]["widgets_values"] = None
    assert ui_to_api(workflow, NODE_CLASS_MAPPINGS)["9"]["inputs"] == {"filename_prefix": "ComfyUI"}


def test_ui_to_api_rejects_link_missing_from_links():
    workflow = ui_workflow([ui_node(2, "SaveImage", ["out"], inputs=[("images", "IMAGE", 99)])], [])
    with pytest.raises(WorkflowError, match=r"node 2 input 'images' refers to link 99"):
        ui_to_api(workflow, NODE_CLASS_MAPPINGS)


def test_ui_to_api_rejects_reroute_loop():
    workflow = ui_workflow(
        [ui_node(1, "Reroute", inputs=[("", "*", 2)]),
         ui_node(2, "Reroute", inputs=[("", "*", 1)]),
         ui_node(3, "SaveImage", ["out"], inputs=[("images", "IMAGE", 3)])],
        [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 1, 0, "*"], [3, 1, 0, 3, 0, "*"]])
    with pytest.raises(WorkflowError, match=r"node 3 input 'images' is fed by a loop"):
        ui_to_api(workflow, NODE_CLASS_MAPPINGS)


def test_ui_to_api_rejects_primitive_node_without_value():
    workflow = ui_workflow(
        [ui_node(1, "PrimitiveNode", []),
         ui_node(2, "SeedGenerator", [1, "fixed"], inputs=[("seed", "INT", 1)])],
        [[1, 1, 0, 2, 0, "INT"]])
    with pytest.raises(WorkflowError, match=r"PrimitiveNode 1 must hold its value in widgets_values\[0\]; got \[\]"):
        ui_to_api(workflow, NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("workflow, message", [
    ({"3": {"class_type": "KSampler", "inputs": {}}}, r"must be an object with a 'nodes' list; got an object"),
    ({"nodes": [{"id": 1}], "links": []}, r"each node must be an object with an 'id' and a string 'type'"),
    ({"nodes": [{"id": 1, "type": "LoadImage"}], "links": [[1, 1, 0, 2]]}, r"each link must be .*; got \[1, 1, 0, 2\]"),
    ({"nodes": [{"id": 1, "type": "LoadImage"}], "links": [[1, 5, 0, 1, 0, "IMAGE"]]},
     r"link 1 comes from node 5, which is not in the workflow"),
    ({"nodes": [{"id": 1, "type": "LoadImage", "widgets_values": "cat.png"}], "links": []},
     r"node 1 widgets_values must be a list or an object; got 'cat.png'"),
])
def test_ui_to_api_rejects_malformed_workflow(workflow, message):
    with pytest.raises(WorkflowError, match=message):
        ui_to_api(workflow, NODE_CLASS_MAPPINGS)
