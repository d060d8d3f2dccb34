"""Install what Atelier needs into the running Python, and never touch an installed torch.

    python install.py            # what the nodes and the app need
    python install.py --tests    # the same, plus what the tests need (and Debian's chromium, as root)

ComfyUI users run CUDA builds of torch, and a node pack that swaps one for a CPU build is the worst bug a pack
can ship. So every ``pip install`` here runs with a constraints file that pins the torch (and torchvision,
torchaudio) already installed: pip then fails rather than replacing it. Only where no torch is importable
does this install the CPU build ``torch==2.13.0``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_TORCH = "torch==2.13.0"  # the CPU build pip finds on our machines; plain "torch" pulls a CUDA build of several GB
PINNED = ("torch", "torchvision", "torchaudio")  # installed versions of these are held as they are
NEVER = ("torchvision", "torchaudio", "timm", "open_clip", "spandrel")  # each would pull in or break a torch


def installed_versions() -> dict[str, str]:
    """Versions of the PINNED packages importable in this Python, read in a fresh interpreter."""
    code = ("import importlib.metadata as m\n"
            f"for name in {PINNED!r}:\n"
            "    try: print(name, m.version(name))\n"
            "    except m.PackageNotFoundError: pass\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines())


def pip_install(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args], check=True)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", action="store_true", help="also install what the test suite needs")
    args = parser.parse_args(argv)

    before = installed_versions()
    if "torch" not in before:
        print(f"install.py: no torch found; installing the CPU build {CPU_TORCH}", flush=True)
        pip_install(CPU_TORCH)
        before = installed_versions()

    requirements = ["-r", os.path.join(HERE, "requirements.txt")]
    if args.tests:
        requirements += ["-r", os.path.join(HERE, "requirements-test.txt")]
    with tempfile.TemporaryDirectory() as folder:
        constraints = os.path.join(folder, "constraints.txt")
        with open(constraints, "w") as file:
            file.writelines(f"{name}=={version}\n" for name, version in before.items())
        pip_install(*requirements, "-c", constraints)

    after = installed_versions()
    if after != before:
        print(f"install.py: torch changed from {before} to {after}; this must never happen", file=sys.stderr)
        return 1
    if args.tests:
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


if __name__ == "__main__":
    sys.exit(main())
