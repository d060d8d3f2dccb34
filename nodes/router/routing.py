"""Routing prompts to pipeline variants under a compute budget: APTP's router, training-free (``router.md``).

A router holds K prototypes (APTP's "architecture codes"), one per pipeline variant, and each variant's cost
(for example its steps times its model's cost, relative to the full pipeline). A prompt is embedded by the
pipeline's own text encoder and compared with the prototypes by cosine similarity, as APTP compares prompts
with its codes.

- A batch is routed by :func:`route_batch`: Sinkhorn over the similarities with column masses set by the budget
  (:func:`budget_marginals`, or :func:`hull_masses` when the router knows each variant's quality;
  :func:`sinkhorn`), the plan's argmax, then :func:`repair_to_budget`, so that the batch's mean cost lands
  within ±0.01 of the budget.
- A single prompt is routed by :func:`route_single`: the nearest prototype after a cost bias λ_single·c_k, whose
  strength was calibrated on the prompts the router was fitted on (:func:`single_prompt_bias`), so that routing
  those prompts one at a time meets the budget on average.
- Prototypes are fitted from calibration prompts (:mod:`.fitting`); a router is saved and loaded as
  ``.safetensors`` (:mod:`.router_files`), never pickled; prompts are embedded by :mod:`.embeddings`.

Source: APTP (Ganjdanesh et al., "Not All Prompts Are Made Equal: Prompt-based Pruning of Text-to-Image
Diffusion Models", ICLR 2025, arXiv 2406.12042); official code rezashkv/diffusion_pruning (commit d0709c3),
``pdm/models/vq/quantizer.py``: ``get_optimal_transport_min_encoding_indices`` (training: Sinkhorn, ε 0.05, 3
iterations, after SwAV's ``main_swav.py``) and ``get_cosine_sim_min_encoding_indices`` (inference: argmax of
the cosine similarity).

Notation, code name → symbol:
    ``similarity``  S ∈ [−1, 1]^(N×K), the cosine of prompt i and prototype k
    ``costs``       c_k, the cost of variant k
    ``budget``      b, the target mean cost per prompt (APTP's pruning target p)
    ``epsilon``     ε, Sinkhorn's entropic temperature
    ``plan``        Q, the transport plan (N×K), each row summing to 1/N
    ``masses``      Q's column sums, one per variant
    ``tilt``        λ in the column masses' exp(−λ·c) tilt
    ``bias``        λ_single, the cost bias of single-prompt routing

Departures from APTP, each on purpose (APTP prunes and trains its experts; we route among existing variants):

- The experts are pipeline variants built in the graph (fewer steps, a speed-up, a smaller UNet) with known
  costs: no pruning, no mask predictor, no training. So prototypes live in the prompt-embedding space (APTP
  compares predicted masks with the codes' masks). The embedding is by default the pipeline's own text encoder,
  which needs no extra model; a local sentence encoder (APTP's all-mpnet-base-v2, for parity) is the option.
- APTP's Sinkhorn gives every code the mass 1/K and only serves training (inference is a plain argmax). Ours
  sets the column masses from the budget and runs at inference, so that a batch meets its budget.
- APTP runs 3 Sinkhorn iterations; we iterate to convergence, because the budget rides on the column masses and
  3 iterations leave them, and so the batch's mean cost, visibly off.
- APTP holds its budget on average through a loss term; we hold it for every batch with a repair pass.
- Two additions of ours, for calibration prompts generated with every variant: prototypes from groups of equal
  difficulty instead of clusters (``fit_router``'s "difficulty"), and column masses from the variants' measured
  quality (:func:`hull_masses`). Together they are what made routing beat the best mix of single variants on
  the embedded model (``bench/router.py``).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "Router", "cosine_similarity", "router_similarity", "budget_marginals", "hull_masses", "sinkhorn",
    "repair_to_budget", "route_batch", "single_prompt_bias", "route_single", "BUDGET_TOLERANCE",
]

DEFAULT_EPSILON = 0.05  # Source: APTP quantizer.py, sinkhorn_epsilon default (SwAV's value)
BUDGET_TOLERANCE = 0.01  # router.md, target 1: |mean cost − budget| ≤ 0.01 per batch
SINKHORN_TOLERANCE = 1e-6  # largest column-mass error at which Sinkhorn counts as converged
# Enough for the ~100 iterations a skewed budget takes at ε 0.05, and a bound on the time when similarities spread
# so widely (tight, far-apart prompt clusters) that convergence crawls; the repair pass needs no exact plan.
MAX_SINKHORN_ITERATIONS = 1000
PREFERENCE_FLOOR = 1e-3  # Source: router.md §5.1; a variant no prompt prefers can still take mass
TILT_SATURATION = 1000.0  # λ·(cost gap) at which exp(−λ·c) has underflowed: the masses sit on one end
BISECTION_STEPS = 60  # halvings of the λ interval; 2^-60 of it is below float64's resolution of λ
BIAS_TABLE_POINTS = 101  # budgets at which λ_single is calibrated: steps of 1 % of the cost range
BIAS_CHUNK_NUMBERS = 4_000_000  # biased similarities held at once while calibrating λ_single (32 MB)


@dataclasses.dataclass(frozen=True, eq=False)
class Router:
    """K pipeline variants, each with a prototype embedding, a cost and a label, plus the single-prompt bias.

    ``bias_lambdas[g]`` is λ_single for the budget ``bias_budgets[g]``; the budgets run from the cheapest to the
    dearest cost. ``embedding`` says which text encoder made the prototypes, for people reading the file.
    ``centre``, when set, is subtracted from every embedding before the cosine (:func:`router_similarity`).
    ``quality``, when set, is each variant's mean quality on the calibration prompts; a batch's column masses
    then come from it (:func:`hull_masses`) rather than from the prototypes' natural shares.
    """

    prototypes: torch.Tensor  # (K, D); their lengths weight the similarity (router_similarity)
    costs: torch.Tensor  # (K,), > 0
    labels: tuple[str, ...]  # K names, shown on the router's label output
    bias_budgets: torch.Tensor  # (G,), non-decreasing
    bias_lambdas: torch.Tensor  # (G,)
    embedding: str = ""
    centre: torch.Tensor | None = None  # (D,)
    quality: torch.Tensor | None = None  # (K,)

    def __post_init__(self) -> None:
        check_matrix(self.prototypes, "prototypes")
        if self.quality is not None and (self.quality.shape != self.prototypes.shape[:1]
                                         or not bool(torch.isfinite(self.quality).all())):
            raise ValueError(f"quality must hold one finite number per prototype ({self.prototypes.shape[0]}); got "
                             f"shape {tuple(self.quality.shape)}")
        if self.centre is not None:
            check_matrix(self.centre[None], "centre")
            if self.centre.shape != self.prototypes.shape[1:]:
                raise ValueError(f"centre must have the prototypes' dimension {self.prototypes.shape[1]}; got "
                                 f"shape {tuple(self.centre.shape)}")
        count = self.prototypes.shape[0]
        check_costs(self.costs)
        if self.costs.shape[0] != count or len(self.labels) != count:
            raise ValueError(f"a router needs one cost and one label per prototype; got {count} prototypes, "
                             f"{self.costs.shape[0]} costs and {len(self.labels)} labels")
        if self.bias_budgets.ndim != 1 or self.bias_budgets.shape != self.bias_lambdas.shape or \
                self.bias_budgets.shape[0] < 1:
            raise ValueError(f"bias_budgets and bias_lambdas must be 1-D of one equal, non-zero length; got "
                             f"{tuple(self.bias_budgets.shape)} and {tuple(self.bias_lambdas.shape)}")
        if bool((self.bias_budgets.diff() < 0).any()):
            raise ValueError("bias_budgets must be non-decreasing")


# --- checks -----------------------------------------------------------------------------------------------------------

def check_matrix(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (rows >= 1, dim >= 1); got {shape}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite; got NaN or infinite values")


def check_costs(costs: torch.Tensor) -> None:
    if not isinstance(costs, torch.Tensor) or costs.ndim != 1 or costs.shape[0] < 1:
        shape = tuple(costs.shape) if isinstance(costs, torch.Tensor) else type(costs).__name__
        raise ValueError(f"costs must have shape (K,) with K >= 1; got {shape}")
    if not bool((torch.isfinite(costs) & (costs > 0)).all()):
        raise ValueError(f"every cost must be a finite number > 0; got {costs.tolist()}")


def _check_budget(costs: torch.Tensor, budget: float) -> None:
    low, high = float(costs.min()), float(costs.max())
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and low <= budget <= high):
        raise ValueError(f"budget must be in [{low:g}, {high:g}], between the cheapest and the dearest variant's "
                         f"cost; got {budget}")


def _check_similarity(similarity: torch.Tensor, costs: torch.Tensor) -> None:
    check_matrix(similarity, "similarity")
    check_costs(costs)
    if similarity.shape[1] != costs.shape[0]:
        raise ValueError(f"similarity has {similarity.shape[1]} columns but there are {costs.shape[0]} costs; "
                         f"they must match")


def unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"{name} row {int((norms[:, 0] == 0).nonzero()[0])} is all zeros; a direction is needed")
    return x / norms


# --- similarities and the batch's transport plan ----------------------------------------------------------------------

def cosine_similarity(embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every prompt embedding with every prototype, in float64.

    Args:
        embeddings: (N, D) prompt embeddings, no row all zeros.
        prototypes: (K, D) prototypes, no row all zeros.
    Returns:
        S of shape (N, K), values in [−1, 1], float64.
    Raises:
        ValueError: a shape is not 2-D, D differs, or a row is zero or not finite.
    Example:
        >>> cosine_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        tensor([[1.0000, 0.0000],
                [0.7071, 0.7071]], dtype=torch.float64)
    """
    check_matrix(embeddings, "embeddings")
    check_matrix(prototypes, "prototypes")
    if embeddings.shape[1] != prototypes.shape[1]:
        raise ValueError(f"embeddings have dimension {embeddings.shape[1]} but prototypes {prototypes.shape[1]}; "
                         f"the router was fitted with another text encoder")
    return unit_rows(embeddings.double(), "embeddings") @ unit_rows(prototypes.double(), "prototypes").T


def router_similarity(embeddings: torch.Tensor, prototypes: torch.Tensor,
                      centre: torch.Tensor | None = None) -> torch.Tensor:
    """S of prompts against a router's prototypes: the cosine of ``embeddings − centre`` with each prototype,
    times the prototype's length. Clustered prototypes have unit length, so S is their plain cosine; a
    "difficulty" router's are mean unit vectors, shorter where their group agrees less on a direction, so a
    group with no direction of its own (the middle of an ordered scale) scores near 0 instead of at random.

    Example:
        >>> router_similarity(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
        tensor([[0.6000, 0.4000]], dtype=torch.float64)
    """
    check_matrix(embeddings, "embeddings")
    if centre is not None and embeddings.shape[1] == centre.shape[0]:  # else cosine_similarity names the mismatch
        embeddings = embeddings.double() - centre.double()
    return cosine_similarity(embeddings, prototypes) * prototypes.double().norm(dim=1)


def _expected_cost(log_preference: torch.Tensor, costs: torch.Tensor, tilt: float) -> float:
    return float(torch.softmax(log_preference - tilt * costs, dim=0) @ costs)


def budget_marginals(similarity: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
    """Column masses whose expected cost is the budget: the natural preference tilted by exp(−λ·c).

    The natural preference of variant k is the share of prompts whose nearest prototype is k, plus a floor of
    1e-3 so that every variant stays reachable. The masses are preference·exp(−λ·c), normalised, with λ found by
    bisection so that Σ_k mass_k·c_k = b. λ may be negative: a budget above the natural mean cost tilts the
    masses toward the dearer variants.

    Source: ``router.md`` §5.1 (``budget_marginals``). Departure: λ is searched on both sides of 0 (the note's
    demo searches [0, 50], which cannot raise the cost), in the log domain, so that no mass underflows to 0 on
    the way.

    Args:
        similarity: S, (N, K).
        costs: c, (K,), each > 0.
        budget: b in [min c, max c].
    Returns:
        The masses, (K,), float64, summing to 1. At b = min c (or max c) all the mass sits on the cheapest
        (dearest) variants.
    Raises:
        ValueError: bad shapes, costs or a budget outside [min c, max c].
    Example:
        >>> similarity = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
        >>> masses = budget_marginals(similarity, torch.tensor([1.0, 0.5]), 0.6)
        >>> round(float(masses @ torch.tensor([1.0, 0.5], dtype=torch.float64)), 6)
        0.6
    """
    _check_similarity(similarity, costs)
    _check_budget(costs, budget)
    costs = costs.double()
    count = similarity.shape[1]
    nearest = torch.bincount(similarity.argmax(dim=1), minlength=count).double() / similarity.shape[0]
    log_preference = (nearest + PREFERENCE_FLOOR).log()
    distinct = costs.unique()
    if distinct.numel() == 1:
        return torch.softmax(log_preference, dim=0)  # every variant costs the budget
    limit = TILT_SATURATION / float(distinct.diff().min())
    low, high = -limit, limit  # expected cost: max c at low, min c at high; it falls as λ grows
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if _expected_cost(log_preference, costs, middle) > budget:
            low = middle
        else:
            high = middle
    return torch.softmax(log_preference - (low + high) / 2 * costs, dim=0)


def hull_masses(costs: torch.Tensor, quality: torch.Tensor, budget: float) -> torch.Tensor:
    """Column masses of the best routing-free use of the variants at the budget: the mix of two variants on the
    upper hull of (cost, quality) that costs the budget, or one variant that costs it exactly.

    A prompt-blind mix of these two is the best any mix of single variants does at this budget, and the routing
    that follows only decides which prompts take which of them: with prototypes that know nothing it matches
    that mix, with prototypes that know which prompts gain from the dearer variant it beats it. A variant under
    the hull (dearer and no better, or not worth its cost) gets no mass. The tilted natural shares
    (:func:`budget_marginals`) know no quality, so they give a poor cheap variant as much mass as a good one.

    Args:
        costs: c, (K,), each > 0.
        quality: (K,) finite, the variants' mean quality.
        budget: b in [min c, max c].
    Returns:
        The masses, (K,), float64, summing to 1, at most two of them non-zero; Σ_k mass_k·c_k = b.
    Raises:
        ValueError: bad shapes, costs or a budget outside [min c, max c].
    Example:
        >>> masses = hull_masses(torch.tensor([0.2, 0.4, 1.0], dtype=torch.float64), torch.tensor([0.44, 0.72, 0.94]),
        ...                      0.6)
        >>> [round(mass, 4) for mass in masses.tolist()]  # the 4-step variant is not worth its saving
        [0.0, 0.6667, 0.3333]
    """
    check_costs(costs)
    _check_budget(costs, budget)
    if quality.shape != costs.shape or not bool(torch.isfinite(quality).all()):
        raise ValueError(f"quality must hold one finite number per cost ({costs.shape[0]}); got shape "
                         f"{tuple(quality.shape)}")
    costs, quality = costs.double(), quality.double()
    # The upper hull by the monotone chain, cheapest first; of equal costs only the best quality can be on it.
    hull: list[int] = []
    for k in sorted(range(costs.shape[0]), key=lambda k: (float(costs[k]), -float(quality[k]), k)):
        if hull and float(costs[hull[-1]]) == float(costs[k]):
            continue
        while len(hull) >= 2:  # drop the last point while it lies on or under the chord to k
            a, b = hull[-2], hull[-1]
            if float((costs[b] - costs[a]) * (quality[k] - quality[a])
                     - (quality[b] - quality[a]) * (costs[k] - costs[a])) < 0:
                break
            hull.pop()
        hull.append(k)
    position = min(bisect.bisect_left([float(costs[k]) for k in hull], budget), len(hull) - 1)
    low, high = hull[max(position - 1, 0)], hull[position]
    masses = torch.zeros_like(costs)
    share = 1.0 if low == high else (budget - float(costs[low])) / float(costs[high] - costs[low])
    masses[low] += 1 - share
    masses[high] += share
    return masses


def sinkhorn(similarity: torch.Tensor, masses: torch.Tensor, epsilon: float = DEFAULT_EPSILON,
             tolerance: float = SINKHORN_TOLERANCE, max_iterations: int = MAX_SINKHORN_ITERATIONS) -> torch.Tensor:
    """The entropic transport plan between N prompts (mass 1/N each) and K variants (``masses``).

    Q = diag(e^u) · exp(S/ε) · diag(e^v), with u and v from alternating Sinkhorn–Knopp updates in the log domain
    (column update, then row update, as in APTP), so rows sum to 1/N exactly and columns to ``masses`` once
    converged.

    Source: APTP ``quantizer.py`` ``sinkhorn`` (after SwAV ``main_swav.py``), ε = 0.05. Departure: APTP stops
    after 3 iterations; we iterate until every column mass is within ``tolerance`` (or ``max_iterations``),
    because the budget rides on the column masses. The log domain keeps exp(S/ε) = e^{±20} and tiny masses from
    overflowing or vanishing.

    Args:
        similarity: S, (N, K).
        masses: (K,), non-negative, summing to 1.
        epsilon: ε > 0; smaller follows S more sharply.
        tolerance: the largest column-mass error accepted, > 0.
        max_iterations: ≥ 1; a plan that has not converged by then is returned as it is (convergence slows
            as exp(−spread of S / ε); :func:`route_batch`'s repair pass holds the budget either way).
    Returns:
        Q, (N, K), float64.
    Raises:
        ValueError: bad shapes, masses that are negative or do not sum to 1, or ε, tolerance or max_iterations
            out of range.
    Example:
        >>> plan = sinkhorn(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([0.5, 0.5]))
        >>> plan.sum(dim=0), plan.argmax(dim=1)
        (tensor([0.5000, 0.5000], dtype=torch.float64), tensor([0, 1]))
    """
    check_matrix(similarity, "similarity")
    if masses.ndim != 1 or masses.shape[0] != similarity.shape[1]:
        raise ValueError(f"masses must have shape ({similarity.shape[1]},); got {tuple(masses.shape)}")
    if bool((masses < 0).any()) or abs(float(masses.sum()) - 1) > 1e-9:
        raise ValueError(f"masses must be non-negative and sum to 1; got {masses.tolist()}")
    if not (epsilon > 0 and tolerance > 0 and max_iterations >= 1):
        raise ValueError(f"epsilon and tolerance must be > 0 and max_iterations >= 1; got {epsilon}, {tolerance}, "
                         f"{max_iterations}")
    masses = masses.double()
    log_kernel = similarity.double() / epsilon
    log_masses = masses.log()
    log_row = -math.log(similarity.shape[0])
    u = torch.zeros(similarity.shape[0], dtype=torch.float64)
    v = torch.zeros(similarity.shape[1], dtype=torch.float64)
    for iteration in range(max_iterations + 1):
        # log of each column's sum without v: it gives the current column masses and the next v alike
        column_sums = torch.logsumexp(log_kernel + u[:, None], dim=0)
        error = float(((v + column_sums).exp() - masses).abs().max())
        if iteration > 0 and error <= tolerance:
            break
        if iteration == max_iterations:
            logger.debug("Sinkhorn stopped after %d iterations with a column-mass error of %.2g", max_iterations,
                         error)
            break
        v = log_masses - column_sums
        u = log_row - torch.logsumexp(log_kernel + v[None, :], dim=1)
    return (log_kernel + u[:, None] + v[None, :]).exp()


# --- hard assignment under the budget ---------------------------------------------------------------------------------

def repair_to_budget(similarity: torch.Tensor, assignment: torch.Tensor, costs: torch.Tensor, budget: float,
                     tolerance: float = BUDGET_TOLERANCE, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Move prompts between variants, one at a time, until the batch's mean cost is within ``tolerance`` of b.

    Each step takes, among the moves (prompt i from its variant a_i to variant k) that bring the mean cost
    strictly closer to the budget, the one with the smallest similarity loss per unit of cost change,
    (S[i, a_i] − S[i, k]) / |c_k − c_{a_i}| (a negative loss, a gain, comes first). It works in both directions:
    toward cheaper variants above the budget, toward dearer ones below it. Ties go to the lowest prompt index,
    then the lowest variant index, so the result is deterministic.

    Guarantee: every step lowers |mean − b|, so the pass ends; when N ≥ (max c − min c) / (2·tolerance) (40
    prompts for costs in [0.2, 1] and tolerance 0.01) no admissible step can jump over the band, so it ends
    with |mean − b| ≤ tolerance for any b in [min c, max c]. A smaller batch ends as close as single moves get.

    Source: ``router.md`` §5.2 ("greedy repair until the mean cost is within the budget"); APTP has no repair.

    Args:
        similarity: S, (N, K).
        assignment: (N,) int64 variant indices in [0, K).
        costs: c, (K,), each > 0.
        budget: b in [min c, max c].
        tolerance: ≥ 0.
        allowed: (K,) bool, the variants prompts may move to (default all); the guarantee holds when the
            allowed costs bracket b and the assignment uses allowed variants only.
    Returns:
        The repaired assignment, (N,) int64; the input is not changed.
    Raises:
        ValueError: bad shapes, indices out of range, a budget outside [min c, max c] or a negative tolerance.
    Example:
        >>> similarity = torch.tensor([[0.9, 0.8], [0.9, 0.1], [0.5, 0.4], [0.7, 0.2]])
        >>> repair_to_budget(similarity, torch.zeros(4, dtype=torch.long), torch.tensor([1.0, 0.5]), 0.75)
        tensor([1, 0, 1, 0])
    """
    _check_similarity(similarity, costs)
    _check_budget(costs, budget)
    count, variants = similarity.shape
    if assignment.shape != (count,) or assignment.dtype != torch.int64:
        raise ValueError(f"assignment must be int64 of shape ({count},); got {assignment.dtype} "
                         f"{tuple(assignment.shape)}")
    if bool(((assignment < 0) | (assignment >= variants)).any()):
        raise ValueError(f"assignment values must be in [0, {variants}); got {assignment.tolist()}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0; got {tolerance}")
    if allowed is not None and (allowed.shape != (variants,) or allowed.dtype != torch.bool):
        raise ValueError(f"allowed must be bool of shape ({variants},); got {allowed.dtype} {tuple(allowed.shape)}")
    similarity, costs = similarity.double(), costs.double()
    assignment = assignment.clone()
    prompts = torch.arange(count)
    target, slack = budget * count, tolerance * count  # in total cost, so no mean is divided at every step
    while True:
        current = costs[assignment]
        gap = float(current.sum()) - target
        if abs(gap) <= slack:
            break
        change = costs[None, :] - current[:, None]  # (N, K): total-cost change of moving prompt i to variant k
        closer = (gap + change).abs() < abs(gap)
        if allowed is not None:
            closer &= allowed[None, :]
        loss = similarity[prompts, assignment][:, None] - similarity
        ratio = torch.where(closer, loss / change.abs(), torch.full_like(loss, math.inf)).flatten()
        best = int(ratio.argmin())  # the first minimum: lowest prompt, then lowest variant
        if ratio[best] == math.inf:
            break
        assignment[best // variants] = best % variants
    return assignment


def route_batch(embeddings: torch.Tensor, router: Router, budget: float, epsilon: float = DEFAULT_EPSILON,
                tolerance: float = BUDGET_TOLERANCE) -> torch.Tensor:
    """Route a batch of prompts so that its mean cost is within ``tolerance`` of the budget.

    1. S = the prompts' similarity with the prototypes (:func:`router_similarity`).
    2. Column masses for the budget: from the variants' quality when the router knows it (:func:`hull_masses`),
       else from the prototypes' natural shares (:func:`budget_marginals`).
    3. The Sinkhorn plan (:func:`sinkhorn`) and its argmax per prompt (APTP's hard assignment).
    4. The greedy repair (:func:`repair_to_budget`), among the variants with mass only when the masses came
       from the quality: the argmax of a diffuse plan overfills the dearer variant, and a repair free to use a
       variant off the hull would spend the saving there.

    Args:
        embeddings: (N, D) prompt embeddings from the router's text encoder.
        router: the router.
        budget: b in [min c, max c].
        epsilon: Sinkhorn's ε.
        tolerance: the budget band; see :func:`repair_to_budget` for when it is guaranteed.
    Returns:
        (N,) int64 variant indices.
    Raises:
        ValueError: bad shapes or a budget outside the router's cost range.
    Example:
        >>> from nodes.router.fitting import fit_router
        >>> router = fit_router(torch.eye(4), torch.arange(4.0), torch.tensor([0.25, 0.5, 0.75, 1.0]),
        ...                     ["a", "b", "c", "d"], "kmeans", torch.Generator().manual_seed(0))
        >>> route_batch(torch.eye(4), router, 0.625).tolist()
        [0, 1, 2, 3]
    """
    similarity = router_similarity(embeddings, router.prototypes, router.centre)
    if router.quality is None:
        masses, allowed = budget_marginals(similarity, router.costs, budget), None
    else:
        masses = hull_masses(router.costs, router.quality, budget)
        allowed = masses > 0
    plan = sinkhorn(similarity, masses, epsilon)
    return repair_to_budget(similarity, plan.argmax(dim=1), router.costs, budget, tolerance, allowed)


# --- one prompt at a time ---------------------------------------------------------------------------------------------

def single_prompt_bias(similarity: torch.Tensor, costs: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """λ_single per budget b, such that routing these prompts one at a time, by argmax_k S[i, k] − λ_single·c_k,
    costs b on average.

    The mean cost of that rule falls in steps as λ_single grows. A bisection finds the step edge at the budget
    and keeps the side whose mean cost is closer to it (the cheaper side on a tie); two more bisections find
    that step's ends, and λ_single is its middle, so that new prompts near a decision boundary do not flip on a
    hair. No λ beyond ±(2/gap + 1), gap the smallest difference between two distinct costs, changes anything,
    since |S[i, k] − S[i, j]| ≤ 2. All budgets are bisected together.

    Departure: APTP routes one prompt by plain argmax, which ignores the budget; the bias is ours.

    Args:
        similarity: S of the calibration prompts, (N, K).
        costs: c, (K,), each > 0.
        budgets: (G,), each in [min c, max c].
    Returns:
        λ_single per budget, (G,), float64 (0 when all costs are equal).
    Raises:
        ValueError: bad shapes or costs, or a budget outside [min c, max c].
    Example:
        >>> similarity = torch.tensor([[0.9, 0.1], [0.6, 0.5], [0.1, 0.9]])
        >>> costs = torch.tensor([1.0, 0.5])
        >>> bias = single_prompt_bias(similarity, costs, torch.tensor([2 / 3, 1.0]))
        >>> (similarity[None] - bias[:, None, None] * costs).argmax(dim=2).tolist()
        [[0, 1, 1], [0, 0, 0]]
    """
    _check_similarity(similarity, costs)
    if budgets.ndim != 1:
        raise ValueError(f"budgets must be 1-D; got shape {tuple(budgets.shape)}")
    for budget in budgets.tolist():
        _check_budget(costs, budget)
    similarity, costs, budgets = similarity.double(), costs.double(), budgets.double()
    distinct = costs.unique()
    if distinct.numel() == 1:
        return torch.zeros_like(budgets)
    # Budgets per chunk, so that the (chunk, N, K) tensor of biased similarities stays near 4M numbers.
    chunk = max(1, BIAS_CHUNK_NUMBERS // similarity.numel())
    return torch.cat([_bias_for_budgets(similarity, costs, budgets[start:start + chunk], float(distinct.diff().min()))
                      for start in range(0, budgets.shape[0], chunk)])


def _bias_for_budgets(similarity: torch.Tensor, costs: torch.Tensor, budgets: torch.Tensor,
                      gap: float) -> torch.Tensor:
    def mean_costs(biases: torch.Tensor) -> torch.Tensor:
        choices = (similarity[None] - biases[:, None, None] * costs).argmax(dim=2)
        return costs[choices].mean(dim=1)

    def edge(low: torch.Tensor, high: torch.Tensor, above: Callable[[torch.Tensor], torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bisect [low, high] per budget, where ``above`` holds at low and fails at high."""
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            holds = above(middle)
            low, high = torch.where(holds, middle, low), torch.where(holds, high, middle)
        return low, high

    limit = torch.full_like(budgets, 2 / gap + 1)  # mean cost: max c at −limit, min c at +limit
    low, high = edge(-limit, limit, lambda bias: mean_costs(bias) > budgets)
    mean_low, mean_high = mean_costs(low), mean_costs(high)
    start = edge(-limit, low, lambda bias: mean_costs(bias) > mean_low)[1]
    end = edge(high, limit, lambda bias: mean_costs(bias) >= mean_high)[0]
    closer_below = (mean_low - budgets).abs() < (mean_high - budgets).abs()
    return torch.where(closer_below, (start + low) / 2, (high + end) / 2)


def _bias_at(router: Router, budget: float) -> float:
    """λ_single for ``budget``, linearly interpolated in the router's table (its end values beyond its ends)."""
    budgets, lambdas = router.bias_budgets.tolist(), router.bias_lambdas.tolist()
    upper = bisect.bisect_left(budgets, budget)  # the first table budget >= budget
    if upper == 0:
        return lambdas[0]
    if upper == len(budgets):
        return lambdas[-1]
    weight = (budget - budgets[upper - 1]) / (budgets[upper] - budgets[upper - 1])  # budgets[upper - 1] < budget
    return lambdas[upper - 1] + weight * (lambdas[upper] - lambdas[upper - 1])


def route_single(embeddings: torch.Tensor, router: Router, budget: float) -> torch.Tensor:
    """Route each prompt on its own: argmax_k S[k] − λ_single(b)·c_k, with no coupling between prompts.

    λ_single(b) comes from the router's table, calibrated on the prompts it was fitted on, so that those prompts
    routed one at a time cost b on average; new prompts from the same population do too, approximately. A single
    prompt's own cost is one of the variants' costs, not b.

    Args:
        embeddings: (N, D) prompt embeddings; N = 1 for one prompt.
        router: the router.
        budget: b in [min c, max c].
    Returns:
        (N,) int64 variant indices.
    Raises:
        ValueError: bad shapes or a budget outside the router's cost range.
    Example:
        >>> from nodes.router.fitting import fit_router
        >>> router = fit_router(torch.eye(2), torch.arange(2.0), torch.tensor([0.5, 1.0]), ["fast", "full"],
        ...                     "kmeans", torch.Generator().manual_seed(0))
        >>> route_single(torch.tensor([[0.2, 1.0]]), router, 1.0).tolist(), route_single(torch.eye(2), router, 0.5)
        ([1], tensor([0, 0]))
    """
    _check_budget(router.costs, budget)
    similarity = router_similarity(embeddings, router.prototypes, router.centre)
    return (similarity - _bias_at(router, budget) * router.costs).argmax(dim=1)
