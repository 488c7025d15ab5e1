"""The main screen: header line, the views on number keys, scan status, footer.

Scans run in one thread worker, step after step (guest map, host layout, check or diagnose, space);
every step reports progress through messages and leaves its result in the session, so a view
shows partial results while the scan goes on, and what was done before `esc` stays usable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, TabbedContent, TabPane, Tabs
from textual.worker import Worker, get_current_worker

from qinspect.analysis.progress import Cancelled, CancelledFn, ProgressFn
from qinspect.qcow2.errors import Qcow2Error
from qinspect.tui.messages import (
    ScanFinished,
    ScanProgress,
    ScanStepDone,
    ShowGuest,
    ShowHost,
    ShowStructure,
    ShowView,
)
from qinspect.tui.palette import G
from qinspect.tui.screens.prompt import PromptScreen
from qinspect.tui.session import Session, analysis
from qinspect.tui.views.base import View
from qinspect.tui.views.cache import CacheLabView
from qinspect.tui.views.chain import ChainView
from qinspect.tui.views.diagnostics import DiagnosticsView
from qinspect.tui.views.guest import GuestMapView
from qinspect.tui.views.host import HostLayoutView
from qinspect.tui.views.overview import OverviewView
from qinspect.tui.views.structures import StructuresView
from qinspect.tui.widgets.header import HeaderBar
from qinspect.tui.widgets.status import ScanStatus

VIEWS: tuple[tuple[str, str, type[View]], ...] = (
    ("overview", "1 Overview", OverviewView),
    ("guest", "2 Guest map", GuestMapView),
    ("host", "3 Host layout", HostLayoutView),
    ("structures", "4 Structures", StructuresView),
    ("cache", "5 Cache lab", CacheLabView),
    ("diagnostics", "6 Diagnostics", DiagnosticsView),
    ("chain", "7 Chain & snapshots", ChainView),
)
STEP_LABELS = {"guest": "Guest map", "layout": "Host layout", "check": "Refcount check", "diagnose": "Diagnose",
               "space": "Space"}


class MainScreen(Screen[None]):
    """All views of one image."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "app.quit", "Quit"),
        Binding("question_mark,f1", "toggle_help", "Help", key_display="?"),
        Binding("1", "view('overview')", "Views", key_display="1-7"),
        Binding("2", "view('guest')", show=False),
        Binding("3", "view('host')", show=False),
        Binding("4", "view('structures')", show=False),
        Binding("5", "view('cache')", show=False),
        Binding("6", "view('diagnostics')", show=False),
        Binding("7", "view('chain')", show=False),
        Binding("g", "goto", "Go to"),
        Binding("slash", "find", "Find", key_display="/"),
        Binding("n", "find_next(1)", "Next", show=False),
        Binding("N", "find_next(-1)", "Previous", show=False),
        Binding("escape", "cancel", "Cancel scan", show=False),
        Binding("r", "rescan", "Rescan", show=False),
    ]

    def __init__(self, session: Session, *, scan: bool = True, view: str = "overview") -> None:
        super().__init__()
        self.session = session
        self.autoscan = scan
        self.initial_view = view
        self.scanning = False
        self.last_find: str | None = None
        self.scan_worker: Worker[None] | None = None
        self._focus_target: Widget | None = None

    def compose(self) -> ComposeResult:
        yield HeaderBar(self.session, id="header")
        with TabbedContent(initial=self.initial_view, id="tabs"):
            for vid, label, cls in VIEWS:
                with TabPane(label, id=vid):
                    if vid == self.initial_view:  # the other views are built when first shown
                        yield cls(self.session, id=f"view-{vid}")
        yield ScanStatus(id="status")
        yield Footer()

    def on_mount(self) -> None:
        # The tab strip is driven by the number keys; tab moves between the widgets of a view.
        self.query_one(TabbedContent).query_one(Tabs).can_focus = False
        self.call_after_refresh(self._focus_current)
        if self.autoscan:
            self.call_after_refresh(self.start_scans)
        else:
            self.query_one(ScanStatus).idle("scans not started (r runs them)")

    # -- views ------------------------------------------------------------------------------------------
    def view(self, vid: str | None = None) -> View:
        """A view (the active one by default); it must have been shown (built) already."""
        vid = vid or self.query_one(TabbedContent).active
        return self.query_one(f"#view-{vid}", View)

    def built_views(self) -> list[View]:
        return list(self.query(View))

    async def ensure_view(self, vid: str) -> View:
        """The view `vid`, built and mounted now if it was never shown."""
        found = self.query(f"#view-{vid}")
        if found:
            view = found.first()
            assert isinstance(view, View)
            return view
        cls = next(c for v, _label, c in VIEWS if v == vid)
        view = cls(self.session, id=f"view-{vid}")
        await self.query_one(f"TabPane#{vid}", TabPane).mount(view)
        return view

    @property
    def active_view(self) -> str:
        return self.query_one(TabbedContent).active

    def _focus_current(self) -> None:
        target, self._focus_target = self._focus_target, None
        if target is not None and target.is_mounted:
            target.focus()
        else:
            self.view().focus_main()

    async def action_view(self, vid: str) -> None:
        await self.ensure_view(vid)
        tabs = self.query_one(TabbedContent)
        if tabs.active != vid:
            tabs.active = vid  # TabActivated focuses the view
        else:
            self.call_after_refresh(self._focus_current)

    async def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        vid = event.pane.id
        if vid:
            await self.ensure_view(vid)
        self.refresh_bindings()
        self.call_after_refresh(self._focus_current)

    async def on_show_view(self, message: ShowView) -> None:
        await self.action_view(message.view)

    async def on_show_guest(self, message: ShowGuest) -> None:
        view = await self.ensure_view("guest")
        assert isinstance(view, GuestMapView)
        view.show_offset(message.offset)
        if message.switch:
            await self.action_view("guest")

    async def on_show_host(self, message: ShowHost) -> None:
        view = await self.ensure_view("host")
        assert isinstance(view, HostLayoutView)
        view.show_offset(message.offset)
        await self.action_view("host")

    async def on_show_structure(self, message: ShowStructure) -> None:
        view = await self.ensure_view("structures")
        assert isinstance(view, StructuresView)
        view.show_ref(message.ref)
        self._focus_target = view.table
        await self.action_view("structures")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide go-to and find in the footer of views that have none."""
        if action in ("goto", "find") and self.is_mounted:
            found = self.query(f"#view-{self.active_view}")
            view = found.first() if found else None
            if isinstance(view, View):
                return (view.goto_prompt if action == "goto" else view.find_prompt) is not None
        return True

    def action_toggle_help(self) -> None:
        if self.query("HelpPanel"):
            self.app.action_hide_help_panel()
        else:
            self.app.action_show_help_panel()

    # -- go to and find -----------------------------------------------------------------------------------
    def action_goto(self) -> None:
        view = self.view()
        if view.goto_prompt is None:
            self.notify("this view has nothing to go to", severity="warning")
            return

        def done(text: str | None) -> None:
            if text:
                err = view.goto(text)
                if err:
                    self.notify(err, severity="warning", markup=False)

        self.app.push_screen(PromptScreen(view.goto_prompt), done)

    def action_find(self) -> None:
        view = self.view()
        if view.find_prompt is None:
            self.notify("this view has nothing to search", severity="warning")
            return

        def done(text: str | None) -> None:
            if text:
                self.last_find = text
                err = view.find(text, True)
                if err:
                    self.notify(err, severity="warning", markup=False)

        self.app.push_screen(PromptScreen(view.find_prompt, self.last_find or ""), done)

    def action_find_next(self, direction: int) -> None:
        if not self.last_find:
            self.action_find()
            return
        err = self.view().find(self.last_find, direction > 0)
        if err:
            self.notify(err, severity="warning", markup=False)

    # -- scans --------------------------------------------------------------------------------------------
    def start_scans(self) -> None:
        if self.scanning:
            return
        self.scanning = True
        self.session.cancelled.clear()
        self.query_one(ScanStatus).start("starting scans…")
        self.scan_worker = self.run_worker(self._scan_all, thread=True, group="scan", exit_on_error=False,
                                           name="scan")

    def _steps(self) -> list[str]:
        s = self.session
        steps = []
        if not s.guest.complete:
            steps.append("guest")
        if s.layout is None and analysis("layout") is not None:
            steps.append("layout")
        if analysis("diagnose") is not None and s.diagnosis is None:
            steps.append("diagnose")
        if s.check is None:
            steps.append("check")
        if s.space is None and analysis("space") is not None:
            steps.append("space")
        return steps

    def _scan_all(self) -> None:
        worker = get_current_worker()
        s = self.session

        def cancelled() -> bool:
            return worker.is_cancelled

        for step in self._steps():
            if cancelled():
                self.post_message(ScanStepDone(step, cancelled=True))
                break
            label = STEP_LABELS[step]
            self.post_message(ScanProgress(step, label, 0, 1))
            progress = self._progress_fn(step, label)
            run: dict[str, Callable[[ProgressFn, CancelledFn], object]] = {
                "guest": s.scan_guest,
                "layout": s.run_layout,
                "check": s.run_check,
                "diagnose": s.run_diagnose,
                "space": lambda _p, _c: s.run_space(),
            }
            try:
                run[step](progress, cancelled)
            except Cancelled:
                self.post_message(ScanStepDone(step, cancelled=True))
                break
            except (Qcow2Error, OSError, MemoryError, ValueError) as e:
                self.post_message(ScanStepDone(step, error=str(e)))
                continue
            except Exception as e:
                self.post_message(ScanStepDone(step, error=f"internal error: {type(e).__name__}: {e}"))
                continue
            if cancelled():
                self.post_message(ScanStepDone(step, cancelled=True))
                break
            self.post_message(ScanStepDone(step))
        self.post_message(ScanFinished(cancelled()))

    def _progress_fn(self, step: str, label: str) -> Callable[[int, int], None]:
        """A progress callback for a worker thread: posts at most ten messages a second."""
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.1 or done >= total:
                last[0] = now
                self.post_message(ScanProgress(step, label, done, total))

        return progress

    def on_scan_progress(self, message: ScanProgress) -> None:
        status = self.query_one(ScanStatus)
        if message.step == "guest":
            unit = "L2 tables"
        elif message.step in ("layout", "check", "diagnose"):
            unit = "tables"
        else:
            unit = ""
        label = f"{message.label}: {message.done:,}/{message.total:,} {unit}".rstrip() if message.total > 1 \
            else f"{message.label}…"
        status.advance(label, message.done, message.total)
        if message.step == "guest" and message.done:
            self._data_changed("guest")

    def on_scan_step_done(self, message: ScanStepDone) -> None:
        s = self.session
        if message.cancelled:
            s.cancelled.add(message.step)
        elif message.error:
            s.errors[message.step] = message.error
            self.notify(f"{STEP_LABELS.get(message.step, message.step)} failed: {self.session.clean(message.error)}",
                        severity="error", timeout=8, markup=False)
        self._data_changed(message.step)
        if message.step == "guest" and int(s.guest.totals()[G.COMPRESSED]):
            self.query_one(HeaderBar).set_compressed_seen()

    def on_scan_finished(self, message: ScanFinished) -> None:
        self.scanning = False
        status = self.query_one(ScanStatus)
        s = self.session
        if message.cancelled or s.cancelled:
            done = [STEP_LABELS[k] for k in ("guest", "layout", "diagnose", "check") if self._step_done(k)]
            status.idle(f"scan cancelled — partial results shown{' (' + ', '.join(done) + ' done)' if done else ''}"
                        " · r resumes", warn=True)
        elif s.errors:
            status.idle("scans finished with errors: " + ", ".join(STEP_LABELS.get(k, k) for k in s.errors), warn=True)
        else:
            status.idle("all scans complete")
        for view in self.built_views():
            view.data_changed("all")

    def _step_done(self, step: str) -> bool:
        s = self.session
        return {"guest": s.guest.complete, "layout": s.layout is not None, "diagnose": s.diagnosis is not None,
                "check": s.check is not None}[step]

    def _data_changed(self, step: str) -> None:
        for view in self.built_views():
            view.data_changed(step)

    def action_cancel(self) -> None:
        if self.scanning and self.scan_worker is not None:
            self.scan_worker.cancel()
            self.query_one(ScanStatus).idle("cancelling…", warn=True)
        elif self.query("HelpPanel"):
            self.app.action_hide_help_panel()

    def action_rescan(self) -> None:
        if self.scanning:
            self.notify("a scan is already running (esc cancels it)")
            return
        if not self._steps():
            self.notify("everything is scanned already")
            return
        self.start_scans()
