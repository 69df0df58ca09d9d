"""Token ids -> text, as the ids stream in: one incremental detokenizer and stop strings, for every API.

``TextStream`` is what an API uses per request (gRPC ``GenerateResponse.text`` today, an OpenAI-style HTTP API
later): feed it each chunk's new ids, send what it returns, and send ``finish()`` with the last chunk.

The contract (tests/unit/test_detokenize.py checks it for byte-level BPE, the demo's byte tokenizer, SentencePiece
Metaspace and Llama-style byte-fallback tokenizers):

- The deltas of a request join to exactly ``tokenizer.decode(ids, skip_special_tokens=True)`` of all its ids:
  special tokens (``</s>``, ...) are left out of the text, as OpenAI-style servers do (``skip_special_tokens=False``
  keeps them). The stream never applies transformers' ``clean_up_tokenization_spaces`` (transformers 5 ignores it
  for BPE tokenizers anyway; for a WordPiece/Unigram checkpoint that sets it, compare with
  ``clean_up_tokenization_spaces=False``).
- A character is never split: a trailing piece that does not decode to a whole character yet (the first bytes of
  an emoji, a CJK or accented letter) is held back until the tokens that complete it arrive, and ``finish()``
  flushes what is still held, so output that is genuinely invalid UTF-8 ends with U+FFFD exactly as decode() has it.
- Each step costs O(new tokens), not O(all tokens).

Why not ``tokenizers.decoders.DecodeStream`` (tokenizers 0.23), which runs the same algorithm in Rust: it has no
flush, so a tail that never becomes valid UTF-8 is lost at the end (nearly half of random byte-level id
sequences); it raises "Invalid prefix" when a byte-fallback decoder re-renders text already sent (Llama/Mistral/
Mixtral tokenizers, on stray byte tokens: the request would end in an error); it holds a whole multi-token chunk
back when only its last character is incomplete; and it takes only a ``tokenizers.Tokenizer``. The algorithm here
is the classic prefix/read-offset one (vLLM's ``detokenize_incrementally``, transformers' TextStreamer):

- keep a window of ids: an anchor (ids already sent, decoding to ``prefix_text``) followed by the ids not yet
  settled; each step decodes the window once and sends ``decode(window)[len(prefix_text):]``, up to (not
  including) a trailing run of U+FFFD, which may be an incomplete character. Decoding the anchor again with the
  new ids gives every decoder its left context (Metaspace and Llama's Strip decoder drop a leading space of the
  first piece only: that piece is in the anchor, whose text is subtracted);
- when nothing is pending any more, the ids after the anchor become the next anchor, so the window stays a few
  tokens long;
- skipped special tokens are dropped before they enter the window, which is what ``skip_special_tokens`` does
  inside ``tokenizers`` (they are filtered out before the decoder runs).

Known limit: a byte-fallback run (``<0xE2><0x82><0xAC>``) that decodes to a whole character is sent; if the model
then emits a stray byte token that makes the whole run invalid (or, with skip_special_tokens=False, a special token
inside the run), ``tokenizers`` renders the run as U+FFFD in hindsight. Text already sent cannot change, so the
stream then differs from decode() there; only genuinely invalid model output does this. (While a run is still incomplete, its whole characters read as U+FFFD too: they are held
until the run is whole again, and ``rewrites`` counts such steps.)

Stop strings (``StopMatcher``): matched on the text, so a stop string spanning tokens or deltas is found; the stop
string and everything after it are not returned (``include_stop_str_in_output`` keeps the stop string itself), and
text that could still be the start of a stop string is held back until decided. The caller aborts the request when
``hit`` is set and reports finish_reason "stop".

No Ray and no gRPC here: this module only turns ids into text.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence

from moeray.request import InvalidRequest

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what a decoder renders bytes that are not (yet) a whole UTF-8 character as
MAX_STOP_STRINGS = 16  # per request (OpenAI allows 4; every delta is searched for each)
MAX_STOP_STRING_CHARS = 256  # per stop string; also bounds the text held back while a match is undecided


def check_stop_strings(stop: str | Iterable[str] | None, field: str = "stop") -> tuple[str, ...]:
    """A request's stop strings, checked: at most MAX_STOP_STRINGS, each 1 to MAX_STOP_STRING_CHARS characters.

    A single string is one stop string (OpenAI's ``stop`` takes either); repeats are dropped, order kept.
    """
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, (bytes, bytearray)) or not isinstance(stop, Iterable):
        raise InvalidRequest(f"{field} must be a string or a list of strings; got {type(stop).__name__}")
    stop = list(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"{field} holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise InvalidRequest(f"{field}[{i}] must be a string; got {type(s).__name__}")
        if not 0 < len(s) <= MAX_STOP_STRING_CHARS:
            raise InvalidRequest(f"{field}[{i}] must be 1 to {MAX_STOP_STRING_CHARS} characters; got {len(s)}")
    return tuple(dict.fromkeys(stop))


def _decoder(tokenizer) -> tuple[Callable[[list[int]], str], frozenset[int]]:
    """(decode ids with special tokens kept, the ids skip_special_tokens drops) for a ``tokenizers.Tokenizer``, a
    transformers fast tokenizer (its backend), or any tokenizer with transformers' ``decode``/``all_special_ids``."""
    backend = tokenizer if hasattr(tokenizer, "get_added_tokens_decoder") else \
        getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # NOTE: the backend's own flags, not transformers' all_special_ids: decode(skip_special_tokens=True) drops
        # exactly the added tokens the backend marks special.
        special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        return (lambda ids: backend.decode(ids, skip_special_tokens=False)), special
    special = frozenset(getattr(tokenizer, "all_special_ids", ()))
    return (lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)), special


@functools.lru_cache(maxsize=8)
def _ids_of(tokenizer, special: frozenset[int], contents: frozenset[str]) -> frozenset[int]:
    """The special ids among ``special`` whose text is one of ``contents`` (once per tokenizer and set)."""
    decode, _ = _decoder(tokenizer)
    return frozenset(i for i in special if decode([i]) in contents)


class Detokenizer:
    """Incremental detokenization of one request's new tokens (see the module docstring for the contract)."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True, keep_special: Iterable[str] = ()) -> None:
        self._decode, special = _decoder(tokenizer)
        self._skip = frozenset()
        if skip_special_tokens:  # ``keep_special``: special tokens kept all the same (a tool-call syntax's markers)
            self._skip = special - _ids_of(tokenizer, special, frozenset(keep_special)) if keep_special else special
        self._window: list[int] = []  # the anchor ids, then the ids not settled yet
        self._anchor = 0  # len of the anchor part of the window
        self._prefix_text = ""  # decode(window[:anchor])
        self._sent = 0  # chars of decode(window)[len(prefix_text):] already returned (the settled part)
        self.rewrites = 0  # steps where the window's text did not extend the anchor's (see "Known limit")
        self.finished = False

    def feed(self, token_ids: Iterable[int]) -> str:
        """New text for ``token_ids`` (the ids after those fed so far): "" while it is held back."""
        if self.finished:
            raise RuntimeError("feed() after finish()")
        new = [t for t in map(int, token_ids) if t not in self._skip]
        if not new:
            return ""
        self._window.extend(new)
        text = self._decode(self._window)
        if not text.startswith(self._prefix_text):
            self.rewrites += 1
            log.debug("decoder rewrote text already sent (%r -> %r)", self._prefix_text, text)
        tail = text[len(self._prefix_text):]
        settled = len(tail.rstrip(REPLACEMENT))
        if settled < len(tail):  # maybe an incomplete character: send what comes before it, keep the window
            delta = tail[self._sent:settled]
            self._sent = max(self._sent, settled)
            return delta
        delta = tail[self._sent:]
        # all sent: the ids after the anchor become the next anchor (the window stays a few tokens long)
        self._window = self._window[self._anchor:]
        self._prefix_text = self._decode(self._window)
        self._anchor, self._sent = len(self._window), 0
        return delta

    def finish(self) -> str:
        """Whatever is still held back (an incomplete or invalid tail, rendered as decode() renders it)."""
        if self.finished:
            return ""
        self.finished = True
        if self._sent == 0 and len(self._window) == self._anchor:
            return ""
        return self._decode(self._window)[len(self._prefix_text) + self._sent:]


class StopMatcher:
    """Cuts a stream of text deltas at the first stop string.

    The stop that ends generation is the one that is complete earliest in the text (the smallest end; at equal
    ends the longer one): with stops "ab" and "abc", text "abc" stops at "ab", as a stream must (it cannot wait for
    the "c"). The result does not depend on how the text is split into deltas.
    """

    def __init__(self, stop: str | Iterable[str] | None = (), *, include_stop_str_in_output: bool = False) -> None:
        self.stop = check_stop_strings(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._first_chars = frozenset(s[0] for s in self.stop)
        self._longest = max(map(len, self.stop), default=0)
        self._held = ""  # a tail that is a proper prefix of some stop string: undecided
        self.hit: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what is held back) that can be released now; "" after a hit."""
        if self.hit is not None:
            return ""
        if not self.stop or not text:
            return text
        buf = self._held + text
        best = None  # (end, start, stop string)
        for s in self.stop:  # NOTE: buf is the new text plus fewer than MAX_STOP_STRING_CHARS held ones
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            end, start, self.hit = best
            self._held = ""
            return buf[:end] if self.include_stop_str_in_output else buf[:start]
        hold = self._partial(buf)
        self._held = buf[len(buf) - hold:]
        return buf[:len(buf) - hold]

    def _partial(self, buf: str) -> int:
        """The length of the longest tail of ``buf`` that is a proper prefix of a stop string."""
        for i in range(max(0, len(buf) - self._longest + 1), len(buf)):
            if buf[i] in self._first_chars:
                tail = buf[i:]
                if any(len(s) > len(tail) and s.startswith(tail) for s in self.stop):
                    return len(buf) - i
        return 0

    def finish(self) -> str:
        """The text held back for an undecided match (none came): released. "" after a hit."""
        held, self._held = self._held, ""
        return "" if self.hit is not None else held


class TextStream:
    """One request's text: ids -> text deltas (``Detokenizer``) -> cut at stop strings (``StopMatcher``).

    ``feed(ids)`` returns the text to send for those ids ("" while held back); ``finish()`` what to send with the
    last chunk. When ``stop_hit`` is set the text is complete: the caller aborts generation and reports "stop".
    """

    def __init__(self, tokenizer, stop: str | Iterable[str] | None = (), *, include_stop_str_in_output: bool = False,
                 skip_special_tokens: bool = True, keep_special: Iterable[str] = ()) -> None:
        self.detokenizer = Detokenizer(tokenizer, skip_special_tokens=skip_special_tokens, keep_special=keep_special)
        self.matcher = StopMatcher(stop, include_stop_str_in_output=include_stop_str_in_output)

    @property
    def stop_hit(self) -> str | None:
        return self.matcher.hit

    def feed(self, token_ids: Sequence[int]) -> str:
        if self.matcher.hit is not None:
            return ""
        return self.matcher.feed(self.detokenizer.feed(token_ids))

    def finish(self) -> str:
        if self.matcher.hit is not None:
            return ""
        text = self.matcher.feed(self.detokenizer.finish())
        return text + self.matcher.finish()


def text_stream(tokenizer, stop: str | Iterable[str] | None = (), *, include_stop_str_in_output: bool = False,
                skip_special_tokens: bool = True) -> TextStream | None:
    """A request's TextStream, its stop strings checked first (InvalidRequest naming the limit); None when the
    checkpoint has no tokenizer (then stop strings are an error: nothing could match them)."""
    stop = check_stop_strings(stop)
    if tokenizer is None:
        if stop:
            raise InvalidRequest("stop strings need a checkpoint with a tokenizer; use stop_token_ids")
        return None
    return TextStream(tokenizer, stop, include_stop_str_in_output=include_stop_str_in_output,
                      skip_special_tokens=skip_special_tokens)
