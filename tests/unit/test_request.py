"""Request validation: each error names the value and the limit."""

import pytest

from moeray.request import InvalidRequest, RequestLimits, SamplingParams

LIMITS = RequestLimits(vocab_size=100, max_positions=64, max_new_tokens_cap=32)


@pytest.mark.parametrize("prompt,sampling,message", [
    ([], SamplingParams(), "prompt is empty"),
    ([1, 100], SamplingParams(), r"token id 100 is outside the vocabulary \[0, 100\)"),
    ([-1], SamplingParams(), r"token id -1 is outside"),
    ([1] * 60, SamplingParams(max_new_tokens=8), "60 tokens plus max_new_tokens 8 exceeds the model's 64 positions"),
    ([1], SamplingParams(max_new_tokens=33), "max_new_tokens 33 is above the cap 32"),
    ([1], SamplingParams(stop_token_ids=(100,)), "stop token id 100"),
])
def test_limits(prompt, sampling, message):
    with pytest.raises(InvalidRequest, match=message):
        LIMITS.check(prompt, sampling)


@pytest.mark.parametrize("kwargs,message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer; got 0"),
    ({"max_new_tokens": -3}, "got -3"),
    ({"temperature": -0.5}, "temperature must be >= 0; got -0.5"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, r"top_p must lie in \(0, 1\]; got 0.0"),
    ({"top_k": -1}, "top_k must be >= 0"),
])
def test_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)


def test_valid_request_passes():
    assert LIMITS.check([1, 2, 99], SamplingParams(max_new_tokens=32)) == [1, 2, 99]
