"""The example workflows of the model-patch techniques (the faster-sampling ones of issue 23, seamless tiling of issue
24) run headless on the shipped model: each saves its four pictures with the technique and the same four seeds
without it."""

from __future__ import annotations

import os

import pytest

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")


@pytest.mark.parametrize(("name", "steps"), [
    ("faster_diffusion", ("5.steps=6", "10.steps=6")),
    ("tstitch", ("5.steps=5", "10.steps=5")),
    ("feature_inheritance", ("5.steps=5", "10.steps=5")),
    ("sada", ("13.steps=8", "10.steps=8")),
    ("seamless_tiling", ("5.steps=6", "10.steps=6")),
])
def test_acceleration_workflow_runs_headless_on_the_shipped_model(tmp_path, capsys, name, steps):
    from web.cli import main

    arguments = ["run", os.path.join(WORKFLOWS, f"{name}.json"), "--models-dir", str(tmp_path / "models"),
                 "--data-dir", str(tmp_path / "data")]
    for setting in steps:
        arguments += ["--set", setting]
    assert main(arguments) == 0
    saved = [os.path.basename(line.split("output: ")[-1]) for line in capsys.readouterr().out.splitlines()
             if "output: " in line]
    assert sum(file.startswith(f"{name}_") for file in saved) == 4  # four pictures with the technique
    assert sum(file.startswith("plain_") for file in saved) == 4  # and the same seeds without
