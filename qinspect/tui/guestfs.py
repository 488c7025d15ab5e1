"""The guest's filesystems in the TUI: partition bands, a "freed by the guest" state, volume bars.

One `GuestFs` per session runs `qinspect.guest.inspect_guest` and then builds the block → file
maps (`qinspect.guest.owners`) in a thread worker of the guest map, with progress on the bands
line. `FreedOverlay` wraps the guest map's grid source: a cell whose clusters are all reclaimable
(data the guest freed that this image still holds) gets the FREED code and colour; everything else
is the guest map's own. The hooks in the views are one line each (compose and inspector).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt
from rich.style import Style
from rich.text import Text
from textual.widget import Widget
from textual.widgets import Static

from qinspect.guest import inspect_guest
from qinspect.guest.disk import DiskReader
from qinspect.guest.model import GuestError, GuestView, VolumeKind
from qinspect.guest.owners import TSK_FILESYSTEMS, OwnerMap, build_owner_map
from qinspect.qcow2.errors import Qcow2Error
from qinspect.tui.guestmap import GuestMap
from qinspect.tui.session import Session
from qinspect.tui.widgets.guestvolumes import describe_offset


class _GuestFsListener(Protocol):
    """What the guest map view offers this module (it is not imported here: it imports this)."""

    def guest_fs_changed(self) -> None: ...

U8 = npt.NDArray[np.uint8]
FREED = 250  # a grid code outside the guest map's states
FREED_COLOUR = "#ffd75f"
FREED_NAME = "freed by the guest (still held)"
BAND_COLOURS = ("#5fafd7", "#87d787", "#d787d7", "#d7af5f", "#5fd7d7", "#af87ff")


class GuestFs:
    """The guest view of one session, computed once in a worker; thread-safe reads after `ready`."""

    def __init__(self, session: Session) -> None:
        self.path = session.img.path
        self._pool = session.pool  # an image of the session's pool: one parse of the metadata for all
        self.view: GuestView | None = None
        self.owners: dict[int, OwnerMap] = {}
        self.error: str | None = None
        self.status = "reading partitions and filesystems…"
        self.ready = False
        self.owners_ready = False
        self.started = False
        self._lock = threading.Lock()
        self._freed: U8 | None = None  # per guest cluster: 1 when reclaimable

    def run(self, cluster_size: int, n_clusters: int, progress: Callable[[str], None],
            cancelled: Callable[[], bool]) -> None:
        """Worker body: the guest view, then the file maps (each step reports through `progress`)."""
        try:
            with self._pool.borrow() as img:
                view = inspect_guest(img, cancelled=cancelled)
                # one byte per guest cluster, only when the guest freed something (16 MiB on 1 TiB)
                pairs = list(view.reclaimable.pairs())
                freed = np.zeros(n_clusters, dtype=np.uint8) if pairs else None
                for s, e in pairs:
                    assert freed is not None
                    freed[s // cluster_size : min(n_clusters, e // cluster_size)] = 1
                with self._lock:
                    self.view, self._freed, self.ready = view, freed, True
                    self.status = ""
                progress("filesystems read")
                disk = DiskReader(img)
                for k, v in enumerate(view.volumes):
                    if cancelled() or v.filesystem not in TSK_FILESYSTEMS or not v.segments:
                        continue
                    self.status = f"finding the files of {v.label}…"
                    progress(self.status)

                    def step(done: int, total: int, label: str = v.label) -> None:
                        self.status = f"finding the files of {label}: {done} files"
                        progress(self.status)

                    try:
                        om = build_owner_map(disk, v, step, cancelled)
                    except GuestError:
                        continue
                    with self._lock:
                        self.owners[k] = om
        except (Qcow2Error, GuestError, OSError, MemoryError) as e:
            self.error = str(e)
        self.owners_ready = True
        self.status = ""
        progress("")

    def freed(self, c0: int, c1: int) -> U8 | None:
        f = self._freed
        return None if f is None else f[c0:c1]

    def describe(self, offset: int) -> str | None:
        view = self.view
        if view is None or not self.has_content:
            return None
        with self._lock:
            owners = dict(self.owners)
        text = describe_offset(view, offset, owners)
        if not self.owners_ready:
            text += " (file names: still reading)"
        return text

    @property
    def has_freed(self) -> bool:
        return self.view is not None and self.view.reclaimable_bytes > 0

    @property
    def has_content(self) -> bool:
        v = self.view
        return v is not None and any(x.filesystem is not None or x.kind != VolumeKind.WHOLE_DISK for x in v.volumes)


_STATES: weakref.WeakKeyDictionary[Session, GuestFs] = weakref.WeakKeyDictionary()


def guest_fs(session: Session) -> GuestFs:
    """The session's `GuestFs` (one per session)."""
    st = _STATES.get(session)
    if st is None:
        st = _STATES[session] = GuestFs(session)
    return st


class FreedOverlay:
    """The guest map as a grid source, with reclaimable cells shown as FREED."""

    def __init__(self, gm: GuestMap, fs: GuestFs) -> None:
        self.gm = gm
        self.fs = fs

    def __getattr__(self, name: str) -> object:
        return getattr(self.gm, name)

    @property
    def unit_bytes(self) -> int:
        return int(self.gm.unit_bytes)

    @property
    def n_units(self) -> int:
        return int(self.gm.n_units)

    @property
    def version(self) -> int:
        return int(self.gm.version) * 2 + (1 if self.fs.ready else 0)

    @property
    def max_zoom(self) -> int:
        return int(self.gm.max_zoom)

    def n_cells(self, zoom: int) -> int:
        return int(self.gm.n_cells(zoom))

    def cells(self, zoom: int, c0: int, c1: int) -> tuple[U8, U8, list[int]]:
        code, glyph, missing = self.gm.cells(zoom, c0, c1)
        cpc = 1 << zoom
        n = len(code)
        f = self.fs.freed(c0 * cpc, (c0 + n) * cpc)
        if f is None or not n or not f.any():
            return code, glyph, missing
        if len(f) < n * cpc:
            f = np.r_[f, np.zeros(n * cpc - len(f), np.uint8)]
        share = f.reshape(n, cpc).sum(axis=1)
        code = code.copy()
        code[share * 2 > cpc] = FREED  # a cell mostly freed by the guest
        return code, glyph, missing

    def colour(self, code: int) -> str:
        return FREED_COLOUR if code == FREED else str(self.gm.colour(code))


def render_bands(view: GuestView | None, status: str, cursor_offset: int | None, width: int) -> Text:
    """One line: the volumes along the disk, proportionally, the cursor's volume highlighted."""
    t = Text(no_wrap=True, overflow="ellipsis")
    if view is None:
        t.append(status or "guest filesystems: not read", Style(color="grey50"))
        return t
    width = max(20, width)
    size = max(1, view.virtual_size)
    cells = [" "] * width
    styles: list[Style] = [Style(color="grey30")] * width
    vols = [v for v in view.volumes if v.kind in (VolumeKind.PARTITION, VolumeKind.LOGICAL, VolumeKind.WHOLE_DISK)]
    here = view.volume_at(cursor_offset) if cursor_offset is not None else None
    for k, v in enumerate(vols):
        a = v.start * width // size
        b = max(a + 1, (v.start + v.length) * width // size)
        label = f"{v.index if v.index else 'disk'}:{v.filesystem.value if v.filesystem else '?'}"
        colour = BAND_COLOURS[k % len(BAND_COLOURS)]
        for i in range(a, min(b, width)):
            j = i - a
            cells[i] = label[j] if j < len(label) and b - a > len(label) else "▁" if b - a > len(label) else "▌"
            styles[i] = Style(color="#000000", bgcolor=colour, bold=here is v)
    for ch, st in zip(cells, styles, strict=True):
        t.append(ch, st)
    if status:
        t.append(f"  {status}", Style(color="grey50"))
    return t


class PartitionBands(Static):
    """The guest map's band line; hidden until there is a partition table or a filesystem."""

    DEFAULT_CSS = "PartitionBands { height: 1; padding: 0 1; display: none; }"

    def show_state(self, fs: GuestFs, cursor_offset: int | None) -> None:
        self.display = fs.has_content or bool(fs.status and fs.view is not None)
        if self.display:
            self.update(render_bands(fs.view, fs.status, cursor_offset, self.size.width - 2 if self.size.width else 80))


def show_known(host: Widget, session: Session) -> None:
    """A view mounted after the worker ran: show what is known already."""
    from qinspect.tui.widgets.guestvolumes import GuestVolumes

    fs = guest_fs(session)
    if fs.view is not None:
        for vols in host.query(GuestVolumes):
            vols.show(fs.view)
    for bands in host.query(PartitionBands):
        bands.show_state(fs, None)


def start(host: Widget, session: Session) -> None:
    """Start the session's guest-filesystem worker on `host` (once), refreshing the views as it goes."""
    fs = guest_fs(session)
    if fs.started:
        show_known(host, session)
        return
    fs.started = True
    gm = session.guest
    app = host.app

    def refresh() -> None:
        from qinspect.tui.widgets.grid import ClusterGrid
        from qinspect.tui.widgets.guestvolumes import GuestVolumes

        screen = host.screen
        for bands in screen.query(PartitionBands):
            bands.show_state(fs, None)
        if fs.view is not None:
            for vols in screen.query(GuestVolumes):
                vols.show(fs.view)
        for grid in screen.query(ClusterGrid):
            if isinstance(grid.source, FreedOverlay):
                grid.data_changed()
        for view in screen.query("GuestMapView"):
            cast("_GuestFsListener", view).guest_fs_changed()

    last = [0.0]

    def progress(_msg: str) -> None:
        import time

        now = time.monotonic()
        if _msg and now - last[0] < 0.2:
            return
        last[0] = now
        with contextlib.suppress(RuntimeError):
            app.call_from_thread(refresh)

    def work() -> None:
        from textual.worker import get_current_worker

        w = get_current_worker()
        fs.run(gm.cluster_size, gm.n_clusters, progress, lambda: w.is_cancelled)

    host.run_worker(work, thread=True, group="guestfs", exit_on_error=False)


def legend_item() -> tuple[str, str]:
    return FREED_COLOUR, FREED_NAME
