"""One open image and everything computed about it so far (no Textual here).

An image is opened in two steps: its metadata (`ImageMeta`: header, extensions, snapshots, LUKS,
backing chain; no numpy) when the session is made, which is all the first frame shows, and its
tables (`load()`: L1 and refcount tables, the guest map) once the first frame is on screen, or
as soon as anything asks for `img`, `layers` or `guest`.

The main thread uses `img` (lookups for the inspector, tables for the Structures view); every
scan runs in a worker thread with an image of its own from `pool`. Results land here: the guest
map fills in table by table, the other analyses are set when they finish (or stay None when
cancelled).

The analyses are imported when a scan first needs them (not at start-up: the first frame must not
wait for numpy-heavy modules it does not draw), by ordinary imports of their typed functions: a
`TypeError` inside an analysis is a bug that surfaces, never a reason to call it another way.

The file is identified when opened (device, inode, size, mtime). Every image a worker borrows is
checked against that identity, and `changed()` says whether the file was replaced or modified
since, so that results from two different files are never mixed on one screen.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, cast

from qinspect.analysis.progress import CancelledFn, ProgressFn
from qinspect.qcow2.errors import Problem, Qcow2Error
from qinspect.qcow2.hostfile import FileIdentity, InUse
from qinspect.qcow2.meta import ImageMeta, SharedMetadata
from qinspect.termtext import for_terminal
from qinspect.tui.fmt import display_name
from qinspect.tui.pool import ImagePool

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from qinspect.analysis.check import CheckResult
    from qinspect.analysis.diagnose import Diagnosis
    from qinspect.analysis.layout import Layout
    from qinspect.analysis.space import Space
    from qinspect.qcow2.image import Image, Layer
    from qinspect.tui.guestmap import GuestMap

# Clusters classified per worker step of the guest-map scan (a few L2 tables at a time): small
# enough that one step holds the interpreter for a few milliseconds, so keys stay responsive.
SCAN_STEP_CLUSTERS = 1 << 16
# Tables looked at, at most, to find the next one still unknown (past runs of known tables).
SKIP_AHEAD = 1 << 16


class Step(StrEnum):
    """The scan steps, in the order they run."""

    GUEST = "guest"
    LAYOUT = "layout"
    DIAGNOSE = "diagnose"
    CHECK = "check"
    SPACE = "space"

    @property
    def label(self) -> str:
        return _STEP_LABELS[self]


_STEP_LABELS = {Step.GUEST: "Guest map", Step.LAYOUT: "Host layout", Step.CHECK: "Refcount check",
                Step.DIAGNOSE: "Diagnose", Step.SPACE: "Space"}


class FileReplaced(Qcow2Error):
    """The path names a different file than the one this session opened."""


@dataclass
class LayerInfo:
    """One member of the backing chain, as the Overview and Chain views list it."""

    depth: int
    name: str
    format: str
    virtual_size: int
    file_size: int
    cluster_size: int | None
    disk_usage: int = 0


class CheckedPool(ImagePool):
    """The worker pool, refusing to hand out an image of a file other than the session's."""

    def __init__(self, path: str, identity: FileIdentity, metadata: SharedMetadata | None = None) -> None:
        super().__init__(path, metadata)
        self.identity = identity

    def open(self) -> Image:
        img = super().open()
        if not img.identity.same_file(self.identity):
            img.close()
            raise FileReplaced("the file was replaced by another file since it was opened (r or R reopens it)",
                               path=self.path)
        return img


class Session:
    """The open image, its worker pool and the analyses' results."""

    def __init__(self, path: str, name: str | None = None, *, load: bool = True) -> None:
        self.path = path
        self.name = for_terminal(name or display_name(path))
        # The metadata (header, extensions, snapshots, LUKS, backing chain) is read now: it is what
        # the first frame shows, and what makes a file that is not a usable image fail here. The
        # tables (and numpy) come with `load()`, after the first frame unless `load`.
        self._meta: ImageMeta | None = ImageMeta(path)
        self.identity = self._meta.identity
        # Every image of the session (the main thread's, the workers') shares this one parse.
        self.pool = CheckedPool(path, self.identity, self._meta.shared_metadata())
        meta_layers, chain_error = self._meta.open_chain()
        self._depth = len(meta_layers)
        self.chain_error = self.clean(str(chain_error)) if chain_error is not None else None
        self._img: Image | None = None
        self._layers: list[Layer] = []
        self._guest: GuestMap | None = None
        if load:
            try:
                self.load()
            except BaseException:
                self.pool.close()
                self._meta.close()
                raise
        self.layout: Layout | None = None
        self.check: CheckResult | None = None
        self.diagnosis: Diagnosis | None = None
        self.space: Space | None = None
        self.errors: dict[Step, str] = {}
        self.cancelled: set[Step] = set()
        self.scanning = False  # set by the screen that runs the scans
        # Following a live image (tui/follow.py): the file as last seen, where the round-robin
        # re-read of L2 tables is, clusters newly allocated, and images replaced by fresher ones.
        self.follow_seen: FileIdentity | None = None
        self.follow_cursor = 0
        self.fresh_clusters: set[int] = set()
        # host clusters in use (any owner but free / past the end) when the first change was seen
        self.follow_host_base: npt.NDArray[np.bool_] | None = None
        self._retired: list[Image] = []

    # -- the image's tables, opened after the first frame -------------------------------------------
    def load(self) -> None:
        """Open the image with its tables, its backing chain and the guest map (imports numpy).
        Raises `Qcow2Error` (or `OSError`) when they cannot be read; a no-op once loaded."""
        if self._img is not None:
            return
        from qinspect.tui.guestmap import GuestMap

        img = self.pool.open()  # the same file as the metadata's (refused if replaced since)
        try:
            layers, chain_error = img.open_chain()
            backing_size = max((layer.virtual_size for layer in layers[1:]), default=0)
            guest = GuestMap(img, backing_size)
        except BaseException:
            img.close()
            raise
        self._img, self._layers, self._guest = img, layers, guest
        self._depth = len(layers)
        self.chain_error = self.clean(str(chain_error)) if chain_error is not None else None
        if self.chain_error:
            guest.backing_error = self.chain_error
        if self._meta is not None:
            self._meta.close()
            self._meta = None

    @property
    def loaded(self) -> bool:
        return self._img is not None

    @property
    def img(self) -> Image:
        """The image with its tables (opened now if it was not)."""
        self.load()
        assert self._img is not None
        return self._img

    @img.setter
    def img(self, img: Image) -> None:
        self.load()
        self._img = img

    @property
    def layers(self) -> list[Layer]:
        self.load()
        return self._layers

    @property
    def guest(self) -> GuestMap:
        self.load()
        assert self._guest is not None
        return self._guest

    @guest.setter
    def guest(self, guest: GuestMap) -> None:
        self.load()
        self._guest = guest

    @property
    def meta(self) -> ImageMeta:
        """The image's metadata (header, file, LUKS): what the first frame shows, before `load()`."""
        return self._img if self._img is not None else cast(ImageMeta, self._meta)

    @property
    def depth(self) -> int:
        """Layers in the backing chain that can be opened, this image included."""
        return self._depth

    def clean(self, text: str, multiline: bool = False) -> str:
        """`text` with this image's path shown as on screen (no absolute, machine-specific paths),
        escaped for the terminal; with `multiline` its line breaks stay (each line is escaped)."""
        if not text:
            return text
        if multiline:
            return "\n".join(self.clean(line) for line in text.split("\n"))
        path = self.path
        for p in {shlex.quote(path), path, os.path.abspath(path)}:
            text = text.replace(p, self.name)
        d = os.path.dirname(os.path.abspath(path))
        if d and d != "/":
            text = text.replace(d + os.sep, "")
        return for_terminal(text)

    def retire(self, img: Image) -> None:
        """An image replaced by a fresher one; views may still hold tables of it for a while."""
        self._retired.append(img)
        while len(self._retired) > 2:
            self._retired.pop(0).close()

    def close(self) -> None:
        self.pool.close()
        if self._img is not None:
            self._img.close()
        if self._meta is not None:
            self._meta.close()
        for img in self._retired:
            img.close()
        self._retired.clear()

    # -- what the image is ---------------------------------------------------------------------------
    @property
    def in_use(self) -> InUse:
        """Whether a running QEMU holds the image's locks (asked now; never takes a lock)."""
        return self.meta.file.lock_state()

    def changed(self) -> str | None:
        """Why the file on disk is no longer what was opened (replaced, resized, modified), or None."""
        now = FileIdentity.of_path(self.path)
        if now is None:
            return "the file was removed or renamed since it was opened"
        why = now.change_since(self.identity)
        return None if why is None else f"the file was {why} since it was opened"

    def layer_infos(self) -> list[LayerInfo]:
        from qinspect.qcow2.image import Image, RawLayer

        out = []
        for depth, layer in enumerate(self.layers):
            if depth == 0:
                name = self.name
            else:
                parent = self.layers[depth - 1]
                stored = parent.header.backing_file if isinstance(parent, Image) else None
                name = for_terminal(stored or display_name(layer.path))
            cs = layer.cluster_size if isinstance(layer, Image) else None
            fsize = layer.file.size if isinstance(layer, Image | RawLayer) else 0
            usage = layer.file.allocated_size if isinstance(layer, Image | RawLayer) else 0
            out.append(LayerInfo(depth, name, layer.format, layer.virtual_size, fsize, cs, usage))
        return out

    def layer_names(self) -> list[str]:
        """The file name of every layer, top first (as legends name the backing layers)."""
        return [os.path.basename(li.name) or li.name for li in self.layer_infos()]

    @property
    def problems(self) -> list[Problem]:
        return self.img.problems

    def layer(self, depth: int) -> Layer | None:
        return self.layers[depth] if 0 <= depth < len(self.layers) else None

    # -- scans (run in worker threads) --------------------------------------------------------------------
    def scan_guest(self, progress: ProgressFn, cancelled: CancelledFn, first: tuple[int, int] | None = None) -> None:
        """Classify every L2 table not yet known; tables [first) before the others."""
        import numpy as np

        gm = self.guest
        step = max(1, SCAN_STEP_CLUSTERS // gm.l2_size)
        order: list[tuple[int, int]] = []
        if first is not None:
            order.append(first)
        order.append((0, gm.n_dense))  # past the dense range everything is known already
        total = gm.n_dense
        # A running count: summing the whole `scanned` array per step is quadratic in the number of
        # L2 tables (4 Mi of them for a hostile or huge virtual size).
        done = int(gm.scanned[:total].sum())
        with self.pool.borrow() as img:
            for lo, hi in order:
                t = lo
                while t < min(hi, gm.n_dense):
                    if cancelled():
                        return
                    end = min(hi, t + step)
                    todo = gm.unscanned(t, end)
                    if todo:
                        before = int(gm.scanned[t:end].sum())
                        a, b = todo[0], todo[-1] + 1
                        gm.compute(img, a, b)
                        done += int(gm.scanned[t:end].sum()) - before
                    t += step
                    if not todo:  # known already (tables sharing an L2 table scanned before): skip them
                        ahead = ~gm.scanned[t : min(hi, gm.n_dense, t + SKIP_AHEAD)]
                        t += int(np.argmax(ahead)) if ahead.any() else len(ahead)
                    progress(done, total)
                    time.sleep(0)  # let the main thread take the interpreter between two steps
        progress(total, total)

    def load_tables(self, tables: list[int], cancelled: CancelledFn) -> None:
        """Compute the given tables (the visible region) now, in runs of adjacent tables."""
        gm = self.guest
        todo = sorted(set(tables))
        with self.pool.borrow() as img:
            k = 0
            while k < len(todo):
                if cancelled():
                    return
                m = k + 1
                while m < len(todo) and todo[m] == todo[m - 1] + 1 and m - k < 64:
                    m += 1
                if gm.chunk(todo[k]) is None:
                    gm.compute(img, todo[k], todo[m - 1] + 1)
                k = m

    def run_layout(self, progress: ProgressFn, cancelled: CancelledFn) -> Layout:
        """The host layout and check's result from one refcount walk (each L2 table read once):
        with the check set here, the check step that follows has nothing left to do."""
        from qinspect.analysis.walks import check_and_layout

        with self.pool.borrow() as img:
            check, layout = check_and_layout(img, progress, cancelled)
        self.check, self.layout = compact_check(check), layout
        return self.layout

    def run_check(self, progress: ProgressFn, cancelled: CancelledFn) -> CheckResult:
        from qinspect.analysis.check import check_image

        with self.pool.borrow() as img:
            self.check = compact_check(check_image(img, progress, cancelled))
        return self.check

    def run_diagnose(self, progress: ProgressFn, cancelled: CancelledFn) -> Diagnosis:
        from qinspect.analysis.diagnose import diagnose

        with self.pool.borrow() as img:
            self.diagnosis = diagnose(img, deep=False, progress=progress, cancelled=cancelled, layout=self.layout)
        self.space = self.diagnosis.space
        if self.layout is None:
            self.layout = self.diagnosis.layout
        return self.diagnosis

    def run_space(self) -> Space:
        from qinspect.analysis.space import compute_space

        with self.pool.borrow() as img:
            self.space = compute_space(img, layout=self.layout)
        return self.space

    def run(self, step: Step, progress: ProgressFn, cancelled: CancelledFn) -> None:
        """Run one scan step (in a worker thread)."""
        if step is Step.GUEST:
            self.scan_guest(progress, cancelled)
        elif step is Step.LAYOUT:
            self.run_layout(progress, cancelled)
        elif step is Step.CHECK:
            self.run_check(progress, cancelled)
        elif step is Step.DIAGNOSE:
            self.run_diagnose(progress, cancelled)
        else:
            self.run_space()

    def pending_steps(self) -> list[Step]:
        """The steps whose results are not there yet, in the order they run."""
        done = {Step.GUEST: self.guest.complete, Step.LAYOUT: self.layout is not None,
                Step.DIAGNOSE: self.diagnosis is not None, Step.CHECK: self.check is not None,
                Step.SPACE: self.space is not None}
        return [s for s in Step if not done[s]]

    def step_done(self, step: Step) -> bool:
        return step not in self.pending_steps()


def compact_check(check: CheckResult) -> CheckResult:
    """`check` without its per-host-cluster arrays (references and stored refcounts): no view
    reads them (the layout has the same numbers, and the views read the layout's), and on a 1 TiB
    image they take 96 MiB."""
    import numpy as np

    check.reference = np.zeros(0, np.uint32)
    check.stored = np.zeros(0, check.stored.dtype)
    return check


def open_session(path: str, name: str | None = None, *, load: bool = True) -> Session:
    """Open `path` (raises `Qcow2Error` when it is not a usable qcow2 image); without `load`, only
    its metadata is read now (`Session.load()` reads the tables)."""
    try:
        return Session(path, name, load=load)
    except OSError as e:
        raise Qcow2Error(e.strerror or str(e), path=path) from None
