"""Text from an image, made safe for a terminal.

Every string read from a file (backing names and formats, snapshot and bitmap names, feature
names, data-file names, the image's own path) is data: `for_terminal` shows C0/C1 controls, DEL
and lone surrogates as escapes (`\\x1b`, `\\n`, `\\x9b`, `\\udcff`) so nothing in a name can move
the cursor, retitle the terminal or split a message. Rich markup is a separate matter: pass such
text to Rich only as `rich.text.Text` (or `rich.markup.escape`), never inside a markup string.
JSON output keeps the exact strings and does not use this.
"""

from __future__ import annotations

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


def needs_escape(text: str) -> bool:
    """True when `text` holds a control character, a backslash or a lone surrogate."""
    return any(_escape_char(c) != c for c in text)


def for_terminal(text: str) -> str:
    """`text` with every control character shown as an escape; plain text comes back unchanged."""
    if not needs_escape(text):
        return text
    return "".join(_escape_char(c) for c in text)
