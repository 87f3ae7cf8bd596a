"""Wall time per pipeline stage, for the report; progress messages for the user."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

Progress = Callable[[str], None]  # one line of progress for the user (the CLI prints it on stderr)


@dataclass
class StageTimer:
    """Seconds per stage; a stage timed more than once (each denoise step) keeps every sample."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    repeated: set[str] = field(default_factory=set)

    @contextmanager
    def stage(self, name: str, repeated: bool = False) -> Iterator[None]:
        """Time the block; a `repeated` stage always reports as {samples, p50, total}."""
        if repeated:
            self.repeated.add(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.samples.setdefault(name, []).append(time.perf_counter() - started)

    def summary(self) -> dict[str, object]:
        """Single stages as seconds; repeated stages as {samples, p50, total}."""
        out: dict[str, object] = {}
        for name, values in self.samples.items():
            if name not in self.repeated:
                out[name] = round(values[0], 6)
            else:
                out[name] = {
                    "samples": [round(v, 6) for v in values],
                    "p50": round(float(np.median(values)), 6),
                    "total": round(float(np.sum(values)), 6),
                }
        return out
