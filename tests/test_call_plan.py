"""`call_plan` (what the benchmark harness multiplies FLOPs by) against the calls a run really
makes: for every pipeline, a batch of two example requests through components that count their
calls, batch sizes and the report stage they ran under."""

from __future__ import annotations

import pytest
from counting import Counting

from runtime.pipelines import PIPELINES, get_pipeline
from runtime.timing import StageTimer

REQUESTS, STEPS = 2, 3


@pytest.fixture
def open_stages(monkeypatch):
    """The names of the timer stages open right now, innermost last."""
    stages: list[str] = []
    original = StageTimer.stage

    def stage(self, name, repeated=False):
        inner = original(self, name, repeated)

        class Tracked:
            def __enter__(self_):
                stages.append(name)
                return inner.__enter__()

            def __exit__(self_, *exc):
                stages.pop()
                return inner.__exit__(*exc)

        return Tracked()

    monkeypatch.setattr(StageTimer, "stage", stage)
    return stages


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_call_plan_matches_the_calls_a_run_makes(pipeline, open_tiny, tmp_path, open_stages):
    definition = get_pipeline(pipeline)
    loaded = open_tiny(pipeline)
    preset = loaded.source.preset
    options = {**definition.example_options(tmp_path, preset), definition.steps_option: STEPS}
    prepared = [definition.prepare(preset, **options, seed=seed) for seed in range(REQUESTS)]
    runner = definition.create(loaded.components, preset, loaded.source.weights)
    definition.run_batch(runner, prepared[:1])  # once-per-runner work (RefAdGen's zero-image tokens) done
    counted = {name: Counting(c, open_stages) for name, c in loaded.components.items()}
    runner.components = counted
    results = definition.run_batch(runner, prepared)

    plan = definition.call_plan(REQUESTS, STEPS)
    assert set(plan) == set(loaded.components), "the plan names every component, nothing else"
    for name, call in plan.items():
        made = counted[name]
        assert made.calls == call.calls, (name, made.calls, call)
        assert set(made.batches) == {call.batch}, (name, made.batches, call)
        assert set(made.stage_log) == {call.stage}, (name, made.stage_log, call)
    timings = results[0].report["timings_s"]
    assert {call.stage for call in plan.values()} <= set(timings)
