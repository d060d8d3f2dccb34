"""Executor overhead on a 200-node graph of cheap nodes: cold, fully cached, and after one widget change.

The graph is 20 independent chains of 10 nodes: a source, 8 adders and an output node. Each figure is the
median over repeated runs of validation plus execution, divided by the 200 nodes.

    python bench/executor.py [--quick]

Ends with ``BENCH executor nodes=200 cold_per_node_us=... cached_per_node_us=... rerun_one_change_executed=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from web.executor import Executor  # noqa: E402

CHAINS, CHAIN_LENGTH = 20, 10
LIMIT = 1 << 30


class BenchSource:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": LIMIT, "step": 1})}}

    def run(self, value):
        return (value,)


class BenchAdd:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"forceInput": True}),
                             "b": ("INT", {"default": 1, "min": 0, "max": LIMIT, "step": 1})}}

    def run(self, a, b):
        return (a + b,)


class BenchOutput:
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True})}}

    def run(self, value):
        return {"ui": {"text": [str(value)]}}


CLASSES = {cls.__name__: cls for cls in (BenchSource, BenchAdd, BenchOutput)}


def build_graph(head_value: int = 0) -> dict:
    """20 chains of 10 nodes; ``head_value`` is the widget at the head of chain 0."""
    prompt = {}
    for chain in range(CHAINS):
        ids = [f"{chain}_{i}" for i in range(CHAIN_LENGTH)]
        prompt[ids[0]] = {"class_type": "BenchSource", "inputs": {"value": head_value if chain == 0 else chain}}
        for previous, node_id in zip(ids[:-2], ids[1:-1]):
            prompt[node_id] = {"class_type": "BenchAdd", "inputs": {"a": [previous, 0], "b": 1}}
        prompt[ids[-1]] = {"class_type": "BenchOutput", "inputs": {"value": [ids[-2], 0]}}
    return prompt


def run_once(executor: Executor, prompt: dict) -> tuple[float, list[str]]:
    start = time.perf_counter()
    checked = executor.validate(prompt)
    result = executor.execute(checked.prompt, "bench", checked.outputs)
    elapsed = time.perf_counter() - start
    if result.status != "success":
        raise RuntimeError(f"benchmark graph failed: {result.messages[-1]}")
    return elapsed, result.executed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (well under 60 s)")
    repeats = 5 if parser.parse_args().quick else 30
    nodes = CHAINS * CHAIN_LENGTH

    cold, cached, rerun_executed = [], [], set()
    for repeat in range(repeats):
        executor = Executor(CLASSES)
        elapsed, executed = run_once(executor, build_graph())
        if len(executed) != nodes:
            raise RuntimeError(f"cold run executed {len(executed)} of {nodes} nodes")
        cold.append(elapsed)
        elapsed, executed = run_once(executor, build_graph())
        if executed:
            raise RuntimeError(f"fully cached run executed {executed}")
        cached.append(elapsed)
        _, executed = run_once(executor, build_graph(head_value=1000 + repeat))
        rerun_executed.add(len(executed))

    if len(rerun_executed) != 1:
        raise RuntimeError(f"re-runs after one change executed differing node counts: {sorted(rerun_executed)}")
    rerun_count = next(iter(rerun_executed))
    cold_us = statistics.median(cold) / nodes * 1e6
    cached_us = statistics.median(cached) / nodes * 1e6
    print(f"cold: {cold_us:.1f} us/node, cached: {cached_us:.1f} us/node, "
          f"rerun after one change executed {rerun_count} nodes ({repeats} repeats)")
    print(f"BENCH executor nodes={nodes} cold_per_node_us={cold_us:.1f} cached_per_node_us={cached_us:.1f} "
          f"rerun_one_change_executed={rerun_count}")


if __name__ == "__main__":
    main()
