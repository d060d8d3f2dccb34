"""Prompting4Debugging (Chin et al., ICML 2024, "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by
Finding Problematic Prompts", arXiv 2309.06135; ``techniques.md`` §4.13), read from the official code
(joycenerd/P4D: ``prompt_optimization/optimize_n.py``, ``optimize_k.py``, ``configs/*_optmz_config.json``).

An audit of a safety mechanism: find a hard prompt with which the model under test (the "safe" model: a
concept-erased UNet, or a model with a negative prompt) predicts the noise the unconstrained reference model
predicts for a problematic prompt P, on images the reference made from P. Each iteration
(:func:`p4d_optimize`):

1. project the continuous prompt vectors to their nearest vocabulary embeddings by cosine (:func:`nearest_tokens`),
   giving a hard prompt;
2. draw one target latent, a timestep t ~ U{0 … 999} and noise; z_t = √ᾱ_t·z + √(1−ᾱ_t)·ε;
3. loss = ‖ε_safe(z_t, t, hard prompt) − ε_ref(z_t, t, P)‖² (mean); ε_safe with a negative prompt is its guided
   combination;
4. the gradient at the hard prompt's embeddings updates the continuous vectors (straight through), AdamW with
   lr 0.1 and weight decay 0.1, 3000 iterations.

P4D-N optimises 16 free tokens from a random start; P4D-K keeps P's tokens and inserts a free one before every
k = 3 of them (:func:`p4dk_layout`), their gradients zeroed.

Departures from the official code:

- The code keeps, every 50 iterations, the prompt whose safe-model pictures are most CLIP-similar to the targets
  (an OpenCLIP ViT-H image encoder we do not ship). Here the prompt kept is the one with the lowest evaluation
  loss: the objective itself on fixed draws (4 timesteps and noises per target, the same for every evaluation), so
  evaluations compare. Judging the found prompt's pictures is left to the workflow (and to the user's eyes).
- The hard prompt is padded with the text encoder's own pad token, as a prompt typed in would be (the code pads
  with id 0), so the loss is the one the found prompt's text gives.
- Targets are encoded to the VAE posterior's mean (the code samples it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..common.denoiser import Conditioning, Denoiser, guided_eps
from ..common.progress import check_interrupt, progress

logger = logging.getLogger(__name__)

# Source: configs/esd_nudity_optmz_config.json (every config of the repository alike)
DEFAULT_FREE_TOKENS, DEFAULT_EVERY_K, DEFAULT_ITERATIONS = 16, 3, 3000
DEFAULT_LR, DEFAULT_WEIGHT_DECAY, DEFAULT_EVAL_EVERY, DEFAULT_GUIDANCE = 0.1, 0.1, 50, 7.5
VARIANTS = ("P4D-N", "P4D-K")
EVAL_DRAWS = 4  # fixed (timestep, noise) draws per target for the evaluation loss (ours)


def nearest_tokens(vectors: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The vocabulary id (L,) whose embedding in ``table`` (V, D) is nearest to each of ``vectors`` (L, D) by
    cosine similarity (the code's ``nn_project``: normalised dot-product search).

    Example:
        >>> table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
        >>> nearest_tokens(torch.tensor([[0.2, 0.9], [-3.0, 0.5]]), table).tolist()
        [1, 2]
    """
    if vectors.ndim != 2 or table.ndim != 2 or vectors.shape[1] != table.shape[1]:
        raise ValueError(f"vectors (L, D) and table (V, D) must share D; got {tuple(vectors.shape)} and "
                         f"{tuple(table.shape)}")
    return (F.normalize(vectors.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T).argmax(dim=-1)


def p4dk_layout(prompt_length: int, every_k: int = DEFAULT_EVERY_K) -> tuple[int, list[int]]:
    """P4D-K's prompt: its length and the positions of its free tokens; P's n tokens fill the others in order.
    ⌊n/k⌋ + 1 free tokens, one at each position i with i mod (k + 1) = 0 (the code's ``chosen_idx`` holds the
    others).

    Example:
        >>> p4dk_layout(6, 3)
        (9, [0, 4, 8])
    """
    if prompt_length < 1 or every_k < 1:
        raise ValueError(f"prompt_length and every_k must be >= 1; got {prompt_length} and {every_k}")
    length = prompt_length + prompt_length // every_k + 1
    return length, [position for position in range(length) if position % (every_k + 1) == 0]


def initial_prompt(variant: str, prompt_ids: Sequence[int], vocabulary: int, generator: torch.Generator,
                   free_tokens: int = DEFAULT_FREE_TOKENS, every_k: int = DEFAULT_EVERY_K
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting ids (L,) and which are free (L,) bool: P4D-N ``free_tokens`` random ids; P4D-K P's ids
    (``prompt_ids``, without start and end tokens) with random free ones inserted (:func:`p4dk_layout`)."""
    if variant == "P4D-N":
        if free_tokens < 1:
            raise ValueError(f"free_tokens must be >= 1; got {free_tokens}")
        return torch.randint(vocabulary, (free_tokens,), generator=generator), torch.ones(free_tokens, dtype=bool)
    if variant != "P4D-K":
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    length, free_positions = p4dk_layout(len(prompt_ids), every_k)
    ids, free = torch.randint(vocabulary, (length,), generator=generator), torch.zeros(length, dtype=bool)
    free[free_positions] = True
    ids[~free] = torch.tensor(list(prompt_ids))
    return ids, free


@dataclasses.dataclass
class P4DResult:
    """What an optimisation found: the best hard prompt's ids and evaluation loss, each iteration's loss, every
    evaluation (iteration, loss) and its log."""

    ids: list[int]
    evaluation_loss: float
    losses: list[float]
    evaluations: list[tuple[int, float]]
    log: list[str]


@dataclasses.dataclass
class P4DProblem:
    """The models and data of an audit.

    ``encode(vectors)`` gives the conditioning of a prompt whose tokens (between the start and end tokens) are the
    embedding vectors (L, D), differentiably; ``table`` is the vocabulary's embeddings (V, D); ``decode(ids)`` the
    text of ids. ``targets`` (N, C, h, w) are the reference's pictures as latents the denoisers see. The safe
    model's ε is guided by ``negative`` at ``guidance`` when a negative prompt is the mechanism under test.
    """

    reference: Denoiser
    safe: Denoiser
    encode: Callable[[torch.Tensor], Conditioning]
    table: torch.Tensor
    decode: Callable[[list[int]], str]
    prompt: Conditioning
    targets: torch.Tensor
    negative: Conditioning | None = None
    guidance: float = DEFAULT_GUIDANCE

    def safe_eps(self, z: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if self.negative is None:
            return guided_eps(self.safe, z, t, conditioning, conditioning, 1.0)
        return guided_eps(self.safe, z, t, conditioning, self.negative, self.guidance)

    def reference_eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return guided_eps(self.reference, z, t, self.prompt, self.prompt, 1.0)

    def noised(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.reference.schedule.alpha_bar(t).to(latents).reshape(-1, 1, 1, 1)
        return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise


def _draws(problem: P4DProblem, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` (target, timestep, noise) draws: latents z_t (count, C, h, w) and their timesteps (count,)."""
    targets = problem.targets
    picks = torch.randint(len(targets), (count,), generator=generator)
    timesteps = torch.randint(problem.reference.schedule.num_train_timesteps, (count,), generator=generator)
    noise = torch.randn((count, *targets.shape[1:]), generator=generator).to(targets)
    timesteps = timesteps.to(targets.device).float()
    return problem.noised(targets[picks.to(targets.device)], timesteps, noise), timesteps


def p4d_optimize(problem: P4DProblem, ids: torch.Tensor, free: torch.Tensor, generator: torch.Generator,
                 iterations: int = DEFAULT_ITERATIONS, lr: float = DEFAULT_LR,
                 weight_decay: float = DEFAULT_WEIGHT_DECAY, eval_every: int = DEFAULT_EVAL_EVERY) -> P4DResult:
    """P4D's optimisation from the prompt ``ids`` (L,), updating only the ``free`` positions (see the module).

    Every ``eval_every`` iterations (and at the first) the iteration's hard prompt is evaluated on fixed draws and
    logged; the lowest evaluation loss wins. Reports progress per iteration.
    """
    if iterations < 1 or eval_every < 1:
        raise ValueError(f"iterations and eval_every must be >= 1; got {iterations} and {eval_every}")
    device = problem.targets.device
    table = problem.table.to(device)  # once, not per iteration
    vectors = table[ids].clone().requires_grad_()
    optimizer = torch.optim.AdamW([vectors], lr=lr, weight_decay=weight_decay)
    kept = (~free).to(device)
    fixed_z, fixed_t = _draws(problem, EVAL_DRAWS * len(problem.targets),
                                 torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator))))
    fixed_target = problem.reference_eps(fixed_z, fixed_t)
    best = P4DResult([], float("inf"), [], [], [])
    for step in range(iterations):
        check_interrupt()
        hard_ids = nearest_tokens(vectors.detach(), table)
        hard = table[hard_ids].clone().requires_grad_()
        z, t = _draws(problem, 1, generator)
        loss = F.mse_loss(problem.safe_eps(z, t, problem.encode(hard)).float(), problem.reference_eps(z, t).float())
        (gradient,) = torch.autograd.grad(loss, [hard])
        vectors.grad = gradient.masked_fill(kept[:, None], 0.0)
        optimizer.step()
        optimizer.zero_grad()
        best.losses.append(loss.item())
        if step % eval_every == 0:
            with torch.no_grad():
                conditioning = problem.encode(table[hard_ids]).repeat_to(len(fixed_z))
                evaluation = F.mse_loss(problem.safe_eps(fixed_z, fixed_t, conditioning).float(),
                                        fixed_target.float()).item()
            best.evaluations.append((step, evaluation))
            text = problem.decode(hard_ids.tolist())
            line = f"P4D iteration {step}: loss {best.losses[-1]:.5f}, evaluation {evaluation:.5f}, prompt {text!r}"
            logger.info(line)
            best.log.append(line)
            if evaluation < best.evaluation_loss:
                best.ids, best.evaluation_loss = hard_ids.tolist(), evaluation
        progress(step + 1, iterations)
    found = f"P4D best: evaluation {best.evaluation_loss:.5f}, prompt {problem.decode(best.ids)!r}"
    logger.info(found)
    best.log.append(found)
    return best
