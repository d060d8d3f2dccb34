"""Offline model loading: formats, family detection, the tokenizer, the cache, model folders and LoRA hot-swap."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import pickle
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import netguard
from fixtures_models import tiny_sd1, tiny_sd1_loras, tiny_sd2, tiny_sdxl, tiny_sdxl_lora  # noqa: F401, F811
from nodes.common.paths import PathOutsideFolderError
from nodes.models import export, families, loading, lora, model_configs, vae
from nodes.models.export import write_random_single_file
from nodes.models.families import UnknownModelLayoutError
from nodes.models.loading import UnsafeModelFormatError

TOKENIZER_SHA256 = {  # environment.md §2
    "vocab.json": "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69",
    "merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
}
A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
TINY = {"sd1": "tiny_sd1", "sd2": "tiny_sd2", "sdxl": "tiny_sdxl"}


def state_dicts_equal(first: torch.nn.Module, second: torch.nn.Module) -> list[str]:
    """The names of tensors that differ (or exist in only one) between two modules' state dicts."""
    a, b = first.state_dict(), second.state_dict()
    return sorted(set(a) ^ set(b)) + [key for key in a.keys() & b.keys() if not torch.equal(a[key], b[key])]


def unet_output(model: loading.LoadedModel, seed: int = 0) -> torch.Tensor:
    """One UNet call on fixed random inputs (with SDXL's added conditioning)."""
    generator = torch.Generator().manual_seed(seed)
    unet = model.unet
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if model.family == "sdxl":
        pooled = torch.randn(2, model.text_encoders[1].config.projection_dim, generator=generator)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        return unet(sample, torch.tensor([999, 500]), context, **extra).sample


def text_output(model: loading.LoadedModel) -> list[torch.Tensor]:
    ids = model.tokenizers[0]("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return [encoder(ids)[0] for encoder in model.text_encoders]


# --- the tokenizer ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TOKENIZER_SHA256))
def test_shipped_tokenizer_files_have_the_reference_sha256(name):
    with open(os.path.join(loading.SD1_TOKENIZER_DIR, name), "rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == TOKENIZER_SHA256[name]


@pytest.mark.parametrize("family, subfolder, pad_id", [("sd1", "tokenizer", 49407), ("sd2", "tokenizer", 0),
                                                        ("sdxl", "tokenizer", 49407), ("sdxl", "tokenizer_2", 0)])
def test_shipped_tokenizers_encode_a_photo_of_a_cat_as_sd_does(family, subfolder, pad_id):
    tokenizer = loading.load_tokenizer(loading.shipped_config_dir(family), subfolder)
    assert tokenizer("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == 77 and len(padded) == 77
    assert padded[7:] == [pad_id] * 70  # SD1 pads with <|endoftext|>, OpenCLIP encoders with "!"


def test_make_tokenizer_rebuilds_the_shipped_files_from_a_bpe_file(tmp_path):
    """The converter's vocabulary order on a two-merge BPE file: bytes, bytes with </w>, merges, the specials."""
    from nodes.models.make_tokenizer import convert

    size = convert(gzip.compress("#version header\nc a\nca t</w>".encode()), str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert size == len(vocab) == 256 * 2 + 2 + 2
    assert vocab["ca"] == 512 and vocab["cat</w>"] == 513 and vocab["<|endoftext|>"] == 515
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8") == "#version: 0.2\nc a\nca t</w>\n"


# --- the shipped configs ---------------------------------------------------------------------------------------------

# Parameter counts of the real models' components, which these configs must rebuild exactly. Published: SD1.5's
# model card's 860M UNet and 123M text encoder, SD2's 865M UNet, the SDXL paper's 2.6B UNet, 817M of text
# encoders (123M + 695M); the SDXL refiner's UNet, 2,259,526,660, is the 4.52 GB of
# unet/diffusion_pytorch_model.fp16.safetensors in stabilityai/stable-diffusion-xl-refiner-1.0 at 2 bytes each, and
# its text encoder and VAE are SDXL base's.
REAL_PARAMETER_COUNTS = {
    ("sd1", "unet"): 859_520_964, ("sd1", "vae"): 83_653_863, ("sd1", "text_encoder"): 123_060_480,
    ("sd2", "unet"): 865_910_724, ("sd2", "vae"): 83_653_863, ("sd2", "text_encoder"): 340_387_840,
    ("sdxl", "unet"): 2_567_463_684, ("sdxl", "vae"): 83_653_863, ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840, ("sdxl_refiner", "unet"): 2_259_526_660,
    ("sdxl_refiner", "vae"): 83_653_863, ("sdxl_refiner", "text_encoder_2"): 694_659_840,
}
# SD1.5 inpainting (sd-v1-5-inpainting, 512-inpainting-ema for SD2): the model card's "5 additional input channels
# (4 for the encoded masked-image and 1 for the mask)" add 5 × 320 × 3 × 3 weights to the input convolution.
INPAINTING_EXTRA_PARAMETERS = 5 * 320 * 3 * 3


@pytest.mark.parametrize("family, component", sorted(REAL_PARAMETER_COUNTS))
def test_shipped_configs_build_the_real_architectures(family, component):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config_dir = loading.shipped_config_dir(family)
    with torch.device("meta"):  # shapes only, no memory
        if component in ("unet", "vae"):
            cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
            model = cls.from_config(cls.load_config(config_dir, subfolder=component))
        else:
            config = CLIPTextConfig.from_pretrained(os.path.join(config_dir, component))
            model = (CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel)(config)
    assert sum(p.numel() for p in model.parameters()) == REAL_PARAMETER_COUNTS[family, component]


@pytest.mark.parametrize("family", families.FAMILIES)
def test_the_writers_full_size_architectures_have_the_published_parameter_counts(family):
    models = export.build_on_meta(family, export.configs_at_width(family))
    counts = {component: sum(p.numel() for p in model.parameters()) for component, model in models.items()}
    assert counts == {component: count for (owner, component), count in REAL_PARAMETER_COUNTS.items()
                      if owner == family}
    configs = export.configs_at_width(family)
    configs["unet"]["in_channels"] = 9
    inpainting = export.build_on_meta(family, configs)["unet"]
    extra = INPAINTING_EXTRA_PARAMETERS * configs["unet"]["block_out_channels"][0] // 320
    assert sum(p.numel() for p in inpainting.parameters()) == REAL_PARAMETER_COUNTS[family, "unet"] + extra


def test_shipped_configs_hold_each_familys_defining_settings():
    sd2, sdxl = loading.shipped_config_dir("sd2"), loading.shipped_config_dir("sdxl")
    read = families.read_json
    assert read(os.path.join(sd2, "unet", "config.json"))["use_linear_projection"] is True
    assert read(os.path.join(sdxl, "unet", "config.json"))["addition_embed_type"] == "text_time"
    vae = read(os.path.join(sdxl, "vae", "config.json"))
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    for family in families.FAMILIES:
        scheduler = read(os.path.join(loading.shipped_config_dir(family), "scheduler", "scheduler_config.json"))
        assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"]) == \
            ("scaled_linear", 0.00085, 0.012)
        assert families.family_from_diffusers_folder(loading.shipped_config_dir(family)) == family
    weights = [name for _, _, names in os.walk(loading.SHIPPED_CONFIGS) for name in names
               if name.endswith((".safetensors", ".bin", ".ckpt"))]
    assert weights == []


# --- loading ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(TINY))
def test_single_file_loads_to_the_same_weights_as_the_diffusers_folder(family, request):
    tiny = request.getfixturevalue(TINY[family])
    from_folder = loading.load_model(tiny.folder)
    from_file = loading.load_model(tiny.single_file, config_dir=tiny.config_dir)
    assert from_folder.family == from_file.family == family
    pairs = [(from_folder.unet, from_file.unet), (from_folder.vae, from_file.vae),
             *zip(from_folder.text_encoders, from_file.text_encoders, strict=True)]
    assert len(pairs) == (4 if family == "sdxl" else 3)
    for ours, theirs in pairs:
        assert state_dicts_equal(ours, theirs) == []
    assert [t.pad_token_id for t in from_file.tokenizers] == [t.pad_token_id for t in from_folder.tokenizers]
    latents = [model.pipeline("a cat", num_inference_steps=1, height=64, width=64, output_type="latent",
                              generator=torch.Generator().manual_seed(0)).images for model in (from_folder, from_file)]
    # Equal weights, but not bit-equal sums: the two loads lay tensors out differently, and a library loaded into
    # the process (OpenCV, with invisible-watermark) can switch the CPU's denormal mode.
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=1e-5)
    assert torch.isfinite(latents[0]).all()


def test_loading_makes_no_network_attempt(tiny_sd2):
    loading.unload_all()
    loading.load_model(tiny_sd2.single_file, config_dir=tiny_sd2.config_dir)
    loading.load_model(tiny_sd2.folder)
    assert netguard.ATTEMPTS == []


def test_loaded_model_is_float32_on_the_cpu_with_the_familys_schedule(tiny_sdxl):
    model = loading.load_model(tiny_sdxl.single_file, config_dir=tiny_sdxl.config_dir)
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())
    assert model.schedule.prediction_type == "epsilon" and model.schedule.num_train_timesteps == 1000
    assert round(float(model.schedule.ve_sigmas()[-1]), 3) == 14.615  # SD's scaled_linear schedule
    assert model.scheduler_config["prediction_type"] == "epsilon"


def test_default_dtype_is_half_on_a_gpu_and_float32_on_the_cpu():
    assert loading.default_dtype(torch.device("cuda")) == torch.float16
    assert loading.default_dtype(torch.device("cpu")) == torch.float32
    assert loading.default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_config_dir_of_another_family_is_refused(tiny_sd1, tiny_sd2):
    with pytest.raises(ValueError, match="is a sd1 checkpoint, but config_dir .* describes a sd2 model"):
        loading.load_model(tiny_sd1.single_file, config_dir=tiny_sd2.config_dir)


@pytest.mark.parametrize("extension", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_pickle_based_files_are_refused_and_never_unpickled(tmp_path, extension):
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / f"model{extension}"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeModelFormatError, match=rf"'model\{extension}' is a pickle-based file .*run any code"):
        loading.load_model(path)
    with pytest.raises(UnsafeModelFormatError, match="pickle-based"):
        lora.read_lora_file(path)
    assert not marker.exists()


def test_other_extensions_are_refused_with_what_is_accepted(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(UnsafeModelFormatError, match=r"'model.gguf' has extension '.gguf'; only .safetensors"):
        loading.load_model(path)


def test_diffusers_folder_with_only_bin_weights_is_refused(tmp_path, tiny_sd1):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_sd1.folder, folder)
    unet = folder / "unet"
    for name in os.listdir(unet):
        if name.endswith(".safetensors"):
            os.replace(unet / name, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeModelFormatError, match=r"only pickle-based weights \['diffusion_pytorch_model.bin'\]"):
        loading.load_model(folder)


def test_missing_model_is_reported_with_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at .*absent.safetensors"):
        loading.load_model(tmp_path / "absent.safetensors")


def test_bad_prediction_type_and_dtype_are_refused(tiny_sd1):
    with pytest.raises(ValueError, match="prediction_type must be one of .*got 'v'"):
        loading.load_model(tiny_sd1.folder, prediction_type="v")
    with pytest.raises(ValueError, match="dtype must be one of .*got torch.int8"):
        loading.load_model(tiny_sd1.folder, dtype=torch.int8)


# --- the cache -------------------------------------------------------------------------------------------------------

def test_cache_returns_the_same_object_for_the_same_file_and_options(tiny_sd1, tmp_path):
    first = loading.load_model(tiny_sd1.single_file, config_dir=tiny_sd1.config_dir)
    link = tmp_path / "link.safetensors"
    link.symlink_to(tiny_sd1.single_file)  # the same file by another name: the real path decides
    assert loading.load_model(link, config_dir=tiny_sd1.config_dir) is first
    # "auto" resolves before the cache lookup: naming the type it resolves to shares the same copy
    assert loading.load_model(tiny_sd1.single_file, config_dir=tiny_sd1.config_dir,
                              prediction_type=first.schedule.prediction_type) is first
    assert first in loading.cached_models()
    other = loading.load_model(tiny_sd1.single_file, config_dir=tiny_sd1.config_dir, dtype=torch.bfloat16)
    assert other is not first and other.unet.dtype == torch.bfloat16
    assert loading.unload_all() >= 2 and loading.cached_models() == []
    assert loading.load_model(tiny_sd1.single_file, config_dir=tiny_sd1.config_dir) is not first


def test_cache_reloads_a_file_that_changed_on_disk(tiny_sd1, tmp_path):
    path = tmp_path / "copy.safetensors"
    shutil.copyfile(tiny_sd1.single_file, path)
    first = loading.load_model(path, config_dir=tiny_sd1.config_dir)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert loading.load_model(path, config_dir=tiny_sd1.config_dir) is not first


# --- family detection ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(TINY))
def test_family_is_detected_from_single_files_and_folders(family, request):
    tiny = request.getfixturevalue(TINY[family])
    info = families.inspect_single_file(tiny.single_file)
    assert (info.family, info.prediction_type) == (family, "epsilon")
    assert families.family_from_diffusers_folder(tiny.folder) == family


def shapes_of(path: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in load_file(path).items()}


def test_unknown_layout_error_lists_what_was_found(tiny_sd1):
    vae_only = {k: v for k, v in shapes_of(tiny_sd1.single_file).items() if k.startswith("first_stage_model.")}
    with pytest.raises(UnknownModelLayoutError, match=r"no UNet under 'model.diffusion_model.'.*first_stage_model\.\w+ "
                                                      r"\(\d+\)"):
        families.family_from_shapes(vae_only)
    unet_only = {k: v for k, v in shapes_of(tiny_sd1.single_file).items() if k.startswith("model.")}
    with pytest.raises(UnknownModelLayoutError, match="a UNet without a text encoder .*found: model.diffusion_model"):
        families.family_from_shapes(unet_only)


def test_lora_file_given_as_a_checkpoint_is_named_as_a_lora(tiny_sd1_loras):
    with pytest.raises(UnknownModelLayoutError, match="holds LoRA weights, not a checkpoint"):
        families.family_from_shapes(shapes_of(tiny_sd1_loras[0]))


def test_mismatched_text_encoder_width_is_refused(tiny_sd1):
    shapes = shapes_of(tiny_sd1.single_file)
    shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 48)
    with pytest.raises(UnknownModelLayoutError, match="cross-attention width is 32 while its text encoder.* give 48"):
        families.family_from_shapes(shapes)


def test_inpainting_unets_are_accepted_and_other_input_widths_refused(tiny_sd1):
    shapes = shapes_of(tiny_sd1.single_file)
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (32, 9, 3, 3)
    assert families.family_from_shapes(shapes) == "sd1"
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (32, 5, 3, 3)  # SD2's depth model: not supported
    with pytest.raises(UnknownModelLayoutError, match=r"UNet takes 5 input channels; accepted are \(4, 9\)"):
        families.family_from_shapes(shapes)


def with_probe_std(source: str, target: str, std: float) -> str:
    tensors = load_file(source)
    probe = tensors[families.V_PREDICTION_PROBE_KEY]
    noise = torch.randn(probe.shape, generator=torch.Generator().manual_seed(0))
    tensors[families.V_PREDICTION_PROBE_KEY] = noise * std
    save_file(tensors, target)
    return target


def test_sd2_v_prediction_is_detected_by_comfyuis_heuristic_and_can_be_overridden(tiny_sd2, tmp_path):
    v_file = with_probe_std(tiny_sd2.single_file, str(tmp_path / "v.safetensors"), 0.3)
    info = families.inspect_single_file(v_file)
    assert info.prediction_type == "v_prediction" and "> 0.09" in info.reason
    eps_file = with_probe_std(tiny_sd2.single_file, str(tmp_path / "eps.safetensors"), 0.01)
    assert families.inspect_single_file(eps_file).prediction_type == "epsilon"
    model = loading.load_model(v_file, config_dir=tiny_sd2.config_dir)
    assert model.schedule.prediction_type == model.scheduler_config["prediction_type"] == "v_prediction"
    forced = loading.load_model(v_file, config_dir=tiny_sd2.config_dir, prediction_type="epsilon")
    assert forced.schedule.prediction_type == forced.scheduler_config["prediction_type"] == "epsilon"


def test_comfyui_v_pred_marker_counts_for_sdxl_only_as_in_comfyui(tiny_sdxl, tiny_sd1, tmp_path):
    for tiny, expected in ((tiny_sdxl, "v_prediction"), (tiny_sd1, "epsilon")):  # ComfyUI's SD15 is always eps
        tensors = load_file(tiny.single_file)
        tensors[families.V_PREDICTION_MARKER_KEY] = torch.tensor([])
        save_file(tensors, tmp_path / "marked.safetensors")
        assert families.inspect_single_file(tmp_path / "marked.safetensors").prediction_type == expected


# --- where models come from ------------------------------------------------------------------------------------------

@pytest.fixture
def models_dir(tmp_path, tiny_sd1, tiny_sd1_loras):
    """A ComfyUI-style models folder. Hard links, not symlinks: confine() refuses symlinks that point out."""
    for folder in loading.MODEL_FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "checkpoints" / "sub").mkdir()
    os.link(tiny_sd1.single_file, tmp_path / "checkpoints" / "sub" / "tiny.safetensors")
    (tmp_path / "checkpoints" / "old.ckpt").write_bytes(b"not loaded")
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a model")
    shutil.copytree(tiny_sd1.folder, tmp_path / "diffusers" / "tiny", copy_function=os.link)
    os.link(tiny_sd1_loras[0], tmp_path / "loras" / "a.safetensors")
    return tmp_path


def test_checkpoint_list_holds_single_files_and_diffusers_folders(models_dir):
    shipped = ["atelier_embedded_sd1.safetensors"], ["diffusers/atelier_embedded_sd1"]  # after the user's own
    # old.ckpt, a pickle, is never offered: a workflow naming it fails validation (#19)
    assert loading.list_checkpoints(models_dir) == ["sub/tiny.safetensors", *shipped[0],
                                                    "diffusers/tiny", *shipped[1]]
    assert loading.list_models("loras", models_dir) == ["a.safetensors"]


def test_checkpoints_load_by_their_listed_names(models_dir, tiny_sd1):
    folder_model = loading.load_checkpoint("diffusers/tiny", models_dir)
    assert folder_model.source == os.path.realpath(models_dir / "diffusers" / "tiny")
    assert state_dicts_equal(folder_model.unet, loading.load_model(tiny_sd1.folder).unet) == []
    assert loading.resolve_checkpoint("sub/tiny.safetensors", models_dir) == str(models_dir / "checkpoints" / "sub" /
                                                                                 "tiny.safetensors")
    with pytest.raises(UnsafeModelFormatError, match="'old.ckpt' is a pickle-based file"):
        loading.load_checkpoint("old.ckpt", models_dir)


def test_model_names_cannot_leave_their_folder(models_dir):
    with pytest.raises(PathOutsideFolderError):
        loading.resolve_model_path("checkpoints", "../loras/a.safetensors", models_dir)
    with pytest.raises(FileNotFoundError, match=r"no loras model 'b.safetensors'; available: \['a.safetensors'\]"):
        loading.resolve_model_path("loras", "b.safetensors", models_dir)
    with pytest.raises(ValueError, match="model folder must be one of .*got 'embeddings'"):
        loading.list_models("embeddings", models_dir)


def test_without_models_dir_outside_comfyui_the_error_says_what_to_pass():
    with pytest.raises(ValueError, match="pass models_dir .* or run inside ComfyUI"):
        loading.list_checkpoints()


def test_inside_comfyui_models_come_from_folder_paths(models_dir, monkeypatch):
    calls = []
    fake = types.ModuleType("folder_paths")
    fake.models_dir = str(models_dir)
    fake.folder_names_and_paths = {name: ([str(models_dir / name)], set()) for name in ("checkpoints", "diffusers",
                                                                                          "loras", "vae")}
    fake.get_folder_paths = lambda folder: fake.folder_names_and_paths[folder][0]

    def get_full_path(folder, name):
        calls.append((folder, name))
        path = models_dir / folder / name
        return str(path) if path.is_file() else None

    fake.get_full_path = get_full_path
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    assert loading.resolve_model_path("loras", "a.safetensors") == str(models_dir / "loras" / "a.safetensors")
    assert calls == [("loras", "a.safetensors")]
    assert loading.resolve_checkpoint("diffusers/tiny") == str(models_dir / "diffusers" / "tiny")
    assert "sub/tiny.safetensors" in loading.list_checkpoints()
    shipped = loading.resolve_checkpoint("atelier_embedded_sd1.safetensors")  # ComfyUI has none by that name
    assert shipped == os.path.join(loading.SHIPPED_MODELS, "checkpoints", "atelier_embedded_sd1.safetensors")
    # A kind ComfyUI has no setting for lives in its models/<kind>, as a folder per model.
    (models_dir / "sentence_encoders" / "minilm").mkdir(parents=True)
    (models_dir / "sentence_encoders" / "minilm" / "config.json").write_text("{}")
    assert loading.list_models("sentence_encoders") == ["minilm"]
    assert loading.resolve_model_path("sentence_encoders", "minilm") == str(models_dir / "sentence_encoders" / "minilm")


def full_size_shapes(family: str, unet_in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a full-size ``family`` single file as the writer lays it out, from meta tensors."""
    configs = export.configs_at_width(family)
    configs["unet"]["in_channels"] = unet_in_channels
    models = export.build_on_meta(family, configs)
    ldm = export.to_ldm(family, {name: model.state_dict() for name, model in models.items()}, configs)
    return {key: tuple(value.shape) for key, value in ldm.items()}


@pytest.mark.parametrize("family", families.FAMILIES)
def test_full_size_layouts_are_detected_and_take_the_shipped_configs(family):
    shapes = full_size_shapes(family)
    assert families.family_from_shapes(shapes) == family
    shipped = model_configs.component_configs(loading.shipped_config_dir(family))
    assert model_configs.derive_configs(family, shapes) == shipped


def test_a_single_file_whose_shapes_no_width_of_its_family_explains_is_refused_by_name(tiny_sd1):
    # The tiny SD1 model's levels are 32, 32, 64, 64 wide; SD1.5's layout multiplies its first width by 1, 2, 4, 4.
    with pytest.raises(UnknownModelLayoutError, match=r"'tiny_sd1.safetensors' has the tensor names of a sd1 "
                                                      r"checkpoint, but shapes that the sd1 layout \(at any width\) "
                                                      r"cannot hold: .*expected shape .*diffusers folder"):
        loading.load_model(tiny_sd1.single_file)


def test_an_inpainting_file_derives_a_9_channel_unet_config_and_nothing_else():
    shapes = full_size_shapes("sd1", unet_in_channels=9)
    derived = model_configs.derive_configs(families.family_from_shapes(shapes), shapes)
    shipped = model_configs.component_configs(loading.shipped_config_dir("sd1"))
    assert derived["unet"] == {**shipped["unet"], "in_channels": 9}
    assert {name: config for name, config in derived.items() if name != "unet"} == \
        {name: config for name, config in shipped.items() if name != "unet"}


# --- LoRA ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def sd1_model(tiny_sd1):
    model = loading.load_model(tiny_sd1.single_file, config_dir=tiny_sd1.config_dir)
    yield model
    model.remove_all_loras()


def test_lora_applied_then_removed_restores_the_base_weights_exactly(sd1_model, tiny_sd1_loras):
    base_state = {key: value.clone() for key, value in sd1_model.unet.state_dict().items()}
    base_unet, base_text = unet_output(sd1_model), text_output(sd1_model)
    lora.set_loras(sd1_model, [lora.LoraSpec(tiny_sd1_loras[0])])
    assert not torch.equal(unet_output(sd1_model), base_unet)
    assert not torch.equal(text_output(sd1_model)[0], base_text[0])
    sd1_model.remove_all_loras()
    state = sd1_model.unet.state_dict()
    assert state.keys() == base_state.keys()
    assert [key for key in state if not torch.equal(state[key], base_state[key])] == []
    assert torch.equal(unet_output(sd1_model), base_unet) and torch.equal(text_output(sd1_model)[0], base_text[0])


def test_an_empty_lora_list_runs_the_base_while_adapters_stay_resident(sd1_model, tiny_sd1_loras):
    base = unet_output(sd1_model)
    lora.set_loras(sd1_model, [lora.LoraSpec(tiny_sd1_loras[0])])
    with_lora = unet_output(sd1_model)
    lora.set_loras(sd1_model, [])
    assert torch.equal(unet_output(sd1_model), base) and len(sd1_model.lora_adapters) == 1
    lora.set_loras(sd1_model, [lora.LoraSpec(tiny_sd1_loras[0])])
    assert torch.equal(unet_output(sd1_model), with_lora)


def test_hot_swap_from_a_to_b_equals_b_alone(sd1_model, tiny_sd1_loras):
    a, b = (lora.LoraSpec(path, strength_model=0.8) for path in tiny_sd1_loras)
    lora.set_loras(sd1_model, [a])
    lora.set_loras(sd1_model, [b])
    swapped = unet_output(sd1_model)
    sd1_model.remove_all_loras()
    lora.set_loras(sd1_model, [b])
    assert torch.equal(swapped, unet_output(sd1_model))


def test_lora_strength_scales_the_branch_and_zero_model_strength_leaves_the_unet(sd1_model, tiny_sd1_loras):
    base_unet, base_text = unet_output(sd1_model), text_output(sd1_model)
    path = tiny_sd1_loras[0]
    lora.set_loras(sd1_model, [lora.LoraSpec(path, strength_model=1.0)])
    once = unet_output(sd1_model) - base_unet
    lora.set_loras(sd1_model, [lora.LoraSpec(path, strength_model=2.0)])
    twice = unet_output(sd1_model) - base_unet
    assert not torch.allclose(once, twice, atol=1e-6)
    lora.set_loras(sd1_model, [lora.LoraSpec(path, 1.0, 0.5), lora.LoraSpec(path, 1.0, 0.5)])  # listed twice: summed
    assert torch.equal(unet_output(sd1_model) - base_unet, twice)
    lora.set_loras(sd1_model, [lora.LoraSpec(path, strength_model=0.0, strength_clip=1.0)])
    assert torch.equal(unet_output(sd1_model), base_unet)
    assert not torch.equal(text_output(sd1_model)[0], base_text[0])


def test_removing_one_of_two_loras_keeps_the_other(sd1_model, tiny_sd1_loras):
    a, b = (lora.LoraSpec(path) for path in tiny_sd1_loras)
    lora.set_loras(sd1_model, [b])
    b_alone = unet_output(sd1_model)
    lora.set_loras(sd1_model, [a, b])
    lora.remove_lora(sd1_model, a.path)
    assert sd1_model.active_loras == (lora.LoraSpec(os.path.realpath(b.path)),)
    assert torch.equal(unet_output(sd1_model), b_alone)
    with pytest.raises(ValueError, match=r"'a.safetensors' is not loaded on this model; loaded: \['b.safetensors'\]"):
        lora.remove_lora(sd1_model, a.path)


def test_lora_read_ahead_then_attached_equals_a_direct_load(sd1_model, tiny_sd1_loras):
    base = unet_output(sd1_model)
    lora.set_loras(sd1_model, [lora.LoraSpec(tiny_sd1_loras[1])])
    direct = unet_output(sd1_model)
    sd1_model.remove_all_loras()
    tensors = lora.read_lora_file(tiny_sd1_loras[1])
    adapter = lora.load_lora(sd1_model, tiny_sd1_loras[1], tensors=tensors)
    assert lora.load_lora(sd1_model, tiny_sd1_loras[1]) is adapter  # resident once
    assert torch.equal(unet_output(sd1_model), base)  # resident, not running yet
    lora.set_loras(sd1_model, [lora.LoraSpec(tiny_sd1_loras[1])])
    assert torch.equal(unet_output(sd1_model), direct)


def test_lora_of_another_family_is_refused_and_the_model_is_unchanged(sd1_model, tiny_sdxl_lora):
    base = unet_output(sd1_model)
    with pytest.raises(ValueError, match="does not fit this sd1 model|matched no layer of this sd1 model"):
        lora.set_loras(sd1_model, [lora.LoraSpec(tiny_sdxl_lora)])
    assert sd1_model.lora_adapters == {} and torch.equal(unet_output(sd1_model), base)


def test_lora_strength_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"strength_model must be in \[-100.0, 100.0\]; got 1000.0"):
        lora.LoraSpec("x.safetensors", strength_model=1000.0)


def test_sdxl_lora_reaches_both_text_encoders_and_is_removed_exactly(tiny_sdxl, tiny_sdxl_lora):
    model = loading.load_model(tiny_sdxl.single_file, config_dir=tiny_sdxl.config_dir)
    base_unet, base_text = unet_output(model), text_output(model)
    try:
        lora.set_loras(model, [lora.LoraSpec(tiny_sdxl_lora)])
        adapter, = model.lora_adapters.values()
        assert adapter.components == ("unet", "text_encoder", "text_encoder_2")
        changed = text_output(model)
        assert not torch.equal(changed[0], base_text[0]) and not torch.equal(changed[1], base_text[1])
        assert not torch.equal(unet_output(model), base_unet)
    finally:
        model.remove_all_loras()
    assert torch.equal(unet_output(model), base_unet)
    assert all(torch.equal(x, y) for x, y in zip(text_output(model), base_text, strict=True))


# --- the real layout -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_sd15_single_file_loads_offline_and_runs_one_step(tmp_path):
    """SD1.5's real architecture (1.07 B random parameters, float16 on disk) through the shipped configs."""
    path = tmp_path / "sd15_random.safetensors"
    write_random_single_file("sd1", path)
    assert families.inspect_single_file(path).family == "sd1"
    model = loading.load_model(path)
    try:
        assert model.family == "sd1" and model.unet.dtype == torch.float32
        assert sum(p.numel() for p in model.unet.parameters()) == REAL_PARAMETER_COUNTS["sd1", "unet"]
        (embeds,) = text_output(model)
        assert embeds.shape == (1, 77, 768)
        with torch.no_grad():
            out = model.unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),  # a 64×64 image
                             torch.tensor([999]), embeds).sample
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
        assert netguard.ATTEMPTS == []
    finally:
        loading.unload_all()
        os.remove(path)


# --- the families of ComfyUI's template workflows, at reduced width ---------------------------------------------------

REDUCED_WIDTH = 32
# name → (family, writer options, UNet input channels, prediction type, pipeline class, text encoders)
TEMPLATE_FAMILIES = {
    "sd15": ("sd1", {}, 4, "epsilon", "StableDiffusionPipeline", 1),
    "sd15_inpainting": ("sd1", {"unet_in_channels": 9}, 9, "epsilon", "StableDiffusionInpaintPipeline", 1),
    "sd2_inpainting": ("sd2", {"unet_in_channels": 9}, 9, "epsilon", "StableDiffusionInpaintPipeline", 1),
    "sd21_768v": ("sd2", {"prediction_type": "v_prediction"}, 4, "v_prediction", "StableDiffusionPipeline", 1),
    "sdxl": ("sdxl", {}, 4, "epsilon", "StableDiffusionXLPipeline", 2),
    "sdxl_refiner": ("sdxl_refiner", {}, 4, "epsilon", "StableDiffusionXLImg2ImgPipeline", 1),
}


def written(folder, family: str, **options) -> str:
    """A random single file of ``family`` at :data:`REDUCED_WIDTH`, written once per option set under ``folder``."""
    name = "_".join([family, *(f"{key}-{value}" for key, value in sorted(options.items()))]) + ".safetensors"
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        export.write_random_single_file(family, path, width=REDUCED_WIDTH, **options)
    return path


@pytest.fixture(scope="module")
def reduced_files(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reduced_width"))


@pytest.mark.parametrize("name", sorted(TEMPLATE_FAMILIES))
def test_reduced_width_files_of_each_template_family_load_by_themselves_and_run(name, reduced_files):
    family, options, in_channels, prediction, pipeline_class, encoders = TEMPLATE_FAMILIES[name]
    path = written(reduced_files, family, **options)
    info = families.inspect_single_file(path)
    assert (info.family, info.unet_in_channels, info.prediction_type) == (family, in_channels, prediction)
    model = loading.load_model(path)  # no config_dir: the configs are derived from the file's shapes
    try:
        assert (model.family, model.unet_in_channels, model.schedule.prediction_type) == (family, in_channels,
                                                                                           prediction)
        assert type(model.pipeline).__name__ == pipeline_class and len(model.text_encoders) == encoders
        assert model.unet.config.block_out_channels[0] == REDUCED_WIDTH
        ids = model.tokenizers[0]("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            outputs = [encoder(ids, output_hidden_states=True) for encoder in model.text_encoders]
            context = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
            extra = {}
            if family.startswith("sdxl"):  # pooled text and the size/crop (base) or size/crop/score (refiner) ids
                time_ids = [64., 64, 0, 0, 64, 64] if family == "sdxl" else [64., 64, 0, 0, 6]
                extra["added_cond_kwargs"] = {"text_embeds": outputs[-1].text_embeds,
                                              "time_ids": torch.tensor([time_ids])}
            sample = torch.randn(1, in_channels, 8, 8, generator=generator)
            out = model.unet(sample, torch.tensor([500]), context, **extra).sample
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    finally:
        loading.unload_all()


def test_a_refiner_saved_as_a_diffusers_folder_loads_and_exports_back_to_the_same_file(reduced_files, tmp_path):
    path = written(reduced_files, "sdxl_refiner")
    model = loading.load_model(path)
    try:
        model.pipeline.save_pretrained(tmp_path / "refiner", safe_serialization=True)
        assert families.family_from_diffusers_folder(tmp_path / "refiner") == "sdxl_refiner"
        from_folder = loading.load_model(tmp_path / "refiner")
        assert from_folder.family == "sdxl_refiner" and len(from_folder.text_encoders) == 1
        assert state_dicts_equal(from_folder.unet, model.unet) == []
        assert export.export_single_file(tmp_path / "refiner", tmp_path / "back.safetensors") == "sdxl_refiner"
    finally:
        loading.unload_all()
    original, back = load_file(path), load_file(tmp_path / "back.safetensors")
    # What diffusers drops on loading: OpenCLIP's logit_scale, which no layer of SD reads.
    assert set(original) - set(back) == {"conditioner.embedders.0.model.logit_scale"} and not set(back) - set(original)
    assert all(torch.equal(back[key].float(), original[key].float()) for key in back)


def test_a_random_files_outputs_depend_on_their_inputs(reduced_files):
    model = loading.load_model(written(reduced_files, "sd1"))
    try:
        first, second = unet_output(model, seed=0), unet_output(model, seed=1)
        assert (first - second).abs().mean() > 0.5 * first.abs().mean()
        with torch.no_grad():
            images = [model.vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))).sample
                      for seed in (0, 1)]
        assert (images[0] - images[1]).abs().mean() > 0.1  # in [-1, 1]: more than 12 levels of 8 bits
    finally:
        loading.unload_all()


def test_sd2_768_v_files_cross_comfyuis_threshold_and_epsilon_files_stay_under_it(reduced_files):
    def probe_std(path: str) -> float:
        return float(torch.std(load_file(path)[families.V_PREDICTION_PROBE_KEY].float(), unbiased=False))

    assert probe_std(written(reduced_files, "sd2", prediction_type="v_prediction")) > 0.09
    assert probe_std(written(reduced_files, "sd2")) < 0.09
    assert families.inspect_single_file(written(reduced_files, "sd2")).prediction_type == "epsilon"


def test_writers_refuse_what_no_published_file_is(tmp_path):
    with pytest.raises(ValueError, match="sd1 file with a 4-channel UNet cannot be marked as v-prediction"):
        export.write_random_single_file("sd1", tmp_path / "x.safetensors", width=32, prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"unet_in_channels must be one of \(4, 9\); got 5"):
        export.write_random_single_file("sd1", tmp_path / "x.safetensors", width=32, unet_in_channels=5)
    with pytest.raises(ValueError, match="width must be a positive multiple of 32.*got 48"):
        export.write_random_single_file("sd1", tmp_path / "x.safetensors", width=48)


def test_the_published_openclip_layouts_keep_the_whole_text_tower(reduced_files):
    keys = load_file(written(reduced_files, "sd2")).keys()
    layers = {int(key.split(".")[4]) for key in keys if key.startswith("cond_stage_model.model.transformer.resblocks.")}
    assert layers == set(range(24))  # diffusers' SD2 config has 23: SD2 conditions on the penultimate layer
    assert {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} <= keys
    refiner = load_file(written(reduced_files, "sdxl_refiner")).keys()
    assert {"conditioner.embedders.0.model.text_projection", "conditioner.embedders.0.model.logit_scale"} <= refiner


# Kohya keys of each LoRA layout: SD1.5's proj_in is a 1×1 convolution; sd-scripts names SDXL's UNet blocks as LDM.
KOHYA_KEYS = {"sd1": ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                      "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"),
              "sdxl": ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight",
                       "lora_te2_text_model_encoder_layers_31_self_attn_out_proj.alpha")}


@pytest.mark.parametrize("family", sorted(KOHYA_KEYS))
def test_a_kohya_lora_acts_exactly_as_the_same_lora_in_diffusers_layout(family, reduced_files, tmp_path):
    model = loading.load_model(written(reduced_files, family))
    paths = {layout: str(tmp_path / f"{layout}.safetensors") for layout in ("kohya", "peft")}
    for layout, path in paths.items():
        export.write_random_lora(family, path, layout, seed=5, width=REDUCED_WIDTH)
    assert set(KOHYA_KEYS[family]) <= load_file(paths["kohya"]).keys()
    try:
        base_unet, base_text = unet_output(model), text_output(model)
        outputs = {}
        for layout, path in paths.items():
            lora.set_loras(model, [lora.LoraSpec(path)])
            outputs[layout] = unet_output(model), text_output(model)[0]
        for index, base in enumerate((base_unet, base_text[0])):  # the LoRA's effect, on the UNet and the text
            kohya, peft = outputs["kohya"][index] - base, outputs["peft"][index] - base
            assert peft.abs().max() > 1e-3 * base.abs().max()
            # float32 rounding only: a wrong alpha/rank scale or a layer left out would differ by its whole effect
            assert (kohya - peft).abs().max() < 1e-3 * peft.abs().max()
    finally:
        model.remove_all_loras()
        loading.unload_all()


# --- separate VAE files ----------------------------------------------------------------------------------------------

def test_a_vae_file_loads_the_same_in_the_ldm_and_diffusers_layouts(tmp_path):
    for layout in ("ldm", "diffusers"):
        export.write_random_vae(tmp_path / f"{layout}.safetensors", layout, seed=3, width=32)
    ldm_keys = load_file(tmp_path / "ldm.safetensors").keys()
    assert {"encoder.down.0.block.0.norm1.weight", "quant_conv.weight", "post_quant_conv.weight",
            "decoder.mid.attn_1.q.weight"} <= ldm_keys
    ldm, diffusers = (vae.load_vae(tmp_path / f"{layout}.safetensors") for layout in ("ldm", "diffusers"))
    assert state_dicts_equal(ldm, diffusers) == []
    assert ldm.config.scaling_factor == 0.18215 and list(ldm.config.block_out_channels) == [32, 64, 128, 128]
    sdxl = vae.load_vae(tmp_path / "ldm.safetensors", family="sdxl")
    assert sdxl.config.scaling_factor == 0.13025 and sdxl.config.force_upcast
    with torch.no_grad():
        image = ldm.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))).sample
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_vae_files_that_are_not_sd_vaes_are_refused_by_name(tmp_path, tiny_sd1):
    with pytest.raises(ValueError, match="whole checkpoint .* not a VAE file"):
        vae.load_vae(tiny_sd1.single_file)
    export.write_random_vae(tmp_path / "vae.safetensors", width=32)
    tensors = load_file(tmp_path / "vae.safetensors")
    tensors["encoder.conv_out.weight"] = torch.zeros(32, 128, 3, 3)  # 16 latent channels, as SD3's and Flux's
    save_file(tensors, tmp_path / "sixteen.safetensors")
    with pytest.raises(ValueError, match="'sixteen.safetensors' is a 16-channel VAE"):
        vae.load_vae(tmp_path / "sixteen.safetensors")
    del tensors["encoder.conv_out.weight"], tensors["decoder.mid.attn_1.q.weight"]
    tensors["encoder.conv_out.weight"] = torch.zeros(8, 128, 3, 3)
    save_file(tensors, tmp_path / "partial.safetensors")
    missing = "decoder.mid_block.attentions.0.to_q.weight"
    with pytest.raises(ValueError, match=rf"does not fit the SD VAE layout \(ldm, width 32\): .*: \['{missing}'\]$"):
        vae.load_vae(tmp_path / "partial.safetensors")
    with pytest.raises(UnsafeModelFormatError):
        vae.load_vae(tmp_path / "vae.pt")


def test_vae_list_holds_the_files_of_models_vae(tmp_path):
    (tmp_path / "vae" / "sdxl").mkdir(parents=True)
    export.write_random_vae(tmp_path / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors", width=32)
    export.write_random_vae(tmp_path / "vae" / "sdxl" / "sdxl_vae.safetensors", width=32)
    assert vae.list_vaes(tmp_path) == ["sdxl/sdxl_vae.safetensors", "vae-ft-mse-840000-ema-pruned.safetensors"]


# --- module structure ------------------------------------------------------------------------------------------------

def imported_modules(module) -> set[str]:
    """The sibling modules of ``nodes.models`` that ``module``'s source imports (``from .x import``)."""
    with open(module.__file__, encoding="utf-8") as file:
        tree = ast.parse(file.read())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
            and node.module}


def test_lora_and_loading_import_each_other_no_more():
    from nodes.models import loaded, loader

    assert not imported_modules(lora) & {"loading", "loader"}
    assert "lora" not in imported_modules(loaded) | imported_modules(loader) | imported_modules(loading)



def test_a_pickle_checkpoint_is_refused_at_validation_before_anything_runs(models_dir, tmp_path):
    from web.executor import Executor
    from web.folders import DataFolders
    from web.registry import node_classes

    executor = Executor(node_classes(DataFolders.under(str(tmp_path / "data")), str(models_dir)))
    checked = executor.validate({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "old.ckpt"}},
                                 "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
                                 "3": {"class_type": "EmptyLatentImage",
                                       "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                                 "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}})
    assert not checked.ok and "old.ckpt" in str(checked.node_errors["1"])
