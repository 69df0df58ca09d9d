"""Request validation: each error names the value and the limit."""

import pytest

from moeray.request import (DuplicateRequestId, InvalidRequest, RequestLimits, SamplingParams, check_request_id,
                            new_request_id)

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
    ({"temperature": -0.5}, r"temperature must be 0 \(greedy\) or a finite number >= 1e-05; got -0.5"),
    ({"temperature": float("nan")}, "temperature .* got nan"),
    ({"temperature": float("inf")}, "temperature .* got inf"),
    ({"temperature": 1e-30}, "temperature .* got 1e-30"),
    ({"top_p": float("nan")}, r"top_p must lie in \(0, 1\]; got nan"),
    ({"top_p": 1.5}, r"top_p must lie in \(0, 1\]; got 1.5"),
    ({"seed": -1}, r"seed must lie in \[0, 2\*\*64\); got -1"),
    ({"top_p": 0.0}, r"top_p must lie in \(0, 1\]; got 0.0"),
    ({"top_k": -1}, "top_k must be >= 0"),
])
def test_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)


def test_valid_request_passes():
    assert LIMITS.check([1, 2, 99], SamplingParams(max_new_tokens=32)) == [1, 2, 99]


@pytest.mark.parametrize("request_id,message", [
    ("", "1 to 128 printable ASCII characters; got 0 characters"),
    ("x" * 129, "1 to 128 printable ASCII characters; got 129 characters"),
    ("x" * 10**6, "got 1000000 characters"),
    ("a b", r"printable ASCII without spaces; character 1 is ' '"),
    ("a\nb", r"character 1 is '\\n'"),
    ("caf\u00e9", r"character 3 is '\\xe9'"),
])
def test_request_ids_are_bounded_printable_ascii(request_id, message):
    with pytest.raises(InvalidRequest, match=message) as err:
        check_request_id(request_id)
    assert "\n" not in str(err.value)


def test_request_ids():
    assert check_request_id("req-1:a_b/c" + "x" * 117) == "req-1:a_b/c" + "x" * 117
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(check_request_id(i) for i in ids)
    assert issubclass(DuplicateRequestId, InvalidRequest)
