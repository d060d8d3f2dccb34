"""Install what Atelier needs into the running Python, and never change what a ComfyUI host already has.

    python install.py            # inside ComfyUI: the nodes' runtime only; elsewhere: the standalone app
    python install.py --tests    # the standalone app, plus what the tests need (and Debian's chromium, as root)
    python install.py --ray      # the standalone app, plus Ray for `serve --ray` (--tests brings it too)
    python install.py --mode comfyui|standalone   # when the detection below guesses wrong

Inside ComfyUI, a node pack that swaps the host's CUDA torch for a CPU build, or moves its frontend, is the worst
bug a pack can ship. So there only ``requirements.txt`` (the nodes' runtime) is installed, under a pip constraints
file that holds every package already in that Python at its installed version; a requirement the host already
has is skipped (printed, and flagged when its version is not the one we ask for), and neither torch nor the
editor of ``requirements-app.txt`` ever goes in. The run ends by checking that no installed version moved.

The installer is inside ComfyUI when the pack's folder sits in a ``custom_nodes/`` folder (as linked there or as
resolved), the running Python is not a venv inside the pack (the README's standalone commands make one there),
and either that ``custom_nodes/`` belongs to a ComfyUI tree (its parent holds ``main.py`` and ``comfy/``) or the
running Python has one of ComfyUI's own packages (ComfyUI Desktop keeps custom_nodes/ apart from its code).

Standalone, it installs ``requirements.txt`` and ``requirements-app.txt`` (the server and the pinned editor) under
constraints that hold the torch (and torchvision, torchaudio) already installed, so pip fails rather than
replacing it; only where no torch is importable does it install the CPU build ``torch==2.13.0`` first.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIME_REQUIREMENTS = os.path.join(HERE, "requirements.txt")  # the nodes' runtime: all that ComfyUI gets
APP_REQUIREMENTS = os.path.join(HERE, "requirements-app.txt")  # the standalone app's server and pinned editor
TEST_REQUIREMENTS = os.path.join(HERE, "requirements-test.txt")
RAY_REQUIREMENTS = os.path.join(HERE, "requirements-ray.txt")  # optional: prompts on Ray workers
CPU_TORCH = "torch==2.13.0"  # the CPU build pip finds on our machines; plain "torch" pulls a CUDA build of several GB
PINNED = ("torch", "torchvision", "torchaudio")  # standalone: installed versions of these are held as they are
NEVER = ("torchvision", "torchaudio", "timm", "open_clip", "spandrel")  # each would pull in or break a torch
# ComfyUI's requirements.txt installs these and nothing else does; one in the running Python marks ComfyUI's.
COMFYUI_PACKAGES = ("comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs")
MODES = ("comfyui", "standalone")


def normalized(name: str) -> str:
    """A project name as pip compares them (PEP 503): ``Pillow`` and ``comfyui_frontend_package`` match."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """Every distribution installed in this Python, normalised name → version, read in a fresh interpreter."""
    code = ("import importlib.metadata as m\n"
            "for d in m.distributions():\n"
            "    if d.metadata['Name']: print(d.metadata['Name'], d.version)\n")  # a broken one has no name
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    versions: dict[str, str] = {}
    for line in out.splitlines():
        name, version = line.split()
        versions.setdefault(normalized(name), version)  # the first on sys.path is the one Python imports
    return versions


def requirement_lines(path: str) -> list[str]:
    """The requirement specifiers of a requirements file, without comments and blank lines."""
    with open(path, encoding="utf-8") as file:
        lines = [line.split("#", 1)[0].strip() for line in file]
    return [line for line in lines if line]


def custom_nodes_folder(pack_dir: str) -> str | None:
    """The ``custom_nodes/`` folder that holds the pack, as linked there or as resolved; None if neither is."""
    for folder in dict.fromkeys((pack_dir, os.path.realpath(pack_dir))):
        parent = os.path.dirname(folder)
        if os.path.basename(parent) == "custom_nodes":
            return parent
    return None


def detect_mode(pack_dir: str, installed: dict[str, str], python_prefix: str) -> tuple[str, str]:
    """``("comfyui" | "standalone", why)`` for the pack at ``pack_dir`` run by the Python at ``python_prefix``."""
    folder = custom_nodes_folder(pack_dir)
    if folder is None:
        return "standalone", "the pack is not in a custom_nodes/ folder"
    if os.path.realpath(python_prefix).startswith(os.path.realpath(pack_dir) + os.sep):
        return "standalone", f"this Python is a venv of the pack's own ({python_prefix})"
    home = os.path.dirname(folder)
    if os.path.isfile(os.path.join(home, "main.py")) and os.path.isdir(os.path.join(home, "comfy")):
        return "comfyui", f"the pack is in the custom_nodes/ of the ComfyUI tree {home}"
    host_packages = [name for name in COMFYUI_PACKAGES if name in installed]
    if host_packages:
        return "comfyui", f"the pack is in {folder} and this Python has ComfyUI's {host_packages[0]}"
    return "standalone", f"{folder} is in no ComfyUI tree and this Python has none of ComfyUI's packages"


def pip_install(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args], check=True)


def pip_install_holding(requirements: list[str], held: dict[str, str]) -> None:
    """``pip install`` the requirements (specifiers or ``-r FILE``) with every package of ``held`` kept as it is."""
    with tempfile.TemporaryDirectory() as folder:
        constraints = os.path.join(folder, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as file:
            file.writelines(f"{name}=={version}\n" for name, version in held.items())
        pip_install(*requirements, "-c", constraints)


def install_chromium() -> bool:
    """Debian's chromium for the browser tests (Playwright drives it; it never downloads a browser of its own)."""
    if shutil.which("chromium"):
        return True
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        print("install.py: the browser tests need Debian's chromium: run `apt-get install chromium` as root",
              file=sys.stderr)
        return False
    print("install.py: installing Debian's chromium for the browser tests", flush=True)
    subprocess.run(["apt-get", "update"], check=True)
    subprocess.run(["apt-get", "install", "-y", "chromium"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return True


def install_into_comfyui(installed: dict[str, str]) -> int:
    """The nodes' runtime requirements the host lacks, with every installed package held; 1 if a version moved."""
    from packaging.requirements import Requirement  # every ComfyUI Python has it: transformers requires it

    missing = []
    for line in requirement_lines(RUNTIME_REQUIREMENTS):
        requirement = Requirement(line)
        name = normalized(requirement.name)
        if name not in installed:
            missing.append(line)
        elif requirement.specifier.contains(installed[name], prereleases=True):
            print(f"install.py: skipped {line}: ComfyUI's Python has {name} {installed[name]}")
        else:
            print(f"install.py: skipped {line}: ComfyUI's Python has {name} {installed[name]}, which Atelier does "
                  "not ask for; kept, so the nodes that need another version may fail", file=sys.stderr)
    for line in requirement_lines(APP_REQUIREMENTS):
        print(f"install.py: skipped {line}: the standalone app's, never ComfyUI's")
    if "torch" in installed:
        print(f"install.py: skipped torch: ComfyUI's torch {installed['torch']} stays")
    else:
        print("install.py: skipped torch: ComfyUI's Python has none; install ComfyUI's own (Atelier never installs "
              "one into ComfyUI)", file=sys.stderr)
    if missing:
        print(f"install.py: installing {' '.join(missing)}, every installed package held", flush=True)
        pip_install_holding(missing, installed)

    after = installed_versions()
    moved = {name: (version, after.get(name)) for name, version in installed.items() if after.get(name) != version}
    if moved:
        print(f"install.py: ComfyUI's packages changed (before, after): {moved}; this must never happen",
              file=sys.stderr)
        return 1
    added = [f"{name} {after[name]}" for name in sorted(set(after) - set(installed))]
    print(f"install.py: ready inside ComfyUI; added {', '.join(added) or 'nothing'}", flush=True)
    return 0


def install_standalone(installed: dict[str, str], tests: bool, ray: bool = False) -> int:
    """The nodes' runtime and the standalone app (and Ray, and the tests' needs, which include Ray), holding the
    installed torch."""
    before = {name: version for name, version in installed.items() if name in PINNED}
    if "torch" not in before:
        print(f"install.py: no torch found; installing the CPU build {CPU_TORCH}", flush=True)
        pip_install(CPU_TORCH)
        before = {name: version for name, version in installed_versions().items() if name in PINNED}

    requirements = ["-r", RUNTIME_REQUIREMENTS, "-r", APP_REQUIREMENTS]
    if ray or tests:  # the tests start a Ray cluster on loopback
        requirements += ["-r", RAY_REQUIREMENTS]
    if tests:
        requirements += ["-r", TEST_REQUIREMENTS]
    pip_install_holding(requirements, before)

    after = {name: version for name, version in installed_versions().items() if name in PINNED}
    if after != before:
        print(f"install.py: torch changed from {before} to {after}; this must never happen", file=sys.stderr)
        return 1
    if tests:
        # Only a fresh test environment must be free of these; a user's ComfyUI may legitimately have torchvision.
        import importlib.util
        found = [name for name in NEVER if importlib.util.find_spec(name) is not None]
        if found:
            print(f"install.py: {found} installed; Atelier never depends on them", file=sys.stderr)
            return 1
        if not install_chromium():
            return 1
    print(f"install.py: ready, with torch {after['torch']}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", action="store_true", help="also install what the test suite needs (standalone)")
    parser.add_argument("--ray", action="store_true", help="also install Ray, for `serve --ray` (standalone)")
    parser.add_argument("--mode", choices=MODES,
                        help="install into ComfyUI's Python or for the standalone app, instead of detecting which")
    args = parser.parse_args(argv)

    installed = installed_versions()
    mode, why = (args.mode, "--mode") if args.mode else detect_mode(HERE, installed, sys.prefix)
    print(f"install.py: installing for {mode} ({why})", flush=True)
    if mode == "comfyui":
        if args.tests or args.ray:
            print("install.py: --tests and --ray set up the standalone app, never ComfyUI's Python; "
                  "use a venv of the pack's own (README) or --mode standalone", file=sys.stderr)
            return 2
        return install_into_comfyui(installed)
    return install_standalone(installed, args.tests, args.ray)


if __name__ == "__main__":
    sys.exit(main())
