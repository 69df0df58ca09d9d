"""Log-probabilities from the in-process engine against transformers' log-softmax of the same checkpoint: each new
token's (streamed and not), its top alternatives, and every prompt position's (OpenAI's echo), on the six
architectures. The HTTP shapes built from them: tests/serving/test_openai.py."""

from __future__ import annotations

import math

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


# -- logit adjustments: penalties, logit_bias, min_tokens, min_p ----------------------------------------------
def _reference_greedy(model, prompt: list[int], n: int, *, presence=0.0, frequency=0.0) -> list[int]:
    """Greedy decoding on transformers' logits with OpenAI's presence and frequency penalties applied by hand
    (transformers has no processor for them): the reference the engine must equal."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(ids[len(prompt):], dtype=torch.long), minlength=logits.numel())
        logits -= frequency * counts + presence * (counts > 0)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_penalties_bias_and_min_tokens_equal_a_reference_on_transformers_logits(checkpoints, oracle):
    """repetition_penalty, logit_bias and min_tokens against transformers' own generate (its
    RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor and min_new_tokens); presence and frequency
    penalties against the reference above. Greedy, so any difference in the adjusted logits changes a token."""
    ref = oracle("qwen3_moe")
    model, prompt, n = ref.model, PROMPTS[3] * 3, 12  # a repetitive prompt: the penalties bite
    plain = ref.greedy(prompt, n)
    with LocalEngine(EngineConfig(model=checkpoints["qwen3_moe"], backend="local", workers=2)) as engine:
        def ours(**kw) -> list[int]:
            return engine.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True,
                                                            **kw))[0].output_ids

        def theirs(**kw) -> list[int]:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, **kw)
            return out[0, len(prompt):].tolist()

        assert ours(repetition_penalty=1.8) == theirs(repetition_penalty=1.8) != plain
        biased = {plain[0]: -100.0, plain[1]: 5.0}
        assert ours(logit_bias=tuple(biased.items())) == theirs(
            sequence_bias={(t,): b for t, b in biased.items()}) != plain
        eos = 2
        assert ours(min_tokens=n, stop_token_ids=(plain[2],)) == theirs(
            min_new_tokens=n, eos_token_id=[eos, plain[2]])
        for presence, frequency in ((1.5, 0.0), (0.0, 1.2), (-0.5, 0.8)):
            assert ours(presence_penalty=presence, frequency_penalty=frequency) == _reference_greedy(
                model, prompt, n, presence=presence, frequency=frequency)


def test_min_p_keeps_only_tokens_near_the_top_and_a_seed_reproduces(checkpoints):
    with LocalEngine(EngineConfig(model=checkpoints["olmoe"], backend="local", workers=2)) as engine:
        def run(seed, **kw):
            return engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=3.0, seed=seed,
                                                                ignore_eos=True, logprobs=1, **kw))[0]

        assert run(4, min_p=0.3).output_ids == run(4, min_p=0.3).output_ids, "same seed, same output"
        # at temperature 3, min_p 0.5 keeps a token only where (its logprob - the top's) / 3 >= log(0.5)
        for r in run(5, min_p=0.5).logprobs:
            assert r.logprob >= r.top[0][1] + 3 * math.log(0.5) - 1e-5, r
        unfiltered = [r.rank for seed in range(4) for r in run(seed).logprobs]
        assert max(unfiltered) > 1, "without min_p the temperature does pick lower-ranked tokens"
        assert [r.rank for r in run(6, min_p=1.0).logprobs] == [1] * 10, "min_p 1: only the top token is left"


@pytest.mark.parametrize("kw,message", [
    ({"presence_penalty": 2.5}, "presence_penalty must lie in [-2, 2]; got 2.5"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must lie in [-2, 2]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must lie in (0, 10.0] (1: none); got 0.0"),
    ({"min_p": 1.5}, "min_p must lie in [0, 1]; got 1.5"),
    ({"min_tokens": 20, "max_new_tokens": 16}, "min_tokens must lie in [0, max_new_tokens 16]; got 20"),
    ({"logit_bias": ((3, 101.0),)}, "logit_bias for token 3 must lie in [-100, 100]; got 101.0"),
])
def test_bad_logit_adjustments_are_refused_naming_the_limit(kw, message):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**kw)
    assert message in str(err.value)
