"""The progress/cancel callback types shared by every long analysis."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, int], None]
CancelledFn = Callable[[], bool]


class Cancelled(Exception):
    """Raised inside an analysis when its `cancelled()` callback returned True."""


def no_progress(done: int, total: int) -> None:
    """A progress callback that ignores progress."""


def never_cancelled() -> bool:
    """A cancel check that never cancels."""
    return False
