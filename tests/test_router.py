"""The prompt router (issue #10): the budget per batch and on average, determinism, router files, refused input,
and lazy branch execution through the real executor, down to the example workflow on the shipped model."""

from __future__ import annotations

import collections
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures_models import tiny_sd1  # noqa: F401  (session fixture)
from nodes.common.paths import PathOutsideFolderError
from nodes.models.clip import Clip
from nodes.models.refs import ModelRef
from nodes.models.loading import load_model
from nodes.router import routing
from nodes.models.loading import UnsafeModelFormatError
from nodes.router.nodes import (AtelierFitRouter, AtelierLoadRouter, AtelierLoadSentenceEncoder, AtelierRoutePrompt,
                                AtelierRoutePrompts, AtelierRouteSwitch, AtelierSaveRouter, parse_variants)
from nodes.router.embeddings import pooled_text_embeddings, sentence_embeddings
from nodes.router.fitting import fit_prototypes, fit_router
from nodes.router.router_files import load_router, save_router
from nodes.router.routing import (Router, budget_marginals, cosine_similarity, repair_to_budget, route_batch,
                                  route_single, sinkhorn)
from tiny_models import save_tiny_sentence_encoder
from web.executor import Executor
from web.folders import DataFolders
from web.registry import node_classes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COSTS = torch.tensor([1.0, 0.75, 0.5, 0.35], dtype=torch.float64)  # router.md §5.1's four variants
LABELS = ["full", "three quarters", "half", "third"]
BUDGETS = [0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # both ends of the cost range included
FLOAT_SLACK = 1e-9  # a mean of float costs sits on the band's edge up to rounding
CALIBRATION = ["a red circle", "a small blue square on the left", "a large green star at the top over a striped "
               "yellow background", "a white ring", "one black cross at the bottom, orange sky and red ground",
               "a purple diamond in the middle"]
STEP_VARIANTS = "4 steps = 0.2\n8 steps = 0.4\n20 steps = 1.0"


def synthetic_prompts(count: int = 1000, seed: int = 0, separation: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """router.md §5.1's population: 64-d embeddings around 4 fixed centres with a 70/15/10/5 % skew.

    Returns (embeddings (count, 64), each prompt's true cluster); the centres do not depend on ``seed``, so a new
    seed draws new prompts from the same population.
    """
    centres = torch.randn(4, 64, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    centres = centres / centres.norm(dim=1, keepdim=True)
    sizes = [count * 70 // 100, count * 15 // 100, count * 10 // 100]
    clusters = torch.repeat_interleave(torch.arange(4), torch.tensor([*sizes, count - sum(sizes)]))
    noise = torch.randn(count, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return separation * centres[clusters] + noise, clusters


@pytest.fixture(scope="module")
def fitted() -> tuple[Router, torch.Tensor]:
    embeddings, clusters = synthetic_prompts()
    router = fit_router(embeddings, clusters.double(), COSTS, LABELS, "kmeans", torch.Generator().manual_seed(0))
    return router, embeddings


def mean_cost(assignment: torch.Tensor, costs: torch.Tensor = COSTS) -> float:
    return float(costs.double()[assignment].mean())


# --- the maths ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count, variants", [(1, 1), (5, 3), (1000, 4)])
def test_cosine_similarity_shape_and_values(count, variants):
    embeddings, prototypes = torch.randn(count, 8), torch.randn(variants, 8)
    similarity = cosine_similarity(embeddings, prototypes)
    assert similarity.shape == (count, variants) and similarity.dtype == torch.float64
    expected = torch.nn.functional.cosine_similarity(embeddings[:, None].double(), prototypes[None].double(), dim=-1)
    assert torch.allclose(similarity, expected, atol=1e-12)


@pytest.mark.parametrize("budget", BUDGETS[1:-1])
def test_budget_marginals_expected_cost_is_the_budget(fitted, budget):
    router, embeddings = fitted
    masses = budget_marginals(cosine_similarity(embeddings, router.prototypes), COSTS, budget)
    assert abs(float(masses.sum()) - 1) < 1e-12 and bool((masses > 0).all())
    assert abs(float(masses @ COSTS) - budget) < 1e-9


def test_sinkhorn_plan_meets_both_marginals(fitted):
    router, embeddings = fitted
    similarity = cosine_similarity(embeddings, router.prototypes)
    masses = budget_marginals(similarity, COSTS, 0.6)
    plan = sinkhorn(similarity, masses)
    assert torch.allclose(plan.sum(dim=1), torch.full((1000,), 1e-3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(plan.sum(dim=0), masses, atol=1e-6)


@pytest.mark.parametrize("budget", BUDGETS)
def test_batch_routing_holds_the_budget_over_1000_prompts(fitted, budget):
    router, _ = fitted
    embeddings, _ = synthetic_prompts(seed=7)  # new prompts, not the ones the router was fitted on
    assert abs(mean_cost(route_batch(embeddings, router, budget)) - budget) <= routing.BUDGET_TOLERANCE + FLOAT_SLACK


def test_repair_moves_the_smallest_loss_per_cost_first_and_breaks_ties_by_index():
    # Prompts 0 and 2 lose the same similarity by moving to the cheap variant: the lower index moves first.
    similarity = torch.tensor([[0.9, 0.6], [0.9, 0.1], [0.9, 0.6], [0.9, 0.8]], dtype=torch.float64)
    everyone_full = torch.zeros(4, dtype=torch.long)
    one_move = repair_to_budget(similarity, everyone_full, torch.tensor([1.0, 0.5]), 0.875, tolerance=0.0)
    assert one_move.tolist() == [0, 0, 0, 1]  # prompt 3 loses least (0.1)
    two_moves = repair_to_budget(similarity, everyone_full, torch.tensor([1.0, 0.5]), 0.75, tolerance=0.0)
    assert two_moves.tolist() == [1, 0, 0, 1]  # then prompt 0 before its twin, prompt 2


def test_repair_raises_the_cost_when_the_batch_is_under_budget():
    similarity = torch.tensor([[0.2, 0.9], [0.8, 0.9], [0.5, 0.6]], dtype=torch.float64)
    everyone_cheap = torch.ones(3, dtype=torch.long)
    repaired = repair_to_budget(similarity, everyone_cheap, torch.tensor([1.0, 0.5]), 2 / 3, tolerance=0.0)
    assert repaired.tolist() == [1, 0, 1]  # prompt 1 gives up the least (0.1) for the dearer variant
    assert torch.equal(everyone_cheap, torch.ones(3, dtype=torch.long))  # the input is left as it was


def test_repair_leaves_a_batch_within_the_band_alone_and_a_small_batch_as_close_as_it_gets():
    similarity = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64)
    costs = torch.tensor([1.0, 0.5])
    within = torch.tensor([0, 1])
    assert torch.equal(repair_to_budget(similarity, within, costs, 0.745), within)
    # Two prompts can only average 0.5, 0.75 or 1: for a budget of 0.9 the nearest is 1, one move away.
    assert repair_to_budget(similarity, within, costs, 0.9).tolist() == [0, 0]


def test_routing_is_deterministic(fitted):
    router, _ = fitted
    calibration, difficulty = synthetic_prompts()
    again = fit_router(calibration, difficulty.double(), COSTS, LABELS, "kmeans", torch.Generator().manual_seed(0))
    assert torch.equal(again.prototypes, router.prototypes) and torch.equal(again.bias_lambdas, router.bias_lambdas)
    embeddings, _ = synthetic_prompts(seed=3)
    assert torch.equal(route_batch(embeddings, router, 0.6), route_batch(embeddings, again, 0.6))
    assert torch.equal(route_single(embeddings, router, 0.6), route_single(embeddings, again, 0.6))
    balanced = [fit_router(calibration[::4], difficulty[::4].double(), COSTS, LABELS, "sinkhorn",
                           torch.Generator().manual_seed(5)).prototypes for _ in range(2)]
    assert torch.equal(*balanced)


@pytest.mark.parametrize("budget", [0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
def test_single_prompt_routing_meets_the_budget_on_average(fitted, budget):
    router, embeddings = fitted
    assert abs(mean_cost(route_single(embeddings, router, budget)) - budget) <= 0.01  # the prompts it was fitted on
    fresh, _ = synthetic_prompts(seed=11)
    assert abs(mean_cost(route_single(fresh, router, budget)) - budget) <= 0.03  # new prompts, same population


def test_single_prompt_routing_spends_more_on_a_larger_budget(fitted):
    router, embeddings = fitted
    costs = [mean_cost(route_single(embeddings, router, budget)) for budget in BUDGETS]
    assert costs == sorted(costs) and costs[0] == pytest.approx(0.35) and costs[-1] == pytest.approx(1.0)


def test_fit_gives_harder_prompts_to_dearer_variants():
    embeddings, clusters = synthetic_prompts(400, separation=20.0)  # well apart: this k-means run finds all 4
    router = fit_router(embeddings, clusters.double(), COSTS, LABELS, "kmeans", torch.Generator().manual_seed(0))
    centres = torch.stack([embeddings[clusters == cluster].mean(dim=0) for cluster in range(4)])
    # cluster 3, the hardest, → variant 0 (cost 1.0), ..., cluster 0, the easiest → variant 3 (cost 0.35)
    assert cosine_similarity(router.prototypes, centres).argmax(dim=1).tolist() == [3, 2, 1, 0]


def test_difficulty_fit_with_quality_sends_the_prompts_that_need_it_to_the_dearer_variant():
    # Two topics apart on one axis; on another, a weaker sign of whether a prompt needs 8 steps or 20.
    generator = torch.Generator().manual_seed(0)
    needs_full = torch.rand(600, generator=generator) < 1 / 3
    topic = torch.rand(600, generator=generator) < 0.5
    embeddings = torch.randn(600, 16, generator=generator, dtype=torch.float64) * 0.3
    embeddings[:, 0] += torch.where(topic, 2.0, -2.0)
    embeddings[:, 1] += 1.5 * needs_full.double()
    costs = torch.tensor([0.2, 0.4, 1.0], dtype=torch.float64)
    difficulty = torch.where(needs_full, 1.0, 0.4).double()
    quality = torch.tensor([0.44, 0.72, 0.94])  # 4 steps are not worth their saving at budget 0.6
    agreement = {}
    for method in ("kmeans", "difficulty"):
        router = fit_router(embeddings, difficulty, costs, ["4", "8", "20"], method, torch.Generator().manual_seed(0),
                            quality=quality)
        routes = route_batch(embeddings, router, 0.6)
        assert abs(mean_cost(routes, costs) - 0.6) <= 0.01 + FLOAT_SLACK, routes.bincount()
        assert int((routes == 0).sum()) == 0, routes.bincount()
        agreement[method] = float((routes == torch.where(needs_full, 2, 1)).double().mean())
    # k-means splits by topic; a prompt-blind split would agree 5/9 of the time
    assert agreement["difficulty"] > 0.75 and agreement["kmeans"] < 0.65, agreement


def test_hull_masses_skip_a_variant_under_the_hull_and_meet_the_budget():
    costs = torch.tensor([0.2, 0.4, 1.0], dtype=torch.float64)
    for quality, budget, expected in [([0.44, 0.72, 0.94], 0.6, [0.0, 2 / 3, 1 / 3]),
                                      ([0.6, 0.62, 0.94], 0.4, [0.75, 0.0, 0.25]),  # 8 steps under the chord
                                      ([0.44, 0.72, 0.94], 0.4, [0.0, 1.0, 0.0])]:
        masses = routing.hull_masses(costs, torch.tensor(quality), budget)
        assert masses.tolist() == pytest.approx(expected) and float(masses @ costs) == pytest.approx(budget)


def test_sinkhorn_fit_balances_the_clusters_and_kmeans_follows_the_skew():
    embeddings, _ = synthetic_prompts(400)  # 70/15/10/5 %
    shares = {method: torch.bincount(fit_prototypes(embeddings, 4, method, torch.Generator().manual_seed(0))[1],
                                     minlength=4) / 400 for method in ("kmeans", "sinkhorn")}
    assert float(shares["kmeans"].max()) > 0.4
    assert bool(((shares["sinkhorn"] - 0.25).abs() < 0.05).all()), shares["sinkhorn"]


def test_router_survives_save_and_load(fitted, tmp_path):
    router, _ = fitted
    path = tmp_path / "router.safetensors"
    save_router(router, path)
    loaded = load_router(path)
    for name in ("prototypes", "costs", "bias_budgets", "bias_lambdas"):
        assert torch.equal(getattr(loaded, name), getattr(router, name)), name
    assert loaded.labels == tuple(LABELS) and loaded.embedding == router.embedding
    embeddings, _ = synthetic_prompts(seed=5)
    assert torch.equal(route_batch(embeddings, loaded, 0.6), route_batch(embeddings, router, 0.6))
    assert torch.equal(route_single(embeddings, loaded, 0.55), route_single(embeddings, router, 0.55))
    with safe_open(str(path), framework="pt") as file:
        assert file.metadata()["format"] == "atelier.router" and set(file.keys()) == {
            "prototypes", "costs", "bias_budgets", "bias_lambdas"}
    assert os.listdir(tmp_path) == ["router.safetensors"]  # written atomically: no temporary file left


def test_difficulty_router_keeps_its_centre_and_quality_through_save_and_load(tmp_path):
    embeddings, clusters = synthetic_prompts(400)
    router = fit_router(embeddings, clusters.double(), COSTS, LABELS, "difficulty", torch.Generator(),
                        quality=torch.tensor([0.9, 0.8, 0.7, 0.5]))
    save_router(router, tmp_path / "router.safetensors")
    loaded = load_router(tmp_path / "router.safetensors")
    assert torch.equal(loaded.centre, router.centre) and torch.equal(loaded.quality, router.quality)
    fresh, _ = synthetic_prompts(seed=5)
    assert torch.equal(route_batch(fresh, loaded, 0.6), route_batch(fresh, router, 0.6))


def test_load_refuses_files_that_are_not_routers(tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "notes.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match="not an Atelier router"):
        load_router(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_router(tmp_path / "notes.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_router(tmp_path / "missing.safetensors")


def refusals() -> list:
    router = fit_router(torch.eye(3), torch.arange(3.0), torch.tensor([0.2, 0.4, 1.0]), ["a", "b", "c"], "kmeans",
                        torch.Generator().manual_seed(0))
    return [
        (lambda: route_batch(torch.eye(3), router, 1.5),
         "budget must be in [0.2, 1], between the cheapest and the dearest variant's cost; got 1.5"),
        (lambda: route_single(torch.eye(3), router, 0.1), "; got 0.1"),
        (lambda: route_batch(torch.ones(2, 5), router, 0.5), "dimension 5 but prototypes 3"),
        (lambda: route_batch(torch.zeros(2, 3), router, 0.5), "row 0 is all zeros"),
        (lambda: route_single(torch.full((1, 3), float("nan")), router, 0.5), "must be finite"),
        (lambda: cosine_similarity(torch.eye(3), torch.empty(0, 3)), "prototypes must have shape"),
        (lambda: budget_marginals(torch.eye(3), torch.tensor([1.0, 0.5]), 0.7), "3 columns but there are 2"),
        (lambda: sinkhorn(torch.eye(2), torch.tensor([0.7, 0.7])), "sum to 1"),
        (lambda: repair_to_budget(torch.eye(2), torch.tensor([0, 2]), torch.tensor([1.0, 0.5]), 0.7), "[0, 2)"),
        (lambda: fit_router(torch.eye(2), torch.arange(2.0), torch.tensor([1.0, 0.5, 0.2]), ["a", "b", "c"],
                            "kmeans", torch.Generator()), "count must be in [1, 2]"),
        (lambda: fit_router(torch.eye(3), torch.arange(3.0), torch.tensor([1.0, 0.5]), ["a"], "kmeans",
                            torch.Generator()), "labels must name each of the 2 variants"),
        (lambda: fit_router(torch.eye(3), torch.arange(3.0), torch.tensor([1.0, -0.5]), ["a", "b"], "kmeans",
                            torch.Generator()), "finite number > 0; got [1.0, -0.5]"),
        (lambda: fit_router(torch.eye(3), torch.arange(3.0), torch.tensor([1.0, 0.5]), ["a", "b"], "spectral",
                            torch.Generator()), "method must be one of"),
        (lambda: fit_router(torch.ones(4, 3), torch.arange(4.0), torch.tensor([1.0, 0.5]), ["a", "b"], "kmeans",
                            torch.Generator()), "fewer than 2 distinct embeddings"),
        (lambda: fit_router(torch.eye(2), torch.arange(2.0), torch.tensor([1.0, 0.5, 0.2]), ["a", "b", "c"],
                            "difficulty", torch.Generator()), "at least one calibration prompt per variant (3)"),
        (lambda: fit_router(torch.eye(3), torch.arange(3.0), torch.tensor([1.0, 0.5]), ["a", "b"], "kmeans",
                            torch.Generator(), quality=torch.tensor([0.5])), "quality must hold one finite number"),
        (lambda: Router(torch.eye(2), torch.tensor([1.0]), ("a",), torch.zeros(1), torch.zeros(1)),
         "one cost and one label per prototype"),
    ]


@pytest.mark.parametrize("index", range(len(refusals())))
def test_bad_input_is_refused_with_a_message_naming_it(index):
    call, message = refusals()[index]
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


# --- the nodes ------------------------------------------------------------------------------------------------------

RUNS: collections.Counter = collections.Counter()


class CountedBranch:
    """A branch of the graph that counts its runs and outputs its value."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 100, "step": 1})}}

    def run(self, value):
        RUNS[value] += 1
        return (value,)


class ShowValue:
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True})}}

    def run(self, value):
        return {"ui": {"text": [str(value)]}}


def switch_graph(branch) -> dict:
    return {
        **{str(index + 1): {"class_type": "CountedBranch", "inputs": {"value": 10 * (index + 1)}}
           for index in range(3)},
        "4": {"class_type": "AtelierRouteSwitch", "inputs": {"branch": branch, "branch_0": ["1", 0],
                                                              "branch_1": ["2", 0], "branch_2": ["3", 0]}},
        "5": {"class_type": "ShowValue", "inputs": {"value": ["4", 0]}},
    }


def execute(executor: Executor, prompt: dict):
    checked = executor.validate(prompt)
    assert checked.ok, (checked.error, checked.node_errors)
    result = executor.execute(checked.prompt, "test", checked.outputs)
    assert result.status == "success", result.messages[-1]
    return result


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_route_switch_runs_only_the_chosen_branch(branch):
    RUNS.clear()
    executor = Executor({"CountedBranch": CountedBranch, "ShowValue": ShowValue,
                         "AtelierRouteSwitch": AtelierRouteSwitch})
    result = execute(executor, switch_graph(branch))
    assert RUNS == {10 * (branch + 1): 1}
    assert sorted(result.executed) == sorted([str(branch + 1), "4", "5"])
    assert result.outputs["5"]["text"] == [str(10 * (branch + 1))]


def test_route_switch_refuses_a_branch_that_is_not_connected():
    with pytest.raises(ValueError, match="branch 3 was chosen but its input branch_3 is not connected"):
        AtelierRouteSwitch().switch(3, branch_0=1)


@pytest.fixture
def executor_with_models(tmp_path, tiny_sd1):  # noqa: F811
    models = tmp_path / "models"
    (models / "diffusers").mkdir(parents=True)
    shutil.copytree(tiny_sd1.folder, models / "diffusers" / "tiny_sd1")
    classes = node_classes(DataFolders.under(str(tmp_path / "data")), str(models))
    return Executor({**classes, "CountedBranch": CountedBranch, "ShowValue": ShowValue})


@pytest.mark.parametrize("budget, routed", [(0.2, 0), (1.0, 2)])
def test_prompt_router_picks_the_branch_that_alone_runs(executor_with_models, budget, routed):
    RUNS.clear()
    prompt = {
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "diffusers/tiny_sd1"}},
        "11": {"class_type": "AtelierFitRouter", "inputs": {"clip": ["10", 1], "prompts": "\n".join(CALIBRATION),
                                                            "variants": STEP_VARIANTS, "method": "kmeans",
                                                            "cluster_seed": 0}},
        # A calibration prompt: at the cheapest (dearest) budget every one of them takes the cheapest (dearest).
        "12": {"class_type": "AtelierRoutePrompt", "inputs": {"clip": ["10", 1], "router": ["11", 0],
                                                              "prompt": CALIBRATION[2], "budget": budget}},
        **switch_graph(["12", 0]),
    }
    result = execute(executor_with_models, prompt)
    assert RUNS == {10 * (routed + 1): 1}
    assert set(result.executed) & {"1", "2", "3"} == {str(routed + 1)}


def test_prompt_router_nodes_equal_the_maths(tiny_sd1):  # noqa: F811
    clip = Clip(ModelRef(load_model(tiny_sd1.folder)))
    router = AtelierFitRouter().fit(clip, "\n".join(CALIBRATION), STEP_VARIANTS, "sinkhorn", 3)[0]
    assert router.labels == ("4 steps", "8 steps", "20 steps") and router.costs.tolist() == [0.2, 0.4, 1.0]

    def embed(prompts):
        return pooled_text_embeddings(clip.ref.model.tokenizers, clip.ref.model.text_encoders, prompts)

    expected = route_single(embed(CALIBRATION[:1]), router, 0.5).item()
    assert AtelierRoutePrompt().route(clip, router, CALIBRATION[0], 0.5) == (
        expected, router.labels[expected], CALIBRATION[0])
    branches, labels, prompts = AtelierRoutePrompts().route(clip, router, "\n".join(CALIBRATION) + "\n\n", 0.5)
    assert branches == route_batch(embed(CALIBRATION), router, 0.5).tolist() and prompts == CALIBRATION
    assert labels == [router.labels[branch] for branch in branches]


def test_a_local_sentence_encoder_embeds_fits_and_routes(tiny_sd1, tmp_path):  # noqa: F811
    save_tiny_sentence_encoder(tmp_path / "sentence_encoders" / "mini", CALIBRATION)
    loader = type("Load", (AtelierLoadSentenceEncoder,), {"models_dir": str(tmp_path)})
    assert loader.INPUT_TYPES()["required"]["encoder_name"][0] == ["mini"]
    encoder = loader().load("mini")[0]
    assert encoder.pooling == "mean" and encoder.name == "mini"
    # Mean pooling over real tokens only: a prompt padded in a batch embeds as it does alone.
    alone, batched = sentence_embeddings(encoder, CALIBRATION[:1]), sentence_embeddings(encoder, CALIBRATION)
    assert batched.shape == (len(CALIBRATION), 32)
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-5)

    clip = Clip(ModelRef(load_model(tiny_sd1.folder)))
    router = AtelierFitRouter().fit(clip, "\n".join(CALIBRATION), STEP_VARIANTS, "kmeans", 0, encoder)[0]
    assert router.prototypes.shape == (3, 32) and router.embedding == "sentence encoder mini"
    expected = route_single(alone, router, 0.5).item()
    assert AtelierRoutePrompt().route(clip, router, CALIBRATION[0], 0.5, encoder)[0] == expected
    assert AtelierRoutePrompts().route(clip, router, "\n".join(CALIBRATION), 0.5, encoder)[0] == \
        route_batch(batched, router, 0.5).tolist()
    # The tiny checkpoint's text encoder is 32 wide too: only the router's record of its encoder catches this.
    with pytest.raises(ValueError, match="fitted with the sentence encoder mini but .* sd1 text encoder"):
        AtelierRoutePrompt().route(clip, router, CALIBRATION[0], 0.5)
    text_router = AtelierFitRouter().fit(clip, "\n".join(CALIBRATION), STEP_VARIANTS, "kmeans", 0)[0]
    with pytest.raises(ValueError, match="but prompts would be embedded with the sentence encoder mini"):
        AtelierRoutePrompts().route(clip, text_router, "\n".join(CALIBRATION), 0.5, encoder)

    os.remove(tmp_path / "sentence_encoders" / "mini" / "model.safetensors")
    (tmp_path / "sentence_encoders" / "mini" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeModelFormatError, match="only safetensors"):
        loader().load("mini")


def test_save_and_load_router_nodes_round_trip_inside_the_models_folder(fitted, tmp_path):
    router, _ = fitted
    save = type("Save", (AtelierSaveRouter,), {"models_dir": str(tmp_path)})
    load = type("Load", (AtelierLoadRouter,), {"models_dir": str(tmp_path)})
    assert save().save(router, "mine")["ui"]["text"] == ["routers/mine.safetensors"]
    assert load.INPUT_TYPES()["required"]["router_name"][0] == ["mine.safetensors"]
    assert torch.equal(load().load("mine.safetensors")[0].prototypes, router.prototypes)
    before = load.IS_CHANGED("mine.safetensors")
    save().save(fit_router(torch.eye(2), torch.arange(2.0), torch.tensor([0.5, 1.0]), ["a", "b"], "kmeans",
                           torch.Generator()), "mine.safetensors")
    assert load.IS_CHANGED("mine.safetensors") != before  # a rewritten file is read again
    with pytest.raises(PathOutsideFolderError):
        save().save(router, "../escaped")
    assert "got an empty name" in AtelierSaveRouter.VALIDATE_INPUTS("  ")


@pytest.mark.parametrize("variants, prompts, message", [
    ("4 steps = 0.2\n20 steps", "a\nb", "line 2 must read 'label = cost'"),
    ("fast = 0\nfull = 1", "a\nb", "cost in (0, 100]; got 'fast = 0'"),
    ("fast = 0.2\nfast = 1", "a\nb", "repeats the label 'fast'"),
    ("\n".join(f"v{i} = {i + 1}" for i in range(9)), "a\n" * 9, "give 1 to 8 variants"),
    (STEP_VARIANTS, "only one prompt", "at least one calibration prompt per variant (3); got 1"),
])
def test_fit_router_validation_names_the_bad_widget(variants, prompts, message):
    assert message in AtelierFitRouter.VALIDATE_INPUTS(prompts, variants)
    assert AtelierFitRouter.VALIDATE_INPUTS("a\nb\nc", STEP_VARIANTS) is True


def test_parse_variants_keeps_branch_order():
    assert parse_variants("full = 1.0\n\nfast=0.25 \n") == (["full", "fast"], [1.0, 0.25])


# --- the example workflow -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, steps", [(0.2, 4), (1.0, 20)])
def test_prompt_router_workflow_runs_one_sampler_on_the_shipped_model(tmp_path, capsys, monkeypatch, budget, steps):
    from web.cli import main
    from web.nodes_sampling import KSampler

    sampled = []
    original = KSampler.sample

    def counted(self, **inputs):
        sampled.append(inputs["steps"])
        return original(self, **inputs)

    monkeypatch.setattr(KSampler, "sample", counted)
    workflow = os.path.join(ROOT, "workflows", "prompt_router.json")
    calibration_prompt = "a large blue star near the top"  # one of the workflow's calibration prompts
    code = main(["run", workflow, "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
                 "--set", f"Prompt Router.prompt={calibration_prompt}", "--set", f"Prompt Router.budget={budget}"])
    assert code == 0
    assert sampled == [steps]  # one of the three samplers ran: the one the budget calls for
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("output: ")]
    assert len(lines) == 1 and Image.open(lines[0].removeprefix("output: ")).size == (64, 64)
