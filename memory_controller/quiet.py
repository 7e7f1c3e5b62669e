"""Quiet library output for the long-running processes (the dashboard, ``memctl serve``): their logs are
read by a person, and libraries' "Loading weights" progress bars and per-request warnings drowned what
memctl itself said.

Only environment defaults, set before the libraries are imported (a backend imports them on its first
load); a value the user set is kept. No library is imported here. The Hugging Face hub's switch is the
core's (every backend that reads the hub follows it); a backend adds its own library's defaults when it is
built in a quiet process (:func:`quiet_requested`, see backends/transformers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

QUIET_DEFAULTS = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # libraries built on the hub follow its switch for their bars too
}
_quiet = False


def quiet_library_output() -> None:
    global _quiet
    _quiet = True
    apply_defaults(QUIET_DEFAULTS)


def quiet_requested() -> bool:
    """Whether this process asked for quiet library output (the dashboard and ``memctl serve`` do)."""
    return _quiet


def apply_defaults(defaults: Mapping[str, str]) -> None:
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
