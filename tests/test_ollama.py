"""The Ollama client and `memctl ollama ps/unload` against a stand-in Ollama server whose unload frees
memory in the fake NVML (the real Ollama cannot be installed here)."""

from __future__ import annotations

import argparse
import json
import socket
import time
from types import SimpleNamespace

import pytest

from backends.ollama import (
    InvalidOllamaNameError,
    OllamaClient,
    OllamaError,
    OllamaMalformedError,
    OllamaRefusedError,
    OllamaTimeoutError,
    OllamaUnavailableError,
    client_for,
    parse_host,
    validate_model_name,
)
from memctl_cli.ollama import add_commands
from memory_controller.errors import CorruptDataError, SettingsError
from memory_controller.probe import DeviceProbe
from memory_controller.settings import load_settings
from memory_controller.types import Outcome
from tests.fake_ollama import FakeOllama, FakeOllamaModel
from tests.fake_pynvml import FakeGpu, FakeNvml

GIB = 1024**3


@pytest.fixture
def gpu_setup():
    gpu = FakeGpu(total_bytes=24 * GIB, used_bytes=1 * GIB)
    nvml = FakeNvml([gpu])
    probe = DeviceProbe(nvml.module())
    fake = FakeOllama([FakeOllamaModel("gpt-oss:20b", int(13.1 * GIB), gpu=gpu, runner_pid=4242),
                       FakeOllamaModel("codellama:7b", int(4.5 * GIB), gpu=gpu, runner_pid=4343)])
    with fake:
        settings = load_settings(ollama_host=fake.host)
        yield SimpleNamespace(gpu=gpu, probe=probe, fake=fake, settings=settings,
                              client=client_for(settings, probe), ctl=SimpleNamespace(settings=settings, probe=probe))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- reading
def test_ps_lists_loaded_models_with_sizes_largest_first(gpu_setup):
    models = gpu_setup.client.ps()
    assert [m.name for m in models] == ["gpt-oss:20b", "codellama:7b"]
    assert models[0].size_vram == int(13.1 * GIB) and models[0].size == int(13.1 * GIB)
    assert models[0].context_length == 8192
    # nanosecond RFC 3339 time from Go is understood
    assert models[0].expires_in_s(now=0) > 1.7e9


def test_version_is_read(gpu_setup):
    assert gpu_setup.client.version() == "0.13.0"


# --------------------------------------------------------------------------- unloading
def test_unload_waits_until_the_memory_is_back_on_nvml(gpu_setup):
    g, fake = gpu_setup.gpu, gpu_setup.fake
    used_before = g.used_bytes
    report = gpu_setup.client.unload("gpt-oss:20b", wait_s=5)
    assert report.outcome is Outcome.SUCCESS, report.message.text
    assert report.gone and report.freed_bytes >= 0.75 * int(13.1 * GIB)
    # the client returned only once the runner's memory was back (memory_delay_s = 0.6 s)
    assert g.used_bytes == used_before - int(13.1 * GIB)
    assert report.waited_s >= fake.memory_delay_s - 0.05
    assert [m.name for m in gpu_setup.client.ps()] == ["codellama:7b"]
    posts = [r for r in fake.requests if r[0] == "POST"]
    assert posts == [("POST", "/api/generate", {"model": "gpt-oss:20b", "keep_alive": 0, "stream": False})]


def test_unload_of_a_model_not_loaded_sends_nothing_that_could_load_it(gpu_setup):
    report = gpu_setup.client.unload("mistral:7b", wait_s=1)
    assert report.already_gone and report.outcome is Outcome.SUCCESS
    assert not [r for r in gpu_setup.fake.requests if r[0] == "POST"]


def test_unload_accepts_a_name_without_its_latest_tag(gpu_setup):
    gpu_setup.fake.models.append(FakeOllamaModel("qwen2.5-coder:latest", GIB))
    client = OllamaClient(parse_host(gpu_setup.fake.host))  # no NVML reader: the model holds no fake GPU
    report = client.unload("qwen2.5-coder", wait_s=2)
    assert report.outcome is Outcome.SUCCESS and report.name == "qwen2.5-coder:latest"


def test_unload_that_ollama_never_carries_out_is_an_error_after_the_wait(gpu_setup):
    gpu_setup.fake.fail["unload"] = "keep"
    t0 = time.monotonic()
    report = gpu_setup.client.unload("codellama:7b", wait_s=0.8)
    assert report.outcome is Outcome.ERROR and not report.gone
    assert report.message.code == "ollama.unload.still_loaded"
    assert time.monotonic() - t0 >= 0.7  # it waited for the unload (how fast it gives up is not asserted)


def test_unload_whose_memory_comes_back_late_is_a_warning(gpu_setup):
    gpu_setup.fake.memory_delay_s = 10
    report = gpu_setup.client.unload("codellama:7b", wait_s=1.0)
    assert report.gone and report.outcome is Outcome.WARNING
    assert report.freed_bytes == 0 and "came back" in report.message.text


def test_unload_all_goes_on_past_a_refusal(gpu_setup):
    gpu_setup.fake.fail["/api/generate"] = "refuse"
    reports = gpu_setup.client.unload_all(wait_s=0.5)
    assert [r.outcome for r in reports] == [Outcome.ERROR, Outcome.ERROR]
    assert "llama runner process has terminated" in reports[0].message.text


# --------------------------------------------------------------------------- Ollama misbehaving
def test_ollama_down_is_a_clear_error_at_once():
    client = OllamaClient(f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(OllamaUnavailableError) as err:
        client.ps()
    assert "does not answer" in err.value.message and "ollama serve" in err.value.hint


def test_ollama_slow_times_out_quickly(gpu_setup):
    gpu_setup.fake.fail["/api/ps"] = "slow"
    client = OllamaClient(parse_host(gpu_setup.fake.host), timeout_s=0.5)
    with pytest.raises(OllamaTimeoutError) as err:  # the fake answers far later than 0.5 s
        client.ps()
    assert "within 0.5 s" in err.value.message


def test_ollama_refusing_the_unload_says_what_ollama_said(gpu_setup):
    gpu_setup.fake.fail["/api/generate"] = "refuse"
    with pytest.raises(OllamaRefusedError) as err:
        gpu_setup.client.unload("gpt-oss:20b", wait_s=1)
    assert err.value.status == 500 and "llama runner process has terminated" in err.value.message
    assert gpu_setup.gpu.used_bytes > 17 * GIB  # nothing was freed


@pytest.mark.parametrize("mode", ["malformed", "huge"])
def test_malformed_answers_are_corrupt_data(gpu_setup, mode):
    gpu_setup.fake.fail["/api/ps"] = mode
    with pytest.raises(OllamaMalformedError) as err:
        gpu_setup.client.ps()
    assert isinstance(err.value, CorruptDataError)


@pytest.mark.parametrize("doc", [[], {"models": "x"}, {"models": [{"size": 1}]},
                                 {"models": [{"name": "a", "size_vram": -1}]},
                                 {"models": [{"name": "a", "size_vram": True}]}])
def test_ps_documents_of_the_wrong_shape_are_refused(doc):
    from backends.ollama.client import parse_ps

    with pytest.raises(OllamaMalformedError):
        parse_ps(doc)


def test_control_characters_in_names_from_ollama_are_escaped():
    from backends.ollama.client import parse_ps

    (m,) = parse_ps({"models": [{"name": "evil\x1b[2J:7b", "size": 1, "size_vram": 1}]})
    assert "\x1b" not in m.name and "\\x1b" in m.name


# --------------------------------------------------------------------------- names and hosts
@pytest.mark.parametrize("name", ["gpt-oss:20b", "codellama:7b", "llama3", "library/llama3:8b",
                                  "hf.co/bartowski/Qwen2.5-Coder-7B-GGUF:Q4_K_M", "localhost:5000/me/m:v1"])
def test_valid_model_names_pass(name):
    assert validate_model_name(name) == name


@pytest.mark.parametrize("name", ["", " ", "../x", "a/../b", "-rf", "a b", "a;b", "x:", ":7b", "a:b:c:d",
                                  "m\n", "a" * 400, "/abs"])
def test_bad_model_names_are_refused_before_ollama_is_asked(name):
    with pytest.raises(InvalidOllamaNameError):
        validate_model_name(name)


@pytest.mark.parametrize(("value", "url"), [
    ("", "http://127.0.0.1:11434"), ("127.0.0.1:11434", "http://127.0.0.1:11434"),
    ("0.0.0.0", "http://127.0.0.1:11434"), (":8080", "http://127.0.0.1:8080"),
    ("http://box:11434", "http://box:11434"), ("https://ollama.example", "https://ollama.example:443"),
    ("http://localhost", "http://localhost:80"), ("[::1]:11434", "http://[::1]:11434"),
])
def test_ollama_host_forms(value, url):
    assert parse_host(value) == url


@pytest.mark.parametrize("value", ["ftp://x", "host:99999", "host:abc", "http://a b:1"])
def test_bad_ollama_host_is_a_settings_error(value):
    with pytest.raises(SettingsError):
        parse_host(value)


def test_remote_ollama_does_not_wait_for_local_nvml(gpu_setup):
    client = client_for(load_settings(ollama_host="http://gpu-box.example:11434"), gpu_setup.probe)
    assert client._free_bytes is None


# --------------------------------------------------------------------------- the CLI handlers
def _run(ctl, argv, capsys):
    parser = argparse.ArgumentParser(prog="memctl")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args, ctl)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_ps_table_and_json(gpu_setup, capsys):
    code, out, _ = _run(gpu_setup.ctl, ["ollama", "ps"], capsys)
    assert code == 0 and "gpt-oss:20b" in out and "13.10 GiB" in out and "UNLOADS IN" in out
    code, out, _ = _run(gpu_setup.ctl, ["ollama", "ps", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["models"][1]["name"] == "codellama:7b"
    assert data["models"][0]["size_vram"] == int(13.1 * GIB)


def test_cli_unload_frees_and_exits_0(gpu_setup, capsys):
    code, out, _ = _run(gpu_setup.ctl, ["ollama", "unload", "codellama:7b"], capsys)
    assert code == 0 and "codellama:7b unloaded from Ollama" in out
    assert [m.name for m in gpu_setup.client.ps()] == ["gpt-oss:20b"]


@pytest.mark.usefixtures("english_cli")  # asserts the CLI's English text
def test_cli_bad_name_exits_2_and_ollama_down_exits_1(gpu_setup, capsys):
    code, _, err = _run(gpu_setup.ctl, ["ollama", "unload", "../etc"], capsys)
    assert code == 2 and "not an Ollama model name" in err
    assert not [r for r in gpu_setup.fake.requests if r[0] == "POST"]
    down = SimpleNamespace(settings=load_settings(ollama_host=f"127.0.0.1:{_free_port()}"), probe=None)
    code, out, err = _run(down, ["ollama", "ps", "--json"], capsys)
    assert code == 1 and json.loads(out)["code"] == "ollama.down" and "hint:" in err


def test_loaded_never_raises_caches_and_remembers_why(gpu_setup):
    client = gpu_setup.client
    assert [m.name for m in client.loaded()] == ["gpt-oss:20b", "codellama:7b"]
    asked = len(gpu_setup.fake.requests)
    client.loaded()
    assert len(gpu_setup.fake.requests) == asked  # answered from the cache
    down = OllamaClient(f"http://127.0.0.1:{_free_port()}")
    assert down.loaded() is None and isinstance(down.last_error, OllamaUnavailableError)


def test_emergency_unload_frees_everything_or_says_what_stayed(gpu_setup):
    summary = gpu_setup.client.emergency_unload(wait_s=5)
    assert "gpt-oss:20b unloaded" in summary and "codellama:7b unloaded" in summary
    assert gpu_setup.gpu.used_bytes == GIB and gpu_setup.gpu.processes == []
    assert "had no model loaded" in gpu_setup.client.emergency_unload()
    gpu_setup.fake.models.append(FakeOllamaModel("stuck:1b", GIB))
    gpu_setup.fake.fail["unload"] = "keep"
    with pytest.raises(OllamaError) as err:
        gpu_setup.client.emergency_unload(wait_s=0.5)
    assert "stuck:1b" in err.value.message and err.value.args_ == {"models": ["stuck:1b"]}


@pytest.mark.usefixtures("english_cli")
def test_a_host_that_is_no_address_leaves_ollama_unavailable_with_the_reason_not_gone(capsys):
    """A typo in MEMCTL_OLLAMA_HOST: the backend stays listed (unavailable, saying why), its processes are still
    named as Ollama's with the advice to fix the host, status says it did not answer, and the CLI exits 2."""
    from memory_controller import MemoryController
    from tests.fake_pynvml import FakeProcess
    from tests.test_holders import PROCS

    settings = load_settings(ollama_host="ollama-box:99999")
    gpu = FakeGpu(total_bytes=24 * GIB, used_bytes=14 * GIB, processes=[FakeProcess(13, GIB // 4), FakeProcess(14, 13 * GIB)])
    ctl = MemoryController(settings, probe=DeviceProbe(FakeNvml([gpu]).module()))
    assert "ollama" in ctl.registry.ids()
    avail = ctl.availability("ollama")
    assert not avail.ok and "MEMCTL_OLLAMA_HOST" in avail.reason.text and "99999" in avail.reason.text
    status = ctl.status()["ollama"]
    assert status["answered"] is False and "MEMCTL_OLLAMA_HOST" in status["error"]
    source = ctl.holder_source("ollama")
    assert source is not None and source.loaded() is None and isinstance(source.last_error, SettingsError)
    from memory_controller.holders import OtherHolder, classify

    hs = {h.pid: h for h in classify(ctl.devices(), PROCS, {}, [OtherHolder(source, None)], [], 1000)}
    assert (hs[14].kind, hs[14].freeable_by, hs[14].advice.code) == ("ollama_runner", None, "holder.advice.ollama_down")
    assert hs[13].kind == "ollama_server"
    code, out, err = _run(SimpleNamespace(settings=settings, probe=None), ["ollama", "ps", "--json"], capsys)
    assert code == 2 and "99999" in err
