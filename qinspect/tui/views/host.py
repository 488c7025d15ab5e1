"""3 · Host layout: the image file as a grid of host clusters coloured by owner, with reverse lookup."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt
from rich.console import Group, RenderableType
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from qinspect.analysis.layout import Owner, Reference, ReferenceKind
from qinspect.termtext import for_terminal
from qinspect.tui import fmt
from qinspect.tui.flow import Flow
from qinspect.tui.follow import fresh_host_clusters
from qinspect.tui.guestmap import GL_DARK, GL_EMPTY, GL_FULL, GL_LIGHT, GL_MEDIUM, GL_UNKNOWN
from qinspect.tui.messages import ShowGuest, ShowStructure
from qinspect.tui.nav import Place
from qinspect.tui.palette import DIM, ERROR, KIND_COLOURS, WARN, ColourKind, kind_colour, swatch
from qinspect.tui.session import Session, Step
from qinspect.tui.structs import HEADER_FIELDS, StructKind, StructRef
from qinspect.tui.views.gridview import GridView, kv, rule
from qinspect.tui.widgets.grid import ClusterGrid

if TYPE_CHECKING:
    from qinspect.analysis.layout import Layout

U8 = npt.NDArray[np.uint8]
UNKNOWN_CODE = 255

# The second channel: the letter the CLI's `layout` map draws for each owner.
OWNER_LETTERS: dict[Owner, str] = {
    Owner.HEADER: "H", Owner.L1: "1", Owner.SNAPSHOT_L1: "s", Owner.L2: "2", Owner.REFCOUNT_TABLE: "T",
    Owner.REFCOUNT_BLOCK: "R", Owner.DATA: "D", Owner.COMPRESSED: "C", Owner.SNAPSHOT_TABLE: "S",
    Owner.BITMAP_DIRECTORY: "b", Owner.BITMAP_TABLE: "B", Owner.BITMAP_DATA: "m", Owner.LUKS: "K",
    Owner.LEAKED: "!", Owner.FREE: ".", Owner.PAST_END: "_", Owner.SHARED: "=", Owner.CONFLICT: "X",
}
_EMPTY = (Owner.FREE, Owner.PAST_END)


class HostSource:
    """The grid's view of a `Layout` (or of nothing yet): one cell per 2**zoom host clusters."""

    def __init__(self, cluster_size: int, file_size: int, layout: Layout | None = None) -> None:
        self.unit_bytes = cluster_size
        self.n_units = max(1, -(-file_size // cluster_size))
        self.layout = layout
        self.version = 0 if layout is None else 1
        self._cache: dict[tuple[int, int, int], tuple[U8, U8]] = {}
        self._n_owner = len(Owner)
        self._empty = [int(o) for o in _EMPTY]
        self._priority = [int(Owner.CONFLICT), int(Owner.LEAKED)]

    @property
    def max_zoom(self) -> int:
        return max(0, (self.n_units - 1).bit_length())

    def n_cells(self, zoom: int) -> int:
        return -(-self.n_units // (1 << zoom))

    def colour(self, code: int) -> str:
        if code == UNKNOWN_CODE or self.layout is None:
            return KIND_COLOURS[ColourKind.UNKNOWN]
        return kind_colour(Owner(code).name)

    def letter(self, code: int) -> str:
        if code == UNKNOWN_CODE or self.layout is None:
            return " "
        return OWNER_LETTERS[Owner(code)]

    def name(self, code: int) -> str:
        if self.layout is None:
            return "not scanned"
        return Owner(code).label

    def _range(self, zoom: int, c0: int, c1: int) -> tuple[U8, U8]:
        """(owner code, fill glyph) of cells [c0, c1): counted over those cells' clusters only, so
        memory follows what is on screen (a whole-file table of counts at zoom 0 of a 1 TiB
        image would be gigabytes)."""
        assert self.layout is not None
        owner = self.layout.owner
        cpc = 1 << zoom
        lo, hi = c0 * cpc, min(len(owner), c1 * cpc)
        n = c1 - c0
        if n <= 0 or lo >= hi:
            return np.zeros(max(0, n), np.uint8), np.full(max(0, n), GL_EMPTY, np.uint8)
        part = owner[lo:hi].astype(np.int64)
        k = self._n_owner
        rows = (np.arange(lo, hi, dtype=np.int64) - lo) >> zoom
        counts = np.bincount(rows * k + part, minlength=n * k)[: n * k].reshape(n, k)
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
        return code.astype(np.uint8), glyph.astype(np.uint8)

    def cells(self, zoom: int, c0: int, c1: int) -> tuple[U8, U8, list[int]]:
        c1 = min(c1, self.n_cells(zoom))
        n = max(0, c1 - c0)
        if self.layout is None:
            return (np.full(n, UNKNOWN_CODE, dtype=np.uint8), np.full(n, GL_UNKNOWN, dtype=np.uint8), [])
        key = (zoom, c0, c1)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._range(zoom, c0, c1)
            self._cache[key] = hit
            while len(self._cache) > 512:
                self._cache.pop(next(iter(self._cache)))
        return hit[0], hit[1], []

    def cell_counts(self, zoom: int, cell: int) -> dict[int, int]:
        if self.layout is None:
            return {}
        part = self.layout.owner[cell << zoom : (cell + 1) << zoom]
        c = np.bincount(part, minlength=self._n_owner)
        return {i: int(v) for i, v in enumerate(c) if v}


def ref_text(r: Reference, cs: int) -> Text:
    """One `Reference` of the layout, in words (snapshot ids come from the file: escaped)."""
    t = Text()
    kind = r.kind
    idx = r.entry_index
    where = r.entry_file_offset
    snap = for_terminal(r.snapshot) if r.snapshot else None
    guest = r.guest_offset
    t.append(f"{kind.label} {idx}" if kind is not ReferenceKind.HEADER_FIELD else kind.label, Style(bold=True))
    t.append(f" @{fmt.hexoff(where)}", Style(color=DIM))
    if snap:
        t.append(f" (snapshot {snap})", Style(color=KIND_COLOURS[ColourKind.SNAPSHOT_TABLE]))
    if guest is not None and kind is ReferenceKind.L2_ENTRY:
        t.append(f"\n    → guest {fmt.hexoff(guest)}")
    elif guest is not None and kind is ReferenceKind.L1_ENTRY:
        t.append(f"\n    → guest from {fmt.hexoff(guest)}")
    return t


INSPECTOR_REFS = 40
"""References drawn in the inspector panel (the rest are counted)."""
LISTED_REFS = 1000
"""References listed by `R` and exported by `e` (the rest are counted; the CLI lists them all)."""


class RefsScreen(ModalScreen[int | None]):
    """The entries that point at one host cluster; enter follows one (dismisses with its index)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,backspace", "cancel", "Back")]
    DEFAULT_CSS = """
    RefsScreen { align: center middle; }
    RefsScreen OptionList { width: 80%; max-width: 90; height: auto; max-height: 80%; border: round $primary; }
    """

    def __init__(self, title: str, refs: list[Text]) -> None:
        super().__init__()
        self.title_text = title
        self.refs = refs

    def compose(self) -> ComposeResult:
        ol = OptionList(*[Option(t) for t in self.refs])
        ol.border_title = self.title_text
        yield ol

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option_index)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HostLayoutView(GridView):
    """The host layout grid and the cursor's owner and references."""

    VIEW_ID = "host"
    TITLE = "Host layout"
    PREFIX = "hl"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("R", "references", "Refs", key_display="R"),
        Binding("L", "letters", "Letters", show=False),
    ]

    HELP = """
## Host layout

The image file as a grid of host clusters, coloured by what owns each one
(header, L1/L2 tables, refcount structures, data, compressed data, snapshots,
bitmaps, LUKS, leaked, free holes, past the end). Scattered metadata and
fragmentation are visible at a glance.

- arrows / `hjkl` move, `+` / `-` zoom
- the panel says who owns the cluster and which table entries point at it
  (for data, the guest offsets that use it)
- each cell shows the owner's letter (as `qinspect layout` draws it) on its colour;
  `L` switches to blocks (fill: `█` full … `░` nearly empty)
- `enter` follows the reference (guest map for active data, Structures for
  metadata); with several, `enter` or `R` lists every entry that points here
  and `enter` there follows one; `backspace` comes back
- while following a live image (`f`), clusters newly allocated since are underlined
- `c` copies the host offset, `e` exports the cursor's owner and references
- `g` go to a host offset, `/` find an owner (`leaked`, `l2`, `free`, …)
"""

    goto_prompt = "Go to host (file) offset"
    find_prompt = "Find an owner (leaked, free, l2, refcount, data, compressed, snapshot…)"

    def __init__(self, session: Session, *, id: str | None = None) -> None:
        super().__init__(session, id=id)
        img = session.img
        self.source = HostSource(img.cluster_size, img.file.size, session.layout)

    def make_grid(self) -> ClusterGrid:
        grid = ClusterGrid(self.source, id="hl-grid")
        grid.letters = True
        if self.session.follow_host_base is not None:  # views made after following began
            grid.set_highlight(fresh_host_clusters(self.session))
        return grid

    def _legend(self) -> RenderableType:
        s = self.session
        lay = s.layout
        t = Text()
        if lay is None:
            if Step.LAYOUT in s.errors:
                t.append(f"host layout failed: {s.clean(s.errors[Step.LAYOUT])}", Style(color=ERROR))
            elif Step.LAYOUT in s.cancelled:
                t.append("host layout scan cancelled — press r to run it again", Style(color=WARN))
            elif not s.scanning:
                t.append("the host layout was not scanned — press r to run it", Style(color=WARN))
            else:
                t.append("scanning the host layout… (it runs after the guest map)", Style(color=DIM))
            return t
        counts = lay.counts()
        items = []
        letters = self.grid.draws_letters if self.is_mounted and self.query(ClusterGrid) else True
        for owner, n in counts.items():
            if not n:
                continue
            glyph = "·" if owner in _EMPTY else "█"
            items.append(swatch(kind_colour(owner.name), f"{owner.label} {fmt.count(n)}", glyph,
                                OWNER_LETTERS[owner] if letters else ""))
        t.append(f"{self.cell_caption('host cluster', lay.cluster_size)}"
                 f" · file {fmt.size(lay.file_size)} · image end {fmt.hexoff(lay.image_end_offset)}", Style(color=DIM))
        return Group(Flow(items), t)

    def _inspect(self) -> RenderableType:
        s = self.session
        lay = s.layout
        grid = self.grid
        cs = s.img.cluster_size
        hc = grid.cursor
        off = hc * cs
        parts = self.inspector_head("host", cs, self.source.n_units)
        if lay is None:
            parts.append(Text("the layout is not known yet", Style(color=DIM)))
            return Group(*parts)
        if grid.zoom:
            parts.append(self.cell_line(cs))
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
        total = lay.count_references(off)  # (one table can be named by millions of entries)
        refs = lay.references(off, INSPECTOR_REFS)
        parts.append(Text())
        parts.append(rule(f"pointed at by {fmt.count(total)}" + (" (enter/R lists them)" if total > 1 else
                                                                  " (enter follows)" if total else "")))
        for r in refs:
            parts.append(ref_text(r, cs))
        if total > len(refs):
            parts.append(Text(f"… {fmt.count(total - len(refs))} more", Style(color=DIM)))
        if not refs:
            if owner == Owner.LEAKED:
                parts.append(Text("nothing points here, yet its refcount is not 0: a leak "
                                  "(qemu-img check -r leaks frees it)", Style(color=WARN)))
            elif owner == Owner.FREE:
                parts.append(Text("a free hole inside the file (refcount 0)", Style(color=DIM)))
            elif owner == Owner.PAST_END:
                parts.append(Text("past the last cluster in use", Style(color=DIM)))
        return Group(*parts)

    def update_inspector(self) -> None:
        self.query_one("#hl-inspect", Static).update(self._inspect())

    def on_cluster_grid_cursor_moved(self, event: ClusterGrid.CursorMoved) -> None:
        self.update_legend()
        self.update_inspector()

    def on_cluster_grid_activated(self, event: ClusterGrid.Activated) -> None:
        event.stop()
        lay = self.session.layout
        if lay is None:
            self.notify("the host layout is not known yet", severity="warning", timeout=3)
            return
        off = event.unit * self.session.img.cluster_size
        refs = lay.references(off, 2)
        if len(refs) > 1:
            self.action_references()
        elif refs:
            self.follow(refs[0], off)
        elif lay.owner_at(off) == Owner.HEADER:
            self.post_message(ShowStructure(StructRef(StructKind.HEADER)))
        else:
            self.notify("nothing points at this cluster", timeout=3)

    def action_references(self) -> None:
        """`R`: every entry that points at the cursor's cluster; enter follows one."""
        lay = self.session.layout
        if lay is None:
            self.notify("the host layout is not known yet", severity="warning", timeout=3)
            return
        cs = self.session.img.cluster_size
        off = self.grid.cursor * cs
        refs = lay.references(off, LISTED_REFS)
        if not refs:
            self.notify("nothing points at this cluster", timeout=3)
            return
        total = lay.count_references(off)
        rows = [ref_text(r, cs) for r in refs]
        if total > len(refs):
            rows.append(Text(f"… and {fmt.count(total - len(refs))} more (qinspect layout --offset "
                             f"{fmt.hexoff(off)} --output=json lists them all)", Style(color=DIM)))

        def chosen(i: int | None) -> None:
            if i is not None and i < len(refs):
                self.follow(refs[i], off)

        what = "1 entry points" if total == 1 else f"{fmt.count(total)} entries point"
        self.app.push_screen(RefsScreen(f"{what} at host {fmt.hexoff(off)}", rows), chosen)

    def target_of(self, r: Reference, off: int) -> StructRef | int | None:
        """Where a reference leads: the entry that points here, in its table (an L2 entry's row
        links on to the guest map)."""
        img = self.session.img
        h = img.header
        if r.kind is ReferenceKind.L2_ENTRY:
            owner = next((i for i, sn in enumerate(img.snapshots) if sn.id_str == r.snapshot), -1)
            return StructRef(StructKind.L2, index=(r.guest_offset or 0) // (h.l2_size * h.cluster_size),
                             offset=r.table_offset, owner=owner, row=r.entry_index)
        if r.kind is ReferenceKind.L1_ENTRY:
            owner = next((i for i, sn in enumerate(img.snapshots) if sn.id_str == r.snapshot), -1)
            kind = StructKind.SNAPSHOT_L1 if owner >= 0 else StructKind.L1
            return StructRef(kind, owner=owner, offset=r.table_offset,
                             row=r.entry_index)
        if r.kind is ReferenceKind.REFCOUNT_TABLE_ENTRY:
            return StructRef(StructKind.REFCOUNT_TABLE, offset=h.refcount_table_offset, row=r.entry_index)
        if r.kind is ReferenceKind.SNAPSHOT_TABLE_ENTRY:
            return StructRef(StructKind.SNAPSHOT_TABLE, offset=h.snapshots_offset, row=r.entry_index)
        if r.kind is ReferenceKind.BITMAP_DIRECTORY_ENTRY and h.bitmaps_ext is not None:
            return StructRef(StructKind.BITMAP_DIRECTORY, offset=h.bitmaps_ext.bitmap_directory_offset,
                             row=r.entry_index)
        if r.kind is ReferenceKind.BITMAP_TABLE_ENTRY:
            bi = next((i for i, b in enumerate(img.bitmaps) if b.bitmap_table_offset == r.table_offset), 0)
            return StructRef(StructKind.BITMAP_TABLE, index=bi, offset=r.table_offset, row=r.entry_index)
        if r.kind is ReferenceKind.HEADER_EXTENSION and h.crypto_ext is not None:
            return StructRef(StructKind.LUKS, offset=h.crypto_ext.offset)
        if r.kind is ReferenceKind.HEADER_FIELD:
            rows = {f[1]: row for row, f in enumerate(HEADER_FIELDS)}  # the header table's row of the field
            return StructRef(StructKind.HEADER, row=rows.get(r.entry_file_offset, 0))
        return None

    def follow(self, r: Reference, off: int) -> None:
        target = self.target_of(r, off)
        if isinstance(target, int):
            self.post_message(ShowGuest(target))
        elif target is not None:
            self.post_message(ShowStructure(target))

    def place(self) -> Place:
        grid = self.grid
        return Place(self.VIEW_ID, f"host {fmt.hexoff(grid.cursor * self.session.img.cluster_size)}",
                     (grid.cursor, grid.zoom))

    def restore(self, place: Place) -> None:
        cursor, zoom = place.state
        assert isinstance(cursor, int) and isinstance(zoom, int)
        self.grid.set_zoom(zoom)
        self.grid.move_to(cursor)
        self.update_inspector()
        self.grid.focus()

    def copy_value(self) -> tuple[str, str] | None:
        return "host offset", fmt.hexoff(self.grid.cursor * self.session.img.cluster_size)

    def export(self) -> dict[str, object]:
        s = self.session
        lay = s.layout
        cs = s.img.cluster_size
        off = self.grid.cursor * cs
        out: dict[str, object] = {"view": self.VIEW_ID, "cluster-size": cs, "host-offset": off}
        if lay is not None:
            out["owner"] = lay.owner_at(off).label
            out["counts"] = {o.label: int(n) for o, n in lay.counts().items() if n}
            out["references"] = [{"kind": r.kind, "table-offset": r.table_offset, "entry-index": r.entry_index,
                                  "entry-offset": r.entry_file_offset, "guest-offset": r.guest_offset,
                                  "snapshot": r.snapshot} for r in lay.references(off, LISTED_REFS)]
            out["references-total"] = lay.count_references(off)
        return out

    def data_changed(self, step: Step | None) -> None:
        if step not in (Step.LAYOUT, Step.DIAGNOSE, None):
            return
        if self.source.layout is self.session.layout:
            return
        s = self.session
        self.source = HostSource(s.img.cluster_size, s.img.file.size, s.layout)
        grid = self.grid
        cursor = grid.cursor
        grid.set_source(self.source)
        grid.set_highlight(fresh_host_clusters(s))  # a followed image: what it newly allocated
        grid.move_to(cursor)
        self.update_legend()
        self.update_inspector()

    def on_show(self) -> None:
        self.update_legend()
        self.update_inspector()

    def show_offset(self, offset: int) -> None:
        self.grid.move_to(offset // self.session.img.cluster_size)
        self.update_inspector()

    def offset_problem(self, offset: int) -> str | None:
        size = self.session.img.file.size
        if 0 <= offset < max(1, size):
            return None
        return f"{fmt.hexoff(offset)} is past the end of the file ({fmt.size(size)})"

    def find(self, text: str, forward: bool = True, from_start: bool = False) -> str | None:
        lay = self.session.layout
        if lay is None:
            return "the host layout is not known yet"
        key = text.strip().lower().replace(" ", "_")
        wanted = [int(o) for o in Owner
                  if key and (key in o.name.lower() or key in o.label.lower().replace(" ", "_"))]
        if not wanted:
            return self.goto(text)
        owner = lay.owner
        cur = self.grid.cursor
        cpc = self.grid.cpc
        hits = np.flatnonzero(np.isin(owner, np.array(wanted, dtype=owner.dtype)))
        if not len(hits):
            return f"no '{for_terminal(text)}' clusters"
        ahead = hits if from_start else hits[hits >= cur + cpc] if forward else hits[hits < cur]
        if not len(ahead):
            ahead = hits
            self.notify(f"search wrapped around to the {'start' if forward else 'end'} of the file", timeout=3)
        self.grid.move_to(int(ahead[0] if forward else ahead[-1]))
        return None
