"""Fitting a router's prototypes from calibration prompts: k-means, Sinkhorn clusters or difficulty groups.

The routing itself, and the notation, are in :mod:`.routing`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .routing import (BIAS_TABLE_POINTS, Router, check_costs, check_matrix, router_similarity, single_prompt_bias,
                      sinkhorn, unit_rows)

CLUSTER_METHODS = ("kmeans", "sinkhorn")  # fit_prototypes's clusterings
FIT_METHODS = CLUSTER_METHODS + ("difficulty",)  # fit_router's: a clustering, or groups by difficulty
MAX_FIT_ITERATIONS = 100  # Lloyd iterations; fits of a few thousand prompts settle in a few dozen


def _kmeans_plus_plus(points: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the unit sphere, with the cosine distance 1 − cos (Arthur & Vassilvitskii, 2007)."""
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    centres = [points[first]]
    distance = 1 - points @ centres[0]
    for _ in range(1, count):
        weights = distance.clamp(min=0) ** 2
        if float(weights.sum()) == 0:
            raise ValueError(f"the prompts have fewer than {count} distinct embeddings; give more varied prompts "
                             f"or fewer variants")
        chosen = int(torch.multinomial(weights, 1, generator=generator))
        centres.append(points[chosen])
        distance = torch.minimum(distance, 1 - points @ centres[-1])
    return torch.stack(centres)


def _update_centres(points: torch.Tensor, weights: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Weighted mean directions; a cluster with no weight keeps its previous centre."""
    sums = weights.T @ points
    norms = sums.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, sums / norms.clamp(min=torch.finfo(sums.dtype).tiny), previous)


def fit_prototypes(embeddings: torch.Tensor, count: int, method: str, generator: torch.Generator,
                   max_iterations: int = MAX_FIT_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster prompt embeddings into ``count`` groups on the unit sphere; the centres become prototypes.

    Both methods seed with k-means++ from ``generator`` and alternate assignment and centre updates (centre =
    the normalised mean of its members) until the assignment stops changing:

    - "kmeans": each prompt joins its nearest centre (spherical k-means). Clusters follow the data, so a
      frequent kind of prompt gets a large cluster.
    - "sinkhorn": the assignment is the Sinkhorn plan with equal masses 1/K (APTP's balanced codes, ε 0.05),
      and centres are the plan-weighted means, so clusters come out of about equal size.

    Args:
        embeddings: (N, D), N ≥ count, no row all zeros.
        count: K ≥ 1 clusters.
        method: "kmeans" or "sinkhorn".
        generator: seeds the k-means++ draw; the same seed gives the same prototypes.
        max_iterations: ≥ 1.
    Returns:
        (prototypes (K, D) with unit rows, float64; each prompt's cluster, (N,) int64).
    Raises:
        ValueError: an unknown method, K < 1, fewer prompts than K or fewer than K distinct embeddings.
    Example:
        >>> points = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
        >>> prototypes, clusters = fit_prototypes(points, 2, "kmeans", torch.Generator().manual_seed(0))
        >>> prototypes.shape, len(set(clusters[:2].tolist())), len(set(clusters.tolist()))
        (torch.Size([2, 2]), 1, 2)
    """
    if method not in CLUSTER_METHODS:
        raise ValueError(f"method must be one of {CLUSTER_METHODS}; got {method!r}")
    check_matrix(embeddings, "embeddings")
    if not 1 <= count <= embeddings.shape[0]:
        raise ValueError(f"count must be in [1, {embeddings.shape[0]}] (at least one prompt per cluster); got {count}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1; got {max_iterations}")
    points = unit_rows(embeddings.double(), "embeddings")
    centres = _kmeans_plus_plus(points, count, generator)
    clusters = None
    for _ in range(max_iterations):
        similarity = points @ centres.T
        if method == "kmeans":
            new_clusters = similarity.argmax(dim=1)
            weights = torch.nn.functional.one_hot(new_clusters, count).double()
        else:
            weights = sinkhorn(similarity, torch.full((count,), 1 / count, dtype=torch.float64))
            new_clusters = weights.argmax(dim=1)
        centres = _update_centres(points, weights, centres)
        if clusters is not None and torch.equal(new_clusters, clusters):
            break
        clusters = new_clusters
    return centres, clusters


def fit_router(embeddings: torch.Tensor, difficulty: torch.Tensor, costs: torch.Tensor, labels: Sequence[str],
               method: str, generator: torch.Generator, embedding: str = "",
               quality: torch.Tensor | None = None) -> Router:
    """Fit a router from calibration prompts: group them, give groups to variants by difficulty, calibrate λ.

    1. The prompts fall into K groups, K = the number of variants, by ``method``:
       - "kmeans" or "sinkhorn": :func:`fit_prototypes` clusters the embeddings, blind to difficulty;
       - "difficulty": the prompts sorted by difficulty (ties by index) are cut into K groups of equal size.
         Clusters of the embedding need not follow difficulty at all; these groups do by construction, so
         their mean directions hold what the embedding knows of it (a nearest-class-mean rule). The router
         then centres embeddings on the calibration mean: what all prompts share would otherwise swamp the
         cosine, and what tells the groups apart is often a small part of the embedding.
       A cluster's prototype is its members' mean direction; a group's is the mean of its members' unit
       vectors, whose length says how much they agree (see :func:`router_similarity`).
    2. Groups go to variants by ordering: the group with the i-th lowest mean difficulty goes to the variant
       with the i-th lowest cost (ties by index). Groups carry no variant of their own, so some order is
       needed; this one sends the prompts that need more compute to the variants that spend more, which is
       what APTP's learned router does (it sends known-hard prompts to the higher-capacity codes).
       ``difficulty`` is any per-prompt score: the prompt's token count needs nothing but the tokenizer;
       ``router.md``'s option (a), the cost of the cheapest variant that already renders the prompt well,
       needs one generation per variant.
    3. λ_single is calibrated at 101 budgets across the cost range (:func:`single_prompt_bias`).

    Departure: APTP learns its codes jointly with the pruned experts; ours are cluster centres of prompts,
    with no training.

    Args:
        embeddings: (N, D) calibration prompt embeddings, N ≥ K.
        difficulty: (N,) finite scores, higher = needs more compute.
        costs: (K,) variant costs, each > 0, in branch order.
        labels: K variant names, in branch order.
        method: one of :data:`FIT_METHODS`: "kmeans", "sinkhorn" (see :func:`fit_prototypes`) or "difficulty".
        generator: seeds the clustering ("difficulty" draws nothing).
        embedding: which text encoder made the embeddings, recorded in the router.
        quality: (K,) each variant's mean quality on the calibration prompts (when they were generated with
            every variant, as option (a) does); a batch's column masses then come from it (:func:`hull_masses`).
    Returns:
        The router; prototype k belongs to variant k.
    Raises:
        ValueError: mismatched lengths, bad costs, an unknown method, or see :func:`fit_prototypes`.
    Example:
        >>> router = fit_router(torch.eye(3), torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.9, 0.3, 0.6]),
        ...                     ["full", "fast", "mid"], "kmeans", torch.Generator().manual_seed(0))
        >>> from nodes.router.routing import route_single
        >>> route_single(torch.eye(3), router, 0.6).tolist()  # the hardest prompt to the dearest variant
        [0, 1, 2]
    """
    check_costs(costs)
    count = costs.shape[0]
    if len(labels) != count:
        raise ValueError(f"labels must name each of the {count} variants; got {len(labels)} labels")
    check_matrix(embeddings, "embeddings")
    if difficulty.shape != (embeddings.shape[0],) or not bool(torch.isfinite(difficulty).all()):
        raise ValueError(f"difficulty must hold one finite score per prompt, shape ({embeddings.shape[0]},); got "
                         f"{tuple(difficulty.shape)}")
    difficulty, centre = difficulty.double(), None
    if method == "difficulty":
        if count > embeddings.shape[0]:
            raise ValueError(f"give at least one calibration prompt per variant ({count}); got {embeddings.shape[0]}")
        ranks = torch.empty(difficulty.shape[0], dtype=torch.int64)
        ranks[torch.sort(difficulty, stable=True).indices] = torch.arange(difficulty.shape[0])
        clusters = ranks * count // difficulty.shape[0]
        centre = embeddings.double().mean(dim=0)
        members = torch.nn.functional.one_hot(clusters, count).double()
        centred = unit_rows(embeddings.double() - centre, "centred embeddings")
        centres = members.T @ centred / members.sum(dim=0)[:, None]
    elif method in CLUSTER_METHODS:
        centres, clusters = fit_prototypes(embeddings, count, method, generator)
    else:
        raise ValueError(f"method must be one of {FIT_METHODS}; got {method!r}")
    members = torch.nn.functional.one_hot(clusters, count).double()
    mean_difficulty = (members.T @ difficulty) / members.sum(dim=0).clamp(min=1)
    prototypes = torch.empty_like(centres)
    # stable sorts: equal difficulties and equal costs keep their index order, so the fit stays deterministic
    prototypes[torch.sort(costs, stable=True).indices] = centres[torch.sort(mean_difficulty, stable=True).indices]
    costs = costs.double()
    similarity = router_similarity(embeddings, prototypes, centre)
    budgets = torch.linspace(float(costs.min()), float(costs.max()), BIAS_TABLE_POINTS, dtype=torch.float64)
    lambdas = single_prompt_bias(similarity, costs, budgets)
    return Router(prototypes, costs, tuple(labels), budgets, lambdas, embedding, centre,
                  None if quality is None else quality.double())
