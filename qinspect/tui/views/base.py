"""What every view offers the main screen: a widget to focus, data refresh, go to, find."""

from __future__ import annotations

from textual.containers import Container
from textual.widget import Widget

from qinspect.tui.session import Session


class View(Container):
    """A view on one number key. Subclasses override the hooks they support."""

    goto_prompt: str | None = None  # what `g` asks for, or None when the view has no go-to
    find_prompt: str | None = None  # what `/` asks for

    def __init__(self, session: Session, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.session = session

    def main_widget(self) -> Widget | None:
        """The widget that gets the focus when the view is shown."""
        return None

    def focus_main(self) -> None:
        w = self.main_widget()
        if w is not None:
            w.focus()

    def data_changed(self, step: str) -> None:
        """A scan step (`guest`, `layout`, `check`, `diagnose`, `space`) produced new data."""

    def goto(self, text: str) -> str | None:
        """Go to what the user typed; return an error message, or None when done."""
        return "nothing to go to in this view"

    def find(self, text: str, forward: bool = True) -> str | None:
        """Find the next match; return an error message, or None when found."""
        return "nothing to find in this view"
