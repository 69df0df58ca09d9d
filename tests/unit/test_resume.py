"""A request resumed from its output so far (``Router.new_sequence(resumed=...)``: the ingress moves a request whose
router died, moeray/serving/engine_handle.py) continues exactly as the undisturbed run: greedy, seeded sampling
with penalties, and a structured output. Through a real router's death: tests/integration/test_failures.py."""

from __future__ import annotations

import pytest

from moeray import EngineConfig, InvalidRequest, LocalEngine, SamplingParams
from moeray.request import StructuredOutput

PROMPT = [5, 17, 3, 42, 8]
SAMPLINGS = {
    "greedy": SamplingParams(max_new_tokens=24, ignore_eos=True),
    "seeded": SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=1.3, top_p=0.9, top_k=40, seed=11,
                             presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, min_tokens=4),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from moeray.model.tiny import save_tokenized_checkpoint

    path = save_tokenized_checkpoint("qwen3_moe", tmp_path_factory.mktemp("resume") / "tiny", seed=4,
                                     corpus="0123456789 the quick brown fox experts route tokens")
    with LocalEngine(EngineConfig(model=str(path), backend="local", workers=2)) as engine:
        yield engine


def _run(engine, sampling: SamplingParams, resumed: list[int] = ()) -> list[int]:
    router = engine.router
    seq = router.scheduler.submit(router.new_sequence(PROMPT, sampling, resumed=list(resumed)))
    seq.done.wait(120)
    assert seq.error is None, seq.error
    return seq.output_ids


@pytest.mark.parametrize("kind", sorted(SAMPLINGS))
def test_resumed_from_any_point_the_output_is_the_undisturbed_one(engine, kind):
    whole = _run(engine, SAMPLINGS[kind])
    assert len(whole) == 24
    for cut in (1, 3, 10, 23):
        assert _run(engine, SAMPLINGS[kind], whole[:cut]) == whole, (kind, cut)
    if kind == "seeded":
        assert _run(engine, SAMPLINGS[kind], whole[:3]) != _run(engine, SamplingParams(
            **{**vars(SAMPLINGS[kind]), "seed": 12}), whole[:3]), "the seed is what decides"


def test_resumed_tokens_are_checked(engine):
    router, sampling = engine.router, SAMPLINGS["greedy"]
    with pytest.raises(InvalidRequest, match="24 resumed tokens leave nothing of max_new_tokens 24"):
        router.new_sequence(PROMPT, sampling, resumed=[1] * 24)
    with pytest.raises(InvalidRequest, match="resumed token id -1 is outside the vocabulary"):
        router.new_sequence(PROMPT, sampling, resumed=[-1])


def test_a_structured_output_resumes_inside_its_grammar(engine):
    pytest.importorskip("xgrammar")
    sampling = SamplingParams(max_new_tokens=40, structured=StructuredOutput("regex", "[0-9]{3,30}"))
    whole = _run(engine, sampling)
    assert _run(engine, sampling, whole[:2]) == whole
    with pytest.raises(InvalidRequest, match="do not follow the request's structured output"):
        engine.router.new_sequence(PROMPT, sampling, resumed=[min(engine.router.eos_ids)] * 2)
