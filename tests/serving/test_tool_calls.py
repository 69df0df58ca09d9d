"""The tool-call parsers (moeray/serving/tool_calls.py: Hermes and DeepSeek-V3; moeray/serving/harmony.py: gpt-oss)
and tool checks, without a server: calls split from content however the text is chunked, text that only looks like
a call stays text, bad tools are refused naming them. Forced calls in each syntax through a real model:
tests/unit/test_structured_output.py; against a server: tests/serving/test_openai.py."""

from __future__ import annotations

import json

import pytest

from moeray.request import InvalidRequest
from moeray.serving.tool_calls import SYNTAXES, Split, check_tools, split_calls, syntax_of

HERMES = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call> done <tool_call>not json</tool_call>')
DEEPSEEK_V3 = ('Let me check. <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
               '{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n'
               '{"a": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜> done <｜tool▁call▁begin｜>not a call<｜tool▁call▁end｜>')
DEEPSEEK_V31 = ('Let me check. <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
                '<｜tool▁call▁end｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": 1}<｜tool▁call▁end｜><｜tool▁calls▁end｜> '
                'done <｜tool▁call▁begin｜>add<｜tool▁sep｜>{not json<｜tool▁call▁end｜>')
HARMONY = ('<|channel|>analysis<|message|>Weather, then a sum.<|end|><|start|>assistant<|channel|>commentary '
           'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
           '<|start|>assistant to=functions.add<|channel|>commentary json<|message|>{"a": 1}<|call|>'
           '<|start|>assistant<|channel|>final<|message|>Let me check. \n done <tool_call>not json</tool_call>')
CASES = {  # syntax: (text, its content, its reasoning)
    "hermes": (HERMES, "Let me check. \n done <tool_call>not json</tool_call>", ""),
    "deepseek_v3": (DEEPSEEK_V3, "Let me check. \n done <｜tool▁call▁begin｜>not a call<｜tool▁call▁end｜>", ""),
    "deepseek_v31": (DEEPSEEK_V31,
                     "Let me check.  done <｜tool▁call▁begin｜>add<｜tool▁sep｜>{not json<｜tool▁call▁end｜>", ""),
    "openai": (HARMONY, "Let me check. \n done <tool_call>not json</tool_call>", "Weather, then a sum."),
}


def _run(syntax: str, text: str, size: int) -> Split:
    parser, out = SYNTAXES[syntax].parser(), Split()
    for k in range(0, len(text), size):
        piece = parser.feed(text[k:k + size])
        out += piece
        for marker in SYNTAXES[syntax].markers:  # a marker's start is held back, never sent as content
            assert marker[:3] not in piece.content + piece.reasoning or "not" in piece.content, (marker, piece)
    out += parser.finish()
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("syntax", sorted(CASES))
def test_calls_split_from_content_whatever_the_chunks(syntax, size):
    text, content, reasoning = CASES[syntax]
    out = _run(syntax, text, size)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {"a": 1})]
    assert (out.content, out.reasoning) == (content, reasoning)
    assert len({c["id"] for c in out.calls}) == 2 and all(c["type"] == "function" for c in out.calls)


def test_whole_outputs_and_unclosed_tags():
    assert split_calls("just text") == ("just text", [])
    content, calls = split_calls('<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": "{}"}
    assert split_calls("a <tool_call>{\"name\": ")[0] == "a <tool_call>{\"name\": ", "unclosed: text"
    deepseek = SYNTAXES["deepseek_v3"]
    assert split_calls("a <｜tool▁call▁begin｜>add<｜tool▁sep｜>{", deepseek)[0] == "a <｜tool▁call▁begin｜>add<｜tool▁sep｜>{"


def test_harmony_plain_text_unended_calls_and_the_last_body():
    harmony = SYNTAXES["openai"]
    assert split_calls("no channels here <|at all", harmony) == ("no channels here <|at all", [])
    content, calls = split_calls('<|channel|>commentary to=functions.add<|constrain|>json<|message|>{"a": 2}', harmony)
    assert content is None and calls[0]["function"] == {"name": "add", "arguments": '{"a": 2}'}, "<|call|> is EOS"
    assert split_calls("<|channel|>final<|message|>It is sunny.", harmony) == ("It is sunny.", [])
    assert split_calls("<|start|>assistant", harmony) == ("", []), "a message begun, nothing said"
    assert split_calls("<|channel|>final<|message|>hi<|end|><|start|>assistant<|channel|>fin", harmony) == ("hi", [])
    assert split_calls("assist", harmony) == ("assist", []), "held as a possible header, then plain words"


@pytest.mark.parametrize("architecture,name", [("DeepseekV3ForCausalLM", "deepseek_v3"),
                                               ("GptOssForCausalLM", "openai"), ("MixtralForCausalLM", "hermes"),
                                               ("Qwen3MoeForCausalLM", "hermes"), ("OlmoeForCausalLM", "hermes")])
def test_the_default_syntax_is_the_familys(architecture, name):
    assert syntax_of(architecture).name == name
    assert syntax_of(architecture, "deepseek_v31").name == "deepseek_v31", "--tool-call-parser wins"
    with pytest.raises(ValueError, match="tool-call parser 'mistral' is not one of hermes, deepseek_v3"):
        syntax_of(architecture, "mistral")


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
