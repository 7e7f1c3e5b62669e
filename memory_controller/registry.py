"""The registry of backends: ids from settings (``[backends.<id>]`` in config/defaults.toml), built on first use.

The core never imports a backend module by name in code: the registry imports the factory named
in config (``factory = "package.module:create"``) and calls ``factory(settings, probe)``. Adding a backend is
one module and one config line; tests add theirs by passing ready instances.
"""

from __future__ import annotations

import importlib
import re
import threading
from typing import Any

from .backend import Backend, BackendBase
from .errors import SettingsError

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class BackendRegistry:
    def __init__(self, specs: dict[str, str], settings: Any, probe: Any,
                 instances: dict[str, Backend] | None = None) -> None:
        for bid, spec in specs.items():
            if not _SPEC.match(spec):
                raise SettingsError(f"invalid setting backends.{bid} = {spec!r}: expected 'package.module:factory'",
                                    "fix [backends] in the config file")
        self._specs = dict(specs)
        self._settings = settings
        self._probe = probe
        self._lock = threading.Lock()
        self._made: dict[str, Backend] = dict(instances or {})
        for bid, b in self._made.items():
            if not isinstance(b, BackendBase):
                raise SettingsError(f"backend {bid!r} is a {type(b).__name__}, which does not inherit BackendBase",
                                    "make the backend class inherit memory_controller.backend.BackendBase",
                                    code="backend.import_failed", args={"backend": bid})
        self._errors: dict[str, str] = {}
        # ids in a stable order: configured ones first, then extra instances
        self._ids = list(self._specs) + [i for i in self._made if i not in self._specs]

    def ids(self) -> list[str]:
        return list(self._ids)

    def get(self, backend_id: str) -> Backend:
        """The backend for ``backend_id``; raises SettingsError for an unknown id or a broken module."""
        with self._lock:
            if backend_id in self._made:
                return self._made[backend_id]
            spec = self._specs.get(backend_id)
            if spec is None:
                raise SettingsError(f"unknown backend {backend_id!r}; known: {', '.join(self._ids) or 'none'}",
                                    "choose one of the known backends", code="backend.unknown",
                                    args={"backend": backend_id})
            module_name, _, attr = spec.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
                backend = factory(self._settings, self._probe)
            except Exception as exc:  # noqa: BLE001 - a broken backend module must not break the others
                raise SettingsError(f"backend {backend_id!r} ({spec}) cannot be built: {exc}",
                                    "install its packages, or remove it from [backends]",
                                    code="backend.import_failed", args={"backend": backend_id}) from None
            if not isinstance(backend, BackendBase):
                raise SettingsError(
                    f"backend {backend_id!r} ({spec}) built a {type(backend).__name__}, which does not inherit "
                    "memory_controller.backend.BackendBase (the defaults of the protocol's optional members)",
                    "make the backend class inherit BackendBase, or remove it from [backends]",
                    code="backend.import_failed", args={"backend": backend_id})
            self._made[backend_id] = backend
            return backend

    def made(self) -> dict[str, Backend]:
        """Backends built so far (no import happens here)."""
        with self._lock:
            return dict(self._made)

    def all(self) -> dict[str, Backend]:
        """Every backend that can be built; one whose module fails to import is left out (see ``errors``)."""
        out: dict[str, Backend] = {}
        for bid in self._ids:
            try:
                out[bid] = self.get(bid)
            except SettingsError as exc:
                self._errors[bid] = exc.message
        return out

    @property
    def errors(self) -> dict[str, str]:
        return dict(self._errors)
