"""The file picker: qcow2 files below the current directory (found by their magic), filtered as you type."""

from __future__ import annotations

import os
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from qinspect.qcow2.fields import HEADER_V2_SIZE
from qinspect.tui import fmt
from qinspect.tui.palette import DIM
from qinspect.tui.widgets.inputs import SteadyInput

MAGIC = b"QFI\xfb"
SKIP_DIRS = {".git", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".mypy_cache", ".ruff_cache",
             "proc", "sys", "dev"}
MAX_DEPTH = 6
MAX_FILES = 200_000
MAX_RESULTS = 5_000


def find_qcow2(root: str) -> list[tuple[str, int]]:
    """(relative path, size) of every qcow2 file below `root`, sorted; bounded depth and count."""
    found: list[tuple[str, int]] = []
    seen = 0
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = dirpath[len(root):].count(os.sep)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and depth < MAX_DEPTH)
        for name in sorted(filenames):
            seen += 1
            if seen > MAX_FILES or len(found) >= MAX_RESULTS:
                return sorted(found)
            path = os.path.join(dirpath, name)
            try:
                if not os.path.isfile(path) or os.path.getsize(path) < HEADER_V2_SIZE:
                    continue
                with open(path, "rb") as f:
                    if f.read(4) != MAGIC:
                        continue
                found.append((os.path.relpath(path, root), os.path.getsize(path)))
            except OSError:
                continue
    return sorted(found)


class PickerScreen(Screen[None]):
    """Type to filter, arrows to choose, enter to open."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.quit", "Quit"),
        Binding("down", "list_down", show=False),
        Binding("up", "list_up", show=False),
    ]

    DEFAULT_CSS = """
    PickerScreen #pk-title { height: 1; padding: 0 1; background: $panel; }
    PickerScreen Input { margin: 0 1; }
    PickerScreen OptionList { height: 1fr; margin: 0 1; }
    PickerScreen #pk-status { height: 1; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, root: str = ".") -> None:
        super().__init__()
        self.root = root
        self.files: list[tuple[str, int]] = []

    def compose(self) -> ComposeResult:
        t = Text()
        t.append(" qinspect ", Style(bold=True, reverse=True))
        t.append("  open a qcow2 image below the current directory")
        yield Static(t, id="pk-title")
        yield SteadyInput(placeholder="filter (type part of a path)")
        yield OptionList(id="pk-list")
        yield Static("searching for qcow2 files…", id="pk-status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(Input).focus()
        self.scan()

    @work(thread=True, exit_on_error=False)
    def scan(self) -> None:
        files = find_qcow2(self.root)
        self.app.call_from_thread(self._found, files)

    def _found(self, files: list[tuple[str, int]]) -> None:
        self.files = files
        self._fill(self.query_one(Input).value)

    def _fill(self, needle: str) -> None:
        ol = self.query_one(OptionList)
        ol.clear_options()
        n = 0
        for path, size in self.files:
            if needle.lower() not in path.lower():
                continue
            t = Text()
            t.append(path)
            t.append(f"  {fmt.size(size)}", Style(color=DIM))
            ol.add_option(Option(t, id=path))
            n += 1
        if self.files:
            ol.highlighted = 0 if n else None
        status = f"{n} of {len(self.files)} qcow2 files" if self.files else "no qcow2 files below this directory"
        self.query_one("#pk-status", Static).update(status + " · enter opens · esc quits")

    def on_input_changed(self, event: Input.Changed) -> None:
        self._fill(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        ol = self.query_one(OptionList)
        if ol.highlighted is not None:
            self._open(ol.get_option_at_index(ol.highlighted).id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self._open(event.option.id)

    def _open(self, rel: str | None) -> None:
        if rel is None:
            return
        from qinspect.tui.app import QInspectApp

        app = self.app
        assert isinstance(app, QInspectApp)
        app.open_path(os.path.join(self.root, rel), replace=True)

    def action_list_down(self) -> None:
        self.query_one(OptionList).action_cursor_down()

    def action_list_up(self) -> None:
        self.query_one(OptionList).action_cursor_up()
