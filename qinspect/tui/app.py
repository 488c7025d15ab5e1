"""The qinspect Textual app: `qinspect IMAGE` (or a file picker with no image)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from qinspect.qcow2.errors import Qcow2Error
from qinspect.tui.commands import QinspectCommands
from qinspect.tui.fmt import display_name
from qinspect.tui.screens.error import ErrorScreen
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.screens.picker import PickerScreen
from qinspect.tui.session import Session, open_session


class QInspectApp(App[int]):
    """`QInspectApp(path)`; `path=None` starts with the file picker.

    `scan=False` opens without starting the background scans (tests of the first frame);
    `name` is how the file is named on screen (default: relative to the cwd, or its base name);
    `view` is the view shown first.
    """

    TITLE = "qinspect"
    CSS_PATH = "qinspect.tcss"
    COMMANDS: ClassVar = App.COMMANDS | {QinspectCommands}
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+c", "quit", "Quit", show=False, priority=True)]

    def __init__(self, path: str | None = None, *, scan: bool = True, name: str | None = None,
                 view: str = "overview", root: str = ".") -> None:
        super().__init__()
        self.path = path
        self.autoscan = scan
        self.display_as = name
        self.start_view = view
        self.root = root
        self.session: Session | None = None
        self.theme = "textual-dark"

    def on_mount(self) -> None:
        if self.path is None:
            self.push_screen(PickerScreen(self.root))
        else:
            self.open_path(self.path)

    def open_path(self, path: str, replace: bool = False) -> None:
        """Open an image and show it (or the error screen)."""
        name = self.display_as if path == self.path and self.display_as else display_name(path)
        try:
            session = open_session(path, name)
        except Qcow2Error as e:
            where = f" (offset {e.offset})" if e.offset is not None else ""
            screen: Screen[None] = ErrorScreen(name, e.message + where)
        else:
            if self.session is not None:
                self.session.close()
            self.session = session
            self.sub_title = name
            screen = MainScreen(session, scan=self.autoscan, view=self.start_view)
        if replace:
            self.switch_screen(screen)
        else:
            self.push_screen(screen)

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        for cmd in super().get_system_commands(screen):
            if cmd.title in ("Quit", "Keys", "Screenshot"):
                yield cmd

    def _handle_exception(self, error: Exception) -> None:
        """An unexpected error shows an error screen instead of a traceback (QINSPECT_DEBUG=1
        and tests get the traceback)."""
        if os.environ.get("QINSPECT_DEBUG") or self.is_headless:
            super()._handle_exception(error)
            return
        name = self.session.name if self.session is not None else (self.path or "qinspect")
        try:
            self.push_screen(ErrorScreen(name, f"{type(error).__name__}: {error}\n\n"
                                               "(set QINSPECT_DEBUG=1 to see the traceback)",
                                         title="qinspect hit an internal error"))
        except Exception:
            super()._handle_exception(error)

    def on_unmount(self) -> None:
        if self.session is not None:
            self.session.close()


def run_app(path: str | None) -> int:
    """Run the TUI on `path` (None: the file picker). Returns the exit code."""
    app = QInspectApp(path)
    try:
        rc = app.run()
    except KeyboardInterrupt:
        return 130
    if isinstance(rc, int):
        return rc
    return app.return_code or 0
