"""bench/gpu_suite.py: its CPU smoke run (every part, tiny models) and how it reports a part that fails or hangs, so
that the suite is ready whenever a GPU is lent."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from bench.gpu_suite import CPU_SMOKE, PART_FUNCTIONS, PARTS, RECORD_PREFIX, run_in_child, run_part

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "bench", "gpu_suite.py")
# every example but the opt-in evaluation node's (P4D's), which the suite runs only with its setting
WORKFLOWS = {os.path.splitext(os.path.basename(path))[0]
             for path in glob.glob(os.path.join(ROOT, "workflows", "*.json"))} - {"p4d_audit"}


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_reports_each_in_bench_lines_and_json(tmp_path):
    # The suite's own limit is under 2 minutes on an idle 2-core CPU; the bound here only stops a hung run on a
    # busy machine.
    done = subprocess.run([sys.executable, SUITE, "--cpu-smoke"], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OUT": str(tmp_path)}, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    bench = [line.split() for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    assert [words[1] for words in bench] == [f"gpu_suite_{part}" for part in PARTS] + ["gpu_suite"]
    assert all("status=ok" in words for words in bench[:-1])
    assert "parts_ok=7/7" in bench[-1] and "smoke=1" in bench[-1]

    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    parts = results["parts"]
    assert list(parts) == list(PARTS)
    assert all(part["device"] == "cpu" and os.path.isfile(part["log"]) for part in parts.values())
    # 1: every workflow file ran through the executor, none failed; the fast one finished inside its box.
    workflows = parts["workflows"]
    assert set(workflows["workflows"]) == WORKFLOWS
    assert all(w["status"] in ("ok", "interrupted") for w in workflows["workflows"].values())
    assert workflows["workflows"]["image_basics"]["status"] == "ok"
    executed, unexercised = set(workflows["executed_classes"]), set(workflows["not_exercised"])
    assert "SaveImage" in executed and not executed & unexercised
    assert len(executed | unexercised) == workflows["classes_registered"]
    # 2: both families against diffusers.
    for family in ("sd1", "sdxl"):
        assert parts["sampler"][f"{family}_ours_s"] > 0 and parts["sampler"][f"{family}_ratio_vs_diffusers"] > 0
    # 3: every stage of the staged recipe is timed, then the decode.
    highres = parts["highres"]
    assert highres["steps"] >= highres["min_steps"] and highres["stages"] == 2
    assert [highres[f"stage_{k}"]["size"] for k in (1, 2)] == ["64x64", "128x128"]
    assert highres["decode_s"] > 0
    # 4-7: the timings exist.
    assert parts["correspondence"]["ms_per_pair"] > 0 and parts["correspondence"]["match_ms"] > 0
    assert parts["panorama"]["output"] == "128x64" and parts["panorama"]["cold_s"] > 0
    assert parts["watermark"]["posthoc_embed_ms"] > 0 and parts["watermark"]["generative_detect_ms"] > 0
    assert parts["memory"]["same_model_s"] > 0 and parts["memory"]["counted_peak_mb"] <= parts["memory"]["budget_mb"]


def test_a_part_past_its_time_box_is_killed_and_reported_as_timed_out(tmp_path):
    settings = dataclasses.replace(CPU_SMOKE, time_box_s={**CPU_SMOKE.time_box_s, "workflows": 1})
    result = run_in_child("workflows", settings, str(tmp_path), str(tmp_path / "workflows.log"), 0.0)
    assert result["status"] == "timeout" and result["returncode"] != 0
    assert result["error"] == "ran past its time box of 1 s (killed)"


def test_a_part_that_raises_records_its_error_and_exits_non_zero(tmp_path, capsys, monkeypatch):
    def broken(settings, work_dir, deadline):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setitem(PART_FUNCTIONS, "panorama", broken)
    assert run_part("panorama", CPU_SMOKE, str(tmp_path), 60.0) == 1
    records = [json.loads(line.removeprefix(RECORD_PREFIX)) for line in capsys.readouterr().out.splitlines()
               if line.startswith(RECORD_PREFIX)]
    assert records == [{"error": "RuntimeError: Expected all tensors to be on the same device"}]


def test_a_part_runs_without_grad_and_leaves_the_callers_grad_mode_as_it_was(tmp_path, monkeypatch):
    grad_enabled_inside = []
    monkeypatch.setitem(PART_FUNCTIONS, "panorama", lambda settings, work_dir, deadline:
                        grad_enabled_inside.append(torch.is_grad_enabled()))
    assert run_part("panorama", CPU_SMOKE, str(tmp_path), 60.0) == 0
    assert grad_enabled_inside == [False]
    assert torch.is_grad_enabled()  # a leak here made later gradient tests in the same process fail
