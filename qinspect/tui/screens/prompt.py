"""A one-line modal prompt (go to an offset, find): returns the text, or None on escape."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from qinspect.tui.widgets.inputs import SteadyInput


class PromptScreen(ModalScreen[str | None]):
    """`PromptScreen(title, value)`: enter returns the text, escape returns None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    PromptScreen > Vertical { width: 70; height: auto; border: round $accent; background: $panel; padding: 0 1; }
    PromptScreen Label { width: 1fr; margin-bottom: 1; }
    PromptScreen Input { width: 1fr; }
    """

    def __init__(self, title: str, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.value = value
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text)
            yield SteadyInput(value=self.value, placeholder=self.placeholder, select_on_focus=True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
