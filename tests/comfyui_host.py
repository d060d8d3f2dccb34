"""Real ComfyUI for tests: its own environment, and a server that runs API-format prompts (``interop.md`` §5).

ComfyUI cannot be imported into the test process (its top-level ``nodes`` module shadows ours), so it runs as a
server in a subprocess, from its own venv, and tests talk to it over HTTP on 127.0.0.1.

- :func:`prepare_environment` builds that venv once and reuses it: torch 2.13.0 (the local CPU build), ComfyUI's
  ``requirements.txt`` without torch/torchvision/torchaudio/spandrel, Atelier's ``requirements.txt`` (so the pack
  loads inside ComfyUI), and a stub ``torchvision`` package (no torchvision build works with this torch; the stub
  lets ComfyUI's modules that import it at module level load, and the nodes that really need it stay broken).
- :class:`ComfyUIServer` starts ``main.py`` on a scratch base directory (models, custom_nodes with the pack
  symlinked in, input, output, temp, user), so nothing is written into the ComfyUI source tree; its bytecode goes
  to a cache of our own (``PYTHONPYCACHEPREFIX``).

Run ``python tests/comfyui_host.py PATH_TO_COMFYUI`` to build the environment outside pytest and print its timing.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI_PATH_VARIABLE = "ATELIER_COMFYUI"  # .ci/run sets it where ../shared/comfyui exists
DEFAULT_ENVIRONMENT_ROOT = os.path.join(REPO, ".comfyui")  # git-ignored
CPU_TORCH = "torch==2.13.0"  # the local CPU build; an unpinned torch would pull a CUDA build of several GB
# Never installed into ComfyUI's venv: torch is installed first and held; no torchvision or torchaudio build
# matches this torch; spandrel requires torchvision. Atelier's requirements.txt (the nodes' runtime) names none of
# these, nor the frontend: ComfyUI's own frontend pin stays.
SKIPPED_FROM_COMFYUI = frozenset({"torch", "torchvision", "torchaudio", "spandrel"})
# Bumped whenever the build steps change, so that an existing environment is brought up to date (the requirement
# lists and the written files are part of the fingerprint already).
RECIPE_VERSION = 2
STUB_TORCHVISION_DOC = ('"""Stub: no torchvision build works with torch 2.13.0 (CPU). ComfyUI modules import it at\n'
                        'module level; the nodes that call into it fail if used (see sitecustomize.py)."""\n')
# Runs at every start of the venv's Python. transformers decides that torchvision exists when the module can be
# found, then imports torchvision.transforms names the stub lacks: so it must decide before the stub is findable.
SITECUSTOMIZE = '''"""Written by Atelier's tests/comfyui_host.py: ComfyUI imports torchvision at module level, and no
torchvision build works with torch 2.13.0 (CPU). transformers first caches that torchvision is absent (true), then
an empty stub becomes importable for ComfyUI's modules."""
import importlib.util
import sys

if importlib.util.find_spec("transformers") is not None:
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # lru-cached: False from now on
sys.path.append({stubs!r})
'''
# float32 everywhere, so that differences from Atelier are float32 arithmetic and not storage precision; no
# browser, no API nodes (they are network clients), no previews.
FLOAT32_FLAGS = ("--force-fp32", "--fp32-unet", "--fp32-vae", "--fp32-text-enc")
QUIET_FLAGS = ("--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none")


class ComfyUIError(RuntimeError):
    """ComfyUI refused or failed a prompt; the message is ComfyUI's own."""


@dataclass(frozen=True)
class ComfyUIEnvironment:
    """A ComfyUI source tree and the venv that runs it."""

    source: str  # the ComfyUI tree (read only: never written into)
    root: str  # our folder: venv/, the bytecode cache and the setup log
    setup_seconds: float  # how long preparing took this time (near 0 when reused)

    @property
    def python(self) -> str:
        return os.path.join(self.root, "venv", "bin", "python")

    @property
    def stubs(self) -> str:
        """The folder of the stub ``torchvision``, put on ``sys.path`` by the venv's ``sitecustomize``."""
        return os.path.join(self.root, "venv", "atelier-stubs")

    @property
    def pycache(self) -> str:
        return os.path.join(self.root, "pycache")


def comfyui_source() -> str | None:
    """The ComfyUI tree named by ``ATELIER_COMFYUI``, or None when unset."""
    path = os.environ.get(COMFYUI_PATH_VARIABLE)
    return os.path.abspath(path) if path else None


def requirement_name(line: str) -> str | None:
    """The normalised project name of a requirements.txt line, or None for blank and comment lines."""
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else None


def filtered_requirements(path: str, skipped: frozenset[str]) -> list[str]:
    """The lines of a requirements file that name a project outside ``skipped``, comments stripped."""
    with open(path) as file:
        lines = [line.split("#", 1)[0].strip() for line in file]
    return [line for line in lines if line and requirement_name(line) not in skipped]


def venv_requirements(source: str) -> list[str]:
    """What ComfyUI's venv gets after torch: ComfyUI's requirements, then Atelier's, each with its exclusions."""
    return (filtered_requirements(os.path.join(source, "requirements.txt"), SKIPPED_FROM_COMFYUI)
            + filtered_requirements(os.path.join(REPO, "requirements.txt"), SKIPPED_FROM_COMFYUI))


def _recipe(source: str) -> str:
    """A fingerprint of everything the environment is built from: a change re-runs the installs."""
    lines = [f"recipe {RECIPE_VERSION}", CPU_TORCH, STUB_TORCHVISION_DOC, SITECUSTOMIZE, *venv_requirements(source)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _run_logged(command: list[str], log) -> None:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"preparing ComfyUI's environment failed ({done.returncode}): {' '.join(command)}; "
                           f"see {log.name}")


def prepare_environment(source: str, root: str = DEFAULT_ENVIRONMENT_ROOT) -> ComfyUIEnvironment:
    """Build (first time) or reuse ComfyUI's venv under ``root``; safe to call from concurrent test runs.

    A fresh build creates the venv, installs torch 2.13.0 first and on its own, then everything else under a
    constraints file that holds that torch, and writes the torchvision stub. A changed requirements file or
    recipe re-runs the installs in the existing venv.
    """
    if not os.path.isfile(os.path.join(source, "main.py")):
        raise FileNotFoundError(f"{source} is not a ComfyUI tree (no main.py)")
    os.makedirs(root, exist_ok=True)
    started = time.monotonic()
    stamp_path = os.path.join(root, "venv", "atelier-recipe.txt")
    recipe = _recipe(source)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second test run waits here, then finds the environment ready
        with contextlib.suppress(FileNotFoundError), open(stamp_path) as stamp:
            if stamp.read() == recipe:
                return ComfyUIEnvironment(source, root, time.monotonic() - started)
        environment = ComfyUIEnvironment(source, root, 0.0)
        with open(os.path.join(root, "setup.log"), "a") as log, tempfile.TemporaryDirectory() as scratch:
            if not os.path.exists(environment.python):
                _run_logged([sys.executable, "-m", "venv", os.path.join(root, "venv")], log)
            pip = [environment.python, "-m", "pip", "install", "--disable-pip-version-check"]
            _run_logged(pip + [CPU_TORCH], log)
            constraints = os.path.join(scratch, "constraints.txt")
            requirements = os.path.join(scratch, "requirements.txt")
            with open(constraints, "w") as file:
                file.write(CPU_TORCH + "\n")
            with open(requirements, "w") as file:
                file.writelines(line + "\n" for line in venv_requirements(source))
            _run_logged(pip + ["-r", requirements, "-c", constraints], log)
        _write_torchvision_stub(environment)
        with open(stamp_path, "w") as stamp:
            stamp.write(recipe)
    return ComfyUIEnvironment(source, root, time.monotonic() - started)


def _write_torchvision_stub(environment: ComfyUIEnvironment) -> None:
    """An empty ``torchvision`` (with an empty ``transforms``) that ComfyUI can import but transformers never sees.

    The stub lives outside site-packages; the venv's ``sitecustomize`` first lets transformers find torchvision
    absent (it caches that answer), then appends the stub's folder to ``sys.path``.
    """
    for package in ("torchvision", os.path.join("torchvision", "transforms")):
        os.makedirs(os.path.join(environment.stubs, package), exist_ok=True)
        with open(os.path.join(environment.stubs, package, "__init__.py"), "w") as file:
            file.write(STUB_TORCHVISION_DOC)
    site_packages = subprocess.run([environment.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site_packages, "sitecustomize.py"), "w") as file:
        file.write(SITECUSTOMIZE.format(stubs=environment.stubs))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the test process dies, so no ComfyUI outlives a killed run."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class ComfyUIServer:
    """One ComfyUI process on 127.0.0.1, on a scratch base directory; use it as a context manager.

    ``base`` receives ``custom_nodes/`` (Atelier's pack symlinked in as ``atelier``), ``models`` (a symlink to
    ``models_dir``, laid out like ComfyUI's ``models/``: checkpoints/, loras/, vae/, embeddings/ ...), and
    ``input/``, ``output/``, ``temp/``, ``user/``. ``server.log`` holds ComfyUI's output.
    """

    def __init__(self, environment: ComfyUIEnvironment, base: str, models_dir: str, extra_args: tuple = (),
                 startup_timeout: float = 300.0, variables: dict[str, str] | None = None):
        self.environment = environment
        self.variables = dict(variables or {})  # environment variables the server gets on top of ours
        self.base = os.path.abspath(base)
        self.models_dir = os.path.abspath(models_dir)
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "server.log")

    def folder(self, name: str) -> str:
        """One of input, output, temp, user under the base directory."""
        return os.path.join(self.base, name)

    def __enter__(self) -> ComfyUIServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        """Start ComfyUI and wait until it answers /system_stats; raises with its log's tail if it exits."""
        os.makedirs(os.path.join(self.base, "custom_nodes"), exist_ok=True)
        for name in ("input", "output", "temp", "user"):
            os.makedirs(self.folder(name), exist_ok=True)
        _symlink(REPO, os.path.join(self.base, "custom_nodes", "atelier"))
        _symlink(self.models_dir, os.path.join(self.base, "models"))
        self.port = free_port()
        command = [self.environment.python, os.path.join(self.environment.source, "main.py"), "--cpu",
                   "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", self.base,
                   "--output-directory", self.folder("output"), "--input-directory", self.folder("input"),
                   "--temp-directory", self.folder("temp"), "--user-directory", self.folder("user"),
                   "--database-url", "sqlite:///:memory:", *FLOAT32_FLAGS, *QUIET_FLAGS, *self.extra_args]
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        environment.update(PYTHONPYCACHEPREFIX=self.environment.pycache, PYTHONUNBUFFERED="1", **self.variables)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.base, env=environment, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyUIError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                self._get("/system_stats", timeout=5)
                return
            time.sleep(0.5)
        self.stop()
        raise ComfyUIError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the process we started (SIGINT, ComfyUI's clean exit; then SIGKILL after ``timeout``)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, characters: int = 4000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as log:
            return log.read()[-characters:]
        return ""

    def _get(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str) -> dict:
        return json.loads(self._get(path))

    def post_json(self, path: str, body: dict) -> dict:
        """POST ``body`` as JSON; a 4xx answer raises :class:`ComfyUIError` carrying ComfyUI's JSON reply."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            raise ComfyUIError(f"POST {path} answered {error.code}: {error.read().decode(errors='replace')}") from None
        return json.loads(text) if text.strip() else {}

    def queue(self, prompt: dict) -> str:
        """Queue an API-format prompt; returns its prompt id. Validation errors raise with ComfyUI's node_errors."""
        return self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The prompt's /history entry once it has finished; an execution error raises with ComfyUI's message."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") != "success":
                    raise ComfyUIError(_execution_error(status))
                return entry
            if self.process.poll() is not None:
                raise ComfyUIError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise ComfyUIError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict[str, list[np.ndarray]]:
        """Queue ``prompt``, wait for it, and return each output node's images as (H, W, C) uint8 arrays."""
        entry = self.wait(self.queue(prompt), timeout)
        images = {}
        for node_id, output in entry.get("outputs", {}).items():
            if output.get("images"):
                images[node_id] = [self.image(item) for item in output["images"]]
        return images

    def image(self, item: dict) -> np.ndarray:
        """An image a node reported (``{"filename", "subfolder", "type"}``), fetched through /view."""
        query = urllib.parse.urlencode({key: item.get(key, "") for key in ("filename", "subfolder", "type")})
        return np.asarray(Image.open(io.BytesIO(self._get(f"/view?{query}"))))

    def free(self) -> None:
        """Unload models and drop every cached node result, so that the next prompt runs from scratch."""
        self.post_json("/free", {"unload_models": True, "free_memory": True})

    def node_types(self) -> set[str]:
        """Every node type the server offers (its /object_info)."""
        return set(self.get_json("/object_info"))


def _execution_error(status: dict) -> str:
    """ComfyUI's own words for a failed prompt, from a /history status entry."""
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            where = "".join(data.get("traceback", [])[-4:]).strip()  # the innermost frames
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message', '').strip()}\n{where}")
        if kind == "execution_interrupted":
            return "interrupted"
    return f"prompt ended with status {status.get('status_str')!r}: {status}"


def _symlink(target: str, link: str) -> None:
    """Point ``link`` at ``target``, replacing a link that points elsewhere."""
    if os.path.islink(link):
        if os.readlink(link) == target:
            return
        os.unlink(link)
    elif os.path.exists(link):
        raise FileExistsError(f"{link} exists and is not a symlink; ComfyUI's base directory must be a scratch folder")
    os.symlink(target, link)


if __name__ == "__main__":
    tree = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else comfyui_source()
    if tree is None:
        sys.exit(f"usage: python {sys.argv[0]} PATH_TO_COMFYUI (or set {COMFYUI_PATH_VARIABLE})")
    built = prepare_environment(tree)
    print(f"ComfyUI environment ready in {built.setup_seconds:.0f} s: {built.python}")
