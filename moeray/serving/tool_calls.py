"""Tool calls on the chat API: the model's own chat template renders ``tools``, its output is parsed into OpenAI's
``tool_calls``, and ``tool_choice`` "required" or a named function is enforced with a structured output (xgrammar's
structural tag for the model's call syntax), so a call is produced whatever the model would have said.

Formats (``--tool-call-parser``, vLLM's name; the default follows the checkpoint's family):
- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, as Qwen's chat templates write and
  read it (and xgrammar's ``qwen_3`` structural tag builds it). The default for every family moeray serves.
DeepSeek-V3's and gpt-oss's harmony call syntaxes are not parsed yet: pick ``hermes`` with a template that teaches it.

Streaming: text before a call streams as content; a call is sent as one ``tool_calls`` delta once its closing tag
has come (its arguments whole, which OpenAI's shape allows); a possible start of a tag is held back until it is told
apart from text.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from moeray.request import InvalidRequest, StructuredOutput

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PARSERS = ("hermes",)
MAX_TOOLS = 128
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


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


def forced(request: ToolRequest) -> StructuredOutput | None:
    """The structured output that enforces ``request.choice`` ("required": one or more calls of any tool, nothing
    else; a named function: exactly that call), or None where the model is free (auto, none)."""
    if request.choice in ("auto", "none"):
        return None
    try:
        import xgrammar as xgr
    except ImportError:
        raise InvalidRequest("tool_choice required or a named function needs xgrammar on the server "
                             "(pip install moeray[structured])") from None

    def tag_of(name: str) -> dict:  # xgrammar's Hermes tag for one call of ``name``
        # NOTE: at most one whitespace character in a row inside the arguments: a model that would write spaces for
        # ever (a small or confused one) still ends its call
        tag = xgr.get_model_structural_tag("qwen_3", tools=request.tools, reasoning=False, max_whitespace_cnt=1,
                                           tool_choice={"type": "function", "function": {"name": name}})
        return json.loads(tag.model_dump_json())["format"]

    if isinstance(request.choice, dict):
        fmt = tag_of(request.choice["function"]["name"])
    else:
        fmt = {"type": "tags_with_separator", "tags": [tag_of(t["function"]["name"]) for t in request.tools],
               "separator": "\n", "at_least_one": True, "stop_after_first": not request.parallel}
    return StructuredOutput("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))


def _call(body: str) -> dict | None:
    """One call's OpenAI shape from the JSON between the tags (None: not a call)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments, ensure_ascii=False)}}


class HermesParser:
    """Splits a stream of text into content and tool calls, as they complete."""

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content that is surely not part of a call, calls completed)."""
        self._buf += text
        content, calls = "", []
        while True:
            start = self._buf.find(OPEN)
            if start < 0:
                keep = _partial(self._buf, OPEN)  # a possible start of a tag stays until it is told apart
                content, self._buf = content + self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return content, calls
            end = self._buf.find(CLOSE, start)
            content += self._buf[:start]
            if end < 0:
                self._buf = self._buf[start:]
                return content, calls
            body, self._buf = self._buf[start + len(OPEN):end], self._buf[end + len(CLOSE):]
            call = _call(body.strip())
            if call is None:  # not a call after all: the text stays text
                content += OPEN + body + CLOSE
            else:
                calls.append(call)

    def finish(self) -> str:
        """What is left (an unclosed tag's text comes back as content)."""
        rest, self._buf = self._buf, ""
        return rest


def _partial(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_calls(text: str) -> tuple[str | None, list[dict]]:
    """A whole output's (content, tool calls): content None when only calls were said."""
    parser = HermesParser()
    content, calls = parser.feed(text)
    content += parser.finish()
    content = content.strip() if calls else content
    return (content or None) if calls else content, calls
