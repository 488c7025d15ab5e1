"""3 · Host layout: the image file as a grid of host clusters coloured by owner, with reverse lookup."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Group, RenderableType
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Static

from qinspect.qcow2 import constants as C
from qinspect.qcow2.fields import QCOW_HEADER
from qinspect.tui import fmt
from qinspect.tui.flow import Flow
from qinspect.tui.guestmap import GL_DARK, GL_EMPTY, GL_FULL, GL_LIGHT, GL_MEDIUM, GL_UNKNOWN
from qinspect.tui.messages import ShowGuest, ShowStructure
from qinspect.tui.palette import DIM, ERROR, KIND_COLOURS, WARN, kind_colour, swatch
from qinspect.tui.session import Session, analysis
from qinspect.tui.structs import StructRef
from qinspect.tui.views.base import View
from qinspect.tui.views.guest import kv, rule
from qinspect.tui.widgets.grid import ClusterGrid

U8 = npt.NDArray[np.uint8]
UNKNOWN_CODE = 255


class HostSource:
    """The grid's view of a `Layout` (or of nothing yet): one cell per 2**zoom host clusters."""

    def __init__(self, cluster_size: int, file_size: int, layout: Any = None) -> None:
        self.unit_bytes = cluster_size
        self.n_units = max(1, -(-file_size // cluster_size))
        self.layout = layout
        self.version = 0 if layout is None else 1
        self._cache: dict[int, tuple[U8, U8]] = {}
        self._owner_enum: Any = None
        self._empty: list[int] = []
        self._priority: list[int] = []
        self._n_owner = 1
        if layout is not None:
            mod = analysis("layout")
            assert mod is not None
            owner = mod.Owner
            self._owner_enum = owner
            self._n_owner = len(owner)
            self._empty = [int(o) for o in owner if o.name in ("FREE", "PAST_END")]
            self._priority = [int(o) for o in owner if o.name in ("CONFLICT", "LEAKED")]

    @property
    def max_zoom(self) -> int:
        return max(0, (self.n_units - 1).bit_length())

    def n_cells(self, zoom: int) -> int:
        return -(-self.n_units // (1 << zoom))

    def colour(self, code: int) -> str:
        if code == UNKNOWN_CODE or self._owner_enum is None:
            return KIND_COLOURS["unknown"]
        return kind_colour(self._owner_enum(code).name)

    def name(self, code: int) -> str:
        if self._owner_enum is None:
            return "not scanned"
        return str(self._owner_enum(code).label)

    def _level(self, zoom: int) -> tuple[U8, U8]:
        hit = self._cache.get(zoom)
        if hit is not None:
            return hit
        owner = self.layout.owner
        n = len(owner)
        cpc = 1 << zoom
        n_cells = -(-n // cpc)
        k = self._n_owner
        rows = np.arange(n, dtype=np.int64) >> zoom
        counts = np.bincount(rows * k + owner.astype(np.int64), minlength=n_cells * k).reshape(n_cells, k)
        used = counts.copy()
        used[:, self._empty] = 0
        filled = used.sum(axis=1)
        total = counts.sum(axis=1)
        dom = np.argmax(used, axis=1).astype(np.uint8)
        empty_dom = np.argmax(counts, axis=1).astype(np.uint8)
        code = np.where(filled > 0, dom, empty_dom).astype(np.uint8)
        for p in self._priority:
            code = np.where(counts[:, p] > 0, np.uint8(p), code)
        frac = filled / np.maximum(total, 1)
        glyph = np.where(filled == 0, GL_EMPTY,
                         np.where(filled == total, GL_FULL,
                                  np.where(frac >= 0.5, GL_DARK, np.where(frac >= 0.125, GL_MEDIUM, GL_LIGHT))))
        out = (code.astype(np.uint8), glyph.astype(np.uint8))
        self._cache[zoom] = out
        return out

    def cells(self, zoom: int, c0: int, c1: int) -> tuple[U8, U8, list[int]]:
        c1 = min(c1, self.n_cells(zoom))
        n = max(0, c1 - c0)
        if self.layout is None:
            return (np.full(n, UNKNOWN_CODE, dtype=np.uint8), np.full(n, GL_UNKNOWN, dtype=np.uint8), [])
        code, glyph = self._level(zoom)
        return code[c0:c1], glyph[c0:c1], []

    def cell_counts(self, zoom: int, cell: int) -> dict[int, int]:
        if self.layout is None:
            return {}
        part = self.layout.owner[cell << zoom : (cell + 1) << zoom]
        c = np.bincount(part, minlength=self._n_owner)
        return {i: int(v) for i, v in enumerate(c) if v}


def ref_text(r: Any, cs: int) -> Text:
    """One `Reference` of the layout, in words."""
    t = Text()
    kind = str(getattr(r, "kind", "?"))
    idx = getattr(r, "entry_index", 0)
    where = getattr(r, "entry_file_offset", 0)
    snap = getattr(r, "snapshot", None)
    guest = getattr(r, "guest_offset", None)
    names = {"l2-entry": "L2 entry", "l1-entry": "L1 entry", "header-field": "header field",
             "snapshot-table-entry": "snapshot table entry", "refcount-table-entry": "refcount table entry",
             "header-extension": "header extension", "bitmap-directory-entry": "bitmap directory entry",
             "bitmap-table-entry": "bitmap table entry"}
    t.append(f"{names.get(kind, kind)} {idx}" if kind != "header-field" else "header field", Style(bold=True))
    t.append(f" @{fmt.hexoff(where)}", Style(color=DIM))
    if snap:
        t.append(f" (snapshot {snap})", Style(color=KIND_COLOURS["snapshot_table"]))
    if guest is not None and kind == "l2-entry":
        t.append(f"\n    → guest {fmt.hexoff(guest)} ({fmt.size(guest)})")
    elif guest is not None and kind == "l1-entry":
        t.append(f"\n    → guest from {fmt.hexoff(guest)}")
    return t


class HostLayoutView(View):
    """The host layout grid and the cursor's owner and references."""

    HELP = """
## Host layout

The image file as a grid of host clusters, coloured by what owns each one
(header, L1/L2 tables, refcount structures, data, compressed data, snapshots,
bitmaps, LUKS, leaked, free holes, past the end). Scattered metadata and
fragmentation are visible at a glance.

- arrows / `hjkl` move, `+` / `-` zoom
- the panel says who owns the cluster and which table entries point at it
  (for data, the guest offsets that use it)
- `enter` follows the first reference (guest map for data, Structures for metadata)
- `g` go to a host offset, `/` find an owner (`leaked`, `l2`, `free`, …)
"""

    goto_prompt = "Go to host (file) offset"
    find_prompt = "Find an owner (leaked, free, l2, refcount, data, compressed, snapshot…)"

    DEFAULT_CSS = """
    HostLayoutView #hl-left { width: 1fr; }
    HostLayoutView #hl-legend { height: auto; padding: 0 1; }
    HostLayoutView #hl-inspector { width: 44; border-left: vkey $foreground 20%; padding: 0 1; }
    """

    def __init__(self, session: Session, *, id: str | None = None) -> None:
        super().__init__(session, id=id)
        img = session.img
        self.source = HostSource(img.cluster_size, img.file.size, session.layout)

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="hl-left"):
                yield Static(self._legend(), id="hl-legend")
                yield ClusterGrid(self.source, id="hl-grid")
            with VerticalScroll(id="hl-inspector"):
                yield Static("", id="hl-inspect")

    @property
    def grid(self) -> ClusterGrid:
        return self.query_one(ClusterGrid)

    def main_widget(self) -> Widget | None:
        return self.grid

    def _legend(self) -> RenderableType:
        s = self.session
        lay = s.layout
        t = Text()
        if lay is None:
            if "layout" in s.errors:
                t.append(f"host layout failed: {s.errors['layout']}", Style(color=ERROR))
            elif "layout" in s.cancelled:
                t.append("host layout scan cancelled — press r to run it again", Style(color=WARN))
            elif analysis("layout") is None:
                t.append("host layout analysis not available", Style(color=WARN))
            else:
                t.append("scanning the host layout… (it runs after the guest map)", Style(color=DIM))
            return t
        counts = lay.counts()
        items = []
        for owner, n in counts.items():
            if not n:
                continue
            glyph = "·" if owner.name in ("FREE", "PAST_END") else "█"
            items.append(swatch(kind_colour(owner.name), f"{owner.label} {fmt.count(n)}", glyph))
        z = self.grid.zoom if self.is_mounted and self.query(ClusterGrid) else 0
        cpc = 1 << z
        t.append(f"1 cell = {fmt.count(cpc)} host cluster{'s' if cpc > 1 else ''} ({fmt.size(cpc * lay.cluster_size)})"
                 f" · file {fmt.size(lay.file_size)} · image end {fmt.hexoff(lay.image_end_offset)}", Style(color=DIM))
        return Group(Flow(items), t)

    def _inspect(self) -> RenderableType:
        s = self.session
        lay = s.layout
        grid = self.grid
        cs = s.img.cluster_size
        hc = grid.cursor
        off = hc * cs
        parts: list[RenderableType] = []
        head = Text()
        head.append(f"host {fmt.hexoff(off)}", Style(bold=True))
        head.append(f"  ({fmt.size(off)})", Style(color=DIM))
        parts.append(head)
        parts.append(kv("cluster", f"{fmt.count(hc)} of {fmt.count(self.source.n_units)}"))
        if lay is None:
            parts.append(Text("the layout is not known yet", Style(color=DIM)))
            return Group(*parts)
        if grid.zoom:
            parts.append(kv("cell", f"{fmt.count(grid.cpc)} clusters ({fmt.size(grid.cpc * cs)})"))
            for code, n in sorted(self.source.cell_counts(grid.zoom, grid.cursor_cell).items(), key=lambda x: -x[1]):
                t = Text("        ")
                t.append("█ ", Style(color=self.source.colour(code)))
                t.append(f"{self.source.name(code)} {fmt.count(n)}")
                parts.append(t)
        owner = lay.owner_at(off)
        kind = lay.kind_at(off)
        t = Text()
        t.append("█ ", Style(color=kind_colour(owner.name)))
        t.append(owner.label)
        if kind != owner:
            t.append(f" ({kind.label})", Style(color=DIM))
        parts.append(kv("owner", t))
        if hc < lay.nb_clusters:
            ref = int(lay.reference[hc])
            stored = int(lay.stored_refcount[hc]) if hc < len(lay.stored_refcount) else 0
            rc = Text(f"{stored} stored, {ref} referenced")
            if stored != ref:
                rc.append("  ✗ mismatch", Style(color=ERROR if stored < ref else WARN))
            parts.append(kv("refcount", rc))
        refs = lay.references(off)
        parts.append(Text())
        parts.append(rule(f"pointed at by {len(refs)}"))
        for r in refs[:40]:
            parts.append(ref_text(r, cs))
        if len(refs) > 40:
            parts.append(Text(f"… {len(refs) - 40} more", Style(color=DIM)))
        if not refs:
            if owner.name == "LEAKED":
                parts.append(Text("nothing points here, yet its refcount is not 0: a leak "
                                  "(qemu-img check -r leaks frees it)", Style(color=WARN)))
            elif owner.name == "FREE":
                parts.append(Text("a free hole inside the file (refcount 0)", Style(color=DIM)))
            elif owner.name == "PAST_END":
                parts.append(Text("past the last cluster in use", Style(color=DIM)))
        return Group(*parts)

    def update_inspector(self) -> None:
        self.query_one("#hl-inspect", Static).update(self._inspect())

    def on_cluster_grid_cursor_moved(self, event: ClusterGrid.CursorMoved) -> None:
        self.query_one("#hl-legend", Static).update(self._legend())
        self.update_inspector()

    def on_cluster_grid_activated(self, event: ClusterGrid.Activated) -> None:
        event.stop()
        lay = self.session.layout
        if lay is None:
            return
        off = event.unit * self.session.img.cluster_size
        refs = lay.references(off)
        img = self.session.img
        h = img.header
        for r in refs:
            if r.kind == "l2-entry" and r.guest_offset is not None and r.snapshot is None:
                self.post_message(ShowGuest(r.guest_offset))
                return
        for r in refs:
            ref: StructRef | None = None
            if r.kind == "l2-entry":
                owner = next((i for i, sn in enumerate(img.snapshots) if sn.id_str == r.snapshot), -1)
                ref = StructRef("l2", index=(r.guest_offset or 0) // (h.l2_size * h.cluster_size),
                                offset=r.table_offset, owner=owner, row=r.entry_index)
            elif r.kind == "l1-entry":
                owner = next((i for i, sn in enumerate(img.snapshots) if sn.id_str == r.snapshot), -1)
                ref = StructRef("l2", index=r.entry_index, offset=off, owner=owner)
            elif r.kind == "refcount-table-entry":
                blk = int(img.refcount_table[r.entry_index]) & C.REFT_OFFSET_MASK
                ref = StructRef("refblock", index=r.entry_index, offset=blk)
            elif r.kind == "snapshot-table-entry":
                ref = StructRef("snapshot_table", offset=h.snapshots_offset, row=r.entry_index)
            elif r.kind == "bitmap-directory-entry" and h.bitmaps_ext is not None:
                ref = StructRef("bitmap_directory", offset=h.bitmaps_ext.bitmap_directory_offset, row=r.entry_index)
            elif r.kind == "bitmap-table-entry":
                bi = next((i for i, b in enumerate(img.bitmaps) if b.bitmap_table_offset == r.table_offset), 0)
                ref = StructRef("bitmap_table", index=bi, offset=r.table_offset, row=r.entry_index)
            elif r.kind == "header-extension" and h.crypto_ext is not None:
                ref = StructRef("luks", offset=h.crypto_ext.offset)
            elif r.kind == "header-field":
                field_off = r.entry_file_offset
                ref = {QCOW_HEADER.offset("l1_table_offset"): StructRef("l1", offset=h.l1_table_offset),
                       QCOW_HEADER.offset("refcount_table_offset"): StructRef("refcount_table",
                                                                              offset=h.refcount_table_offset),
                       QCOW_HEADER.offset("snapshots_offset"): StructRef("snapshot_table",
                                                                         offset=h.snapshots_offset)}.get(field_off)
            if ref is not None:
                self.post_message(ShowStructure(ref))
                return
        if lay.owner_at(off).name == "HEADER":
            self.post_message(ShowStructure(StructRef("header")))

    def data_changed(self, step: str) -> None:
        if step != "layout":
            return
        s = self.session
        self.source = HostSource(s.img.cluster_size, s.img.file.size, s.layout)
        grid = self.grid
        cursor = grid.cursor
        grid.set_source(self.source)
        grid.move_to(cursor)
        self.query_one("#hl-legend", Static).update(self._legend())
        self.update_inspector()

    def on_show(self) -> None:
        self.query_one("#hl-legend", Static).update(self._legend())
        self.update_inspector()

    def show_offset(self, offset: int) -> None:
        self.grid.move_to(offset // self.session.img.cluster_size)
        self.update_inspector()

    def goto(self, text: str) -> str | None:
        try:
            off = fmt.parse_size(text)
        except ValueError as e:
            return str(e)
        if not 0 <= off < max(1, self.session.img.file.size):
            return f"{fmt.hexoff(off)} is past the end of the file ({fmt.size(self.session.img.file.size)})"
        self.show_offset(off)
        return None

    def find(self, text: str, forward: bool = True) -> str | None:
        lay = self.session.layout
        if lay is None:
            return "the host layout is not known yet"
        key = text.strip().lower().replace(" ", "_")
        mod = analysis("layout")
        assert mod is not None
        wanted = [int(o) for o in mod.Owner
                  if key and (key in o.name.lower() or key in o.label.lower().replace(" ", "_"))]
        if not wanted:
            return self.goto(text)
        owner = lay.owner
        cur = self.grid.cursor
        cpc = self.grid.cpc
        hits = np.flatnonzero(np.isin(owner, np.array(wanted, dtype=owner.dtype)))
        hits = hits[hits >= cur + cpc] if forward else hits[hits < cur]
        if not len(hits):
            return f"no more '{text}' clusters {'after' if forward else 'before'} the cursor"
        self.grid.move_to(int(hits[0] if forward else hits[-1]))
        return None
