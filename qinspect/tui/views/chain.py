"""7 · Chain & snapshots: the backing chain with what each layer provides, snapshots, bitmaps."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static

from qinspect.qcow2.image import Image
from qinspect.termtext import for_terminal
from qinspect.tui import fmt
from qinspect.tui.messages import ShowStructure
from qinspect.tui.nav import Place
from qinspect.tui.palette import DIM, ERROR, GUEST_COLOURS, KIND_COLOURS, ColourKind, G
from qinspect.tui.session import Session, Step
from qinspect.tui.structs import (
    BitmapDirectoryModel,
    Cell,
    SnapshotTableModel,
    StructKind,
    StructRef,
    TableModel,
    Target,
    utc,
)
from qinspect.tui.views.base import View
from qinspect.tui.views.overview import LAYER0_STATES
from qinspect.tui.widgets.table import EntryTable


class LayersModel(TableModel):
    """The backing chain, top first."""

    title = "Backing chain"
    columns = (("#", 2), ("file", 24), ("fmt", 5), ("virtual", 9), ("cluster", 8), ("file size", 9),
               ("provides", 16), ("backing file", 28))

    def __init__(self, session: Session) -> None:
        super().__init__(session.img)
        self.session = session
        self.infos = session.layer_infos()

    def __len__(self) -> int:
        return len(self.infos) + (1 if self.session.chain_error else 0)

    def row(self, i: int) -> list[Cell]:
        s = self.session
        if i >= len(self.infos):
            return [("!", ERROR), ("(missing)", ERROR), ("", None), ("", None), ("", None), ("", None), ("", None),
                    (s.chain_error or "", ERROR)]
        li = self.infos[i]
        gm = s.guest
        totals = gm.totals()
        if li.depth == 0:
            n = int(sum(int(totals[st]) for st in LAYER0_STATES))
            colour = GUEST_COLOURS[G.DATA]
        elif li.depth <= 5:
            code = G.BACKING1 + li.depth - 1
            n = int(totals[code])
            colour = GUEST_COLOURS[code]
        else:
            n, colour = 0, GUEST_COLOURS[G.BACKING5]
        layer = s.layers[i]
        note = ""
        if isinstance(layer, Image) and (backing := layer.header.backing_file) is not None:
            note = f"→ {for_terminal(backing)} ({for_terminal(layer.header.backing_format or 'probed')})"
        provided = f"{fmt.size(n * gm.cluster_size)} {fmt.pct(n, gm.n_clusters)}"
        if li.depth > 5:
            provided = "(counted in layer 5)"
        return [(str(li.depth), colour), (li.name, colour), (for_terminal(li.format), None),
                (fmt.size(li.virtual_size), None),
                (fmt.size(li.cluster_size) if li.cluster_size else "-", None), (fmt.size(li.file_size), None),
                (provided, colour), (note, DIM)]

    def detail(self, i: int) -> str:
        if i >= len(self.infos):
            return self.session.chain_error or ""
        li = self.infos[i]
        return f"layer {li.depth}: {li.name}, {for_terminal(li.format)}, {fmt.size(li.virtual_size)} virtual"

    def target(self, i: int) -> Target:
        if i == 0:
            return StructRef(StructKind.HEADER)
        if i == 1 and self.session.img.header.backing_file_offset:
            return StructRef(StructKind.BACKING_NAME)
        return None


class SnapshotsModel(SnapshotTableModel):
    """The snapshot table with what deleting each snapshot frees (from the space analysis), in
    the order chosen with `s` (table order, name, date, bytes freed)."""

    SORTS = ("table", "name", "date", "frees")

    def __init__(self, session: Session) -> None:
        super().__init__(session.img)
        self.session = session
        self.sort = "table"
        # table order is a range, a sort an array: no list of 65,536 ints for a hostile table
        self.order: Sequence[int] = range(len(self.snaps))
        self.columns = (("id", 4), ("name", 14), ("frees if deleted", 16), ("on disk", 10), ("date (UTC)", 19),
                        ("vm state", 9), ("L1 table", 10))

    def frees(self, i: int) -> tuple[int, int] | None:
        space = self.session.space
        if space is None:
            return None
        sid = self.snaps[i].id_str
        return space.snapshots.get(sid, 0), space.snapshot_disk.get(sid, 0)

    def resort(self, sort: str | None = None) -> None:
        self.sort = sort or self.sort
        n = len(self.snaps)
        if self.sort == "name":
            self.order = array("q", sorted(range(n), key=lambda i: self.snaps[i].name))
        elif self.sort == "date":
            self.order = array("q", sorted(range(n), key=lambda i: self.snaps[i].date_sec))
        elif self.sort == "frees":
            self.order = array("q", sorted(range(n), key=lambda i: -((self.frees(i) or (0, 0))[0])))
        else:
            self.order = range(n)

    def row(self, i: int) -> list[Cell]:
        k = self.order[i]
        sn = self.snaps[k]
        fr = self.frees(k)
        freed = (fmt.size(fr[0]), KIND_COLOURS[ColourKind.SNAPSHOT_DATA]) if fr is not None else ("…", DIM)
        disk = (fmt.size(fr[1]), None) if fr is not None else ("…", DIM)
        return [(for_terminal(sn.id_str), None), (for_terminal(sn.name), KIND_COLOURS[ColourKind.SNAPSHOT_TABLE]),
                freed, disk,
                (utc(sn.date_sec), None), (fmt.size(sn.vm_state_size), None), (fmt.hexoff(sn.l1_table_offset), None)]

    def span(self, i: int) -> tuple[int, int] | None:
        return super().span(self.order[i])

    def detail(self, i: int) -> str:
        k = self.order[i]
        fr = self.frees(k)
        extra = f"; deleting it frees {fr[0]:,} bytes ({fr[1]:,} on disk)" if fr is not None else \
            "; what deleting it frees is known once the host layout is scanned"
        return super().detail(k) + extra

    def target(self, i: int) -> Target:
        return super().target(self.order[i])


class ChainView(View):
    """Three tables: layers, snapshots, bitmaps."""

    VIEW_ID = "chain"
    TITLE = "Chain & snapshots"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("s", "sort", "Sort snapshots")]

    HELP = """
## Chain & snapshots

- **Backing chain**: every layer, top first, and how much of the guest view
  each one provides (from the guest-map scan)
- **Snapshots**: internal snapshots and what deleting each one frees (the
  clusters only it references); `s` sorts them (table order, name, date,
  bytes freed); `enter` opens the snapshot's L1 table, whose entries lead on
  to its L2 tables
- **Bitmaps**: persistent dirty bitmaps (`enter` opens the bitmap table)

`tab` moves between the tables.
"""

    DEFAULT_CSS = """
    ChainView { padding: 0 1; }
    ChainView .ch-title { height: 1; text-style: bold; margin-top: 1; }
    ChainView #ch-layers { height: auto; max-height: 10; }
    ChainView #ch-snapshots { height: auto; max-height: 12; }
    ChainView #ch-bitmaps { height: auto; max-height: 8; }
    ChainView EntryTable { height: auto; }
    """

    def __init__(self, session: Session, *, id: str | None = None) -> None:
        super().__init__(session, id=id)
        self.layers_model = LayersModel(session)
        self.snap_model = SnapshotsModel(session)
        self.bitmap_model = BitmapDirectoryModel(session.img) if session.img.header.bitmaps_ext else None

    def compose(self) -> ComposeResult:
        s = self.session
        with Vertical():
            yield Static(Text("Backing chain", Style(bold=True)), classes="ch-title")
            yield EntryTable(id="ch-layers")
            yield Static(Text.assemble(("Snapshots ", Style(bold=True)), (f"{len(s.img.snapshots)}", Style(color=DIM))),
                         classes="ch-title")
            if s.img.snapshots:
                yield EntryTable(id="ch-snapshots")
            else:
                yield Static(Text("no internal snapshots", Style(color=DIM)))
            nb = len(s.img.bitmaps) if self.bitmap_model else 0
            yield Static(Text.assemble(("Bitmaps ", Style(bold=True)), (f"{nb}", Style(color=DIM))),
                         classes="ch-title")
            if self.bitmap_model is not None:
                yield EntryTable(id="ch-bitmaps")
            else:
                yield Static(Text("no persistent bitmaps", Style(color=DIM)))
            yield Static("", id="ch-detail")

    def on_mount(self) -> None:
        self.query_one("#ch-layers", EntryTable).set_model(self.layers_model)
        if self.session.img.snapshots:
            self.query_one("#ch-snapshots", EntryTable).set_model(self.snap_model)
        if self.bitmap_model is not None:
            self.query_one("#ch-bitmaps", EntryTable).set_model(self.bitmap_model)

    def main_widget(self) -> Widget | None:
        return self.query_one("#ch-layers", EntryTable)

    def _model_of(self, table: EntryTable) -> TableModel | None:
        return table.model

    def on_entry_table_highlighted(self, event: EntryTable.Highlighted) -> None:
        event.stop()
        model = event.table.model
        if model is not None and len(model) and event.table.has_focus:
            self.query_one("#ch-detail", Static).update(Text(model.detail(event.row), Style(color=DIM)))  # escaped

    def on_entry_table_activated(self, event: EntryTable.Activated) -> None:
        event.stop()
        model = event.table.model
        if model is None:
            return
        target = model.target(event.row)
        if isinstance(target, StructRef):
            self.post_message(ShowStructure(target))

    def action_sort(self) -> None:
        if not self.session.img.snapshots:
            return
        m = self.snap_model
        m.resort(m.SORTS[(m.SORTS.index(m.sort) + 1) % len(m.SORTS)])
        t = self.query_one("#ch-snapshots", EntryTable)
        t.set_model(m, t.cursor)
        self.notify(f"snapshots sorted by {m.sort}", timeout=2)

    def place(self) -> Place:
        focused = self.screen.focused if self.is_mounted else None
        wid = focused.id if isinstance(focused, EntryTable) and focused.id else "ch-layers"
        cur = focused.cursor if isinstance(focused, EntryTable) else 0
        return Place(self.VIEW_ID, "Chain" if wid != "ch-snapshots" else f"snapshot row {cur}", (wid, cur))

    def restore(self, place: Place) -> None:
        if len(place.state) == 2 and isinstance(place.state[0], str) and isinstance(place.state[1], int):
            found = self.query(f"#{place.state[0]}")
            if found:
                t = found.first()
                if isinstance(t, EntryTable):
                    t.move_to(place.state[1])
                    t.focus()

    def copy_value(self) -> tuple[str, str] | None:
        focused = self.screen.focused
        if isinstance(focused, EntryTable) and focused.model is not None and len(focused.model):
            cells = focused.model.row(focused.cursor)
            return "row", "  ".join(c for c, _ in cells if c)
        return None

    def export(self) -> dict[str, object]:
        out: dict[str, object] = {"view": self.VIEW_ID, "layers": [li.__dict__ for li in self.session.layer_infos()]}
        m = self.snap_model
        out["snapshots"] = [{"id": sn.id_str, "name": sn.name, "l1-table-offset": sn.l1_table_offset,
                             "date": sn.date_sec,
                             "frees": (m.frees(k) or (None, None))[0], "frees-on-disk": (m.frees(k) or (None, None))[1]}
                            for k, sn in enumerate(m.snaps)]
        return out

    def data_changed(self, step: Step | None) -> None:
        if step in (Step.SPACE, Step.DIAGNOSE, None) and self.session.img.snapshots:
            self.snap_model.resort()
            t = self.query_one("#ch-snapshots", EntryTable)
            t.set_model(self.snap_model, t.cursor)
        if step in (Step.GUEST, None):
            t = self.query_one("#ch-layers", EntryTable)
            t.set_model(self.layers_model, t.cursor)
