"""Tool calls on the chat API: the model's own chat template renders ``tools``, its output is parsed into OpenAI's
``tool_calls``, and ``tool_choice`` "required" or a named function is enforced with a structured output (xgrammar's
structural tag for the model's call syntax), so a call is produced whatever the model would have said.

Syntaxes (``moeray serve --tool-call-parser``, vLLM's names; the default follows the checkpoint's architecture):
- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, as Qwen's chat templates write and
  read it (xgrammar's ``qwen_3`` structural tag). The default for every family but the two below.
- ``deepseek_v3``: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```
  <｜tool▁call▁end｜><｜tool▁calls▁end｜>``, as DeepSeek-V3's template writes it (xgrammar's ``deepseek_r1``); the
  V3.1 form (``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``, ``deepseek_v31``) is read too.
- ``openai``: gpt-oss's harmony channels (moeray/serving/harmony.py): a call is a ``commentary`` message to
  ``functions.NAME``; the ``analysis`` channel is the answer's ``reasoning_content``, ``final`` its content. It
  parses every chat answer of such a model, tools or not: the channels are how the model speaks.

Each syntax's markers stay in the text the parser reads, special tokens or not (``keep_special``).

Streaming: text before a call streams as content; a call is sent as one ``tool_calls`` delta once its closing tag
has come (its arguments whole, which OpenAI's shape allows); a possible start of a tag is held back until it is told
apart from text.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any, Callable

from moeray.request import InvalidRequest, StructuredOutput

OPEN, CLOSE = "<tool_call>", "</tool_call>"
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
MAX_TOOLS = 128
_FENCED = re.compile(r"^\s*(\S+)\s*\n```(?:json)?\s*\n?(.*?)\n?```\s*$", re.DOTALL)


@dataclasses.dataclass
class Split:
    """What a stretch of the model's text says: content, reasoning (harmony's analysis channel), calls completed."""

    content: str = ""
    reasoning: str = ""
    calls: list[dict] = dataclasses.field(default_factory=list)

    def __iadd__(self, other: Split) -> Split:
        self.content += other.content
        self.reasoning += other.reasoning
        self.calls += other.calls
        return self


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    """A chat request's tools as the template and the parser need them."""

    tools: list[dict]  # OpenAI's [{type: function, function: {name, description, parameters}}]
    choice: str | dict  # "auto", "none", "required", or {type: function, function: {name}}
    parallel: bool = True

    @property
    def parse(self) -> bool:
        return self.choice != "none"


def check_tools(tools: Any, tool_choice: Any, parallel: bool) -> ToolRequest | None:
    """The body's tools and tool_choice checked (None when there are none to offer)."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools")
        return None
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools must be a list of 1 to {MAX_TOOLS} function tools")
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object")
        names.append(fn["name"])
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise InvalidRequest(f"tool_choice names function {name!r}, which is not among the tools "
                                 f"({', '.join(names)})")
    elif choice not in ("auto", "none", "required"):
        raise InvalidRequest(f"tool_choice must be auto, none, required or {{type: function, function: {{name}}}}; "
                             f"got {choice!r}")
    return ToolRequest(tools=tools, choice=choice, parallel=parallel)


def forced(request: ToolRequest, syntax: CallSyntax) -> StructuredOutput | None:
    """The structured output that enforces ``request.choice`` in ``syntax`` ("required": one or more calls of any
    tool, nothing else; a named function: exactly that call), or None where the model is free (auto, none)."""
    if request.choice in ("auto", "none"):
        return None
    try:
        import xgrammar as xgr
    except ImportError:
        raise InvalidRequest("tool_choice required or a named function needs xgrammar on the server "
                             "(pip install moeray[structured])") from None

    def tags_of(name: str) -> list[dict]:  # xgrammar's tags for one call of ``name`` (harmony has three forms)
        # NOTE: at most one whitespace character in a row inside the arguments: a model that would write spaces for
        # ever (a small or confused one) still ends its call
        tag = xgr.get_model_structural_tag(syntax.xgrammar, tools=request.tools, reasoning=False,
                                           max_whitespace_cnt=1,
                                           tool_choice={"type": "function", "function": {"name": name}})
        fmt = json.loads(tag.model_dump_json())["format"]
        return [fmt] if fmt["type"] == "tag" else fmt["tags"]

    def one_or_more(tags: list[dict], stop_after_first: bool) -> dict:
        return {"type": "tags_with_separator", "tags": tags, "separator": syntax.separator, "at_least_one": True,
                "stop_after_first": stop_after_first}

    if isinstance(request.choice, dict):
        tags = tags_of(request.choice["function"]["name"])
        fmt = tags[0] if len(tags) == 1 else one_or_more(tags, True)
    else:
        fmt = one_or_more([t for tool in request.tools for t in tags_of(tool["function"]["name"])],
                          not request.parallel)
    return StructuredOutput("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))


def new_call(name: str, arguments: Any) -> dict:
    """One call in OpenAI's shape (arguments as a JSON string)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments, ensure_ascii=False)}}


def hermes_call(body: str) -> dict | None:
    """A call from the JSON between Hermes tags (None: not a call)."""
    try:
        value = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    return new_call(value["name"], value.get("arguments", value.get("parameters", {})))


def deepseek_call(body: str) -> dict | None:
    """A call from between DeepSeek's call tags: ``function<sep>NAME\\n```json ARGS```" (V3) or ``NAME<sep>ARGS``
    (V3.1); None: not a call. The arguments must be JSON either way."""
    kind, sep, rest = body.partition(DS_SEP)
    if not sep:
        return None
    if kind.strip() == "function" and (fenced := _FENCED.match(rest)):
        name, arguments = fenced.groups()
    else:
        name, arguments = kind.strip(), rest.strip()
    try:
        json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return new_call(name, arguments) if name else None


class TaggedParser:
    """Splits a stream of text into content and the calls between ``open`` and ``close`` tags, as they complete;
    ``drop``: markers around a run of calls, neither content nor part of a call."""

    def __init__(self, open_tag: str, close_tag: str, body: Callable[[str], dict | None],
                 drop: tuple[str, ...] = ()) -> None:
        self._open, self._close, self._body, self._drop = open_tag, close_tag, body, drop
        self._buf = ""

    def _text(self, text: str) -> str:
        for marker in self._drop:
            text = text.replace(marker, "")
        return text

    def feed(self, text: str) -> Split:
        """Content that is surely not part of a call, and the calls completed."""
        self._buf += text
        out = Split()
        while True:
            start = self._buf.find(self._open)
            if start < 0:  # a possible start of a tag stays until it is told apart
                keep = max(tag_prefix_len(self._buf, tag) for tag in (self._open, *self._drop))
                out.content += self._text(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return out
            end = self._buf.find(self._close, start)
            out.content += self._text(self._buf[:start])
            if end < 0:
                self._buf = self._buf[start:]
                return out
            body, self._buf = self._buf[start + len(self._open):end], self._buf[end + len(self._close):]
            call = self._body(body)
            if call is None:  # not a call after all: the text stays text
                out.content += self._open + body + self._close
            else:
                out.calls.append(call)

    def finish(self) -> Split:
        """What is left (an unclosed tag's text comes back as content)."""
        rest, self._buf = self._buf, ""
        return Split(content=self._text(rest))


def HermesParser() -> TaggedParser:  # noqa: N802 - a parser class's name, as vLLM's
    return TaggedParser(OPEN, CLOSE, hermes_call)


def DeepSeekParser() -> TaggedParser:  # noqa: N802
    return TaggedParser(DS_CALL_BEGIN, DS_CALL_END, deepseek_call, drop=(DS_CALLS_BEGIN, DS_CALLS_END))


@dataclasses.dataclass(frozen=True)
class CallSyntax:
    """A model family's tool-call syntax: its parser, xgrammar's structural tag for it, and how forced calls are
    joined (``separator``)."""

    name: str
    parser: Callable[[], Any]  # () -> an object with feed(text) -> Split and finish() -> Split
    xgrammar: str
    separator: str
    markers: tuple[str, ...]  # kept in the text the parser reads, even where they are special tokens
    always: bool = False  # parses every chat answer, tools or not


def _harmony_parser():
    from moeray.serving.harmony import HarmonyParser

    return HarmonyParser()


SYNTAXES = {s.name: s for s in (
    CallSyntax("hermes", HermesParser, "qwen_3", "\n", (OPEN, CLOSE)),
    CallSyntax("deepseek_v3", DeepSeekParser, "deepseek_r1", "\n",
               (DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END, DS_SEP)),
    CallSyntax("deepseek_v31", DeepSeekParser, "deepseek_v3_1", "\n",
               (DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END, DS_SEP)),
    CallSyntax("openai", _harmony_parser, "harmony", "<|start|>assistant",
               ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"),
               always=True),
)}
_BY_ARCHITECTURE = {"DeepseekV3": "deepseek_v3", "GptOss": "openai"}


def syntax_of(architecture: str, name: str | None = None) -> CallSyntax:
    """``name``'s syntax (``--tool-call-parser``), else the one the architecture's own chat template writes."""
    if name is None:
        name = next((s for prefix, s in _BY_ARCHITECTURE.items() if architecture.startswith(prefix)), "hermes")
    if name not in SYNTAXES:
        raise ValueError(f"tool-call parser {name!r} is not one of {', '.join(SYNTAXES)}")
    return SYNTAXES[name]


def tag_prefix_len(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_calls(text: str, syntax: CallSyntax = SYNTAXES["hermes"]) -> tuple[str | None, list[dict]]:
    """A whole output's (content, tool calls): content None when only calls were said."""
    parser = syntax.parser()
    out = parser.feed(text)
    out += parser.finish()
    content = out.content.strip() if out.calls else out.content
    return (content or None) if out.calls else content, out.calls
