"""The scan status line: what is running, a progress bar, and how to cancel."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar

from qinspect.tui.palette import DIM, WARN


class ScanStatus(Horizontal):
    """`start(label, total)`, `advance(done, total)`, `idle(text)`."""

    DEFAULT_CSS = """
    ScanStatus { height: 1; width: 1fr; background: $panel; }
    ScanStatus Label#scan-label { width: auto; max-width: 70; padding: 0 1; }
    ScanStatus ProgressBar { width: 40; }
    ScanStatus ProgressBar Bar { width: 30; }
    ScanStatus Label#scan-hint { width: 1fr; color: $text-muted; padding: 0 1; }
    ScanStatus.-idle ProgressBar { display: none; }
    """

    def compose(self) -> ComposeResult:
        yield Label("", id="scan-label")
        yield ProgressBar(total=100, show_eta=False, show_percentage=True)
        yield Label("", id="scan-hint")

    def on_mount(self) -> None:
        self.add_class("-idle")

    def start(self, label: str) -> None:
        self.remove_class("-idle")
        self.query_one("#scan-label", Label).update(label)
        self.query_one(ProgressBar).update(total=100, progress=0)
        self.query_one("#scan-hint", Label).update(Text("esc cancels · partial results stay usable", style=DIM))

    def advance(self, label: str, done: int, total: int) -> None:
        self.remove_class("-idle")
        self.query_one("#scan-label", Label).update(label)
        self.query_one(ProgressBar).update(total=max(1, total), progress=min(done, total))

    def idle(self, text: str, warn: bool = False) -> None:
        self.add_class("-idle")
        self.query_one("#scan-label", Label).update(Text(text, style=WARN if warn else DIM))
        self.query_one("#scan-hint", Label).update("")
