"""The CLIP socket (``nodes/models/clip.py``): ComfyUI's prompt rules (weights, escapes, embeddings, chunks), its
encoding per family on small random text encoders, and agreement with ComfyUI's own ``comfy.sd1_clip`` on the
same weights, run in a subprocess (ComfyUI's top-level ``nodes`` module would shadow ours here).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from fixtures_models import tiny_sd1, tiny_sd1_loras, tiny_sd2, tiny_sdxl, tiny_sdxl_lora  # noqa: F401
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from nodes.common.denoiser import NoiseSchedule
from nodes.models.clip import Clip, chunk_tokens, weighted_segments
from nodes.models.formats import UnsafeModelFormatError
from nodes.models.loaded import LoadedModel, LoraSpec
from nodes.models.loader import load_model
from nodes.models.model_configs import load_tokenizer, shipped_config_dir
from nodes.models.refs import ModelRef

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI_PATH_VARIABLE = "ATELIER_COMFYUI"
DEFAULT_COMFYUI = os.path.join(os.path.dirname(REPO), "shared", "comfyui")
START, END = 49406, 49407
CAT, A, COMMA = 2368, 320, 267  # CLIP's ids of "cat", "a" and ","
PARITY_TOLERANCE = 1e-5  # float32 arithmetic in two implementations of the same layers

# Small widths, real structure. "h" is the loaded SD2 encoder: 23 of OpenCLIP ViT-H's 24 layers, as diffusers'
# conversion keeps them; ComfyUI's model has all 24. ComfyUI's configs give ViT-L quick_gelu, OpenCLIP gelu.
WIDTHS = {"l": 32, "h": 48, "g": 64}
LAYERS = {"l": 3, "h": 23, "g": 4}
ACTIVATIONS = {"l": "quick_gelu", "h": "gelu", "g": "gelu"}
FAMILY_KEYS = {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g"), "sdxl_refiner": ("g",)}


def _config(key: str, layers: int) -> CLIPTextConfig:
    width = WIDTHS[key]
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act=ACTIVATIONS[key],
                          bos_token_id=START, eos_token_id=END, pad_token_id=END, projection_dim=width)


@dataclasses.dataclass
class TextEncoders:
    """Random text encoders as diffusers loads them, their tokenizers as the loader makes them, and the same
    weights as ComfyUI's models hold them."""

    modules: dict[str, torch.nn.Module]
    tokenizers: dict[str, object]
    comfy_weights: dict[str, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def encoders() -> TextEncoders:
    torch.manual_seed(0)
    modules = {"l": CLIPTextModel(_config("l", LAYERS["l"])),
               "h": CLIPTextModel(_config("h", LAYERS["h"])),
               "g": CLIPTextModelWithProjection(_config("g", LAYERS["g"]))}
    full_h = CLIPTextModel(_config("h", LAYERS["h"] + 1))
    modules["h"].load_state_dict(full_h.state_dict(), strict=False)  # the loaded encoder: all but the last layer
    sources = {"l": modules["l"], "h": full_h, "g": modules["g"]}
    comfy_weights = {}
    for key, module in sources.items():
        module.eval().requires_grad_(False)
        comfy_weights[key] = {(name if name.startswith(("text_model.", "text_projection")) else f"text_model.{name}"):
                              tensor.contiguous() for name, tensor in module.state_dict().items()
                              if not name.endswith("position_ids")}
    tokenizers = {"l": load_tokenizer(shipped_config_dir("sd1")), "h": load_tokenizer(shipped_config_dir("sd2")),
                  "g": load_tokenizer(shipped_config_dir("sdxl"), "tokenizer_2")}
    return TextEncoders(modules, tokenizers, comfy_weights)


def make_model(family: str, encoders: TextEncoders, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A LoadedModel holding only its own copy of the family's text encoders and their tokenizers (all a Clip
    reads)."""
    modules = {key: copy.deepcopy(encoders.modules[key]).to(dtype) for key in FAMILY_KEYS[family]}
    first, last = FAMILY_KEYS[family][0], FAMILY_KEYS[family][-1]
    pipeline = types.SimpleNamespace(text_encoder=modules[first], tokenizer=encoders.tokenizers[first],
                                     text_encoder_2=modules[last], tokenizer_2=encoders.tokenizers[last])
    schedule = NoiseSchedule(torch.linspace(0.999, 0.01, 10, dtype=torch.float64), "epsilon")
    return LoadedModel(pipeline=pipeline, family=family, schedule=schedule, dtype=dtype, device=torch.device("cpu"),
                       source="random text encoders")


def make_clip(family: str, encoders: TextEncoders, **options) -> Clip:
    return Clip(ModelRef(make_model(family, encoders)), **options)


def _ids(tokens: list) -> list:
    return [token for token, _ in tokens]


def _padded(ids: list[int], pad: int) -> torch.Tensor:
    return torch.tensor([[START, *ids, END] + [pad] * (77 - len(ids) - 2)])


# --- prompt weights --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("(cat:1.5)", [("cat", 1.5)]),
    ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
    ("(a (b:1.5) c:0.5)", [("a ", 0.5), ("b", 1.5), (" c", 0.5)]),
    ("[cat]", [("[cat]", 1.0)]),  # no de-emphasis in ComfyUI
    ("\\(cat\\)", [("(cat)", 1.0)]),
    ("(a\\)b:1.2)", [("a)b", 1.2)]),
    ("(cat:x)", [("cat:x", 1.1)]),  # not a number: the colon is text
    ("(:1.5)", [(":1.5", 1.1)]),  # nothing before the colon: text too
    ("a) (b", [("a) (b", 1.0)]),  # an unmatched ")" makes the following "(" text
    ("(a", [("(a", 1.0)]),
    ("a ()", [("a ", 1.0)]),
])
def test_weighted_segments_follow_comfyui_rules(text, expected):
    assert weighted_segments(text) == expected


# --- chunks ----------------------------------------------------------------------------------------------------------

def test_chunk_tokens_fills_one_chunk_with_75_tokens():
    chunks = chunk_tokens([[(7, 1.0)] * 75], START, END, pad=0)
    assert len(chunks) == 1
    assert _ids(chunks[0]) == [START] + [7] * 75 + [END]


def test_chunk_tokens_splits_a_long_piece_across_chunks():
    chunks = chunk_tokens([[(7, 1.2)] * 76], START, END, pad=0)
    assert [len(chunk) for chunk in chunks] == [77, 77]
    assert _ids(chunks[0]) == [START] + [7] * 75 + [END]
    assert chunks[1][:3] == [(START, 1.0), (7, 1.2), (END, 1.0)]
    assert _ids(chunks[1][3:]) == [0] * 74


def test_chunk_tokens_moves_a_short_piece_whole_to_the_next_chunk():
    chunks = chunk_tokens([[(7, 1.0)] * 72, [(8, 1.0)] * 5], START, END, pad=5)
    assert _ids(chunks[0]) == [START] + [7] * 72 + [END] + [5] * 3
    assert _ids(chunks[1]) == [START] + [8] * 5 + [END] + [5] * 70


# --- tokenize --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, pads", [("sd1", {"l": END}), ("sd2", {"h": 0}), ("sdxl", {"l": END, "g": 0}),
                                          ("sdxl_refiner", {"g": 0})])
def test_tokenize_gives_comfyui_keys_and_pads(encoders, family, pads):
    tokens = make_clip(family, encoders).tokenize("a (cat:1.3)")
    assert set(tokens) == set(pads)
    for key, pad in pads.items():
        assert tokens[key] == [[(START, 1.0), (A, 1.0), (CAT, 1.3), (END, 1.0)] + [(pad, 1.0)] * 73]


def test_tokenize_chunks_a_long_prompt(encoders):
    tokens = make_clip("sd1", encoders).tokenize("cat " * 100)["l"]
    assert [len(chunk) for chunk in tokens] == [77, 77]
    assert _ids(tokens[0]) == [START] + [CAT] * 75 + [END]
    assert _ids(tokens[1]) == [START] + [CAT] * 25 + [END] * 51


def test_tokenize_refuses_a_non_string(encoders):
    with pytest.raises(TypeError, match="int"):
        make_clip("sd1", encoders).tokenize(3)


# --- embeddings ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Textual-inversion files in every safetensors layout ComfyUI reads, under one folder; name -> tensors."""
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(1)
    files = {
        "single": {"emb_params": torch.randn(2, WIDTHS["l"], generator=generator)},  # A1111
        "pair": {"clip_g": torch.randn(3, WIDTHS["g"], generator=generator),  # SDXL: one tensor per encoder
                 "clip_l": torch.randn(1, WIDTHS["l"], generator=generator)},
        "sub/deep": {"vector": torch.randn(WIDTHS["h"], generator=generator)},  # in a subfolder, one 1-D vector
        "bundle": {"bundle_emb.x.string_to_param.*": torch.randn(2, WIDTHS["l"], generator=generator),
                   "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)},  # in a LoRA file
    }
    for name, tensors in files.items():
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / "legacy.pt").write_bytes(b"pickled bytes")
    save_file({"emb_params": torch.ones(1, WIDTHS["l"])}, str(folder.parent / "outside.safetensors"))
    files["folder"] = str(folder)
    return files


def _vectors_after_start(chunk: list, count: int) -> tuple[torch.Tensor, list[float]]:
    assert all(isinstance(token, torch.Tensor) for token, _ in chunk[1:1 + count])
    assert not isinstance(chunk[1 + count][0], torch.Tensor)
    return torch.stack([token for token, _ in chunk[1:1 + count]]), [weight for _, weight in chunk[1:1 + count]]


@pytest.mark.parametrize("family, name, key, expected", [
    ("sd1", "single", "l", ("single", "emb_params")),
    ("sd1", "pair", "l", ("pair", "clip_l")),
    ("sdxl", "pair", "g", ("pair", "clip_g")),
    ("sd2", "deep", "h", ("sub/deep", "vector")),
    ("sd2", "sub/deep", "h", ("sub/deep", "vector")),
    ("sd1", "bundle", "l", ("bundle", "bundle_emb.x.string_to_param.*")),
])
def test_tokenize_reads_embeddings_as_comfyui(encoders, embedding_files, family, name, key, expected):
    clip = make_clip(family, encoders, embedding_dirs=(embedding_files["folder"],))
    tensor = embedding_files[expected[0]][expected[1]]
    vectors = tensor.reshape(-1, tensor.shape[-1])
    chunk = clip.tokenize(f"(embedding:{name}:1.3) cat")[key][0]
    found, weights = _vectors_after_start(chunk, vectors.shape[0])
    assert torch.equal(found, vectors)
    assert weights == [1.3] * vectors.shape[0]
    assert chunk[1 + vectors.shape[0]] == (CAT, 1.0)


def test_tokenize_keeps_the_comma_after_an_embedding_name(encoders, embedding_files):
    clip = make_clip("sd1", encoders, embedding_dirs=(embedding_files["folder"],))
    chunk = clip.tokenize("embedding:single, cat")["l"][0]
    _vectors_after_start(chunk, 2)
    assert _ids(chunk[3:6]) == [COMMA, CAT, END]


def test_tokenize_drops_an_unknown_embedding_with_a_warning(encoders, embedding_files, caplog):
    clip = make_clip("sd1", encoders, embedding_dirs=(embedding_files["folder"],))
    with caplog.at_level(logging.WARNING, logger="nodes.models.clip"):
        tokens = clip.tokenize("a embedding:nothing cat embedding:../outside")
    assert tokens == clip.tokenize("a cat")
    assert "nothing" in caplog.text and "../outside" in caplog.text


def test_tokenize_refuses_a_pickle_embedding(encoders, embedding_files):
    clip = make_clip("sd1", encoders, embedding_dirs=(embedding_files["folder"],))
    with pytest.raises(UnsafeModelFormatError, match="pickle"):
        clip.tokenize("a embedding:legacy cat")


def test_embedding_of_a_word_vector_encodes_as_the_word(encoders, tmp_path):
    cat_vector = encoders.modules["l"].get_input_embeddings().weight[CAT].detach()
    save_file({"emb_params": cat_vector[None].clone()}, str(tmp_path / "cat_vector.safetensors"))
    clip = make_clip("sd1", encoders, embedding_dirs=(str(tmp_path),))
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a embedding:cat_vector dog"), return_pooled=True)
    expected_cond, expected_pooled = clip.encode_from_tokens(clip.tokenize("a cat dog"), return_pooled=True)
    torch.testing.assert_close(cond, expected_cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-6)


def test_embedding_of_another_width_is_dropped_and_padded(encoders, tmp_path, caplog):
    save_file({"emb_params": torch.randn(2, WIDTHS["g"])}, str(tmp_path / "wide.safetensors"))
    clip = make_clip("sd1", encoders, embedding_dirs=(str(tmp_path),))
    with caplog.at_level(logging.WARNING, logger="nodes.models.clip"):
        cond = clip.encode_from_tokens(clip.tokenize("a embedding:wide cat"))
    # Dropped, with two end-token pads after the chunk: for SD1 that is the token sequence of "a cat".
    torch.testing.assert_close(cond, clip.encode_from_tokens(clip.tokenize("a cat")), rtol=0, atol=1e-6)
    assert f"width {WIDTHS['g']}" in caplog.text


# --- encoding --------------------------------------------------------------------------------------------------------

def test_encode_sd1_is_the_last_layer_normalised(encoders):
    clip = make_clip("sd1", encoders)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    output = encoders.modules["l"](_padded([A, CAT], END))
    assert cond.shape == (1, 77, WIDTHS["l"]) and cond.dtype == torch.float32
    torch.testing.assert_close(cond, output.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, output.pooler_output, rtol=0, atol=1e-6)


def test_encode_sd2_is_openclip_h_penultimate_without_pooled(encoders):
    clip = make_clip("sd2", encoders)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    # The loaded encoder lacks ViT-H's last layer, so ComfyUI's penultimate layer is its last, normalised.
    torch.testing.assert_close(cond, encoders.modules["h"](_padded([A, CAT], 0)).last_hidden_state, rtol=0, atol=1e-6)
    assert pooled is None


@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_encode_sdxl_joins_penultimate_layers_and_pools_from_bigg(encoders, family):
    clip = make_clip(family, encoders)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    bigg = encoders.modules["g"](_padded([A, CAT], 0), output_hidden_states=True)
    parts = [bigg.hidden_states[-2]]
    if family == "sdxl":
        parts.insert(0, encoders.modules["l"](_padded([A, CAT], END), output_hidden_states=True).hidden_states[-2])
    torch.testing.assert_close(cond, torch.cat(parts, dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, bigg.text_embeds, rtol=0, atol=1e-6)


def test_encode_counts_positions_itself_as_comfyui(encoders):
    clip = make_clip("sd1", encoders)
    expected = clip.encode("a cat")[0][0]
    encoder = clip.ref.model.text_encoders[0]
    getattr(encoder, "text_model", encoder).embeddings.position_ids[0, 5:] -= 1  # as in some merged SD1.5 files
    torch.testing.assert_close(clip.encode("a cat")[0][0], expected, rtol=0, atol=0)


def test_clip_layer_follows_each_familys_norm_rule(encoders):
    ids = {"l": _padded([A, CAT], END), "h": _padded([A, CAT], 0), "g": _padded([A, CAT], 0)}
    hidden = {key: encoders.modules[key](ids[key], output_hidden_states=True).hidden_states for key in ids}
    sd1 = make_clip("sd1", encoders, layer_idx=-2)
    torch.testing.assert_close(sd1.encode("a cat")[0][0], encoders.modules["l"].final_layer_norm(hidden["l"][-2]),
                               rtol=0, atol=1e-6)
    sd2 = make_clip("sd2", encoders, layer_idx=-3)  # ComfyUI's 3rd from the end of 24 is the loaded 22nd of 23
    torch.testing.assert_close(sd2.encode("a cat")[0][0], encoders.modules["h"].final_layer_norm(hidden["h"][-2]),
                               rtol=0, atol=1e-6)
    sdxl = make_clip("sdxl", encoders, layer_idx=-1)  # SDXL never normalises a chosen layer, even the last
    torch.testing.assert_close(sdxl.encode("a cat")[0][0], torch.cat([hidden["l"][-1], hidden["g"][-1]], dim=-1),
                               rtol=0, atol=1e-6)


def test_clip_layer_beyond_the_depth_is_the_last_layer(encoders):
    deep = make_clip("sd1", encoders, layer_idx=-24)
    torch.testing.assert_close(deep.encode("a cat")[0][0], make_clip("sd1", encoders).encode("a cat")[0][0],
                               rtol=0, atol=0)


def test_clip_layer_refuses_sd2s_dropped_last_layer(encoders):
    clip = make_clip("sd2", encoders, layer_idx=-1)
    with pytest.raises(ValueError, match="-2 or below"):
        clip.encode("a cat")


def test_sd2_encoder_of_another_depth_was_loaded_whole(encoders):
    model = make_model("sd2", encoders)
    torch.manual_seed(2)
    model.pipeline.text_encoder = whole = CLIPTextModel(_config("h", 3)).eval()  # a narrow model's encoder
    hidden = whole(_padded([A, CAT], 0), output_hidden_states=True)
    penultimate = Clip(ModelRef(model)).encode("a cat")[0][0]
    last = Clip(ModelRef(model), layer_idx=-1).encode("a cat")[0][0]
    torch.testing.assert_close(penultimate, whole.final_layer_norm(hidden.hidden_states[-2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(last, hidden.last_hidden_state, rtol=0, atol=1e-6)


def test_clip_layer_on_a_clone_leaves_the_original(encoders):
    clip = make_clip("sd1", encoders)
    clone = clip.clone()
    clone.clip_layer(-2)
    assert clip.layer_idx is None and clone.layer_idx == -2
    assert not torch.allclose(clip.encode("a cat")[0][0], clone.encode("a cat")[0][0])


def test_clip_layer_refuses_a_non_int(encoders):
    with pytest.raises(TypeError, match="'-2'"):
        make_clip("sd1", encoders).clip_layer("-2")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_weighting_moves_a_token_away_from_the_empty_prompt(encoders, family):
    clip = make_clip(family, encoders)
    plain = clip.encode_from_tokens(clip.tokenize("a cat"))
    empty = clip.encode_from_tokens(clip.tokenize(""))
    weighted = clip.encode_from_tokens(clip.tokenize("a (cat:1.5)"))
    expected = plain.clone()
    expected[:, 2] = empty[:, 2] + 1.5 * (plain[:, 2] - empty[:, 2])
    torch.testing.assert_close(weighted, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(weighted[:, 2], plain[:, 2])


def test_long_prompt_encodes_each_chunk_alone(encoders):
    clip = make_clip("sd1", encoders)
    tokens = clip.tokenize("dog " * 80 + "(cat:1.2) " * 10)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    first, first_pooled = clip.encode_from_tokens({"l": tokens["l"][:1]}, return_pooled=True)
    second = clip.encode_from_tokens({"l": tokens["l"][1:]})
    assert cond.shape == (1, 154, WIDTHS["l"])
    torch.testing.assert_close(cond, torch.cat([first, second], dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, first_pooled, rtol=0, atol=1e-6)  # the first chunk's, as ComfyUI's


def test_sdxl_cuts_both_encoders_to_the_shorter(encoders):
    clip = make_clip("sdxl", encoders)
    tokens = clip.tokenize("a cat")
    tokens["l"] = clip.tokenize("dog " * 100)["l"]
    assert clip.encode_from_tokens(tokens).shape == (1, 77, WIDTHS["l"] + WIDTHS["g"])


def test_encode_gives_comfyuis_conditioning(encoders):
    clip = make_clip("sdxl", encoders)
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"), add_dict={"width": 512})
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    assert len(conditioning) == 1 and sorted(conditioning[0][1]) == ["pooled_output", "width"]
    torch.testing.assert_close(conditioning[0][0], cond, rtol=0, atol=0)
    torch.testing.assert_close(conditioning[0][1]["pooled_output"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(clip.encode("a cat")[0][0], cond, rtol=0, atol=0)


def test_encode_refuses_tokens_without_an_encoders_key(encoders):
    clip = make_clip("sdxl", encoders)
    with pytest.raises(ValueError, match=r"\['g'\] missing"):
        clip.encode_from_tokens({"l": clip.tokenize("a cat")["l"]})


def test_clip_refuses_a_single_string_of_embedding_folders(encoders):
    with pytest.raises(TypeError, match="sequence of folders"):
        make_clip("sd1", encoders, embedding_dirs="embeddings")


def test_clip_refuses_an_unknown_family(encoders):
    model = make_model("sd1", encoders)
    model.family = "flux"
    with pytest.raises(ValueError, match="'flux'"):
        Clip(ModelRef(model))


def test_half_precision_encoder_encodes_in_float32_and_is_left_unchanged(encoders):
    model = make_model("sdxl", encoders, dtype=torch.float16)
    before = {name: tensor.clone() for name, tensor in model.text_encoders[1].state_dict().items()}
    clip = Clip(ModelRef(model))
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    widened = make_model("sdxl", encoders)  # the same float16 values, held in float32
    for half, full in zip(model.text_encoders, widened.text_encoders):
        full.load_state_dict({name: tensor.float() for name, tensor in half.state_dict().items()})
    widened_clip = Clip(ModelRef(widened))
    expected, expected_pooled = widened_clip.encode_from_tokens(widened_clip.tokenize("a cat"), return_pooled=True)
    assert cond.dtype == torch.float32
    torch.testing.assert_close(cond, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-6)
    after = model.text_encoders[1].state_dict()
    assert all(after[name].dtype == tensor.dtype and torch.equal(after[name], tensor)
               for name, tensor in before.items())


# --- checkpoints from the loader, and their LoRAs --------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_clip_on_a_loaded_checkpoint_uses_its_encoders(request, family):
    tiny = request.getfixturevalue(f"tiny_{family}")
    model = load_model(tiny.single_file, config_dir=tiny.config_dir, device="cpu")
    clip = Clip(ModelRef(model))
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    first = model.text_encoders[0](_padded([A, CAT], END if family != "sd2" else 0), output_hidden_states=True)
    if family == "sdxl":
        bigg = model.text_encoders[1](_padded([A, CAT], 0), output_hidden_states=True)
        expected, expected_pooled = torch.cat([first.hidden_states[-2], bigg.hidden_states[-2]], -1), bigg.text_embeds
    elif family == "sd2":  # a narrow SD2 file's encoder is loaded whole: ComfyUI's penultimate layer, normalised
        expected, expected_pooled = model.text_encoders[0].final_layer_norm(first.hidden_states[-2]), None
    else:
        expected, expected_pooled = first.last_hidden_state, first.pooler_output
    torch.testing.assert_close(cond, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-6)


def test_with_lora_acts_on_both_sdxl_encoders(tiny_sdxl, tiny_sdxl_lora):  # noqa: F811
    base = Clip(ModelRef(load_model(tiny_sdxl.single_file, config_dir=tiny_sdxl.config_dir, device="cpu")))
    before = base.encode("a cat")[0][0]
    after = base.with_lora(LoraSpec(tiny_sdxl_lora, strength_model=0.0, strength_clip=1.0)).encode("a cat")[0][0]
    width_l = base.ref.model.text_encoders[0].config.hidden_size
    assert (after[..., :width_l] - before[..., :width_l]).abs().max() > 1e-3
    assert (after[..., width_l:] - before[..., width_l:]).abs().max() > 1e-3


def test_with_lora_changes_the_encoding_and_leaves_the_base(tiny_sd1, tiny_sd1_loras):  # noqa: F811
    base = Clip(ModelRef(load_model(tiny_sd1.folder, device="cpu")))
    before = base.encode("a cat")[0][0]
    with_lora = base.with_lora(LoraSpec(tiny_sd1_loras[0], strength_model=0.0, strength_clip=1.0))
    switched_off = base.with_lora(LoraSpec(tiny_sd1_loras[0], strength_model=0.0, strength_clip=0.0))
    assert (with_lora.encode("a cat")[0][0] - before).abs().max() > 1e-3
    torch.testing.assert_close(switched_off.encode("a cat")[0][0], before, rtol=0, atol=1e-6)
    torch.testing.assert_close(base.encode("a cat")[0][0], before, rtol=0, atol=0)


# --- agreement with ComfyUI ------------------------------------------------------------------------------------------

PARITY_PROMPTS = [
    "",
    "a photo of a cat",
    "a (red:1.3) fox in ((deep)) snow, [sketch], \\(literal\\) (parentheses:0.8)",
    "(a (b:1.5) c:0.5) d) e (f",
    "(:1.5) (x:abc) (y:1e-1) (z:-0.5)",
    "embedding:single a cat, (embedding:pair:1.2), embedding:missing dog embedding:single,",
    "a embedding:deep and embedding:bundle cat, embedding:sub/deep",
    " ".join(f"word{index}" for index in range(40)) + ", (" + "a very long weighted phrase " * 8 + ":1.1) "
    + "tail " * 30 + "(end:0.7)",
]
# Pieces that random prompts are strung from: parentheses, weights, escapes, brackets, embeddings, commas, newlines
# and long runs of words that cross chunk boundaries, so the parser and the chunker meet odd combinations.
FUZZ_PIECES = ("(", ")", ":", "1.3", "0.5", "-2", "1e1", "\\(", "\\)", "[", "]", "cat", "dog ", " ", ",", "\n",
               "embedding:single", "embedding:pair,", "embedding:missing", "(embedding:deep:0.9)", "word " * 12)
FUZZ_FAMILIES = ("sd1", "sdxl")


def _fuzz_prompts(count: int = 200, seed: int = 17) -> list[str]:
    generator = random.Random(seed)
    return ["".join(generator.choice(FUZZ_PIECES) for _ in range(generator.randint(1, 40))) for _ in range(count)]


# (family, layer given to CLIPSetLastLayer or None): each family's default and other layers ComfyUI can take.
PARITY_CASES = [("sd1", None), ("sd1", -1), ("sd1", -2), ("sd2", None), ("sd2", -2), ("sd2", -3), ("sdxl", None),
                ("sdxl", -1), ("sdxl", -3), ("sdxl_refiner", None), ("sdxl_refiner", -1)]

# Run by the test's subprocess, with ComfyUI's tree first on sys.path: it builds ComfyUI's text-encoder classes
# for each case with our widths and the given weights, then tokenizes and encodes as comfy.sd.CLIP does
# (reset_clip_options, set_clip_options({"layer": ...}), encode_token_weights).
COMFYUI_SCRIPT = textwrap.dedent("""
    import json, sys
    job = json.load(open(sys.argv[1]))
    sys.path.insert(0, job["comfyui"])
    try:
        import comfy.cli_args
        comfy.cli_args.args.cpu = True  # before comfy.model_management reads it
        import torch
        from safetensors.torch import load_file, save_file
        from comfy import sd1_clip, sdxl_clip
        from comfy.text_encoders import sd2_clip
    except ModuleNotFoundError as error:
        print(error.name)
        sys.exit(3)

    classes = {"sd1": (sd1_clip.SD1Tokenizer, sd1_clip.SD1ClipModel, {"l": "clip_l"}),
               "sd2": (sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel, {"h": "clip_h"}),
               "sdxl": (sdxl_clip.SDXLTokenizer, sdxl_clip.SDXLClipModel, {"l": "clip_l", "g": "clip_g"}),
               "sdxl_refiner": (sdxl_clip.SDXLTokenizer, sdxl_clip.SDXLRefinerClipModel, {"g": "clip_g"})}

    def plain(tokens):
        return {key: [[[token.tolist() if torch.is_tensor(token) else token, weight] for token, weight in chunk]
                      for chunk in chunks] for key, chunks in tokens.items()}

    results, tokens_out, tokenizers = {}, {}, {}
    for case in job["cases"]:
        tokenizer_class, model_class, names = classes[case["family"]]
        if case["family"] not in tokenizers:  # building one reads and converts the vocabulary: seconds
            tokenizers[case["family"]] = tokenizer_class(embedding_directory=job["embedding_dirs"])
        tokenizer = tokenizers[case["family"]]
        options = {f"{names[key]}_model_config": config for key, config in case["configs"].items()}
        model = model_class(device="cpu", dtype=torch.float32, model_options=options)
        for key, path in case["weights"].items():
            part = getattr(model, names[key]) if len(names) > 1 else model
            missing, unexpected = part.load_sd(load_file(path))
            assert not unexpected and all("text_projection" in name for name in missing), (missing, unexpected)
        for index, prompt in enumerate(job["prompts"]):
            tokens = tokenizer.tokenize_with_weights(prompt)
            model.reset_clip_options()
            if case["layer"] is not None:
                model.set_clip_options({"layer": case["layer"]})
            with torch.no_grad():
                cond, pooled = model.encode_token_weights(tokens)[:2]
            name = f"{case['name']}/{index}"
            results[f"{name}/cond"] = cond.contiguous()
            if pooled is not None:
                results[f"{name}/pooled"] = pooled.contiguous()
            tokens_out[name] = plain(tokens)
    for family in job["fuzz_families"]:
        tokenizer = tokenizers.get(family) or classes[family][0](embedding_directory=job["embedding_dirs"])
        for index, prompt in enumerate(job["fuzz_prompts"]):
            tokens_out[f"fuzz/{family}/{index}"] = plain(tokenizer.tokenize_with_weights(prompt))
    save_file(results, job["out"] + ".safetensors")
    json.dump(tokens_out, open(job["out"] + ".json", "w"))
""")


def _plain_tokens(tokens: dict) -> dict:
    return {key: [[[token.tolist() if isinstance(token, torch.Tensor) else token, weight] for token, weight in chunk]
                  for chunk in chunks] for key, chunks in tokens.items()}


def _comfyui_tree() -> str:
    path = os.path.abspath(os.environ.get(COMFYUI_PATH_VARIABLE) or DEFAULT_COMFYUI)
    if not os.path.isfile(os.path.join(path, "comfy", "sd1_clip.py")):
        pytest.skip(f"no ComfyUI tree at {path} (set {COMFYUI_PATH_VARIABLE} to ComfyUI v0.3.64's source)")
    return path


@pytest.fixture(scope="module")
def comfyui_encodings(encoders, embedding_files, tmp_path_factory) -> tuple[dict, dict]:
    """ComfyUI's tokens and encodings of PARITY_PROMPTS for every case in PARITY_CASES, from one subprocess."""
    comfyui = _comfyui_tree()
    folder = tmp_path_factory.mktemp("comfyui_clip")
    weights = {}
    for key, tensors in encoders.comfy_weights.items():
        weights[key] = str(folder / f"{key}.safetensors")
        save_file(tensors, weights[key])
    configs = {key: {"hidden_size": WIDTHS[key], "intermediate_size": 2 * WIDTHS[key], "num_attention_heads": 4,
                     "num_hidden_layers": LAYERS[key] + (key == "h")} for key in WIDTHS}
    cases = [{"name": f"{family}/{layer}", "family": family, "layer": layer,
              "configs": {key: configs[key] for key in FAMILY_KEYS[family]},
              "weights": {key: weights[key] for key in FAMILY_KEYS[family]}} for family, layer in PARITY_CASES]
    job = {"comfyui": comfyui, "cases": cases, "prompts": PARITY_PROMPTS, "fuzz_prompts": _fuzz_prompts(),
           "fuzz_families": FUZZ_FAMILIES,
           "embedding_dirs": [embedding_files["folder"]], "out": str(folder / "results")}
    job_path = folder / "job.json"
    job_path.write_text(json.dumps(job))
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    finished = subprocess.run([sys.executable, "-c", COMFYUI_SCRIPT, str(job_path)], cwd=folder, env=environment,
                              capture_output=True, text=True, timeout=600)
    if finished.returncode == 3:
        pytest.skip(f"ComfyUI's text-encoder modules need {finished.stdout.strip()!r}, which this Python lacks")
    assert finished.returncode == 0, finished.stderr[-4000:]
    from safetensors.torch import load_file

    return load_file(job["out"] + ".safetensors"), json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("family, layer", PARITY_CASES)
def test_tokens_and_encoding_match_comfyui(encoders, embedding_files, comfyui_encodings, family, layer):
    encodings, comfyui_tokens = comfyui_encodings
    clip = make_clip(family, encoders, layer_idx=layer, embedding_dirs=(embedding_files["folder"],))
    for index, prompt in enumerate(PARITY_PROMPTS):
        name = f"{family}/{layer}/{index}"
        tokens = clip.tokenize(prompt)
        theirs = comfyui_tokens[name]
        assert _plain_tokens(tokens) == {key: theirs[key] for key in tokens}, prompt
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        torch.testing.assert_close(cond, encodings[f"{name}/cond"], rtol=0, atol=PARITY_TOLERANCE, msg=prompt)
        if family != "sd2":  # ComfyUI projects SD2's pooled output with weights diffusers does not load
            torch.testing.assert_close(pooled, encodings[f"{name}/pooled"], rtol=0, atol=PARITY_TOLERANCE,
                                       msg=prompt)


@pytest.mark.parametrize("family", FUZZ_FAMILIES)
def test_random_prompts_tokenize_as_in_comfyui(encoders, embedding_files, comfyui_encodings, family):
    comfyui_tokens = comfyui_encodings[1]
    clip = make_clip(family, encoders, embedding_dirs=(embedding_files["folder"],))
    for index, prompt in enumerate(_fuzz_prompts()):
        tokens = clip.tokenize(prompt)
        theirs = comfyui_tokens[f"fuzz/{family}/{index}"]
        assert _plain_tokens(tokens) == {key: theirs[key] for key in tokens}, repr(prompt)
