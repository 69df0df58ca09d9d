"""Log-probabilities from the in-process engine against transformers' log-softmax of the same checkpoint: each new
token's (streamed and not), its top alternatives, and every prompt position's (OpenAI's echo), on the six
architectures. The HTTP shapes built from them: tests/serving/test_openai.py."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS
from moeray import EngineConfig, InvalidRequest, LocalEngine, SamplingParams
from moeray.model.tiny import ARCHITECTURES


def check(records, logprobs_TV: torch.Tensor, token_ids: list[int], top: int) -> None:
    """``records[t]`` is token_ids[t]'s TokenLogprob at row t of ``logprobs_TV``, with its ``top`` alternatives."""
    assert [r.token_id for r in records] == token_ids
    for t, r in enumerate(records):
        assert r.logprob == pytest.approx(logprobs_TV[t, r.token_id].item(), abs=1e-4)
        values, ids = logprobs_TV[t].topk(top)
        assert [i for i, _ in r.top] == ids.tolist()
        assert [v for _, v in r.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_new_and_prompt_tokens_match_transformers_log_softmax(arch, checkpoints, oracle):
    ref = oracle(arch)
    prompt = PROMPTS[1]
    with LocalEngine(EngineConfig(model=checkpoints[arch], backend="local", workers=2)) as engine:
        result = engine.generate([prompt], SamplingParams(max_new_tokens=8, logprobs=3))[0]
        logprobs_TV = torch.log_softmax(ref.logits(prompt + result.output_ids).float(), dim=-1)
        check(result.logprobs, logprobs_TV[len(prompt) - 1:], result.output_ids, 3)
        streamed = [r for c in engine.stream(prompt, SamplingParams(max_new_tokens=8, logprobs=3)) for r in
                    c.logprobs or ()]
        check(streamed, logprobs_TV[len(prompt) - 1:], result.output_ids, 3)  # streamed as whole (to float noise)
        echo = engine.prompt_logprobs(prompt, 2)
        assert echo[0] is None, "the first prompt token has nothing before it"
        check(echo[1:], logprobs_TV[:len(prompt) - 1], prompt[1:], 2)


def test_logprobs_are_those_of_the_raw_logits_and_only_when_asked(checkpoints, oracle):
    """Sampled with a temperature, a token's logprob is still the model's own (no temperature); no logprobs asked,
    none computed or sent; a bad count is refused naming the limit."""
    ref = oracle("olmoe")
    prompt = PROMPTS[2]
    with LocalEngine(EngineConfig(model=checkpoints["olmoe"], backend="local", workers=2)) as engine:
        hot = engine.generate([prompt], SamplingParams(max_new_tokens=6, temperature=1.7, seed=3, logprobs=0))[0]
        logprobs_TV = torch.log_softmax(ref.logits(prompt + hot.output_ids).float(), dim=-1)
        check(hot.logprobs, logprobs_TV[len(prompt) - 1:], hot.output_ids, 0)
        plain = engine.generate([prompt], SamplingParams(max_new_tokens=4))[0]
        assert plain.logprobs is None
        assert all(c.logprobs is None for c in engine.stream(prompt, SamplingParams(max_new_tokens=4)))
        assert engine.prompt_logprobs(prompt[:1]) == [None]
        with pytest.raises(InvalidRequest, match=r"prompt logprobs must lie in \[0, 20\]"):
            engine.prompt_logprobs(prompt, 21)
    with pytest.raises(InvalidRequest, match=r"logprobs must lie in \[0, 20\] \(alternatives per token\); got 21"):
        SamplingParams(logprobs=21)
