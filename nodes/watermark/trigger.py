"""Safe-SD's prompt trigger, without training: a trigger word in the prompt switches the watermark on, and the
text encoder never sees it.

Source: Safe-SD (Ma et al., ACM MM 2024, arXiv 2407.13188): "λ-sampling" fine-tunes the model so that a trigger
text in the prompt yields watermarked images. Departure: no fine-tuning; the trigger switches the training-free
latent injector on, and is cut from the prompt so that the image does not change with the word itself
(``watermark.md`` target 12: conditioning with and without the trigger is identical).
"""

from __future__ import annotations

import re

DEFAULT_TRIGGER = "[watermark]"


def strip_trigger(prompt: str, trigger: str) -> tuple[str, bool]:
    """The prompt without every standalone occurrence of ``trigger``, and whether there was one.

    The trigger must stand alone (whitespace, a comma or the text's ends around it), so a trigger "wm" leaves
    "swmming" alone; the spaces and commas it leaves behind collapse.

    Raises:
        ValueError: an empty or whitespace-only trigger.
    Example:
        >>> strip_trigger("a red fox, [watermark] in snow", "[watermark]")
        ('a red fox, in snow', True)
        >>> strip_trigger("a red fox", "[watermark]")
        ('a red fox', False)
    """
    if not trigger.strip():
        raise ValueError(f"trigger must be a non-empty word; got {trigger!r}")
    pattern = re.compile(r"(^|[\s,])" + re.escape(trigger.strip()) + r"(?=$|[\s,])")
    stripped, count = pattern.subn(r"\1", prompt)
    if not count:
        return prompt, False
    stripped = re.sub(r"\s+,", ",", stripped)  # "a cat , on" -> "a cat, on"
    stripped = re.sub(r",(\s*,)+", ",", stripped)  # "a,, b" -> "a, b"
    stripped = re.sub(r"\s{2,}", " ", stripped).strip().strip(",").strip()
    return stripped, True
