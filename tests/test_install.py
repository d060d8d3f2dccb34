"""install.py never replaces an installed torch, and installs the CPU build only where there is none."""

import pytest

import install


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


def test_an_installed_cuda_torch_is_held_by_constraints(monkeypatch, pip_calls):
    versions_sequence(monkeypatch, {"torch": "2.5.1+cu124", "torchvision": "0.20.1+cu124"})
    assert install.main([]) == 0
    [(args, constraints)] = pip_calls
    assert "torch==2.5.1+cu124\n" in constraints and "torchvision==0.20.1+cu124\n" in constraints
    assert args[0] == "-r" and args[1].endswith("requirements.txt") and "requirements-test.txt" not in " ".join(args)


def test_without_torch_the_cpu_build_comes_first_and_alone(monkeypatch, pip_calls):
    versions_sequence(monkeypatch, {}, {"torch": "2.13.0+cpu"})
    assert install.main(["--tests"]) == 0
    assert pip_calls[0] == (("torch==2.13.0",), None)
    args, constraints = pip_calls[1]
    assert constraints == "torch==2.13.0+cpu\n" and args[3].endswith("requirements-test.txt")


def test_a_changed_torch_fails_loudly(monkeypatch, pip_calls, capsys):
    versions_sequence(monkeypatch, {"torch": "2.5.1+cu124"}, {"torch": "2.13.0+cpu"})
    assert install.main([]) == 1
    assert "this must never happen" in capsys.readouterr().err


def test_requirements_never_name_torch_or_its_companions():
    for path in ("requirements.txt", "requirements-test.txt"):
        names = {line.split("#")[0].strip().split(">")[0].split("=")[0].split("<")[0].lower()
                 for line in open(path) if line.split("#")[0].strip()}
        assert not names & {"torch", "torchvision", "torchaudio", "timm", "open-clip-torch", "spandrel"}, path
