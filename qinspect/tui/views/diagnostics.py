"""6 · Diagnostics: the findings, worst first, each with its evidence, impact and fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from qinspect.tui import fmt
from qinspect.tui.palette import DIM, ERROR, OK, SEVERITY_COLOURS, WARN
from qinspect.tui.session import Session, analysis
from qinspect.tui.views.base import View

SEVERITY_ORDER = {"critical": 0, "error": 1, "warning": 2, "info": 3, "ok": 4}


@dataclass
class Item:
    """A finding as the view shows it (from `diagnose`, or from what the core can tell)."""

    id: str
    severity: str
    title: str
    evidence: str = ""
    impact: str = ""
    fix: str = ""


def severity_name(sev: Any) -> str:
    return str(getattr(sev, "value", getattr(sev, "name", sev))).lower()


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, dict):
        lines = []
        for k, val in v.items():
            if isinstance(val, int) and not isinstance(val, bool) and str(k).endswith("bytes") and val >= 1024:
                lines.append(f"{k}: {val:,} ({fmt.size(val)})")
            else:
                lines.append(f"{k}: {val}")
        return "\n".join(lines)
    if isinstance(v, list | tuple):
        return "\n".join(str(x) for x in v)
    return str(v)


def items_from_diagnosis(diag: Any, s: Session) -> list[Item]:
    out = []
    for f in getattr(diag, "findings", []) or []:
        out.append(Item(str(getattr(f, "id", "")), severity_name(getattr(f, "severity", "info")),
                        s.clean(str(getattr(f, "title", ""))), s.clean(_text(getattr(f, "evidence", ""))),
                        s.clean(_text(getattr(f, "impact", ""))), s.clean(_text(getattr(f, "fix", "")))))
    return out


def items_from_core(s: Session) -> list[Item]:
    """Findings from the open problems, `check` and the cache arithmetic (no diagnose module)."""
    out: list[Item] = []
    img = s.img
    h = img.header
    name = s.name
    for p in img.problems:
        where = f"{p.structure} at offset {p.offset}" if p.offset is not None else p.structure
        out.append(Item("problem", p.severity.value, s.clean(p.message), where,
                        "QEMU refuses to open the image" if p.qemu_refuses_open else ""))
    if s.chain_error:
        out.append(Item("backing-missing", "error", "the backing chain cannot be opened", s.chain_error,
                        "guest reads of unallocated clusters fail",
                        f"qemu-img rebase -u -b NEW_BACKING -F qcow2 {name}"))
    if h.corrupt:
        out.append(Item("corrupt-bit", "error", "the corrupt bit is set", "incompatible feature bit 1",
                        "QEMU opens the image read-only only", f"qemu-img check -r all {name}"))
    if h.dirty:
        out.append(Item("dirty", "warning", "the dirty bit is set (lazy refcounts, not closed cleanly)",
                        "incompatible feature bit 0", "the next read/write open rebuilds every refcount first",
                        f"qemu-img check -r all {name}"))
    chk = s.check
    if chk is not None:
        if chk.corruptions:
            msgs = [m.text for m in chk.messages if m.kind == "error"][:8]
            out.append(Item("check-corruptions", "error", f"{chk.corruptions} corruptions (qemu-img check)",
                            "\n".join(msgs), "reads or writes may fail or return wrong data",
                            f"cp {name} {name}.bak && qemu-img check -r all {name}"))
        if chk.leaks:
            out.append(Item("check-leaks", "warning", f"{chk.leaks} leaked clusters",
                            f"{chk.leaks} clusters have a refcount but nothing points at them",
                            f"{fmt.size(chk.leaks * h.cluster_size)} of the file are wasted",
                            f"qemu-img check -r leaks {name}"))
        if chk.fragmented_clusters and chk.allocated_clusters:
            share = chk.fragmented_clusters / chk.allocated_clusters
            if share > 0.25:
                out.append(Item("fragmented", "info", f"{share * 100:.0f}% of the allocated clusters are fragmented",
                                f"{chk.fragmented_clusters} of {chk.allocated_clusters} clusters",
                                "sequential guest reads become random host reads",
                                f"qemu-img convert -O qcow2 {name} {name}.new"))
    cache = analysis("cache")
    if cache is not None:
        try:
            m = cache.cache_model(h.size, h.cluster_size, h.extended_l2, h.refcount_bits)
            if m.default_coverage < 1:
                out.append(Item("l2-cache", "warning",
                                f"QEMU's default L2 cache covers only {m.default_coverage * 100:.0f}% of the disk",
                                f"{fmt.size(m.default_l2_cache_size)} default, {fmt.size(m.max_l2_cache)} needed",
                                "random I/O outside the cached part re-reads L2 tables",
                                f"-drive file={name},l2-cache-size={fmt.option_size(m.max_l2_cache)}"))
        except ValueError:
            pass
    if not out:
        out.append(Item("ok", "ok", "nothing wrong found", "header, tables and refcounts are consistent"))
    return out


class DiagnosticsView(View):
    """The findings list and the selected finding's details."""

    HELP = """
## Diagnostics

What is wrong or slow with this image, worst first. Each finding has its
evidence (numbers), its impact and the command that fixes it.

- arrows / `jk` select a finding
- `/` filters by text
- `r` runs the scans again
"""

    find_prompt = "Find a finding (text)"

    DEFAULT_CSS = """
    DiagnosticsView OptionList, DiagnosticsView OptionList:focus {
        width: 56; height: 1fr; border: none; border-right: vkey $foreground 20%; padding: 0;
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
            yield OptionList(id="dg-list")
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
        elif "diagnose" in s.errors:
            t.append(f"diagnose failed: {s.errors['diagnose']}", Style(color=ERROR))
        elif s.check is None and analysis("diagnose") is None:
            t.append("from the open checks; waiting for the refcount check…", Style(color=DIM))
        elif s.check is not None and analysis("diagnose") is None:
            t.append("from the open checks, qemu-img check and the cache model", Style(color=DIM))
        else:
            t.append("diagnosing… (runs after the host layout; esc cancels)", Style(color=DIM))
        for step in sorted(s.cancelled):
            t.append(f" · {step} cancelled (r resumes)", Style(color=WARN))
        return t

    def rebuild(self) -> None:
        s = self.session
        items = items_from_diagnosis(s.diagnosis, s) if s.diagnosis is not None else items_from_core(s)
        items.sort(key=lambda it: SEVERITY_ORDER.get(it.severity, 5))
        self.items = items
        ol = self.query_one(OptionList)
        highlighted = ol.highlighted
        ol.clear_options()
        for i, it in enumerate(items):
            t = Text(no_wrap=True, overflow="ellipsis")
            colour = SEVERITY_COLOURS.get(it.severity, DIM)
            t.append(f"{it.severity.upper():<8}", Style(color=colour, bold=True))
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
        colour = SEVERITY_COLOURS.get(it.severity, DIM)
        parts: list[RenderableType] = []
        head = Text()
        head.append(f" {it.severity.upper()} ", Style(bgcolor=colour, color="#000000", bold=True))
        head.append(f" {it.title}", Style(bold=True))
        parts.append(head)
        if it.id:
            parts.append(Text(it.id, Style(color=DIM)))
        evidence = it.evidence
        chk = self.session.check
        if chk is not None and it.id in ("corruption", "leaked-clusters", "check-corruptions", "check-leaks"):
            kind = "leak" if "leak" in it.id else "error"
            msgs = [m.text for m in chk.messages if m.kind == kind][:12]
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

    def data_changed(self, step: str) -> None:
        if step in ("check", "diagnose", "layout", "guest"):
            self.rebuild()

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
