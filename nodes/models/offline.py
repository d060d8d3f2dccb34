"""Keeps the Hugging Face libraries offline, and quiet while they load: import this module before anything that
imports diffusers or transformers (they import huggingface_hub, which reads ``HF_HUB_OFFLINE`` once, when it is first
imported).

Without it, a ``from_single_file`` that finds no local config switches ``local_files_only`` off by itself and tries
the Hub (environment.md §4). ``setdefault``: a user who sets it to 0 on purpose keeps their choice.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub.constants  # noqa: E402

logger = logging.getLogger(__name__)

if not huggingface_hub.constants.HF_HUB_OFFLINE:
    logger.warning("huggingface_hub was imported with HF_HUB_OFFLINE unset or 0; the loaders still pass "
                   "local_files_only=True, but diffusers may try the Hub when a config is missing")

DIFFUSERS_MODELING_LOGGER = "diffusers.models.modeling_utils"


class _EmptyFloat32ListFilter(logging.Filter):
    """Drops diffusers' warning that a model has modules to keep in float32 when the list it names is empty: the
    single-file loader casts every model it builds, and the warning then says nothing about the user's model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Loading without the libraries' per-component progress bars and empty warnings on the terminal; the loader
    logs one line per model instead. The progress-bar switches are global, so they are put back as they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    switches = [library for library in (diffusers_logging, transformers_logging) if library.is_progress_bar_enabled()]
    for library in switches:
        library.disable_progress_bar()
    quiet = _EmptyFloat32ListFilter()
    logging.getLogger(DIFFUSERS_MODELING_LOGGER).addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger(DIFFUSERS_MODELING_LOGGER).removeFilter(quiet)
        for library in switches:
            library.enable_progress_bar()
