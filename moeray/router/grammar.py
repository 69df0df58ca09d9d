"""Structured outputs: a request's ``StructuredOutput`` compiled with xgrammar into a matcher that masks, before each
sampling, the tokens its language does not allow next (the approach vLLM and SGLang take, with the same library).

The router holds one ``Grammars``: the checkpoint's tokenizer as xgrammar sees it (its vocabulary padded to the
model's, its stop tokens the router's), a compiler with xgrammar's cache, and a thread on which the masks of a step
are filled while its forward runs (xgrammar's matchers work outside the GIL), so grammar requests do not stall the
batch. A sequence keeps its matcher from admission to the end; a preempted one keeps it too (its output stays).

xgrammar is optional (``pip install moeray[structured]``); without it, a structured request is refused naming it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import re
import threading

import torch

from moeray.request import InvalidRequest, StructuredOutput


class Grammars:
    def __init__(self, checkpoint_path: str, vocab_size: int, stop_ids: frozenset[int]) -> None:
        self._path, self._vocab_size, self._stop_ids = checkpoint_path, vocab_size, sorted(stop_ids)
        self._lock = threading.Lock()
        self._compiler = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _xgr(self):
        try:
            import xgrammar
        except ImportError:
            raise InvalidRequest("structured outputs need xgrammar on the server (pip install moeray[structured])") \
                from None
        return xgrammar

    def _compiler_(self):
        with self._lock:
            if self._compiler is None:
                from transformers import AutoTokenizer

                xgr = self._xgr()
                try:
                    tokenizer = AutoTokenizer.from_pretrained(self._path)
                except (OSError, ValueError):
                    raise InvalidRequest("structured outputs need a checkpoint with a tokenizer") from None
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._stop_ids or None)
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def matcher(self, structured: StructuredOutput):
        """A fresh matcher for ``structured``; InvalidRequest naming what does not compile."""
        return self._xgr().GrammarMatcher(self._compile(structured))

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one Grammars per router, for its lifetime
    def _compile(self, structured: StructuredOutput):
        compiler = self._compiler_()
        try:
            if structured.kind == "json":
                return compiler.compile_builtin_json_grammar()
            if structured.kind == "json_schema":
                json.loads(structured.spec)  # a clear message for text that is not JSON at all
                return compiler.compile_json_schema(structured.spec, any_whitespace=False)
            if structured.kind == "regex":
                return compiler.compile_regex(structured.spec)
            if structured.kind == "choice":
                return compiler.compile_regex("|".join(re.escape(c) for c in structured.choices))
            if structured.kind == "structural_tag":
                return compiler.compile_structural_tag(structured.spec)
            return compiler.compile_grammar(structured.spec)
        except (RuntimeError, ValueError) as e:  # xgrammar's parse and conversion errors; json's
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise InvalidRequest(f"the {structured.kind.replace('_', ' ')} cannot be compiled: {first[:300]}") \
                from None

    def fill_async(self, matchers: list) -> concurrent.futures.Future | None:
        """Start filling the next-token masks of ``matchers`` (None entries: no grammar) on the grammar thread;
        the future gives a [B, V] bool tensor of allowed tokens, or None when no matcher is given."""
        if not any(m is not None for m in matchers):
            return None
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moeray-grammar")
        return self._pool.submit(self._fill, matchers)

    def _fill(self, matchers: list) -> torch.Tensor:
        xgr = self._xgr()
        bitmask = xgr.allocate_token_bitmask(len(matchers), self._vocab_size)
        for b, m in enumerate(matchers):
            if m is not None:
                m.fill_next_token_bitmask(bitmask, b)
        # the bitmask as booleans: every token allowed in rows without a matcher (all bits set)
        logits = torch.zeros(len(matchers), self._vocab_size)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=[b for b, m in enumerate(matchers) if m is not None])
        return logits == 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
