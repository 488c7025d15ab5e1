"""The qinspect Textual app: `qinspect IMAGE` (or a file picker with no image)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.command import Provider
from textual.screen import Screen

from qinspect.qcow2.errors import Qcow2Error
from qinspect.termtext import for_terminal
from qinspect.tui.fmt import display_name
from qinspect.tui.heap import return_freed_memory
from qinspect.tui.screens.error import ErrorScreen
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.session import Session, open_session


def _commands() -> type[Provider]:
    """The command palette's provider, imported when the palette first opens."""
    from qinspect.tui.commands import QinspectCommands

    return QinspectCommands


class QInspectApp(App[int]):
    """`QInspectApp(path)`; `path=None` starts with the file picker.

    `scan=False` opens without starting the background scans (tests of the first frame);
    `name` is how the file is named on screen (default: relative to the cwd, or its base name);
    `view` is the view shown first.
    """

    TITLE = "qinspect"
    CSS_PATH = "qinspect.tcss"
    COMMANDS: ClassVar = App.COMMANDS | {_commands}
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+c", "quit", "Quit", show=False, priority=True)]

    def __init__(self, path: str | None = None, *, scan: bool = True, name: str | None = None,
                 view: str = "overview", root: str = ".") -> None:
        super().__init__()
        return_freed_memory()  # the scans' big temporaries go back to the system when freed
        self.path = path
        self.autoscan = scan
        self.display_as = name
        self.start_view = view
        self.root = root
        self.session: Session | None = None
        self.theme = "textual-dark"

    def on_mount(self) -> None:
        self.register_themes()
        if self.path is None or os.path.isdir(self.path):
            self.show_picker(self.path or self.root, first=True)
        else:
            self.open_path(self.path)

    def register_themes(self) -> None:
        from qinspect.tui.themes import textual_themes

        for theme in textual_themes():
            self.register_theme(theme)

    def watch_theme(self, theme: str) -> None:
        """The palette follows Textual's theme (the command palette's theme picker)."""
        from qinspect.tui.themes import use_palette_for_theme

        if use_palette_for_theme(theme):
            for screen in self.screen_stack:
                for widget in screen.walk_children():
                    refresh_colours = getattr(widget, "palette_changed", None)
                    if refresh_colours is not None:
                        refresh_colours()
                    widget.refresh()

    def show_picker(self, root: str, first: bool = False) -> None:
        """The picker (a dashboard of the images below `root`); it dismisses with the path chosen."""
        from qinspect.tui.screens.picker import PickerScreen

        def chosen(path: str | None) -> None:
            if path:
                self.open_path(path)
            elif first or not self.screen_stack[1:]:
                self.exit(0)

        self.push_screen(PickerScreen(root), chosen)

    def open_path(self, path: str, replace: bool = False) -> None:
        """Open an image and show it (or the error screen)."""
        name = self.display_as if path == self.path and self.display_as else display_name(path)
        try:
            # The overview's first frame needs the metadata only (no numpy, no tables); the other
            # views read tables as they are built.
            session = open_session(path, name, load=self.start_view != "overview")
        except Qcow2Error as e:
            self.push_screen(ErrorScreen(for_terminal(name), for_terminal(error_text(e))), self._error_done)
            return
        else:
            if self.session is not None:
                self.session.close()
            self.session = session
            self.sub_title = name
            screen = MainScreen(session, scan=self.autoscan, view=self.start_view)
        while replace and len(self.screen_stack) > 2:  # the old main screen and what it pushed
            self.pop_screen()
        if replace and len(self.screen_stack) > 1:
            self.switch_screen(screen)
        else:
            self.push_screen(screen)

    def open_failed(self, screen: Screen[None], name: str, error: Exception) -> None:
        """The image's tables could not be read after its first frame: its screen gives way to
        the error screen."""
        text = error_text(error) if isinstance(error, Qcow2Error) else (
            error.strerror or str(error)) if isinstance(error, OSError) else str(error)
        if self.screen is screen and len(self.screen_stack) > 1:
            self.pop_screen()
        self.push_screen(ErrorScreen(name, for_terminal(text)), self._error_done)

    def _error_done(self, result: str | None) -> None:
        """The error screen closed: `open` shows the picker, `back` the screen below, else quit."""
        if result == "open":
            root = os.path.dirname(os.path.abspath(self.path)) if self.path and not os.path.isdir(self.path) \
                else (self.path or self.root)
            self.show_picker(root)
        elif result != "back":
            self.exit(0)

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
            self.push_screen(ErrorScreen(for_terminal(name), for_terminal(f"{type(error).__name__}: {error}") + "\n\n"
                                         "(set QINSPECT_DEBUG=1 to see the traceback)",
                                         title="qinspect hit an internal error"), self._error_done)
        except Exception:
            super()._handle_exception(error)

    def on_unmount(self) -> None:
        if self.session is not None:
            self.session.close()


def error_text(e: Qcow2Error) -> str:
    """What the error screen says about an image that cannot be opened."""
    return e.message + (f" (offset {e.offset})" if e.offset is not None else "")


def run_app(path: str | None) -> int:
    """Run the TUI on `path` (None or a directory: the picker). Returns the exit code."""
    app = QInspectApp(path)
    try:
        rc = app.run()
    except KeyboardInterrupt:
        return 130
    if isinstance(rc, int):
        return rc
    return app.return_code or 0
