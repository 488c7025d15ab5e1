"""5 · Cache lab: change the geometry and the cache options, see QEMU's numbers change as you type."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget
from textual.widgets import Checkbox, Input, Label, Static

from qinspect.tui import fmt
from qinspect.tui.palette import DIM, ERROR, OK, WARN
from qinspect.tui.session import Session
from qinspect.tui.views.base import View

if TYPE_CHECKING:
    from qinspect.analysis.cache import CacheModel
from qinspect.tui.widgets.inputs import SteadyInput

FIELDS: tuple[tuple[str, str, str], ...] = (
    ("virtual_size", "virtual size", "the disk's size"),
    ("cluster_size", "cluster size", "512 … 2M"),
    ("l2_cache_size", "l2-cache-size", "default"),
    ("l2_cache_entry_size", "l2-cache-entry-size", "default"),
    ("refcount_cache_size", "refcount-cache-size", "default"),
    ("write_size", "guest write size", "4k"),
)


def bar(frac: float, width: int = 30) -> Text:
    frac = max(0.0, min(1.0, frac))
    full = round(frac * width)
    t = Text()
    t.append("█" * full, Style(color=OK if frac >= 1 else WARN))
    t.append("░" * (width - full), Style(color=DIM))
    return t


class CacheLabView(View):
    """Inputs on the left, QEMU's cache arithmetic on the right."""

    VIEW_ID = "cache"
    TITLE = "Cache lab"

    HELP = """
## Cache lab

Change a value and the numbers follow as you type. Sizes take `k`, `M`, `G`
suffixes; leave an option empty for QEMU's default.

- **cluster size / extended L2**: how much guest space one L2 byte maps
- **l2-cache-size**: the `-drive` option; QEMU's default is what covers the
  disk, capped at 32 MiB on Linux (8 MiB elsewhere)
- **l2-cache-entry-size**: the cache slice; QEMU uses 4 KiB slices when the
  cache cannot cover the disk
- **refcount-cache-size**: 4 clusters by default
- **guest write size**: a write into a fresh cluster over a backing file copies
  the whole cluster (subcluster with extended L2): the amplification

`tab` moves between inputs, `esc` leaves them (then number keys switch views).
"""

    DEFAULT_CSS = """
    CacheLabView #cl-inputs { width: 42; padding: 0 1; border-right: vkey $foreground 20%; }
    CacheLabView .cl-row { height: 1; margin-bottom: 1; }
    CacheLabView .cl-row Label { width: 20; color: $text-muted; }
    CacheLabView .cl-row Input { width: 1fr; height: 1; border: none; padding: 0 1; background: $boost; }
    CacheLabView .cl-row Input:focus { background: $accent 40%; }
    CacheLabView #cl-inputs Checkbox { width: 1fr; height: 1; border: none; padding: 0; background: transparent; }
    CacheLabView #cl-inputs Checkbox:focus { background: $accent 40%; }
    CacheLabView #cl-hint { color: $text-muted; margin-top: 1; }
    CacheLabView #cl-out { width: 1fr; padding: 0 1; }
    """

    def __init__(self, session: Session, *, id: str | None = None) -> None:
        super().__init__(session, id=id)
        h = session.img.header
        self.defaults = {
            "virtual_size": fmt.size(h.size).replace(" ", "").replace("iB", ""),
            "cluster_size": fmt.size(h.cluster_size).replace(" ", "").replace("iB", ""),
            "l2_cache_size": "",
            "l2_cache_entry_size": "",
            "refcount_cache_size": "",
            "write_size": "4k",
        }
        self.refcount_bits = h.refcount_bits
        self.model: CacheModel | None = None

    def compose(self) -> ComposeResult:
        h = self.session.img.header
        with Horizontal():
            with VerticalScroll(id="cl-inputs", can_focus=False):
                for key, label, placeholder in FIELDS:
                    with Horizontal(classes="cl-row"):
                        yield Label(label)
                        yield SteadyInput(value=self.defaults[key], placeholder=placeholder, id=f"cl-{key}")
                yield Checkbox("extended L2 (32 subclusters)", value=h.extended_l2, id="cl-extended_l2")
                yield Checkbox("Linux defaults (32 MiB L2 cap)", value=True, id="cl-linux")
                yield Static("tab: next input · type to change\nesc: leave the inputs", id="cl-hint")
            with VerticalScroll(id="cl-out", can_focus=True):
                yield Static("", id="cl-result")

    def main_widget(self) -> Widget | None:
        return self.query_one("#cl-out", VerticalScroll)

    def on_mount(self) -> None:
        self.recompute()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.recompute()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        event.stop()
        self.recompute()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.screen.focus_next()

    def values(self) -> tuple[dict[str, int | None], list[str]]:
        vals: dict[str, int | None] = {}
        errors: list[str] = []
        for key, label, _ph in FIELDS:
            text = self.query_one(f"#cl-{key}", Input).value.strip()
            if not text:
                vals[key] = None
                continue
            try:
                vals[key] = fmt.parse_size(text)
            except ValueError:
                errors.append(f"{label}: '{text}' is not a size")
                vals[key] = None
        vals["extended_l2"] = int(self.query_one("#cl-extended_l2", Checkbox).value)
        vals["linux"] = int(self.query_one("#cl-linux", Checkbox).value)
        return vals, errors

    def recompute(self) -> None:
        self.query_one("#cl-result", Static).update(self.render_result())

    def render_result(self) -> RenderableType:
        from qinspect.analysis import cache as mod

        vals, errors = self.values()
        h = self.session.img.header
        vs = vals["virtual_size"] if vals["virtual_size"] is not None else h.size
        cs = vals["cluster_size"] if vals["cluster_size"] is not None else h.cluster_size
        ws = vals["write_size"] or 4096
        try:
            m = mod.cache_model(vs, cs, bool(vals["extended_l2"]), self.refcount_bits, vals["l2_cache_size"],
                                vals["l2_cache_entry_size"], vals["refcount_cache_size"], bool(vals["linux"]),
                                write_size=ws)
        except ValueError as exc:
            errors.append(str(exc))
            m = None
        self.model = m
        parts: list[RenderableType] = []
        for err in errors:
            parts.append(Text(f"✗ {err}", Style(color=ERROR)))
        if m is None:
            return Group(*parts)
        l2e = m.l2_entry_size
        per_table = cs // l2e * cs
        t = Table.grid(padding=(0, 2))
        t.add_column(style=DIM, no_wrap=True, min_width=18)
        t.add_column()
        t.add_row("L2 entry", f"{l2e} bytes → one L2 table ({fmt.size(cs)}) maps {fmt.size(per_table)} of guest")
        t.add_row("covering the disk", f"{fmt.size(m.max_l2_cache)} of L2 cache for {fmt.size(vs)} "
                                       f"({fmt.size((1 << 30) // cs * l2e)} per GiB of disk)")
        t.add_row("QEMU default", Text.assemble(
            f"{fmt.size(m.default_l2_cache_size)} (slices of {fmt.size(m.default_l2_cache_entry_size)}) covers ",
            (f"{fmt.size(m.default_coverage_bytes)} = {m.default_coverage * 100:.0f}%",
             Style(color=OK if m.default_coverage >= 1 else WARN, bold=True))))
        t.add_row("", bar(m.default_coverage))
        t.add_row("with these options", Text.assemble(
            f"{fmt.size(m.l2_cache_size)} = {fmt.count(m.l2_cache_entries)} × {fmt.size(m.l2_cache_entry_size)} "
            "covers ",
            (f"{fmt.size(m.coverage_bytes)} = {m.coverage * 100:.0f}%",
             Style(color=OK if m.coverage >= 1 else WARN, bold=True))))
        t.add_row("", bar(m.coverage))
        t.add_row("refcount cache", f"{fmt.size(m.refcount_cache_size)} covers "
                                    f"{fmt.size(m.refcount_cache_coverage_bytes)}"
                                    f" of host file ({m.refcount_bits}-bit refcounts)")
        t.add_row("copy on write", Text.assemble(
            f"a {fmt.size(m.cow_write_size)} write into a fresh cluster over a backing file writes "
            f"{fmt.size(m.cow_bytes_written)} (unit {fmt.size(m.cow_unit)}): ",
            (f"×{m.cow_factor:.0f}" if m.cow_factor >= 10 else f"×{m.cow_factor:.1f}",
             Style(color=OK if m.cow_factor <= 1 else WARN if m.cow_factor < 8 else ERROR, bold=True))))
        if m.coverage < 1:
            option = f"-drive …,l2-cache-size={fmt.option_size(m.max_l2_cache)}"
            t.add_row("to cover it all", Text(option, Style(color=OK)))
        parts.append(Text("This geometry", Style(bold=True)))
        parts.append(t)
        parts.append(Text())
        parts.append(Text(f"Every cluster size for a {fmt.size(vs)} disk (same options)", Style(bold=True)))
        try:
            rows = mod.cache_table(vs, self.refcount_bits, vals["l2_cache_size"], vals["l2_cache_entry_size"],
                                   vals["refcount_cache_size"], bool(vals["linux"]), write_size=ws)
        except ValueError as e:
            parts.append(Text(str(e), Style(color=ERROR)))
            return Group(*parts)
        tab = Table(box=None, padding=(0, 1), header_style=Style(bold=True, underline=True))
        for col, just in (("cluster", "right"), ("ext L2", "left"), ("full cover", "right"),
                          ("default", "right"), ("covers", "right"), ("w/ options", "right"),
                          (f"COW {fmt.size(ws)}", "right")):
            tab.add_column(col, justify=just)  # type: ignore[arg-type]
        for r in rows:
            current = r.cluster_size == cs and r.extended_l2 == vals["extended_l2"]
            style = Style(reverse=True) if current else None
            tab.add_row(fmt.size(r.cluster_size), "yes" if r.extended_l2 else "", fmt.size(r.max_l2_cache),
                        fmt.size(r.default_l2_cache_size), f"{r.default_coverage * 100:.0f}%",
                        f"{r.coverage * 100:.0f}%", f"×{r.cow_factor:g}", style=style)
        parts.append(tab)
        return Group(*parts)

    def on_key(self, event: events.Key) -> None:
        if event.key == "escape" and isinstance(self.screen.focused, Input | Checkbox):
            event.stop()
            event.prevent_default()
            self.screen.set_focus(None)
