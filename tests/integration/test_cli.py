"""`moeray generate` as a user runs it: a subprocess that starts its own Ray cluster."""

import json
import os
import subprocess
import sys

import pytest

from conftest import PROMPTS

pytestmark = pytest.mark.ray


def _moeray(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "moeray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_generate_json_matches_transformers(checkpoints, oracle):
    arch = "mixtral"
    ref = oracle(arch)
    args = ["generate", "--model", checkpoints[arch], "--max-new-tokens", "16", "--workers", "2", "--replicas", "1",
            "--json"]
    for p in PROMPTS[:3]:
        args += ["--prompt-ids", ",".join(map(str, p))]
    proc = _moeray(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines == [{"prompt_ids": p, "output_ids": ref.greedy(p)} for p in PROMPTS[:3]]
    assert "total_params" in proc.stderr  # memory accounting is reported while serving


def test_demo_checkpoint_text_prompt_and_bad_input(tmp_path):
    env = {"MOERAY_HOME": str(tmp_path)}
    proc = _moeray("generate", "--prompt", "Hello, experts", "--max-new-tokens", "4", "--workers", "1", "--json",
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert line["prompt_ids"] == [3 + b for b in b"Hello, experts"]  # byte-level tokenizer: id = 3 + byte
    ids = line["output_ids"]
    assert len(ids) == 4 or (ids and ids[-1] == 2), ids  # max_new_tokens, unless it stopped at EOS (id 2)
    from transformers import AutoTokenizer

    assert line["text"] == AutoTokenizer.from_pretrained(tmp_path / "demo-v1").decode(ids)
    # Bad input: a clear message naming the value and the limit, exit status 2, nothing on stdout.
    proc = _moeray("generate", "--prompt-ids", "1,2,999", "--workers", "1", "--json", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "token id 999 is outside the vocabulary [0, 259)" in proc.stderr
