"""Retry delays from a fixed schedule: the last step repeats once it is reached."""

from __future__ import annotations

from collections.abc import Sequence


def backoff(schedule: Sequence[float], failures: int) -> float:
    """The delay after `failures` consecutive failures (0 → the first step)."""
    return schedule[min(failures, len(schedule) - 1)]
