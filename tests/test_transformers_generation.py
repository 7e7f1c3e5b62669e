"""Generation for serving on real tiny chat models (Qwen-, Llama-3- and Mistral-style templates):
streaming, stop strings, max tokens, cancellation, serialisation, tools in the prompt, model family."""

from __future__ import annotations

import threading
import time

import pytest

from backends.transformers import TransformersBackend
from backends.transformers.generation import template_messages
from memory_controller.backend import GenerationRequest
from memory_controller.catalog import resolve_model
from memory_controller.errors import MemctlError
from memory_controller.types import Precision, Profile
from tests.fixtures_models import TINY_ID

PROFILE = Profile("transformers", Precision.FP32, 512, 1, device="cpu")
TOOLS = ({"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the workspace",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},)
CHAT = ({"role": "user", "content": "Hello! How can I help you today?"},)


def NEVER() -> bool:  # noqa: N802 - a constant-like callable
    return False


@pytest.fixture(scope="module")
def chat_backend(chat_settings, chat_models):
    be = TransformersBackend(chat_settings)
    deps = {f: be.start(resolve_model(chat_models[f], chat_settings), PROFILE, None)
            for f in ("qwen", "llama3", "mistral")}
    yield be, deps
    be.stop_all()


def _run(be, dep, request, cancel=NEVER):
    chunks = list(be.generate_stream(dep, request, cancel))
    return "".join(c.text for c in chunks), chunks


def _plain_greedy(be, dep, request) -> tuple[str, list[int]]:
    """The same prompt through model.generate directly: what streaming must reproduce."""
    import torch

    entry = be._entries[dep.handle]
    tok = be._tokenizer(entry)
    ids = torch.tensor([tok(tok.apply_chat_template(list(request.messages), add_generation_prompt=True,
                                                    tokenize=False), add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = entry.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=request.max_new_tokens, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), new


@pytest.mark.parametrize("family", ["qwen", "llama3", "mistral"])
def test_streamed_text_equals_the_plain_greedy_text(chat_backend, family):
    be, deps = chat_backend
    request = GenerationRequest(messages=CHAT, max_new_tokens=24, temperature=0.0)
    text, chunks = _run(be, deps[family], request)
    expected, new_ids = _plain_greedy(be, deps[family], request)
    assert text == expected and text
    assert len([c for c in chunks if c.text]) > 1  # it really streamed, piece by piece
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length") and all(c.finish_reason is None for c in chunks[:-1])
    assert last.completion_tokens == len(new_ids)
    assert last.prompt_tokens == be.prompt_tokens(deps[family], request)


def test_max_tokens_ends_with_length_and_counts(chat_backend):
    be, deps = chat_backend
    _full, new_ids = _plain_greedy(be, deps["qwen"], GenerationRequest(messages=CHAT, max_new_tokens=12, temperature=0.0))
    eos = be._tokenizer(be._entries[deps["qwen"].handle]).eos_token_id
    assert eos not in new_ids[:5]  # the model does not end by itself within 5 tokens
    _text, chunks = _run(be, deps["qwen"], GenerationRequest(messages=CHAT, max_new_tokens=5, temperature=0.0))
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("length", 5)


def test_a_stop_string_cuts_the_text_there(chat_backend):
    be, deps = chat_backend
    full, _ids = _run(be, deps["qwen"], GenerationRequest(messages=CHAT, max_new_tokens=40, temperature=0.0))
    assert len(full) >= 8, full
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    text, chunks = _run(be, deps["qwen"], GenerationRequest(messages=CHAT, max_new_tokens=40, temperature=0.0,
                                                                  stop=(stop, "never-seen")))
    assert text == cut and stop not in text
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens < 40


def test_cancel_mid_stream_stops_within_a_few_tokens(chat_backend):
    be, deps = chat_backend
    polls = [0]  # cancel() is polled once per generated token
    flag = threading.Event()

    def cancel() -> bool:
        polls[0] += 1
        return flag.is_set()

    gen = be.generate_stream(deps["llama3"], GenerationRequest(messages=CHAT, max_new_tokens=200), cancel)
    chunks, polled_at_cancel = [], None
    for c in gen:
        chunks.append(c)
        if len([x for x in chunks if x.text]) == 3 and polled_at_cancel is None:
            polled_at_cancel = polls[0]
            flag.set()
    last = chunks[-1]
    assert last.finish_reason == "cancelled"
    assert polled_at_cancel is not None and polled_at_cancel < 20
    assert last.completion_tokens <= polled_at_cancel + 3  # at most a few tokens after the cancel


def test_closing_the_stream_early_stops_the_worker_and_frees_the_model(chat_backend):
    be, deps = chat_backend
    gen = be.generate_stream(deps["mistral"], GenerationRequest(messages=CHAT, max_new_tokens=400), NEVER)
    next(gen)
    entry = be._entries[deps["mistral"].handle]
    gen.close()  # a client that went away
    # the 400-token run did not continue: its worker is gone and the model's lock is free
    assert entry.worker is not None and not entry.worker.is_alive()
    assert not entry.gen_lock.locked()
    _run(be, deps["mistral"], GenerationRequest(messages=CHAT, max_new_tokens=2))


def test_concurrent_calls_on_one_model_are_serialised(chat_backend):
    be, deps = chat_backend
    events: list[tuple[str, float]] = []
    lock = threading.Lock()

    def run(name: str) -> None:
        request = GenerationRequest(messages=CHAT, max_new_tokens=20)
        for _chunk in be.generate_stream(deps["qwen"], request, NEVER):
            with lock:
                events.append((name, time.perf_counter()))

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    names = [n for n, _t in events]
    assert sorted(set(names)) == ["a", "b"]
    first = names[0]
    switch = names.index("b" if first == "a" else "a")
    assert all(n == first for n in names[:switch]) and all(n != first for n in names[switch:]), names


def test_sampling_with_a_seed_repeats(chat_backend):
    be, deps = chat_backend
    request = GenerationRequest(messages=CHAT, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    assert _run(be, deps["qwen"], request)[0] == _run(be, deps["qwen"], request)[0]


@pytest.mark.parametrize(("family", "marker"), [("qwen", "<tool_call>"), ("llama3", "<|start_header_id|>ipython"),
                                                ("mistral", "[TOOL_RESULTS]")])
def test_tools_and_tool_calls_are_rendered_into_the_prompt(chat_backend, family, marker):
    be, deps = chat_backend
    messages = (
        {"role": "user", "content": "Read main.py"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function",
             "function": {"name": "read_file", "arguments": '{"path": "main.py"}'}}]},
        {"role": "tool", "tool_call_id": "call12345", "content": "print('hi')"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    )
    with_tools = GenerationRequest(messages=messages, tools=TOOLS, max_new_tokens=4)
    tok = be._tokenizer(be._entries[deps[family].handle])
    from backends.transformers.generation import prompt_ids

    prompt = tok.decode(prompt_ids(tok, with_tools, deps[family].model_id))
    assert "Read a file of the workspace" in prompt  # the tool's description
    assert '{"path": "main.py"}' in prompt and '\\"path\\"' not in prompt  # arguments as an object, once
    assert "print('hi')" in prompt and marker in prompt  # the tool result is kept
    plain = GenerationRequest(messages=messages, max_new_tokens=4)
    assert be.prompt_tokens(deps[family], with_tools) > be.prompt_tokens(deps[family], plain)
    assert _run(be, deps[family], with_tools)[1][-1].finish_reason in ("stop", "length")


def test_template_messages_leaves_unparsable_arguments_and_drops_empty_tool_calls():
    out = template_messages((
        {"role": "assistant", "content": None, "tool_calls": None},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]},
    ))
    assert out[0] == {"role": "assistant", "content": ""}
    assert out[1]["tool_calls"][0]["function"]["arguments"] == "not json"


def test_model_family_from_the_template_or_config(chat_backend, hf_settings):
    be, deps = chat_backend
    assert {f: be.model_family(d) for f, d in deps.items()} == {"qwen": "qwen", "llama3": "llama3",
                                                                 "mistral": "mistral"}
    plain = TransformersBackend(hf_settings)
    dep = plain.start(resolve_model(TINY_ID, hf_settings), PROFILE, None)
    try:
        assert plain.model_family(dep) is None
        with pytest.raises(MemctlError) as info:  # no chat template: chat is refused, completion works
            plain.prompt_tokens(dep, GenerationRequest(messages=CHAT))
        assert info.value.code == "model.no_chat_template"
        assert plain.prompt_tokens(dep, GenerationRequest(prompt="def f():")) > 0
    finally:
        plain.stop_all()


def test_stop_during_a_generation_ends_it_and_frees_the_model(chat_settings, chat_models):
    be = TransformersBackend(chat_settings)
    dep = be.start(resolve_model(chat_models["qwen"], chat_settings), PROFILE, None)
    got_first = threading.Event()
    result: list = []

    def run() -> None:
        for c in be.generate_stream(dep, GenerationRequest(messages=CHAT, max_new_tokens=2000), NEVER):
            got_first.set()
            result.append(c)

    t = threading.Thread(target=run)
    t.start()
    assert got_first.wait(30)
    report = be.stop(dep.handle)
    t.join(30)
    assert not t.is_alive()
    assert result[-1].finish_reason == "cancelled" and result[-1].completion_tokens < 2000
    assert report.message.code == "release.freed" and be.deployments() == []


def test_stop_while_a_consumer_sits_between_two_chunks_still_frees_the_model(chat_settings, chat_models,
                                                                             monkeypatch):
    from backends.transformers import backend as backend_module

    monkeypatch.setattr(backend_module, "GEN_STOP_WAIT_S", 0.5)
    be = TransformersBackend(chat_settings)
    dep = be.start(resolve_model(chat_models["llama3"], chat_settings), PROFILE, None)
    paused = be.generate_stream(dep, GenerationRequest(messages=CHAT, max_new_tokens=2000), NEVER)
    next(paused)  # the consumer takes one chunk, then does nothing (holds the model's generation lock)
    entry = be._entries[dep.handle]
    report = be.stop(dep.handle)
    assert not entry.worker.is_alive()  # the 2000-token generation was stopped, not waited for
    assert report.message.code == "release.freed" and be.deployments() == []
    rest = list(paused)  # when it resumes, it learns the generation was cancelled
    assert rest[-1].finish_reason == "cancelled" and rest[-1].completion_tokens < 2000


def test_long_openai_tool_call_ids_fit_mistral_templates(chat_backend):
    be, deps = chat_backend
    messages = (
        {"role": "user", "content": "Read main.py"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0123456789abcdef", "type": "function",
             "function": {"name": "read_file", "arguments": '{"path": "main.py"}'}}]},
        {"role": "tool", "tool_call_id": "call_0123456789abcdef", "content": "print('hi')"},
    )
    from backends.transformers.generation import prompt_ids

    tok = be._tokenizer(be._entries[deps["mistral"].handle])
    prompt = tok.decode(prompt_ids(tok, GenerationRequest(messages=messages, tools=TOOLS), deps["mistral"].model_id))
    ids = {prompt[m.end():m.end() + 9] for m in __import__("re").finditer(r'"(?:id|call_id)": "', prompt)}
    assert len(ids) == 1 and len(next(iter(ids))) == 9 and next(iter(ids)).isalnum()  # one id, both places


def test_prompt_tokens_answers_while_the_model_generates(chat_backend):
    be, deps = chat_backend
    gen = be.generate_stream(deps["qwen"], GenerationRequest(messages=CHAT, max_new_tokens=300), NEVER)
    next(gen)  # a generation holds the model
    answers: list = []
    asker = threading.Thread(target=lambda: answers.extend([
        be.prompt_tokens(deps["qwen"], GenerationRequest(messages=CHAT)), be.model_family(deps["qwen"])]))
    try:
        asker.start()
        asker.join(5)
        assert not asker.is_alive(), "prompt_tokens waited for the generation"
        assert answers[0] > 0 and answers[1] == "qwen"
    finally:
        gen.close()
        asker.join(30)
