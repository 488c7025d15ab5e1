"""The error screen: a file that cannot be inspected, said in words, never a traceback."""

from __future__ import annotations

from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

from qinspect.tui.palette import DIM, ERROR

HINTS = {
    "not a qcow2": "qinspect reads qcow2 images (v2 and v3). Convert other formats with "
                   "`qemu-img convert -O qcow2 FILE out.qcow2`.",
    "no such file": "Check the path; qinspect without an argument lists the qcow2 files below the "
                    "current directory.",
    "permission": "qinspect only needs read access: try as a user who can read the file.",
    "backing": "The image names a backing file that cannot be opened. Everything else can still be "
               "inspected once the file is back, or after `qemu-img rebase -u -b NEW ...`.",
}


class ErrorScreen(Screen[str | None]):
    """`ErrorScreen(name, message)`: q quits, o opens the picker, escape goes back if possible.

    It imports no other screen: it dismisses with "open", "back" or None (quit) and the app acts.
    `name` and `message` must be escaped for the terminal already (`for_terminal`).
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("o", "open_other", "Open another image"),
        Binding("escape", "back", "Back", show=False),
    ]

    DEFAULT_CSS = """
    ErrorScreen { align: center middle; }
    ErrorScreen > Center { width: 1fr; height: 1fr; }
    ErrorScreen Vertical { width: 90; height: auto; border: heavy $error; padding: 1 2; margin-top: 4; }
    """

    def __init__(self, name: str, message: str, *, title: str = "Cannot open this image") -> None:
        super().__init__()
        self.file_name = name
        self.message = message
        self.title_text = title

    def compose(self) -> ComposeResult:
        t = Text()
        t.append(f"{self.title_text}\n\n", Style(bold=True, color=ERROR))
        t.append(f"{self.file_name}\n", Style(bold=True))
        t.append(self.message + "\n")
        low = self.message.lower()
        for key, hint in HINTS.items():
            if key in low:
                t.append("\n" + hint + "\n", Style(color=DIM))
                break
        t.append("\nq quits · o opens another image", Style(color=DIM))
        with Center(), Vertical():
            yield Static(t)
        yield Footer()

    def action_open_other(self) -> None:
        self.dismiss("open")

    def action_quit(self) -> None:
        self.dismiss(None)

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.dismiss("back")
