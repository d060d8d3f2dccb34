"""The server's file routes: images (view, upload), the user's files and settings, models, example workflows.

Every name that comes from a request goes through :func:`nodes.common.paths.confine`, so ``..``, absolute
paths, URL-encoded traversal and symlinks that point out of a folder are all refused. Every write is atomic.
Responses never carry absolute server paths.
"""

from __future__ import annotations

import hashlib
import io
import json
import mimetypes
import os
import re
from collections.abc import Collection
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from nodes.common.paths import PathOutsideFolderError, atomic_write, confine

from .folders import FILE_KINDS, split_annotation
from .limits import Limits, pixel_budget_error
from .json_io import json_error, json_response, parse_json, read_json
from .server_state import CONFIG, STATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS_DIR = os.path.join(ROOT, "workflows")
TEMPLATE_MODULE = "atelier"
USER = "default"  # single-user mode: ComfyUI's default user folder
SETTINGS_FILE = "comfy.settings.json"
VIEW_PREVIEW_MAX_SIZE = 1024  # a re-encoded ?preview= image is for a node's thumbnail, not for saving
# Served inline, under their own type: raster images only. SVG and XHTML can run scripts in our origin, so they,
# and every other file, go out as application/octet-stream attachments.
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/avif",
                          "image/tiff"})
# File systems allow 255 bytes per name; an atomic write's temporary name adds 14 and a renamed upload " (n)".
MAX_NAME_BYTES = 200
# A name holds printable characters only: control characters break headers and logs, NUL breaks the OS calls.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# An offline tool does not ask api.comfy.org for release notes unless the user turns it back on.
DEFAULT_SETTINGS = {"Comfy.Notification.ShowVersionUpdates": False}

routes = web.RouteTableDef()


def _not_found(what: str) -> web.Response:
    return web.json_response({"error": f"{what} not found"}, status=404)


async def _in_thread(request: web.Request, function, *args):
    return await request.app[STATE].loop.run_in_executor(None, function, *args)


# --- images -------------------------------------------------------------------------------------------------------

def _file_in(request: web.Request, kind: str, subfolder: str, filename: str) -> str:
    """The confined path of ``subfolder/filename`` in the data folder ``kind``; raises web errors."""
    try:
        base = request.app[CONFIG].folders.folder(kind)
    except ValueError as error:
        raise json_error(web.HTTPBadRequest, str(error)) from None
    return _confined(base, os.path.join(subfolder, filename) if subfolder else filename)


def _confined(base: str, name: str) -> str:
    """:func:`confine` as web errors: a name leaving ``base`` is a 403, one with a part too long a 400."""
    too_long = [part for part in name.replace("\\", "/").split("/")
                if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES]
    if too_long:
        raise json_error(web.HTTPBadRequest, f"a file or folder name may hold at most {MAX_NAME_BYTES} bytes; got "
                                             f"{len(too_long[0].encode('utf-8', 'surrogateescape'))}")
    try:
        return confine(base, name)
    except PathOutsideFolderError as error:
        raise json_error(web.HTTPForbidden, str(error)) from None


@routes.get("/view")
async def view(request: web.Request) -> web.StreamResponse:
    filename, kind = split_annotation(request.query.get("filename", ""), request.query.get("type") or "output")
    if not filename:
        return web.json_response({"error": "filename is required"}, status=400)
    path = _file_in(request, kind, request.query.get("subfolder", ""), filename)
    if not os.path.isfile(path):
        return _not_found(f"{kind} file {filename!r}")
    preview, channel = request.query.get("preview"), request.query.get("channel", "rgba")
    if preview or channel != "rgba":
        try:
            body, content_type = await _in_thread(request, _reencode, path, preview, channel,
                                                  request.app[CONFIG].limits.max_pixels)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
            return json_response({"error": f"cannot re-encode {filename!r}: {error}"}, status=400)
        return web.Response(body=body, content_type=content_type)
    return web.FileResponse(path, headers=download_headers(path))


def download_headers(path: str) -> dict[str, str]:
    """Content-Type and Content-Disposition for serving a user's file: raster images inline, as their type;
    anything else (SVG, HTML, scripts, unknown) as an ``application/octet-stream`` attachment, so that no file
    a user uploaded can run in the editor's origin. (``nosniff`` comes with every response, from the security
    middleware.)

    Example:
        >>> download_headers("/data/cat.png")["Content-Type"], download_headers("/data/x.svg")["Content-Type"]
        ('image/png', 'application/octet-stream')
    """
    content_type = mimetypes.guess_type(path)[0]
    name = CONTROL_CHARACTERS.sub("", os.path.basename(path)).replace('"', "")  # a header holds one line
    if content_type in INLINE_TYPES:
        return {"Content-Type": content_type, "Content-Disposition": f'inline; filename="{name}"'}
    return {"Content-Type": "application/octet-stream", "Content-Disposition": f'attachment; filename="{name}"'}


def _reencode(path: str, preview: str | None, channel: str, max_pixels: int) -> tuple[bytes, str]:
    """The image at ``path`` as a smaller webp or jpeg (``preview="webp;90"``) or reduced to some channels;
    an image over the pixel budget (``max_pixels``) is refused before it is decoded."""
    if channel not in ("rgba", "rgb", "a"):
        raise ValueError(f"channel must be rgba, rgb or a; got {channel!r}")
    with Image.open(path) as image:
        too_large = pixel_budget_error(repr(os.path.basename(path)), 1, image.height, image.width,
                                       Limits(max_pixels))
        if too_large:
            raise ValueError(too_large)
        image.load()
    buffer = io.BytesIO()
    if channel == "a":
        alpha = image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)
        Image.merge("RGBA", (alpha, alpha, alpha, alpha)).save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    if channel == "rgb":
        image = image.convert("RGB")
    if not preview:
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    format_, _, quality = preview.partition(";")
    if format_ not in ("webp", "jpeg") or not (quality or "90").isdigit():
        raise ValueError(f"preview must be webp;QUALITY or jpeg;QUALITY; got {preview!r}")
    image.thumbnail((VIEW_PREVIEW_MAX_SIZE, VIEW_PREVIEW_MAX_SIZE))
    if format_ == "jpeg" or "A" not in image.getbands():
        image = image.convert("RGB") if format_ == "jpeg" else image
    image.save(buffer, format=format_.upper(), quality=int(quality or 90))
    return buffer.getvalue(), f"image/{format_}"


async def _read_upload(request: web.Request) -> tuple[bytes, str, str, str, bool, Any]:
    """The multipart upload's image bytes, file name, folder kind, subfolder, overwrite flag and whole form."""
    try:
        form = await request.post()
    except (HttpProcessingError, ValueError) as error:  # a part header with control characters, a bad boundary
        raise json_error(web.HTTPBadRequest, f"the body is not a valid multipart form: {error}") from None
    image = form.get("image")
    if not isinstance(image, web.FileField):
        raise json_error(web.HTTPBadRequest, "the form needs an 'image' file field")
    filename, subfolder = image.filename, str(form.get("subfolder") or "")
    if (not filename or filename in (".", "..") or os.path.basename(filename) != filename or "\\" in filename
            or CONTROL_CHARACTERS.search(filename)):
        raise json_error(web.HTTPBadRequest, f"the file name must be a plain name of printable characters; got "
                                             f"{filename!r} (put folders in 'subfolder')")
    if CONTROL_CHARACTERS.search(subfolder):
        raise json_error(web.HTTPBadRequest, f"subfolder must hold printable characters only; got {subfolder!r}")
    kind = str(form.get("type") or "input")
    if kind not in FILE_KINDS:
        raise json_error(web.HTTPBadRequest, f"type must be one of {', '.join(FILE_KINDS)}; got {kind!r}")
    return image.file.read(), filename, kind, subfolder, str(form.get("overwrite")).lower() in ("true", "1"), form


def _check_image_bytes(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.verify()


def _same_bytes(path: str, data: bytes) -> bool:
    with open(path, "rb") as existing:
        return hashlib.sha256(existing.read()).digest() == hashlib.sha256(data).digest()


def _claim(path: str) -> bool:
    """Create ``path`` empty if no file or folder has that name; the name is then ours, whatever runs beside us."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        return False
    return True


def _write_claimed(path: str, data: bytes) -> None:
    """Fill a file that :func:`_claim` created; on failure the empty claim goes too."""
    try:
        atomic_write(path, data)
    except BaseException:
        os.unlink(path)
        raise


def _write_upload(path: str, data: bytes, overwrite: bool) -> str:
    """Write an upload to ``path``, or, without ``overwrite``, to the first free ``name (n).ext`` (a file with the
    same bytes is reused); returns the path written. Names are claimed with O_EXCL before the bytes go in, so
    concurrent uploads of one name each get their own file.

    Raises:
        IsADirectoryError: ``path`` is a folder and ``overwrite`` is set.
    """
    if overwrite:
        if os.path.isdir(path):
            raise IsADirectoryError(f"{os.path.basename(path)!r} is a folder")
        atomic_write(path, data)
        return path
    stem, extension = os.path.splitext(path)
    candidate, number = path, 0
    while not _claim(candidate):
        if os.path.isfile(candidate) and _same_bytes(candidate, data):
            return candidate  # the same bytes: keep one copy (a claim still being written is empty, never equal)
        number += 1
        candidate = f"{stem} ({number}){extension}"
    _write_claimed(candidate, data)
    return candidate


async def _store_upload(request: web.Request, data: bytes, filename: str, kind: str, subfolder: str,
                        overwrite: bool, prepare=None) -> web.Response:
    path = _file_in(request, kind, subfolder, filename)
    try:
        await _in_thread(request, _check_image_bytes, data)
    except Image.DecompressionBombError as error:
        return json_response({"error": f"{filename!r} is refused: {error}"}, status=400)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        return json_response({"error": f"{filename!r} is not an image: {error}"}, status=400)
    if prepare is not None:
        data = await _in_thread(request, prepare, data)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        path = await _in_thread(request, _write_upload, path, data, overwrite)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        return json_response({"error": f"cannot store {filename!r} in {subfolder or 'the folder'!r}: a file or "
                                       f"folder is in the way ({error.strerror or error})"}, status=409)
    request.app[STATE].object_info = None  # LoadImage's list of files changed
    return web.json_response({"name": os.path.basename(path), "subfolder": subfolder, "type": kind})


@routes.post("/upload/image")
async def upload_image(request: web.Request) -> web.Response:
    data, filename, kind, subfolder, overwrite, _ = await _read_upload(request)
    return await _store_upload(request, data, filename, kind, subfolder, overwrite)


@routes.post("/upload/mask")
async def upload_mask(request: web.Request) -> web.Response:
    """The mask editor's save: the uploaded image's alpha put onto the referenced original."""
    data, filename, kind, subfolder, overwrite, form = await _read_upload(request)
    try:
        reference = parse_json(str(form.get("original_ref") or ""))
        original = _file_in(request, str(reference.get("type") or "input"), str(reference.get("subfolder") or ""),
                            str(reference["filename"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return web.json_response({"error": "original_ref must be JSON with a filename"}, status=400)
    if not os.path.isfile(original):
        return _not_found("the original image")
    return await _store_upload(request, data, filename, kind, subfolder, overwrite,
                               prepare=lambda mask: _apply_mask(original, mask))


def _apply_mask(original_path: str, mask_png: bytes) -> bytes:
    with Image.open(original_path) as original, Image.open(io.BytesIO(mask_png)) as mask:
        metadata = PngImagePlugin.PngInfo()
        for key, value in getattr(original, "text", {}).items():
            metadata.add_text(key, value)
        result = original.convert("RGBA")
        result.putalpha(mask.convert("RGBA").getchannel("A").resize(result.size))
    buffer = io.BytesIO()
    result.save(buffer, format="PNG", pnginfo=metadata)
    return buffer.getvalue()


async def internal_files(request: web.Request) -> web.Response:
    """``/internal/files/{input,output,temp}``: the folder's file names, newest first (the assets panel)."""
    try:
        folder = request.app[CONFIG].folders.folder(request.match_info["kind"])
    except ValueError as error:
        return web.json_response({"error": str(error)}, status=404)
    entries = [entry for entry in os.scandir(folder) if entry.is_file() and not entry.name.startswith(".")]
    return web.json_response([e.name for e in sorted(entries, key=lambda e: e.stat().st_mtime, reverse=True)])


# --- the user's files and settings ---------------------------------------------------------------------------------

def _user_dir(request: web.Request) -> str:
    folder = os.path.join(request.app[CONFIG].folders.user, USER)
    os.makedirs(folder, exist_ok=True)
    return folder


def _user_path(request: web.Request, name: str) -> str:
    return _confined(_user_dir(request), name)


def _file_info(path: str, relative: str) -> dict[str, Any]:
    """A user file's listing entry; the editor reads the times as milliseconds."""
    stat = os.stat(path)
    return {"path": relative, "size": stat.st_size, "modified": int(stat.st_mtime * 1000),
            "created": int(stat.st_ctime * 1000)}


@routes.get("/users")
async def users(request: web.Request) -> web.Response:
    return web.json_response({"storage": "server", "migrated": True})


@routes.post("/users")
async def create_user(request: web.Request) -> web.Response:
    return web.json_response({"error": "Atelier runs in single-user mode"}, status=400)


def _settings_path(request: web.Request) -> str:
    return os.path.join(_user_dir(request), SETTINGS_FILE)


def is_new_user(request: web.Request) -> bool:
    """Whether the user has never saved a setting, which the editor does on its first start."""
    return not os.path.exists(_settings_path(request))


def _settings_error(text: bytes | str) -> str | None:
    """Why ``text`` cannot be the settings file (strict JSON, an object), or None when it can."""
    try:
        settings = parse_json(text)
    except ValueError as error:
        return f"{SETTINGS_FILE} is not valid JSON: {error}"
    if not isinstance(settings, dict):
        return f"{SETTINGS_FILE} must hold a JSON object; got {type(settings).__name__}"
    return None


def _read_settings(request: web.Request) -> dict:
    """The user's settings; a file that is not a JSON object (edited by hand) is a 409 that names the file."""
    path = _settings_path(request)
    if not os.path.exists(path):
        return dict(DEFAULT_SETTINGS)
    with open(path, "rb") as file:
        text = file.read()
    problem = _settings_error(text)
    if problem:
        raise json_error(web.HTTPConflict, f"{problem}; fix it or delete it in the user folder")
    return parse_json(text)


def _write_settings(request: web.Request, settings: dict) -> None:
    atomic_write(_settings_path(request), json.dumps(settings, indent=2, allow_nan=False).encode())


@routes.get("/settings")
async def get_settings(request: web.Request) -> web.Response:
    return json_response(_read_settings(request))


@routes.get("/settings/{id}")
async def get_setting(request: web.Request) -> web.Response:
    return json_response(_read_settings(request).get(request.match_info["id"]))


@routes.post("/settings")
async def post_settings(request: web.Request) -> web.Response:
    changes = await read_json(request)
    if not isinstance(changes, dict):
        return web.json_response({"error": "settings must be a JSON object"}, status=400)
    _write_settings(request, {**_read_settings(request), **changes})
    return web.Response()


@routes.post("/settings/{id}")
async def post_setting(request: web.Request) -> web.Response:
    _write_settings(request, {**_read_settings(request), request.match_info["id"]: await read_json(request)})
    return web.Response()


def _flag(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    return default if value is None else value.lower() in ("true", "1")


@routes.get("/userdata")
async def list_userdata(request: web.Request) -> web.Response:
    directory = request.query.get("dir")
    if not directory:
        return web.json_response({"error": "dir is required"}, status=400)
    folder = _user_path(request, directory)
    if not os.path.isdir(folder):
        return web.json_response([])  # a new user has no workflows/ yet: an empty list, not an error
    recurse, full_info, split = (_flag(request, n, False) for n in ("recurse", "full_info", "split"))
    entries = []
    for current, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(current, name), folder).replace(os.sep, "/")
            if full_info:
                entries.append(_file_info(os.path.join(current, name), relative))
            elif split:
                entries.append([relative, *relative.split("/")])
            else:
                entries.append(relative)
        if not recurse:
            break
    return web.json_response(entries)


@routes.get("/v2/userdata")
async def list_userdata_v2(request: web.Request) -> web.Response:
    relative = request.query.get("path", "").strip("/")
    folder = _user_path(request, relative) if relative else _user_dir(request)
    if not os.path.isdir(folder):
        return _not_found(f"folder {relative!r}")
    entries = []
    for entry in sorted(os.scandir(folder), key=lambda e: (not e.is_dir(), e.name)):
        path = f"{relative}/{entry.name}" if relative else entry.name
        item = {"name": entry.name, "path": path, "type": "directory" if entry.is_dir() else "file"}
        if entry.is_file():
            stat = entry.stat()
            item.update(size=stat.st_size, modified=int(stat.st_mtime * 1000))
        entries.append(item)
    return web.json_response(entries)


@routes.get("/userdata/{file}")
async def get_userdata(request: web.Request) -> web.StreamResponse:
    path = _user_path(request, request.match_info["file"])
    if not os.path.isfile(path):
        return _not_found(f"user file {request.match_info['file']!r}")
    return web.FileResponse(path, headers=download_headers(path))


def _write_user_file(path: str, data: bytes, overwrite: bool) -> None:
    """Write a user file; without ``overwrite`` the name is claimed with O_EXCL first, so of two concurrent
    writers one gets FileExistsError instead of both replacing each other.

    Raises:
        FileExistsError: the name is taken and ``overwrite`` is off.
        IsADirectoryError: the name is a folder.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"{os.path.basename(path)!r} is a folder")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if overwrite:
        atomic_write(path, data)
    elif _claim(path):
        _write_claimed(path, data)
    else:
        raise FileExistsError(f"{os.path.basename(path)!r} exists")


@routes.post("/userdata/{file}")
async def post_userdata(request: web.Request) -> web.Response:
    relative = request.match_info["file"]
    path = _user_path(request, relative)
    if CONTROL_CHARACTERS.search(relative):
        return json_response({"error": f"a user file name holds printable characters only; got {relative!r}"},
                             status=400)
    data = await request.read()
    if path == _settings_path(request) and _settings_error(data):
        return json_response({"error": _settings_error(data)}, status=400)
    try:
        await _in_thread(request, _write_user_file, path, data, _flag(request, "overwrite", True))
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as error:
        return json_response({"error": f"cannot write {relative!r}: {error}"}, status=409)
    return web.json_response(_file_info(path, relative) if _flag(request, "full_info", False) else relative)


@routes.delete("/userdata/{file}")
async def delete_userdata(request: web.Request) -> web.Response:
    path = _user_path(request, request.match_info["file"])
    if not os.path.isfile(path):
        return _not_found(f"user file {request.match_info['file']!r}")
    os.remove(path)
    return web.Response(status=204)


@routes.post("/userdata/{file}/move/{dest}")
async def move_userdata(request: web.Request) -> web.Response:
    source = _user_path(request, request.match_info["file"])
    relative = request.match_info["dest"]
    destination = _user_path(request, relative)
    if not os.path.isfile(source):
        return _not_found(f"user file {request.match_info['file']!r}")
    if CONTROL_CHARACTERS.search(relative):
        return json_response({"error": f"a user file name holds printable characters only; got {relative!r}"},
                             status=400)
    try:
        await _in_thread(request, _move_user_file, source, destination, _flag(request, "overwrite", True))
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as error:
        return json_response({"error": f"cannot move onto {relative!r}: {error}"}, status=409)
    return web.json_response(_file_info(destination, relative) if _flag(request, "full_info", False) else relative)


def _move_user_file(source: str, destination: str, overwrite: bool) -> None:
    """Rename a user file; without ``overwrite``, a hard link then an unlink, so an existing file (even one
    created a moment ago by another request) is never replaced.

    Raises:
        FileExistsError: ``destination`` exists and ``overwrite`` is off.
        IsADirectoryError: ``destination`` is a folder.
    """
    if os.path.isdir(destination):
        raise IsADirectoryError(f"{os.path.basename(destination)!r} is a folder")
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    if overwrite:
        os.replace(source, destination)
    else:
        os.link(source, destination)
        os.unlink(source)


# --- models and example workflows ----------------------------------------------------------------------------------

def _model_folders(request: web.Request) -> list[str]:
    base = request.app[CONFIG].models_dir
    return sorted(entry.name for entry in os.scandir(base) if entry.is_dir()) if os.path.isdir(base) else []


def _model_files(request: web.Request, folder: str) -> list[str]:
    base = os.path.join(request.app[CONFIG].models_dir, folder)
    return sorted(os.path.relpath(os.path.join(current, name), base).replace(os.sep, "/")
                  for current, _, names in os.walk(base) for name in names if not name.startswith("."))


@routes.get("/models")
async def models(request: web.Request) -> web.Response:
    return web.json_response(_model_folders(request))


@routes.get("/models/{folder}")
async def models_in(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    if folder not in _model_folders(request):
        return _not_found(f"model folder {folder!r}")
    return web.json_response(await _in_thread(request, _model_files, request, folder))


@routes.get("/experiment/models")
async def experiment_models(request: web.Request) -> web.Response:
    return web.json_response([{"name": folder, "folders": [f"models/{folder}"]} for folder in _model_folders(request)])


@routes.get("/experiment/models/{folder}")
async def experiment_models_in(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    if folder not in _model_folders(request):
        return _not_found(f"model folder {folder!r}")
    base = os.path.join(request.app[CONFIG].models_dir, folder)
    files = []
    for name in await _in_thread(request, _model_files, request, folder):
        stat = os.stat(os.path.join(base, name))
        files.append({"name": name, "pathIndex": 0, "modified": stat.st_mtime, "created": stat.st_ctime,
                      "size": stat.st_size})
    return web.json_response(files)


# Node types the frontend draws itself, with no class on the server
FRONTEND_NODE_TYPES = frozenset(("Note", "MarkdownNote", "Reroute", "PrimitiveNode"))


def example_workflows(offered: Collection[str]) -> list[str]:
    """The example workflows whose every node the app offers (an opt-in evaluation node's example is listed only
    where its setting is on)."""
    names = []
    for name in sorted(os.listdir(WORKFLOWS_DIR)):
        if name.endswith(".json"):
            with open(os.path.join(WORKFLOWS_DIR, name), encoding="utf-8") as file:
                types = {node.get("type") for node in json.load(file).get("nodes", [])}
            if types - FRONTEND_NODE_TYPES <= set(offered):
                names.append(name.removesuffix(".json"))
    return names


@routes.get("/workflow_templates")
async def workflow_templates(request: web.Request) -> web.Response:
    return web.json_response({TEMPLATE_MODULE: example_workflows(request.app[STATE].node_classes)})


@routes.get("/workflow_templates/" + TEMPLATE_MODULE + "/{name}")
async def workflow_template(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    offered = example_workflows(request.app[STATE].node_classes)
    if name.removesuffix(".json") not in offered or not name.endswith(".json"):
        return _not_found(f"example workflow {name!r}")
    return web.FileResponse(os.path.join(WORKFLOWS_DIR, name))
