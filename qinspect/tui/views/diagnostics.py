"""6 · Diagnostics: the findings, worst first, each with its evidence, impact and fix."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

from rich.console import Group, RenderableType
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from qinspect.qcow2.errors import Severity
from qinspect.termtext import LIST_LIMIT, for_terminal
from qinspect.tui import fmt
from qinspect.tui.messages import FindIn, ShowHost, ShowStructure, ShowView
from qinspect.tui.nav import Place
from qinspect.tui.palette import DIM, ERROR, OK, WARN, severity_colour, severity_order, severity_word
from qinspect.tui.session import Session, Step
from qinspect.tui.structs import HEADER_FIELDS, StructKind, StructRef
from qinspect.tui.views.base import View

if TYPE_CHECKING:
    from qinspect.analysis.diagnose import Diagnosis
    from qinspect.analysis.findings.model import Fix

class EvidenceIn(Enum):
    """Where a finding's evidence is shown."""

    HOST_MAP = "host"
    """A search in the host layout (the value is the view's id)."""
    GUEST_MAP = "guest"
    """A search in the guest map (the value is the view's id)."""
    VIEW = "view"
    """A whole view (named beside it)."""
    HEADER_FIELD = "header"
    """A field of the header, in the Structures view."""


# Each finding's evidence: a search in a map view, a header field or a view. The header rows are
# those of the Structures view's header table (field order of the qcow2 header).
_HEADER_ROW = {f[0]: row for row, f in enumerate(HEADER_FIELDS)}
EVIDENCE: dict[str, tuple[EvidenceIn, str]] = {
    "leaked-clusters": (EvidenceIn.HOST_MAP, "leaked"), "check-leaks": (EvidenceIn.HOST_MAP, "leaked"),
    "free-space": (EvidenceIn.HOST_MAP, "free"), "fragmentation": (EvidenceIn.HOST_MAP, "data"),
    "fragmented": (EvidenceIn.HOST_MAP, "data"), "scattered-metadata": (EvidenceIn.HOST_MAP, "L2 table"),
    "zero-clusters": (EvidenceIn.GUEST_MAP, "zero"), "backing-duplicates": (EvidenceIn.GUEST_MAP, "backing"),
    "preallocated-unused": (EvidenceIn.GUEST_MAP, "zero"), "compressed": (EvidenceIn.GUEST_MAP, "compressed"),
    "snapshot-space": (EvidenceIn.VIEW, "chain"), "long-chain": (EvidenceIn.VIEW, "chain"),
    "backing-missing": (EvidenceIn.VIEW, "chain"), "l2-cache-coverage": (EvidenceIn.VIEW, "cache"),
    "l2-cache": (EvidenceIn.VIEW, "cache"), "dirty": (EvidenceIn.HEADER_FIELD, "incompatible_features"),
    "corrupt-bit": (EvidenceIn.HEADER_FIELD, "incompatible_features"),
    "small-clusters": (EvidenceIn.HEADER_FIELD, "cluster_bits"),
    "cow-amplification": (EvidenceIn.HEADER_FIELD, "cluster_bits"),
    "v2-no-zero": (EvidenceIn.HEADER_FIELD, "version"),
    "narrow-refcount": (EvidenceIn.HEADER_FIELD, "refcount_order"), "problem": (EvidenceIn.HEADER_FIELD, "version"),
}


@dataclass
class Item:
    """A finding as the view shows it (from `diagnose`, or from what the core can tell)."""

    id: str
    severity: Severity | None
    """None: the verdict that nothing was found (shown as OK)."""
    title: str
    evidence: str = ""
    impact: str = ""
    fix: str = ""


def fix_command(fix: Fix | None) -> str:
    """The command of a finding's fix ("" when it has none, or when it is blocked)."""
    return (fix.command or "") if fix is not None else ""


def _text(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, dict):
        lines = []
        items = list(v.items())
        limit = 2 * LIST_LIMIT  # evidence naming each of 65,536 snapshots: a screenful, not a book
        from qinspect.analysis.findings.model import EvidenceUnit, evidence_unit  # (numpy-heavy: not at start-up)

        for k, val in items[:limit]:
            unit = evidence_unit(str(k), val) if isinstance(val, int | float | str) else EvidenceUnit.TEXT
            if unit is EvidenceUnit.BYTES and isinstance(val, int) and val >= 1024:
                lines.append(f"{k}: {val:,} ({fmt.size(val)})")
            elif unit is EvidenceUnit.OFFSET and isinstance(val, int):
                lines.append(f"{k}: {val:#x}")
            else:
                lines.append(f"{k}: {val}")
        if len(items) > limit:
            lines.append(f"… and {len(items) - limit:,} more (qinspect diagnose --output=json lists all)")
        return "\n".join(lines)
    if isinstance(v, list | tuple):
        return "\n".join(str(x) for x in v)
    return str(v)


def items_from_diagnosis(diag: Diagnosis, s: Session) -> list[Item]:
    """The findings of `diagnose`, every string escaped for the terminal (names come from the file)."""
    out = []
    for f in diag.findings:
        out.append(Item(f.id, f.severity, s.clean(f.title), s.clean(_text(f.evidence), True),
                        s.clean(_text(f.impact), True), s.clean(fix_command(f.fix), True)))
    return out


def cmd(*argv: str) -> str:
    """A pasteable command (every argument shell-quoted); empty when a name cannot be passed safely."""
    from qinspect.shellquote import UnsafeArgument, command_line

    try:
        return command_line(list(argv))
    except UnsafeArgument:
        return ""


def items_from_core(s: Session) -> list[Item]:
    """Findings from the open problems, `check` and the cache arithmetic (no diagnose module)."""
    out: list[Item] = []
    img = s.img
    h = img.header
    path = s.path if not os.path.isabs(s.path) else os.path.relpath(s.path) if s.path.startswith(os.getcwd()) \
        else s.path
    for p in img.problems:
        where = f"{p.structure} at offset {p.offset}" if p.offset is not None else p.structure
        out.append(Item("problem", p.severity, s.clean(p.message), for_terminal(where),
                        "QEMU refuses to open the image" if p.qemu_refuses_open else ""))
    if s.chain_error:
        out.append(Item("backing-missing", Severity.ERROR, "the backing chain cannot be opened", s.chain_error,
                        "guest reads of unallocated clusters fail",
                        cmd("qemu-img", "rebase", "-u", "-b", "NEW_BACKING", "-F", "qcow2", path)))
    if h.corrupt:
        out.append(Item("corrupt-bit", Severity.ERROR, "the corrupt bit is set", "incompatible feature bit 1",
                        "QEMU opens the image read-only only", cmd("qemu-img", "check", "-r", "all", path)))
    if h.dirty:
        out.append(Item("dirty", Severity.WARNING, "the dirty bit is set (lazy refcounts, not closed cleanly)",
                        "incompatible feature bit 0", "the next read/write open rebuilds every refcount first",
                        cmd("qemu-img", "check", "-r", "all", path)))
    chk = s.check
    if chk is not None:
        from qinspect.analysis.check import MessageKind  # (numpy-heavy: not at start-up)

        if chk.corruptions:
            msgs = [m.text for m in chk.messages if m.kind is MessageKind.ERROR][:8]
            out.append(Item("check-corruptions", Severity.ERROR, f"{chk.corruptions} corruptions (qemu-img check)",
                            "\n".join(msgs), "reads or writes may fail or return wrong data",
                            cmd("cp", path, path + ".bak") + " && " + cmd("qemu-img", "check", "-r", "all", path)))
        if chk.leaks:
            out.append(Item("check-leaks", Severity.WARNING, f"{chk.leaks} leaked clusters",
                            f"{chk.leaks} clusters have a refcount but nothing points at them",
                            f"{fmt.size(chk.leaks * h.cluster_size)} of the file are wasted",
                            cmd("qemu-img", "check", "-r", "leaks", path)))
        if chk.fragmented_clusters and chk.allocated_clusters:
            share = chk.fragmented_clusters / chk.allocated_clusters
            if share > 0.25:
                out.append(Item("fragmented", Severity.INFO,
                                f"{share * 100:.0f}% of the allocated clusters are fragmented",
                                f"{chk.fragmented_clusters} of {chk.allocated_clusters} clusters",
                                "sequential guest reads become random host reads",
                                cmd("qemu-img", "convert", "-O", "qcow2", path, path + ".new")))
    from qinspect.analysis.cache import cache_model

    try:
        m = cache_model(h.size, h.cluster_size, h.extended_l2, h.refcount_bits)
        if m.default_coverage < 1:
            out.append(Item("l2-cache", Severity.WARNING,
                            f"QEMU's default L2 cache covers only {m.default_coverage * 100:.0f}% of the disk",
                            f"{fmt.size(m.default_l2_cache_size)} default, {fmt.size(m.max_l2_cache)} needed",
                            "random I/O outside the cached part re-reads L2 tables",
                            cmd("-drive", f"file={path.replace(',', ',,')},"
                                f"l2-cache-size={fmt.option_size(m.max_l2_cache)}")))
    except ValueError:
        pass
    if not out:
        out.append(Item("ok", None, "nothing wrong found", "header, tables and refcounts are consistent"))
    return out


class FindingList(OptionList):
    """The findings; `enter` (shown in the footer) follows the selected one's evidence."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select", "Evidence", key_display="⏎")]


class DiagnosticsView(View):
    """The findings list and the selected finding's details."""

    VIEW_ID = "diagnostics"
    TITLE = "Diagnostics"

    HELP = """
## Diagnostics

What is wrong or slow with this image, worst first. Each finding has its
evidence (numbers), its impact and the command that fixes it.

- arrows / `jk` select a finding
- `enter` follows the finding's evidence: the clusters (guest or host map, at
  the first one) or the structure (header field, table) it is about;
  `backspace` comes back here
- `c` copies the fix command, `e` exports the findings as JSON
- `/` finds a finding by text
- `r` runs the scans again
"""

    find_prompt = "Find a finding (text)"

    DEFAULT_CSS = """
    DiagnosticsView OptionList, DiagnosticsView OptionList:focus {
        width: 45%; min-width: 24; max-width: 60; height: 1fr; border: none; border-right: vkey $foreground 20%;
        padding: 0;
    }
    DiagnosticsView #dg-detail { width: 1fr; padding: 0 1; }
    DiagnosticsView #dg-status { height: auto; padding: 0 1; }
    """

    def __init__(self, session: Session, *, id: str | None = None) -> None:
        super().__init__(session, id=id)
        self.items: list[Item] = []

    def compose(self) -> ComposeResult:
        yield Static("", id="dg-status")
        with Horizontal():
            yield FindingList(id="dg-list")
            with VerticalScroll(id="dg-detail"):
                yield Static("", id="dg-text")

    def main_widget(self) -> Widget | None:
        return self.query_one(OptionList)

    def on_mount(self) -> None:
        self.rebuild()

    def _status(self) -> Text:
        s = self.session
        t = Text()
        if s.diagnosis is not None:
            t.append("from qinspect diagnose", Style(color=DIM))
        elif Step.DIAGNOSE in s.errors:
            t.append(f"diagnose failed: {s.clean(s.errors[Step.DIAGNOSE])}", Style(color=ERROR))
        elif s.scanning:
            t.append("diagnosing… (runs after the host layout; esc cancels)", Style(color=DIM))
        else:
            t.append("from the open checks and the cache model; the diagnosis did not run (r runs it)",
                     Style(color=DIM))
        for step in sorted(s.cancelled):
            t.append(f" · {step.label} cancelled (r resumes)", Style(color=WARN))
        return t

    def rebuild(self) -> None:
        s = self.session
        items = items_from_diagnosis(s.diagnosis, s) if s.diagnosis is not None else items_from_core(s)
        items.sort(key=lambda it: severity_order(it.severity))
        self.items = items
        ol = self.query_one(OptionList)
        highlighted = ol.highlighted
        ol.clear_options()
        for i, it in enumerate(items):
            t = Text(no_wrap=True, overflow="ellipsis")
            colour = severity_colour(it.severity)
            t.append(f"{severity_word(it.severity):<8}", Style(color=colour, bold=True))
            t.append(it.title)
            ol.add_option(Option(t, id=f"f{i}"))
        self.query_one("#dg-status", Static).update(self._status())
        if items:
            ol.highlighted = min(highlighted or 0, len(items) - 1)
            self.show(ol.highlighted or 0)

    def show(self, i: int) -> None:
        if not 0 <= i < len(self.items):
            return
        it = self.items[i]
        colour = severity_colour(it.severity)
        parts: list[RenderableType] = []
        head = Text()
        head.append(f" {severity_word(it.severity)} ", Style(bgcolor=colour, color="#000000", bold=True))
        head.append(f" {it.title}", Style(bold=True))
        parts.append(head)
        if it.id:
            parts.append(Text(it.id, Style(color=DIM)))
        evidence = it.evidence
        chk = self.session.check
        if it.id in EVIDENCE:
            parts.append(Text("enter: show the evidence", Style(color=DIM, italic=True)))
        if chk is not None and it.id in ("corruption", "leaked-clusters", "check-corruptions", "check-leaks"):
            from qinspect.analysis.check import MessageKind

            kind = MessageKind.LEAK if "leak" in it.id else MessageKind.ERROR
            msgs = [m.text for m in chk.messages if m.kind is kind][:12]
            if msgs:
                evidence = (evidence + "\n" if evidence else "") + "qemu-img check says:\n" + "\n".join(
                    f"  {self.session.clean(m)}" for m in msgs)
        for label, body, style in (("Evidence", evidence, Style()), ("Impact", it.impact, Style()),
                                   ("Fix", it.fix, Style(color=OK, bold=True))):
            if body:
                parts.append(Text())
                parts.append(Text(label, Style(bold=True, underline=True)))
                parts.append(Text(body, style))
        self.query_one("#dg-text", Static).update(Group(*parts))

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        self.show(event.option_index)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.action_evidence()

    def data_changed(self, step: Step | None) -> None:
        if step in (Step.CHECK, Step.DIAGNOSE, Step.LAYOUT, None):
            self.rebuild()

    # -- links, history, copy, export -------------------------------------------------------------------
    @property
    def current(self) -> int:
        return self.query_one(OptionList).highlighted or 0

    def action_evidence(self) -> None:
        """`enter`: where the selected finding's evidence is."""
        if not self.items:
            return
        it = self.items[self.current]
        if it.id in ("corruption", "check-corruptions"):
            off = self.first_mismatch()
            if off is not None:
                self.post_message(ShowHost(off))
                return
        where = EVIDENCE.get(it.id)
        if where is None:
            self.notify("this finding has no evidence to show in another view", timeout=3)
            return
        kind, what = where
        if kind is EvidenceIn.VIEW:
            self.post_message(ShowView(what))
        elif kind is EvidenceIn.HEADER_FIELD:
            self.post_message(ShowStructure(StructRef(StructKind.HEADER, row=_HEADER_ROW[what])))
        else:
            self.post_message(FindIn(kind.value, what))

    def first_mismatch(self) -> int | None:
        """The first host cluster whose stored refcount differs from the references counted."""
        lay = self.session.layout
        if lay is None:
            return None
        import numpy as np

        n = min(len(lay.reference), len(lay.stored_refcount))
        bad = np.flatnonzero(lay.reference[:n].astype(np.int64) != lay.stored_refcount[:n].astype(np.int64))
        return int(bad[0]) * self.session.img.cluster_size if len(bad) else None

    def place(self) -> Place:
        if not self.items:
            return Place(self.VIEW_ID, self.TITLE)
        i = self.current
        return Place(self.VIEW_ID, f"finding {self.items[i].id or i}", (i,))

    def restore(self, place: Place) -> None:
        if place.state and isinstance(place.state[0], int) and self.items:
            ol = self.query_one(OptionList)
            ol.highlighted = min(place.state[0], len(self.items) - 1)
            ol.focus()

    def copy_value(self) -> tuple[str, str] | None:
        if not self.items:
            return None
        it = self.items[self.current]
        if not it.fix:
            return None
        return "fix command", it.fix

    def export(self) -> dict[str, object]:
        return {"view": self.VIEW_ID, "findings": [
            {"id": it.id, "severity": it.severity or "ok", "title": it.title, "evidence": it.evidence,
             "impact": it.impact, "fix": it.fix} for it in self.items]}

    def find(self, text: str, forward: bool = True) -> str | None:
        t = text.lower()
        ol = self.query_one(OptionList)
        start = ol.highlighted or 0
        n = len(self.items)
        for k in range(1, n + 1):
            i = (start + (k if forward else -k)) % n
            it = self.items[i]
            if t in f"{it.id} {it.title} {it.evidence} {it.fix}".lower():
                ol.highlighted = i
                return None
        return f"no finding mentions '{text}'"
