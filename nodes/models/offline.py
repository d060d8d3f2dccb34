"""Keeps the Hugging Face libraries offline: import this module before anything that imports diffusers or
transformers (they import huggingface_hub, which reads ``HF_HUB_OFFLINE`` once, when it is first imported).

Without it, a ``from_single_file`` that finds no local config switches ``local_files_only`` off by itself and tries
the Hub (environment.md §4). ``setdefault``: a user who sets it to 0 on purpose keeps their choice.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub.constants  # noqa: E402

logger = logging.getLogger(__name__)

if not huggingface_hub.constants.HF_HUB_OFFLINE:
    logger.warning("huggingface_hub was imported with HF_HUB_OFFLINE unset or 0; the loaders still pass "
                   "local_files_only=True, but diffusers may try the Hub when a config is missing")
