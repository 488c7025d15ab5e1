"""4 · Structures: a tree of every on-disk structure, its entries, and its bytes coloured by field."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Static, Tree
from textual.widgets.tree import TreeNode

from qinspect.qcow2 import constants as C
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.fields import HEADER_V2_SIZE
from qinspect.qcow2.l2 import ClusterType, classify_cluster, parse_compressed
from qinspect.termtext import for_terminal
from qinspect.tui import fmt
from qinspect.tui.messages import ShowGuest, ShowHost, ShowStructure
from qinspect.tui.nav import Place
from qinspect.tui.palette import DIM, ERROR, KIND_COLOURS, ColourKind
from qinspect.tui.session import Session
from qinspect.tui.structs import (
    GuestTarget,
    HostTarget,
    L2Model,
    StructKind,
    StructRef,
    TableModel,
    model_for,
    quoted,
    tree_colour_kind,
)
from qinspect.tui.views.base import View
from qinspect.tui.widgets.hexview import HexView
from qinspect.tui.widgets.table import EntryTable

MAX_CHILDREN = 4096


def _label(text: str, ref: StructRef, extra: str = "") -> Text:
    """A tree node's label, with a swatch of the colour of the structure `ref` names."""
    t = Text()
    t.append("■ ", Style(color=KIND_COLOURS.get(tree_colour_kind(ref), KIND_COLOURS[ColourKind.UNKNOWN])))
    t.append(text)  # display text (callers escape names from the file), and a Text: never markup
    if extra:
        t.append(f" {extra}", Style(color=DIM))
    return t


def _more(node: TreeNode[StructRef], total: int, how: str) -> None:
    """The leaf saying how many children past MAX_CHILDREN the tree leaves out, and how to reach them."""
    if total > MAX_CHILDREN:
        node.add_leaf(Text(f"… {total - MAX_CHILDREN} more ({how})", Style(color=DIM)))


def _same(a: StructRef, b: StructRef) -> bool:
    return (a.kind, a.index, a.offset, a.owner) == (b.kind, b.index, b.offset, b.owner)


class StructureTree(Tree[StructRef]):
    HELP = """
## Structures

The tree lists every on-disk structure. Moving the cursor shows the structure's
entries on the right and its bytes below, coloured by field.

- arrows / `jk` move, `enter` / `space` expand (L1 → L2 tables, refcount table → blocks,
  snapshots → their L1 tables, bitmaps → their tables)
- `tab` goes to the entry table
"""


class StructuresView(View):
    """The tree, the entry table, the decoded entry and the hex view."""

    VIEW_ID = "structures"
    TITLE = "Structures"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("H", "to_host", "Host cluster", key_display="H"),
    ]

    HELP = """
## Structures — entries

- arrows / `jk`, `PgUp`/`PgDn`, `Home`/`End` move in the entry table
- `enter` follows the entry: L1 → its L2 table, L2 entry → the guest map,
  refcount table → the block, refcount → the host layout, snapshot → its L1
- `H` goes to the host cluster the entry points at (the L2 table of an L1
  entry, the data of an L2 entry, the block of a refcount table entry)
- `backspace` goes back; `c` copies the raw entry, `e` exports the table as JSON
- the hex view below highlights the selected entry's bytes
- `/` finds text in the rows, `g` goes to an entry number
"""

    goto_prompt = "Go to entry number"
    find_prompt = "Find in this table (offset, value, name…)"

    DEFAULT_CSS = """
    StructuresView StructureTree { width: auto; min-width: 20; max-width: 30%; border-right: vkey $foreground 20%;
                                   overflow-x: hidden; }
    StructuresView #st-right { width: 1fr; }
    StructuresView #st-title { height: 1; padding: 0 1; text-style: bold; }
    StructuresView #st-detail { height: 2; padding: 0 1; color: $text-muted; }
    StructuresView HexView { height: 11; max-height: 35%; border-top: hkey $foreground 20%; }
    """

    def __init__(self, session: Session, *, id: str | None = None) -> None:
        super().__init__(session, id=id)
        self.model: TableModel | None = None
        self.ref: StructRef | None = None
        self._populated: set[int] = set()
        self._pending_select: StructRef | None = None

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield StructureTree(_label(self.session.name, StructRef(StructKind.HEADER)), id="st-tree")
            with Vertical(id="st-right"):
                yield Static("", id="st-title")
                yield EntryTable(id="st-table")
                yield Static("", id="st-detail")
                yield HexView(id="st-hex")

    @property
    def struct_tree(self) -> StructureTree:
        return self.query_one(StructureTree)

    @property
    def table(self) -> EntryTable:
        return self.query_one(EntryTable)

    def main_widget(self) -> Widget | None:
        return self.struct_tree

    def on_mount(self) -> None:
        self._build_tree()
        self.struct_tree.root.expand()
        self.show_ref(StructRef(StructKind.HEADER))

    # -- the tree ---------------------------------------------------------------------------------------
    def _build_tree(self) -> None:
        img = self.session.img
        h = img.header
        root = self.struct_tree.root
        root.data = StructRef(StructKind.HEADER)
        ref = StructRef(StructKind.HEADER)
        root.add_leaf(_label("Header", ref, f"{HEADER_V2_SIZE if h.version == 2 else h.header_length} B"), data=ref)
        ref = StructRef(StructKind.EXTENSIONS)
        exts = root.add(_label("Header extensions", ref, f"{len(h.extensions)}"), data=ref)
        for i, e in enumerate(h.extensions):
            ref = StructRef(StructKind.EXTENSIONS, row=i)
            exts.add_leaf(_label(e.name, ref, f"@{e.offset}"), data=ref)
        if h.backing_file_offset:
            ref = StructRef(StructKind.BACKING_NAME)
            root.add_leaf(_label("Backing file name", ref, quoted(h.backing_file)), data=ref)
        n_l2 = int(np.count_nonzero(img.l1_table & np.uint64(C.L1E_OFFSET_MASK)))
        ref = StructRef(StructKind.L1, offset=h.l1_table_offset)
        root.add(_label("L1 table", ref, f"{h.l1_size} → {n_l2} L2"), data=ref, allow_expand=n_l2 > 0)
        rt = img.refcount_table
        n_rb = int(np.count_nonzero(rt & np.uint64(C.REFT_OFFSET_MASK)))
        ref = StructRef(StructKind.REFCOUNT_TABLE, offset=h.refcount_table_offset)
        root.add(_label("Refcount table", ref, f"→ {n_rb} block{'s' if n_rb != 1 else ''}"), data=ref,
                 allow_expand=n_rb > 0)
        if img.snapshots:
            ref = StructRef(StructKind.SNAPSHOT_TABLE, offset=h.snapshots_offset)
            snaps = root.add(_label("Snapshot table", ref, f"{len(img.snapshots)}"), data=ref)
            # At most MAX_CHILDREN nodes (a hostile table lists 65,536 snapshots: a tree node each
            # would hold tens of MiB); the snapshot table's entry table lists them all, lazily.
            for i, sn in enumerate(img.snapshots[:MAX_CHILDREN]):
                ref = StructRef(StructKind.SNAPSHOT_L1, owner=i, offset=sn.l1_table_offset)
                snaps.add(_label(f"snapshot {for_terminal(sn.id_str)}", ref, quoted(sn.name)), data=ref)
            _more(snaps, len(img.snapshots), "enter on a row of the snapshot table")
        if h.bitmaps_ext is not None:
            ref = StructRef(StructKind.BITMAP_DIRECTORY, offset=h.bitmaps_ext.bitmap_directory_offset)
            bms = root.add(_label("Bitmap directory", ref, f"{len(img.bitmaps)}"), data=ref)
            for i, b in enumerate(img.bitmaps[:MAX_CHILDREN]):
                ref = StructRef(StructKind.BITMAP_TABLE, index=i, offset=b.bitmap_table_offset)
                bms.add_leaf(_label(f"bitmap {quoted(b.name)}", ref, f"{b.bitmap_table_size} entries"), data=ref)
            _more(bms, len(img.bitmaps), "enter on a row of the bitmap directory")
        if h.crypto_ext is not None:
            ref = StructRef(StructKind.LUKS, offset=h.crypto_ext.offset)
            root.add_leaf(_label("LUKS header", ref, fmt.size(h.crypto_ext.length)), data=ref)

    def _populate(self, node: TreeNode[StructRef]) -> None:
        """Add the children of a lazy node (L2 tables, refcount blocks) on first expansion."""
        if node.id in self._populated or node.data is None:
            return
        ref = node.data
        img = self.session.img
        if ref.kind in (StructKind.L1, StructKind.SNAPSHOT_L1):
            table = img.l1_table if ref.kind is StructKind.L1 else img.snapshot_l1_table(ref.owner, pad=True)
            offs = (table & np.uint64(C.L1E_OFFSET_MASK)).astype(np.int64)
            idx = np.flatnonzero(offs)
            for j in idx[:MAX_CHILDREN]:
                j = int(j)
                child = StructRef(StructKind.L2, index=j, offset=int(offs[j]), owner=ref.owner)
                node.add_leaf(_label(f"L2 table {j}", child, f"@{fmt.hexoff(int(offs[j]))}"), data=child)
            if len(idx) > MAX_CHILDREN:
                node.add_leaf(Text(f"… {len(idx) - MAX_CHILDREN} more (ctrl+p: go to L2 table N)", Style(color=DIM)))
        elif ref.kind is StructKind.REFCOUNT_TABLE:
            offs = (img.refcount_table & np.uint64(C.REFT_OFFSET_MASK)).astype(np.int64)
            idx = np.flatnonzero(offs)
            for i in idx[:MAX_CHILDREN]:
                i = int(i)
                child = StructRef(StructKind.REFCOUNT_BLOCK, index=i, offset=int(offs[i]))
                node.add_leaf(_label(f"Refcount block {i}", child, f"@{fmt.hexoff(int(offs[i]))}"), data=child)
            if len(idx) > MAX_CHILDREN:
                node.add_leaf(Text(f"… {len(idx) - MAX_CHILDREN} more", Style(color=DIM)))
        self._populated.add(node.id)

    def on_tree_node_expanded(self, event: Tree.NodeExpanded[StructRef]) -> None:
        event.stop()
        self._populate(event.node)

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted[StructRef]) -> None:
        event.stop()
        ref = event.node.data
        pending, self._pending_select = self._pending_select, None
        if not self.struct_tree.has_focus:  # moved by the program (a link from another view), not the user
            return
        if ref is None or (pending is not None and _same(ref, pending)):
            return
        if self.ref is not None and _same(ref, self.ref) and ref.row == self.ref.row:
            return
        self.show_ref(ref, select_in_tree=False)

    # -- the table and the hex view ----------------------------------------------------------------------
    def show_ref(self, ref: StructRef, select_in_tree: bool = True) -> None:
        """Show a structure (building its model) and select `ref.row` in its table."""
        try:
            model = model_for(self.session.img, ref)
        except (Qcow2Error, KeyError, IndexError, ValueError) as e:
            self.query_one("#st-title", Static).update(Text(f"cannot show this structure: {e}", Style(color=ERROR)))
            return
        self.ref = ref
        self.model = model
        title = Text(model.title or ref.kind, Style(bold=True, color=KIND_COLOURS.get(model.kind)))
        if model.start or model.length:
            title.append(f"  at {fmt.hexoff(model.start)}, {fmt.size(model.length)}", Style(color=DIM))
        if model.error:
            title.append(f"  ⚠ {model.error}", Style(color=ERROR))
        self.query_one("#st-title", Static).update(title)
        self.query_one(HexView).set_model(model)
        self.table.set_model(model, ref.row)
        if select_in_tree:
            self._select_in_tree(ref)

    def _select_in_tree(self, ref: StructRef) -> None:
        tree = self.struct_tree
        target = self._find_node(tree.root, ref)
        if target is None and ref.kind in (StructKind.L2, StructKind.REFCOUNT_BLOCK):
            parent_kind = (StructKind.REFCOUNT_TABLE if ref.kind is StructKind.REFCOUNT_BLOCK
                           else StructKind.L1 if ref.owner < 0 else StructKind.SNAPSHOT_L1)
            for node in self._walk(tree.root):
                d = node.data
                if d is not None and d.kind is parent_kind and (parent_kind is not StructKind.SNAPSHOT_L1
                                                                or d.owner == ref.owner):
                    self._populate(node)
                    node.expand()
                    target = self._find_node(node, ref)
                    break
        if target is not None:
            node = target
            parent = node.parent
            while parent is not None:
                parent.expand()
                parent = parent.parent
            self.call_after_refresh(self._move_tree_cursor, node)

    def _move_tree_cursor(self, node: TreeNode[StructRef]) -> None:
        if self.struct_tree.cursor_node is not node:
            self._pending_select = node.data
            self.struct_tree.move_cursor(node)

    def _walk(self, node: TreeNode[StructRef]) -> list[TreeNode[StructRef]]:
        out = [node]
        for c in node.children:
            out.extend(self._walk(c))
        return out

    def _find_node(self, start: TreeNode[StructRef], ref: StructRef) -> TreeNode[StructRef] | None:
        for node in self._walk(start):
            if node is self.struct_tree.root:
                continue
            d = node.data
            if d is not None and _same(d, ref):
                return node
        return None

    def on_entry_table_highlighted(self, event: EntryTable.Highlighted) -> None:
        event.stop()
        model = self.model
        if model is None or not len(model):
            self.query_one("#st-detail", Static).update("")
            self.query_one(HexView).set_highlight(None)
            return
        i = event.row
        if not 0 <= i < len(model):  # a highlight posted for the table shown before this one
            return
        self.query_one("#st-detail", Static).update(Text(model.detail(i), Style(color=DIM)))  # escaped by the model
        self.query_one(HexView).set_highlight(model.span(i))
        if isinstance(model, L2Model) and model.owner < 0 and self.has_focus_within:
            self.post_message(ShowGuest(model.guest(i), switch=False))

    def on_entry_table_activated(self, event: EntryTable.Activated) -> None:
        event.stop()
        if self.model is None:
            return
        target = self.model.target(event.row)
        if isinstance(target, StructRef):
            self.post_message(ShowStructure(target))  # through the screen: a link, remembered
        elif isinstance(target, GuestTarget):
            self.post_message(ShowGuest(target.offset))
        elif isinstance(target, HostTarget):
            self.post_message(ShowHost(target.offset))

    def host_of(self, row: int) -> int | None:
        """The host offset entry `row` points at (None when it points nowhere in the file)."""
        model = self.model
        if model is None or not len(model):
            return None
        if isinstance(model, L2Model):
            e = int(model.entries[row])
            if classify_cluster(e, model.fmt) == ClusterType.COMPRESSED:
                return parse_compressed(e, model.fmt).coffset
            off = e & C.L2E_OFFSET_MASK
            return off or None
        target = model.target(row)
        if isinstance(target, HostTarget):
            return target.offset
        if isinstance(target, StructRef) and target.offset:
            return target.offset
        return None

    def action_to_host(self) -> None:
        if self.model is None:
            return
        off = self.host_of(self.table.cursor)
        if off is None:
            self.notify("this entry points at no host cluster", severity="warning", timeout=3)
            return
        self.post_message(ShowHost(off))

    def place(self) -> Place:
        ref = self.ref
        if ref is None or self.model is None:
            return Place(self.VIEW_ID, self.TITLE)
        row = self.table.cursor
        ref = StructRef(ref.kind, ref.index, ref.offset, ref.owner, row)
        title = (self.model.title or ref.kind).split(" (")[0]
        return Place(self.VIEW_ID, f"{title} [{row}]", (ref,))

    def restore(self, place: Place) -> None:
        if place.state and isinstance(place.state[0], StructRef):
            self.show_ref(place.state[0])
            self.table.focus()

    def copy_value(self) -> tuple[str, str] | None:
        model = self.model
        if model is None or not len(model):
            return None
        row = self.table.cursor
        cells = model.row(row)
        raw = next((c for c, _colour in cells if len(c) == 16 and all(ch in "0123456789abcdef" for ch in c)), None)
        if raw is not None:
            return "raw entry", raw
        span = model.span(row)
        return ("entry offset", fmt.hexoff(span[0])) if span else None

    def export(self) -> dict[str, object]:
        model = self.model
        if model is None:
            return {"view": self.VIEW_ID}
        n = len(model)
        limit = 65536
        return {"view": self.VIEW_ID, "structure": model.title, "kind": model.kind, "offset": model.start,
                "length": model.length, "columns": [c for c, _w in model.columns],
                "rows": [[c for c, _colour in model.row(i)] for i in range(min(n, limit))],
                "rows-total": n, "selected": self.table.cursor}

    @property
    def has_focus_within(self) -> bool:
        focused = self.screen.focused
        return focused is not None and (focused is self or self in focused.ancestors)

    # -- go to / find -------------------------------------------------------------------------------------
    def goto(self, text: str) -> str | None:
        if self.model is None:
            return "no structure selected"
        try:
            n = int(fmt.parse_size(text))
        except ValueError as e:
            return str(e)
        if not 0 <= n < len(self.model):
            return f"this table has {len(self.model)} entries"
        self.table.move_to(n)
        self.table.focus()
        return None

    def find(self, text: str, forward: bool = True) -> str | None:
        if self.model is None or not len(self.model):
            return "no entries to search"
        hit = self.model.find(text, self.table.cursor)
        if hit is None:
            return f"'{text}' not found in {self.model.title or 'this table'}"
        self.table.move_to(hit)
        return None

    def show_l2_table(self, n: int) -> str | None:
        """Open the active L2 table of L1 index `n` (the palette's 'go to L2 table N')."""
        img = self.session.img
        if not 0 <= n < len(img.l1_table):
            return f"the L1 table has {len(img.l1_table)} entries"
        off = int(img.l1_table[n]) & C.L1E_OFFSET_MASK
        if not off:
            self.show_ref(StructRef(StructKind.L1, offset=img.header.l1_table_offset, row=n))
            return f"L1 entry {n} has no L2 table"
        self.show_ref(StructRef(StructKind.L2, index=n, offset=off))
        return None
