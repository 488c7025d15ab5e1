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
        yield Label("", id="scan-hint")  # the progress bar goes before it when a scan first reports

    def on_mount(self) -> None:
        self.add_class("-idle")

    def _bar(self) -> ProgressBar:
        """The progress bar, mounted on first use (not in the first frame: nothing runs yet)."""
        found = self.query(ProgressBar)
        if found:
            return found.first()
        bar = ProgressBar(total=100, show_eta=False, show_percentage=True)
        self.mount(bar, before=self.query_one("#scan-hint"))
        return bar

    def start(self, label: str) -> None:
        self.remove_class("-idle")
        self.query_one("#scan-label", Label).update(label)
        self._bar().update(total=100, progress=0)
        self.query_one("#scan-hint", Label).update(Text("esc cancels · partial results stay usable", style=DIM))

    def advance(self, label: str, done: int, total: int) -> None:
        self.remove_class("-idle")
        self.query_one("#scan-label", Label).update(label)
        self._bar().update(total=max(1, total), progress=min(done, total))

    def idle(self, text: str, warn: bool = False) -> None:
        self.add_class("-idle")
        self.query_one("#scan-label", Label).update(Text(text, style=WARN if warn else DIM))
        self.query_one("#scan-hint", Label).update("")
