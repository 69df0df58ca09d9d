"""The Hermes tool-call parser and tool checks (moeray/serving/tool_calls.py), without a server: calls split from
content however the text is chunked, text that only looks like a call stays text, bad tools are refused naming
them. Against a server: tests/serving/test_openai.py."""

from __future__ import annotations

import json

import pytest

from moeray.request import InvalidRequest
from moeray.serving.tool_calls import HermesParser, check_tools, split_calls

TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call> done <tool_call>not json</tool_call>')


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_calls_split_from_content_whatever_the_chunks(size):
    parser, content, calls = HermesParser(), "", []
    for k in range(0, len(TEXT), size):
        text, done = parser.feed(TEXT[k:k + size])
        content += text
        calls += done
        assert "<tool_c" not in text or "not json" in text, "a tag's start is held back, never sent as content"
    content += parser.finish()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {"a": 1})]
    assert content == "Let me check. \n done <tool_call>not json</tool_call>"
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)


def test_whole_outputs_and_unclosed_tags():
    assert split_calls("just text") == ("just text", [])
    content, calls = split_calls('<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": "{}"}
    assert split_calls("a <tool_call>{\"name\": ")[0] == "a <tool_call>{\"name\": ", "unclosed: text"


@pytest.mark.parametrize("tools,choice,message", [
    ([], None, "tools must be a list of 1 to 128 function tools"),
    ([{"type": "code"}], None, "tools[0] must be {type: function"),
    ([{"type": "function", "function": {"name": "f", "parameters": 3}}], None, "parameters must be a JSON schema"),
    ([{"type": "function", "function": {"name": "f"}}], "sometimes", "tool_choice must be auto, none, required"),
    ([{"type": "function", "function": {"name": "f"}}], {"type": "function", "function": {"name": "g"}},
     "tool_choice names function 'g', which is not among the tools (f)"),
    (None, "required", "tool_choice needs tools"),
])
def test_bad_tools_are_refused_naming_them(tools, choice, message):
    with pytest.raises(InvalidRequest) as err:
        check_tools(tools, choice, True)
    assert message in str(err.value)
