"""Every view on every sample image: no exception, whatever the image (chain, snapshots, bitmaps,
compressed, external data file, LUKS, corrupt ones).

Keys are exercised in test_app.py; here each view is shown on each image and its data paths are
driven directly (inspector at several cursor positions, every structure of the tree, every row
kind), which is where an odd image would break a view.
"""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_NAMES

from qinspect.tui.app import QInspectApp
from qinspect.tui.screens.error import ErrorScreen
from qinspect.tui.screens.main import VIEWS, MainScreen
from qinspect.tui.views.guest import GuestMapView
from qinspect.tui.views.host import HostLayoutView
from qinspect.tui.views.structures import StructuresView


@pytest.mark.parametrize("name", SAMPLE_NAMES)
async def test_every_view_on_every_sample(samples, name: str) -> None:  # type: ignore[no-untyped-def]
    app = QInspectApp(str(samples.path(name)), name=f"{name}.qcow2")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        if isinstance(screen, ErrorScreen):  # an image qinspect cannot open at all is said in words
            assert screen.message
            return
        assert isinstance(screen, MainScreen)
        session = screen.session
        assert not session.errors, session.errors
        assert session.guest.complete
        for idx, (vid, _label) in enumerate(VIEWS):
            await pilot.press(str(idx + 1))
            await pilot.pause()
            assert screen.active_view == vid
            assert app.screen is screen

        # guest map: the inspector at the first, middle and last cluster, zoomed in and out
        gm = screen.view("guest")
        assert isinstance(gm, GuestMapView)
        n = session.guest.n_clusters
        for zoom in (0, 3, gm.grid.zoom):
            gm.grid.set_zoom(zoom)
            for unit in (0, n // 2, n - 1):
                gm.grid.move_to(unit)
                gm.sc = session.img.header.subclusters_per_cluster - 1
                gm._inspect()
                session.guest.cells(zoom, 0, min(gm.grid.n_cells, 4096))
        gm.on_cluster_grid_activated(gm.grid.Activated(gm.grid, n - 1))

        # host layout: every owner run's first cluster
        host = screen.view("host")
        assert isinstance(host, HostLayoutView)
        lay = session.layout
        assert lay is not None
        for first, _count, _owner in lay.runs()[:200]:
            host.grid.move_to(first)
            host._inspect()

        # structures: every node of the tree, first and last row of each table
        st = screen.view("structures")
        assert isinstance(st, StructuresView)
        for node in st._walk(st.struct_tree.root):
            if node.data is not None:
                st._populate(node)
        for node in st._walk(st.struct_tree.root):
            if node.data is None:
                continue
            st.show_ref(node.data, select_in_tree=False)
            model = st.model
            if model is not None and len(model):
                for i in (0, len(model) - 1):
                    model.row(i)
                    model.detail(i)
                    model.target(i)
                    model.span(i)
                model.byte_colours(model.start, b"\0" * 32)
        await pilot.pause()

        # every view: its place in the history, what c copies and what e exports (as JSON)
        for view in screen.built_views():
            view.restore(view.place())
            view.copy_value()
            json.dumps(view.export(), default=str)
        await pilot.pause()
