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
        assert f"reclaimable {format_size(view.volumes[1].reclaimable_bytes)}" in text
    freed = view.reclaimable.pairs()[0][0]
    assert describe_offset(view, freed, owners).endswith("free, freed by the guest (the image still holds it)")
    used = int(owners[1].start[0])
    om = owners[1]
    assert describe_offset(view, used, owners) == f"part 2 (ext4) block {om.block(used)}: {om.owner(used)}"
    assert describe_offset(view, 0) == "outside every volume"
