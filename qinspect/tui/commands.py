"""The command palette (ctrl+p): go to an offset, an L2 table, a snapshot; switch views; scans."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

from rich.text import Text
from textual.command import DiscoveryHit, Hit, Hits, Provider

from qinspect.termtext import for_terminal
from qinspect.tui import fmt

_L2_RE = re.compile(r"^\s*(?:go\s*to\s*)?(?:l2|table|l2\s*table)\s*#?\s*(\d+)\s*$", re.I)
_OFF_RE = re.compile(r"^\s*(?:go\s*to\s*)?(guest|host)?\s*(?:offset)?\s*(0x[0-9a-f]+|\d+(?:\.\d+)?\s*[kmgtpe]?)\s*$",
                     re.I)


class QinspectCommands(Provider):
    """qinspect's commands; works on the main screen of an open image."""

    def _main(self) -> object | None:
        from qinspect.tui.screens.main import MainScreen

        screen = self.screen
        return screen if isinstance(screen, MainScreen) else None

    def _commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        from qinspect.tui.screens.main import VIEWS, MainScreen

        main = self._main()
        if not isinstance(main, MainScreen):
            return []
        cmds: list[tuple[str, str, Callable[[], object]]] = []
        for vid, label in VIEWS:
            cmds.append((f"View: {label[2:]}", f"switch to view {label[0]}", partial(main.action_view, vid)))
        cmds += [
            ("Go to guest offset…", "move the guest map cursor (g in the guest map)",
             partial(self._prompt, main, "guest")),
            ("Go to host offset…", "move the host layout cursor", partial(self._prompt, main, "host")),
            ("Go to L2 table…", "open the L2 table of an L1 index in Structures (type 'l2 N')",
             partial(self._prompt, main, "l2")),
            ("Find…", "search in the current view (/)", main.action_find),
            ("Rescan", "run the scans that are not complete (r)", main.action_rescan),
            ("Cancel scan", "stop the running scan, keep partial results (esc)", main.action_cancel),
            ("Help", "help for the focused widget (? / f1)", main.action_toggle_help),
        ]
        for i, sn in enumerate(main.session.img.snapshots):
            cmds.append((f"Go to snapshot {for_terminal(sn.id_str)} '{for_terminal(sn.name)}'",
                         "open its L1 table in Structures",
                         partial(self._snapshot, main, i)))
        for i, b in enumerate(main.session.img.bitmaps):
            cmds.append((f"Go to bitmap '{for_terminal(b.name)}'", "open its bitmap table in Structures",
                         partial(self._bitmap, main, i)))
        return cmds

    def _prompt(self, main: object, what: str) -> None:
        from qinspect.tui.screens.main import MainScreen
        from qinspect.tui.screens.prompt import PromptScreen

        assert isinstance(main, MainScreen)
        titles = {"guest": "Go to guest offset", "host": "Go to host offset", "l2": "Go to L2 table (L1 index)"}

        async def done(text: str | None) -> None:
            if text:
                await self._go(main, what, text)

        self.app.push_screen(PromptScreen(titles[what]), done)

    async def _go(self, main: object, what: str, text: str) -> None:
        from qinspect.tui.screens.main import MainScreen
        from qinspect.tui.views.structures import StructuresView

        assert isinstance(main, MainScreen)
        err: str | None
        if what == "l2":
            try:
                n = int(fmt.parse_size(text))
            except ValueError as e:
                err = str(e)
            else:
                view = await main.ensure_view("structures")
                await main.action_view("structures")
                assert isinstance(view, StructuresView)
                err = view.show_l2_table(n)
        else:
            view2 = await main.ensure_view(what)
            await main.action_view(what)
            err = view2.goto(text)
        if err:
            main.notify(err, severity="warning", markup=False)

    def _snapshot(self, main: object, i: int) -> None:
        from qinspect.tui.messages import ShowStructure
        from qinspect.tui.screens.main import MainScreen
        from qinspect.tui.structs import StructKind, StructRef

        assert isinstance(main, MainScreen)
        sn = main.session.img.snapshots[i]
        main.post_message(ShowStructure(StructRef(StructKind.SNAPSHOT_L1, owner=i, offset=sn.l1_table_offset)))

    def _bitmap(self, main: object, i: int) -> None:
        from qinspect.tui.messages import ShowStructure
        from qinspect.tui.screens.main import MainScreen
        from qinspect.tui.structs import StructKind, StructRef

        assert isinstance(main, MainScreen)
        b = main.session.img.bitmaps[i]
        main.post_message(ShowStructure(StructRef(StructKind.BITMAP_TABLE, index=i, offset=b.bitmap_table_offset)))

    async def discover(self) -> Hits:
        for name, help_text, cb in self._commands():
            yield DiscoveryHit(Text(name), cb, help=help_text)  # names from the file: never markup

    async def search(self, query: str) -> Hits:
        main = self._main()
        if main is None:
            return
        m = _L2_RE.match(query)
        if m:
            n = m.group(1)
            yield Hit(1.0, f"Go to L2 table {n}", partial(self._go, main, "l2", n), help="open it in Structures")
        m = _OFF_RE.match(query)
        if m and not _L2_RE.match(query):
            where = (m.group(1) or "guest").lower()
            off = m.group(2).replace(" ", "")
            yield Hit(1.0, f"Go to {where} offset {off}", partial(self._go, main, where, off),
                      help=f"move the {where} {'map' if where == 'guest' else 'layout'} cursor")
        matcher = self.matcher(query)
        for name, help_text, cb in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), cb, help=help_text)
