"""Prompt embeddings for routing: the pipeline's own text encoder (pooled), or a local sentence encoder."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..common.memory import MEMORY, runs_on
from ..models.clip import CHUNK_TOKENS
from ..models.text import token_count

ENCODE_BATCH = 64  # prompts per text-encoder call, which bounds memory on long prompt files


def pooled_text_embeddings(tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str]) -> torch.Tensor:
    """One embedding per prompt: the pooled output of the pipeline's last text encoder.

    SD1 and SD2 have one encoder and pool at the end token (``pooler_output``); SDXL's second encoder has a
    projection, whose output (``text_embeds``) is what SDXL itself conditions on. Prompts are cut at 77 tokens:
    the pooled vector reads the end token, which the encoder places at most at position 76.

    Departure: APTP embeds prompts with all-mpnet-base-v2; the pipeline's own encoder needs no other model.

    Args:
        tokenizers, text_encoders: the model's, in its order (one each for SD1/SD2, two for SDXL).
        prompts: one or more texts.
    Returns:
        (N, D) float32 on the CPU, where routing runs.
    Raises:
        ValueError: no prompts, or no encoder.
    """
    if not prompts:
        raise ValueError("prompts must hold at least one prompt; got none")
    if not tokenizers or not text_encoders:
        raise ValueError("a tokenizer and a text encoder are needed to embed prompts")
    tokenizer, text_encoder = tokenizers[-1], text_encoders[-1]
    pooled = []
    with torch.no_grad():
        for start in range(0, len(prompts), ENCODE_BATCH):
            ids = tokenizer(list(prompts[start:start + ENCODE_BATCH]), padding="max_length", max_length=CHUNK_TOKENS,
                            truncation=True, return_tensors="pt")["input_ids"]
            output = text_encoder(ids.to(text_encoder.device))
            projected = getattr(output, "text_embeds", None)
            pooled.append((output.pooler_output if projected is None else projected).float().cpu())
    return torch.cat(pooled)


@dataclasses.dataclass(frozen=True, eq=False)
class SentenceEncoder:
    """A local sentence-embedding model: a transformers encoder, its tokenizer, and how it pools its tokens."""

    tokenizer: Any
    model: torch.nn.Module
    pooling: str  # "mean" over the real tokens (all-mpnet-base-v2, all-MiniLM-L6-v2) or "cls"
    name: str  # shown in the routers fitted with it


def sentence_encoder_pooling(folder: str | os.PathLike) -> str:
    """How a sentence-transformers folder pools: "cls" when its ``1_Pooling/config.json`` says so, else "mean"
    (what all-mpnet-base-v2, APTP's encoder, and a folder without that file use)."""
    path = os.path.join(os.fspath(folder), "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return "mean"
    with open(path, encoding="utf-8") as file:
        return "cls" if json.load(file).get("pooling_mode_cls_token") else "mean"


def sentence_embeddings(encoder: SentenceEncoder, prompts: Sequence[str]) -> torch.Tensor:
    """One embedding per prompt from a sentence encoder: its last hidden states pooled over the real tokens.

    Routing compares directions only, so sentence-transformers' final normalisation is left out.

    Returns:
        (N, D) float32 on the CPU.
    Raises:
        ValueError: no prompts.
    """
    if not prompts:
        raise ValueError("prompts must hold at least one prompt; got none")
    pooled = []
    with torch.no_grad(), MEMORY.use_module(encoder.model):
        device = runs_on(encoder.model)
        for start in range(0, len(prompts), ENCODE_BATCH):
            batch = encoder.tokenizer(list(prompts[start:start + ENCODE_BATCH]), padding=True, truncation=True,
                                      return_tensors="pt").to(device)
            hidden = encoder.model(**batch).last_hidden_state.float()
            if encoder.pooling == "cls":
                pooled.append(hidden[:, 0].cpu())
                continue
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    return torch.cat(pooled)


def token_lengths(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Each prompt's length in tokens (start and end included, no cut): a difficulty score needing no model.

    Example:
        >>> class Words:  # a stand-in tokenizer: one token per word, plus start and end
        ...     def __call__(self, text, truncation=False):
        ...         return {"input_ids": [0, *range(len(text.split())), 1]}
        >>> token_lengths(Words(), ["a cat", "a red cat on a mat"]).tolist()
        [4.0, 8.0]
    """
    return torch.tensor([float(token_count(tokenizer, prompt)) for prompt in prompts], dtype=torch.float64)
