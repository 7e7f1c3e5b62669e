"""Hostile and broken files in the model cache, against the server on the real Transformers backend (CPU).

One good tiny chat model and, beside it, copies of it with one thing wrong each: files that must never be
opened (a FIFO, links out of the cache, files over their size limit, a snapshot linked elsewhere) and
files that are malformed (corrupt weights, a broken tokenizer or generation config, a template that raises
or loops, an unknown architecture with auto_map, a context of 1e30). Each is listed by ``/v1/models`` as
broken with the reason (never available or does_not_fit), a chat for it is a 400 ``model_not_servable``
naming the file and the fix, ``/v1/models`` answers, no traceback reaches the log, and the good model keeps
serving between them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from memory_controller import safefiles
from tests import model_factory as mf
from tests.test_openai_api import Served, _serve

GOOD = f"{mf.TEST_ORG}/good-chat"
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
LOOP_SILENT = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def _replace(snap: Path, name: str, make: Callable[[Path], None]) -> None:
    p = snap / name
    if p.is_symlink() or p.exists():
        p.unlink()
    make(p)


def _edit_json(snap: Path, name: str, change: Callable[[dict], None]) -> None:
    p = snap / name
    data = json.loads(p.read_text())
    change(data)
    p.unlink()
    p.write_text(json.dumps(data))


def _write(snap: Path, name: str, text: str) -> None:
    _replace(snap, name, lambda p: p.write_text(text))


def _sparse(size: int) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        with open(p, "wb") as fh:
            fh.truncate(size)
    return make


def _outside_dir(snap: Path) -> None:
    """The snapshot folder becomes a link to a copy of itself outside the cache."""
    outside = Path(tempfile.mkdtemp(prefix="memctl-outside-"))
    for f in snap.iterdir():
        shutil.copy2(f, outside / f.name)
    shutil.rmtree(snap)
    snap.symlink_to(outside, target_is_directory=True)


def _config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda snap: _edit_json(snap, "config.json", change)


def _template(text: str) -> Callable[[Path], None]:
    def tamper(snap: Path) -> None:
        _edit_json(snap, "tokenizer_config.json", lambda d: d.update(chat_template=text))
        if (snap / "chat_template.jinja").exists():
            (snap / "chat_template.jinja").unlink()
    return tamper


# name -> (tamper(snapshot), words the reason must hold)
FILE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {  # class 1: never opened
    "fifo-weights": (lambda s: _replace(s, "model.safetensors", lambda p: os.mkfifo(p)), "FIFO"),
    "fifo-template": (lambda s: _replace(s, "chat_template.jinja", lambda p: os.mkfifo(p)), "FIFO"),
    "fifo-generation-config": (lambda s: _replace(s, "generation_config.json", lambda p: os.mkfifo(p)), "FIFO"),
    "tokenizer-passwd": (lambda s: _replace(s, "tokenizer.json", lambda p: p.symlink_to("/etc/passwd")),
                         "links outside"),
    "config-passwd": (lambda s: _replace(s, "config.json", lambda p: p.symlink_to("/etc/passwd")), "links outside"),
    "config-fifo": (lambda s: _replace(s, "config.json", lambda p: os.mkfifo(p)), "FIFO"),
    "weights-dev-zero": (lambda s: _replace(s, "model.safetensors", lambda p: p.symlink_to("/dev/zero")),
                         "links outside"),
    "huge-tokenizer-config": (lambda s: _replace(s, "tokenizer_config.json", _sparse(safefiles.SMALL_FILE_MAX_BYTES
                                                                                      + 1)), "limit"),
    "huge-generation-config": (lambda s: _replace(s, "generation_config.json", _sparse(100 * 1024 * 1024)), "limit"),
    "snapshot-elsewhere": (_outside_dir, "links outside"),
    "dir-link-etc": (lambda s: (s / "extra").symlink_to("/etc", target_is_directory=True), "links outside"),
}
CONTENT_CASES: dict[str, tuple[Callable[[Path], None], str]] = {  # class 10: malformed content
    "corrupt-weights": (lambda s: _replace(s, "model.safetensors", lambda p: p.write_bytes(
        (1 << 40).to_bytes(8, "little") + b"garbage" * 64)), "corrupt"),
    "bad-tokenizer": (lambda s: _write(s, "tokenizer.json", '{"version": "1.0", "model": '), "tokenizer"),
    "tokenizer-no-model": (lambda s: _write(s, "tokenizer.json", '{"version": "1.0"}'), "no tokenizer model"),
    "bad-generation-config": (lambda s: _write(s, "generation_config.json", "{oops"), "generation configuration"),
    "template-raises": (_template("{{ raise_exception('this template is broken') }}"), "this template is broken"),
    "template-loops": (_template(LOOP), "loops"),
    "template-loops-silently": (_template(LOOP_SILENT), "loops"),
    "template-undefined-call": (_template("{{ messages.nothing() }}"), "chat template"),
    "auto-map": (_config(lambda d: d.update(model_type="memctl-evil", architectures=["EvilForCausalLM"],
                                            auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})),
                 "auto_map"),
    "context-1e30": (_config(lambda d: d.update(max_position_embeddings=1e30)), "1e+30"),
    "context-negative": (_config(lambda d: d.update(max_position_embeddings=-5.5)), "plausible"),
}
CASES = {**FILE_CASES, **CONTENT_CASES}
# loops only on a longer chat: passes the check before a load, so the rendering budget at request time stops it
LATER = f"{mf.TEST_ORG}/template-loops-later"
LOOP_LATER = ("{% if messages|length > 1 %}" + LOOP_SILENT + "{% endif %}"
              "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# repeats a long last message 100,000 times (100 GB for a 1 MB message); a short one renders normally
AMPLIFY = f"{mf.TEST_ORG}/template-amplifies"
AMPLIFY_TEMPLATE = ("{% if messages[-1]['content']|length > 1000 %}{% for i in range(100000) %}"
                    "{{ messages[-1]['content'] }}{% endfor %}{% endif %}<|im_start|>user\n{{ messages[-1]['content'] }}"
                    "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def hostile_hub(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("hostile_models")
    hub = root / "hub"
    hub.mkdir()
    built = mf.build_chat_model(root / "src", "qwen", seed=3)
    mf.add_to_hf_cache(built, hub, GOOD, move=False)
    ids = {}
    for name, (tamper, _) in CASES.items():
        model_id = f"{mf.TEST_ORG}/bad-{name}"
        snap = mf.add_to_hf_cache(built, hub, model_id, move=False)
        for f in snap.iterdir():  # private copies of the blobs' links: a tamper touches this model only
            if f.is_symlink():
                data = f.read_bytes()
                f.unlink()
                f.write_bytes(data)
        tamper(snap)
        ids[name] = model_id
    for model_id, template in ((LATER, LOOP_LATER), (AMPLIFY, AMPLIFY_TEMPLATE)):
        snap = mf.add_to_hf_cache(built, hub, model_id, move=False)
        for f in snap.iterdir():
            if f.is_symlink():
                data = f.read_bytes()
                f.unlink()
                f.write_bytes(data)
        _template(template)(snap)
    return hub, ids


@pytest.fixture(scope="module")
def served_hostile(hostile_hub, tmp_path_factory) -> Iterator[Served]:
    from backends.transformers import create
    from memory_controller.settings import load_settings

    hub, _ = hostile_hub
    state = tmp_path_factory.mktemp("state")
    settings = load_settings(hf_cache_dir=hub, local_model_dirs=[]).model_copy(update={
        "state_dir": state, "docker_host": "unix:///nonexistent.sock", "serve_heartbeat_s": 0.2})
    yield from _serve(settings, gpu_total_bytes=None, make_backend=lambda s, ledger: create(s, None))


def _good_chat(served: Served) -> None:
    r = served.client.chat.completions.create(model=GOOD, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_every_hostile_model_is_listed_as_broken_with_its_reason(served_hostile, hostile_hub, caplog):
    _, ids = hostile_hub
    with caplog.at_level(logging.INFO):
        r = httpx.get(served_hostile.base_url + "/models", timeout=120)
    assert r.status_code == 200
    listed = {m["id"]: m for m in r.json()["data"]}
    assert listed[GOOD]["memctl"]["state"] == "available"
    shown = 0
    for name, model_id in ids.items():
        entry = listed[model_id]
        assert entry["memctl"]["state"] == "broken", (name, entry)
        assert CASES[name][1] in entry["memctl"]["problem"], (name, entry["memctl"]["problem"])
        assert entry["memctl"]["fits"] is False and entry["max_model_len"] is None
        shown += 1
    assert shown == len(CASES)
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("name", list(CASES))
def test_a_chat_for_a_hostile_model_is_a_400_naming_the_cause(served_hostile, hostile_hub, caplog, name):
    _, ids = hostile_hub
    with caplog.at_level(logging.INFO):
        r = httpx.post(served_hostile.base_url + "/chat/completions", timeout=120, json={
            "model": ids[name], "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert r.status_code == 400, (name, r.text[:400])
    err = r.json()["error"]
    assert err["code"] == "model_not_servable", (name, err)
    assert CASES[name][1] in err["message"], (name, err["message"])
    assert "clear memory" not in err["message"] and "unload and load" not in err["message"]
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text
    _good_chat(served_hostile)  # the good model keeps serving
    assert [d.model_id for d in served_hostile.ctl.deployments()] == [GOOD]  # nothing half-loaded


def test_the_file_check_as_a_function(tmp_path):
    root = tmp_path / "models--a--b"
    snap = root / "snapshots" / "x"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    safefiles.check_model_dir(snap)  # fine
    os.mkfifo(snap / "model.safetensors")
    with pytest.raises(safefiles.BadModelFileError, match="FIFO"):
        safefiles.check_model_dir(snap)
    with pytest.raises(safefiles.BadModelFileError, match="FIFO"):
        safefiles.open_checked(snap / "model.safetensors")  # refused without blocking
    (snap / "model.safetensors").unlink()
    (snap / "vocab.json").symlink_to(root / ".." / ".." / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    with pytest.raises(safefiles.BadModelFileError, match="links outside"):
        safefiles.check_model_dir(snap)


BIG = "x" * (1024 * 1024)


@pytest.mark.parametrize("model_id,messages,words", [
    (LATER, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
             {"role": "user", "content": "again"}], "loops"),
    (AMPLIFY, [{"role": "user", "content": BIG}], "read more than"),
])
def test_a_template_that_runs_away_at_request_time_is_stopped_and_others_keep_serving(served_hostile, caplog,
                                                                                       model_id, messages, words):
    """The template passes the one-message check and loads, then runs away on this request (loops, or blows up
    its output): the rendering is stopped by its budget on the generation thread (never on the event loop: the
    server answers meanwhile), the request is a 400 naming the template, and the good model serves next."""
    import threading

    url = served_hostile.base_url
    ok = httpx.post(url + "/chat/completions", timeout=120, json={
        "model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    answer: dict = {}

    def running_away() -> None:
        answer["r"] = httpx.post(url + "/chat/completions", timeout=120, json={
            "model": model_id, "max_tokens": 2, "messages": messages})

    with caplog.at_level(logging.INFO):
        t = threading.Thread(target=running_away)
        t.start()
        for _ in range(3):  # the event loop answers while the template runs
            assert httpx.get(url + "/models", timeout=60).status_code == 200
        t.join(120)
    r = answer["r"]
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_servable" and "chat template" in err["message"] and words in err["message"]
    assert "Traceback" not in caplog.text
    _good_chat(served_hostile)
