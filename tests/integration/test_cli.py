"""`moeray generate` as a user runs it: a subprocess that starts its own Ray cluster."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import PROMPTS
from moeray.placement.algorithms.balanced import replicated
from moeray.placement.algorithms.topology import Budget, Topology
from moeray.placement.traces import synthesize, write_trace

pytestmark = pytest.mark.ray


def _moeray(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "moeray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_generate_json_matches_transformers(checkpoints, oracle, tmp_path):
    arch = "mixtral"
    ref = oracle(arch)
    # The first plan comes from a recorded load (replicated's layout for it), not the static default.
    windows = synthesize("zipf", num_layers=2, num_experts=8, num_windows=2, tokens=200, top_k=2, seed=1, s=1.5)
    write_trace(tmp_path / "load.jsonl", windows)
    expected = replicated(torch.stack(windows).sum(0).double(), Topology.uniform(num_workers=2, slots_per_worker=5),
                          None, Budget(redundant=1))
    args = ["generate", "--model", checkpoints[arch], "--max-new-tokens", "16", "--workers", "2", "--replicas", "1",
            "--initial-load", str(tmp_path / "load.jsonl"), "--json"]
    for p in PROMPTS[:3]:
        args += ["--prompt-ids", ",".join(map(str, p))]
    proc = _moeray(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines == [{"prompt_ids": p, "output_ids": ref.greedy(p)} for p in PROMPTS[:3]]
    assert "total_params" in proc.stderr  # memory accounting is reported while serving
    first = [expected.experts_of(w)[0] for w in range(2)]
    assert f"first plan from {tmp_path / 'load.jsonl'}: layer 0 experts per worker {first}" in proc.stderr


def test_demo_checkpoint_text_prompt_and_bad_input(demo_home):
    env = {"MOERAY_HOME": str(demo_home)}
    proc = _moeray("generate", "--prompt", "Hello, experts", "--max-new-tokens", "4", "--workers", "1", "--json",
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [json.loads(line) for line in proc.stdout.splitlines()]
    from transformers import AutoTokenizer, GenerationConfig

    from moeray.model.demo import DEMO_VERSION, demo_corpus

    path = demo_home / f"demo-{DEMO_VERSION}"
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert line["prompt_ids"] == tokenizer("Hello, experts", add_special_tokens=False)["input_ids"]  # byte-level BPE
    ids = line["output_ids"]
    eos = GenerationConfig.from_pretrained(path).eos_token_id
    assert len(ids) == 4 or (ids and ids[-1] in eos), ids  # max_new_tokens, unless it stopped at EOS
    assert line["text"] == tokenizer.decode(ids)
    assert "Hello, experts" + line["text"] in demo_corpus()  # the trained demo speaks its corpus
    # Bad input: a clear message naming the value and the limit, exit status 2, nothing on stdout.
    proc = _moeray("generate", "--prompt-ids", "1,2,999", "--workers", "1", "--json", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"token id 999 is outside the vocabulary [0, {len(tokenizer)})" in proc.stderr
