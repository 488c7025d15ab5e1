"""1 · Overview: what the image is, where its bytes go, and what is wrong with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Static

from qinspect.qcow2 import constants as C
from qinspect.termtext import for_terminal
from qinspect.tui import fmt
from qinspect.tui.flow import Flow
from qinspect.tui.palette import (
    DIM,
    ERROR,
    GUEST_COLOURS,
    WARN,
    G,
    kind_colour,
    severity_colour,
    severity_order,
    severity_word,
)
from qinspect.tui.session import Step
from qinspect.tui.views.base import View
from qinspect.tui.widgets.guestvolumes import GuestVolumes

if TYPE_CHECKING:
    import numpy.typing as npt

# The first frame draws the "Image" section from the header alone: the modules the other sections
# need (numpy, the structure models, the findings, the guest filesystems) are imported when those
# sections are filled, after the first frame.

LAYER0_STATES = (G.DATA, G.ZERO_PLAIN, G.ZERO_ALLOC, G.COMPRESSED, G.PARTIAL, G.INVALID)


def title(text: str) -> Text:
    return Text(text, Style(bold=True, underline=True))


def kv_table() -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style=Style(color=DIM), no_wrap=True)
    t.add_column()
    return t


class SpaceBar:
    """A bar as wide as the console, one coloured run per part (at least one cell if non-zero)."""

    def __init__(self, parts: list[tuple[str, str, int]], total: int) -> None:
        self.parts = [(label, colour, n) for label, colour, n in parts if n > 0]
        self.total = max(1, total)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(10, options.max_width)
        shares = [max(1, round(n / self.total * width)) for _l, _c, n in self.parts]
        while sum(shares) > width and max(shares) > 1:
            shares[shares.index(max(shares))] -= 1
        if shares and sum(shares) < width:
            shares[shares.index(max(shares))] += width - sum(shares)
        bar = Text(no_wrap=True)
        for (_label, colour, _n), w in zip(self.parts, shares, strict=True):
            bar.append("█" * w, Style(color=colour))
        yield bar


class OverviewView(View):
    """Everything about the image on one scrollable page."""

    VIEW_ID = "overview"
    TITLE = "Overview"

    HELP = """
## Overview

What the image is: every header field and feature bit, the extensions, the
backing chain and what each layer provides, snapshots, bitmaps, encryption
and the data file; a bar of where the file's bytes go (it adds up to the file
size) and the top findings (details in view 6).

Scroll with arrows / `jk`, `PgUp`/`PgDn`. Parts that need a full scan fill in
as the scans finish (`esc` cancels them, `r` resumes).
"""

    DEFAULT_CSS = """
    OverviewView VerticalScroll { padding: 0 1; }
    OverviewView #ov-space { height: auto; margin-bottom: 1; }
    OverviewView #ov-cols { height: auto; }
    OverviewView #ov-left { width: 1fr; height: auto; padding-right: 2; }
    OverviewView #ov-right { width: 1fr; height: auto; }
    OverviewView Static { margin-bottom: 1; }
    """

    def compose(self) -> ComposeResult:
        # What the first frame draws: the (empty) space bar's line and the image's essentials. The
        # other sections are empty until the session has read the tables, and are mounted then
        # (`_mount_sections`): every widget costs the first frame its styles, layout and render.
        with VerticalScroll(id="ov-scroll"):
            yield Static(id="ov-space")
            with Horizontal(id="ov-cols"), Vertical(id="ov-left"):
                yield Static(id="ov-image")

    async def _mount_sections(self) -> None:
        if self.query("#ov-right"):
            return
        await self.query_one("#ov-scroll").mount(GuestVolumes(id="ov-guest"), after="#ov-space")
        await self.query_one("#ov-left").mount_all([Static(id="ov-chain"), Static(id="ov-snapshots"),
                                                    Static(id="ov-extensions")])
        right = Vertical(id="ov-right")
        await self.query_one("#ov-cols").mount(right)
        await right.mount_all([Static(id="ov-findings"), Static(id="ov-features"), Static(id="ov-header")])

    def main_widget(self) -> Widget | None:
        return self.query_one("#ov-scroll", VerticalScroll)

    def on_mount(self) -> None:
        # The image's essentials (from the header) make the first frame; the other sections come
        # once the session has read the tables (`session_loaded`: after the first frame, or when
        # the view is built later).
        self.query_one("#ov-image", Static).update(self._image())

    async def session_loaded(self) -> None:
        await self._fill_sections()

    async def _fill_sections(self) -> None:
        from qinspect.tui import guestfs

        await self._mount_sections()
        self.query_one("#ov-features", Static).update(self._features())
        self.query_one("#ov-header", Static).update(self._header())
        self.query_one("#ov-extensions", Static).update(self._extensions())
        self.query_one("#ov-snapshots", Static).update(self._snapshots_bitmaps())
        self.refresh_dynamic()
        guestfs.show_known(self, self.session)

    def refresh_dynamic(self) -> None:
        if not self.query("#ov-right"):  # the sections are not mounted yet: they fill in when they are
            return
        self.query_one("#ov-space", Static).update(self._space())
        self.query_one("#ov-chain", Static).update(self._chain())
        self.query_one("#ov-findings", Static).update(self._findings())

    def data_changed(self, step: Step | None) -> None:
        from qinspect.tui import guestfs

        if not self.query("#ov-right"):
            return
        self.refresh_dynamic()
        guestfs.start(self, self.session)  # after the first scan step: the first frame reads no tables

    def export(self) -> dict[str, object]:
        s = self.session
        h = s.img.header
        out: dict[str, object] = {"view": self.VIEW_ID, "virtual-size": h.size, "file-size": s.img.file.size,
                                  "disk-usage": s.img.file.allocated_size, "cluster-size": h.cluster_size,
                                  "layers": [li.__dict__ for li in s.layer_infos()]}
        if s.space is not None:
            out["space"] = s.space.to_json()
        if s.diagnosis is not None:
            out["findings"] = [f.to_json() for f in s.diagnosis.findings]
        return out

    # -- sections ------------------------------------------------------------------------------------
    def _image(self) -> RenderableType:
        s = self.session
        img = s.meta  # the header and the LUKS header only: the tables are read after the first frame
        h = img.header
        t = kv_table()
        t.add_row("file", Text(s.name))  # names from the file are never Rich markup
        t.add_row("format", f"qcow2 v{h.version} (compat {h.compat})")
        t.add_row("virtual size", f"{fmt.size(h.size)} ({fmt.count(h.size)} bytes)")
        t.add_row("file size", f"{fmt.size(img.file.size)} ({fmt.count(img.file.size)} bytes)")
        cl = f"{fmt.size(h.cluster_size)}"
        if h.extended_l2:
            cl += f", extended L2: 32 subclusters of {fmt.size(h.subcluster_size)}"
        t.add_row("cluster", cl)
        t.add_row("L2 table", f"{fmt.count(h.l2_size)} entries of {h.l2_entry_size} bytes, "
                              f"maps {fmt.size(h.l2_size * h.cluster_size)}")
        t.add_row("refcounts", f"{h.refcount_bits}-bit, {fmt.count(h.refcount_block_entries)} per block")
        t.add_row("compression", h.compression_name)
        enc = {0: "none", 1: "AES-CBC (legacy)", 2: "LUKS"}.get(h.crypt_method, f"method {h.crypt_method}")
        if img.luks is not None:
            lk = img.luks
            active = sum(1 for sl in lk.slots if sl.active)
            enc += f": {lk.cipher_alg}-{lk.cipher_mode}, {lk.ivgen_alg}, {lk.hash_spec}, {active} key slot(s)"
        t.add_row("encryption", Text(enc, Style(color="#ff87af") if h.crypt_method else Style()))
        if h.has_data_file:
            t.add_row("data file", Text(for_terminal(f"{h.data_file or '(not named; needs data-file=)'}"
                                                     f"{', raw' if h.data_file_raw else ''}")))
        if h.backing_file is not None:
            t.add_row("backing file", Text(for_terminal(f"{h.backing_file} ({h.backing_format or 'format probed'})")))
        state = []
        if h.dirty:
            state.append(Text("DIRTY", Style(color=WARN, bold=True)))
        if h.corrupt:
            state.append(Text("CORRUPT", Style(color=ERROR, bold=True)))
        if h.lazy_refcounts:
            state.append(Text("lazy refcounts"))
        if state:
            t.add_row("state", Text(" ").join(state))
        return Group(title("Image"), t)

    def _features(self) -> RenderableType:
        h = self.session.img.header
        t = kv_table()
        for kind, name in ((0, "incompatible"), (1, "compatible"), (2, "autoclear")):
            value = (h.incompatible_features, h.compatible_features, h.autoclear_features)[kind]
            names = h.set_features(kind)
            t.add_row(name, Text.assemble((f"0x{value:x} ", Style(color=DIM)), ", ".join(names) or "none"))
        if h.feature_names:
            t.add_row("name table", f"{len(h.feature_names)} names")
        return Group(title("Features"), t)

    def _header(self) -> RenderableType:
        from qinspect.tui.structs import HeaderModel

        m = HeaderModel(self.session.img)
        t = Table(box=None, padding=(0, 1), show_header=False)
        t.add_column(no_wrap=True)
        t.add_column(justify="right", style=Style(color=DIM))
        t.add_column(no_wrap=True, overflow="ellipsis")
        for i in range(len(m)):
            cells = m.row(i)
            val = cells[3][0]
            meaning = cells[4][0]
            t.add_row(Text(cells[0][0], Style(color=cells[0][1])), cells[1][0],
                      Text.assemble(val, (f"  {meaning}" if meaning and meaning != val else "", Style(color=DIM))))
        return Group(title("Header fields"), t)

    def _extensions(self) -> RenderableType:
        from qinspect.tui.structs import ExtensionsModel

        m = ExtensionsModel(self.session.img)
        t = Table(box=None, padding=(0, 1), show_header=False)
        t.add_column(style=Style(color=DIM), justify="right", no_wrap=True)
        t.add_column(overflow="fold")
        for i in range(len(m)):
            cells = m.row(i)
            t.add_row(Text(f"@{cells[1][0]}"), Text.assemble((cells[4][0], Style(color=cells[4][1])),
                                                             (f"  {cells[5][0]}", Style(color=DIM))))
        return Group(title(f"Header extensions ({len(m)})"), t)

    def _snapshots_bitmaps(self) -> RenderableType:
        from qinspect.tui.structs import utc

        img = self.session.img
        parts: list[RenderableType] = []
        if img.snapshots:
            t = Table(box=None, padding=(0, 1), header_style=Style(color=DIM))
            for col in ("id", "name", "date (UTC)", "vm state", "L1"):
                t.add_column(col, no_wrap=True)
            for sn in img.snapshots[:20]:
                t.add_row(Text(for_terminal(sn.id_str)), Text(for_terminal(sn.name)), utc(sn.date_sec),
                          fmt.size(sn.vm_state_size), fmt.hexoff(sn.l1_table_offset))
            parts += [title(f"Snapshots ({len(img.snapshots)})"), t]
            if len(img.snapshots) > 20:
                parts.append(Text(f"… {len(img.snapshots) - 20} more in view 7", Style(color=DIM)))
        else:
            parts.append(Text.assemble(title("Snapshots"), (" none", Style(color=DIM))))
        if img.header.bitmaps_ext is not None:
            t = Table(box=None, padding=(0, 1), header_style=Style(color=DIM))
            for col in ("name", "granularity", "flags"):
                t.add_column(col, no_wrap=True)
            for b in img.bitmaps[:20]:  # a directory may name 65,535 (a table that size renders for minutes)
                t.add_row(Text(for_terminal(b.name)), fmt.size(b.granularity),
                          Text(",".join(b.flag_names) or "-", Style(color=ERROR) if b.in_use else Style()))
            head = f"Bitmaps ({len(img.bitmaps)})"
            if not img.header.bitmaps_consistent:
                head += " — inconsistent, QEMU ignores them"
            parts += [Text(), title(head), t]
            if len(img.bitmaps) > 20:
                parts.append(Text(f"… {len(img.bitmaps) - 20} more in view 7", Style(color=DIM)))
        else:
            parts.append(Text.assemble(title("Bitmaps"), (" none", Style(color=DIM))))
        return Group(*parts)

    def _chain(self) -> RenderableType:
        s = self.session
        gm = s.guest
        totals = gm.totals()
        cs = gm.cluster_size
        infos = s.layer_infos()
        t = Table(box=None, padding=(0, 1), header_style=Style(color=DIM))
        t.add_column("")
        t.add_column("layer", ratio=1, overflow="fold")
        t.add_column("provides", justify="right", no_wrap=True)
        for li in infos:
            if li.depth == 0:
                n = int(sum(int(totals[st]) for st in LAYER0_STATES))
                colour = GUEST_COLOURS[G.DATA]
            else:
                code = min(li.depth, 5) - 1 + G.BACKING1
                n = int(totals[code]) if li.depth <= 5 else 0
                colour = GUEST_COLOURS[code]
            provided = f"{fmt.size(n * cs)} {fmt.pct(n, gm.n_clusters):>5}"
            name = Text(for_terminal(li.name))
            name.append(f"  {li.format}, {fmt.size(li.virtual_size)}, file {fmt.size(li.file_size)}", Style(color=DIM))
            t.add_row(Text("█", Style(color=colour)), name, provided)
        unalloc = int(totals[G.UNALLOCATED]) + int(totals[G.RESERVED])
        t.add_row(Text("·", Style(color=GUEST_COLOURS[G.UNALLOCATED])),
                  Text("nothing: reads as zeros", Style(color=DIM)),
                  f"{fmt.size(unalloc * cs)} {fmt.pct(unalloc, gm.n_clusters):>5}")
        parts: list[RenderableType] = [title("Backing chain" if len(infos) > 1 else "Guest view"), t]
        if not gm.complete:
            parts.append(Text(f"(scanned {gm.scanned_tables} of {gm.n_tables} L2 tables so far)", Style(color=DIM)))
        if s.chain_error:
            parts.append(Text(f"⚠ {s.chain_error}", Style(color=ERROR)))
        return Group(*parts)

    def _space(self) -> RenderableType:
        s = self.session
        space = s.space
        size = s.img.file.size
        head = title(f"Where the {fmt.size(size)} of the file go")
        if space is None:
            why = "cancelled — press r to resume" if Step.LAYOUT in s.cancelled else \
                "waiting for the host layout scan…" if s.scanning else "not computed (r runs the scans)"
            if Step.LAYOUT in s.errors:
                why = f"layout failed: {s.clean(s.errors[Step.LAYOUT])}"
            return Group(head, Text(why, Style(color=DIM)))
        from qinspect.analysis.space import part_label

        # Parts that share a colour are one legend entry (its labels joined), so every two
        # entries of the legend have colours that can be told apart.
        merged: dict[str, tuple[list[str], int]] = {}
        for k, v in space.parts.items():
            if int(v) > 0:
                labels, n = merged.get(kind_colour(k), ([], 0))
                merged[kind_colour(k)] = ([*labels, part_label(k, space.parts)], n + int(v))
        parts = [(" + ".join(labels), colour, n) for colour, (labels, n) in merged.items()]
        parts.sort(key=lambda p: -p[2])
        cells: list[Text] = []
        for label, colour, n in parts:
            cells.append(Text.assemble(("█ ", Style(color=colour)), f"{label} ",
                                       (f"{fmt.size(n)} {fmt.pct(n, size)}", Style(color=DIM))))
        legend = Flow(cells)  # wraps between entries, never inside one: no number is cut
        total = sum(int(v) for v in space.parts.values())
        check = Text(f"parts add up to {fmt.count(total)} of {fmt.count(size)} bytes"
                     + ("" if total == size else " ✗"), Style(color=DIM if total == size else ERROR))
        extra: list[RenderableType] = [check]
        rec = getattr(space, "reclaimable", 0)
        if rec:
            extra.append(Text(f"reclaimable by qemu-img convert: {fmt.size(rec)}", Style(color=WARN)))
        return Group(head, SpaceBar(parts, size), legend, *extra)

    def _findings(self) -> RenderableType:
        from qinspect.tui.views.diagnostics import items_from_core, items_from_diagnosis

        s = self.session
        items = items_from_diagnosis(s.diagnosis, s) if s.diagnosis is not None else items_from_core(s)
        items.sort(key=lambda it: severity_order(it.severity))
        t = Table.grid(padding=(0, 1))
        t.add_column(no_wrap=True)
        t.add_column()
        for it in items[:6]:
            t.add_row(Text(severity_word(it.severity), Style(color=severity_colour(it.severity), bold=True)),
                      Text(it.title))
        if not items:
            t.add_row(Text(severity_word(None), Style(color=severity_colour(None), bold=True)),
                      Text("nothing to report"))
        parts: list[RenderableType] = [title("Top findings"), t]
        if len(items) > 6:
            parts.append(Text(f"… {len(items) - 6} more in view 6", Style(color=DIM)))
        if s.diagnosis is None:
            if s.scanning:
                parts.append(Text("(full diagnosis still running)", Style(color=DIM)))
            elif Step.DIAGNOSE in s.cancelled or Step.LAYOUT in s.cancelled:
                parts.append(Text("(diagnosis cancelled: findings from the open checks only; r resumes)",
                                  Style(color=WARN)))
            else:
                parts.append(Text("(findings from the open checks only; r runs the diagnosis)", Style(color=DIM)))
        return Group(*parts)


def guest_totals_bytes(totals: npt.ArrayLike, cluster_size: int) -> dict[str, int]:
    """Bytes of the guest view per state (for tests and the chain view)."""
    import numpy as np

    from qinspect.tui.palette import GUEST_NAMES

    return {GUEST_NAMES[i]: int(v) * cluster_size for i, v in enumerate(np.asarray(totals)) if v}


__all__ = ["C", "OverviewView", "guest_totals_bytes"]
