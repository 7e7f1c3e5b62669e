"""The Transformers backend's own settings: ``[backends.transformers]`` in the config file,
``MEMCTL_TRANSFORMERS_<OPTION>`` in the environment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TransformersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    verify_tokens: int = Field(1, ge=1, le=64)  # the verify step generates this many tokens


def transformers_options(settings: object) -> TransformersOptions:
    return settings.backend_options("transformers", TransformersOptions)  # type: ignore[attr-defined]
