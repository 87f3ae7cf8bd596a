"""What the real-server tests observe instead of sleeping: a model's statistics from the server's
statistics endpoint, and a bounded wait for a condition (bounded in polls and in time)."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Callable, TypeVar

T = TypeVar("T")


def model_stats(http_url: str, model: str) -> dict[str, int]:
    """Counters of `model` since it was loaded: requests answered (success, fail), requests
    counted per batch element (inferences) and model executions (one may serve several requests)."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=30) as response:
        stats = json.load(response)["model_stats"][0]
    return {
        "success": int(stats["inference_stats"]["success"]["count"]),
        "fail": int(stats["inference_stats"]["fail"]["count"]),
        "inferences": int(stats["inference_count"]),
        "executions": int(stats["execution_count"]),
    }


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """The first truthy value of `condition()`, polled every `interval_s`; AssertionError naming
    `what` once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 1):
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
