"""What travels on the CLIP socket in the standalone app: a loaded checkpoint's text encoders and the LoRAs to run on
them, encoding prompts exactly as ComfyUI's CLIPTextEncode does, so that a ComfyUI workflow gives ComfyUI's picture.

:class:`Clip` mirrors ``comfy.sd.CLIP``'s API (``clone``, ``clip_layer``, ``tokenize``, ``encode_from_tokens``,
``encode_from_tokens_scheduled``), so that a node is written once for both hosts; inside ComfyUI the CLIP socket
carries ComfyUI's own object instead.

ComfyUI's rules, reproduced here (``comfy/sd1_clip.py``, ``comfy/sdxl_clip.py``, ``comfy/text_encoders/sd2_clip.py``
in ComfyUI v0.3.64):

- **Weights.** ``(text)`` multiplies the weight of ``text`` by 1.1 per level of nesting, ``(text:1.3)`` sets it;
  ``\\(`` and ``\\)`` are literal parentheses. Square brackets are plain text (ComfyUI has no de-emphasis).
- **Embeddings.** ``embedding:name`` puts a textual-inversion embedding's vectors in place of the words; the file is
  looked up in the embedding folders and their subfolders. Only ``.safetensors`` files are read; a name that is
  not found is dropped with a warning.
- **Chunks.** Tokens are cut into chunks of 77: start token, at most 75 tokens, end token, padding. A piece of
  text shorter than 8 tokens moves whole to the next chunk rather than being split. SD1's encoder pads with its
  end token, OpenCLIP's (SD2's ViT-H, SDXL's bigG) with token 0. Each chunk is encoded on its own and the chunks
  are joined along the sequence.
- **Weighting.** When any token is weighted, the empty prompt is encoded alongside, and each weighted token's
  state moves away from the empty prompt's state at its position: z' = e + w·(z − e).
- **Layers.** SD1: the last layer, after the final layer norm. SD2: the penultimate layer of OpenCLIP ViT-H, after
  the final layer norm. SDXL: the penultimate layers of CLIP ViT-L and OpenCLIP bigG, without the final layer norm,
  joined to 768 + 1280 per token; the pooled output is bigG's projection of its final-norm end-token state. The
  refiner: bigG alone. ``clip_layer(-n)`` takes the n-th layer from the end instead, keeping each encoder's rule
  for the final layer norm.
- **Precision.** Encoding runs in float32 whatever the weights are stored in, as ComfyUI's ``--fp32-text-enc``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..common.paths import PathOutsideFolderError, confine
from .formats import SAFE_EXTENSION, check_safetensors
from .loaded import LoraSpec
from .refs import ModelRef

logger = logging.getLogger(__name__)

# A token is a vocabulary id or a tensor of embedding vectors (D,) or (n, D); ComfyUI's token lists hold both.
Token = int | torch.Tensor
# ComfyUI's token format: per text encoder (key "l", "h" or "g"), a list of chunks of (token, weight) pairs.
Tokens = dict[str, list[list[tuple[Token, float]]]]
# ComfyUI's CONDITIONING: a list of [states (B, L, D), {"pooled_output": (B, P) or None, ...}].
Conditioning = list[list[Any]]

CHUNK_TOKENS = 77  # CLIP's context length, start and end tokens included
# Source: ComfyUI sd1_clip.token_weights: each pair of parentheses without an explicit weight multiplies by 1.1.
PARENTHESES_WEIGHT = 1.1
# Source: ComfyUI SDTokenizer.max_word_length: a piece of text shorter than this is never split between chunks.
WHOLE_PIECE_TOKENS = 8
EMBEDDING_PREFIX = "embedding:"
# ComfyUI tries these after a bare embedding name; we read only the first and refuse the pickle-based others.
EMBEDDING_EXTENSIONS = (SAFE_EXTENSION, ".pt", ".bin")
OPENCLIP_PAD_TOKEN = 0  # ComfyUI pads OpenCLIP encoders (SD2's ViT-H, SDXL's bigG) with id 0 ("!")
OPENCLIP_H_LAYERS = 24  # Source: OpenCLIP ViT-H-14's text tower (ComfyUI's sd2_clip_config.json)
# Escaped parentheses are hidden from the weight parser behind these, then put back as plain parentheses. They are
# ComfyUI's own sentinels, so that a prompt that happens to contain them parses as it does there.
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))
_EMBEDDING_SPLIT = re.compile(f"[ \n]{re.escape(EMBEDDING_PREFIX)}")


@dataclasses.dataclass(frozen=True)
class TextEncoderRole:
    """How ComfyUI runs one text encoder of a family (``SDClipModel``'s options for it)."""

    key: str  # its key in the token dict: "l" (CLIP ViT-L), "h" (OpenCLIP ViT-H), "g" (OpenCLIP bigG)
    position: int  # index into LoadedModel.text_encoders and .tokenizers
    pads_with_end: bool  # pad chunks with the end token (ViT-L) or with OPENCLIP_PAD_TOKEN
    default_layer: int | None  # ComfyUI's layer index when clip_layer was never set; None: the last, normalised
    normalizes_hidden: bool  # whether a chosen hidden layer goes through the final layer norm
    projects_pooled: bool  # the pooled output is the text projection of the end token's state
    # The encoder's depth in ComfyUI when diffusers' conversion dropped its last layer, else None. diffusers keeps
    # 23 of OpenCLIP ViT-H's 24 layers (SD2 never uses the last), so ComfyUI's layer k is our layer k and its last
    # is missing; an encoder of any other depth (a narrow test or embedded model) was loaded whole.
    depth_before_conversion: int | None
    embedding_key: str  # the tensor name that holds this encoder's vectors in a multi-encoder embedding file


CLIP_L = TextEncoderRole(key="l", position=0, pads_with_end=True, default_layer=None, normalizes_hidden=True,
                         projects_pooled=False, depth_before_conversion=None, embedding_key="clip_l")
OPENCLIP_H = TextEncoderRole(key="h", position=0, pads_with_end=False, default_layer=-2, normalizes_hidden=True,
                             projects_pooled=True, depth_before_conversion=OPENCLIP_H_LAYERS,
                             embedding_key="clip_h")
# position -1: the last encoder, which is bigG both in SDXL's pair and in the refiner's single-encoder model.
OPENCLIP_G = TextEncoderRole(key="g", position=-1, pads_with_end=False, default_layer=-2, normalizes_hidden=False,
                             projects_pooled=True, depth_before_conversion=None, embedding_key="clip_g")
# Per family, in the order their states are joined per token; the pooled output is the last one's.
FAMILY_ROLES: dict[str, tuple[TextEncoderRole, ...]] = {
    "sd1": (CLIP_L,),
    "sd2": (OPENCLIP_H,),
    "sdxl": (dataclasses.replace(CLIP_L, default_layer=-2, normalizes_hidden=False), OPENCLIP_G),
    "sdxl_refiner": (OPENCLIP_G,),
}


# --- prompt weights --------------------------------------------------------------------------------------------------

def _split_parentheses(text: str) -> list[str]:
    """The top-level pieces of ``text``: runs of plain text and whole ``(...)`` groups, as ComfyUI splits them.

    An unmatched ``)`` drives the depth below zero, after which parentheses are text until the depth is back to
    zero; an unclosed ``(`` keeps the rest of the text in its piece. Both are ComfyUI's behaviour.
    """
    pieces, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0 and current:
                pieces.append(current)
                current = ""
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            current += char
            if depth == 0:
                pieces.append(current)
                current = ""
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def _parse_weights(text: str, weight: float) -> list[tuple[str, float]]:
    pairs = []
    for piece in _split_parentheses(text):
        if len(piece) < 2 or piece[0] != "(" or piece[-1] != ")":
            pairs.append((piece, weight))
            continue
        inner, inner_weight = piece[1:-1], weight * PARENTHESES_WEIGHT
        colon = inner.rfind(":")
        if colon > 0:  # "(text:w)"; a text that is empty before the colon, or a w that is no number, stays text
            try:
                inner_weight = float(inner[colon + 1:])
                inner = inner[:colon]
            except ValueError:
                pass
        pairs.extend(_parse_weights(inner, inner_weight))
    return pairs


def weighted_segments(text: str) -> list[tuple[str, float]]:
    """The prompt's pieces of text and their weights, as ComfyUI reads ``(text)``, ``(text:w)`` and ``\\(``.

    Example:
        >>> weighted_segments("a (red:1.3) fox, ((snow)), \\\\(c\\\\) [x]")
        [('a ', 1.0), ('red', 1.3), (' fox, ', 1.0), ('snow', 1.2100000000000002), (', (c) [x]', 1.0)]
    """
    for escape, sentinel in _ESCAPES:
        text = text.replace(escape, sentinel)
    segments = []
    for segment, weight in _parse_weights(text, 1.0):
        for escape, sentinel in _ESCAPES:
            segment = segment.replace(sentinel, escape[-1])
        segments.append((segment, weight))
    return segments


# --- textual-inversion embeddings ------------------------------------------------------------------------------------

def _search_folders(embedding_dirs: Sequence[str]) -> list[str]:
    """The embedding folders and every folder below them (ComfyUI finds embeddings in subfolders too)."""
    folders = []
    for root in embedding_dirs:
        for current, subfolders, _ in os.walk(root, followlinks=True):
            subfolders.sort()
            folders.append(current)
    return folders


def find_embedding_file(name: str, embedding_dirs: Sequence[str]) -> str | None:
    """The file of embedding ``name``: ``name`` itself or ``name`` plus an extension ComfyUI tries, in the first
    folder (of ``embedding_dirs`` and their subfolders) that holds one; a name leaving its folder matches nothing.

    Returns:
        Its path, or None when no folder holds it.
    Raises:
        nodes.models.formats.UnsafeModelFormatError: the file found is not ``.safetensors`` (``.pt`` and ``.bin``
            embeddings are pickle-based; loading them could run any code they carry).
    """
    for folder in _search_folders(embedding_dirs):
        for candidate in [name] + [name + extension for extension in EMBEDDING_EXTENSIONS]:
            try:
                path = confine(folder, candidate)
            except PathOutsideFolderError:
                continue
            if os.path.isfile(path):
                check_safetensors(path)
                return path
    return None


def read_embedding(path: str, embedding_key: str) -> torch.Tensor:
    """The vectors of a textual-inversion ``.safetensors`` file for one text encoder, as ComfyUI picks them.

    In order: the tensor named ``embedding_key`` ("clip_l", "clip_g": SDXL embeddings hold one per encoder);
    the vectors bundled in a LoRA file (``bundle_emb.<name>.string_to_param.*``, else
    ``bundle_emb.<name>.<embedding_key>``), joined; else the file's first tensor (A1111's ``emb_params``, or a
    single unnamed tensor).

    Returns:
        float32 vectors, (n, D) or (D,).
    Raises:
        ValueError: the file holds no tensor.
    """
    from safetensors.torch import load_file

    check_safetensors(path)
    tensors = load_file(path, device="cpu")
    if not tensors:
        raise ValueError(f"embedding file {os.path.basename(path)!r} holds no tensor; expected its vectors")
    if embedding_key in tensors:
        return tensors[embedding_key].float()
    for suffix in (".string_to_param.*", f".{embedding_key}"):
        bundled = [tensor for key, tensor in tensors.items() if key.startswith("bundle_emb.") and key.endswith(suffix)]
        if bundled:
            return torch.cat(bundled).float()
    return next(iter(tensors.values())).float()


# --- chunks ----------------------------------------------------------------------------------------------------------

def chunk_tokens(groups: Sequence[Sequence[tuple[Token, float]]], start: int, end: int, pad: int
                 ) -> list[list[tuple[Token, float]]]:
    """Cut token groups (one per piece of text or embedding) into 77-token chunks, as ComfyUI does.

    Each chunk is the start token, up to 75 tokens and the end token, padded with ``pad`` to 77. A group shorter
    than 8 tokens that does not fit in the current chunk starts the next one; a longer group is split across
    chunks. The start, end and pad tokens have weight 1.

    Example:
        >>> chunks = chunk_tokens([[(320, 1.0)] * 70, [(321, 1.2)] * 7], start=49406, end=49407, pad=0)
        >>> [len(chunk) for chunk in chunks], chunks[0][70:73], chunks[1][:3]
        ([77, 77], [(320, 1.0), (49407, 1.0), (0, 1.0)], [(49406, 1.0), (321, 1.2), (321, 1.2)])
    """
    room = CHUNK_TOKENS - 1  # tokens a chunk holds before its end token
    chunks, chunk = [], [(start, 1.0)]
    for group in groups:
        group = list(group)
        splittable = len(group) >= WHOLE_PIECE_TOKENS
        while group:
            if len(chunk) + len(group) <= room:
                chunk.extend(group)
                break
            free = room - len(chunk)
            if splittable:
                chunk.extend(group[:free])
                group = group[free:]
                chunk.append((end, 1.0))
            else:
                chunk.append((end, 1.0))
                chunk.extend([(pad, 1.0)] * free)
            chunks.append(chunk)
            chunk = [(start, 1.0)]
    chunk.append((end, 1.0))
    chunk.extend([(pad, 1.0)] * (CHUNK_TOKENS - len(chunk)))
    chunks.append(chunk)
    return chunks


# --- encoding --------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _computing_in_float32(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` in float32 for a while: its float16/bfloat16 tensors are widened, then narrowed back.

    Widening is exact and so is the way back, so the shared model is unchanged afterwards; the caller holds the
    model's lock, so no other thread runs it meanwhile. Costs the float32 copy of the text encoder only.
    """
    narrow = [(tensor, tensor.dtype) for tensor in itertools.chain(module.parameters(), module.buffers())
              if tensor.is_floating_point() and tensor.dtype != torch.float32]
    for tensor, _ in narrow:
        tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in narrow:
            tensor.data = tensor.data.to(dtype)


def _input_vectors(token_embedding: torch.nn.Module, row: Sequence[Token], end: int, pad: int
                   ) -> tuple[torch.Tensor, int]:
    """The encoder's input vectors for one chunk, and the position its pooled output is read at.

    Ids go through the token embedding; embedding vectors of the encoder's width are used as they are. Vectors of
    another width (an embedding made for another encoder) are dropped with a warning and the chunk is filled up
    with pad vectors at its end, as ComfyUI does. The pooled position is ComfyUI's: the number of ids up to the
    first end token, plus the embedding vectors, minus one.
    """
    device = token_embedding.weight.device
    width = token_embedding.weight.shape[-1]
    ids = [int(token) for token in row if not isinstance(token, torch.Tensor)]
    id_vectors = iter(token_embedding(torch.tensor(ids, dtype=torch.long, device=device)).float())
    vectors, counted, dropped, ended = [], 0, 0, False
    for token in row:
        if not isinstance(token, torch.Tensor):
            vectors.append(next(id_vectors)[None])
            counted += not ended
            ended = ended or int(token) == end
            continue
        embedding = token.reshape(-1, token.shape[-1]).to(device=device, dtype=torch.float32)
        if embedding.shape[-1] != width:
            logger.warning("an embedding of width %d does not fit this %d-wide text encoder; ignoring it",
                           embedding.shape[-1], width)
            dropped += embedding.shape[0]
            continue
        vectors.append(embedding)
        counted += embedding.shape[0]
    if dropped:
        vectors.append(token_embedding(torch.full((dropped,), pad, device=device)).float())
    return torch.cat(vectors), counted - 1


def _select_layer(output: Any, text_model: torch.nn.Module, role: TextEncoderRole, layer_idx: int | None,
                  family: str) -> torch.Tensor:
    """The per-token states ComfyUI takes for ``layer_idx`` (its own numbering), from a forward's output.

    ComfyUI's rule (``SDClipModel.set_clip_options``): no index, or one beyond the depth, is the last layer after
    the final layer norm; otherwise the layer's raw output, normalised where the encoder's rule says so.
    """
    layers = len(output.hidden_states) - 1  # hidden_states[0] is the input embedding, [k] layer k's output
    comfy_layers = layers + 1 if role.depth_before_conversion == layers + 1 else layers
    if layer_idx is None or abs(layer_idx) > comfy_layers:
        layer = comfy_layers  # 1-based, as hidden_states counts
        normalize = True
    else:
        layer = (layer_idx if layer_idx >= 0 else comfy_layers + layer_idx) + 1
        normalize = role.normalizes_hidden
    if layer > layers:
        raise ValueError(
            f"layer {layer_idx} of this {family} text encoder ({role.key}) is its layer {layer} of {comfy_layers}, "
            f"which the loaded weights do not have (diffusers' conversion keeps {layers}); use a layer index of "
            f"{layers - comfy_layers - 1} or below")
    if layer == layers and normalize:
        return output.last_hidden_state
    states = output.hidden_states[layer]
    return text_model.final_layer_norm(states) if normalize else states


def _encode_chunks(encoder: torch.nn.Module, tokenizer: Any, role: TextEncoderRole,
                   chunks: Sequence[Sequence[tuple[Token, float]]], layer_idx: int | None, family: str
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder's states for its token chunks, joined (1, 77·chunks, D), and its pooled output (1, P) or None.

    The caller holds the model (LoRAs switched) and runs this in float32, without gradients unless it optimises a
    prompt.
    """
    if not chunks:
        raise ValueError(f"tokens[{role.key!r}] holds no chunk; give at least one (tokenize('') gives one)")
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = end if role.pads_with_end else OPENCLIP_PAD_TOKEN
    rows = [[token for token, _ in chunk] for chunk in chunks]
    weights = [[float(weight) for _, weight in chunk] for chunk in chunks]
    weighted = any(weight != 1.0 for row in weights for weight in row)
    if weighted:  # the empty prompt, as long as the longest chunk: what weighted tokens are measured against
        longest = max(len(row) for row in rows)
        rows.append([start, end] + [pad] * (longest - 2))

    token_embedding = encoder.get_input_embeddings()
    encoded = [_input_vectors(token_embedding, row, end, pad) for row in rows]
    inputs = torch.stack([vectors for vectors, _ in encoded])
    # The hook hands the encoder our vectors in place of its token lookup, so that embeddings (which have no id)
    # go through the model's own forward, LoRA layers included; the ids passed only give the shape. Positions are
    # given, as ComfyUI always counts them 0..L-1: a checkpoint's stored position_ids (damaged in some merged
    # SD1.5 files) are never read.
    batch, length = inputs.shape[:2]
    hook = token_embedding.register_forward_hook(lambda module, args, output: inputs)
    try:
        output = encoder(input_ids=torch.zeros((batch, length), dtype=torch.long, device=inputs.device),
                         position_ids=torch.arange(length, device=inputs.device)[None], output_hidden_states=True)
    finally:
        hook.remove()

    text_model = getattr(encoder, "text_model", encoder)  # CLIPTextModelWithProjection wraps a CLIPTextModel
    states = _select_layer(output, text_model, role, layer_idx, family)
    chunk_states = states[:len(chunks)]
    if weighted:
        empty = states[-1]
        weight = torch.tensor(weights, dtype=states.dtype, device=states.device)[..., None]
        chunk_states = torch.where(weight != 1.0, (chunk_states - empty) * weight + empty, chunk_states)
    cond = chunk_states.reshape(1, -1, chunk_states.shape[-1])

    pooled = output.last_hidden_state[0, encoded[0][1]][None]  # the first chunk's, as ComfyUI's
    if role.projects_pooled:
        projection = getattr(encoder, "text_projection", None)
        # diffusers' SD2 text encoder has no projection (its conversion drops it, and SD2's UNet reads no pooled
        # output): no value rather than an unprojected one that ComfyUI would never give.
        pooled = projection(pooled) if projection is not None else None
    return cond.float().cpu(), pooled.float().cpu() if pooled is not None else None


# --- the CLIP socket -------------------------------------------------------------------------------------------------

class Clip:
    """A checkpoint's text encoders as ComfyUI's CLIP socket sees them: tokenize, then encode.

    Like ``comfy.sd.CLIP``, :meth:`clip_layer` changes this object, so a node that sets it works on a
    :meth:`clone`; :meth:`with_lora` returns a new one. The loaded model is shared and never changed.

    Example (what CLIPTextEncode does)::

        tokens = clip.tokenize("a (red:1.2) fox")
        conditioning = clip.encode_from_tokens_scheduled(tokens)  # [[cond (1, 77, D), {"pooled_output": ...}]]
    """

    def __init__(self, ref: ModelRef, layer_idx: int | None = None, embedding_dirs: Sequence[str] = ()) -> None:
        """
        Args:
            ref: the loaded checkpoint and its LoRAs (strength_clip acts here).
            layer_idx: as :meth:`clip_layer`; None for the family's own layer.
            embedding_dirs: folders searched, with their subfolders, for ``embedding:name``.
        Raises:
            ValueError: a model family that has no ComfyUI text-encoder rule here.
            TypeError: ``embedding_dirs`` is a single string rather than a sequence of folders.
        """
        family = ref.model.family
        if family not in FAMILY_ROLES:
            raise ValueError(f"model family must be one of {sorted(FAMILY_ROLES)}; got {family!r}")
        if isinstance(embedding_dirs, (str, bytes, os.PathLike)):
            raise TypeError(f"embedding_dirs must be a sequence of folders, such as ({embedding_dirs!r},); got "
                            f"{embedding_dirs!r}")
        self.ref = ref
        self._roles = FAMILY_ROLES[family]
        self.layer_idx: int | None = None
        self.embedding_dirs = tuple(os.fspath(folder) for folder in embedding_dirs)
        if layer_idx is not None:
            self.clip_layer(layer_idx)

    @property
    def family(self) -> str:
        return self.ref.model.family

    def clone(self) -> Clip:
        """A copy whose :meth:`clip_layer` can change without touching this one."""
        return Clip(self.ref, self.layer_idx, self.embedding_dirs)

    def clip_layer(self, layer_idx: int) -> None:
        """Encode with the ``layer_idx``-th layer from the end (CLIPSetLastLayer: -1 the last, -2 the penultimate),
        as ComfyUI applies it to each of the family's encoders; an index beyond an encoder's depth is its last
        layer, normalised.

        Raises:
            TypeError: not an int.
        """
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx must be an int such as -1 or -2; got {layer_idx!r}")
        self.layer_idx = layer_idx

    def with_lora(self, spec: LoraSpec) -> Clip:
        """This CLIP with one more LoRA, acting on the text encoders with ``spec.strength_clip``."""
        return Clip(self.ref.with_lora(spec), self.layer_idx, self.embedding_dirs)

    def tokenize(self, text: str) -> Tokens:
        """ComfyUI's tokens for ``text``: per encoder key ("l", "h" or "g"), 77-token chunks of (token, weight).

        A token is a vocabulary id, or a tensor of embedding vectors for ``embedding:name``.

        Raises:
            TypeError: ``text`` is not a str.
            nodes.models.formats.UnsafeModelFormatError: an embedding named in the text is a pickle-based file.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        segments = weighted_segments(text)
        tokenizers = self.ref.model.tokenizers
        return {role.key: self._tokenize_for(role, tokenizers[role.position], segments) for role in self._roles}

    def _tokenize_for(self, role: TextEncoderRole, tokenizer: Any, segments: list[tuple[str, float]]
                      ) -> list[list[tuple[Token, float]]]:
        groups: list[list[tuple[Token, float]]] = []
        for segment, weight in segments:
            first, *rest = _EMBEDDING_SPLIT.split(segment)
            for piece in [first] + [EMBEDDING_PREFIX + part for part in rest]:
                if piece.startswith(EMBEDDING_PREFIX):
                    vectors, piece = self._embedding_and_rest(piece[len(EMBEDDING_PREFIX):].strip("\n"), role)
                    if vectors is not None:
                        rows = [vectors] if vectors.ndim == 1 else list(vectors)
                        groups.append([(row, weight) for row in rows])
                if piece:
                    # add_special_tokens=False: ComfyUI cuts the start and end tokens off; verbose=False: a long
                    # piece is chunked below, so the tokenizer's 77-token warning does not apply.
                    ids = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
                    groups.append([(token, weight) for token in ids])
        pad = tokenizer.eos_token_id if role.pads_with_end else OPENCLIP_PAD_TOKEN
        return chunk_tokens(groups, tokenizer.bos_token_id, tokenizer.eos_token_id, pad)

    def _embedding_and_rest(self, text: str, role: TextEncoderRole) -> tuple[torch.Tensor | None, str]:
        """The embedding named at the start of ``text`` and the text after the name, as ComfyUI reads them.

        The name ends at the first white space; a name not found is tried again without surrounding commas, the
        commas then staying in the text. A name found neither way is dropped, with ComfyUI's warning.
        """
        words = text.split()
        if not words:
            logger.warning("'%s' names no embedding, ignoring it", EMBEDDING_PREFIX)
            return None, ""
        name, rest = words[0], " ".join(words[1:])
        vectors = self._load_embedding(name, role)
        stripped = name.strip(",")
        if vectors is None and len(stripped) < len(name):
            vectors = self._load_embedding(stripped, role)
            # ComfyUI keeps the name's last len(name) - len(stripped) characters: the trailing commas.
            rest = f"{name[len(stripped):]} {rest}"
        if vectors is None:
            logger.warning("embedding:%s does not exist in %s, ignoring it", text, list(self.embedding_dirs))
        return vectors, rest

    def _load_embedding(self, name: str, role: TextEncoderRole) -> torch.Tensor | None:
        path = find_embedding_file(name, self.embedding_dirs) if name else None
        return read_embedding(path, role.embedding_key) if path is not None else None

    def encode_from_tokens(self, tokens: Tokens, return_pooled: bool = False, differentiable: bool = False
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Encode tokens from :meth:`tokenize` (ComfyUI's ``CLIP.encode_from_tokens``), in float32.

        ``differentiable``: gradients flow from the states back to the tokens' embedding tensors (prompt
        optimisation; take them with ``torch.autograd.grad``, which leaves the shared weights' ``.grad`` alone).

        Returns:
            cond (1, 77·chunks, D), on the CPU (ComfyUI's intermediate device); with ``return_pooled``, also the
            pooled output (1, P) of the first chunk (SDXL: bigG's projection; SD1: ViT-L's unprojected end-token
            state), None for SD2, whose diffusers text encoder has no projection. SDXL joins D = 768 + 1280 and
            cuts both encoders to the shorter one's chunks.
        Raises:
            ValueError: ``tokens`` lacks an encoder's key or one has no chunk; the layer chosen with
                :meth:`clip_layer` is one the loaded weights lack (SD2's last).
        """
        missing = [role.key for role in self._roles if role.key not in tokens]
        if missing:
            raise ValueError(f"tokens for a {self.family} model need the keys {[role.key for role in self._roles]}; "
                             f"{missing} missing from {sorted(tokens)}")
        encoded = []
        with self.ref.in_use("text") as loaded, torch.set_grad_enabled(differentiable):
            for role in self._roles:
                encoder = loaded.text_encoders[role.position]
                layer_idx = self.layer_idx if self.layer_idx is not None else role.default_layer
                with _computing_in_float32(encoder):
                    encoded.append(_encode_chunks(encoder, loaded.tokenizers[role.position], role, tokens[role.key],
                                                  layer_idx, self.family))
        length = min(cond.shape[1] for cond, _ in encoded)
        cond = torch.cat([cond[:, :length] for cond, _ in encoded], dim=-1)
        pooled = encoded[-1][1]
        return (cond, pooled) if return_pooled else cond

    def token_table(self) -> torch.Tensor:
        """The vocabulary's input embeddings (V, D) of a single-encoder family (SD1, SD2), a float32 copy.

        Raises:
            ValueError: a family with two text encoders (SDXL).
        """
        if len(self._roles) != 1:
            raise ValueError(f"a {self.family} model has {len(self._roles)} text encoders; one (SD1, SD2) is needed")
        with self.ref.in_use("text") as loaded:
            return loaded.text_encoders[0].get_input_embeddings().weight.detach().float().clone()

    def encode_from_tokens_scheduled(self, tokens: Tokens, add_dict: dict[str, Any] | None = None) -> Conditioning:
        """CONDITIONING for tokens, as ComfyUI's CLIPTextEncode makes it: ``[[cond, {"pooled_output": pooled}]]``,
        with ``add_dict``'s entries added (CLIPTextEncodeSDXL's sizes)."""
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled, **(add_dict or {})}]]

    def encode(self, text: str) -> Conditioning:
        """CONDITIONING for ``text``: :meth:`tokenize` then :meth:`encode_from_tokens_scheduled`.

        Unlike ``comfy.sd.CLIP.encode``, which returns the cond tensor alone; nodes meant for both hosts call
        ``tokenize`` and ``encode_from_tokens_scheduled``.
        """
        return self.encode_from_tokens_scheduled(self.tokenize(text))
