"""The OpenAI-compatible HTTP API on real servers (Serve's HTTP proxy on 127.0.0.1), driven by the official
``openai`` client and by ``curl -N``, against transformers on the same checkpoint (a tiny Mixtral with a byte-level
BPE tokenizer and a chat template saved beside it).

Two servers: one in this process (``start_serving``, behind the 'loading' stand-in first; API key from the
environment; admission 2 running + 2 queued), and ``moeray serve`` in a subprocess (--served-model-name, --api-key,
--chat-template, SIGTERM drain), started first so that its start overlaps the other's.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import openai
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from conftest import Oracle, _ray_start
from moeray.serving.ports import free_port
from moeray import Engine, EngineConfig
from moeray.serving import lifecycle
from moeray.serving.app import start_serving
from moeray.serving.gen import generate_pb2, generate_pb2_grpc
from moeray.serving.auth import API_KEY_ENV, Credentials

pytestmark = pytest.mark.ray
API_KEY = "sk-moeray-test"
CLI_KEY = "sk-moeray-cli"
POSITIONS = 512
CAP = 400
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CLI_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
CORPUS = "hello world, the quick brown fox jumps over the lazy dog. experts route tokens to workers. "
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "hello, quick fox"}]



def make_chat_checkpoint(path) -> str:
    """A tiny Mixtral whose vocabulary is a byte-level BPE tokenizer's (trained here), with a chat template."""
    from moeray.model.tiny import ARCHITECTURES, save_tokenized_checkpoint

    return str(save_tokenized_checkpoint("mixtral", path, corpus=CORPUS, chat_template=TEMPLATE,
                                         seed=ARCHITECTURES.index("mixtral"), max_position_embeddings=POSITIONS))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def cli(checkpoint, tmp_path_factory):
    """``moeray serve`` in a subprocess (stdout lines collected as they come); ``launch()`` starts it again on new
    ports (a port picked free may be taken by the time Serve binds it, here by the other cluster starting)."""
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(CLI_TEMPLATE)
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    env["MOERAY_HOME"] = str(tmp_path_factory.mktemp("home"))
    state: dict = {}

    def launch() -> None:
        grpc_port, http_port = free_port(), free_port()
        log = tmp_path_factory.mktemp("log") / "serve.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "moeray.cli", "serve", "--model", checkpoint, "--port", str(grpc_port),
             "--http-port", str(http_port), "--workers", "2", "--served-model-name", "chatty", "--api-key", CLI_KEY,
             "--chat-template", str(template), "--drain-timeout", "60", "--max-new-tokens-cap", str(CAP),
             "--tool-call-parser", "openai"],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
        state.update(proc=proc, lines=lines, http=f"http://127.0.0.1:{http_port}", grpc=f"127.0.0.1:{grpc_port}",
                     log=log, launch=launch)

    launch()
    try:
        yield state
    finally:
        if state["proc"].poll() is None:
            state["proc"].kill()
            state["proc"].wait(timeout=30)


def _during_loading(http: str, grpc_address: str) -> dict:
    channel = grpc.insecure_channel(grpc_address)
    try:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            list(generate_pb2_grpc.GenerateServiceStub(channel).Generate(
                generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=[5])), timeout=30))
    finally:
        channel.close()
    return {"health": curl(http, "/health", key=None), "completion": curl(http, "/v1/completions", {"prompt": [5]}),
            "grpc_health": check.status, "grpc_generate": (err.value.code(), err.value.details())}


@pytest.fixture(scope="module")
def server(checkpoint, cli):
    with _ray_start():
        grpc_port, http_port = free_port(), free_port()
        http, address = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        lifecycle.serve_loading(grpc_port=grpc_port, http_port=http_port, host="127.0.0.1")
        loading = _during_loading(http, address)
        engine = Engine(EngineConfig(model=checkpoint, workers=2, routers=1, max_new_tokens_cap=CAP))
        model = start_serving(engine, grpc_port=grpc_port, http_port=http_port, max_ongoing_requests=2,
                              max_queued_requests=2, credentials=Credentials(api_key=API_KEY))
        channel = grpc.insecure_channel(address)
        client = openai.OpenAI(base_url=f"{http}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        oracle = Oracle(checkpoint)
        from transformers import AutoTokenizer

        yield {"http": http, "model": model, "engine": engine, "client": client, "loading": loading,
               "oracle": oracle, "tokenizer": AutoTokenizer.from_pretrained(checkpoint), "channel": channel,
               "generate": generate_pb2_grpc.GenerateServiceStub(channel)}
        channel.close()
        serve.shutdown()
        engine.shutdown()


# -- helpers -------------------------------------------------------------------------------------------------
def curl(base: str, path: str, body=None, key: str | None = API_KEY, method: str | None = None,
         raw: str | None = None) -> tuple[int, str]:
    """(HTTP status, body) of one request made by ``curl -N`` (no buffering: SSE events as they come)."""
    args = ["curl", "-sS", "-N", "--max-time", "120", "-w", "\n%{http_code}", base + path]
    if key is not None:
        args += ["-H", f"Authorization: Bearer {key}"]
    if body is not None or raw is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary", raw if raw is not None else json.dumps(body)]
    if method:
        args += ["-X", method]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr
    text, _, status = proc.stdout.rpartition("\n")
    return int(status), text


def sse(text: str) -> list:
    """The events of an SSE body: JSON objects, and the final '[DONE]'."""
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.strip()]
    assert all(not e.startswith("data:") for e in events)
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


def expected(server, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str, str]:
    """transformers' greedy ids, their text (special tokens skipped, as the stream does) and finish reason."""
    ids = server["oracle"].greedy(prompt_ids, max_tokens)
    reason = "stop" if ids and ids[-1] in server["oracle"].eos else "length"
    return ids, server["tokenizer"].decode(ids, skip_special_tokens=True), reason


def assert_error(status: int, body: str, want_status: int, *words: str, param=...) -> dict:
    assert status == want_status, (status, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    for w in words:
        assert w in error["message"], (w, error)
    if param is not ...:
        assert error["param"] == param, error
    return error


def still_right(server) -> None:
    ids, text, reason = expected(server, [7, 8, 9], 6)
    out = server["client"].completions.create(model=server["model"], prompt=[7, 8, 9], max_tokens=6, temperature=0)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (text, reason)


# -- loading, models, auth -----------------------------------------------------------------------------------
def test_loading_answers_503_and_not_serving(server):
    loading = server["loading"]
    assert_error(*loading["health"], 503, "loading")
    assert_error(*loading["completion"], 503, "loading")
    assert loading["grpc_health"] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert loading["grpc_generate"][0] == grpc.StatusCode.UNAVAILABLE, loading["grpc_generate"]
    status, body = curl(server["http"], "/health", key=None)  # health needs no key
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_models_lists_the_grpc_model_name(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == [server["model"]] == ["tiny-chat"]
    assert server["client"].models.retrieve("tiny-chat").id == "tiny-chat"
    info = generate_pb2_grpc.GenerateServiceStub(server["channel"]).GetModelInfo(generate_pb2.GetModelInfoRequest())
    assert info.model_name == server["model"]


def test_api_key_is_required(server):
    for key in (None, "sk-wrong"):
        status, body = curl(server["http"], "/v1/completions", {"prompt": [5], "max_tokens": 2}, key=key)
        error = assert_error(status, body, 401, "API key" if key is None else "the API key is wrong")
        assert error["code"] == "invalid_api_key" and "sk-wrong" not in body and API_KEY not in body
    bad = openai.OpenAI(base_url=server["http"] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    still_right(server)


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as err:
        server["client"].completions.create(model="gpt-4o", prompt=[5], max_tokens=2)
    assert "model 'gpt-4o' is not served here" in str(err.value) and err.value.code == "model_not_found"
    assert_error(*curl(server["http"], "/v1/models/gpt-4o"), 404, "'gpt-4o'")
    assert_error(*curl(server["http"], "/v2/nothing"), 404, "no route GET '/v2/nothing'")
    still_right(server)


# -- completions -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [[5, 6, 7], "the quick fox"])
def test_greedy_completion_equals_transformers(server, prompt):
    ids = prompt if isinstance(prompt, list) else server["tokenizer"](prompt)["input_ids"]
    want_ids, want_text, reason = expected(server, ids, 24)
    client = server["client"]
    out = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=24, temperature=0,
                                    extra_body={"return_token_ids": True})
    choice = out.choices[0]
    assert (choice.text, choice.finish_reason) == (want_text, reason)
    assert choice.model_extra["token_ids"] == want_ids and choice.model_extra["prompt_token_ids"] == ids
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(ids), len(want_ids), len(ids) + len(want_ids))
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "tiny-chat"
    chunks = list(client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want_ids)
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_several_prompts_are_choices_in_order(server):
    prompts = [[5, 6, 7], [40, 41], [9, 10, 11, 12]]
    want = [expected(server, p, 8) for p in prompts]
    out = server["client"].completions.create(model="tiny-chat", prompt=prompts, max_tokens=8, temperature=0)
    assert [(c.index, c.text, c.finish_reason) for c in out.choices] == [(i, w[1], w[2]) for i, w in enumerate(want)]
    assert out.usage.prompt_tokens == 9 and out.usage.completion_tokens == sum(len(w[0]) for w in want)
    status, body = curl(server["http"], "/v1/completions", {"prompt": prompts, "max_tokens": 8, "temperature": 0,
                                                           "stream": True})
    assert status == 200
    texts = {i: "" for i in range(3)}
    for event in sse(body)[:-1]:
        for c in event["choices"]:
            texts[c["index"]] += c["text"]
    assert [texts[i] for i in range(3)] == [w[1] for w in want]


def test_stop_string_spanning_tokens_ends_generation(server):
    prompt = [9, 10, 11]
    ids, text, _ = expected(server, prompt, 40)
    decode = lambda k: server["tokenizer"].decode(ids[:k], skip_special_tokens=True)
    # a stop string made of the last character of one token's text and the first of the next one's (the random
    # model writes many invalid bytes: both must be real characters)
    at = next(len(decode(k)) for k in range(1, len(ids)) if decode(k) and decode(k + 1).startswith(decode(k))
              and len(decode(k + 1)) > len(decode(k)) and "\ufffd" not in decode(k + 1)[len(decode(k)) - 1:
                                                                                   len(decode(k)) + 1])
    stop = text[at - 1:at + 1]
    assert "\ufffd" not in stop and len(stop) == 2
    start = text.index(stop)
    through = next(k for k in range(1, len(ids) + 1) if stop in decode(k))
    client = server["client"]
    out = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=40, temperature=0, stop=[stop])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (text[:start], "stop")
    assert out.usage.completion_tokens == through
    chunks = list(client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=40, temperature=0,
                                            stop=stop, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text[:start]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == through
    kept = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=40, temperature=0, stop=stop,
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:start + len(stop)]
    # the router's request was aborted at the stop, not run to max_tokens
    from ray._private.test_utils import wait_for_condition

    router = server["engine"].routers[0]
    wait_for_condition(lambda: ray.get(router.stats.remote())["running"] == 0, timeout=30)


# -- chat ------------------------------------------------------------------------------------------------------
def test_chat_completion_equals_transformers_on_the_templated_prompt(server):
    prompt = server["tokenizer"].apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    want_ids, want_text, reason = expected(server, prompt, 20)
    client = server["client"]
    out = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=20, temperature=0)
    choice = out.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", want_text, reason)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(want_ids))
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [reason]
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        len(prompt), len(want_ids))
    # the same over curl -N: role first, then content deltas, then the finish reason, usage, [DONE] last
    status, body = curl(server["http"], "/v1/chat/completions", {
        "model": "tiny-chat", "messages": MESSAGES, "max_completion_tokens": 20, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200
    events = sse(body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-2]) == want_text
    assert events[-3]["choices"][0]["finish_reason"] == reason and events[-2]["usage"]["total_tokens"] == len(
        prompt) + len(want_ids)


# -- log-probabilities -------------------------------------------------------------------------------------------
def _log_softmax(server, ids: list[int]):
    import torch

    return torch.log_softmax(server["oracle"].logits(ids).float(), dim=-1)


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server):
    """lm-evaluation-harness's log-likelihood request: echo, logprobs 1, max_tokens 0, a text prompt: the prompt's
    text back, each of its tokens' logprobs (None first) and top alternative, equal to transformers'."""
    tok = server["tokenizer"]
    prompt = "the quick brown fox jumps"
    ids = tok(prompt)["input_ids"]
    lp_TV = _log_softmax(server, ids)
    out = server["client"].completions.create(model="tiny-chat", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                              temperature=0)
    choice = out.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([t]) for t in ids] and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([lp_TV[t - 1, ids[t]].item() for t in range(1, len(ids))],
                                                  abs=1e-4)
    assert lp.top_logprobs[0] is None
    for t in range(1, len(ids)):
        best = int(lp_TV[t - 1].argmax())
        assert lp.top_logprobs[t] == pytest.approx({tok.decode([best]): lp_TV[t - 1, best].item()}, abs=1e-4)
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:k]) for k in range(len(ids))]
    # echo and generation together, streamed: the prompt's event first, then the new tokens, offsets running on
    want_ids, want_text, _ = expected(server, ids, 5)
    events = sse(curl(server["http"], "/v1/completions", {"prompt": prompt, "max_tokens": 5, "echo": True,
                                                          "logprobs": 2, "temperature": 0, "stream": True})[1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == prompt + want_text
    tokens = [t for e in events[:-1] if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for e in events[:-1] if e["choices"][0]["logprobs"]
               for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == [tok.decode([t]) for t in ids + want_ids]
    assert offsets == [sum(len(x) for x in tokens[:k]) for k in range(len(tokens))]
    # vLLM's prompt_logprobs: the prompt token with its rank, and the alternatives
    body = json.loads(curl(server["http"], "/v1/completions", {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 1,
                                                               "temperature": 0})[1])
    first, second = body["choices"][0]["prompt_logprobs"][:2]
    assert first is None and second[str(ids[1])]["logprob"] == pytest.approx(lp_TV[0, ids[1]].item(), abs=1e-4)
    assert second[str(ids[1])]["rank"] == 1 + int((lp_TV[0] > lp_TV[0, ids[1]]).sum())


def test_chat_logprobs_equal_transformers_streamed_and_whole(server):
    prompt = server["tokenizer"].apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    want_ids, want_text, _ = expected(server, prompt, 8)
    lp_TV = _log_softmax(server, prompt + want_ids)[len(prompt) - 1:]
    client, tok = server["client"], server["tokenizer"]
    out = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in want_ids]
    assert [c.logprob for c in content] == pytest.approx([lp_TV[k, t].item() for k, t in enumerate(want_ids)],
                                                         abs=1e-4)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    for k, c in enumerate(content):
        assert [a.token for a in c.top_logprobs] == [tok.decode([t]) for t in lp_TV[k].topk(3).indices.tolist()]
    streamed = [c for chunk in client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    plain = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_penalties_and_logit_bias_through_the_openai_client_equal_transformers(server):
    """OpenAI's presence and frequency penalties and logit_bias, vLLM's repetition_penalty and min_tokens, greedy:
    the same tokens as transformers' logits adjusted by the same rules (its own processors where it has them)."""
    import torch

    model, prompt, n = server["oracle"].model, [7, 8, 9, 7, 8, 9, 7, 8], 10
    plain = server["oracle"].greedy(prompt, n)

    def reference(presence=0.0, frequency=0.0, bias=None) -> list[int]:
        ids = list(prompt)
        for _ in range(n):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].float()
            for t, b in (bias or {}).items():
                logits[t] += b
            counts = torch.bincount(torch.tensor(ids[len(prompt):], dtype=torch.long), minlength=logits.numel())
            logits -= frequency * counts + presence * (counts > 0)
            ids.append(int(logits.argmax()))
        return ids[len(prompt):]

    def ours(**extra) -> list[int]:
        out = server["client"].completions.create(model="tiny-chat", prompt=prompt, max_tokens=n, temperature=0,
                                                  extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
        return out.choices[0].model_extra["token_ids"]

    bias = {plain[0]: -100.0, plain[1]: 3.0}
    assert ours(presence_penalty=0.8, frequency_penalty=1.1, logit_bias={str(t): b for t, b in bias.items()}) == \
        reference(presence=0.8, frequency=1.1, bias=bias)
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, repetition_penalty=1.6)
    assert ours(repetition_penalty=1.6) == hf[0, len(prompt):].tolist()


def test_n_choices_share_one_prefill_and_a_seed_reproduces_them(server):
    """n = 3 sampled choices of one prompt: indices 0-2, the same texts again for the same seed, choice k that of
    n = 1 with seed + k; the second and third reuse the first's prompt blocks (prefix cache hits); usage counts the
    prompt once. Greedy n = 2: both equal transformers."""
    client, router = server["client"], server["engine"].routers[0]
    prompt = list(range(10, 50))  # 40 tokens: whole blocks to share

    def texts(**kw) -> list[str]:
        out = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=6, temperature=1.0, **kw)
        assert [c.index for c in out.choices] == list(range(kw.get("n", 1)))
        return [c.text for c in out.choices], out.usage

    before = ray.get(router.kv_stats.remote())
    three, usage = texts(n=3, seed=11)
    after = ray.get(router.kv_stats.remote())
    shared = (len(prompt) - 1) // before.block_size * before.block_size
    assert after.prefix_hits - before.prefix_hits >= 2 * shared, "choices 2 and 3 reuse choice 1's prompt blocks"
    assert usage.prompt_tokens == len(prompt) and len(set(three)) > 1
    assert texts(n=3, seed=11)[0] == three
    assert [texts(seed=11 + k)[0][0] for k in range(3)] == three
    want = expected(server, prompt, 6)[1]
    greedy = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=6, temperature=0, n=2)
    assert [c.text for c in greedy.choices] == [want, want]
    # best_of 3, n 1: the candidate of the highest mean logprob per token among the same three (same seeds)
    scored = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=6, temperature=1.0, n=3,
                                       seed=11, logprobs=0)
    mean = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in scored.choices]
    best = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=6, temperature=1.0, n=1,
                                     best_of=3, seed=11)
    assert [c.index for c in best.choices] == [0] and best.choices[0].logprobs is None
    assert best.choices[0].text == scored.choices[max(range(3), key=lambda k: (mean[k], -k))].text
    assert best.usage.prompt_tokens == len(prompt)


LM_EVAL_MC = [{"q": "the quick brown", "choices": [" fox", " dog", " world"], "gold": 0},
              {"q": "hello", "choices": [" world", " fox", " lazy"], "gold": 0},
              {"q": "experts route tokens to", "choices": [" workers", " the", " dog"], "gold": 0},
              {"q": "jumps over the lazy", "choices": [" dog", " fox"], "gold": 0}]
LM_EVAL_GEN = [{"q": "the quick brown fox", "a": " jumps"}, {"q": "experts route", "a": " tokens"},
               {"q": "hello world,", "a": " the"}]


def _lm_eval_tasks(root) -> str:
    """A multiple-choice task and a generation task over local JSON Lines files, as lm-evaluation-harness reads
    them (its `json` dataset loader: no hub)."""
    for name, docs in (("mc", LM_EVAL_MC), ("gen", LM_EVAL_GEN)):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
    (root / "mc.yaml").write_text("task: moeray_mc\n" + common.format(path=root / "mc.jsonl") + (
        "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: gold\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n"))
    (root / "gen.yaml").write_text("task: moeray_gen\n" + common.format(path=root / "gen.jsonl") + (
        "output_type: generate_until\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{a}}\"\n"
        "target_delimiter: \"\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"))
    return str(root)


def test_lm_evaluation_harness_scores_moeray_as_it_scores_transformers(server, checkpoint, tmp_path, monkeypatch):
    """lm-evaluation-harness, unchanged: the same local tasks with its own `hf` backend (transformers in this
    process) and with `local-completions` against the server (echo + logprobs for log-likelihoods, its remote
    tokenizer over /tokenizer_info and /tokenize): per-choice log-likelihoods within 1e-3, the same greedy flags,
    texts and accuracy."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    tasks = TaskManager(include_path=_lm_eval_tasks(tmp_path))
    run = {}
    for backend, args in (("hf", f"pretrained={checkpoint},dtype=float32,device=cpu"),
                          ("local-completions", f"base_url={server['http']}/v1/completions,model=tiny-chat,"
                                                f"auth_token={API_KEY},num_concurrent=2,max_retries=1")):
        run[backend] = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=["moeray_mc", "moeray_gen"],
                                               task_manager=tasks, log_samples=True, batch_size=1)
    hf, ours = run["hf"], run["local-completions"]
    for task in ("moeray_mc", "moeray_gen"):
        theirs_s, ours_s = hf["samples"][task], ours["samples"][task]
        assert [s["doc_id"] for s in theirs_s] == [s["doc_id"] for s in ours_s]
        for a, b in zip(theirs_s, ours_s):
            if task == "moeray_mc":
                assert [g for _, g in a["filtered_resps"]] == [g for _, g in b["filtered_resps"]]
                assert [ll for ll, _ in b["filtered_resps"]] == pytest.approx(
                    [ll for ll, _ in a["filtered_resps"]], abs=1e-3)
            else:
                assert a["filtered_resps"] == b["filtered_resps"]
    assert hf["results"]["moeray_mc"]["acc,none"] == ours["results"]["moeray_mc"]["acc,none"]
    assert hf["results"]["moeray_gen"]["exact_match,none"] == ours["results"]["moeray_gen"]["exact_match,none"]


def test_structured_outputs_through_the_openai_client(server):
    """client.chat.completions.parse with three pydantic models (response_format json_schema, strict) returns valid
    objects, streamed and whole agree; vLLM's guided_choice and guided_regex hold; a schema that does not compile,
    or two structured outputs at once, is a 400 naming it."""
    import enum
    import re

    from pydantic import BaseModel, Field

    class Pet(enum.Enum):
        fox = "fox"
        dog = "dog"

    class Animal(BaseModel):
        pet: Pet
        hungry: bool

    class Point(BaseModel):
        x: int = Field(ge=0, le=9)
        y: int = Field(ge=-5, le=5)

    class Verdict(BaseModel):
        label: str = Field(pattern="^(yes|no)$")
        score: int = Field(ge=1, le=3)

    client = server["client"]
    for model in (Animal, Point, Verdict):
        parsed = client.chat.completions.parse(model="tiny-chat", messages=MESSAGES, response_format=model,
                                               max_tokens=60, temperature=0)
        value = parsed.choices[0].message.parsed
        assert isinstance(value, model) and parsed.choices[0].finish_reason == "stop", parsed
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=60, temperature=0, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": model.__name__, "strict": True,
                                                                    "schema": model.model_json_schema()}})
            if c.choices)
        assert model.model_validate_json(streamed) == value
    out = client.completions.create(model="tiny-chat", prompt="the quick", max_tokens=20, temperature=0.8, seed=1,
                                    extra_body={"guided_choice": ["fox", "lazy dog"]})
    assert out.choices[0].text in ("fox", "lazy dog")
    out = client.completions.create(model="tiny-chat", prompt="hello", max_tokens=20, temperature=0,
                                    extra_body={"guided_regex": "[a-f]{3}[0-9]"})
    assert re.fullmatch("[a-f]{3}[0-9]", out.choices[0].text)
    assert_error(*curl(server["http"], "/v1/completions", {"prompt": "hi", "guided_json": {"type": "bogus"}}), 400,
                 "the json schema cannot be compiled")
    assert_error(*curl(server["http"], "/v1/completions", {"prompt": "hi", "guided_regex": "a",
                                                           "guided_choice": ["b"]}), 400,
                 "set one structured output at a time; got guided_choice, guided_regex")
    still_right(server)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "enum": ["Paris", "Rome"]},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 3}},
                                               "required": ["city", "days"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["a", "b"], "additionalProperties": False}}}]


def test_tool_calls_round_trip_with_required_and_named_tool_choice(server):
    """tool_choice required: the answer is one or more calls of the offered tools, with arguments valid for their
    schemas, finish_reason tool_calls, streamed as tool_calls deltas that assemble to the same calls; a named
    function is that call; the calls and a tool's result go back as messages and the model answers."""
    client = server["client"]
    out = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                         max_tokens=120, temperature=0, parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert arguments["city"] in ("Paris", "Rome") and 1 <= arguments["days"] <= 3
    else:
        assert call.function.name == "add" and set(arguments) == {"a", "b"}
    assert call.id.startswith("call_") and call.type == "function"
    named = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, tools=TOOLS, max_tokens=120,
                                           temperature=0, tool_choice={"type": "function",
                                                                       "function": {"name": "add"}})
    [add] = named.choices[0].message.tool_calls
    assert add.function.name == "add" and set(json.loads(add.function.arguments)) == {"a", "b"}
    deltas = [d for c in client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0,
        parallel_tool_calls=False, stream=True) if c.choices for d in (c.choices[0].delta.tool_calls or ())]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, call.function.name, call.function.arguments)]
    back = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                       {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    answer = client.chat.completions.create(model="tiny-chat", messages=back, tools=TOOLS, max_tokens=8,
                                            temperature=0, tool_choice="none")
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")


def test_tokenize_detokenize_and_tokenizer_info_in_vllms_shapes(server):
    tok, http = server["tokenizer"], server["http"]
    status, body = curl(http, "/tokenize", {"prompt": "hello world", "return_token_strs": True})
    out = json.loads(body)
    ids = tok("hello world")["input_ids"]
    assert status == 200 and out == {"count": len(ids), "max_model_len": POSITIONS, "tokens": ids,
                                     "token_strs": tok.convert_ids_to_tokens(ids)}
    templated = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert json.loads(curl(http, "/v1/tokenize", {"messages": MESSAGES})[1])["tokens"] == templated
    assert json.loads(curl(http, "/detokenize", {"tokens": ids})[1]) == {"prompt": tok.decode(ids)}
    info = json.loads(curl(http, "/tokenizer_info")[1])
    assert (info["eos_token"], info["model_max_length"], info["vocab_size"]) == ("</s>", POSITIONS, len(tok))
    assert_error(*curl(http, "/detokenize", {"tokens": [10**6]}), 400, "token id 1000000 is outside the vocabulary")
    assert_error(*curl(http, "/tokenize", {"prompt": "x", "messages": MESSAGES}), 400, "a prompt (text) or messages")
    assert_error(*curl(http, "/tokenize", {"prompt": "x"}, key="sk-wrong"), 401)


def test_continuous_usage_stats_put_usage_on_every_chunk(server):
    events = sse(curl(server["http"], "/v1/completions", {
        "prompt": [7, 8, 9], "max_tokens": 6, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})[1])[:-1]
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert all(e["usage"]["prompt_tokens"] == 3 for e in events) and counts == sorted(counts) and counts[-1] == 6
    assert events[-1]["choices"] == []


def test_a_client_that_leaves_stops_its_generation(server):
    """curl killed after the first event: the router request is aborted and the admission place freed."""
    from ray._private.test_utils import wait_for_condition

    stream = subprocess.Popen(
        ["curl", "-sS", "-N", server["http"] + "/v1/completions", "-H", f"Authorization: Bearer {API_KEY}",
         "--data-binary", json.dumps({"prompt": [5, 6], "max_tokens": CAP, "ignore_eos": True, "stream": True})],
        stdout=subprocess.PIPE, text=True)
    assert stream.stdout.readline().startswith("data: {")
    router = server["engine"].routers[0]
    assert ray.get(router.stats.remote())["running"] == 1
    stream.kill()
    stream.wait(timeout=30)
    admitted = lambda: serve.get_app_handle("moeray").admission_stats.remote().result(timeout_s=30)["admitted"]
    wait_for_condition(lambda: ray.get(router.stats.remote())["running"] == 0 and admitted() == 0, timeout=30)
    still_right(server)


# -- errors ----------------------------------------------------------------------------------------------------
BAD = {
    "temperature negative": ({"prompt": [5], "temperature": -1}, "temperature", "temperature must be 0 (greedy)"),
    "temperature text": ({"prompt": [5], "temperature": "hot"}, "temperature", "Input should be a valid number"),
    "top_p above 1": ({"prompt": [5], "temperature": 1, "top_p": 1.5}, "top_p", "top_p must lie in (0, 1]"),
    "max_tokens 0": ({"prompt": [5], "max_tokens": 0}, "max_tokens", "max_tokens must be a positive integer"),
    "max_tokens over cap": ({"prompt": [5], "max_tokens": CAP + 1}, "max_tokens", f"is above the server's cap {CAP}"),
    "positions": ({"prompt": [5] * 300, "max_tokens": 300}, "prompt", "exceeds the model's 512 positions"),
    "n 17": ({"prompt": [5], "n": 17}, "n", "n must lie in [1, 16]"),
    "token outside vocab": ({"prompt": [5, 10**6]}, "prompt", "outside the vocabulary [0, 300)"),
    "token not int": ({"prompt": [5, 1.5]}, "prompt[1]", "must be a token id"),
    "empty prompt": ({"prompt": []}, "prompt", "prompt must be a string, a list of token ids"),
    "no prompt": ({"max_tokens": 2}, "prompt", "prompt is required"),
    "stop too many": ({"prompt": [5], "stop": ["a"] * 17}, "stop", "at most 16"),
    "stop not str": ({"prompt": [5], "stop": [1]}, "stop[0]", "must be a string"),
    "stop token": ({"prompt": [5], "stop_token_ids": [300]}, "stop_token_ids", "stop token id 300 is outside"),
    "lone surrogate": ({"prompt": "a\ud800"}, "prompt", "lone surrogate"),
    "seed negative": ({"prompt": [5], "seed": -3}, "seed", "seed must lie in [0, 2**64)"),
    "logprobs": ({"prompt": [5], "logprobs": 21}, "logprobs", "logprobs must lie in [0, 20]; got 21"),
    "stream not bool": ({"prompt": [5], "stream": "yes"}, "stream", "valid boolean"),
    "body a list": ([1, 2], None, "must be a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_fields_are_400_naming_the_field(server, case):
    body, param, words = BAD[case]
    error = assert_error(*curl(server["http"], "/v1/completions", body), 400, words, param=param)
    assert error["type"] == "invalid_request_error"


CHAT_BAD = {
    "no messages": ({"messages": []}, "messages", "non-empty list"),
    "bad role": ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "must be one of"),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   "messages[0].content[0]", "only text parts"),
    "tools": ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools[0]", "tools[0] must be {type: function"),
    "tool choice": ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}],
                     "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice",
                    "tool_choice names function 'g', which is not among the tools (f)"),
    "template kwargs": ({"messages": MESSAGES, "chat_template_kwargs": {"chat_template": "x"}}, None,
                        "the chat template cannot render these messages"),
}


@pytest.mark.parametrize("case", list(CHAT_BAD), ids=list(CHAT_BAD))
def test_bad_chat_requests_are_400(server, case):
    body, param, words = CHAT_BAD[case]
    assert_error(*curl(server["http"], "/v1/chat/completions", body), 400, words, param=param)


def test_malformed_bodies_never_422_or_500_and_do_not_disturb_a_stream(server):
    """Bad input while a stream runs: each answers 400 at once; the stream's output is still transformers'."""
    want_ids, want_text, _ = expected(server, [9, 10, 11], 60)
    result = {}

    def stream():
        chunks = server["client"].completions.create(model="tiny-chat", prompt=[9, 10, 11], max_tokens=60,
                                                     temperature=0, stream=True)
        result["text"] = "".join(c.choices[0].text for c in chunks)

    thread = threading.Thread(target=stream)
    thread.start()
    for raw in ("{bad json", "", "null", '{"prompt": [5], "max_tokens": 1e999}', "[" * 100000,
                '{"prompt": "\\ud800"}', '{"prompt": [5], "temperature": NaN}'):
        status, body = curl(server["http"], "/v1/completions", raw=raw)
        assert status == 400, (raw[:40], status, body)
        assert_error(status, body, 400)
    status, body = curl(server["http"], "/v1/completions", method="GET")
    assert_error(status, body, 405, "GET is not allowed")
    thread.join(timeout=120)
    assert result["text"] == want_text
    still_right(server)


def test_admission_full_is_429_on_the_shared_counter(server):
    """gRPC streams take every admission place (2 running + 2 queued): HTTP gets 429 at once; then serves again."""
    from ray._private.test_utils import wait_for_condition

    long = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=[5, 6]),
                                        sampling=generate_pb2.SamplingParams(max_new_tokens=CAP, ignore_eos=True))
    calls = [server["generate"].Generate(long, timeout=120) for _ in range(4)]
    admitted = lambda: serve.get_app_handle("moeray").admission_stats.remote().result(timeout_s=30)["admitted"]
    try:
        wait_for_condition(lambda: admitted() == 4, timeout=60)
        with pytest.raises(openai.RateLimitError) as err:
            server["client"].completions.create(model="tiny-chat", prompt=[5], max_tokens=2)
        assert "2 requests running (max 2) and 2 waiting (max 2)" in str(err.value)
        assert_error(*curl(server["http"], "/v1/chat/completions", {"messages": MESSAGES}), 429, "admission limit")
    finally:
        for call in calls:
            call.cancel()
    wait_for_condition(lambda: admitted() == 0, timeout=60)
    still_right(server)


# -- moeray serve: flags and SIGTERM drain ---------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (Ray's GCS, raylet, workers, Serve's proxies and replicas)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:  # gone meanwhile
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ready(cli) -> str:
    """The banner of the `moeray serve` of ``cli``, started again once on fresh ports if a port was taken."""
    banner = lambda: next((line for line in cli["lines"] if line.startswith("moeray: serving")), None)
    for attempt in range(2):
        deadline = time.monotonic() + 240
        while banner() is None and time.monotonic() < deadline and cli["proc"].poll() is None:
            time.sleep(0.2)
        if banner() is None and attempt == 0 and "Failed to bind" in cli["log"].read_text():
            cli["proc"].wait(timeout=60)
            cli["launch"]()  # its port was taken meanwhile: once more on fresh ones
    assert banner(), (cli["lines"], cli["log"].read_text()[-3000:])
    return banner()


class _Marker:
    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):  # unpickling it creates the file
        return (open, (self.path, "w"))


def _hostile(address: tuple[str, int], marker, http: bool) -> list[socket.socket]:
    """Pickles in the usual framings, random bytes, a truncated request, a 1 TB declared body, on one port; returns
    the connections it leaves open and silent (a slow opening each)."""
    import pickle
    import struct

    payload = pickle.dumps(_Marker(marker))
    sends = [payload, struct.pack("!Q", len(payload)) + payload, struct.pack("!I", len(payload)) + payload,
             os.urandom(1 << 16), b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Authorization: Bearer " + CLI_KEY.encode() + b"\r\nContent-Length: 1000000000000\r\n\r\n{\"pro",
             b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + struct.pack("!I", 0xFFFFFF)[1:] + b"\x00" * 6 + payload]
    answers = []
    for i, data in enumerate(sends):
        with socket.create_connection(address, timeout=30) as conn:
            try:
                conn.sendall(data)
                if i != 5:  # NOTE: the declared body is left unfinished, not ended: the answer must not wait for it
                    conn.shutdown(socket.SHUT_WR)
                answers.append(conn.recv(1 << 16))
            except (ConnectionResetError, BrokenPipeError, TimeoutError):
                answers.append(b"")
    assert not any(a.startswith(b"HTTP/1.1 2") for a in answers), answers
    if http:  # the declared terabyte: refused from its header, nothing read
        assert answers[5].startswith(b"HTTP/1.1 413"), answers[5]
    return [socket.create_connection(address, timeout=30) for _ in range(50)]


def test_moeray_serve_shrugs_off_hostile_clients(cli, checkpoint, tmp_path):
    """Against `moeray serve`'s HTTP and gRPC ports, while a greedy stream runs: no code runs (no marker file), the
    1 TB body is refused with 413, 100 silent connections held open stop nobody, and the stream and a request made
    meanwhile equal transformers'."""
    _ready(cli)
    http, grpc_host_port = cli["http"], cli["grpc"]
    prompt, n = [5, 6, 7], 24
    expected = Oracle(checkpoint).greedy(prompt, n)
    request = {"prompt": prompt, "max_tokens": n, "temperature": 0, "return_token_ids": True}
    stream = subprocess.Popen(
        ["curl", "-sS", "-N", "--max-time", "120", http + "/v1/completions", "-H", f"Authorization: Bearer {CLI_KEY}",
         "-H", "Content-Type: application/json", "--data-binary", json.dumps({**request, "stream": True})],
        stdout=subprocess.PIPE, text=True)
    marker = tmp_path / "ran"
    host, port = http.removeprefix("http://").split(":")
    ghost, gport = grpc_host_port.split(":")
    held = _hostile((host, int(port)), marker, http=True) + _hostile((ghost, int(gport)), marker, http=False)
    try:
        status, body = curl(http, "/v1/completions", request, key=CLI_KEY)  # while 100 sit silent
        assert status == 200 and json.loads(body)["choices"][0]["token_ids"] == expected
        status, body = curl(http, "/v1/completions", raw="x" * 64, key=CLI_KEY)
        assert status == 400 and "not valid JSON" in body
    finally:
        for conn in held:
            conn.close()
    out, _ = stream.communicate(timeout=150)
    events = sse(out)
    assert sum((e["choices"][0]["token_ids"] for e in events[:-1] if e["choices"]), []) == expected
    assert not marker.exists()


def _harmony_answers(http: str) -> None:
    """Chat answers read as harmony: the analysis channel is reasoning_content, final the content (whole and
    streamed), a commentary message to functions.NAME a call. The tiny model does not speak harmony, so a regex
    and tool_choice required make it."""
    word = "[a-z]{1,6}"
    body = {"model": "chatty", "messages": MESSAGES, "max_tokens": 300, "temperature": 0,
            "guided_regex": rf"<\|channel\|>analysis<\|message\|>{word}<\|end\|><\|start\|>assistant"
                            rf"<\|channel\|>final<\|message\|>{word}"}
    status, text = curl(http, "/v1/chat/completions", body, key=CLI_KEY)
    message = json.loads(text)["choices"][0]["message"]
    assert status == 200 and re.fullmatch(word, message["reasoning_content"]), text
    assert re.fullmatch(word, message["content"]) and "tool_calls" not in message, text
    deltas = [e["choices"][0]["delta"] for e in sse(curl(http, "/v1/chat/completions", {**body, "stream": True},
                                                         key=CLI_KEY)[1])[:-1] if e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"], deltas
    assert "".join(d.get("content") or "" for d in deltas) == message["content"], deltas
    status, text = curl(http, "/v1/chat/completions", {"model": "chatty", "messages": MESSAGES, "tools": TOOLS,
                                                       "tool_choice": "required", "parallel_tool_calls": False,
                                                       "max_tokens": 200, "temperature": 0}, key=CLI_KEY)
    choice = json.loads(text)["choices"][0]
    [call] = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, text
    arguments = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] in ("get_weather", "add") and arguments.keys() in ({"city", "days"}, {"a", "b"})


def test_moeray_serve_flags_and_sigterm_drain(cli, checkpoint):
    """--served-model-name, --api-key, --chat-template, --tool-call-parser (gpt-oss's harmony channels); on SIGTERM:
    health 503 / NOT_SERVING, new requests 503 / UNAVAILABLE, the stream in flight runs to its end, and the process
    exits 0."""
    banner = _ready(cli)
    assert "'chatty'" in banner and cli["http"] + "/v1" in banner, cli["lines"]
    http = cli["http"]
    status, body = curl(http, "/v1/models", key=CLI_KEY)
    assert status == 200 and json.loads(body)["data"][0]["id"] == "chatty"
    assert_error(*curl(http, "/v1/models", key=None), 401)
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(
        MESSAGES, chat_template=CLI_TEMPLATE, add_generation_prompt=True)["input_ids"]
    status, body = curl(http, "/v1/chat/completions", {"model": "chatty", "messages": MESSAGES, "max_tokens": 2,
                                                       "temperature": 0}, key=CLI_KEY)
    assert status == 200 and json.loads(body)["usage"]["prompt_tokens"] == len(rendered)
    # the key went to the ingress as an argument: no process the server started has it in its environment
    started = _descendants(cli["proc"].pid)
    assert len(started) > 3 and not [pid for pid in started if CLI_KEY.encode() in _environ(pid)]
    _harmony_answers(http)

    stream = subprocess.Popen(
        ["curl", "-sS", "-N", "--max-time", "120", http + "/v1/completions", "-H", f"Authorization: Bearer {CLI_KEY}",
         "-H", "Content-Type: application/json", "--data-binary",
         json.dumps({"prompt": [5, 6], "max_tokens": CAP, "ignore_eos": True, "temperature": 0, "stream": True,
                     "return_token_ids": True})], stdout=subprocess.PIPE, text=True)
    first = stream.stdout.readline()
    assert first.startswith("data: {"), first
    cli["proc"].send_signal(signal.SIGTERM)
    channel = grpc.insecure_channel(cli["grpc"])
    try:
        deadline = time.monotonic() + 30
        while curl(http, "/health", key=None)[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert_error(*curl(http, "/health", key=None), 503, "shutting down")
        assert_error(*curl(http, "/v1/completions", {"prompt": [5], "max_tokens": 2}, key=CLI_KEY), 503,
                     "shutting down")
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            list(generate_pb2_grpc.GenerateServiceStub(channel).Generate(generate_pb2.GenerateRequest(
                prompt_ids=generate_pb2.TokenIds(ids=[5]), sampling=generate_pb2.SamplingParams(max_new_tokens=2)),
                timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
    finally:
        channel.close()
    rest = stream.stdout.read()  # to its end (curl --max-time 120); not communicate(), which skips what is buffered
    assert stream.wait(timeout=30) == 0
    events = sse(first + rest)
    assert sum(len(e["choices"][0]["token_ids"]) for e in events[:-1]) == CAP  # it ran to its end
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert cli["proc"].wait(timeout=120) == 0
    assert any("drained" in line for line in cli["lines"]), cli["lines"]
