"""install.py: standalone, it never replaces an installed torch and installs the CPU build only where there is none;
inside ComfyUI, it installs the nodes' runtime only and changes no package the host already has (issue 21)."""

import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

import install

REPO = os.path.dirname(install.__file__)


@pytest.fixture
def pip_calls(monkeypatch):
    calls = []

    def record(*args):
        constraints = args[args.index("-c") + 1] if "-c" in args else None
        calls.append((args, open(constraints).read() if constraints else None))

    monkeypatch.setattr(install, "pip_install", record)
    monkeypatch.setattr(install, "install_chromium", lambda: True)  # apt-get is not this test's business
    return calls


def versions_sequence(monkeypatch, *states):
    states = list(states)
    monkeypatch.setattr(install, "installed_versions", lambda: states.pop(0) if len(states) > 1 else states[0])


def comfyui_tree(root):
    """A ComfyUI tree as detection sees one: main.py, the comfy/ package and an empty custom_nodes/."""
    home = root / "ComfyUI"
    (home / "comfy").mkdir(parents=True)
    (home / "main.py").write_text("")
    (home / "custom_nodes").mkdir()
    return home


def test_an_installed_cuda_torch_is_held_by_constraints(monkeypatch, pip_calls):
    versions_sequence(monkeypatch, {"torch": "2.5.1+cu124", "torchvision": "0.20.1+cu124", "numpy": "2.1.0"})
    assert install.main(["--mode", "standalone"]) == 0
    [(args, constraints)] = pip_calls
    assert constraints == "torch==2.5.1+cu124\ntorchvision==0.20.1+cu124\n"
    assert args[:4] == ("-r", install.RUNTIME_REQUIREMENTS, "-r", install.APP_REQUIREMENTS)
    assert install.TEST_REQUIREMENTS not in args and install.RAY_REQUIREMENTS not in args


def test_without_torch_the_cpu_build_comes_first_and_alone(monkeypatch, pip_calls):
    versions_sequence(monkeypatch, {}, {"torch": "2.13.0+cpu"})
    assert install.main(["--mode", "standalone", "--tests"]) == 0
    assert pip_calls[0] == (("torch==2.13.0",), None)
    args, constraints = pip_calls[1]
    assert constraints == "torch==2.13.0+cpu\n"
    assert args[4:8] == ("-r", install.RAY_REQUIREMENTS, "-r", install.TEST_REQUIREMENTS)  # the tests start Ray


def test_ray_is_installed_on_request_only(monkeypatch, pip_calls):
    versions_sequence(monkeypatch, {"torch": "2.13.0+cpu"})
    assert install.main(["--mode", "standalone", "--ray"]) == 0
    [(args, _)] = pip_calls
    assert args[4:6] == ("-r", install.RAY_REQUIREMENTS) and install.TEST_REQUIREMENTS not in args


def test_a_changed_torch_fails_loudly(monkeypatch, pip_calls, capsys):
    versions_sequence(monkeypatch, {"torch": "2.5.1+cu124"}, {"torch": "2.13.0+cpu"})
    assert install.main(["--mode", "standalone"]) == 1
    assert "this must never happen" in capsys.readouterr().err


def test_requirements_never_name_torch_or_its_companions():
    for path in (install.RUNTIME_REQUIREMENTS, install.APP_REQUIREMENTS, install.TEST_REQUIREMENTS,
                 install.RAY_REQUIREMENTS):
        names = {install.normalized(line.split(">")[0].split("=")[0].split("<")[0])
                 for line in install.requirement_lines(path)}
        assert not names & {"torch", "torchvision", "torchaudio", "timm", "open-clip-torch", "spandrel"}, path


def test_runtime_requirements_leave_the_editor_to_the_standalone_app_21():
    runtime = " ".join(install.requirement_lines(install.RUNTIME_REQUIREMENTS))
    assert "comfyui-frontend-package" not in runtime and "aiohttp" not in runtime
    assert "comfyui-frontend-package==" in " ".join(install.requirement_lines(install.APP_REQUIREMENTS))


def test_pyproject_dependencies_equal_the_runtime_requirements_21():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as file:
        pyproject = tomllib.load(file)
    assert pyproject["project"]["dependencies"] == install.requirement_lines(install.RUNTIME_REQUIREMENTS)
    assert pyproject["project"]["license"] == {"file": "LICENSE"}
    assert {"PublisherId", "DisplayName", "Icon"} <= set(pyproject["tool"]["comfy"])


def test_license_is_the_gpl_3_text():
    with open(os.path.join(REPO, "LICENSE")) as file:
        text = file.read()
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE\n                       Version 3, 29 June 2007")
    assert text.rstrip().endswith("<https://www.gnu.org/licenses/why-not-lgpl.html>.")


def test_detect_mode_finds_the_pack_in_a_comfyui_tree(tmp_path):
    pack = comfyui_tree(tmp_path) / "custom_nodes" / "atelier"
    pack.mkdir()
    assert install.detect_mode(str(pack), {}, str(tmp_path / "ComfyUI" / "venv"))[0] == "comfyui"


def test_detect_mode_finds_a_pack_linked_into_a_comfyui_tree(tmp_path):
    link = comfyui_tree(tmp_path) / "custom_nodes" / "atelier"
    link.symlink_to(REPO)
    assert install.detect_mode(str(link), {}, str(tmp_path / "ComfyUI" / "venv"))[0] == "comfyui"


def test_detect_mode_is_standalone_under_the_packs_own_venv(tmp_path):
    # The README's commands make .venv inside the pack, also for a developer's clone in custom_nodes/.
    pack = comfyui_tree(tmp_path) / "custom_nodes" / "atelier"
    pack.mkdir()
    mode, why = install.detect_mode(str(pack), {"comfyui-frontend-package": "1.58.1"}, str(pack / ".venv"))
    assert mode == "standalone" and "venv of the pack's own" in why


def test_detect_mode_is_standalone_outside_custom_nodes(tmp_path):
    pack = tmp_path / "atelier"
    pack.mkdir()
    assert install.detect_mode(str(pack), {"comfyui-frontend-package": "1.27.10"}, "/usr")[0] == "standalone"


def test_detect_mode_takes_a_custom_nodes_folder_apart_from_comfyui_by_its_python(tmp_path):
    # ComfyUI Desktop: custom_nodes/ lives in the user's folder, ComfyUI's code elsewhere, and its venv has
    # ComfyUI's packages.
    pack = tmp_path / "custom_nodes" / "atelier"
    pack.mkdir(parents=True)
    assert install.detect_mode(str(pack), {"comfyui-workflow-templates": "0.1.95"}, "/venv")[0] == "comfyui"
    assert install.detect_mode(str(pack), {"numpy": "2.1.0"}, "/venv")[0] == "standalone"


def test_inside_comfyui_only_missing_runtime_requirements_go_in_with_everything_held_21(monkeypatch, pip_calls,
                                                                                          capsys):
    host = {"torch": "2.5.1+cu124", "numpy": "1.26.4", "tqdm": "4.65.0", "comfyui-frontend-package": "1.27.10"}
    added = {"diffusers": "0.42.1"}
    versions_sequence(monkeypatch, host, {**host, **added})
    assert install.main(["--mode", "comfyui"]) == 0
    [(args, constraints)] = pip_calls
    runtime = install.requirement_lines(install.RUNTIME_REQUIREMENTS)
    assert list(args[:-2]) == [line for line in runtime if not line.startswith(("numpy", "tqdm"))]
    assert sorted(constraints.splitlines()) == sorted(f"{name}=={version}" for name, version in host.items())
    out, err = capsys.readouterr()
    assert "skipped numpy>=1.26: ComfyUI's Python has numpy 1.26.4\n" in out
    assert "skipped comfyui-frontend-package==1.58.1: the standalone app's" in out
    assert "torch 2.5.1+cu124 stays" in out and "added diffusers 0.42.1" in out
    assert "skipped tqdm>=4.66: ComfyUI's Python has tqdm 4.65.0, which Atelier does not ask for" in err


def test_inside_comfyui_a_moved_version_fails_loudly_21(monkeypatch, pip_calls, capsys):
    versions_sequence(monkeypatch, {"torch": "2.5.1+cu124"}, {"torch": "2.13.0+cpu", "numpy": "2.4.6"})
    assert install.main(["--mode", "comfyui"]) == 1
    assert "'torch': ('2.5.1+cu124', '2.13.0+cpu')" in capsys.readouterr().err


def test_inside_comfyui_tests_are_refused(monkeypatch, pip_calls, capsys):
    versions_sequence(monkeypatch, {"torch": "2.5.1+cu124"})
    assert install.main(["--mode", "comfyui", "--tests"]) == 2
    assert pip_calls == [] and "--tests and --ray set up the standalone app" in capsys.readouterr().err


def fake_torch(site_packages, version):
    """A stand-in for a host's CUDA torch: its metadata only (pip sees it installed; the real one is 2 GB)."""
    info = site_packages / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def freeze(python):
    out = subprocess.run([python, "-m", "pip", "freeze", "--all"], check=True, capture_output=True, text=True).stdout
    return dict(line.split("==") for line in out.splitlines())


@pytest.mark.slow
def test_install_inside_a_comfyui_tree_changes_no_host_package_21(tmp_path):
    """A real host venv with ComfyUI's frontend pin, older numpy/pillow than ours would pick, a tqdm older than we
    ask and a CUDA torch stand-in: after install.py, pip freeze differs only by added packages. About 90 s."""
    home = comfyui_tree(tmp_path)
    (home / "custom_nodes" / "atelier").symlink_to(REPO)
    subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], check=True)
    python = str(home / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "comfyui-frontend-package==1.27.10", "numpy==1.26.4", "pillow==11.3.0", "tqdm==4.65.0",
                    "packaging"], check=True)
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    fake_torch(pathlib.Path(site_packages), "2.5.1+cu124")
    before = freeze(python)

    done = subprocess.run([python, str(home / "custom_nodes" / "atelier" / "install.py")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    after = freeze(python)

    assert "installing for comfyui (the pack is in the custom_nodes/ of the ComfyUI tree" in done.stdout
    assert {name: after.get(name) for name in before} == before
    assert {"diffusers", "transformers", "torchsde"} <= {install.normalized(name) for name in after}
    assert "skipped comfyui-frontend-package==1.58.1" in done.stdout
    assert "skipped tqdm>=4.66: ComfyUI's Python has tqdm 4.65.0" in done.stderr
