"""Text from an image is escaped exactly once on its way to the screen: the Structures and Chain
tables, their detail lines and the structure tree show `QFI\\xfb` and a snapshot named
`a\\b<ESC>c` as `'a\\\\b\\x1bc'`, never with doubled backslashes and never with a raw control."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from textual.widgets import Static

from qinspect.tui.app import QInspectApp
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.structs import StructKind, StructRef
from qinspect.tui.views.chain import ChainView
from qinspect.tui.views.structures import StructuresView
from qinspect.tui.widgets.table import EntryTable

from .conftest import make_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

NAME = "a\\b\x1bc"  # a backslash and an ESC, as the snapshot table stores them
SHOWN = "'a\\\\b\\x1bc'"  # each escaped once: \\ and \x1b


def table_text(table: EntryTable) -> str:
    return "\n".join("".join(seg.text for seg in table.render_line(y)) for y in range(table.size.height))


async def settle(pilot, app: QInspectApp) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        await pilot.pause()
        await app.workers.wait_for_complete()
    await pilot.pause()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_image(tmp_path_factory.mktemp("esc") / "snap.qcow2", "16M", "", ("write -P 1 0 64k",))
    subprocess.run(["qemu-img", "snapshot", "-c", NAME, str(path)], check=True)
    return path


async def test_structures_escape_once(image: Path) -> None:
    app = QInspectApp(str(image), view="structures")
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(pilot, app)
        main = app.screen
        assert isinstance(main, MainScreen)
        st = main.view("structures")
        assert isinstance(st, StructuresView)
        h = main.session.img.header
        st.show_ref(StructRef(StructKind.HEADER, row=0))  # magic
        st.table.focus()
        await pilot.pause()
        detail = str(st.query_one("#st-detail", Static).render())
        assert detail.startswith("magic:") and detail.endswith("QFI\\xfb"), detail
        shown = table_text(st.table)
        assert "QFI\\xfb" in shown and "QFI\\\\xfb" not in shown
        st.show_ref(StructRef(StructKind.SNAPSHOT_TABLE, offset=h.snapshots_offset, row=0))
        st.table.focus()
        await pilot.pause()
        detail = str(st.query_one("#st-detail", Static).render())
        assert SHOWN in detail and "\x1b" not in detail, detail
        shown = table_text(st.table)
        assert "a\\\\b\\x1bc" in shown and "\\\\\\\\" not in shown and "\x1b" not in shown
        labels = [str(n.label) for n in st._walk(st.struct_tree.root)]
        assert any(SHOWN in t for t in labels), labels
        assert not any("\\\\\\\\" in t or "\x1b" in t for t in labels)


async def test_chain_snapshots_escape_once(image: Path) -> None:
    app = QInspectApp(str(image), view="chain")
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(pilot, app)
        main = app.screen
        assert isinstance(main, MainScreen)
        ch = main.view("chain")
        assert isinstance(ch, ChainView)
        snaps = ch.query_one("#ch-snapshots", EntryTable)
        snaps.focus()
        await pilot.pause()
        shown = table_text(snaps)
        assert "a\\\\b\\x1bc" in shown and "\\\\\\\\" not in shown and "\x1b" not in shown
        assert snaps.model is not None
        detail = snaps.model.detail(0)  # what the detail line shows, as it is
        assert SHOWN in detail and "\x1b" not in detail, detail
