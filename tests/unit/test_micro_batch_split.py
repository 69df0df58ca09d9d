"""Micro-batches without Ray: the split rule (pure), and a scheduler running a step as several micro-batches with
experts computed in-process: the same tokens and logits as one forward, forwards that really overlap while the
experts are away, and a failed micro-batch retried alone."""

import threading
import time

import pytest
import torch

import moeray.router.scheduler as scheduler_module
from conftest import PROMPTS, assert_logits_close
from local_experts import LocalExperts
from moeray.model.backbone import build_backbone
from moeray.request import SamplingParams
from moeray.router import overlap
from moeray.router.overlap import MAX_MICRO_BATCHES, auto_min_tokens, plan_micro_batches, split_rows
from moeray.router.scheduler import Scheduler
from moeray.router.sequence import Sequence


# -- the split rule (pure) ------------------------------------------------------------------------------
def test_rows_spread_evenly_keep_their_order_and_each_part_gets_one():
    assert split_rows([1] * 6, 2) == [[0, 2, 4], [1, 3, 5]]
    assert split_rows([1, 1, 1, 1, 9], 2) == [[4], [0, 1, 2, 3]]  # a prefill chunk is never cut
    assert split_rows([1, 1, 5, 4], 2) == [[1, 2], [0, 3]]  # 6 and 5 tokens
    assert split_rows([1, 1, 1], 4) == [[0], [1], [2]]  # capped at the rows
    for new_R, parts in [([1] * 32, 2), ([1] * 30 + [17, 40], 3), ([3, 1, 4, 1, 5, 9, 2, 6], 4)]:
        groups = split_rows(new_R, parts)
        assert sorted(r for g in groups for r in g) == list(range(len(new_R)))  # every row once
        assert all(g == sorted(g) and g for g in groups)
        loads = [sum(new_R[r] for r in g) for g in groups]
        assert max(loads) - min(loads) <= max(new_R)  # as even as whole rows allow
    with pytest.raises(ValueError, match="at least 1 micro-batch; got 0"):
        split_rows([1], 0)


def test_the_automatic_rule_splits_only_steps_with_enough_work():
    # 32 rows per expert and micro-batch: 16 experts, top-2 -> 256 tokens each
    assert auto_min_tokens(num_experts=16, top_k=2) == 256 and auto_min_tokens(num_experts=8, top_k=3) == 86
    half = 256
    assert plan_micro_batches([1] * 64, None, half) == [list(range(64))]  # decode steps: one
    assert plan_micro_batches([1] * 64 + [192, 256], None, half) == [[65], list(range(65))]  # 512 tokens: two
    assert plan_micro_batches([1] * 63 + [192, 256], None, half) == [list(range(65))]  # one short
    assert plan_micro_batches([1] * 32 + [480], None, half) == [list(range(33))]  # no even split of 512
    assert plan_micro_batches([1, 2 * half], None, half) == [[0, 1]]  # the light half would be one token
    assert plan_micro_batches([half, half], None, half) == [[0], [1]]
    assert plan_micro_batches([half, half], None, None) == [[0, 1]]  # no automatic rule: one
    assert plan_micro_batches([1, 1, 1], 2) == [[0, 2], [1]]  # a fixed count applies at any size
    assert plan_micro_batches([1], 3) == [[0]] and plan_micro_batches([], None) == []
    for bad in (0, MAX_MICRO_BATCHES + 1):
        with pytest.raises(ValueError, match=rf"micro_batches must lie in \[1, {MAX_MICRO_BATCHES}\]; got {bad}"):
            plan_micro_batches([1, 1], bad)


# -- a scheduler stepping micro-batches ------------------------------------------------------------------
class AwayExperts(LocalExperts):
    """In-process experts that also spend ``away_s`` away from the router each layer, as a remote round trip
    does (the turn is given up meanwhile), and record how many micro-batches were away at once."""

    def __init__(self, path: str, away_s: float = 0.0) -> None:
        super().__init__(path)
        self.away_s, self.fail_tokens = away_s, set()
        self.ids = threading.local()  # the ids of the forward on each thread, as the dispatcher keeps them
        self._lock = threading.Lock()
        self.away_now = self.most_away = 0

    def __call__(self, layer, x_TH, top_k_index_TK, top_k_weights_TK):
        ids_T = getattr(self.ids, "T", None)
        if ids_T is not None and self.fail_tokens & set(ids_T.tolist()):
            self.fail_tokens.clear()  # once
            raise RuntimeError("a worker failed")
        with overlap.away():
            with self._lock:
                self.away_now += 1
                self.most_away = max(self.most_away, self.away_now)
            time.sleep(self.away_s)
            with self._lock:
                self.away_now -= 1
        return super().__call__(layer, x_TH, top_k_index_TK, top_k_weights_TK)


def _scheduler(path, micro_batches, away_s=0.0, recover=None):
    experts = AwayExperts(path, away_s)
    model, _ = build_backbone(path, torch.float32, experts)
    scheduler = Scheduler(model, on_forward=lambda ids: setattr(experts.ids, "T", ids), max_batch_size=8,
                          block_size=4, max_prefill_tokens=7, micro_batches=micro_batches, recover=recover)
    return scheduler, experts


def _run(scheduler, prompts, n=10, sampling=None, eos=()):
    seqs = [Sequence(request_id=f"r{i}", prompt_ids=p, sampling=sampling or SamplingParams(max_new_tokens=n),
                     stop_ids=frozenset(eos)) for i, p in enumerate(prompts)]
    for s in seqs:
        scheduler.submit(s)
    while not all(s.done.is_set() for s in seqs):
        scheduler.step()
    return seqs


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_micro_batches_give_the_tokens_and_logits_of_one_forward(arch, checkpoints, oracle, monkeypatch):
    logits = {}  # micro-batch count -> request id -> the logits it sampled from, step by step
    real = scheduler_module.sample_next

    def recording(logits_SV, seqs, allowed_SV=None):
        for row, seq in zip(logits_SV, seqs):
            logits[count].setdefault(seq.request_id, []).append(row.clone())
        return real(logits_SV, seqs, allowed_SV)

    monkeypatch.setattr(scheduler_module, "sample_next", recording)
    ref = oracle(arch)
    prompts = PROMPTS * 2  # 8 sequences: decodes beside prefill chunks of up to 7 tokens
    outputs = {}
    for count in (1, 2, 3):
        logits[count] = {}
        scheduler, _ = _scheduler(checkpoints[arch], count)
        outputs[count] = [s.output_ids for s in _run(scheduler, prompts, n=10, eos=ref.eos)]
        assert (scheduler.micro_batch_steps > 0) == (count > 1)
        scheduler.close()
    assert outputs[1] == outputs[2] == outputs[3] == [ref.greedy(p, 10) for p in prompts]
    for count in (2, 3):
        for rid, rows in logits[1].items():
            assert_logits_close(torch.stack(logits[count][rid]), torch.stack(rows))
    # Sampling: each sequence draws from its own seeded generator, so the split changes nothing either.
    sampled = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=7)
    draws = []
    for count in (1, 2):
        scheduler, _ = _scheduler(checkpoints[arch], count)
        draws.append([s.output_ids for s in _run(scheduler, prompts, sampling=sampled)])
        scheduler.close()
    assert draws[0] == draws[1]


def test_one_micro_batch_computes_while_the_others_tokens_are_away(checkpoints):
    scheduler, experts = _scheduler(checkpoints["mixtral"], 2, away_s=0.05)
    seqs = _run(scheduler, PROMPTS, n=3)
    assert all(s.error is None for s in seqs)
    assert experts.most_away == 2, "both micro-batches' tokens were away at once"
    # The router's busy time excludes the waits: at least one 50 ms wait per layer and step was not computing.
    assert scheduler.router_busy_s < scheduler.forward_s
    scheduler.close()


def test_a_failed_micro_batch_is_retried_alone_and_the_step_completes(checkpoints, oracle):
    ref = oracle("qwen3_moe")
    recoveries = []
    scheduler, experts = _scheduler(checkpoints["qwen3_moe"], 2, recover=lambda e: recoveries.append(e) or True)
    experts.fail_tokens = {PROMPTS[1][3]}  # a token of one prompt: its micro-batch fails once
    seqs = _run(scheduler, PROMPTS, n=8, eos=ref.eos)
    assert [s.output_ids for s in seqs] == [ref.greedy(p, 8) for p in PROMPTS]
    assert len(recoveries) == 1 and all(s.error is None for s in seqs)
    # Without a recovery only the failed micro-batch's sequences fail; the other micro-batch's finish.
    scheduler, experts = _scheduler(checkpoints["qwen3_moe"], 2, recover=lambda e: False)
    experts.fail_tokens = {PROMPTS[1][3]}
    seqs = _run(scheduler, PROMPTS, n=8, eos=ref.eos)
    failed = [s for s in seqs if s.error is not None]
    assert [s.prompt_ids for s in failed] == [PROMPTS[1]], "only the micro-batch that failed"
    assert all(s.output_ids == ref.greedy(s.prompt_ids, 8) for s in seqs if s.error is None)


# -- the object-store path: every touched worker computes at once --------------------------------------------
@pytest.mark.ray  # the object-store transport's module imports Ray
def test_the_object_store_path_sends_every_call_before_it_waits(monkeypatch):
    """One token, its top-k experts on different workers: every call is submitted before any result is awaited,
    so the workers compute at once (a layer waits for the slowest, not the sum); results come in one get."""
    import types

    import ray

    import moeray.transport.object_store as object_store_module
    from moeray.transport import WorkerCall
    from moeray.transport.object_store import ObjectStoreTransport

    events = []

    class Worker:
        def __init__(self, index):
            self.forward = types.SimpleNamespace(remote=lambda *call: events.append(("submit", index)) or index)

    def get(refs, **_):
        events.append(("get", refs))
        return [f"y{r}" for r in refs] if isinstance(refs, list) else f"y{refs}"

    monkeypatch.setattr(object_store_module, "ray", types.SimpleNamespace(get=get, exceptions=ray.exceptions))
    call = WorkerCall.of(0, 0, torch.zeros(1, 4), torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]))
    sent = ObjectStoreTransport([Worker(w) for w in range(3)]).send({0: call, 2: call})
    assert events == [("submit", 0), ("submit", 2), ("get", [0, 2])]
    assert sent.results == {0: "y0", 2: "y2"} and not sent.lost
