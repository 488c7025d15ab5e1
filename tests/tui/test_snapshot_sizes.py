"""SVG snapshots at the two sizes people use: 80×24 (every tab reachable, nothing cut) and 200×60
(panes grow with the terminal). One image with a backing chain for the map views, one with
snapshots for the chain view, the findings of a corrupt image."""

from __future__ import annotations

from typing import Any

import pytest

from qinspect.tui.app import QInspectApp
from qinspect.tui.screens.main import MainScreen
from qinspect.tui.views.guest import GuestMapView

from .test_snapshots import settled

SMALL = (80, 24)
LARGE = (200, 60)


def app_for(samples: Any, name: str, view: str) -> QInspectApp:
    return QInspectApp(str(samples.path(name)), name=f"{name}.qcow2", view=view)


@pytest.mark.parametrize(("view", "image"), [
    ("overview", "chain_top"), ("guest", "chain_top"), ("host", "fragmented"), ("structures", "extl2_128k"),
    ("cache", "big_empty"), ("diagnostics", "refcount_corrupt"), ("chain", "snapshots"),
])
def test_every_view_at_80x24(snap_compare: Any, samples: Any, view: str, image: str) -> None:
    assert snap_compare(app_for(samples, image, view), terminal_size=SMALL, run_before=settled())


@pytest.mark.parametrize(("view", "image"), [
    ("guest", "chain_top"), ("host", "fragmented"), ("structures", "extl2_128k"), ("diagnostics", "refcount_corrupt"),
])
def test_views_at_200x60(snap_compare: Any, samples: Any, view: str, image: str) -> None:
    assert snap_compare(app_for(samples, image, view), terminal_size=LARGE, run_before=settled())


def test_guest_map_after_a_link_shows_the_breadcrumb(snap_compare: Any, samples: Any) -> None:
    async def then(pilot: Any, main: MainScreen) -> None:
        view = main.view("guest")
        assert isinstance(view, GuestMapView)
        view.grid.set_zoom(0)
        img = main.session.img
        first = next(c for c in range(main.session.guest.n_clusters)
                     if img.lookup(c * img.cluster_size).host_offset is not None)  # allocated in this layer
        view.show_offset(first * img.cluster_size)
        await pilot.press("enter")
        for _ in range(3):
            await pilot.pause()
            await pilot.app.workers.wait_for_complete()
        await pilot.press("H")
        for _ in range(3):
            await pilot.pause()
            await pilot.app.workers.wait_for_complete()

    assert snap_compare(app_for(samples, "chain_top", "guest"), terminal_size=SMALL, run_before=settled(then))
