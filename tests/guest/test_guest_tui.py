"""The guest volume bars and the guest-map cursor text, in a Pilot-driven app."""

from __future__ import annotations

from textual.app import App, ComposeResult

from qinspect.guest import inspect_guest
from qinspect.guest.disk import DiskReader
from qinspect.guest.owners import build_owner_map
from qinspect.qcow2.image import open_image
from qinspect.tui.widgets.guestvolumes import GuestVolumes, describe_offset, render_volumes
from qinspect.units import format_size
from tests.guest.conftest import GuestSamples


class _App(App[None]):
    def compose(self) -> ComposeResult:
        yield GuestVolumes(id="gv")


async def test_volume_bars_and_cursor_text(guest_samples: GuestSamples) -> None:
    with open_image(guest_samples.image("cloud")) as img:
        view = inspect_guest(img)
        owners = {1: build_owner_map(DiskReader(img), view.volumes[1])}
    app = _App()
    async with app.run_test(size=(140, 20)) as pilot:
        app.query_one(GuestVolumes).show(view)
        await pilot.pause()
        text = render_volumes(view).plain
        assert "ext4" in text and "vfat" in text and "▓" in text
        assert f"freed, still held {format_size(view.volumes[1].reclaimable_bytes)}" in text
    freed = view.reclaimable.pairs()[0][0]
    assert describe_offset(view, freed, owners).endswith("free, freed by the guest (the image still holds it)")
    used = int(owners[1].start[0])
    om = owners[1]
    assert describe_offset(view, used, owners) == f"part 2 (ext4) block {om.block(used)}: {om.owner(used)}"
    assert describe_offset(view, 0) == "outside every volume"


async def test_app_guest_map_bands_freed_state_and_file_names(guest_samples: GuestSamples) -> None:
    from qinspect.tui import guestfs
    from qinspect.tui.app import QInspectApp
    from qinspect.tui.views.guest import GuestMapView

    path = guest_samples.image("cloud")
    with open_image(path) as img:
        view = inspect_guest(img)
        om = build_owner_map(DiskReader(img), view.volumes[1])
    freed = view.reclaimable.pairs()[0][0]
    cs = view.cluster_size
    # A cluster that starts inside a live file's run.
    k = next(k for k in range(len(om.start)) if om.end[k] - om.start[k] >= 2 * cs)
    used = (int(om.start[k]) + cs - 1) // cs * cs
    app = QInspectApp(str(path), view="guest")
    async with app.run_test(size=(140, 40)) as pilot:
        for _ in range(3):
            await pilot.pause()
            await app.workers.wait_for_complete()
        screen = app.screen
        gv = screen.query_one(GuestMapView)
        bands = screen.query_one(guestfs.PartitionBands)
        assert bands.display
        assert "1:vfat" in str(bands.render()) and "2:ext4" in str(bands.render())
        fs = guestfs.guest_fs(gv.session)
        assert fs.ready and fs.owners_ready and 1 in fs.owners
        for target, expect in ((freed, "freed by the guest"), (used, str(om.owner(used)))):
            await pilot.press("g")
            await pilot.pause()
            await pilot.press(*hex(target))
            await pilot.press("enter")
            await pilot.pause()
            text = "".join(seg.text for seg in app.console.render(gv._inspect()))
            assert "guest fs" in text and expect.replace(" ", "") in text.replace(" ", "").replace("\n", "")
        # The grid shows the freed clusters in their own state.
        src = gv.grid.source
        assert isinstance(src, guestfs.FreedOverlay)
        codes, _glyphs, _missing = src.cells(0, freed // cs, freed // cs + 1)
        assert codes[0] == guestfs.FREED
        await pilot.press("1")
        await pilot.pause()
        vols = screen.query_one(GuestVolumes)
        assert vols.display and "ext4" in str(vols.render())
