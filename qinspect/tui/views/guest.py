"""2 · Guest map: the virtual disk as a zoomable grid, and the cursor's L1/L2 entry decoded."""

from __future__ import annotations

import contextlib
from typing import ClassVar

from rich.console import Group, RenderableType
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Image, L2Lookup
from qinspect.qcow2.l2 import ClusterType, SubclusterType
from qinspect.tui import fmt, guestfs
from qinspect.tui.flow import Flow
from qinspect.tui.guestmap import GLYPHS, majority
from qinspect.tui.messages import ShowHost, ShowStructure, TablesLoaded
from qinspect.tui.nav import Place
from qinspect.tui.palette import (
    DIM,
    ERROR,
    GUEST_COLOURS,
    GUEST_LETTERS,
    KIND_COLOURS,
    ColourKind,
    G,
    PaletteState,
    backing_state,
    guest_name,
    swatch,
)
from qinspect.tui.search import Searcher, parse_query
from qinspect.tui.session import Session, Step
from qinspect.tui.structs import StructKind, StructRef
from qinspect.tui.views.gridview import GridView, kv, rule
from qinspect.tui.widgets.grid import ClusterGrid

# Tables on screen read at once, ahead of the scan (more than this: the scan gets to them).
MAX_EAGER_TABLES = 64

SC_STATE = {
    SubclusterType.UNALLOCATED_PLAIN: G.UNALLOCATED,
    SubclusterType.UNALLOCATED_ALLOC: G.RESERVED,
    SubclusterType.ZERO_PLAIN: G.ZERO_PLAIN,
    SubclusterType.ZERO_ALLOC: G.ZERO_ALLOC,
    SubclusterType.NORMAL: G.DATA,
    SubclusterType.COMPRESSED: G.COMPRESSED,
    SubclusterType.INVALID: G.INVALID,
}
SC_NAMES = {
    SubclusterType.UNALLOCATED_PLAIN: "unallocated",
    SubclusterType.UNALLOCATED_ALLOC: "unallocated, host space reserved",
    SubclusterType.ZERO_PLAIN: "reads as zeros",
    SubclusterType.ZERO_ALLOC: "reads as zeros, host space reserved",
    SubclusterType.NORMAL: "data",
    SubclusterType.COMPRESSED: "compressed",
    SubclusterType.INVALID: "INVALID entry (QEMU fails the read)",
}


def bits_line(label: str, word: int, colour: str) -> Text:
    t = Text()
    t.append(f"{label} ", Style(color=DIM))
    for k in range(32):
        if k and k % 8 == 0:
            t.append(" ")
        bit = (word >> k) & 1
        t.append("1" if bit else "0", Style(color=colour if bit else DIM, bold=bool(bit)))
    return t


def subcluster_strip(lk: L2Lookup, cursor: int) -> Text:
    t = Text()
    t.append("  ")
    for k, st in enumerate(lk.subcluster_types):
        if k and k % 8 == 0:
            t.append(" ")
        g = SC_STATE[st]
        glyph = "█" if g not in (G.UNALLOCATED,) else "·"
        style = Style(color=GUEST_COLOURS[g])
        if k == cursor:
            style = Style(color="#000000", bgcolor=GUEST_COLOURS[g], bold=True)
            glyph = "◆"
        t.append(glyph, style)
    return t


def reads_from(layers: list[object], guest: int, names: list[str], lk: L2Lookup, chain_error: str | None) -> Text:
    """Which layer serves this guest offset, following unallocated entries down the chain."""
    st = lk.subcluster_types[lk.subcluster_index]
    if st in (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC):
        return Text("zeros (this image's zero flag; no layer below is read)")
    if st == SubclusterType.INVALID:
        return Text("nothing: QEMU fails the read (EIO)", Style(color=ERROR))
    if st not in (SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC):
        return Text("this image (layer 0)" + (", decompressed" if st == SubclusterType.COMPRESSED else ""))
    for depth in range(1, len(layers)):
        layer = layers[depth]
        name = names[depth] if depth < len(names) else f"layer {depth}"
        if guest >= getattr(layer, "virtual_size", 0):
            return Text(f"zeros (past the end of {name})")
        if not isinstance(layer, Image):
            return Text(f"backing layer {depth}: {name} (raw)", Style(color=GUEST_COLOURS[backing_state(depth)]))
        try:
            low = layer.lookup(guest)
        except Qcow2Error as e:
            return Text(f"layer {depth}: {e}", Style(color=ERROR))
        s2 = low.subcluster_types[low.subcluster_index]
        if s2 not in (SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC):
            host = f" at host {fmt.hexoff(low.host_offset)}" if low.host_offset is not None else ""
            return Text(f"backing layer {depth}: {name} — {SC_NAMES[s2]}{host}",
                        Style(color=GUEST_COLOURS[backing_state(depth)]))
    if chain_error:
        return Text(f"? backing chain broken: {chain_error}", Style(color=ERROR))
    return Text("zeros (no layer has it)")


class GuestMapView(GridView):
    """The guest map."""

    VIEW_ID = "guest"
    TITLE = "Guest map"
    PREFIX = "gm"

    HELP = """
## Guest map

Every cell is one guest cluster, or 2ⁿ clusters when zoomed out (`+`/`-`).
The colour is the cluster's state (the dominant one in a cell), the glyph
how full the cell is: `█` all allocated, `▓` ≥ ½, `▒` ≥ ⅛, `░` less, `·` none.

- arrows / `hjkl` move, `PgUp`/`PgDn`, `Home`/`End`
- `+` / `-` zoom in / out
- `[` / `]` previous / next subcluster (extended L2)
- `enter` opens the cursor's L2 entry in Structures (L1 entry when there is no L2 table)
- `H` goes to the host cluster the entry points at (view 3), where the
  entries that reference it are listed; `backspace` comes back
- `L` draws letters instead of blocks (the legend says which is which)
- `c` copies the guest offset, `e` exports the cursor's entries as JSON
- `g` go to a guest offset (`0x10000`, `64k`, `1.5G`)
- `/` find a state (`data`, `zero`, `compressed`, `partial`, `invalid`, `backing`) or an offset; `n`/`N` again.
  Partly zero (or data, or unallocated) extended-L2 clusters match, backing layers are searched
  where they serve the guest, and the search wraps around (it says so)
"""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left_square_bracket", "subcluster(-1)", "Subcluster", key_display="[ ]", show=False),
        Binding("right_square_bracket", "subcluster(1)", "Next subcluster", show=False),
        Binding("H", "to_host", "Host cluster", key_display="H"),
        Binding("L", "letters", "Letters", show=False),
    ]

    goto_prompt = "Go to guest offset (e.g. 0x10000, 64k, 1.5G)"
    find_prompt = "Find a state (data, zero, compressed, partial, invalid, backing, unallocated) or an offset"

    def __init__(self, session: Session, *, id: str | None = None) -> None:
        super().__init__(session, id=id)
        self.sc = 0
        self._loading = False
        self._pending: set[int] = set()
        self._last_inspected: tuple[int, ...] | None = None
        self._fresh_seen = 0

    def compose_above_legend(self) -> ComposeResult:
        yield guestfs.PartitionBands(id="gm-bands")

    def make_grid(self) -> ClusterGrid:
        return ClusterGrid(guestfs.FreedOverlay(self.session.guest, guestfs.guest_fs(self.session)), id="gm-grid")

    # -- legend and inspector ---------------------------------------------------------------------
    def _legend(self) -> RenderableType:
        gm = self.session.guest
        depth = len(self.session.layers) - 1
        states = [G.DATA, G.ZERO_PLAIN, G.ZERO_ALLOC, G.UNALLOCATED, G.COMPRESSED]
        if self.session.img.header.extended_l2:
            states += [G.PARTIAL, G.RESERVED]
        states.append(G.INVALID)
        states += [backing_state(d) for d in range(1, min(depth, 5) + 1)]
        names = self.session.layer_names()
        letters = PaletteState.letters
        items = [swatch(GUEST_COLOURS[s], guest_name(s, names), "·" if s == G.UNALLOCATED else "█",
                        GUEST_LETTERS[s] if letters else "") for s in states]
        if guestfs.guest_fs(self.session).has_freed:
            items.append(swatch(*guestfs.legend_item(), "█"))
        t = Text()
        t.append(f"{self.cell_caption('cluster', gm.cluster_size)}, colour = majority, glyph = fill", Style(color=DIM))
        t.append(f" · {fmt.count(gm.n_clusters)} clusters of {fmt.size(gm.cluster_size)}", Style(color=DIM))
        if not gm.complete:
            t.append(f" · scanned {gm.scanned_tables}/{gm.n_tables} L2 tables", Style(color=DIM))
        if gm.backing_error:
            t.append(f"\n⚠ {gm.backing_error}", Style(color=ERROR))
        return Group(Flow(items), t)

    def _inspect(self) -> RenderableType:
        s = self.session
        gm = s.guest
        img = s.img
        h = img.header
        grid = self.grid
        cluster = grid.cursor
        cell = grid.cursor_cell
        cs = h.cluster_size
        n_sc = h.subclusters_per_cluster
        sc = min(self.sc, n_sc - 1)
        guest = cluster * cs + sc * h.subcluster_size
        parts = self.inspector_head("guest", cs, gm.n_clusters)
        if grid.zoom:
            counts = gm.cell_counts(grid.zoom, cell)
            parts.append(self.cell_line(cs))
            if counts is None:
                parts.append(Text("        not scanned yet", Style(color=DIM)))
            else:
                major = int(majority(counts.reshape(1, -1))[0])
                if counts[G.INVALID]:
                    major = G.INVALID
                st = Text()
                st.append("█ ", Style(color=GUEST_COLOURS[major]))
                st.append(guest_name(major, s.layer_names()))
                st.append(" (drawn)" if major != G.INVALID else " (one is enough)", Style(color=DIM))
                parts.append(kv("majority", st))
                for code in sorted(range(len(counts)), key=lambda c: -counts[c]):
                    if counts[code]:
                        t = Text("        ")
                        t.append("█ ", Style(color=GUEST_COLOURS[code]))
                        t.append(f"{guest_name(code, s.layer_names())} ", Style())
                        t.append(f"{fmt.count(int(counts[code]))} ({fmt.pct(int(counts[code]), int(counts.sum()))})",
                                 Style(color=DIM))
                        parts.append(t)
        state = gm.state_of(cluster)
        if state is not None:
            st = Text()
            st.append("█ ", Style(color=GUEST_COLOURS[state]))
            st.append(guest_name(state, s.layer_names()))
            parts.append(kv("cluster" if grid.zoom else "state", st) if not grid.zoom else
                         kv("1st", st))
        fs_text = guestfs.guest_fs(s).describe(guest)
        if fs_text is not None:
            parts.append(kv("guest fs", fs_text))
        try:
            lk = img.lookup(min(guest, h.size - 1))
        except Qcow2Error as e:
            parts.append(Text(str(e), Style(color=ERROR)))
            return Group(*parts)
        parts.append(Text())
        parts.append(rule(f"L1 entry {lk.l1_index}"))
        parts.append(kv("at", fmt.hexoff(lk.l1_entry_offset)))
        parts.append(kv("raw", Text(f"{lk.l1_entry:016x}", Style(color=KIND_COLOURS[ColourKind.L1]))))
        if lk.l2_offset:
            dec = f"L2 table at {fmt.hexoff(lk.l2_offset)}"
            if lk.l1_entry & C.QCOW_OFLAG_COPIED:
                dec += ", COPIED"
            if lk.l2_offset % cs:
                dec += " — UNALIGNED"
        else:
            dec = "no L2 table: everything here is unallocated"
        if lk.l1_entry & C.L1E_RESERVED_MASK:
            dec += " — reserved bits set!"
        parts.append(kv("→", dec))
        parts.append(Text())
        parts.append(rule(f"L2 entry {lk.l2_index}"))
        if lk.l2_entry_offset is not None:
            parts.append(kv("at", fmt.hexoff(lk.l2_entry_offset)))
        ctype = lk.cluster_type
        colour = GUEST_COLOURS[SC_STATE[lk.subcluster_types[sc]]] if n_sc == 1 else GUEST_COLOURS[G.DATA]
        parts.append(kv("raw", Text(f"{lk.l2_entry:016x}", Style(color=colour if lk.l2_entry else DIM))))
        if lk.l2_bitmap is not None:
            parts.append(kv("bitmap", Text(f"{lk.l2_bitmap:016x}", Style(color=GUEST_COLOURS[G.PARTIAL]
                                                                          if lk.l2_bitmap else DIM))))
        dec = {ClusterType.UNALLOCATED: "unallocated", ClusterType.ZERO_PLAIN: "zero (plain)",
               ClusterType.ZERO_ALLOC: "zero, host space allocated", ClusterType.NORMAL: "normal",
               ClusterType.COMPRESSED: "compressed"}[ctype]
        if ctype == ClusterType.COMPRESSED and lk.compressed is not None:
            dec += f": {lk.compressed.csize} bytes at {fmt.hexoff(lk.compressed.coffset)}"
        elif lk.l2_entry & C.L2E_OFFSET_MASK:
            dec += f", host {fmt.hexoff(lk.l2_entry & C.L2E_OFFSET_MASK)}"
        if lk.l2_entry & C.QCOW_OFLAG_COPIED:
            dec += ", COPIED"
        parts.append(kv("→", dec))
        if n_sc > 1 and lk.l2_bitmap is not None:
            parts.append(Text())
            parts.append(rule(f"subclusters ({fmt.size(h.subcluster_size)} each)"))
            parts.append(Text("  0        8        16       24", Style(color=DIM)))
            parts.append(subcluster_strip(lk, sc))
            parts.append(bits_line("A", lk.l2_bitmap & 0xFFFFFFFF, GUEST_COLOURS[G.DATA]))
            parts.append(bits_line("Z", lk.l2_bitmap >> 32, GUEST_COLOURS[G.ZERO_PLAIN]))
        st_sc = lk.subcluster_types[sc]
        sub = Text()
        sub.append(f"{'subcluster ' + str(sc) if n_sc > 1 else 'offset'} ", Style(color=DIM))
        sub.append(SC_NAMES[st_sc], Style(color=GUEST_COLOURS[SC_STATE[st_sc]]))
        parts.append(Text())
        parts.append(sub)
        parts.append(kv("guest", f"{fmt.hexoff(guest)} .. +{fmt.size(h.subcluster_size)}"))
        if lk.host_offset is not None:
            where = " in the data file" if h.has_data_file else ""
            parts.append(kv("host", f"{fmt.hexoff(lk.host_offset)}{where}"))
        names = [li.name for li in s.layer_infos()]
        parts.append(kv("reads", reads_from(list(s.layers), guest, names, lk, s.chain_error)))
        return Group(*parts)

    def guest_fs_changed(self) -> None:
        """The guest filesystems' view (volumes, freed blocks, owners) grew: redraw what shows it."""
        self._last_inspected = None
        self.update_inspector()
        self.update_legend()

    def update_inspector(self) -> None:
        grid = self.grid
        key = (grid.cursor, grid.zoom, self.sc, self.session.guest.version)
        if key == self._last_inspected:
            return
        self._last_inspected = key
        self.query_one("#gm-inspect", Static).update(self._inspect())

    # -- events ---------------------------------------------------------------------------------------
    def on_cluster_grid_cursor_moved(self, event: ClusterGrid.CursorMoved) -> None:
        self.query_one(guestfs.PartitionBands).show_state(guestfs.guest_fs(self.session),
                                                          self.grid.cursor * self.session.img.cluster_size)
        self.update_legend()
        self.update_inspector()

    def on_cluster_grid_activated(self, event: ClusterGrid.Activated) -> None:
        event.stop()
        img = self.session.img
        h = img.header
        try:
            lk = img.lookup(event.unit * h.cluster_size)
        except Qcow2Error as e:
            self.notify(str(e), severity="error", markup=False)
            return
        if lk.l2_offset:
            self.post_message(ShowStructure(StructRef(StructKind.L2, index=lk.l1_index, offset=lk.l2_offset,
                                                      row=lk.l2_index)))
        else:
            self.post_message(ShowStructure(StructRef(StructKind.L1, offset=h.l1_table_offset, row=lk.l1_index)))

    def on_cluster_grid_need_data(self, event: ClusterGrid.NeedData) -> None:
        event.stop()
        if len(event.tables) > MAX_EAGER_TABLES and self.session.scanning:
            return  # most of the disk on screen: the running scan fills it in, reading it twice helps nobody
        self._pending.update(event.tables)
        if not self._loading:
            self._load_pending()

    def _load_pending(self) -> None:
        tables = sorted(self._pending)
        self._pending.clear()
        if not tables:
            return
        self._loading = True
        session = self.session

        def work() -> None:
            from textual.worker import get_current_worker

            w = get_current_worker()
            with contextlib.suppress(Qcow2Error):
                session.load_tables(tables, lambda: w.is_cancelled)
            self.post_message(TablesLoaded())

        self.run_worker(work, thread=True, group="load", exit_on_error=False)

    def on_tables_loaded(self, event: TablesLoaded) -> None:
        event.stop()
        self._loading = False
        self.data_changed(Step.GUEST)
        if self._pending:
            self._load_pending()

    def data_changed(self, step: Step | None) -> None:
        guestfs.start(self, self.session)  # after the first scan step: the first frame reads no tables
        if step not in (Step.GUEST, None):
            return
        grid = self.grid
        if getattr(grid.source, "gm", grid.source) is not self.session.guest:  # a followed image was re-read
            grid.replace_source(guestfs.FreedOverlay(self.session.guest, guestfs.guest_fs(self.session)))
        if len(self.session.fresh_clusters) != self._fresh_seen:
            self._fresh_seen = len(self.session.fresh_clusters)
            grid.set_highlight(self.session.fresh_clusters)
        grid.data_changed()
        self.update_legend()
        self.update_inspector()

    def on_show(self) -> None:
        self.update_inspector()

    # -- actions --------------------------------------------------------------------------------------------
    def action_subcluster(self, delta: int) -> None:
        n = self.session.img.header.subclusters_per_cluster
        sc = self.sc + delta
        grid = self.grid
        if sc < 0 and grid.cursor > 0 and grid.zoom == 0:
            grid.move_to(grid.cursor - 1)
            sc = n - 1
        elif sc >= n and grid.zoom == 0 and grid.cursor < self.session.guest.n_clusters - 1:
            grid.move_to(grid.cursor + 1)
            sc = 0
        self.sc = max(0, min(sc, n - 1))
        self.update_inspector()

    def show_offset(self, offset: int) -> None:
        h = self.session.img.header
        offset = max(0, min(offset, h.size - 1))
        self.sc = (offset % h.cluster_size) // h.subcluster_size
        grid = self.grid
        grid.move_to(offset // h.cluster_size)
        self.update_inspector()

    def offset_problem(self, offset: int) -> str | None:
        size = self.session.img.header.size
        return None if 0 <= offset < size else f"{fmt.hexoff(offset)} is outside the virtual disk ({fmt.size(size)})"

    def find(self, text: str, forward: bool = True, from_start: bool = False) -> str | None:
        q = parse_query(text)
        if q is None:
            return self.goto(text)
        s = self.session
        grid = self.grid
        start = -1 if from_start else grid.cursor + (grid.cpc - 1 if forward else 0)

        def load(t: int) -> None:
            s.load_tables([t], lambda: False)

        hit = Searcher(s.guest, s.img, list(s.layers), load).find(start, q, forward)
        if hit is None:
            more = "" if s.guest.complete else " (the scan has not finished)"
            return f"no {q.name} clusters{more}"
        if hit.wrapped and not from_start:
            self.notify(f"search wrapped around to the {'start' if forward else 'end'} of the disk", timeout=3)
        self.sc = 0
        grid.data_changed()
        grid.move_to(hit.cluster)
        return None

    # -- links, history, copy, export -------------------------------------------------------------------
    def _lookup(self) -> L2Lookup | None:
        h = self.session.img.header
        guest = self.grid.cursor * h.cluster_size + min(self.sc, h.subclusters_per_cluster - 1) * h.subcluster_size
        try:
            return self.session.img.lookup(min(guest, h.size - 1))
        except Qcow2Error as e:
            self.notify(str(e), severity="error", markup=False)
            return None

    def action_to_host(self) -> None:
        """`H`: the host cluster that the cursor's L2 entry points at, in the host layout."""
        lk = self._lookup()
        if lk is None:
            return
        if lk.compressed is not None:
            self.post_message(ShowHost(lk.compressed.coffset))
        elif lk.host_offset is not None:
            self.post_message(ShowHost(lk.host_offset))
        elif lk.l2_entry & C.L2E_OFFSET_MASK:
            self.post_message(ShowHost(lk.l2_entry & C.L2E_OFFSET_MASK))
        else:
            self.notify("this cluster has no host cluster (nothing allocated here)", severity="warning", timeout=3)

    def place(self) -> Place:
        grid = self.grid
        off = grid.cursor * self.session.img.cluster_size
        return Place(self.VIEW_ID, f"guest {fmt.hexoff(off)}", (grid.cursor, grid.zoom, self.sc))

    def restore(self, place: Place) -> None:
        cursor, zoom, sc = place.state
        assert isinstance(cursor, int) and isinstance(zoom, int) and isinstance(sc, int)
        grid = self.grid
        grid.set_zoom(zoom)
        grid.move_to(cursor)
        self.sc = sc
        self.update_inspector()
        grid.focus()

    def copy_value(self) -> tuple[str, str] | None:
        h = self.session.img.header
        guest = self.grid.cursor * h.cluster_size + min(self.sc, h.subclusters_per_cluster - 1) * h.subcluster_size
        return "guest offset", fmt.hexoff(guest)

    def export(self) -> dict[str, object]:
        s = self.session
        gm = s.guest
        grid = self.grid
        h = s.img.header
        names = s.layer_names()
        out: dict[str, object] = {
            "view": self.VIEW_ID, "cluster-size": h.cluster_size, "cursor-cluster": grid.cursor,
            "guest-offset": grid.cursor * h.cluster_size, "zoom-clusters-per-cell": grid.cpc,
            "scanned-tables": gm.scanned_tables, "tables": gm.n_tables,
            "totals": {guest_name(i, names): int(v) for i, v in enumerate(gm.totals()) if v},
        }
        counts = gm.cell_counts(grid.zoom, grid.cursor_cell)
        if counts is not None:
            out["cursor-cell"] = {guest_name(i, names): int(v) for i, v in enumerate(counts) if v}
        lk = self._lookup()
        if lk is not None:
            out["l1-index"] = lk.l1_index
            out["l1-entry"] = f"{lk.l1_entry:016x}"
            out["l1-entry-offset"] = lk.l1_entry_offset
            out["l2-index"] = lk.l2_index
            out["l2-entry"] = f"{lk.l2_entry:016x}"
            out["l2-entry-offset"] = lk.l2_entry_offset
            out["l2-bitmap"] = None if lk.l2_bitmap is None else f"{lk.l2_bitmap:016x}"
            out["host-offset"] = lk.host_offset
            out["subclusters"] = [SC_NAMES[t] for t in lk.subcluster_types]
        return out


__all__ = ["GLYPHS", "SC_NAMES", "SC_STATE", "GuestMapView"]
