"""Prompt encoding: the standard CLIP encoding, and LongAlign's segment-level encoding for long prompts.

Stable Diffusion's text encoders see at most 77 tokens. A longer prompt is encoded with LongAlign's
segment-level encoding instead of being cut: each sentence is encoded on its own and the pieces are joined.

Source: LongAlign (Liu et al., "Improving Long-Text Alignment for Text-to-Image Diffusion Models", 2024),
official code ``tools.caption2embed`` and ``sample.py``; ``techniques.md`` §4.9. Default length 240.

Notation: L = ``max_tokens``; a segment is one sentence of the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..common.denoiser import Conditioning
from .clip import CHUNK_TOKENS


LONGALIGN_TOKENS = 240  # Source: LongAlign, official sample.py default max length
PAD_WINDOW = 60  # Source: LongAlign caption2embed: the pad embedding is the mean of the empty prompt's last 60 rows
# Source: LongAlign caption2embed's split; its regex also splits on the literal strings '"!' and ';"'.
SENTENCE_SPLIT = re.compile(r'[.?]|"!|;"')


def split_sentences(prompt: str) -> list[str]:
    """The prompt's sentences, each ending with ".", as LongAlign segments them; the whole prompt if none.

    Example:
        >>> split_sentences("A red fox. It sleeps under a tree? Snow falls")
        ['A red fox.', 'It sleeps under a tree.', 'Snow falls.']
        >>> split_sentences("...")
        ['...']
    """
    pieces = [piece.strip() for piece in SENTENCE_SPLIT.split(prompt)]
    segments = [f"{piece}." for piece in pieces if piece]
    return segments or [prompt]


def token_count(tokenizer, prompt: str) -> int:
    """How many tokens the prompt takes, start and end tokens included."""
    return len(tokenizer(prompt, truncation=False)["input_ids"])


def _hidden_states(text_encoder, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token states of ``layer`` (-1 the last, normalised; -2 the penultimate) and the pooled projection."""
    output = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=layer != -1)
    states = output.last_hidden_state if layer == -1 else output.hidden_states[layer]
    return states, getattr(output, "text_embeds", None)


def _tokens(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=CHUNK_TOKENS, truncation=True,
                     return_tensors="pt")["input_ids"]


def encode_standard(tokenizer, text_encoder, prompt: str, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SD's own encoding: the prompt padded or cut to 77 tokens; states (1, 77, D) and the pooled output."""
    with torch.no_grad():
        return _hidden_states(text_encoder, _tokens(tokenizer, prompt), layer)


def encode_long(tokenizer, text_encoder, prompt: str, layer: int, max_tokens: int = LONGALIGN_TOKENS
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LongAlign's segment-level encoding: states (1, ``max_tokens``, D) and the first segment's pooled output.

    1. Split the prompt into sentences (:func:`split_sentences`).
    2. Encode each sentence alone, cut at 77 tokens.
    3. Keep each sentence's start token and words: drop its end token and the padding.
    4. Join the sentences; cut at ``max_tokens``, or fill up with one pad embedding: the mean of the last 60
       rows of the empty prompt's encoding.

    Departure: the pooled output (SDXL) is the first sentence's; the paper does not use SDXL, and its first
    sentence usually names the subject.

    Args:
        tokenizer, text_encoder: a CLIP tokenizer and its text model (transformers).
        prompt: the text.
        layer: -1 for the last (normalised) hidden states, -2 for the penultimate.
        max_tokens: L, 1 <= L.
    Returns:
        (states of shape (1, L, D), pooled (1, P) or None).
    """
    kept, pooled = [], None
    with torch.no_grad():
        for segment in split_sentences(prompt):
            ids = _tokens(tokenizer, segment)
            # Cut at the first end token, by position: some tokenizers pad with an id that also stands for a real
            # character (SD2's and SDXL's second pad with "!"), so dropping ids would drop words too.
            length = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
            states, segment_pooled = _hidden_states(text_encoder, ids, layer)
            kept.append(states[0, :length])
            pooled = segment_pooled if pooled is None else pooled
        empty_states, _ = _hidden_states(text_encoder, _tokens(tokenizer, ""), layer)
    return join_segments(kept, empty_states[0], max_tokens), pooled


def join_segments(segments: Sequence[torch.Tensor], empty_states: torch.Tensor,
                  max_tokens: int = LONGALIGN_TOKENS) -> torch.Tensor:
    """LongAlign's join: the segments' rows in order, cut at ``max_tokens`` or filled up with one pad embedding,
    the mean of the last :data:`PAD_WINDOW` rows of the empty prompt's encoding.

    Args:
        segments: each sentence's kept rows (start token and words), (n_i, D).
        empty_states: the empty prompt's encoding, (77, D).
        max_tokens: L, 1 <= L.
    Returns:
        (1, L, D).

    Example:
        >>> join_segments([torch.ones(3, 2), torch.zeros(2, 2)], torch.full((77, 2), 5.0), max_tokens=7)[0, :, 0]
        tensor([1., 1., 1., 0., 0., 5., 5.])
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1; got {max_tokens}")
    joined = torch.cat(list(segments))[:max_tokens]
    pad = empty_states[-PAD_WINDOW:].mean(dim=0, keepdim=True)
    return torch.cat([joined, pad.expand(max_tokens - joined.shape[0], -1).to(joined.dtype)])[None]


ENCODINGS = ("auto", "longalign")  # auto: LongAlign only for prompts over 77 tokens


def encode_prompt(tokenizers: Sequence, text_encoders: Sequence, family: str, prompt: str,
                  size: tuple[int, int] = (1024, 1024), max_tokens: int = LONGALIGN_TOKENS,
                  encoding: str = "auto") -> Conditioning:
    """Encode a prompt for a model family, with LongAlign when it is longer than 77 tokens (or always).

    - "sd1": the last layer of CLIP ViT-L, normalised.
    - "sd2": the last layer of the 23-layer OpenCLIP ViT-H (the penultimate of the original 24).
    - "sdxl": both encoders' penultimate layers joined per token (768 + 1280), the second encoder's pooled
      projection, and time ids (original size, crop (0, 0), target size) for ``size`` = (height, width).

    Args:
        tokenizers, text_encoders: one each for SD1/SD2, two for SDXL, in the model's order.
        family: "sd1", "sd2" or "sdxl".
        prompt: the text; over 77 tokens (in any tokenizer) switches to LongAlign.
        encoding: "auto", or "longalign" to use LongAlign for any length, as the paper does for the negative
            prompt of a long positive one (an empty prompt becomes the start token and L − 1 pad embeddings).
        size: (height, width) of the image, for SDXL's time ids.
        max_tokens: LongAlign's length L.
    Returns:
        The conditioning, batch 1.
    """
    layers = {"sd1": [-1], "sd2": [-1], "sdxl": [-2, -2]}
    if family not in layers:
        raise ValueError(f"family must be one of {sorted(layers)}; got {family!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}; got {encoding!r}")
    if len(tokenizers) != len(layers[family]) or len(text_encoders) != len(layers[family]):
        raise ValueError(f"{family} needs {len(layers[family])} tokenizer(s) and text encoder(s); got "
                         f"{len(tokenizers)} and {len(text_encoders)}")
    long = encoding == "longalign" or any(token_count(tokenizer, prompt) > CHUNK_TOKENS for tokenizer in tokenizers)
    encoded = [encode_long(tok, enc, prompt, layer, max_tokens) if long else encode_standard(tok, enc, prompt, layer)
               for tok, enc, layer in zip(tokenizers, text_encoders, layers[family])]
    embeds = torch.cat([states for states, _ in encoded], dim=-1)
    if family != "sdxl":
        return Conditioning(embeds)
    height, width = size
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype, device=embeds.device)
    return Conditioning(embeds, encoded[-1][1], time_ids)
