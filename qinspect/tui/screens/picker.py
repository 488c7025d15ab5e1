"""The picker: a dashboard of the qcow2 images below a directory (ncdu for a folder of images).

It fills as it scans (a thread walks the tree and hands over rows in batches, so the first rows
show at once on a tree of thousands of files), lists each image's virtual size, file size, disk
usage and backing file, groups backing chains (an overlay under its backing file), sorts by any
column (`s` cycles, `r` reverses) and, once the walk is done, runs the quick diagnosis of each
image in the background and shows its worst finding. It dismisses with the chosen path (the app
opens it), so it imports nothing of the app.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static
from textual.worker import get_current_worker

from qinspect.qcow2.errors import Problem, Qcow2Error, Severity
from qinspect.qcow2.fields import HEADER_V2_SIZE
from qinspect.qcow2.header import read_header
from qinspect.qcow2.hostfile import HostFile
from qinspect.qcow2.image import resolve_backing_path
from qinspect.termtext import for_terminal
from qinspect.tui.fmt import display_name
from qinspect.tui.palette import DIM, SEVERITY_COLOURS, severity_colour, severity_order, severity_word
from qinspect.tui.widgets.inputs import SteadyInput
from qinspect.units import format_size

MAGIC = b"QFI\xfb"
SKIP_DIRS = {".git", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".mypy_cache", ".ruff_cache",
             "proc", "sys", "dev"}
MAX_DEPTH = 6
MAX_FILES = 200_000
MAX_RESULTS = 5_000
BATCH_SECONDS = 0.1  # rows are handed to the screen at most this often while the walk goes on


@dataclass
class Entry:
    """One qcow2 file found: what the dashboard shows of it."""

    path: str  # relative to the root
    file_size: int
    disk_usage: int
    virtual_size: int = 0
    backing: str | None = None  # as stored in the header (escaped when shown)
    backing_path: str | None = None  # resolved, relative to the root when inside it
    error: str | None = None
    diagnosed: bool = False
    worst: Severity | None = None  # severity of the worst finding; None: none (or not diagnosed yet)
    worst_title: str = ""
    depth: int = 0  # in the chain grouping
    children: list[Entry] = field(default_factory=list)


def probe(root: str, rel: str) -> Entry | None:
    """The entry of one file when it is a qcow2 image (by magic), else None. Reads the header only."""
    path = os.path.join(root, rel)
    try:
        st = os.stat(path)
        if not os.path.isfile(path) or st.st_size < HEADER_V2_SIZE:
            return None
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                return None
    except OSError:
        return None
    e = Entry(rel, st.st_size, st.st_blocks * 512)
    try:
        with HostFile(path) as hf:
            h = read_header(hf, list[Problem]())
        e.virtual_size = h.size
        e.backing = h.backing_file
        if h.backing_file:
            bp = resolve_backing_path(path, h.backing_file)
            r = os.path.relpath(bp, root) if not os.path.isabs(h.backing_file) or bp.startswith(root) else bp
            e.backing_path = os.path.normpath(r)
    except Qcow2Error as err:
        e.error = err.message
    return e


def walk(root: str) -> list[str]:
    """Relative paths of the candidate files below `root`, in walk order; bounded depth and count."""
    out: list[str] = []
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = dirpath[len(root):].count(os.sep)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and depth < MAX_DEPTH)
        for name in sorted(filenames):
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
            if len(out) >= MAX_FILES:
                return out
    return out


def find_qcow2(root: str) -> list[tuple[str, int]]:
    """(relative path, size) of every qcow2 file below `root`, sorted."""
    found = [e for e in (probe(os.path.abspath(root), rel) for rel in walk(root)) if e is not None]
    return sorted((e.path, e.file_size) for e in found[:MAX_RESULTS])


class SortKey(Enum):
    """What the table is ordered by (`s` cycles through them)."""

    CHAIN = "chain"
    NAME = "name"
    VIRTUAL = "virtual"
    FILE = "file"
    DISK = "disk"
    FINDING = "finding"




def chain_order(entries: list[Entry]) -> list[Entry]:
    """Entries with each overlay right under its backing file (depth set), roots sorted by path."""
    by_path = {e.path: e for e in entries}
    for e in entries:
        e.children = []
        e.depth = 0
    roots = []
    for e in entries:
        parent = by_path.get(e.backing_path or "")
        if parent is not None and parent is not e:
            parent.children.append(e)
        else:
            roots.append(e)
    out: list[Entry] = []
    seen: set[int] = set()

    def visit(e: Entry, depth: int) -> None:
        if id(e) in seen:
            return
        seen.add(id(e))
        e.depth = depth
        out.append(e)
        for c in sorted(e.children, key=lambda x: x.path):
            visit(c, depth + 1)

    for r in sorted(roots, key=lambda x: x.path):
        visit(r, 0)
    for e in entries:  # loops of backing files: still listed
        if id(e) not in seen:
            visit(e, 0)
    return out


def sort_entries(entries: list[Entry], key: SortKey, reverse: bool) -> list[Entry]:
    if key is SortKey.CHAIN:
        out = chain_order(entries)
        return out[::-1] if reverse else out
    for e in entries:
        e.depth = 0
    keys = {
        SortKey.NAME: lambda e: e.path,
        SortKey.VIRTUAL: lambda e: -e.virtual_size,
        SortKey.FILE: lambda e: -e.file_size,
        SortKey.DISK: lambda e: -e.disk_usage,
        SortKey.FINDING: lambda e: (severity_order(e.worst) if e.diagnosed else len(Severity) + 1, e.path),
    }
    return sorted(entries, key=keys[key], reverse=reverse)


COLUMNS = (("image", SortKey.NAME), ("virtual", SortKey.VIRTUAL), ("file", SortKey.FILE),
           ("disk", SortKey.DISK), ("backing file", SortKey.CHAIN), ("worst finding", SortKey.FINDING))


class PickerScreen(Screen[str | None]):
    """The dashboard: arrows choose, enter opens, `/` filters, `s` sorts, `r` reverses, esc quits."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "leave", "Back/Quit"),
        Binding("s", "sort", "Sort"),
        Binding("r", "reverse", "Reverse", show=False),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("q", "leave", "Quit", show=False),
    ]

    DEFAULT_CSS = """
    PickerScreen #pk-title { height: 1; padding: 0 1; background: $panel; }
    PickerScreen Input { margin: 0 1; display: none; }
    PickerScreen Input.-shown { display: block; }
    PickerScreen DataTable { height: 1fr; margin: 0 1; }
    PickerScreen #pk-status { height: 1; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, root: str = ".") -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.entries: list[Entry] = []
        self.sort_key = SortKey.CHAIN
        self.reverse = False
        self.scanning = True
        self.scanned_files = 0
        self.diagnosed = 0

    @property
    def files(self) -> list[tuple[str, int]]:
        """(relative path, file size) of the images found so far."""
        return [(e.path, e.file_size) for e in self.entries]

    def compose(self) -> ComposeResult:
        t = Text()
        t.append(" qinspect ", Style(bold=True, reverse=True))
        t.append("  images below ")
        t.append(for_terminal(display_name(self.root) or "."), Style(bold=True))
        yield Static(t, id="pk-title")
        yield SteadyInput(placeholder="filter (part of a path); enter opens, esc back to the list")
        table: DataTable[Text | str] = DataTable(id="pk-list", cursor_type="row", zebra_stripes=False)
        yield table
        yield Static("searching for qcow2 files…", id="pk-status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.table
        for label, _key in COLUMNS:
            table.add_column(label, key=label)
        table.focus()
        self.scan()

    @property
    def table(self) -> DataTable[Text | str]:
        return self.query_one(DataTable)

    # -- scanning (a thread) -----------------------------------------------------------------------
    @work(thread=True, exit_on_error=False, group="picker-scan")
    def scan(self) -> None:
        worker = get_current_worker()
        batch: list[Entry] = []
        last = time.monotonic()
        found = 0
        seen = 0
        root = self.root
        for dirpath, dirnames, filenames in os.walk(root):
            depth = dirpath[len(root):].count(os.sep)
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in SKIP_DIRS and not d.startswith(".") and depth < MAX_DEPTH)
            for name in sorted(filenames):
                if worker.is_cancelled:
                    return
                seen += 1
                if seen > MAX_FILES or found >= MAX_RESULTS:
                    break
                e = probe(root, os.path.relpath(os.path.join(dirpath, name), root))
                if e is not None:
                    batch.append(e)
                    found += 1
                now = time.monotonic()
                if batch and now - last >= BATCH_SECONDS:
                    self.app.call_from_thread(self._found, batch, seen, False)
                    batch, last = [], now
        self.app.call_from_thread(self._found, batch, seen, True)
        self.diagnose_all(worker)

    def diagnose_all(self, worker: object) -> None:
        """The quick diagnosis of each image, one after the other (still in the scan thread)."""
        from qinspect.analysis.diagnose import diagnose
        from qinspect.qcow2.image import open_image

        for e in list(self.entries):
            if getattr(worker, "is_cancelled", False):
                return
            worst: Severity | None
            if e.error is not None:
                worst, title = Severity.ERROR, e.error
            else:
                try:
                    with open_image(os.path.join(self.root, e.path)) as img:
                        d = diagnose(img, deep=False)
                except Qcow2Error as err:
                    worst, title = Severity.ERROR, err.message
                except (OSError, MemoryError, ValueError) as err:
                    worst, title = Severity.ERROR, str(err)
                else:
                    worst = d.findings[0].severity if d.findings else None
                    title = d.findings[0].title if d.findings else "nothing to report"
            self.app.call_from_thread(self._diagnosed, e, worst, title)

    def _found(self, batch: list[Entry], seen: int, done: bool) -> None:
        self.entries.extend(batch)
        self.scanned_files = seen
        if done:
            self.scanning = False
            self._fill()  # chains can be grouped only once every file is known
        else:
            table = self.table
            needle = self._needle()
            for e in batch:
                if needle in e.path.lower():
                    table.add_row(*self._cells(e), key=e.path)
            if table.row_count and table.cursor_row < 0:
                table.move_cursor(row=0)
        self._status()

    def _diagnosed(self, e: Entry, worst: Severity | None, title: str) -> None:
        e.diagnosed, e.worst, e.worst_title = True, worst, title
        self.diagnosed += 1
        with contextlib.suppress(Exception):  # the row may be filtered out
            self.table.update_cell(e.path, "worst finding", self._worst_cell(e), update_width=True)
        self._status()

    # -- the table ---------------------------------------------------------------------------------
    def _needle(self) -> str:
        return self.query_one(Input).value.lower()

    @staticmethod
    def _worst_cell(e: Entry) -> Text:
        if not e.diagnosed:
            return Text("…", Style(color=DIM))
        t = Text(severity_word(e.worst), Style(color=severity_colour(e.worst), bold=True))
        t.append(" " + for_terminal(e.worst_title)[:60], Style(color=DIM))
        return t

    def _cells(self, e: Entry) -> list[Text | str]:
        name = Text(("  " * (e.depth - 1) + "└ ") if e.depth else "")
        name.append(for_terminal(e.path))
        if e.error:
            name.append(" ⚠", Style(color=SEVERITY_COLOURS[Severity.ERROR]))
        backing = Text(for_terminal(e.backing) if e.backing else "-", Style(color=DIM if not e.backing else None))
        return [name, Text(format_size(e.virtual_size), justify="right"),
                Text(format_size(e.file_size), justify="right"), Text(format_size(e.disk_usage), justify="right"),
                backing, self._worst_cell(e)]

    def _fill(self) -> None:
        table = self.table
        keep = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value if table.row_count else None
        table.clear()
        needle = self._needle()
        rows = [e for e in sort_entries(list(self.entries), self.sort_key, self.reverse) if needle in e.path.lower()]
        for e in rows:
            table.add_row(*self._cells(e), key=e.path)
        if rows:
            idx = next((i for i, e in enumerate(rows) if e.path == keep), 0)
            table.move_cursor(row=idx)
        self._status()

    def _status(self) -> None:
        n = self.table.row_count
        total = len(self.entries)
        if self.scanning:
            text = f"scanning… {self.scanned_files:,} files looked at, {total} qcow2 images so far"
        elif not total:
            text = "no qcow2 files below this directory"
        else:
            text = f"{n} of {total} qcow2 images"
            if self.diagnosed < total:
                text += f" · diagnosing {self.diagnosed}/{total}"
        text += f" · sorted by {self.sort_key.value}{' (reversed)' if self.reverse else ''}"
        self.query_one("#pk-status", Static).update(text)

    # -- actions -----------------------------------------------------------------------------------
    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is not None:
            self.dismiss(os.path.join(self.root, key))

    def on_input_changed(self, event: Input.Changed) -> None:
        self._fill()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        table = self.table
        if table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            if key is not None:
                self.dismiss(os.path.join(self.root, key))

    def action_filter(self) -> None:
        inp = self.query_one(Input)
        inp.add_class("-shown")
        inp.focus()

    def action_sort(self) -> None:
        order = list(SortKey)
        self.sort_key = order[(order.index(self.sort_key) + 1) % len(order)]
        self._fill()

    def action_reverse(self) -> None:
        self.reverse = not self.reverse
        self._fill()

    def action_leave(self) -> None:
        inp = self.query_one(Input)
        if inp.has_focus:
            self.table.focus()
            if not inp.value:
                inp.remove_class("-shown")
            return
        self.workers.cancel_group(self, "picker-scan")
        self.dismiss(None)
