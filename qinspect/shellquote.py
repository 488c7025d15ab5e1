"""Fix commands that are safe to paste into a shell.

A fix is built as an argument vector and turned into one line here, each argument quoted with
`shlex.quote`. An argument that no quoting can carry safely through copy and paste (a NUL, a
newline or carriage return, any other control character) makes `command_line` raise
`UnsafeArgument`: the finding then says why and prints no command.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


class UnsafeArgument(ValueError):
    """An argument that cannot be pasted safely; `arg` is the offending argument."""

    def __init__(self, arg: str) -> None:
        super().__init__(f"argument {arg!r} holds a control character and cannot be pasted into a shell safely")
        self.arg = arg


def is_pasteable(arg: str) -> bool:
    """False for arguments with control characters (NUL, newline, escape, ...) or lone surrogates."""
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in arg)


def command_line(argv: Sequence[str]) -> str:
    """`['qemu-img', 'check', 'a b.qcow2']` -> "qemu-img check 'a b.qcow2'"; raises UnsafeArgument."""
    for arg in argv:
        if not is_pasteable(arg):
            raise UnsafeArgument(arg)
    return " ".join(shlex.quote(a) for a in argv)
