"""Messages between the views and the main screen (links between views, scan progress)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

from qinspect.tui.session import Step

if TYPE_CHECKING:  # the structure models import numpy: not needed to start the app
    from qinspect.tui.structs import StructRef


class ShowGuest(Message):
    """Go to the guest map at this guest offset (and subcluster); `switch` shows the view."""

    def __init__(self, offset: int, switch: bool = True) -> None:
        super().__init__()
        self.offset = offset
        self.switch = switch


class ShowHost(Message):
    """Go to the host layout at this host offset."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset


class ShowStructure(Message):
    """Go to the Structures view, select this node and row."""

    def __init__(self, ref: StructRef) -> None:
        super().__init__()
        self.ref = ref


class ShowView(Message):
    """Switch to a view by id (a link: the place left is remembered)."""

    def __init__(self, view: str) -> None:
        super().__init__()
        self.view = view


class FindIn(Message):
    """A link that is a search: go to `view` and find `text` there (finding → its evidence)."""

    def __init__(self, view: str, text: str) -> None:
        super().__init__()
        self.view = view
        self.text = text


class ScanProgress(Message):
    """A scan step advanced (posted from a worker thread)."""

    def __init__(self, step: Step, done: int, total: int) -> None:
        super().__init__()
        self.step = step
        self.done = done
        self.total = total


class ScanStepDone(Message):
    """A scan step finished, failed (error set) or was cancelled."""

    def __init__(self, step: Step, error: str | None = None, cancelled: bool = False) -> None:
        super().__init__()
        self.step = step
        self.error = error
        self.cancelled = cancelled


class ScanFinished(Message):
    """The scan pipeline ended (all steps done, or cancelled)."""

    def __init__(self, cancelled: bool) -> None:
        super().__init__()
        self.cancelled = cancelled


class TablesLoaded(Message):
    """Tables of the guest map needed on screen were computed."""
