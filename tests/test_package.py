"""The pack face: the folder loads the way ComfyUI loads a custom-node folder, and every node follows the rules."""

import doctest
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import nodes
from web.folders import DataFolders
from web.node_info import input_specs
from web.registry import node_classes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ComfyUI core node names a pack must never shadow (a sample of nodes.py and comfy_extras).
COMFY_CORE_NAMES = {
    "KSampler", "KSamplerAdvanced", "CheckpointLoaderSimple", "CheckpointLoader", "CLIPTextEncode", "CLIPSetLastLayer",
    "VAEDecode", "VAEEncode", "VAEDecodeTiled", "VAEEncodeTiled", "VAELoader", "EmptyLatentImage", "LatentUpscale",
    "LatentUpscaleBy", "LoraLoader", "LoraLoaderModelOnly", "LoadImage", "LoadImageMask", "SaveImage", "PreviewImage",
    "ImageScale", "ImageScaleBy", "ImageInvert", "ImageCrop", "ImageBatch", "ImagePadForOutpaint", "EmptyImage",
    "ConditioningCombine", "ConditioningSetArea", "ControlNetLoader", "ControlNetApply", "UpscaleModelLoader",
    "ImageUpscaleWithModel", "SamplerCustom", "KSamplerSelect", "BasicScheduler", "RandomNoise", "CFGGuider",
    "PrimitiveNode", "Reroute", "Note", "MarkdownNote",
}

# Loads the pack as ComfyUI does, with ComfyUI's own top-level `nodes` module already imported.
LOAD_AS_COMFYUI = """
import importlib.util, json, os, sys
sys.path.insert(0, os.environ["FAKE_COMFY"])
import nodes as comfy_nodes  # ComfyUI's nodes.py
# ComfyUI names the module after the folder's full path, dots replaced (nodes.py, load_custom_node).
name = os.path.join(os.environ["PACK"]).replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(os.environ["PACK"], "__init__.py"),
                                              submodule_search_locations=[os.environ["PACK"]])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
print(json.dumps({"mappings": sorted(pack.NODE_CLASS_MAPPINGS), "display": sorted(pack.NODE_DISPLAY_NAME_MAPPINGS),
                  "web_directory": pack.WEB_DIRECTORY, "comfy_nodes_intact": sys.modules["nodes"] is comfy_nodes,
                  "imported_web": sorted(m for m in sys.modules if m == "web" or m.endswith(".web"))}))
"""


def test_folder_loads_as_a_comfyui_custom_node_pack(tmp_path):
    (tmp_path / "nodes.py").write_text("NODE_CLASS_MAPPINGS = {'KSampler': object}\n")
    env = {**os.environ, "FAKE_COMFY": str(tmp_path), "PACK": ROOT}
    done = subprocess.run([sys.executable, "-c", LOAD_AS_COMFYUI], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert loaded["mappings"] == sorted(nodes.NODE_CLASS_MAPPINGS)
    assert loaded["display"] == sorted(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    assert loaded["web_directory"] == "./js" and os.path.isdir(os.path.join(ROOT, "js"))
    assert loaded["comfy_nodes_intact"] and loaded["imported_web"] == []


def test_exported_names_are_prefixed_and_never_core_names():
    for name in nodes.NODE_CLASS_MAPPINGS:
        assert name.startswith("Atelier") and name not in COMFY_CORE_NAMES, name
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) <= set(nodes.NODE_CLASS_MAPPINGS)


def all_node_classes(tmp_path):
    """Every node the app can offer: the registry's and the opt-in evaluation nodes."""
    from nodes.p4d import nodes as evaluation_nodes

    return {**node_classes(DataFolders.under(str(tmp_path)), str(tmp_path / "models")),
            **evaluation_nodes.NODE_CLASS_MAPPINGS}


def test_every_number_input_declares_its_bounds(tmp_path):
    classes = all_node_classes(tmp_path)
    assert {"LoadImage", "SaveImage", "ImageScale"} <= classes.keys()
    for name, cls in classes.items():
        for spec in input_specs(cls):
            if spec.type in ("INT", "FLOAT"):
                missing = {"default", "min", "max", "step"} - spec.options.keys()
                assert not missing, f"{name}.{spec.name} lacks {sorted(missing)}"
                assert spec.options["min"] <= spec.options["default"] <= spec.options["max"], f"{name}.{spec.name}"
            if spec.type == "FLOAT":
                assert "round" in spec.options, f"{name}.{spec.name} lacks round"


def test_every_node_describes_itself(tmp_path):
    for name, cls in all_node_classes(tmp_path).items():
        for attribute in ("RETURN_TYPES", "RETURN_NAMES", "OUTPUT_TOOLTIPS", "FUNCTION", "CATEGORY", "DESCRIPTION"):
            assert hasattr(cls, attribute), f"{name} lacks {attribute}"
        assert len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), name
        for spec in input_specs(cls):
            if spec.section != "hidden":
                assert spec.options.get("tooltip"), f"{name}.{spec.name} has no tooltip"


def library_modules():
    for package in ("nodes", "web"):
        module = importlib.import_module(package)
        yield package
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
            if not info.name.endswith("__main__"):
                yield info.name


@pytest.mark.parametrize("name", sorted(library_modules()))
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


SHARED_LAYERS = {"common", "models", "sampling"}


def _imported_packages(path: str) -> set[str]:
    """The ``nodes`` subpackages a module under nodes/ imports (relative imports resolved), and "web" if it does."""
    import ast

    package = os.path.relpath(os.path.dirname(path), os.path.join(ROOT, "nodes")).split(os.sep)
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update("web" for alias in node.names if alias.name.split(".")[0] == "web")
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.update({"web"} & {(node.module or "").split(".")[0]})
        elif isinstance(node, ast.ImportFrom):  # relative: level 1 is this package, each level more one folder up
            parts = [*package[:len(package) - node.level + 1], *(node.module.split(".") if node.module else [])]
            found.update(parts[:1])
    return found


def test_techniques_import_only_the_shared_layers_and_nodes_never_imports_web():
    """The layering rule (DEVELOPERS.md): techniques import common, models and sampling, never each other;
    the shared layers import no technique; nothing under nodes/ imports web/."""
    nodes_dir = os.path.join(ROOT, "nodes")
    packages = {name for name in os.listdir(nodes_dir) if os.path.isfile(os.path.join(nodes_dir, name, "__init__.py"))}
    assert SHARED_LAYERS <= packages
    problems = []
    for package in sorted(packages):
        for folder, _, files in os.walk(os.path.join(nodes_dir, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                for target in _imported_packages(path) - {package}:
                    if target == "web" or (target in packages and target not in SHARED_LAYERS) or (
                            package in SHARED_LAYERS and target not in SHARED_LAYERS and target in packages):
                        problems.append(f"{os.path.relpath(path, ROOT)} imports {target}")
    assert problems == []


def test_the_layering_check_catches_a_technique_importing_another(tmp_path, monkeypatch):
    module = tmp_path / "nodes" / "panorama" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ..highres.tiling import TileSettings\nfrom ..common.images import to_channels_first\n"
                      "from web.server import make_app\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert _imported_packages(str(module)) == {"highres", "common", "web"}
