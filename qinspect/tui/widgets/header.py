"""The header line: the file and the essentials of the image, with its flags."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widgets import Static

from qinspect.qcow2.hostfile import InUse
from qinspect.tui import fmt
from qinspect.tui.flow import Flow
from qinspect.tui.palette import DIM, ERROR, GUEST_COLOURS, WARN, G
from qinspect.tui.session import Session


def header_text(s: Session, compressed_seen: bool = False, changed: str | None = None,
                following: bool = False) -> Flow:
    """The header: one line where it fits, wrapped between items (never inside a number) where it
    does not. The badges that change how every number on screen must be read (in use, changed on
    disk, followed) come first."""
    items: list[Text] = []
    for part in _header_text(s, compressed_seen, changed, following).split(SEP):
        if part.plain.strip():
            items.append(part)
    return Flow(items, gap=0, sep=Text(SEP, Style(color=DIM)))


SEP = " │ "


def _header_text(s: Session, compressed_seen: bool, changed: str | None, following: bool) -> Text:
    h = s.meta.header
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(" qinspect ", Style(bold=True, reverse=True))
    t.append(" ")
    t.append(s.name, Style(bold=True))  # escaped by the session (for_terminal), a Text: never markup
    sep = Text(SEP, Style(color=DIM))
    in_use = s.in_use
    if in_use is not InUse.NO:
        t.append(" ")
        t.append(f" in use ({in_use.to_json()}): contents may be changing ", Style(bold=True, color="#000000",
                                                                               bgcolor=WARN))
    if changed:
        t.append(" ")
        t.append(f" {changed} ", Style(bold=True, color="#ffffff", bgcolor=ERROR))
    if following:
        t.append(" ")
        t.append(" following ", Style(bold=True, reverse=True))
    t.append_text(sep)
    t.append(f"{fmt.size(h.size)} virtual")
    t.append_text(sep)
    t.append(f"{fmt.size(s.meta.file.size)} file")
    t.append_text(sep)
    t.append(f"cluster {fmt.size(h.cluster_size)}")
    if h.extended_l2:
        t.append(f" / sub {fmt.size(h.subcluster_size)}")
    t.append_text(sep)
    t.append(f"v{h.version} {h.compression_name}")
    if h.refcount_bits != 16:
        t.append(f" rc{h.refcount_bits}")
    flags: list[tuple[str, str]] = []
    if h.dirty:
        flags.append(("DIRTY", WARN))
    if h.corrupt:
        flags.append(("CORRUPT", ERROR))
    if h.extended_l2:
        flags.append(("EXT-L2", GUEST_COLOURS[G.PARTIAL]))
    if compressed_seen or h.compression_type != 0:
        flags.append(("COMPRESSED", GUEST_COLOURS[G.COMPRESSED]))
    if s.meta.encrypted:
        flags.append(("ENCRYPTED", "#ff87af"))
    if h.lazy_refcounts:
        flags.append(("LAZY-RC", DIM))
    if h.has_data_file:
        flags.append(("DATA-FILE", "#87d7d7"))
    if h.backing_file is not None:
        flags.append((f"BACKED×{s.depth - 1}" if not s.chain_error else "BACKING MISSING",
                       ERROR if s.chain_error else GUEST_COLOURS[G.BACKING1]))
    if s.meta.snapshots:
        flags.append((f"SNAP×{len(s.meta.snapshots)}", "#af87ff"))
    if s.meta.header.bitmaps_ext is not None:
        flags.append((f"BITMAP×{s.meta.header.bitmaps_ext.nb_bitmaps}", "#ffff5f"))
    if flags:
        t.append_text(sep)
        for i, (name, colour) in enumerate(flags):
            if i:
                t.append(" ")
            t.append(name, Style(color=colour, bold=True))
    return t


class HeaderBar(Static):
    """One line at the top; `compressed_seen` is set once the guest scan met compressed clusters."""

    DEFAULT_CSS = """
    HeaderBar { height: auto; max-height: 3; width: 1fr; background: $panel; }
    """

    def __init__(self, session: Session, *, id: str | None = None) -> None:
        super().__init__(header_text(session), id=id)
        self.session = session
        self.compressed_seen = False
        self.changed: str | None = None
        self.following = False

    def refresh_text(self) -> None:
        self.update(header_text(self.session, self.compressed_seen, self.changed, self.following))

    def set_compressed_seen(self) -> None:
        if not self.compressed_seen:
            self.compressed_seen = True
            self.refresh_text()

    def set_changed(self, why: str | None) -> None:
        self.changed = why
        self.refresh_text()

    def set_following(self, on: bool) -> None:
        self.following = on
        self.refresh_text()
