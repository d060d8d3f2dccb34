"""Router files: a :class:`~.routing.Router` as ``.safetensors`` with JSON metadata, never pickled."""

from __future__ import annotations

import json
import os

from ..common.tagged_files import read_tagged, write_tagged
from .routing import Router

ROUTER_FORMAT, ROUTER_VERSION = "atelier.router", "2"
READABLE_VERSIONS = ("1", ROUTER_VERSION)  # version 1 is version 2 without the optional centre and quality


def save_router(router: Router, path: str | os.PathLike) -> None:
    """Write ``router`` as a ``.safetensors`` file, atomically (readers see the old file or the whole new one).

    Tensors: ``prototypes`` (K, D), ``costs`` (K,), ``bias_budgets`` and ``bias_lambdas`` (G,), and ``centre``
    (D,) and ``quality`` (K,) when the router has them, all float64 so that a load gives back the same routes.
    Metadata (strings): ``format`` "atelier.router", ``version``, ``labels`` (a JSON list) and ``embedding``.

    Raises:
        OSError: the folder is missing or not writable.
    """
    tensors = {"prototypes": router.prototypes, "costs": router.costs, "bias_budgets": router.bias_budgets,
               "bias_lambdas": router.bias_lambdas}
    for name in ("centre", "quality"):
        if getattr(router, name) is not None:
            tensors[name] = getattr(router, name)
    write_tagged(path, tensors, ROUTER_FORMAT, ROUTER_VERSION,
                 {"labels": json.dumps(list(router.labels)), "embedding": router.embedding})


def load_router(path: str | os.PathLike) -> Router:
    """Read a router that :func:`save_router` wrote; nothing is unpickled.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, not a router, another version, or inconsistent tensors.
    Example:
        >>> import tempfile, torch
        >>> router = Router(torch.eye(2, dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64),
        ...                 ("fast", "full"), torch.tensor([0.5, 1.0], dtype=torch.float64), torch.zeros(2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_router(router, os.path.join(folder, "r.safetensors"))
        ...     loaded = load_router(os.path.join(folder, "r.safetensors"))
        >>> loaded.labels, torch.equal(loaded.prototypes, router.prototypes)
        (('fast', 'full'), True)
    """
    metadata, tensors = read_tagged(path, "router", ROUTER_FORMAT, READABLE_VERSIONS)
    needed = {"prototypes", "costs", "bias_budgets", "bias_lambdas"}
    if needed - tensors.keys():
        raise ValueError(f"{os.fspath(path)!r} lacks the tensors {sorted(needed - tensors.keys())}")
    try:
        labels = json.loads(metadata.get("labels", ""))
    except json.JSONDecodeError as error:
        raise ValueError(f"{os.fspath(path)!r} has unreadable labels: {error}") from error
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{os.fspath(path)!r} labels must be a JSON list of strings; got {labels!r}")
    return Router(tensors["prototypes"], tensors["costs"], tuple(labels), tensors["bias_budgets"],
                  tensors["bias_lambdas"], metadata.get("embedding", ""), tensors.get("centre"),
                  tensors.get("quality"))
