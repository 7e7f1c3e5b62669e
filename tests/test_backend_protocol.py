"""The core calls its backends only through the declared :class:`Backend` protocol: no ``getattr``/``hasattr``
probing for members the protocol does not declare (issue 17, item 5).

The check reads every ``getattr(x, ...)`` / ``hasattr(x, ...)`` in ``memory_controller/`` (the AST, not the
text): a literal name must be one of the known non-backend uses below, never a member of the protocol (a
declared member is called directly); a computed name is allowed only at the few sites listed below (none of
which is given a backend).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from memory_controller.backend import Backend, BackendBase, InProcessGenerator
from memory_controller.catalog import Catalog, scan_models
from memory_controller.errors import ModelNotFoundError
from tests.fixtures_models import TINY_ID

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "memory_controller"

# Literal names the core may read with getattr/hasattr: none is read from a backend.
ALLOWED = {
    "code": "i18n / maintenance: a Message's or an exception's code",
    "text": "i18n: a Message's text",
    "args": "i18n: a Message's arguments",
    "args_": "maintenance: a MemctlError's arguments",
    "strerror": "catalog: an OSError's text",
    "O_CLOEXEC": "safefiles: os flag absent on some platforms",
    "nvmlDeviceGetGraphicsRunningProcesses": "probe: an NVML binding's optional call",
    "usedGpuMemory": "probe: an NVML process record's field",
    "OPTIONS_MODEL": "settings: a backend package's options model (read before any backend is built)",
    "OPTION_ALIASES": "settings: a backend package's old option names",
    "reason": "scheduler: a pause's / slot's reason",
    "result": "scheduler: a finished operation's result",
    "error": "scheduler: a finished operation's error",
    "kind": "planning: a plan step's kind",
    "backend_id": "serving: a plan's backend id",
}

# Computed names (getattr(obj, variable)), by file and the object read: none is a backend.
DYNAMIC_ALLOWED = {
    ("memory_controller/__init__.py", "controller"),  # lazy re-export of the controller module
    ("memory_controller/controller.py", "self.serving"),  # the facade re-exports Serving's calls
    ("memory_controller/holders.py", "obj"),  # a holder record, mapping or object
    ("memory_controller/registry.py", "importlib.import_module(module_name)"),  # the configured factory
    ("memory_controller/settings.py", "opts"),  # a backend's options model (old flat names)
    ("memory_controller/settings.py", "type(opts)"),
    ("memory_controller/types.py", "value"),  # dataclass fields to JSON
}


def protocol_members() -> set[str]:
    """Every member the backend protocols declare (methods, properties, attributes)."""
    out: set[str] = set()
    for proto in (Backend, InProcessGenerator):
        out |= {n for n in vars(proto) if not n.startswith("_")}
        out |= set(getattr(proto, "__annotations__", {}))
    return out


def probes(source: str, filename: str) -> list[tuple[int, str, str | None]]:
    """``(line, object expression, literal name or None)`` for each getattr/hasattr call in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2):
            name = node.args[1]
            literal = name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else None
            out.append((node.lineno, ast.unparse(node.args[0]), literal))
    return out


def violations(source: str, rel: str, members: set[str]) -> list[str]:
    bad = []
    for line, obj, name in probes(source, rel):
        where = f"{rel}:{line}: getattr/hasattr({obj}, {name!r})"
        if name is None:
            if (rel, obj) not in DYNAMIC_ALLOWED:
                bad.append(f"{where}: a computed name (declare what a backend offers in Backend and call it)")
        elif name in members:
            bad.append(f"{where}: {name} is declared by the Backend protocol: call it directly")
        elif name not in members and name not in ALLOWED:
            bad.append(f"{where}: {name} is not in the Backend protocol (declare it, with a BackendBase default)"
                       " or, when the object is no backend, add it to ALLOWED with the reason")
    return bad


def core_files() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted(CORE.rglob("*.py"))]


def test_the_core_never_probes_a_backend_for_undeclared_members():
    members = protocol_members()
    bad = [v for rel, src in core_files() for v in violations(src, rel, members)]
    assert bad == [], "\n".join(bad)


def test_allowed_names_are_not_protocol_members():
    assert set(ALLOWED).isdisjoint(protocol_members())


@pytest.mark.parametrize(("source", "reason"), [
    ('lister = getattr(b, "list_models", None)\n', "declared by the Backend protocol"),
    ('ok = hasattr(self.fleet.backend(bid), "resolve_model")\n', "declared by the Backend protocol"),
    ('fn = getattr(b, "warm_up", None)\n', "not in the Backend protocol"),
    ('fn = getattr(b, name, None)\n', "a computed name"),
])
def test_the_check_catches_a_probe(source, reason):
    out = violations(source, "memory_controller/serving.py", protocol_members())
    assert len(out) == 1 and reason in out[0]


def test_the_optional_members_are_declared():
    members = protocol_members()
    for name in ("list_models", "resolve_model", "supports_tools", "tool_support", "count_prompt_tokens",
                 "holder_client", "list_managed", "containers_for_pids", "start_timeout_s", "stop_timeout_s"):
        assert name in members, name
        assert name in vars(BackendBase), f"BackendBase gives no default for {name}"


class _Bare(BackendBase):
    """A backend that offers none of the optional parts (only what the protocol requires)."""

    id = "bare"
    capabilities = None  # not read here

    def deployments(self):
        return []


def test_a_backend_with_only_the_defaults_offers_nothing_optional(hf_settings):
    b = _Bare()
    assert (b.list_models(), b.resolve_model("x"), b.supports_tools(None), b.tool_support(None),
            b.count_prompt_tokens(None, None), b.holder_client, b.list_managed(),
            b.containers_for_pids([1]), b.start_timeout_s, b.stop_timeout_s) == ([], None, None, None,
                                                                                  None, None, [], {}, None, 0.0)
    catalog = Catalog(hf_settings, lambda: {"bare": b})  # the catalog calls list_models/resolve_model directly
    assert catalog.models().models == scan_models(hf_settings).models
    assert catalog.resolve(TINY_ID).model_id == TINY_ID
    with pytest.raises(ModelNotFoundError):
        catalog.resolve("memctl-test/absent")


BACKEND_FILES = sorted({"tests/inmemory_backend.py", *(str(p.relative_to(ROOT)) for p in (ROOT / "backends").rglob("*.py")
                                                          if "def claim(" in p.read_text())})


def test_the_backend_files_are_found():
    assert {"backends/ollama/backend.py", "backends/transformers/backend.py", "backends/vllm/backend.py"} <= set(BACKEND_FILES)


@pytest.mark.parametrize("path", BACKEND_FILES)
def test_every_backend_class_inherits_the_defaults(path):
    """A backend class (one with ``capabilities`` and ``claim``) inherits BackendBase, so each optional member
    the core calls directly exists."""
    tree = ast.parse((ROOT / path).read_text())
    classes = [c for c in tree.body if isinstance(c, ast.ClassDef)
               and any(isinstance(f, ast.FunctionDef) and f.name == "claim" for f in c.body)]
    assert classes, path
    for c in classes:
        assert any(ast.unparse(base) == "BackendBase" for base in c.bases), f"{path}: {c.name}"


def test_every_allowlist_entry_is_still_used():
    """An allowlist entry no core probe uses any more would let a backend probe by that name pass unseen."""
    used = {name for rel, src in core_files() for _line, _obj, name in probes(src, rel)}
    assert sorted(set(ALLOWED) - used) == []


def test_the_registry_refuses_a_backend_without_the_defaults(hf_settings, monkeypatch):
    """A backend class that does not inherit BackendBase is refused with the fix, not met later as an
    AttributeError in the catalog, the census or admission; the other backends still work."""
    import sys
    import types

    from memory_controller.errors import SettingsError
    from memory_controller.registry import BackendRegistry

    module = types.ModuleType("memctl_test_plain_backend")

    class Plain:  # the protocol's required members only
        id = "plain"

    module.create = lambda settings, probe: Plain()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    reg = BackendRegistry({"plain": f"{module.__name__}:create", "bare": "tests.test_backend_protocol:_bare"},
                          hf_settings, None)
    with pytest.raises(SettingsError, match="BackendBase"):
        reg.get("plain")
    assert list(reg.all()) == ["bare"] and "BackendBase" in reg.errors["plain"]
    with pytest.raises(SettingsError, match="BackendBase"):
        BackendRegistry({}, hf_settings, None, instances={"plain": Plain()})


def _bare(settings, probe):
    return _Bare()
