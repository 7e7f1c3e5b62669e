"""Tool-call parsing on outputs as the families' models write them (pure, no model needed)."""

from __future__ import annotations

import json

import pytest

from memory_controller.toolcalls import (
    ParsedOutput,
    ToolCallStream,
    new_call_id,
    normalize_family,
    parse_tool_calls,
)

NESTED = {"path": "src/a.py", "edits": [{"line": 3, "text": "x = {\"k\": [1, 2]}"}], "opts": {"dry": False}}

# Outputs as the models write them (Qwen 2.5 / Qwen3 with the Hermes template; Llama 3.1 / 3.2 / 3.3
# JSON tool calling; Mistral 7B v0.3 / Nemo (v3 tokenizer) and Mistral Small 3.2 / Devstral (v11+)).
RECORDED: list[tuple[str, str, str | None, list[tuple[str, dict]]]] = [
    # family, output, expected content, expected calls
    ("qwen2.5", '<tool_call>\n{"name": "read_file", "arguments": {"path": "main.py"}}\n</tool_call>',
     None, [("read_file", {"path": "main.py"})]),
    ("qwen2.5", "I'll look at both files.\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"a.py\"}}\n"
     "</tool_call>\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"b.py\"}}\n</tool_call>",
     "I'll look at both files.", [("read_file", {"path": "a.py"}), ("read_file", {"path": "b.py"})]),
    ("qwen3", "<think>\nThe user wants an edit.\n</think>\n\n<tool_call>\n"
     + json.dumps({"name": "apply_diff", "arguments": NESTED}) + "\n</tool_call>",
     "<think>\nThe user wants an edit.\n</think>", [("apply_diff", NESTED)]),
    ("qwen", '<tool_call>\n{"name": "list_files", "arguments": {}}',  # cut at the stop token
     None, [("list_files", {})]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
     None, [("get_weather", {"city": "Paris"})]),
    ("llama3.2", '<|python_tag|>{"name": "search", "parameters": {"query": "memctl"}}',
     None, [("search", {"query": "memctl"})]),
    ("llama3", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {"y": [1, {"z": 2}]}}',
     None, [("a", {"x": 1}), ("b", {"y": [1, {"z": 2}]})]),
    ("llama3.3", " " + json.dumps({"name": "apply_diff", "parameters": NESTED}) + "\n",
     None, [("apply_diff", NESTED)]),
    ("mistral", '[TOOL_CALLS] [{"name": "read_file", "arguments": {"path": "x.rs"}}]',
     None, [("read_file", {"path": "x.rs"})]),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {"n": 1}}, {"name": "b", "arguments": '
     + json.dumps(NESTED) + "}]", None, [("a", {"n": 1}), ("b", NESTED)]),
    ("mistral", 'Let me check.[TOOL_CALLS]read_file[ARGS]{"path": "lib.rs"}',
     "Let me check.", [("read_file", {"path": "lib.rs"})]),
    ("mistral", '[TOOL_CALLS]a[ARGS]{"n": 1}[TOOL_CALLS]b[ARGS]' + json.dumps(NESTED),
     None, [("a", {"n": 1}), ("b", NESTED)]),
]

MALFORMED: list[tuple[str, str]] = [
    ("qwen", '<tool_call>\n{"name": "read_file", "arguments": {"path": "main.py"\n</tool_call>'),
    ("qwen", "<tool_call>\nnot json at all\n</tool_call>"),
    ("qwen", '<tool_call>\n{"arguments": {"path": "x"}}\n</tool_call>'),  # no name
    ("llama3", '{"name": "a", "parameters": {"x": 1}'),
    ("llama3", '{"title": "a JSON answer, not a call"}'),
    ("llama3", "Here is the answer: use a dict."),
    ("mistral", '[TOOL_CALLS] [{"name": "a", "arguments": {"x": }]'),
    ("mistral", "[TOOL_CALLS]a[ARGS]{broken"),
]


def _calls(parsed: ParsedOutput) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments_json)) for c in parsed.tool_calls]


@pytest.mark.parametrize("family, output, content, calls", RECORDED)
def test_recorded_output_gives_the_calls_the_model_made(family, output, content, calls):
    parsed = parse_tool_calls(output, family)
    assert _calls(parsed) == calls
    assert parsed.content == content
    assert len({c.id for c in parsed.tool_calls}) == len(calls)  # every call has its own id


@pytest.mark.parametrize("family, output", MALFORMED)
def test_malformed_call_comes_back_as_the_text_the_model_wrote(family, output):
    parsed = parse_tool_calls(output, family)
    assert parsed.tool_calls == ()
    assert parsed.content == output


def test_unknown_family_returns_text_even_when_it_looks_like_a_call():
    out = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'
    assert parse_tool_calls(out, None) == ParsedOutput(out, ())
    assert parse_tool_calls(out, "phi") == ParsedOutput(out, ())


def test_family_names_are_normalised():
    assert normalize_family("Qwen3") == "qwen"
    assert normalize_family("llama") == "llama3"
    assert normalize_family("mistral") == "mistral"
    assert normalize_family("gemma") is None


def test_mistral_call_ids_are_nine_alphanumerics():
    parsed = parse_tool_calls('[TOOL_CALLS][{"name": "a", "arguments": {}}]', "mistral")
    (call,) = parsed.tool_calls
    assert len(call.id) == 9 and call.id.isalnum()
    assert new_call_id("qwen").startswith("call_")


def _stream(family: str, output: str, piece_len: int) -> tuple[str, ParsedOutput]:
    s = ToolCallStream(family)
    shown = "".join(s.feed(output[i:i + piece_len]) for i in range(0, len(output), piece_len))
    return shown, s.finish()


@pytest.mark.parametrize("piece_len", [1, 3, 7, 1000])
@pytest.mark.parametrize("family, output, content, calls", RECORDED)
def test_stream_shows_text_before_the_call_and_parses_the_call_at_the_end(family, output, content, calls,
                                                                           piece_len):
    shown, rest = _stream(family, output, piece_len)
    assert _calls(rest) == calls
    # whatever was shown plus the rest's content is the content (text before the marker streams live)
    assert "<tool_call>" not in shown and "[TOOL_CALLS]" not in shown and "<|python_tag|>" not in shown
    assert (shown + (rest.content or "")).strip() == (content or "")


@pytest.mark.parametrize("piece_len", [1, 4])
def test_stream_of_plain_text_passes_through_whole(piece_len):
    text = "Use a <b>dict</b> here [see docs]; braces { } are fine."
    for family in ("qwen", "llama3", "mistral", None):
        shown, rest = _stream(family, text, piece_len)
        assert shown + (rest.content or "") == text
        assert rest.tool_calls == ()


@pytest.mark.parametrize("family, output", MALFORMED)
def test_stream_of_a_malformed_call_gives_the_whole_text_back(family, output):
    shown, rest = _stream(family, output, 2)
    assert rest.tool_calls == ()
    assert shown + (rest.content or "") == output


def test_stream_holds_a_partial_marker_until_it_is_resolved():
    s = ToolCallStream("qwen")
    assert s.feed("Hello <tool") == "Hello "
    assert s.feed("bar>") == "<toolbar>"
    assert not s.holding
