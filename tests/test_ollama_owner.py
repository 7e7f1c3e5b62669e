"""``memctl ollama fit --apply`` beside a running owner (``memctl serve``): the owner plans and loads the derived
tag, as every entry point acts through the owner; the CLI process only reads Ollama's own facts. The owner
and the CLI are real processes; Ollama is the stand-in (tests/fake_ollama.py), on the CPU (no GPU here)."""

from __future__ import annotations

import json

from memory_controller.settings import load_settings
from server.connect import connect
from tests.fake_ollama import FakeOllama, write_gguf
from tests.test_controller_api import _memctl
from tests.test_ollama_serving import SMALL
from tests.test_owner import start_owner, stop, wait_published

MODEL = "qwen-coder:small"


def test_fit_apply_with_an_owner_running_loads_through_the_owner(tmp_path, monkeypatch):
    models = tmp_path / "models"
    with FakeOllama(models_dir=models, gpu=None, unload_delay_s=0.05, memory_delay_s=0.05) as fake:
        fake.install(MODEL, write_gguf(tmp_path / "a.gguf", **SMALL))
        env = {"MEMCTL_OLLAMA_HOST": fake.host, "OLLAMA_MODELS": str(models), "MEMCTL_NVML_MODULE": "tests.fake_pynvml",
               "MEMCTL_FAKE_NVML": "library_missing", "MEMCTL_DOCKER_HOST": "unix:///nonexistent.sock"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        owner = start_owner(tmp_path, **env)
        try:
            info = wait_published(load_settings(), owner)
            fit = _memctl(tmp_path, "ollama", "fit", MODEL, "--apply", "--json", env=env)
            assert fit.returncode == 0, fit.stderr
            applied = json.loads(fit.stdout)["applied"]
            assert applied["derived_tag"].startswith(f"{MODEL}-memctl-") and applied["num_ctx"] >= 2048
            assert [m["name"] for m in fake._ps()[1]["models"]] == [applied["derived_tag"]]
            with connect(load_settings()) as client:
                assert client.owner.pid == info.pid
                applies = [op for op in client.operations(10) if op.kind == "apply"]
                assert [op.params.get("backend") for op in applies] == ["ollama"]  # the owner loaded it ...
                assert [(d.backend_id, d.handle) for d in client.deployments()] == [
                    ("ollama", applied["derived_tag"])]  # ... and lists it as its deployment
        finally:
            stop(owner)
