"""The scheduler's request-id bookkeeping (unique ids in flight, abort by id) and last-position scoring, with
experts computed in-process (no Ray)."""

import pytest
import torch

from conftest import PROMPTS, assert_logits_close
from local_experts import LocalExperts
from moeray.model.backbone import build_backbone
from moeray.request import DuplicateRequestId, InvalidRequest, SamplingParams
from moeray.router.scheduler import Scheduler
from moeray.router.sequence import Sequence


@pytest.fixture(scope="module")
def scheduler(checkpoints):
    experts = LocalExperts(checkpoints["mixtral"])
    model, _ = build_backbone(checkpoints["mixtral"], torch.float32, experts)
    return Scheduler(model, on_forward=lambda ids: None, max_batch_size=8)


def _seq(request_id, prompt=PROMPTS[0], n=4):
    return Sequence(request_id=request_id, prompt_ids=prompt, sampling=SamplingParams(max_new_tokens=n),
                    stop_ids=frozenset())


def _finish(scheduler, *seqs):
    while not all(s.done.is_set() for s in seqs):
        scheduler.step()


def test_an_id_in_flight_is_refused_until_it_finishes(scheduler):
    first = scheduler.submit(_seq("same"))
    with pytest.raises(DuplicateRequestId, match="request_id 'same' is already in flight"):
        scheduler.submit(_seq("same"))
    scheduler.step()  # running now
    with pytest.raises(DuplicateRequestId):
        scheduler.submit(_seq("same"))
    _finish(scheduler, first)
    again = scheduler.submit(_seq("same"))  # done: the id is free again
    _finish(scheduler, again)
    assert again.output_ids == first.output_ids and not scheduler._active


def test_an_aborted_id_can_be_reused_at_once_and_abort_finds_the_new_one(scheduler):
    old = scheduler.submit(_seq("retry", n=50))
    scheduler.step()
    assert scheduler.abort("retry")
    new = scheduler.submit(_seq("retry", n=3))  # the old one has not finished its abort yet
    _finish(scheduler, old, new)
    assert old.finish_reason == "abort" and new.finish_reason == "length" and len(new.output_ids) == 3
    assert not scheduler.abort("retry") and not scheduler._active


def test_abort_finds_a_sequence_between_the_queue_and_the_batch(scheduler):
    seq = _seq("mid-prefill", n=50)
    seen = {}
    original = scheduler.on_forward

    def on_forward(ids):  # the prefill's forward: the sequence is being admitted, its first token not out yet
        if ids is not None and "abort" not in seen:
            seen["abort"] = scheduler.abort("mid-prefill")
        original(ids)

    scheduler.on_forward = on_forward
    try:
        scheduler.submit(seq)
        _finish(scheduler, seq)
    finally:
        scheduler.on_forward = original
    assert seen["abort"] and seq.finish_reason == "abort" and len(seq.output_ids) == 1


def test_last_only_scores_each_rows_last_real_position(scheduler, oracle):
    ref = oracle("mixtral")
    a, b, c = PROMPTS[1], PROMPTS[0], PROMPTS[3]
    T = len(a)
    ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(a), 1
    ids[1, : len(b)], mask[1, : len(b)] = torch.tensor(b), 1  # right padded
    ids[2, -len(c):], mask[2, -len(c):] = torch.tensor(c), 1  # left padded
    full = scheduler.score(ids, mask)
    last = scheduler.score(ids, mask, last_only=True)
    assert last.shape == (3, full.shape[-1])
    for row, prompt, position in [(0, a, T - 1), (1, b, len(b) - 1), (2, c, T - 1)]:
        assert_logits_close(last[row], full[row, position])
        assert_logits_close(last[row], ref.logits(prompt)[-1])


def test_a_batch_over_max_forward_tokens_is_scored_in_forwards_of_whole_rows(scheduler, oracle):
    """With room for two rows a forward, three rows run as two forwards, the logits those of one; a row longer than
    the bound is refused, naming it: the data ports take no bigger message."""
    ref = oracle("mixtral")
    rows = [PROMPTS[1], PROMPTS[0], PROMPTS[3]]
    T = max(len(r) for r in rows)
    ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    for b, prompt in enumerate(rows):
        ids[b, : len(prompt)], mask[b, : len(prompt)] = torch.tensor(prompt), 1
    forwards = []
    original, bound = scheduler.on_forward, scheduler.max_forward_tokens
    scheduler.on_forward = lambda ids_Q: (forwards.append(len(ids_Q)) if ids_Q is not None else None,
                                          original(ids_Q))
    try:
        scheduler.max_forward_tokens = len(rows[0]) + len(rows[1])
        split, last = scheduler.score(ids, mask), scheduler.score(ids, mask, last_only=True)
        scheduler.max_forward_tokens = len(rows[0]) - 1
        with pytest.raises(InvalidRequest, match=rf"a row of {len(rows[0])} tokens is over this engine's "
                                                 rf"max_forward_tokens {len(rows[0]) - 1}"):
            scheduler.score(ids, mask)
    finally:
        scheduler.on_forward, scheduler.max_forward_tokens = original, bound
    assert forwards == [len(rows[0]) + len(rows[1]), len(rows[2])] * 2
    for b, prompt in enumerate(rows):
        assert_logits_close(split[b, : len(prompt)], ref.logits(prompt))
        assert_logits_close(last[b], ref.logits(prompt)[-1])
        assert not split[b, len(prompt):].any(), "padding stays zero"
