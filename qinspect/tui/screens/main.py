"""The main screen: header line, breadcrumb, the views on number keys, scan status, footer.

Scans run in one thread worker, step after step (guest map, host layout, diagnose, check, space);
every step reports progress through messages and leaves its result in the session, so a view
shows partial results while the scan goes on, and what was done before `esc` stays usable.

Navigation: following a link (`enter`, `H`, a finding's evidence, a snapshot's L1) or switching
views remembers the place being left; `backspace` goes back to it, and the breadcrumb line shows
the way taken. Views are imported and built when first shown, so the first frame waits for none
of the later views' modules.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Container
from textual.screen import Screen
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import ContentSwitcher, Footer, Static
from textual.worker import Worker, get_current_worker

from qinspect.analysis.progress import Cancelled
from qinspect.qcow2.errors import Qcow2Error
from qinspect.tui.messages import (
    FindIn,
    ScanFinished,
    ScanProgress,
    ScanStepDone,
    ShowGuest,
    ShowHost,
    ShowStructure,
    ShowView,
)
from qinspect.tui.nav import History, Place, breadcrumb
from qinspect.tui.palette import DIM, G
from qinspect.tui.screens.prompt import PromptScreen
from qinspect.tui.session import Session, Step
from qinspect.tui.views.base import View
from qinspect.tui.widgets.header import HeaderBar
from qinspect.tui.widgets.status import ScanStatus
from qinspect.tui.widgets.viewstrip import ViewStrip

# (id, tab label): labels short enough that all seven tabs fit in 80 columns.
VIEWS: tuple[tuple[str, str], ...] = (
    ("overview", "1 Overview"),
    ("guest", "2 Guest"),
    ("host", "3 Host"),
    ("structures", "4 Structs"),
    ("cache", "5 Cache"),
    ("diagnostics", "6 Diagnose"),
    ("chain", "7 Chain"),
)
VIEW_IDS = tuple(v for v, _label in VIEWS)

# Seconds between two redraws of the maps while a scan fills them (keys stay responsive).
REDRAW_INTERVAL = 0.5
# Seconds between two looks at a followed image (size and mtime).
FOLLOW_INTERVAL = 1.0


def view_class(vid: str) -> type[View]:
    """The class of a view, imported when first needed (not at start-up)."""
    if vid == "overview":
        from qinspect.tui.views.overview import OverviewView
        return OverviewView
    if vid == "guest":
        from qinspect.tui.views.guest import GuestMapView
        return GuestMapView
    if vid == "host":
        from qinspect.tui.views.host import HostLayoutView
        return HostLayoutView
    if vid == "structures":
        from qinspect.tui.views.structures import StructuresView
        return StructuresView
    if vid == "cache":
        from qinspect.tui.views.cache import CacheLabView
        return CacheLabView
    if vid == "diagnostics":
        from qinspect.tui.views.diagnostics import DiagnosticsView
        return DiagnosticsView
    if vid == "chain":
        from qinspect.tui.views.chain import ChainView
        return ChainView
    raise KeyError(vid)


# How much nicer than the app the scan threads run (the OS scheduler then gives the thread that
# reads keys and draws the CPU first when the machine is busy).
SCAN_NICE = 10


def lower_priority() -> None:
    """Lower the OS priority of the calling (worker) thread only: on Linux a thread's native id is
    a task id `setpriority` accepts. Nowhere else it is possible, nothing is changed."""
    import threading

    try:
        tid = threading.get_native_id()
        if tid != os.getpid():  # never the whole process (the main thread's id is the pid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + SCAN_NICE))
    except (OSError, AttributeError):
        pass


def export_path(session: Session, vid: str) -> str:
    """Where `e` writes: qinspect-<image>-<view>.json in the current directory (or /tmp when that
    is not writable); never over an existing file."""
    base = os.path.basename(session.path) or "image"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
    d = os.getcwd() if os.access(os.getcwd(), os.W_OK) else "/tmp"
    path = os.path.join(d, f"qinspect-{safe}-{vid}.json")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(d, f"qinspect-{safe}-{vid}-{n}.json")
    return path


class MainScreen(Screen[None]):
    """All views of one image."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "app.quit", "Quit"),
        Binding("question_mark,f1", "toggle_help", "Help", key_display="?"),
        Binding("1", "view('overview')", "Views", key_display="1-7", show=False),
        Binding("2", "view('guest')", show=False),
        Binding("3", "view('host')", show=False),
        Binding("4", "view('structures')", show=False),
        Binding("5", "view('cache')", show=False),
        Binding("6", "view('diagnostics')", show=False),
        Binding("7", "view('chain')", show=False),
        Binding("backspace", "back", "Back", key_display="⌫"),
        Binding("o", "open_other", "Open"),
        Binding("g", "goto", "Go to"),
        Binding("slash", "find", "Find", key_display="/"),
        Binding("n", "find_next(1)", "Next match", show=False),
        Binding("N", "find_next(-1)", "Previous match", show=False),
        Binding("c", "copy", "Copy", show=False),
        Binding("e", "export", "Export JSON", show=False),
        Binding("f", "follow", "Follow a live image", show=False),
        Binding("escape", "cancel", "Cancel scan", show=False),
        Binding("r", "rescan", "Rescan", show=False),
        Binding("R", "reopen", "Reopen the file", show=False),
    ]

    DEFAULT_CSS = """
    MainScreen #crumbs { height: 1; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, session: Session, *, scan: bool = True, view: str = "overview") -> None:
        super().__init__()
        self.session = session
        self.autoscan = scan
        self.initial_view = view
        self.scanning = False
        self.last_find: str | None = None
        self.scan_worker: Worker[None] | None = None
        self._focus_target: Widget | None = None
        self.history = History()
        self._restoring = False
        self.follow_timer: Timer | None = None
        self._last_redraw = 0.0

    def compose(self) -> ComposeResult:
        yield HeaderBar(self.session, id="header")
        yield Static("", id="crumbs")
        yield ViewStrip(VIEWS, self.initial_view, id="view-strip")
        # One pane per view, mounted (with its view) when the view is first shown.
        with ContentSwitcher(initial=self.initial_view, id="tabs"), Container(id=self.initial_view):
            yield view_class(self.initial_view)(self.session, id=f"view-{self.initial_view}")
        yield ScanStatus(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.call_after_refresh(self._focus_current, self.initial_view)
        self.call_after_refresh(self.update_crumbs)
        # The first frame shows what the metadata says; the tables are read once it is on screen.
        self.call_after_refresh(self._load_image)
        if not self.autoscan:
            self.query_one(ScanStatus).idle("scans not started (r runs them)")

    async def _load_image(self) -> None:
        """After the first frame: read the image's tables, let the views fill in, start the scans."""
        try:
            self.session.load()
        except (Qcow2Error, OSError) as e:
            failed: Callable[[Screen[None], str, Exception], None] | None = getattr(self.app, "open_failed", None)
            if failed is not None:
                failed(self, self.session.name, e)
            return
        for view in self.built_views():
            await view.session_loaded()
        if self.autoscan:
            # after the next frame: the scan threads would slow the views' filling in down
            self.call_after_refresh(self.start_scans)

    # -- views ------------------------------------------------------------------------------------------
    def view(self, vid: str | None = None) -> View:
        """A view (the active one by default); it must have been shown (built) already."""
        vid = vid or self.active_view
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
        view = view_class(vid)(self.session, id=f"view-{vid}")
        panes = self.query(f"#tabs > #{vid}")
        if panes:
            pane = panes.first()
        else:
            pane = Container(id=vid)
            await self.query_one("#tabs", ContentSwitcher).mount(pane)
        await pane.mount(view)
        if self.session.loaded:
            await view.session_loaded()
        return view

    @property
    def active_view(self) -> str:
        return self.query_one("#tabs", ContentSwitcher).current or self.initial_view

    def _focus_current(self, vid: str | None = None) -> None:
        """Focus the view `vid` once it is shown (a focus scheduled for a view that is no longer the
        active one is dropped: focusing inside a hidden pane would switch back to it)."""
        if vid is not None and vid != self.active_view:
            return
        target, self._focus_target = self._focus_target, None
        if target is not None and target.is_mounted:
            target.focus()
        else:
            found = self.query(f"#view-{self.active_view}")
            if found:
                view = found.first()
                if isinstance(view, View):
                    view.focus_main()

    def here(self) -> Place | None:
        """The place shown now (None before the first view is built)."""
        found = self.query(f"#view-{self.active_view}")
        view = found.first() if found else None
        return view.place() if isinstance(view, View) else None

    def remember(self) -> None:
        """Push the place shown now onto the history (before a link or a view switch)."""
        if self._restoring:
            return
        place = self.here()
        if place is not None:
            self.history.push(place)

    def update_crumbs(self) -> None:
        here = self.here()
        label = here.label if here is not None else ""
        width = max(10, self.size.width - 2)
        text = breadcrumb(self.history.trail(), label, width - 14) if len(self.history) else label
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(text, Style(color=DIM))
        if len(self.history):
            t.append("  ⌫ back", Style(color=DIM, italic=True))
        self.query_one("#crumbs", Static).update(t)

    async def action_view(self, vid: str) -> None:
        switcher = self.query_one("#tabs", ContentSwitcher)
        if switcher.current != vid:
            self.remember()
        view = await self.ensure_view(vid)
        if switcher.current != vid:
            self.set_focus(None)  # nothing in the pane left behind keeps the focus
            switcher.current = vid
            self.query_one(ViewStrip).active = vid
            if view.stale:
                view.stale = False
                view.data_changed(None)
            self.refresh_bindings()
        self.call_after_refresh(self._focus_current, vid)
        self.call_after_refresh(self.update_crumbs)

    async def on_show_view(self, message: ShowView) -> None:
        await self.action_view(message.view)

    async def on_show_guest(self, message: ShowGuest) -> None:
        if message.switch:
            self.remember()
        view = await self.ensure_view("guest")
        from qinspect.tui.views.guest import GuestMapView

        assert isinstance(view, GuestMapView)
        view.show_offset(message.offset)
        if message.switch:
            await self._switch_quietly("guest")

    async def on_show_host(self, message: ShowHost) -> None:
        self.remember()
        view = await self.ensure_view("host")
        from qinspect.tui.views.host import HostLayoutView

        assert isinstance(view, HostLayoutView)
        view.show_offset(message.offset)
        await self._switch_quietly("host")

    async def on_show_structure(self, message: ShowStructure) -> None:
        self.remember()
        view = await self.ensure_view("structures")
        from qinspect.tui.views.structures import StructuresView

        assert isinstance(view, StructuresView)
        view.show_ref(message.ref)
        self._focus_target = view.table
        await self._switch_quietly("structures")

    async def on_find_in(self, message: FindIn) -> None:
        self.remember()
        view = await self.ensure_view(message.view)
        await self._switch_quietly(message.view)
        err = view.find_first(message.text)
        if err:
            self.notify(err, severity="warning", markup=False)
        self.call_after_refresh(self.update_crumbs)

    async def _switch_quietly(self, vid: str) -> None:
        """Show `vid` without pushing history (the caller remembered the place already)."""
        self._restoring = True
        try:
            await self.action_view(vid)
        finally:
            self._restoring = False
        self.call_after_refresh(self.update_crumbs)

    async def action_back(self) -> None:
        place = self.history.pop()
        if place is None:
            self.notify("nothing to go back to", timeout=2)
            return
        view = await self.ensure_view(place.view)
        await self._switch_quietly(place.view)
        view.restore(place)
        self.call_after_refresh(self.update_crumbs)

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

    def action_open_other(self) -> None:
        """The picker, in the directory of this image (`o` from anywhere)."""
        from qinspect.tui.screens.picker import PickerScreen

        root = os.path.dirname(os.path.abspath(self.session.path)) or "."

        def done(path: str | None) -> None:
            if path:
                opener: Callable[[str], None] | None = getattr(self.app, "open_path", None)
                if opener is not None:
                    opener(path)

        self.app.push_screen(PickerScreen(root), done)

    # -- copy and export ----------------------------------------------------------------------------------
    def action_copy(self) -> None:
        got = self.view().copy_value()
        if got is None:
            self.notify("nothing to copy here", severity="warning", timeout=3)
            return
        what, text = got
        self.app.copy_to_clipboard(text)
        self.notify(f"copied {what}: {text}", markup=False, timeout=4)

    def action_export(self) -> None:
        view = self.view()
        data = {"image": self.session.path, "in-use": self.session.in_use.to_json(),
                **view.export()}
        path = export_path(self.session, view.VIEW_ID or self.active_view)
        try:
            with open(path, "x", encoding="utf-8") as f:
                json.dump(data, f, indent=2, default=str)
                f.write("\n")
        except OSError as e:
            self.notify(f"export failed: {e.strerror or e}", markup=False, severity="error")
            return
        self.notify(f"wrote {path}", markup=False, timeout=6)

    # -- go to and find -----------------------------------------------------------------------------------
    def action_goto(self) -> None:
        view = self.view()
        if view.goto_prompt is None:
            self.notify("this view has nothing to go to", severity="warning")
            return

        def done(text: str | None) -> None:
            if text:
                self.remember()
                err = view.goto(text)
                if err:
                    self.history.pop()
                    self.notify(err, severity="warning", markup=False)
                self.update_crumbs()

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
        self.session.scanning = True
        self.session.cancelled.clear()
        self.query_one(ScanStatus).start("starting scans…")
        self.scan_worker = self.run_worker(self._scan_all, thread=True, group="scan", exit_on_error=False,
                                           name="scan")

    def _scan_all(self) -> None:
        worker = get_current_worker()
        s = self.session

        def cancelled() -> bool:
            return worker.is_cancelled

        lower_priority()
        for step in s.pending_steps():
            if cancelled():
                self.post_message(ScanStepDone(step, cancelled=True))
                break
            if s.step_done(step):  # done by an earlier step (check by the layout's walk, space by diagnose)
                self.post_message(ScanStepDone(step))
                continue
            self.post_message(ScanProgress(step, 0, 1))
            try:
                s.run(step, self._progress_fn(step), cancelled)
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

    def _progress_fn(self, step: Step) -> Callable[[int, int], None]:
        """A progress callback for a worker thread: posts at most ten messages a second."""
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.1 or done >= total:
                last[0] = now
                self.post_message(ScanProgress(step, done, total))

        return progress

    def on_scan_progress(self, message: ScanProgress) -> None:
        status = self.query_one(ScanStatus)
        unit = "L2 tables" if message.step is Step.GUEST else "" if message.step is Step.SPACE else "tables"
        label = message.step.label
        text = f"{label}: {message.done:,}/{message.total:,} {unit}".rstrip() if message.total > 1 else f"{label}…"
        status.advance(text, message.done, message.total)
        now = time.monotonic()
        if message.step is Step.GUEST and message.done and now - self._last_redraw >= REDRAW_INTERVAL:
            self._last_redraw = now  # the maps redraw at most twice a second while a scan fills them
            self._data_changed(Step.GUEST)

    def on_scan_step_done(self, message: ScanStepDone) -> None:
        s = self.session
        if message.cancelled:
            s.cancelled.add(message.step)
        elif message.error:
            s.errors[message.step] = message.error
            self.notify(f"{message.step.label} failed: {self.session.clean(message.error)}",
                        severity="error", timeout=8, markup=False)
        self._data_changed(message.step)
        if message.step is Step.GUEST and int(s.guest.totals()[G.COMPRESSED]):
            self.query_one(HeaderBar).set_compressed_seen()

    def on_scan_finished(self, message: ScanFinished) -> None:
        self.scanning = False
        s = self.session
        s.scanning = False
        status = self.query_one(ScanStatus)
        if message.cancelled or s.cancelled:
            done = [st.label for st in (Step.GUEST, Step.LAYOUT, Step.DIAGNOSE, Step.CHECK) if s.step_done(st)]
            status.idle(f"scan cancelled — partial results shown{' (' + ', '.join(done) + ' done)' if done else ''}"
                        " · r resumes", warn=True)
        elif s.errors:
            status.idle("scans finished with errors: " + ", ".join(k.label for k in s.errors), warn=True)
        else:
            status.idle("all scans complete")
        self._data_changed(None)

    def _data_changed(self, step: Step | None) -> None:
        """Tell the shown view at once; the hidden ones catch up when they are shown."""
        if step is not Step.GUEST:
            self.call_after_refresh(self.update_crumbs)
        active = f"view-{self.active_view}"
        for view in self.built_views():
            if view.id == active:
                view.data_changed(step)
            else:
                view.stale = True

    def action_cancel(self) -> None:
        if self.scanning and self.scan_worker is not None:
            self.scan_worker.cancel()
            self.query_one(ScanStatus).idle("cancelling…", warn=True)
        elif self.query("HelpPanel"):
            self.app.action_hide_help_panel()

    def action_rescan(self) -> None:
        changed = self.session.changed()
        if changed and self.follow_timer is None:
            self.query_one(HeaderBar).set_changed(changed)
            self.notify(f"{changed}: results would mix two versions of the file; "
                             "R reopens it, f follows it", markup=False, severity="warning", timeout=10)
            return
        if self.scanning:
            self.notify("a scan is already running (esc cancels it)")
            return
        if not self.session.pending_steps():
            self.notify("everything is scanned already")
            return
        self.start_scans()

    def action_reopen(self) -> None:
        if self.scan_worker is not None and self.scanning:
            self.scan_worker.cancel()
        opener: Callable[..., None] | None = getattr(self.app, "open_path", None)
        if opener is not None:
            opener(self.session.path, replace=True)

    # -- follow a live image ------------------------------------------------------------------------------
    def action_follow(self) -> None:
        if self.follow_timer is not None:
            self.follow_timer.stop()
            self.follow_timer = None
            self.query_one(HeaderBar).set_following(False)
            self.notify("stopped following", timeout=3)
            return
        self.follow_timer = self.set_interval(FOLLOW_INTERVAL, self._follow_tick)
        self.query_one(HeaderBar).set_following(True)
        self.notify("following: changes are re-read every second (f stops)", timeout=4)

    def _follow_tick(self) -> None:
        if self.scanning:
            return
        from qinspect.tui.follow import refresh_changed

        s = self.session
        try:
            changes = refresh_changed(s)
        except Qcow2Error as e:
            self.notify(f"follow: {e}", markup=False, severity="error", timeout=6)
            return
        if changes is None:
            return
        self.query_one(HeaderBar).refresh_text()
        if changes.replaced:
            self.notify("follow: the file was replaced; R reopens it", markup=False, severity="warning", timeout=8)
            self.action_follow()
            return
        if changes.tables or changes.resized:
            self.query_one(ScanStatus).idle(
                f"following: {changes.tables} L2 table(s) re-read, {changes.new_clusters:,} new cluster(s)",
                warn=False)
            self._data_changed(Step.GUEST)
            if s.pending_steps():
                self.start_scans()


__all__ = ["VIEWS", "VIEW_IDS", "MainScreen", "view_class"]

