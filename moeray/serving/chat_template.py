"""Chat messages as a chat template reads them: checked (roles, text content, earlier tool calls, tool results) and
rendered with the checkpoint's template or the server's --chat-template (the OpenAI API's chat completions and
/tokenize both render here). No Ray, no FastAPI."""

from __future__ import annotations

import json
from typing import Any

from moeray.request import InvalidRequest
from moeray.serving.errors import clip

MAX_MESSAGES = 4096
_ROLES = ("system", "developer", "user", "assistant", "tool")


def chat_messages(messages: Any) -> list[dict]:
    """``messages`` checked and reduced to what a chat template reads: role, content (text parts joined), name."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"messages holds {len(messages)} messages; at most {MAX_MESSAGES} are allowed")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content; got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(_ROLES)}; got "
                                 f"{clip(role) if isinstance(role, str) else type(role).__name__}")
        if m.get("function_call"):
            raise InvalidRequest(f"messages[{i}]: function_call is OpenAI's deprecated form; send tool_calls")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise InvalidRequest(f"messages[{i}].content[{j}]: only text parts ({{type: text, text}}) are "
                                         f"supported; got {clip(str(kind))}")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts; got "
                                 f"{type(content).__name__}")
        message = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        if m.get("tool_calls"):
            message["tool_calls"] = _tool_calls(m["tool_calls"], i)
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def _tool_calls(calls: Any, i: int) -> list[dict]:
    """An assistant message's earlier tool calls, as chat templates read them (arguments as an object)."""
    if not isinstance(calls, list):
        raise InvalidRequest(f"messages[{i}].tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}] must be {{type: function, function: {{name, "
                                 f"arguments}}}}")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise InvalidRequest(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def render_chat(tokenizer, chat_template: str | None, messages: list[dict], add_generation_prompt: bool,
                kwargs: dict | None, tools: list[dict] | None = None) -> str:
    """The chat template's text for ``messages`` (the checkpoint's template, or the server's --chat-template)."""
    if tokenizer is None:
        raise InvalidRequest("chat completions need a checkpoint with a tokenizer and a chat template; this one has "
                             "no tokenizer (use /v1/completions with token ids)")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequest("chat completions need a chat template; this checkpoint has none (start the server "
                             "with --chat-template FILE, or use /v1/completions)")
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **({"tools": tools} if tools else {}), **(kwargs or {}))
    except Exception as e:  # noqa: BLE001 - a template's raise_exception(...) or bad kwargs: the request's fault
        raise InvalidRequest(f"the chat template cannot render these messages: {clip(str(e), 300)}") from None
    if not isinstance(text, str):
        raise InvalidRequest("the chat template did not render to text")
    return text
