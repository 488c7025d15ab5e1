"""The data behind every view on mutated (hostile) images: a result or a `Qcow2Error`, never a crash.

Reuses the fuzzer's mutations (tests/fuzz) and drives, without a terminal, what the views compute:
the guest map scan and its cells at every zoom, lookups, every structure's table rows and hex
colours, the host grid over the layout, the findings and the chain table. The Pilot test over
every sample (test_every_sample.py) covers the widgets themselves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CATALOG

from qinspect.analysis.progress import Cancelled
from qinspect.qcow2.errors import Qcow2Error
from qinspect.tui.session import Session
from qinspect.tui.structs import StructKind, StructRef, model_for
from qinspect.tui.views.diagnostics import items_from_core, items_from_diagnosis
from qinspect.tui.views.host import HostSource

CASES = int(os.environ.get("QINSPECT_TUI_FUZZ_CASES", "150"))
SEED = 11


def refs_of(s: Session) -> list[StructRef]:
    img = s.img
    h = img.header
    refs = [StructRef(StructKind.HEADER), StructRef(StructKind.EXTENSIONS),
            StructRef(StructKind.L1, offset=h.l1_table_offset),
            StructRef(StructKind.REFCOUNT_TABLE, offset=h.refcount_table_offset)]
    if h.backing_file_offset:
        refs.append(StructRef(StructKind.BACKING_NAME))
    offs = (img.l1_table & np.uint64(0x00FFFFFFFFFFFE00)).astype(np.int64)
    for j in np.flatnonzero(offs)[:4]:
        refs.append(StructRef(StructKind.L2, index=int(j), offset=int(offs[j])))
    rt = (img.refcount_table & np.uint64(0xFFFFFFFFFFFFFE00)).astype(np.int64)
    for i in np.flatnonzero(rt)[:2]:
        refs.append(StructRef(StructKind.REFCOUNT_BLOCK, index=int(i), offset=int(rt[i])))
    if img.snapshots:
        refs.append(StructRef(StructKind.SNAPSHOT_TABLE, offset=h.snapshots_offset))
        for i, sn in enumerate(img.snapshots[:3]):
            refs.append(StructRef(StructKind.SNAPSHOT_L1, owner=i, offset=sn.l1_table_offset))
    if h.bitmaps_ext is not None:
        refs.append(StructRef(StructKind.BITMAP_DIRECTORY, offset=h.bitmaps_ext.bitmap_directory_offset))
        for i, b in enumerate(img.bitmaps[:2]):
            refs.append(StructRef(StructKind.BITMAP_TABLE, index=i, offset=b.bitmap_table_offset))
    if h.crypto_ext is not None:
        refs.append(StructRef(StructKind.LUKS, offset=h.crypto_ext.offset))
    return refs


def op(fn: Any) -> None:
    with contextlib.suppress(Qcow2Error, Cancelled):
        fn()


def exercise_views(path: str) -> None:
    try:
        s = Session(path, "case.qcow2")
    except Qcow2Error:
        return
    try:
        s.layer_infos()
        items_from_core(s)
        never = lambda: False  # noqa: E731

        def scan() -> None:
            s.scan_guest(lambda d, t: None, never)

        op(scan)
        gm = s.guest
        for zoom in sorted({0, 2, gm.max_zoom // 2, gm.max_zoom}):
            n = gm.n_cells(zoom)
            gm.cells(zoom, 0, min(n, 256))
            gm.cells(zoom, max(0, n - 256), n)
            gm.cell_counts(zoom, 0)
            gm.cell_counts(zoom, n - 1)
        for g in {0, s.img.virtual_size // 2, max(0, s.img.virtual_size - 1)}:
            if g < s.img.virtual_size:
                op(lambda g=g: s.img.lookup(g))
        for ref in refs_of(s):
            def show(ref: StructRef = ref) -> None:
                m = model_for(s.img, ref)
                for i in {0, len(m) // 2, len(m) - 1}:
                    if 0 <= i < len(m):
                        m.row(i)
                        m.detail(i)
                        m.target(i)
                        m.span(i)
                m.byte_colours(m.start, s.img.file.pread(m.start, min(64, max(0, m.length))))

            op(show)
        op(lambda: s.run_layout(lambda d, t: None, never))
        if s.layout is not None:
            src = HostSource(s.img.cluster_size, s.img.file.size, s.layout)
            for zoom in (0, 3, src.max_zoom):
                src.cells(zoom, 0, min(src.n_cells(zoom), 512))
            for first, _n, _o in s.layout.runs()[:20]:
                s.layout.references(first * s.img.cluster_size)
        op(lambda: s.run_diagnose(lambda d, t: None, never))
        if s.diagnosis is not None:
            items_from_diagnosis(s.diagnosis, s)
    finally:
        s.close()


@pytest.mark.skipif(not CATALOG, reason="no sample corpus")
def test_views_on_mutated_images(samples: Any, tmp_path: Path) -> None:
    from fuzz.runner import _apply, _revert, case_for, load_bases

    work = tmp_path / "images"
    shutil.copytree(samples.dir, work)
    bases = load_bases(work, CATALOG)
    failures: list[str] = []
    for index in range(CASES):
        base, case = case_for(index, SEED, bases)
        path = work / base.file
        _apply(path, case)
        try:
            exercise_views(str(path))
        except Exception as e:
            failures.append(f"case {index} ({base.name}: {'; '.join(case.steps)}): {type(e).__name__}: {e}")
        finally:
            _revert(path, case, base.data)
    assert not failures, "\n".join(failures[:20])
