"""Where the user is and how they got there: the history behind `backspace` and the breadcrumb.

A `Place` is one view with enough state to come back to it exactly (a cursor, a zoom, a
structure and its selected row, a finding). Following a link or switching views pushes the place
being left; `backspace` pops it. No Textual here: the main screen asks the views for their place
and gives it back to them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Places kept; older ones are forgotten (a breadcrumb shows the last few).
MAX_HISTORY = 100


@dataclass(frozen=True)
class Place:
    """A view (`view` is its id), what the breadcrumb calls it, and what restores it."""

    view: str
    label: str
    state: tuple[object, ...] = ()


class History:
    """A stack of places; the top is where `backspace` goes."""

    def __init__(self) -> None:
        self._stack: list[Place] = []

    def __len__(self) -> int:
        return len(self._stack)

    def push(self, place: Place) -> None:
        """Remember `place` (a repeat of the top is not pushed twice)."""
        if self._stack and self._stack[-1] == place:
            return
        self._stack.append(place)
        del self._stack[:-MAX_HISTORY]

    def pop(self) -> Place | None:
        return self._stack.pop() if self._stack else None

    def trail(self) -> list[Place]:
        return list(self._stack)


def breadcrumb(trail: list[Place], here: str, width: int) -> str:
    """`Diagnostics › guest 0x10000 › L2 table 0 [3] › here`, shortened from the left to `width`."""
    sep = " › "
    parts = [p.label for p in trail] + [here]
    text = sep.join(parts)
    dropped = 0
    while len(text) > width and len(parts) > 1:
        parts.pop(0)
        dropped += 1
        text = "…" + sep + sep.join(parts)
    if len(text) > width:
        text = text[: max(0, width - 1)] + "…"
    return text
