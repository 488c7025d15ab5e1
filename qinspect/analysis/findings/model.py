"""What a finding is: severity, evidence, impact and a fix that is a prediction.

A `Fix` is an argument vector (rendered for pasting with `shellquote.command_line`), whether it
changes the image in place, and what qinspect predicts the image file will be right after it runs
(`predicts`: `file-size` and `disk-usage` in bytes, plus whatever else it changes). A name that
cannot be pasted safely, or an image held open by a running VM, leaves the fix without a command
(`blocked` says why). `Context` is everything the rules look at, computed once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from qinspect.analysis.cache import CacheModel
from qinspect.analysis.deep import DeepScan
from qinspect.analysis.layout import Layout
from qinspect.analysis.space import Space
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.errors import Severity as Severity  # (the one severity vocabulary, re-exported for the rules)
from qinspect.qcow2.hostfile import InUse
from qinspect.qcow2.image import Image, Layer
from qinspect.shellquote import UnsafeArgument, command_line
from qinspect.units import format_size

Evidence = dict[str, int | float | str]


class EvidenceUnit(StrEnum):
    """What an evidence value counts, for printing it (JSON keeps the plain number)."""

    BYTES = "bytes"
    OFFSET = "offset"
    COUNT = "count"
    RATIO = "ratio"
    TEXT = "text"


BYTE_KEYS = frozenset({"granularity", "cow-unit", "cow-unit-after-fix", "default-l2-cache", "l2-cache-needed",
                       "l2-cache-needed-at-64k", "bytes-per-4k-write", "bytes-per-4k-write-after-fix",
                       "convert-reclaim", "referenced-end", "disk-usage", "file-size-at-most"})
"""Evidence keys that hold byte counts without saying so by a `-bytes` or `-size` ending."""


def evidence_unit(key: str, value: int | float | str) -> EvidenceUnit:
    """The unit of one evidence value: the one rule the CLI and the TUI print evidence by. Byte
    counts end in `-bytes` or `-size` or are listed in `BYTE_KEYS`; offsets name one."""
    if isinstance(value, str | bool):
        return EvidenceUnit.TEXT
    if isinstance(value, float):
        return EvidenceUnit.RATIO
    if key.endswith(("-bytes", "-size")) or key in BYTE_KEYS:
        return EvidenceUnit.BYTES
    if key.endswith("offset"):
        return EvidenceUnit.OFFSET
    return EvidenceUnit.COUNT


class Category(StrEnum):
    """What a finding is about; decides how a fix may be judged harmful."""

    HEALTH = "health"
    SPACE = "space"
    PERFORMANCE = "performance"


@dataclass
class Fix:
    """One command and its predicted result (`predicts`, bytes)."""

    argv: list[str] | None
    in_place: bool
    predicts: dict[str, int | float | str]
    note: str = ""
    """What to do around the command (replace the image with the new file, back up first)."""
    cost: str = ""
    """For performance fixes: what it costs (space, a format change)."""
    blocked: str = ""
    """Why no command is printed (a name that cannot be pasted, the image is in use)."""
    loses: str = ""
    """Data the fix gives up, said honestly (salvage)."""
    output: str | None = None
    """The new file a not-in-place fix writes."""
    in_guest: bool = False
    """The command runs inside the guest, through the running VM (`fstrim`): a write lock does not block it."""

    @property
    def command(self) -> str | None:
        """The pasteable command line, or None when there is none (see `blocked`)."""
        if self.argv is None or self.blocked:
            return None
        try:
            return command_line(self.argv)
        except UnsafeArgument:
            return None

    def __post_init__(self) -> None:
        if self.argv is not None and not self.blocked:
            try:
                command_line(self.argv)
            except UnsafeArgument as e:
                self.blocked = (f"no command printed: the name {e.arg!r} holds a control character (newline, "
                                "escape, ...) that cannot be pasted into a shell safely; rename the file first")

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"command": self.command, "in_place": self.in_place, "predicts": dict(self.predicts)}
        for k in ("note", "cost", "blocked", "loses"):
            v = getattr(self, k)
            if v:
                out[k] = v
        if self.output is not None:
            out["output"] = self.output
        if self.in_guest:
            out["in-guest"] = True
        return out

    def __str__(self) -> str:
        """The command (or why there is none), its note, and what it predicts (for viewers)."""
        cmd = self.command
        text = cmd if cmd is not None else f"({self.blocked})"
        if self.note and cmd is not None:
            text += f"   # {self.note}"
        p = self.predicts
        if "disk-usage" in p and "file-size" in p:
            text += (f"\npredicts: {format_size(int(p['disk-usage']))} on disk, "
                     f"{format_size(int(p['file-size']))} apparent" + (" (in place)" if self.in_place else ""))
        for label, value in (("cost", self.cost), ("loses", self.loses)):
            if value:
                text += f"\n{label}: {value}"
        return text


@dataclass
class ConvertWish:
    """A finding's wish for a `qemu-img convert`: target options (None = keep) and why."""

    options: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    flags: tuple[str, ...] = ()
    """Extra convert flags (`--salvage`, `-c`)."""


@dataclass
class Finding:
    """One diagnosis: `evidence` holds the numbers (bytes, counts, ratios) the rule used."""

    id: str
    severity: Severity
    title: str
    evidence: Evidence
    impact: str
    fix: Fix | None = None
    category: Category = Category.HEALTH
    convert: ConvertWish | None = None
    """Set by rules whose fix is a conversion; the planner merges them into one `fix`."""

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "severity": self.severity.value, "category": self.category.value, "title": self.title,
                "evidence": dict(self.evidence), "impact": self.impact,
                "fix": self.fix.to_json() if self.fix is not None else None}


class Context:
    """Everything the rules look at, computed once."""

    def __init__(self, img: Image, layout: Layout, space: Space, cache: CacheModel, deep: DeepScan | None) -> None:
        self.img = img
        self.h = img.header
        self.layout = layout
        self.space = space
        self.cache = cache
        self.deep = deep
        self.path = img.path
        self.lock = img.file.lock_state()
        self.chain: list[Layer] | None
        self.chain_error: str | None = None
        try:
            self.chain = img.chain()
        except Qcow2Error as e:
            self.chain = None
            self.chain_error = e.message

    @property
    def has_backing(self) -> bool:
        return self.h.backing_file is not None

    @property
    def write_locked(self) -> bool:
        return self.lock is InUse.WRITER

    @property
    def file_size(self) -> int:
        return self.space.file_size

    @property
    def disk_usage(self) -> int:
        return self.space.allocated_size

    def unchanged(self, **extra: int | float | str) -> dict[str, int | float | str]:
        """`predicts` for a fix that leaves the file's size and disk usage as they are."""
        return {"file-size": self.file_size, "disk-usage": self.disk_usage, **extra}

    def fully_allocated(self) -> bool:
        """Every guest cluster of the virtual disk has a host cluster (the mark of preallocation)."""
        guest_clusters = self.h.guest_clusters
        return guest_clusters > 0 and self.layout.active_allocated_clusters() >= guest_clusters
