"""7 · Chain & snapshots: the backing chain with what each layer provides, snapshots, bitmaps."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static

from qinspect.qcow2.image import Image
from qinspect.tui import fmt
from qinspect.tui.messages import ShowStructure
from qinspect.tui.palette import DIM, ERROR, GUEST_COLOURS, G
from qinspect.tui.session import Session, Step
from qinspect.tui.structs import (
    BitmapDirectoryModel,
    Cell,
    SnapshotTableModel,
    StructRef,
    TableModel,
    Target,
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
        if isinstance(layer, Image) and layer.header.backing_file is not None:
            note = f"→ {layer.header.backing_file} ({layer.header.backing_format or 'probed'})"
        provided = f"{fmt.size(n * gm.cluster_size)} {fmt.pct(n, gm.n_clusters)}"
        if li.depth > 5:
            provided = "(counted in layer 5)"
        return [(str(li.depth), colour), (li.name, colour), (li.format, None), (fmt.size(li.virtual_size), None),
                (fmt.size(li.cluster_size) if li.cluster_size else "-", None), (fmt.size(li.file_size), None),
                (provided, colour), (note, DIM)]

    def detail(self, i: int) -> str:
        if i >= len(self.infos):
            return self.session.chain_error or ""
        li = self.infos[i]
        return f"layer {li.depth}: {li.name}, {li.format}, {fmt.size(li.virtual_size)} virtual"

    def target(self, i: int) -> Target:
        if i == 0:
            return StructRef("header")
        if i == 1 and self.session.img.header.backing_file_offset:
            return StructRef("backing_name")
        return None


class ChainView(View):
    """Three tables: layers, snapshots, bitmaps."""

    VIEW_ID = "chain"
    TITLE = "Chain & snapshots"

    HELP = """
## Chain & snapshots

- **Backing chain**: every layer, top first, and how much of the guest view
  each one provides (from the guest-map scan)
- **Snapshots**: internal snapshots (`enter` opens the snapshot's L1 table)
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
        self.snap_model = SnapshotTableModel(session.img)
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
            self.query_one("#ch-detail", Static).update(Text(model.detail(event.row), Style(color=DIM)))

    def on_entry_table_activated(self, event: EntryTable.Activated) -> None:
        event.stop()
        model = event.table.model
        if model is None:
            return
        target = model.target(event.row)
        if isinstance(target, StructRef):
            self.post_message(ShowStructure(target))

    def data_changed(self, step: Step | None) -> None:
        if step in (Step.GUEST, None):
            t = self.query_one("#ch-layers", EntryTable)
            t.set_model(self.layers_model, t.cursor)
