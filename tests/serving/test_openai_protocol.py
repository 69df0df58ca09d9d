"""The OpenAI-compatible API's request checks without a server (moeray/serving/openai_protocol.py), its error
shape and field naming (moeray/serving/openai_api.py), and the errors table's HTTP column."""

import grpc
import pytest
from ray.exceptions import ActorDiedError

from moeray.request import DuplicateRequestId, InvalidRequest, RequestLimits
from moeray.router.dispatch import ExpertsUnavailable
from moeray.serving import errors
from moeray.serving.openai_responses import error_body, param_of
from moeray.serving.chat_template import chat_messages
from moeray.serving.openai_protocol import DEFAULT_COMPLETION_MAX_TOKENS, MAX_PROMPTS, parse_chat, parse_completion

pytestmark = pytest.mark.ray

LIMITS = RequestLimits(vocab_size=300, max_positions=64, max_new_tokens_cap=40)


class FakeTokenizer:
    """Characters -> code points (mod 300); a chat template that the fake renders itself."""

    def __init__(self, chat_template="yes"):
        self.chat_template = chat_template

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) % 300 for c in text]}

    def apply_chat_template(self, messages, chat_template, tokenize, add_generation_prompt, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected {sorted(kwargs)}")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt
                                                                           else "")


def test_completion_defaults_and_extras():
    p = parse_completion({"prompt": [5, 6]}, LIMITS, None)
    [job] = p.jobs
    assert job.prompt_ids == [5, 6] and job.sampling.max_new_tokens == DEFAULT_COMPLETION_MAX_TOKENS
    assert job.sampling.temperature == 1.0 and p.return_token_ids and not p.stream  # no tokenizer: ids by default
    p = parse_completion({"prompt": "ab", "max_tokens": 3, "temperature": 0, "top_k": -1, "seed": 7,
                          "ignore_eos": True, "stop_token_ids": [2], "stop": "x", "stream": True,
                          "stream_options": {"include_usage": True}, "user": "u", "n": 1}, LIMITS, FakeTokenizer())
    s = p.jobs[0].sampling
    assert p.jobs[0].prompt_ids == [1, 97, 98] and (s.max_new_tokens, s.temperature, s.top_k, s.seed) == (3, 0, 0, 7)
    assert s.ignore_eos and s.stop_token_ids == (2,) and p.stop == ("x",) and p.include_usage and p.stream
    assert not p.return_token_ids
    no_bos = parse_completion({"prompt": "ab", "add_special_tokens": False}, LIMITS, FakeTokenizer())
    assert no_bos.jobs[0].prompt_ids == [97, 98]


def test_several_prompts_are_jobs_in_order():
    p = parse_completion({"prompt": [[5], "a", [7, 8]]}, LIMITS, FakeTokenizer())
    assert [(j.index, j.prompt_ids) for j in p.jobs] == [(0, [5]), (1, [1, 97]), (2, [7, 8])]
    with pytest.raises(InvalidRequest, match=f"at most {MAX_PROMPTS} are allowed"):
        parse_completion({"prompt": [[5]] * (MAX_PROMPTS + 1)}, LIMITS, None)
    with pytest.raises(InvalidRequest, match=r"prompt 1: prompt token id 300 is outside the vocabulary \[0, 300\)"):
        parse_completion({"prompt": [[5], [300]]}, LIMITS, None)


@pytest.mark.parametrize("body,message", [
    ({"prompt": [5], "n": 17}, "n must lie in [1, 16] (choices per prompt); got 17"),
    ({"prompt": [5], "n": 0}, "n must lie in [1, 16] (choices per prompt); got 0"),
    ({"prompt": [5], "max_tokens": 41}, "max_tokens 41 is above the server's cap 40"),
    ({"prompt": [5], "max_tokens": -1}, "max_tokens must be a positive integer (or 0 with echo); got -1"),
    ({"prompt": [5], "max_tokens": 0}, "max_tokens must be a positive integer (or 0 with echo); got 0"),
    ({"prompt": [5], "logprobs": 21}, "logprobs must lie in [0, 20]; got 21"),
    ({"prompt": [5], "prompt_logprobs": -1}, "prompt_logprobs must lie in [0, 20]; got -1"),
    ({"prompt": [5], "logprobs": True}, "logprobs: Input should be a valid integer; got true"),
    ({"prompt": [5] * 30, "max_tokens": 40}, "prompt of 30 tokens plus max_tokens 40 exceeds the model's 64"),
    ({"prompt": [5], "max_tokens": "3"}, "max_tokens: Input should be a valid integer; got '3'"),
    ({"prompt": [5], "max_tokens": 2.5}, "max_tokens: Input should be a valid integer; got 2.5"),
    ({"prompt": [5], "temperature": float("nan")}, "temperature must be 0 (greedy) or a finite number"),
    ({"prompt": [5], "ignore_eos": 1}, "ignore_eos: Input should be a valid boolean; got 1"),
    ({"prompt": [5], "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage: Input should be"),
    ({"prompt": [5], "stop": "x"}, "stop strings need a checkpoint with a tokenizer"),
    ({"prompt": "hello"}, "prompt is text, which needs a checkpoint with a tokenizer"),
    ({"prompt": [5], "echo": True}, "echo needs a checkpoint with a tokenizer (it returns the prompt as text)"),
    ({"prompt": [5], "best_of": 2, "n": 3}, "best_of must lie in [n = 3, 16]; got 2"),
    ({"prompt": [5], "best_of": 3, "stream": True}, "best_of above n cannot be streamed"),
    ({"prompt": [5], "presence_penalty": 2.5}, "presence_penalty must lie in [-2, 2]; got 2.5"),
    ({"prompt": [5], "logit_bias": {"x": 1}}, "logit_bias keys must be token ids; got 'x'"),
    ({"prompt": [5], "logit_bias": {"300": 1}}, "logit_bias token id 300 is outside the vocabulary [0, 300)"),
    ({"prompt": [5], "min_tokens": 20, "max_tokens": 4}, "min_tokens must lie in [0, max_new_tokens 4]; got 20"),
    ({"prompt": [5], "tools": [{"type": "function"}]}, "tools are for /v1/chat/completions"),
    ({"prompt": [5], "functions": [{"name": "f"}]}, "functions is not supported"),
    ({"prompt": [True]}, "prompt[0] must be a string or a list of token ids; got bool"),
    ({"prompt": None}, "prompt must be a string, a list of token ids, or a list of those; got null"),
    ({"prompt": {"a": 1}}, "got dict"),
    ({}, "prompt is required"),
    ("text", "the request body must be a JSON object; got str"),
])
def test_completion_refusals_name_the_field(body, message):
    with pytest.raises(InvalidRequest) as err:
        parse_completion(body, LIMITS, None)
    assert message in str(err.value), str(err.value)


def test_logprobs_fields_become_sampling_and_echo_settings():
    p = parse_completion({"prompt": "hi", "logprobs": 2, "echo": True, "max_tokens": 0}, LIMITS, FakeTokenizer())
    [job] = p.jobs
    assert (p.logprobs, p.echo, p.prompt_logprobs) == (2, True, 2), "echo with logprobs: the prompt's too"
    assert (job.sampling.logprobs, job.generate, job.prompt_text) == (2, False, "hi")
    p = parse_completion({"prompt": [5], "prompt_logprobs": 0, "max_tokens": 3}, LIMITS, None)
    assert (p.logprobs, p.echo, p.prompt_logprobs, p.jobs[0].generate) == (None, False, 0, True)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    p = parse_chat({**chat, "logprobs": True, "top_logprobs": 4}, LIMITS, FakeTokenizer(), None)
    assert (p.logprobs, p.jobs[0].sampling.logprobs) == (4, 4)
    assert parse_chat({**chat, "logprobs": True}, LIMITS, FakeTokenizer(), None).logprobs == 0
    assert parse_chat(chat, LIMITS, FakeTokenizer(), None).logprobs is None
    with pytest.raises(InvalidRequest, match=r"top_logprobs \(3\) needs logprobs: true"):
        parse_chat({**chat, "top_logprobs": 3}, LIMITS, FakeTokenizer(), None)
    with pytest.raises(InvalidRequest, match=r"top_logprobs must lie in \[0, 20\]; got 21"):
        parse_chat({**chat, "logprobs": True, "top_logprobs": 21}, LIMITS, FakeTokenizer(), None)


def test_neutral_values_of_unsupported_fields_are_accepted():
    parse_completion({"prompt": [5], "logprobs": None, "echo": False, "best_of": 1, "presence_penalty": 0.0,
                      "frequency_penalty": 0, "logit_bias": {}, "suffix": None, "some_new_field": [1]}, LIMITS, None)


def test_chat_renders_the_template_and_defaults_to_the_room_left():
    p = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "x"}]},
                   LIMITS, FakeTokenizer(), None)
    [job] = p.jobs
    assert job.prompt_ids == [ord(c) % 300 for c in "<user>hi<assistant>"]  # no BOS added again
    assert job.sampling.max_new_tokens == min(40, 64 - len(job.prompt_ids))
    p = parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "max_completion_tokens": 4},
                   LIMITS, FakeTokenizer(), None)
    assert p.jobs[0].sampling.max_new_tokens == 4


@pytest.mark.parametrize("tokenizer,template,message", [
    (None, None, "need a checkpoint with a tokenizer and a chat template; this one has no tokenizer"),
    (FakeTokenizer(chat_template=None), None, "this checkpoint has none (start the server with --chat-template"),
])
def test_chat_without_tokenizer_or_template_is_a_clear_400(tokenizer, template, message):
    with pytest.raises(InvalidRequest, match=r"chat completions need"):
        parse_chat({"messages": [{"role": "user", "content": "hi"}]}, LIMITS, tokenizer, template)
    with pytest.raises(InvalidRequest) as err:
        parse_chat({"messages": [{"role": "user", "content": "hi"}]}, LIMITS, tokenizer, template)
    assert message in str(err.value)
    # --chat-template supplies one
    parse_chat({"messages": [{"role": "user", "content": "hi"}]}, LIMITS, FakeTokenizer(chat_template=None), "t")


@pytest.mark.parametrize("messages,message", [
    ([], "messages must be a non-empty list"),
    ("hi", "messages must be a non-empty list"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role must be one of"),
    ([{"role": "user", "content": 5}], "messages[0].content must be a string or a list of text parts; got int"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]: only text parts"),
    ([{"role": "assistant", "content": None, "tool_calls": [{}]}],
     "messages[0].tool_calls[0] must be {type: function, function: {name, arguments}}"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}]}],
     "messages[0].tool_calls[0].function.arguments is not JSON"),
    (["x"], "messages[0] must be an object"),
])
def test_bad_messages(messages, message):
    with pytest.raises(InvalidRequest) as err:
        chat_messages(messages)
    assert message in str(err.value)


def test_a_template_that_fails_is_the_requests_fault():
    with pytest.raises(InvalidRequest, match="the chat template cannot render these messages"):
        parse_chat({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": 1}}, LIMITS,
                   FakeTokenizer(), None)


def test_lone_surrogates_are_refused():
    with pytest.raises(InvalidRequest, match=r"prompt is not valid Unicode text: character 1 is a lone surrogate"):
        parse_completion({"prompt": "a\ud800"}, LIMITS, FakeTokenizer())


@pytest.mark.parametrize("message,param", [
    ("max_tokens 9 is above the server's cap 4", "max_tokens"),
    ("temperature: Input should be a valid number; got 'x'", "temperature"),
    ("messages[0].role must be one of system", "messages[0].role"),
    ("stop token id 300 is outside the vocabulary", "stop_token_ids"),
    ("prompt 1: prompt token id 300 is outside", "prompt"),
    ("the request body is not valid JSON", None),
])
def test_the_field_an_error_names(message, param):
    assert param_of(message) == param


@pytest.mark.parametrize("exc,grpc_code,status", [
    (InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (DuplicateRequestId("x"), grpc.StatusCode.ALREADY_EXISTS, 409),
    (errors.Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED, 401),
    (errors.ModelNotFound("x"), grpc.StatusCode.NOT_FOUND, 404),
    (errors.AdmissionFull("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (errors.RequestTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (errors.Draining("x"), grpc.StatusCode.UNAVAILABLE, 503),
    (errors.NotServing("x"), grpc.StatusCode.UNAVAILABLE, 503),
    (ExpertsUnavailable(0, [1], [0]), grpc.StatusCode.UNAVAILABLE, 503),
    (ActorDiedError(), grpc.StatusCode.UNAVAILABLE, 503),
])
def test_one_table_gives_both_columns(exc, grpc_code, status):
    assert errors.status_of(exc)[0] == grpc_code
    assert errors.http_status_of(exc)[0] == status
    assert errors.http_status_of(KeyError("x")) is None


def test_error_body_is_openais_shape():
    assert error_body(429, "full") == {"error": {"message": "full", "type": "rate_limit_error", "param": None,
                                                 "code": "rate_limit_exceeded"}}
    assert error_body(400, "bad", "n")["error"] == {"message": "bad", "type": "invalid_request_error", "param": "n",
                                                    "code": None}
