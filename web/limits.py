"""Memory limits of the standalone server: the pixel budget of image and latent batches, checked before allocating.

A node that makes a batch from numbers (an empty image or latent) or from a file (every frame of an animation)
asks :func:`check_pixel_budget` (or :func:`pixel_budget_error`, in ``VALIDATE_INPUTS``) before it allocates, so a
106-byte prompt or a 1 MB animated PNG cannot take the machine's memory. The budget counts image pixels over the
whole batch, ``batch × height × width``; a latent counts the pixels of the image it decodes to.

Node classes declare ``limits: ClassVar[Limits] = DEFAULT_LIMITS``; the server binds its own value with
:func:`bind_limits`, as it binds data folders, so two apps in one process keep their own limits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

MAX_PIXELS_OPTION = "--max-pixels"  # the server option that raises the budget
# One image at the largest size the widgets allow (MAX_RESOLUTION², 16384²): Atelier's 16K generator makes one.
# As float32 RGB that is 3 GiB, so a batch may hold that many pixels in all, and no more by default.
DEFAULT_MAX_PIXELS = 16384 * 16384


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server's memory limits.

    Example:
        >>> Limits().max_pixels == DEFAULT_MAX_PIXELS, Limits(max_pixels=1024).max_pixels
        (True, 1024)
    """

    max_pixels: int = DEFAULT_MAX_PIXELS  # batch × height × width, over a whole image or latent batch

    def __post_init__(self) -> None:
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive integer; got {self.max_pixels!r}")


DEFAULT_LIMITS = Limits()


def pixel_budget_error(what: str, batch: int, height: int, width: int, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """The refusal message when a ``batch × height × width`` batch would exceed the pixel budget, else None.

    Args:
        what: what would be made, for the message ("EmptyImage", "'cat.png' (30 frames)").
        batch, height, width: the batch's size in image pixels (a latent: its decoded image's size).
        limits: the server's limits.
    Example:
        >>> pixel_budget_error("EmptyImage", 1, 512, 512)
        >>> print(pixel_budget_error("EmptyImage", 2, 16384, 16384))
        EmptyImage of 2 × 16384 × 16384 = 536870912 pixels exceeds the pixel budget of 268435456 pixels (a batch's \
total); make it smaller, or start the server with --max-pixels N to raise the budget
    """
    total = batch * height * width
    if total <= limits.max_pixels:
        return None
    return (f"{what} of {batch} × {height} × {width} = {total} pixels exceeds the pixel budget of "
            f"{limits.max_pixels} pixels (a batch's total); make it smaller, or start the server with "
            f"{MAX_PIXELS_OPTION} N to raise the budget")


def check_pixel_budget(what: str, batch: int, height: int, width: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse a batch over the pixel budget, before anything is allocated.

    Raises:
        ValueError: the message of :func:`pixel_budget_error`, which names the limit and how to raise it.
    Example:
        >>> check_pixel_budget("EmptyImage", 4, 64, 64, Limits(max_pixels=1000))
        Traceback (most recent call last):
        ...
        ValueError: EmptyImage of 4 × 64 × 64 = 16384 pixels exceeds the pixel budget of 1000 pixels ...
    """
    message = pixel_budget_error(what, batch, height, width, limits)
    if message is not None:
        raise ValueError(message)


def bind_limits(classes: Mapping[str, type], limits: Limits) -> dict[str, type]:
    """``classes`` with every class that declares ``limits`` replaced by a subclass bound to ``limits``.

    Example:
        >>> class Node:
        ...     limits = DEFAULT_LIMITS
        >>> bind_limits({"Node": Node, "Other": int}, Limits(max_pixels=64))["Node"].limits.max_pixels
        64
    """
    return {name: type(name, (cls,), {"limits": limits}) if isinstance(getattr(cls, "limits", None), Limits) else cls
            for name, cls in classes.items()}
