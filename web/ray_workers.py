"""Workers on a Ray cluster (``python -m web serve --ray auto|ADDRESS``): one Ray actor per worker, each with its own
executor, model cache and result cache, streaming a prompt's events back to the server as they happen.

Only ``serve --ray`` imports this module, and Ray with it. Ray is set up as ``environment.md`` §11 asks: usage stats
off, token authentication on (a random token unless ``RAY_AUTH_TOKEN`` is set; a cluster started elsewhere needs its
token in that variable), and a cluster this process starts listens on loopback only. Workers read models from and
write outputs to the paths the server gives them, so a worker on another machine needs the same folders at the same
paths (a shared file system); on one machine that holds by itself.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from nodes.common.denoiser import Conditioning, DiffusersCodec, DiffusersDenoiser
from nodes.common.tile_pool import Tile, set_tile_pool
from nodes.common.tiled_vae import decode_windows
from nodes.common.tiles import Window
from nodes.highres.tiling import evaluate_tile_chunk
from nodes.models.refs import ModelRecipe

from .executor import ExecutionResult, Executor, Listener
from .folders import DataFolders
from .limits import Limits, bind_limits
from .registry import node_classes
from .server_state import RaySettings
from .workers import LocalWorker, WorkerLost

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DONE = object()  # the end of a prompt's events
RESTART_POLL_S = 0.2
WORKER_START_TIMEOUT_S = 300  # a worker imports torch and builds its node classes; a busy machine takes a minute


def import_ray():
    """The ``ray`` module, imported with the settings ``environment.md`` §11 asks for, which Ray reads when it is
    first imported: every import of Ray in Atelier goes through here."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a cluster this process starts listens on loopback only
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))  # auth on, nothing written to $HOME
    os.environ["RAY_AUTH_MODE"] = "token"  # a driver joining a cluster sends the token only when told to
    if "ray" in sys.modules and not getattr(sys.modules["ray"], "_atelier_configured", False):
        raise RuntimeError("Ray was imported before web.ray_workers.import_ray(): its loopback and usage settings "
                           "may not hold")
    import ray

    ray._atelier_configured = True
    return ray


def init_ray(settings: RaySettings):
    """Connect to (or start) the cluster as ``environment.md`` §11 asks; returns the ``ray`` module."""
    ray = import_ray()
    # Workers import Atelier's modules (web, nodes) by name: give them this checkout on their path.
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}}
    if settings.address != "auto":
        ray.init(address=settings.address, runtime_env=runtime_env)
        return ray
    try:  # the cluster `ray start --head` runs on this machine
        ray.init(address="auto", runtime_env=runtime_env)
        logger.info("joined the Ray cluster running on this machine")
    except ConnectionError:
        # No cluster here: start a private one on loopback, in a short temporary folder (Ray puts Unix sockets in
        # it, whose paths may not exceed 107 bytes).
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env,
                 _temp_dir=tempfile.mkdtemp(prefix="ray"))
        logger.info("started a Ray cluster on this machine, on loopback")
    return ray


class PromptActor:
    """One worker's process on the cluster: an executor over the registry's node classes, as the server has, and
    a share of its peers' tiles when it runs no prompt of its own."""

    def __init__(self, folders: DataFolders, models_dir: str, limits: Limits, torch_threads: int | None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.worker = LocalWorker(Executor(bind_limits(node_classes(folders, models_dir), limits)))
        self.running = threading.Event()  # a prompt of its own runs: peers' tiles are refused (see evaluate_tiles)
        self.done_for_peers = {"tile_batches": 0, "decode_windows": 0}

    def ready(self) -> str:
        return f"pid {os.getpid()}"

    def join_pool(self, peers: list, index: int) -> None:
        """Spread this worker's tiled sampling over ``peers`` (every worker's actor; this one is ``index``)."""
        set_tile_pool(RayTilePool(peers, index) if len(peers) > 1 else None)

    def evaluate_tiles(self, recipe: ModelRecipe, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                       chunks: list[list[Tile]]) -> list[torch.Tensor] | None:
        """A peer's tile batches (see :class:`RayTilePool`), or None while a prompt of this worker's own runs:
        its thread may hold the model's lock, and waiting for it could wait on the peer that waits on us."""
        if self.running.is_set():
            return None
        with recipe.load().in_use() as loaded:
            denoiser = DiffusersDenoiser(loaded.unet, loaded.schedule)
            x, t, conditioning = x.to(loaded.device), t.to(loaded.device), conditioning.to(loaded.device)
            predictions = [evaluate_tile_chunk(denoiser, x, t, conditioning, chunk).cpu() for chunk in chunks]
        self.done_for_peers["tile_batches"] += len(chunks)
        return predictions

    def decode_windows(self, recipe: ModelRecipe, statistics: list, dtype: torch.dtype | None,
                       latent: torch.Tensor, windows: list[Window]) -> list[torch.Tensor] | None:
        """A peer's windows of a tiled VAE decode (see :class:`RayTilePool`); None while a prompt of this
        worker's own runs, as for :meth:`evaluate_tiles`."""
        if self.running.is_set():
            return None
        # The model's lock: the statistics hooks sit on the shared decoder for the call, so two peers' rows (or a
        # prompt starting here meanwhile) must not decode through it at once.
        with recipe.load().in_use() as loaded:
            results = decode_windows(DiffusersCodec(loaded.vae), statistics, dtype, latent.to(loaded.device),
                                     windows)
        self.done_for_peers["decode_windows"] += len(windows)
        return results

    def tile_statistics(self) -> dict[str, int]:
        """What this worker has computed for its peers so far."""
        return dict(self.done_for_peers)

    def run(self, prompt: dict, prompt_id: str, outputs: list[str], extra_data: dict):
        """Run the prompt on a thread and yield its events as they happen, ``("event", name, data)``, then
        ``("result", ExecutionResult)``: a Ray streaming generator, so events reach the server while it runs."""
        events: queue.Queue = queue.Queue()
        finished: dict[str, Any] = {}

        def execute() -> None:
            self.running.set()
            try:
                finished["result"] = self.worker.execute(prompt, prompt_id, outputs,
                                                         lambda event, data: events.put((event, data)), extra_data)
            except BaseException as error:  # handed to the server, which reports it as the worker's failure
                finished["error"] = error
            finally:
                self.running.clear()
                events.put(_DONE)

        thread = threading.Thread(target=execute, name=f"prompt-{prompt_id}", daemon=True)
        thread.start()
        while (event := events.get()) is not _DONE:
            yield ("event", *event)
        thread.join()
        if "error" in finished:
            raise finished["error"]
        yield ("result", finished["result"])

    def interrupt(self) -> None:
        self.worker.interrupt()

    def release(self, unload_models: bool) -> None:
        self.worker.release(unload_models)


class RayTilePool:
    """A :class:`~nodes.common.tile_pool.TilePool` over the workers' actors, inside one worker's process.

    Each call (one sampler step) puts the latent and the conditioning in Ray's object store once, gives each peer
    an equal run of consecutive tile batches to evaluate with its own copy of the model (``ModelRecipe``), works
    through its own run meanwhile, and hands the predictions back in batch order, so the blend adds them as one
    process would. A peer that is busy with a prompt of its own, or dead, returns its run to be evaluated here.
    A tiled VAE decode goes the same way, row by row, with the latent put once and the whole latent's GroupNorm
    statistics sent along.
    """

    def __init__(self, peers: list, index: int):
        import ray  # inside a Ray worker process: Ray itself imported it, with the cluster's settings

        self.ray = ray
        self.peers = peers
        self.index = index
        self._decode: tuple | None = None  # the latent and statistics being decoded, and their object refs

    def predictions(self, model, x, t, conditioning, chunks, local) -> Iterator[torch.Tensor]:
        x_ref, conditioning_ref = self.ray.put(x.cpu()), self.ray.put(conditioning.to("cpu"))
        recipe, t = model.recipe(), t.cpu()
        results = self._spread(chunks, local, lambda peer, run: peer.evaluate_tiles.remote(
            recipe, x_ref, t, conditioning_ref, run))
        return (result.to(x.device) for result in results)

    def decoded_windows(self, vae, statistics, dtype, latent, windows, local) -> Iterator[torch.Tensor]:
        # The same latent and statistics come for every tile row of a decode: put them once per decode.
        if self._decode is None or self._decode[0] is not latent or self._decode[1] is not statistics:
            self._decode = (latent, statistics, self.ray.put(latent.cpu()), self.ray.put(statistics))
        *_, latent_ref, statistics_ref = self._decode
        return self._spread(windows, local, lambda peer, run: peer.decode_windows.remote(
            vae, statistics_ref, dtype, latent_ref, run))

    def _spread(self, items: list, local: Callable, call: Callable) -> Iterator[torch.Tensor]:
        """``local(item)`` for every item, in order, some computed by peers: each peer gets an equal run of
        consecutive items through ``call(peer, run)``, and this process computes its own run meanwhile. A busy or
        dead peer's run is computed here afterwards."""
        runs = [items[k * len(items) // len(self.peers):(k + 1) * len(items) // len(self.peers)]
                for k in range(len(self.peers))]
        pending = {k: call(peer, runs[k]) for k, peer in enumerate(self.peers) if k != self.index and runs[k]}
        own = [local(item) for item in runs[self.index]]
        for k, run in enumerate(runs):
            if k == self.index:
                yield from own
                continue
            results = None
            if k in pending:
                try:
                    results = self.ray.get(pending[k])
                except self.ray.exceptions.RayActorError:
                    pass
            yield from map(local, run) if results is None else results


class RayWorker:
    """A :class:`~web.workers.Worker` on a Ray actor. Ray restarts an actor that dies; the prompt it ran fails
    here with :class:`WorkerLost`, and the queue runs it again."""

    def __init__(self, ray, actor, name: str, peers: list, index: int):
        self.ray = ray
        self.actor = actor
        self.name = name
        self.peers, self.index = peers, index  # the tile pool it belongs to (every worker's actor, its place)
        self.restarted = False

    def execute(self, prompt: dict, prompt_id: str, outputs: list[str], listener: Listener,
                extra_data: dict) -> ExecutionResult:
        result = None
        try:
            if self.restarted:  # Ray restarts the actor with its constructor's arguments: it left the pool
                self._wait_until_restarted()
                self.ray.get(self.actor.join_pool.remote(self.peers, self.index))
                self.restarted = False
            for reference in self.actor.run.remote(prompt, prompt_id, outputs, extra_data):
                kind, *payload = self.ray.get(reference)
                if kind == "event":
                    listener(*payload)
                else:
                    (result,) = payload
        except self.ray.exceptions.RayActorError as error:
            self.restarted = True
            raise WorkerLost(f"{type(error).__name__}: {str(error).splitlines()[0]}") from error
        except self.ray.exceptions.RayTaskError as error:  # the actor's own code raised: hand over the cause
            raise error.as_instanceof_cause() from error
        if result is None:
            raise WorkerLost(f"{self.name} ended the prompt without a result")
        return result

    def _wait_until_restarted(self) -> None:
        """Return once the actor answers again: a call to an actor that Ray is restarting fails at once."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while True:
            try:
                self.ray.get(self.actor.ready.remote())
                return
            except self.ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(RESTART_POLL_S)

    def interrupt(self) -> None:
        self.actor.interrupt.remote()

    def release(self, unload_models: bool) -> None:
        try:
            self.ray.get(self.actor.release.remote(unload_models))
        except self.ray.exceptions.RayActorError as error:  # a dead worker holds nothing
            logger.warning("worker %s could not release its caches: %s", self.name, error)


def start_workers(settings: RaySettings, folders: DataFolders, models_dir: str, limits: Limits) -> list[RayWorker]:
    """Start the workers on the cluster (``init_ray`` first) and wait until each has built its executor.

    One worker per GPU (``num_gpus=1``) when the cluster has GPUs, else CPU workers (``num_cpus=1`` each, torch
    threads sharing the CPUs). Raises ``ValueError`` for a worker count the cluster cannot hold.
    """
    ray = import_ray()
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    count = settings.workers or max(gpus, 1)
    if count < 1:
        raise ValueError(f"--workers must be at least 1; got {count}")
    if gpus and count > gpus:
        raise ValueError(f"the cluster has {gpus} GPUs, one per worker; --workers {count} asks for more")
    if not gpus and count > cpus:
        raise ValueError(f"the cluster has {cpus} CPUs, at least one per worker; --workers {count} asks for more")
    threads = settings.threads_per_worker or (None if gpus else max(1, cpus // count))
    placement = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    # max_concurrency 4: interrupt(), release() and peers' tiles reach an actor while run() streams;
    # max_restarts -1: Ray restarts a worker that dies, and max_task_retries 0 leaves the retry of its prompt to
    # the queue.
    actor_class = ray.remote(PromptActor).options(max_concurrency=4, max_restarts=-1, max_task_retries=0,
                                                  **placement)
    actors = [actor_class.remote(folders, models_dir, limits, threads) for _ in range(count)]
    try:
        names = ray.get([actor.ready.remote() for actor in actors], timeout=WORKER_START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"the Ray cluster did not start {count} workers within {WORKER_START_TIMEOUT_S} s: "
                           f"each needs {placement} free ({ray.available_resources()} are)") from None
    ray.get([actor.join_pool.remote(actors, index) for index, actor in enumerate(actors)])
    workers = [RayWorker(ray, actor, f"ray-{index} ({name})", actors, index)
               for index, (actor, name) in enumerate(zip(actors, names))]
    logger.info("%d Ray workers ready (%s, %s torch threads each)", count, "one GPU each" if gpus else "CPU",
                threads or "default")
    return workers
