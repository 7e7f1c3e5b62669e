"""Settings: ``MEMCTL_*`` environment variables over a user TOML file over ``config/defaults.toml``.

``load_settings()`` is the one entry point; an invalid value raises :class:`SettingsError`
naming the field, the value and what is allowed. Values that would validate but break later are
refused at load time too: non-finite or absurd numbers (``inf``, ``nan``, ``1e308`` seconds), an
empty state dir, an empty recommendation table, a backend's options its own model refuses
(``[backends.<id>]``; ``MEMCTL_<ID>_<OPTION>`` variables are aliases), and ``nvml_module`` outside the
test harness (``MEMCTL_TEST_SEAMS=1``). :func:`settings_warnings` names ``MEMCTL_*`` variables that are
no setting (a typo: "did you mean ...").
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from .errors import CorruptDataError, SettingsError
from .safejson import _depth_ok, loads_bounded
from .types import MAX_BATCH, MAX_CONTEXT_TOKENS, Precision, ProfileBand
from .units import gib_to_bytes

_M = TypeVar("_M", bound=BaseModel)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "config"
DEFAULTS_FILE = CONFIG_DIR / "defaults.toml"


def user_config_file() -> Path:
    explicit = os.environ.get("MEMCTL_CONFIG_FILE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "memctl" / "config.toml"


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "memctl"


# Upper bounds that keep every derived value sane (timestamps, byte counts).
MAX_TIMEOUT_S = 7 * 86_400.0  # a week: longer is a typo, and deadlines past year 9999 break datetime
MAX_GIB = 1_048_576.0  # 1 PiB

# MEMCTL_* variables that are read elsewhere and are no setting (settings_warnings skips them).
NON_SETTING_VARIABLES = frozenset({
    "MEMCTL_CONFIG_FILE",  # the user TOML file (read here, before the settings)
    "MEMCTL_TEST_SEAMS",  # the test harness: allows nvml_module
    "MEMCTL_FAKE_NVML",  # tests/fake_pynvml.py scenario
    "MEMCTL_TEST_DOCKER_HOST",  # tests: the private Docker engine
    "MEMCTL_TEST_STORAGE_DRIVER",  # scripts/dockerd.sh
    "MEMCTL_UI_PORT",  # scripts that start the dashboard
})
TEST_SEAMS_VARIABLE = "MEMCTL_TEST_SEAMS"
DEFAULT_NVML_MODULE = "pynvml"


def test_seams_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the test harness set MEMCTL_TEST_SEAMS=1 (fault-injection seams such as nvml_module)."""
    env = os.environ if environ is None else environ
    return env.get(TEST_SEAMS_VARIABLE, "").strip() == "1"


class ProfileBandConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1)
    min_free_gib: float = Field(ge=0, le=MAX_GIB)
    mode: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")  # the backend id the band recommends
    precision: Precision
    context_tokens: int = Field(gt=0, le=MAX_CONTEXT_TOKENS)
    batch: int = Field(gt=0, le=MAX_BATCH)
    limited: bool = False

    def to_band(self) -> ProfileBand:
        return ProfileBand(
            name=self.name,
            min_free_bytes=gib_to_bytes(self.min_free_gib),
            mode=self.mode,
            precision=self.precision,
            context_tokens=self.context_tokens,
            batch=self.batch,
            limited=self.limited,
        )


class BackendConfig(BaseModel):
    """One ``[backends.<id>]`` table: the factory, and the backend's options (checked by its own model)."""

    model_config = ConfigDict(extra="allow")

    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

    @property
    def raw_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _options_model(factory: str) -> type[BaseModel] | None:
    """The pydantic model of a backend's options: ``OPTIONS_MODEL`` of the module its factory lives in."""
    import importlib

    try:
        module = importlib.import_module(factory.partition(":")[0])
    except Exception:  # noqa: BLE001 - the registry reports a module that cannot be imported
        return None
    found = getattr(module, "OPTIONS_MODEL", None)
    return found if isinstance(found, type) and issubclass(found, BaseModel) else None


def _option_aliases(factory: Any) -> dict[str, str]:
    """Other flat names of a backend's options (``OPTION_ALIASES`` of its module: flat name -> option), for
    settings it had under a name without its id in front."""
    if not isinstance(factory, str) or _options_model(factory) is None:
        return {}
    import importlib

    found = getattr(importlib.import_module(factory.partition(":")[0]), "OPTION_ALIASES", None)
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, Mapping) else {}


def _backend_aliases(data: dict[str, Any], environ: Mapping[str, str], own: frozenset[str] = frozenset()
                     ) -> dict[str, Any]:
    """``MEMCTL_<ID>_<OPTION>`` variables and flat ``<id>_<option>`` keys (the settings before backends
    owned theirs) moved into ``backends.<id>``: flat keys over the config tables, the variables over both.
    A backend's ``OPTION_ALIASES`` (flat name -> option) move the same way, as keys and as ``MEMCTL_<NAME>``."""
    backends = data.get("backends")
    if not isinstance(backends, dict):
        return data
    data = dict(data)
    backends = {bid: ({"factory": v} if isinstance(v, str) else dict(v) if isinstance(v, dict) else v)
                for bid, v in backends.items()}
    for bid, table in backends.items():
        if not isinstance(table, dict):
            continue
        aliases = {k: v for k, v in _option_aliases(table.get("factory")).items() if k not in own}
        for key in [k for k in data if isinstance(k, str) and k.startswith(f"{bid}_") and k not in own]:
            table[key[len(bid) + 1:]] = data.pop(key)
        for key in [k for k in data if k in aliases]:
            table[aliases[key]] = data.pop(key)
        for key, value in environ.items():
            if key.upper().startswith("MEMCTL_") and key[len("MEMCTL_"):].lower() in aliases:
                table[aliases[key[len("MEMCTL_"):].lower()]] = value
        prefix = f"MEMCTL_{bid.upper()}_"
        for key, value in environ.items():
            if (key.upper().startswith(prefix) and key.upper() not in NON_SETTING_VARIABLES
                    and key[len("MEMCTL_"):].lower() not in own):  # a setting of memctl's own keeps its name
                table[key[len(prefix):].lower()] = value
    data["backends"] = backends
    return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MEMCTL_",
        extra="forbid",
        validate_default=True,
        allow_inf_nan=False,
    )

    # where models are
    hf_cache_dir: Path | None = None  # None: huggingface_hub's own (honours HF_HOME/HF_HUB_CACHE)
    local_model_dirs: list[Path] = Field(default_factory=list)

    # where we keep our own state (operation log)
    state_dir: Path = Field(default_factory=_default_state_dir)

    language: Literal["ru", "en"] = "ru"
    poll_interval_s: float = Field(2.0, ge=0.2, le=60)
    memory_history_s: int = Field(600, ge=10, le=86_400)

    green_min_gib: float = Field(4.0, ge=0, le=MAX_GIB)
    yellow_min_gib: float = Field(2.0, ge=0, le=MAX_GIB)
    profiles: list[ProfileBandConfig] = Field(default_factory=list)
    cpu_half_precision: Literal["fp16", "bf16", "fp32"] = "bf16"

    cuda_context_reserve_gib: float = Field(0.5, ge=0, le=16)
    activation_overhead_fraction: float = Field(0.10, ge=0, le=2)
    activation_overhead_min_mib: int = Field(64, ge=0, le=1 << 30)

    # The NVML module the probe imports: a test-only seam (tests point it at a fake), honoured only
    # with MEMCTL_TEST_SEAMS=1; any other value is refused at load time.
    nvml_module: str = DEFAULT_NVML_MODULE
    # Budget of host memory memctl may count as free (bytes); None = what the OS says is available.
    host_memory_budget_bytes: int | None = Field(None, ge=0, le=1 << 60)

    bind_address: str = "127.0.0.1"
    docker_host: str | None = None  # None: DOCKER_HOST or the default socket

    restore_previous_on_failure: bool = True
    operation_timeout_s: float = Field(1800, gt=0, le=MAX_TIMEOUT_S)  # deadline for one model load
    step_timeout_s: float = Field(120, gt=0, le=MAX_TIMEOUT_S)  # deadline for unload / clear / verify steps

    # Binding container ports beyond loopback exposes the model API to the network: opt in explicitly.
    allow_non_loopback_bind: bool = False

    # Backend registry: [backends.<id>] with ``factory = "package.module:create"`` (factory(settings, probe) ->
    # Backend) and the backend's own options, validated by the model its module names in OPTIONS_MODEL.
    # ``<id> = "package.module:create"`` is the short form (no options).
    backends: dict[str, BackendConfig] = Field(default_factory=dict)

    # The memctl server (OpenAI-compatible API for the IDE + the control API of the owner process).
    serve_port: int = Field(8765, ge=1, le=65535)
    dashboard_serves: bool = True  # the dashboard starts the server (and owns the machine) when none runs
    serve_api_key: SecretStr | None = None  # required on /v1 when bind_address is not loopback
    serve_on_demand: bool = True  # a request for a cached model that is not running loads it
    serve_idle_unload_s: float = Field(0, ge=0, le=7 * 86_400)  # 0 = never
    serve_heartbeat_s: float = Field(5.0, gt=0, le=60)  # SSE comment heartbeat while a model loads
    ide_min_context: int = Field(32768, ge=256, le=10_000_000)  # IDE-aware sizing's floor
    # Web origins (besides none, the server's own and vscode-webview://) whose state-changing requests
    # the server takes, e.g. "http://localhost:3000" or "vscode-file://"; env: comma-separated.
    serve_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    _options: dict[str, BaseModel] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _move_backend_options(cls, data: Any) -> Any:
        return _backend_aliases(data, os.environ, frozenset(cls.model_fields)) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_backend_options(self) -> Settings:
        for bid, cfg in self.backends.items():
            model = _options_model(cfg.factory)
            if model is None:
                continue
            try:
                self._options[bid] = model.model_validate(cfg.raw_options)
            except ValidationError as exc:
                raise ValueError("; ".join(_describe_option_error(bid, e) for e in exc.errors())) from None
        return self

    def backend_options(self, backend_id: str, model: type[_M]) -> _M:
        """The options of ``[backends.<backend_id>]`` as the backend's own ``model`` (its defaults when the
        backend is not configured here)."""
        found = self._options.get(backend_id)
        if isinstance(found, model):
            return found
        cfg = self.backends.get(backend_id)
        return model.model_validate(cfg.raw_options if cfg is not None else {})

    def with_backend_options(self, backend_id: str, **changes: Any) -> Settings:
        """A copy whose ``[backends.<backend_id>]`` options have ``changes`` (checked by the backend's own
        model: an invalid value raises SettingsError naming it)."""
        cfg = self.backends.get(backend_id)
        if cfg is None:
            raise SettingsError(f"no backend {backend_id!r} is configured", "add it under [backends] in the config file")
        new = BackendConfig.model_validate({**cfg.model_dump(), **changes})
        options = dict(self._options)
        model = _options_model(new.factory)
        if model is not None:
            try:
                options[backend_id] = model.model_validate(new.raw_options)
            except ValidationError as exc:
                raise SettingsError("; ".join(_describe_option_error(backend_id, e) for e in exc.errors()),
                                    "fix the value") from None
        copy = self.model_copy(update={"backends": {**self.backends, backend_id: new}})
        copy._options = options
        return copy

    def __getattr__(self, name: str) -> Any:
        """``settings.<id>_<option>``: a backend's option under the name it had before backends owned them."""
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            private = object.__getattribute__(self, "__pydantic_private__") or {}
            for bid, opts in private.get("_options", {}).items():
                field = name[len(bid) + 1:] if name.startswith(f"{bid}_") else None
                if field and (field in type(opts).model_fields or hasattr(type(opts), field)):
                    return getattr(opts, field)
            raise

    @field_validator("state_dir", mode="before")
    @classmethod
    def _check_state_dir(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty (an empty value would put memctl's state in the current folder); "
                             "give a folder such as ~/.local/state/memctl, or unset it for that default")
        return v

    @field_validator("serve_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p for p in (x.strip() for x in v.split(",")) if p]
        if isinstance(v, list):
            for item in v:
                if not isinstance(item, str) or not re.match(r"^(\*|[a-z][a-z0-9+.-]*://[^\s/]*/?)$", item.strip().lower()):
                    raise ValueError(f"{str(item)[:80]!r} is not an origin: give scheme://host[:port] "
                                     "(e.g. http://localhost:3000), a scheme such as vscode-file://, or *")
        return v

    @field_validator("nvml_module")
    @classmethod
    def _check_nvml_module(cls, v: str) -> str:
        if v != DEFAULT_NVML_MODULE and not test_seams_enabled():
            raise ValueError(f"is a test-only seam, not a user setting (only {DEFAULT_NVML_MODULE!r} is allowed): "
                             "unset MEMCTL_NVML_MODULE and remove nvml_module from the config file")
        return v

    @field_validator("bind_address")
    @classmethod
    def _check_bind(cls, v: str) -> str:
        import ipaddress

        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError("must be an IP address such as 127.0.0.1") from exc
        return v

    @model_validator(mode="after")
    def _check_thresholds(self) -> Settings:
        import ipaddress

        if not ipaddress.ip_address(self.bind_address).is_loopback and not self.allow_non_loopback_bind:
            raise ValueError(
                f"bind_address {self.bind_address} is not a loopback address: model servers' APIs would be reachable "
                "from the network; set allow_non_loopback_bind = true (MEMCTL_ALLOW_NON_LOOPBACK_BIND=true) "
                "to allow it"
            )
        if self.yellow_min_gib > self.green_min_gib:
            raise ValueError(
                f"yellow_min_gib ({self.yellow_min_gib}) must not exceed green_min_gib "
                f"({self.green_min_gib})"
            )
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"profiles: names must be unique, got {names}")
        if not self.profiles:
            raise ValueError("profiles: the recommendation table is empty; give at least one band with "
                             "min_free_gib = 0 whose backend runs on the CPU (see config/defaults.toml)")
        if min(p.min_free_gib for p in self.profiles) != 0:
            raise ValueError("profiles: one band must have min_free_gib = 0 so every value has a band")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        user_file = user_config_file()
        if os.environ.get("MEMCTL_CONFIG_FILE") and not user_file.is_file():
            raise FileNotFoundError(f"MEMCTL_CONFIG_FILE={user_file} does not exist")
        if user_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=user_file))
        sources.append(TomlConfigSettingsSource(settings_cls, toml_file=DEFAULTS_FILE))
        return tuple(sources)

    # ---- derived values
    @property
    def bands(self) -> tuple[ProfileBand, ...]:
        """The recommendation table, largest threshold first."""
        return tuple(
            sorted((p.to_band() for p in self.profiles), key=lambda b: b.min_free_bytes, reverse=True)
        )

    @property
    def green_min_bytes(self) -> int:
        return gib_to_bytes(self.green_min_gib)

    @property
    def yellow_min_bytes(self) -> int:
        return gib_to_bytes(self.yellow_min_gib)

    @property
    def cuda_context_reserve_bytes(self) -> int:
        return gib_to_bytes(self.cuda_context_reserve_gib)

    @property
    def resolved_hf_cache_dir(self) -> Path:
        if self.hf_cache_dir is not None:
            return self.hf_cache_dir.expanduser()
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)


def _describe_option_error(backend_id: str, err: Any) -> str:
    field = ".".join(str(x) for x in err.get("loc", ())) or "options"
    env = f"MEMCTL_{backend_id.upper()}_{field.split('.')[0].upper()}"
    where = env if env in os.environ else f"{env} or [backends.{backend_id}] in the config file"
    value = err.get("input")
    shown = "" if value is None or isinstance(value, dict) else f" = {value!r}"
    return (f"invalid setting backends.{backend_id}.{field} ({backend_id}_{field}, {where}){shown}: "
            f"{str(err.get('msg', 'invalid')).removeprefix('Value error, ')}")


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "settings"
        value = err.get("input")
        if isinstance(value, dict) and loc == "settings":
            value = None
        msg = err.get("msg", "invalid")
        env_name = f"MEMCTL_{loc.split('.')[0].upper()}"
        where = env_name if env_name in os.environ else f"{env_name} or the config file"
        if loc == "settings":  # a check across fields: the message names them
            parts.append("invalid settings: " + msg.removeprefix("Value error, "))
            continue
        shown = "" if value is None else f" = {value!r}"
        parts.append(f"invalid setting {loc} ({where}){shown}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


def _check_nesting() -> None:
    """JSON in MEMCTL_* values and the user TOML file are parsed by recursive parsers: refuse a value
    nested too deep before they see it (a RecursionError would be a traceback)."""
    for key, value in os.environ.items():
        if key.upper().startswith("MEMCTL_") and value.lstrip()[:1] in ("[", "{"):
            try:
                loads_bounded(value, what="its JSON value", max_bytes=1 << 20)
            except CorruptDataError as exc:
                if "nested deeper" in exc.message or "over the" in exc.message:
                    raise SettingsError(f"invalid setting {key}: {exc.message}", "give a plain JSON list or map") from None
    user_file = user_config_file()
    try:
        text = user_file.read_text(encoding="utf-8", errors="replace") if user_file.is_file() else ""
    except OSError:
        return  # the TOML source reports it
    if not _depth_ok(text.replace("{", "[").replace("}", "]"), 64):
        raise SettingsError(f"could not read settings: {user_file} is nested deeper than 64 levels",
                            f"check {user_file} is a plain memctl config")


def load_settings(**overrides: Any) -> Settings:
    """Read settings; raise :class:`SettingsError` with field, value and what is allowed."""
    try:
        _check_nesting()
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(
            _describe_validation_error(exc),
            "fix the value in the environment or in "
            f"{user_config_file()} (defaults: {DEFAULTS_FILE})",
        ) from None
    except PydanticSettingsError as exc:  # a value that is not valid JSON for a list/dict field
        text = str(exc)
        match = re.search(r'field "([^"]+)"', text)
        fld = match.group(1) if match else None
        if fld is not None:
            value = os.environ.get(f"MEMCTL_{fld.upper()}")
            shown = f" = {value!r}" if value is not None else ""
            raise SettingsError(
                f"invalid setting {fld} (MEMCTL_{fld.upper()}){shown}: must be JSON, "
                f"e.g. MEMCTL_{fld.upper()}='[\"/models/a\", \"/models/b\"]' for a list",
                "fix the value in the environment or in the config file",
            ) from None
        raise SettingsError(f"could not read settings: {text}", "check the MEMCTL_* environment variables") from None
    except FileNotFoundError as exc:
        raise SettingsError(str(exc), "point MEMCTL_CONFIG_FILE at an existing TOML file, or unset it") from None
    except (OSError, ValueError) as exc:  # unreadable/broken TOML
        raise SettingsError(
            f"could not read settings: {exc}",
            f"check {user_config_file()} is valid TOML",
        ) from None


def _backend_option_variables() -> set[str]:
    """``MEMCTL_<ID>_<OPTION>`` for every option of every backend the config files name."""
    import tomllib

    names: set[str] = set()
    for path in (DEFAULTS_FILE, user_config_file()):
        try:
            tables = tomllib.loads(path.read_text(encoding="utf-8")).get("backends", {}) if path.is_file() else {}
        except (OSError, ValueError):
            continue
        for bid, cfg in tables.items() if isinstance(tables, dict) else ():
            factory = cfg if isinstance(cfg, str) else cfg.get("factory") if isinstance(cfg, dict) else None
            model = _options_model(factory) if isinstance(factory, str) else None
            if model is not None:
                names |= {f"MEMCTL_{bid.upper()}_{f.upper()}" for f in model.model_fields}
                names |= {f"MEMCTL_{k.upper()}" for k in _option_aliases(factory)}
    return names


def settings_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """``MEMCTL_*`` variables in the environment that no setting reads (a typo is otherwise silently
    ignored), each with the closest real name ("did you mean ..."). Empty when all is well.

    The CLI prints these to stderr and the dashboard shows them; they never stop memctl.
    """
    env = os.environ if environ is None else environ
    known = ({f"MEMCTL_{name.upper()}" for name in Settings.model_fields} | NON_SETTING_VARIABLES
             | _backend_option_variables())
    out = []
    for key in sorted(env):
        upper = key.upper()
        if not upper.startswith("MEMCTL_") or upper in known:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "no memctl setting has this name"
        out.append(f"{key} is not a memctl setting and is ignored — {hint}")
    return out
