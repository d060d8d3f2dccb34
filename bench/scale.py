"""Throughput of the prompt queue on Ray workers: the same prompts on 1 and on 2 workers, in one run (issue 22).

Each prompt is ``workflows/text_to_image.json`` on the shipped embedded model with its own seed. Both pools run on
one local Ray cluster on loopback, each CPU worker with one torch thread (so two workers use both cores of this
machine's two, and one worker one of them); every worker first runs one prompt to load the model, outside the
timing. On a machine with GPUs the workers take one GPU each instead, and the same figures are per-GPU scaling.

    python bench/scale.py [--quick] [--prompts N]

Ends with ``BENCH scale prompts=… s_1w=… s_2w=… speedup_2w=… device=…`` (issue 22 asks for speedup_2w ≥ 1.6 on the
2-core CPU). Tiled generation split over workers (issue 22 part 2) is not built yet, so it is not measured here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from web.cli import load_workflow  # noqa: E402
from web.folders import DataFolders  # noqa: E402
from web.limits import DEFAULT_LIMITS  # noqa: E402
from web.prompt_queue import PromptQueue  # noqa: E402
from web.ray_workers import init_ray, start_workers  # noqa: E402
from web.registry import node_classes  # noqa: E402
from web.server_state import RaySettings  # noqa: E402

WORKFLOW = os.path.join(ROOT, "workflows", "text_to_image.json")


def prompts(folders: DataFolders, models_dir: str, count: int, first_seed: int) -> list[tuple[dict, list[str]]]:
    """``count`` copies of the workflow as API prompts, each with its own seed (no cached result to reuse)."""
    prompt, _ = load_workflow(WORKFLOW, node_classes(folders, models_dir))
    samplers = [node for node in prompt.values() if "seed" in node["inputs"]]
    outputs = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    made = []
    for index in range(count):
        for sampler in samplers:
            sampler["inputs"]["seed"] = first_seed + index
        made.append(({node_id: {**node, "inputs": dict(node["inputs"])} for node_id, node in prompt.items()}, outputs))
    return made


def run(queue: PromptQueue, batch: list[tuple[dict, list[str]]]) -> float:
    """Seconds from queuing ``batch`` to the end of its last prompt; every prompt must succeed."""
    started = time.perf_counter()
    items = [queue.submit(prompt, outputs, {}, None) for prompt, outputs in batch]
    while queue.remaining():
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    history = queue.history()
    failed = [item.prompt_id for item in items if history[item.prompt_id]["status"]["status_str"] != "success"]
    if failed:
        raise RuntimeError(f"{len(failed)} prompts failed: {history[failed[0]]['status']['messages'][-1]}")
    return elapsed


def measure(workers: int, folders: DataFolders, models_dir: str, count: int, seed: int) -> float:
    import ray

    pool = start_workers(RaySettings("auto", workers, threads_per_worker=1), folders, models_dir, DEFAULT_LIMITS)
    queue = PromptQueue(pool, lambda *_: None)
    queue.start()
    try:
        run(queue, prompts(folders, models_dir, workers, seed - 1000))  # each worker loads the model once
        return run(queue, prompts(folders, models_dir, count, seed))
    finally:
        queue.stop()
        for worker in pool:
            ray.kill(worker.actor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts instead of 20")
    parser.add_argument("--prompts", type=int, help="how many prompts per pool")
    args = parser.parse_args()
    count = args.prompts or (8 if args.quick else 20)
    logging.basicConfig(level=logging.WARNING)
    ray = init_ray(RaySettings("auto"))
    device = "gpu" if ray.cluster_resources().get("GPU") else "cpu"
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folders = DataFolders.under(os.path.join(scratch, "data"))
            models_dir = os.path.join(scratch, "models")
            one = measure(1, folders, models_dir, count, 1)
            print(f"1 worker:  {count} prompts in {one:.1f} s ({count / one:.2f} prompts/s)", flush=True)
            two = measure(2, folders, models_dir, count, 10_001)
            print(f"2 workers: {count} prompts in {two:.1f} s ({count / two:.2f} prompts/s)", flush=True)
    finally:
        ray.shutdown()
    print(f"BENCH scale prompts={count} s_1w={one:.2f} s_2w={two:.2f} speedup_2w={one / two:.2f} device={device} "
          f"quick={int(args.quick)}")


if __name__ == "__main__":
    main()
