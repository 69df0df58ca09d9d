"""gpt-oss's harmony format, read off a chat answer's text as it streams (markers kept in the text).

The chat template ends the prompt with ``<|start|>assistant``; the model then writes messages, each a header and a
body::

    <|channel|>analysis<|message|>We need the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"q":"Nice"}<|call|>
    <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>

A header names the channel and, for a call, the recipient (``to=functions.NAME``, before or after the channel).
``analysis`` bodies are reasoning; a body sent to ``functions.NAME`` is that call's arguments; every other body
(``final``, a ``commentary`` preamble) is content. ``<|return|>`` and ``<|call|>`` are end-of-sequence tokens, so the
last body often ends with the text itself. Text that never becomes a header is content, as it came.

OpenAI's openai-harmony package parses the same tokens, but it loads its tokenizer's vocabulary over the network.
"""

from __future__ import annotations

import re

from moeray.serving.tool_calls import Split, new_call, tag_prefix_len

MESSAGE = "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")  # what ends a body (a new message's start, defensively)
MAX_HEADER = 256  # chars: a header longer than this is not one, and what was held comes back as content
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_HEADER_STARTS = ("<|channel|>", " to=", "to=")


def _could_be_header(text: str) -> bool:
    """Whether ``text`` (a message's opening, the role included) may still turn out to be a header."""
    text = text.lstrip()
    for lead in ("<|start|>", "assistant"):
        if lead.startswith(text):
            return True
        text = text.removeprefix(lead)
    return any(text.startswith(s) or s.startswith(text) for s in _HEADER_STARTS)


class HarmonyParser:
    """Splits a harmony stream into content, reasoning and calls, as each completes (feed / finish -> Split)."""

    def __init__(self) -> None:
        self._buf = ""
        self._header: str | None = ""  # the header being read; None while in a body
        self._channel, self._recipient = "", ""

    def feed(self, text: str) -> Split:
        self._buf += text
        out = Split()
        while self._buf and (self._read_header(out) if self._header is not None else self._read_body(out)):
            pass
        return out

    def finish(self) -> Split:
        out = self.feed("")
        if self._header is not None:  # a header cut short (max_tokens) says nothing; held plain words are content
            out.content += "" if "<|start|>" in self._header or "<|channel|>" in self._header else self._header
        else:  # the last body, its end marker an end-of-sequence token left out of the text
            self._emit(out, self._buf, call=True)
        self._buf, self._header = "", ""
        return out

    def _read_header(self, out: Split) -> bool:
        """Read the header's end, if it has come; True when the body begins."""
        held, self._buf = self._header + self._buf, ""
        end = held.find(MESSAGE)
        if end < 0:
            if len(held) > MAX_HEADER or not _could_be_header(held):  # plain text: content, as if final
                out.content += held
                self._header, self._channel, self._recipient = None, "final", ""
            else:
                self._header = held
            return False
        header, self._buf = held[:end], held[end + len(MESSAGE):]
        channel, recipient = _CHANNEL.search(header), _RECIPIENT.search(header)
        self._channel = channel.group(1) if channel else "final"
        self._recipient = recipient.group(1) if recipient else ""
        self._header = None
        return True

    def _read_body(self, out: Split) -> bool:
        """Move the body read so far to ``out`` (a call's only once it ends); True when the body ended."""
        ends = [(i, m) for m in ENDS if (i := self._buf.find(m)) >= 0]
        if not ends:
            if not self._recipient:  # stream the body, holding back what may begin an end marker
                keep = max(tag_prefix_len(self._buf, m) for m in ENDS)
                self._emit(out, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
            return False  # a call's arguments are sent whole, once they end
        i, marker = min(ends)
        self._emit(out, self._buf[:i], call=True)
        self._buf = self._buf[i + (0 if marker == "<|start|>" else len(marker)):]  # a start begins the next header
        self._header = ""
        return True

    def _emit(self, out: Split, body: str, *, call: bool = False) -> None:
        if self._recipient:
            if call:
                out.calls.append(new_call(self._recipient.removeprefix("functions."), body.strip()))
        elif self._channel == "analysis":
            out.reasoning += body
        else:
            out.content += body
