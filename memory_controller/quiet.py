"""Quiet library output for the long-running processes (the dashboard, ``memctl serve``): their logs are
read by a person, and Transformers' "Loading weights" progress bars and per-request token-id warnings
("Setting `pad_token_id` to `eos_token_id`") drowned what memctl itself said.

Only environment defaults, set before the libraries are imported (a backend imports them on its first
load); a value the user set is kept. No library is imported here.
"""

from __future__ import annotations

import os

QUIET_DEFAULTS = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # Transformers' own bars follow the hub's switch
    "TRANSFORMERS_VERBOSITY": "error",  # warnings such as the pad/eos token-id notice
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_library_output() -> None:
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
