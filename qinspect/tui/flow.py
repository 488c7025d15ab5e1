"""A Rich renderable that lays items (legend entries) out left to right, wrapping between items
but never inside one."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text


class Flow:
    """`Flow([Text, ...])`: items separated by `gap` spaces (or by `sep`), wrapped at the console
    width."""

    def __init__(self, items: list[Text], gap: int = 2, sep: Text | None = None) -> None:
        self.items = items
        self.gap = gap
        self.sep = sep if sep is not None else Text(" " * gap)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(1, options.max_width)
        line = Text(no_wrap=True, overflow="ellipsis")
        sep = self.sep
        for item in self.items:
            need = item.cell_len + (sep.cell_len if line.cell_len else 0)
            if line.cell_len and line.cell_len + need > width:
                yield line
                line = Text(no_wrap=True, overflow="ellipsis")
                need = item.cell_len
            if line.cell_len:
                line.append_text(sep)
            line.append_text(item)
        if line.cell_len:
            yield line
