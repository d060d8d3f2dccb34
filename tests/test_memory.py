"""The memory manager (issue 28): residents under a byte budget, least recently used out first, never one in use,
read back bit for bit; and the loaded models, their components and LoRAs kept by it.

Budgets are far below real models' sizes: tiny modules and tiny checkpoints, budgets in bytes, on the CPU.
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from fixtures_models import tiny_sd1, tiny_sd1_loras  # noqa: F401
from nodes.common.memory import MEMORY, MemoryBudgetError, MemoryManager, Resident, module_bytes
from nodes.common.progress import use_sink
from nodes.correspondence.cache import FeatureCache
from nodes.correspondence.features import FeatureMaps
from nodes.models import loading
from nodes.models.loader import weight_bytes
from nodes.models.lora import LoraSpec
from nodes.models.refs import ModelRef

LINEAR_BYTES = module_bytes(torch.nn.Linear(10, 10))  # 440


def linear(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(10, 10)


def resident(name: str, seed: int) -> Resident:
    """A resident whose weights read back from "its file": the same seed again."""
    return Resident(name, {"net": linear(seed)}, reload=lambda: {"net": linear(seed)})


def test_a_resident_over_the_budget_evicts_the_least_recently_used_and_reads_back_bit_for_bit():
    manager = MemoryManager(budgets={"cpu": 2 * LINEAR_BYTES}, enabled=True)
    first, second = manager.register(resident("first", 1)), manager.register(resident("second", 2))
    weight = first._parts["net"].module.weight.clone()
    with manager.use(first):
        pass  # first is now the most recently used: second goes
    manager.register(resident("third", 3))
    assert second.is_out and not first.is_out
    assert second._parts["net"].module.weight.is_meta
    with manager.use(second) as back:
        assert torch.equal(back._parts["net"].module.weight, linear(2).weight)
    assert first.is_out  # the least recently used made room
    with manager.use(first):
        assert torch.equal(first._parts["net"].module.weight, weight)
    assert manager.peak["cpu"] <= 2 * LINEAR_BYTES and manager.evictions == 3


def test_a_resident_in_use_is_never_evicted_and_what_cannot_fit_is_refused_by_name():
    manager = MemoryManager(budgets={"cpu": 2 * LINEAR_BYTES}, enabled=True)
    first, second = manager.register(resident("first", 1)), manager.register(resident("second", 2))
    with manager.use(first), manager.use(second):
        with pytest.raises(MemoryBudgetError, match=r"running prompt is using \(first, second\)"):
            manager.register(resident("third", 3))
        assert [held.name for held in manager.residents()] == ["first", "second"]
        with pytest.raises(RuntimeError, match="in use"):
            manager.evict(first)
    assert not first.is_out and not second.is_out
    big = Resident("big", {"net": torch.nn.Linear(30, 30)})
    with pytest.raises(MemoryBudgetError, match="big needs 3720 bytes on cpu, over its memory budget of 880 bytes"):
        manager.register(big)
    assert big not in manager.residents() and manager.used("cpu") == 2 * LINEAR_BYTES


def test_over_a_random_sequence_of_uses_the_count_never_exceeds_the_budget_and_results_match_no_eviction():
    budget = 3 * LINEAR_BYTES
    bounded, unbounded = (MemoryManager(budgets={"cpu": b}, enabled=True) for b in (budget, None))
    names = [f"r{seed}" for seed in range(6)]
    residents = {manager: {name: manager.register(resident(name, seed)) for seed, name in enumerate(names)}
                 for manager in (bounded, unbounded)}
    generator = random.Random(0)
    x = torch.randn(2, 10)
    for _ in range(40):
        name = generator.choice(names)
        outputs = []
        for manager in (bounded, unbounded):
            with manager.use(residents[manager][name]) as held:
                outputs.append(held._parts["net"].module(x))
                assert manager.used("cpu") <= (budget if manager is bounded else 6 * LINEAR_BYTES)
        assert torch.equal(*outputs)
    assert bounded.peak["cpu"] <= budget < unbounded.peak["cpu"]
    assert bounded.evictions > 0 and unbounded.evictions == 0


def test_free_all_forgets_everything_not_in_use_and_a_forgotten_resident_says_so():
    manager = MemoryManager(budgets={"cpu": 10 * LINEAR_BYTES}, enabled=True)
    kept, gone = manager.register(resident("kept", 1)), manager.register(Resident("gone", {"net": linear(2)}))
    with manager.use(kept):
        assert manager.free_all() == 1
    assert manager.residents() == [kept] and manager.used("cpu") == LINEAR_BYTES
    manager.evict(kept)
    assert manager.used("cpu") == 0 and manager.free_all() == 1 and manager.residents() == []
    other = manager.register(Resident("once", {"net": linear(3)}))
    manager.set_budget("cpu", LINEAR_BYTES)
    manager.register(resident("next", 4))  # "once" has no file to come back from: it is forgotten
    assert other.forgotten and other not in manager.residents()
    with pytest.raises(RuntimeError, match="once was freed"):
        with manager.use(other):
            pass
    assert gone not in manager.residents()


def test_a_disabled_manager_as_inside_comfyui_keeps_no_account():
    manager = MemoryManager(budgets={"cpu": 0}, enabled=False)
    held = manager.register(resident("any", 1))
    with manager.use(held), manager.use_module(held._parts["net"].module):
        pass
    assert manager.residents() == [] and manager.used("cpu") == 0


@pytest.fixture
def copies(tiny_sd1, tmp_path):
    """Three files of the tiny SD1 model (three models to the cache) and the global manager's CPU budget,
    restored afterwards."""
    paths = []
    for index in range(3):
        path = tmp_path / f"copy{index}.safetensors"
        shutil.copyfile(tiny_sd1.single_file, path)
        paths.append(str(path))
    loading.unload_all()
    MEMORY.peak.clear()
    before = MEMORY._budgets.get("cpu")
    yield paths
    loading.unload_all()
    MEMORY.set_budget("cpu", before)


def _load(path: str, tiny) -> ModelRef:
    return ModelRef(loading.load_model(path, config_dir=tiny.config_dir, device="cpu"))


def _outputs(ref: ModelRef) -> tuple[torch.Tensor, ...]:
    """ε, the text embedding and a decoded image of fixed inputs: every component's work."""
    from nodes.common.denoiser import DiffusersCodec

    torch.manual_seed(0)
    latent, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with ref.in_use("text") as loaded:
        tokens = loaded.tokenizers[0](["a red circle"], padding="max_length", max_length=77, return_tensors="pt")
        embeds = loaded.text_encoders[0](tokens.input_ids)[0]
    with ref.in_use("unet") as loaded:
        eps = loaded.unet(latent, t, encoder_hidden_states=embeds).sample
    image = DiffusersCodec(ref.model.vae).decode(latent)
    return eps, embeds, image


def test_loading_a_third_model_evicts_the_least_recently_used_and_results_are_bit_identical(copies, tiny_sd1,
                                                                                             tiny_sd1_loras):
    first = _load(copies[0], tiny_sd1).with_lora(LoraSpec(tiny_sd1_loras[0]))
    size = first.model.resident.nbytes()
    MEMORY.set_budget("cpu", int(2.5 * size))
    before = _outputs(first)
    second = _load(copies[1], tiny_sd1)
    _outputs(second)
    with first.in_use():
        third = _load(copies[2], tiny_sd1)  # first is in use: second, less recently used anyway, goes
    assert second.model.resident.is_out and not first.model.resident.is_out
    _outputs(third)
    _outputs(second)  # read back: first, now the least recently used, goes
    assert first.model.resident.is_out and first.model.unet.conv_in.weight.is_meta
    after = _outputs(first)  # read back, its LoRA applied again
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert first.model.lora_adapters and MEMORY.peak["cpu"] <= int(2.5 * size)
    assert loading.load_model(copies[0], config_dir=tiny_sd1.config_dir, device="cpu") is first.model


def test_a_model_in_use_is_never_evicted_mid_call(copies, tiny_sd1):
    first, second = _load(copies[0], tiny_sd1), _load(copies[1], tiny_sd1)
    MEMORY.set_budget("cpu", int(1.5 * first.model.resident.nbytes()))
    with first.in_use(), pytest.raises(MemoryBudgetError, match="copy0.safetensors"):
        _outputs(second)  # second was evicted by the budget; it cannot come back while first runs
    assert not first.model.resident.is_out and second.model.resident.is_out


def test_free_memory_empties_the_models_and_the_manager(copies, tiny_sd1):
    refs = [_load(path, tiny_sd1) for path in copies[:2]]
    assert len(MEMORY.residents()) >= 2 and MEMORY.used("cpu") >= refs[0].model.resident.nbytes()
    assert loading.unload_all() == 2
    assert MEMORY.residents() == [] and MEMORY.used("cpu") == 0 and loading.cached_models() == []


def test_a_first_load_is_refused_before_reading_when_its_weights_cannot_fit(copies, tiny_sd1):
    MEMORY.set_budget("cpu", 1000)
    with pytest.raises(MemoryBudgetError, match="copy0.safetensors needs"):
        _load(copies[0], tiny_sd1)
    assert loading.cached_models() == []


def test_the_feature_cache_is_counted_and_emptied_when_it_is_the_least_recently_used(copies, tiny_sd1):
    cache = FeatureCache()
    try:
        maps = FeatureMaps((torch.zeros(64, 64, 64),), "demo", (64, 64))  # 1 MiB
        cache.get_or_compute("a", lambda: maps)
        assert MEMORY.used("cpu") == cache.bytes_on("cpu") == 1 << 20
        size = weight_bytes(copies[0], torch.float32)
        MEMORY.set_budget("cpu", size + (1 << 19))  # the model, and half the cached maps
        _load(copies[0], tiny_sd1)
        assert len(cache) == 0 and MEMORY.used("cpu") <= size + (1 << 19)
    finally:
        MEMORY.remove_store(cache)


def test_encoders_load_once_per_folder_and_read_back_bit_for_bit(copies, tmp_path):
    from test_correspondence import TINY_DINOV2_NAME, write_tiny_dinov2

    write_tiny_dinov2(tmp_path)
    folder = tmp_path / "dinov2" / TINY_DINOV2_NAME
    _, model = loading.load_transformers_folder(folder, device="cpu")
    assert loading.load_transformers_folder(folder, device="cpu")[1] is model
    pixels = torch.rand(1, 3, 28, 28)
    with MEMORY.use_module(model):
        before = model(pixel_values=pixels).last_hidden_state
    resident, _ = MEMORY.owner(model)
    MEMORY.evict(resident)
    assert next(model.parameters()).is_meta
    with MEMORY.use_module(model):
        assert torch.equal(model(pixel_values=pixels).last_hidden_state, before)


def test_the_command_line_sets_the_budgets(copies, monkeypatch):
    from web.cli import set_memory_budgets

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    try:
        set_memory_budgets(1.5, 3)
        assert MEMORY.budget("cpu") == int(1.5 * 2**30)
        assert MEMORY.budget("cuda:0") == MEMORY.budget("cuda:1") == 3 << 30
    finally:
        for device in ("cuda:0", "cuda:1"):
            MEMORY._budgets.pop(device, None)


def test_the_feature_cache_gives_way_and_never_fails_a_node_when_what_runs_fills_the_budget(copies, tiny_sd1):
    ref = _load(copies[0], tiny_sd1)
    MEMORY.set_budget("cpu", ref.model.resident.nbytes() + 1000)
    cache = FeatureCache()
    try:
        with ref.in_use():
            maps = cache.get_or_compute("a", lambda: FeatureMaps((torch.zeros(16, 16, 16),), "demo", (16, 16)))
        assert maps.layers[0].shape == (16, 16, 16) and len(cache) == 0
    finally:
        MEMORY.remove_store(cache)


class _FakeAcceleratorResident(Resident):
    """Moves only in the count (and in :attr:`moves`): this machine has no GPU, and the tiering logic is what is
    under test."""

    moves: list[tuple[torch.nn.Module, str]] = []

    def _move_module(self, module: torch.nn.Module, device: str) -> None:
        self.moves.append((module, device))


def test_on_an_accelerator_the_least_recently_used_goes_to_the_cpu_first_then_out():
    manager = MemoryManager(budgets={"cuda:0": int(1.5 * LINEAR_BYTES), "cpu": int(2.5 * LINEAR_BYTES)},
                            enabled=True)
    first, second, third = (manager.register(_FakeAcceleratorResident(
        name, {"net": linear(seed)}, reload=lambda seed=seed: {"net": linear(seed)}, home="cuda:0"))
        for seed, name in enumerate(("first", "second", "third")))
    assert first.is_out and second.device_of("net") == third.device_of("net") == "cpu"  # the CPU holds two
    with manager.use(third):
        assert third.device_of("net") == "cuda:0"
    with manager.use(first):  # read back beside second; third leaves the GPU for the CPU, where second goes out
        assert (first.device_of("net"), third.device_of("net"), second.is_out) == ("cuda:0", "cpu", True)
    with manager.use(second):  # read back; first leaves the GPU for the CPU, where third goes out
        assert (second.device_of("net"), first.device_of("net"), third.is_out) == ("cuda:0", "cpu", True)
    assert manager.peak == {"cpu": 2 * LINEAR_BYTES, "cuda:0": LINEAR_BYTES}


def test_inside_comfyui_the_manager_stands_aside(monkeypatch):
    import sys
    import types

    assert MemoryManager().enabled
    monkeypatch.setitem(sys.modules, "comfy.model_management", types.ModuleType("comfy.model_management"))
    assert not MemoryManager().enabled


class _TextRecorder:
    """A progress sink that keeps the running node's progress texts."""

    def __init__(self):
        self.texts = []

    def progress(self, step, total, preview):
        pass

    def text(self, message):
        self.texts.append(message)

    def interrupted(self):
        return False


def test_on_an_accelerator_a_models_own_components_take_turns_when_it_does_not_fit_whole():
    """Sequential offload: the text encoder leaves the GPU for the UNet, the UNet for the VAE (one model, a GPU
    budget of one and a half components); loading moves the components one by one; the node says so."""
    manager = MemoryManager(budgets={"cuda:0": int(1.5 * LINEAR_BYTES), "cpu": 10 * LINEAR_BYTES}, enabled=True)
    parts = {name: linear(seed) for seed, name in enumerate(("text_encoder", "unet", "vae"))}
    model = manager.register(_FakeAcceleratorResident("model", parts, home="cuda:0"))
    for name in parts:  # as load_model does
        with manager.use(model, (name,)):
            pass
    where = lambda: {name: model.device_of(name) for name in parts}  # noqa: E731
    assert where() == {"text_encoder": "cpu", "unet": "cpu", "vae": "cuda:0"}
    recorder = _TextRecorder()
    with use_sink(recorder), manager.use(model, ("text_encoder",)):
        assert where() == {"text_encoder": "cuda:0", "unet": "cpu", "vae": "cpu"}
    assert recorder.texts == ["low memory: model runs its components in turn on cuda:0 (sequential offload)"]
    with manager.use(model, ("unet",)):
        assert where() == {"text_encoder": "cpu", "unet": "cuda:0", "vae": "cpu"}
    with pytest.raises(MemoryBudgetError, match=r"model \(vae\) has a block of 440 bytes that cannot run on cuda:0"):
        with manager.use(model, ("unet", "vae")):  # both at once cannot fit, not even the VAE block by block
            pass
    assert manager.peak["cuda:0"] == LINEAR_BYTES and not model.in_use


def test_a_part_that_alone_exceeds_the_gpu_budget_runs_there_block_by_block_and_whole_once_it_fits():
    """Module-level offload: each block goes to the GPU for its forward and back after it; the output is the
    model's; with a larger budget the part moves whole again, its hooks gone."""
    manager = MemoryManager(budgets={"cuda:0": 2 * LINEAR_BYTES, "cpu": 10 * LINEAR_BYTES}, enabled=True)
    torch.manual_seed(0)
    unet = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(),
                               torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)))
    x = torch.randn(3, 10)
    expected = unet(x)
    model = manager.register(_FakeAcceleratorResident("model", {"unet": unet}, home="cuda:0"))
    model.moves.clear()
    recorder = _TextRecorder()
    with use_sink(recorder), manager.use(model):
        assert model.streamed_on("unet") == "cuda:0" and model.device_of("unet") == "cpu"
        moves_before = len(model.moves)
        assert torch.equal(unet(x), expected)
    assert recorder.texts == ["low memory: model (unet) runs on cuda:0 block by block from the CPU (module-level "
                              "offload)"]
    linears = [unet[0], unet[2][0], unet[2][1]]
    assert model.moves[moves_before:] == [(block, device) for block in linears for device in ("cuda:0", "cpu")]
    assert manager.used("cuda:0") == 0 and manager.peak.get("cuda:0", 0) == 0
    manager.set_budget("cuda:0", 4 * LINEAR_BYTES)
    with manager.use(model):
        assert model.streamed_on("unet") is None and model.device_of("unet") == "cuda:0"
        moves_before = len(model.moves)
        unet(x)
    assert len(model.moves) == moves_before  # no hooks left
    single = manager.register(_FakeAcceleratorResident("single", {"net": torch.nn.Linear(30, 30)}, home="cuda:0"))
    with pytest.raises(MemoryBudgetError, match=r"single \(net\) has a block of 3720 bytes that cannot run on cuda:0"):
        with manager.use(single):  # one layer over the budget: no block is small enough
            pass
