"""An Input whose cursor does not blink: steady on screen and identical in every screenshot."""

from __future__ import annotations

from textual.widgets import Input


class SteadyInput(Input):
    """`Input` with a steady cursor."""

    def on_mount(self) -> None:
        self.cursor_blink = False
