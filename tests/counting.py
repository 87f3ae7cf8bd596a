"""A component wrapper for tests that count what a pipeline calls: every call's network batch,
and (given the list of open timer stages) the stage it ran under."""

from __future__ import annotations

from runtime.backends.base import Component


class Counting(Component):
    def __init__(self, inner: Component, stages: list[str] | None = None):
        super().__init__(inner.spec)
        self.inner, self.stages = inner, stages
        self.batches: list[int] = []
        self.stage_log: list[str | None] = []

    @property
    def calls(self) -> int:
        return len(self.batches)

    def _run(self, feed):
        self.batches.append(next(iter(feed.values())).shape[0])
        self.stage_log.append(self.stages[-1] if self.stages else None)
        return self.inner.run(feed)
