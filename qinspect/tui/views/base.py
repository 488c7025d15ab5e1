"""What every view offers the main screen: a widget to focus, data refresh, go to, find, its place
in the history (`place`/`restore`), what `c` copies and what `e` exports."""

from __future__ import annotations

from typing import ClassVar

from textual.containers import Container
from textual.widget import Widget

from qinspect.tui.nav import Place
from qinspect.tui.session import Session, Step


class View(Container):
    """A view on one number key. Subclasses override the hooks they support."""

    VIEW_ID: ClassVar[str] = ""
    TITLE: ClassVar[str] = ""
    goto_prompt: str | None = None  # what `g` asks for, or None when the view has no go-to
    find_prompt: str | None = None  # what `/` asks for

    def __init__(self, session: Session, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.session = session
        self.stale = False  # data changed while the view was hidden: refreshed when shown

    async def session_loaded(self) -> None:
        """The session's tables were read (after the first frame): fill in what needs them."""

    def main_widget(self) -> Widget | None:
        """The widget that gets the focus when the view is shown."""
        return None

    def focus_main(self) -> None:
        w = self.main_widget()
        if w is not None:
            w.focus()

    def data_changed(self, step: Step | None) -> None:
        """A scan step produced new data (None: everything may have changed)."""

    def goto(self, text: str) -> str | None:
        """Go to what the user typed; return an error message, or None when done."""
        return "nothing to go to in this view"

    def find(self, text: str, forward: bool = True) -> str | None:
        """Find the next match; return an error message, or None when found (a notice on wrap is
        given through `self.notify`)."""
        return "nothing to find in this view"

    def find_first(self, text: str) -> str | None:
        """Find the first match from the start (a link to a finding's evidence)."""
        return self.find(text, True)

    # -- navigation ----------------------------------------------------------------------------------
    def place(self) -> Place:
        """Where the user is in this view (the breadcrumb label and the state `restore` takes)."""
        return Place(self.VIEW_ID, self.TITLE)

    def restore(self, place: Place) -> None:
        """Come back to a place this view gave out."""

    # -- copy and export ---------------------------------------------------------------------------------
    def copy_value(self) -> tuple[str, str] | None:
        """(what it is, the text) that `c` copies: an offset, a raw entry, a fix command."""
        return None

    def export(self) -> dict[str, object]:
        """What the view shows, as JSON-able data (`e`)."""
        return {"view": self.VIEW_ID}
