"""Errors and problems found while reading an image.

`Qcow2Error` is raised when a structure cannot be used at all (not a qcow2 file, a header QEMU
cannot parse, a read of guest data that cannot be served). `Problem` records something wrong that
leaves the rest of the image inspectable; `Image.problems` collects them.
"""

from __future__ import annotations

from enum import StrEnum

from qinspect.qcow2.value import Value


class Qcow2Error(Exception):
    """A structure of the image cannot be read; `offset` is the file offset at fault, if known."""

    def __init__(self, message: str, offset: int | None = None, *, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.path = path

    def __str__(self) -> str:
        if self.offset is None:
            return self.message
        return f"{self.message} (offset {self.offset})"


class EncryptedDataError(Qcow2Error):
    """Guest data of an encrypted image was asked for; qinspect handles no keys."""


class Severity(StrEnum):
    """How bad a problem or a finding is, the one vocabulary of every layer (the value is the word
    printed and put in JSON).

    A problem: `error` breaks reads of some structure, `warning` is suspicious. A finding (the
    diagnosis): `error` is data at risk or an image that does not open, `warning` a cost above a
    stated threshold, `info` worth knowing.
    """

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        """0 for the worst (error), then warning 1, info 2: sort by it."""
        return _SEVERITY_RANKS[self]

    def __str__(self) -> str:
        return self.value


_SEVERITY_RANKS = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


class Problem(Value):
    """Something wrong with the image that does not stop the rest of it being inspected.

    `qemu_refuses_open` marks problems for which QEMU itself refuses to open the image; commands
    that mimic qemu-img fail on those as qemu-img does. `check_opens` marks the ones QEMU lets
    pass when it opens for `qemu-img check` (BDRV_O_CHECK): no refcount table, a bad snapshot
    table pointer (which the check itself then reports).

    An immutable value, compared and hashed by its fields (`qinspect.qcow2.value.Value`).
    """

    __slots__ = ("check_opens", "message", "offset", "qemu_refuses_open", "severity", "structure")
    FIELDS = ("severity", "structure", "message", "offset", "qemu_refuses_open", "check_opens")

    severity: Severity
    structure: str
    message: str
    offset: int | None
    qemu_refuses_open: bool
    check_opens: bool

    def __init__(self, severity: Severity, structure: str, message: str, offset: int | None = None,
                 qemu_refuses_open: bool = False, check_opens: bool = False) -> None:
        self._assign(severity, structure, message, offset, qemu_refuses_open, check_opens)

    def __str__(self) -> str:
        where = f" (offset {self.offset})" if self.offset is not None else ""
        return f"{self.structure}: {self.message}{where}"
