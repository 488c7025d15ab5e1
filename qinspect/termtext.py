"""Text from an image, made safe for a terminal.

Every string read from a file (backing names and formats, snapshot and bitmap names, feature
names, data-file names, the image's own path) is data: `for_terminal` shows C0/C1 controls, DEL
and lone surrogates as escapes (`\\x1b`, `\\n`, `\\x9b`, `\\udcff`) so nothing in a name can move
the cursor, retitle the terminal or split a message. Rich markup is a separate matter: pass such
text to Rich only as `rich.text.Text` (or `rich.markup.escape`), never inside a markup string.
JSON output keeps the exact strings and does not use this.
"""

from __future__ import annotations

import re

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(c: str) -> str:
    o = ord(c)
    if c in _NAMED:
        return _NAMED[c]
    if o < 0x20 or 0x7F <= o <= 0x9F:
        return f"\\x{o:02x}"
    if 0xD800 <= o <= 0xDFFF:
        return f"\\u{o:04x}"
    return c


UNSAFE_PATTERN = "[\x00-\x1f\x7f-\x9f\\\\\ud800-\udfff]"
"""What `_escape_char` changes: C0, DEL and C1 controls, the backslash, lone surrogates. Compiled
when text that is not plain ASCII is first checked (the compile is ~0.4 ms of a start-up)."""


def needs_escape(text: str) -> bool:
    """True when `text` holds a control character, a backslash or a lone surrogate."""
    if text.isascii() and text.isprintable():  # (printable ASCII: only the backslash is escaped)
        return "\\" in text
    return re.search(UNSAFE_PATTERN, text) is not None  # (re caches the compiled pattern)


def for_terminal(text: str) -> str:
    """`text` with every control character shown as an escape; plain text comes back unchanged."""
    if not needs_escape(text):
        return text
    return "".join(_escape_char(c) for c in text)


LIST_LIMIT = 10
"""Items of a list from an image that human output names before "… and N more"."""


def bounded(items: list[str], limit: int = LIST_LIMIT, sep: str = ", ", total: int | None = None) -> str:
    """The first `limit` of `items` (already escaped) joined by `sep`, then "… and N more" for the
    rest of the `total` (default: `len(items)`): an image with 65,536 snapshots gives a line, not
    a page. JSON output lists every item instead."""
    total = len(items) if total is None else total
    shown = items[:limit]
    rest = total - len(shown)
    return sep.join(shown) + (f"{sep if shown else ''}… and {rest:,} more" if rest > 0 else "")
