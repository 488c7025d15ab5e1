"""One open image and everything computed about it so far (no Textual here).

The main thread uses `img` (lookups for the inspector, tables for the Structures view); every
scan runs in a worker thread with an image of its own from `pool`. Results land here: the guest
map fills in table by table, the other analyses are set when they finish (or stay None when
cancelled). Analyses that other modules provide are looked up at call time, so the TUI uses them
as soon as they exist and falls back to what the core can tell until then.
"""

from __future__ import annotations

import importlib
import os
import shlex
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from qinspect.analysis.progress import CancelledFn, ProgressFn
from qinspect.qcow2.errors import Problem, Qcow2Error
from qinspect.qcow2.image import Image, Layer, RawLayer, open_image
from qinspect.tui.fmt import display_name
from qinspect.tui.guestmap import GuestMap, ImagePool

# Clusters classified per worker step of the guest-map scan (a few L2 tables at a time).
SCAN_STEP_CLUSTERS = 1 << 18


def analysis(name: str) -> ModuleType | None:
    """`qinspect.analysis.<name>` if that module exists (and imports), else None."""
    try:
        return importlib.import_module(f"qinspect.analysis.{name}")
    except ImportError:
        return None


@dataclass
class LayerInfo:
    """One member of the backing chain, as the Overview and Chain views list it."""

    depth: int
    name: str
    format: str
    virtual_size: int
    file_size: int
    cluster_size: int | None


class Session:
    """The open image, its worker pool and the analyses' results."""

    def __init__(self, path: str, name: str | None = None) -> None:
        self.path = path
        self.name = name or display_name(path)
        self.img: Image = open_image(path)
        self.pool = ImagePool(path)
        self.layers, error = self.img.open_chain()
        chain_error = None if error is None else str(error)
        backing_size = max((layer.virtual_size for layer in self.layers[1:]), default=0)
        self.guest = GuestMap(self.img, backing_size)
        self.chain_error = self.clean(chain_error) if chain_error else None
        if self.chain_error:
            self.guest.backing_error = self.chain_error
        self.layout: Any = None
        self.check: Any = None
        self.diagnosis: Any = None
        self.space: Any = None
        self.errors: dict[str, str] = {}
        self.cancelled: set[str] = set()

    def clean(self, text: str) -> str:
        """`text` with this image's path shown as on screen (no absolute, machine-specific paths)."""
        if not text:
            return text
        path = self.path
        for p in {shlex.quote(path), path, os.path.abspath(path)}:
            text = text.replace(p, self.name)
        d = os.path.dirname(os.path.abspath(path))
        if d and d != "/":
            text = text.replace(d + os.sep, "")
        return text

    def close(self) -> None:
        self.pool.close()
        self.img.close()

    # -- what the image is ---------------------------------------------------------------------------
    def layer_infos(self) -> list[LayerInfo]:
        out = []
        for depth, layer in enumerate(self.layers):
            if depth == 0:
                name = self.name
            else:
                parent = self.layers[depth - 1]
                stored = parent.header.backing_file if isinstance(parent, Image) else None
                name = stored or display_name(layer.path)
            cs = layer.cluster_size if isinstance(layer, Image) else None
            fsize = layer.file.size if isinstance(layer, Image | RawLayer) else 0
            out.append(LayerInfo(depth, name, layer.format, layer.virtual_size, fsize, cs))
        return out

    @property
    def problems(self) -> list[Problem]:
        return self.img.problems

    def layer(self, depth: int) -> Layer | None:
        return self.layers[depth] if 0 <= depth < len(self.layers) else None

    # -- scans (run in worker threads) --------------------------------------------------------------------
    def scan_guest(self, progress: ProgressFn, cancelled: CancelledFn, first: tuple[int, int] | None = None) -> None:
        """Classify every L2 table not yet known; tables [first) before the others."""
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
                    progress(done, total)
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

    def run_layout(self, progress: ProgressFn, cancelled: CancelledFn) -> Any:
        """The host layout and check's result from one refcount walk (each L2 table read once);
        the check is kept for `run_check`, which follows."""
        from qinspect.analysis.walks import check_and_layout

        with self.pool.borrow() as img:
            self.check, self.layout = check_and_layout(img, progress, cancelled)
        self._check_pending = True
        return self.layout

    def run_check(self, progress: ProgressFn, cancelled: CancelledFn) -> Any:
        if getattr(self, "_check_pending", False) and self.check is not None:
            self._check_pending = False  # computed by the walk run_layout just did
            progress(1, 1)
            return self.check
        from qinspect.analysis.check import check_image

        with self.pool.borrow() as img:
            self.check = check_image(img, progress, cancelled)
        return self.check

    def run_diagnose(self, progress: ProgressFn, cancelled: CancelledFn) -> Any:
        mod = analysis("diagnose")
        if mod is None:
            return None
        with self.pool.borrow() as img:
            try:
                self.diagnosis = mod.diagnose(img, deep=False, progress=progress, cancelled=cancelled,
                                              layout=self.layout)
            except TypeError:
                self.diagnosis = mod.diagnose(img, deep=False, progress=progress, cancelled=cancelled)
        space = getattr(self.diagnosis, "space", None)
        if space is not None:
            self.space = space
        if self.layout is None:
            self.layout = getattr(self.diagnosis, "layout", None)
        return self.diagnosis

    def run_space(self) -> Any:
        mod = analysis("space")
        if mod is None:
            return None
        with self.pool.borrow() as img:
            try:
                self.space = mod.compute_space(img, layout=self.layout)
            except TypeError:
                self.space = mod.compute_space(img)
        return self.space


def open_session(path: str, name: str | None = None) -> Session:
    """Open `path` (raises `Qcow2Error` when it is not a usable qcow2 image)."""
    try:
        return Session(path, name)
    except OSError as e:
        raise Qcow2Error(e.strerror or str(e), path=path) from None
