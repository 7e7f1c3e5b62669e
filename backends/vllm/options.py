"""The vLLM backend's own settings: ``[backends.vllm]`` in the config file, ``MEMCTL_VLLM_<OPTION>`` in the
environment (the names they had before backends owned their settings)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

MAX_TIMEOUT_S = 7 * 86_400.0


class VllmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: str = Field("vllm/vllm-openai", pattern=r"^[a-z0-9][a-z0-9._/:-]*$")
    tag: str = Field("v0.33.0", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    port: int = Field(8000, ge=1, le=65535)
    # Docker network for the containers: None = the default bridge when the engine has one (port published
    # on bind_address), else host networking with vLLM listening on bind_address.
    network: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    allow_pull: bool = False
    ready_timeout_s: float = Field(900, gt=0, le=MAX_TIMEOUT_S)
    stop_timeout_s: float = Field(10, ge=0, le=600)
    gpu_util_margin: float = Field(0.05, ge=0, le=0.5)
    gpu_util_max: float = Field(0.95, gt=0, le=1)
    hf_cache_readonly: bool = True
    ipc_host: bool = True
    shm_size: str = Field("8g", pattern=r"^[0-9]+[bkmg]?$")
    api_key: SecretStr | None = None

    @property
    def image_ref(self) -> str:
        return f"{self.image}:{self.tag}"


def vllm_options(settings: object) -> VllmOptions:
    """The options of the ``vllm`` backend in ``settings`` (its defaults when it is not configured)."""
    return settings.backend_options("vllm", VllmOptions)  # type: ignore[attr-defined]
