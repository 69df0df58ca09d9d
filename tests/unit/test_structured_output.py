"""Structured outputs in the router (moeray/router/grammar.py, xgrammar): a random tiny model constrained to a JSON
schema, a regex, a choice or an EBNF grammar produces text of that language and ends with its end-of-sequence token;
unconstrained runs in the same batch are untouched; what cannot be compiled is refused naming it. Through the HTTP
API: tests/serving/test_openai.py."""

from __future__ import annotations

import json
import re

import pytest

from moeray import EngineConfig, InvalidRequest, LocalEngine, SamplingParams
from moeray.request import StructuredOutput

xgrammar = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
          "maximum": 99}, "pet": {"type": "string", "enum": ["fox", "dog"]}}, "required": ["ok", "n", "pet"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from moeray.model.tiny import save_tokenized_checkpoint

    path = str(save_tokenized_checkpoint("qwen3_moe", tmp_path_factory.mktemp("structured") / "tiny", seed=2,
                                         corpus="yes no maybe positive negative neutral 0123456789 abc-"
                                                "the quick brown fox experts route tokens. {\"ok\": true} "))
    with LocalEngine(EngineConfig(model=path, backend="local", workers=2)) as engine:
        from transformers import AutoTokenizer

        yield engine, AutoTokenizer.from_pretrained(path)


def _run(engine, structured: StructuredOutput | None, n: int = 3, **kw):
    eng, tok = engine
    prompts = [tok("the quick brown")["input_ids"], tok("experts route")["input_ids"], tok("hello")["input_ids"]][:n]
    sampling = SamplingParams(max_new_tokens=60, structured=structured, **kw)
    results = eng.generate(prompts, sampling)
    return [tok.decode(r.output_ids, skip_special_tokens=True) for r in results], results


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_a_json_schema_is_obeyed_greedy_and_sampled(engine, temperature):
    texts, results = _run(engine, StructuredOutput("json_schema", json.dumps(SCHEMA)), temperature=temperature,
                          seed=3)
    for text, r in zip(texts, results):
        value = json.loads(text)
        assert set(value) == {"ok", "n", "pet"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
        assert value["pet"] in ("fox", "dog") and r.finish_reason == "stop"


def test_regex_choice_grammar_and_any_json(engine):
    texts, _ = _run(engine, StructuredOutput("regex", r"[a-c]{2}-[0-9]"))
    assert all(re.fullmatch(r"[a-c]{2}-[0-9]", t) for t in texts), texts
    texts, _ = _run(engine, StructuredOutput("choice", choices=("positive", "negative", "neutral")))
    assert all(t in ("positive", "negative", "neutral") for t in texts), texts
    texts, _ = _run(engine, StructuredOutput("grammar", 'root ::= "yes" | "no" | ("maybe " [0-9])'))
    assert all(re.fullmatch(r"yes|no|maybe [0-9]", t) for t in texts), texts
    texts, results = _run(engine, StructuredOutput("json"), n=1, temperature=0.0)
    if results[0].finish_reason == "stop":  # any JSON may run past max_new_tokens; when it ends, it parses
        json.loads(texts[0])


def test_unconstrained_requests_beside_constrained_ones_are_untouched(engine):
    eng, tok = engine
    prompt = tok("the quick brown")["input_ids"]
    plain = eng.generate([prompt], SamplingParams(max_new_tokens=12))[0].output_ids
    mixed = eng.generate([prompt, prompt], [SamplingParams(max_new_tokens=12), SamplingParams(
        max_new_tokens=12, structured=StructuredOutput("regex", "[0-9]+"))])
    assert mixed[0].output_ids == plain
    assert re.fullmatch(r"[0-9]+", tok.decode(mixed[1].output_ids, skip_special_tokens=True))


@pytest.mark.parametrize("structured,message", [
    (StructuredOutput("json_schema", '{"type": "bogus"}'), "the json schema cannot be compiled"),
    (StructuredOutput("json_schema", "{not json"), "the json schema cannot be compiled"),
    (StructuredOutput("regex", "(unclosed"), "the regex cannot be compiled"),
    (StructuredOutput("grammar", "root ::= undefined_rule"), "the grammar cannot be compiled"),
])
def test_what_cannot_be_compiled_is_refused_naming_it(engine, structured, message):
    with pytest.raises(InvalidRequest, match=message):
        _run(engine, structured, n=1)
    assert _run(engine, StructuredOutput("regex", "ok"), n=1)[0] == ["ok"], "and the engine keeps serving"


def test_bad_structured_records_and_ignore_eos_are_refused(engine):
    with pytest.raises(InvalidRequest, match="is not one of"):
        StructuredOutput("yaml")
    with pytest.raises(InvalidRequest, match="needs at least one choice"):
        StructuredOutput("choice")
    with pytest.raises(InvalidRequest, match="cannot be combined with ignore_eos"):
        _run(engine, StructuredOutput("regex", "a"), n=1, ignore_eos=True)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Nice"]}},
             "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["a"], "additionalProperties": False}}}]


@pytest.mark.parametrize("syntax", ["hermes", "deepseek_v3", "deepseek_v31", "openai"])
def test_forced_tool_calls_in_each_syntax_parse_back(engine, syntax):
    """tool_choice named and required, forced in the syntax's own markers (xgrammar's structural tags), come back
    out of that syntax's parser as calls of the offered tools with arguments valid for their schemas."""
    from moeray.serving.tool_calls import SYNTAXES, check_tools, forced, split_calls

    eng, tok = engine
    spec = SYNTAXES[syntax]
    for choice, names in (({"type": "function", "function": {"name": "add"}}, {"add"}),
                          ("required", {"add", "get_weather"})):
        request = check_tools(TOOLS, choice, parallel=False)  # one call: the 256 positions hold it
        results = eng.generate([tok("the quick brown")["input_ids"], tok("experts route")["input_ids"]],
                               SamplingParams(max_new_tokens=240, structured=forced(request, spec)))
        for r in results:
            text = tok.decode(r.output_ids, skip_special_tokens=True)
            content, calls = split_calls(text, spec)
            assert calls and content is None and r.finish_reason == "stop", (syntax, text)
            for call in calls:
                assert call["function"]["name"] in names, (syntax, text)
                arguments = json.loads(call["function"]["arguments"])
                assert arguments in ({"a": a} for a in range(10)) or arguments in ({"city": "Paris"},
                                                                                   {"city": "Nice"}), text
