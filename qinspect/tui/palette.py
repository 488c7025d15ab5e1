"""One colour per kind of thing, the same in every view.

Guest states (the guest map) and structure kinds (host layout, structures tree, hex view, space
bar) share this palette: guest data is the same green in the guest map, the host layout, the
hex view and the space bar; an L2 table is the same cyan in the host layout and the tree.
"""

from __future__ import annotations

from enum import IntEnum

from rich.style import Style
from rich.text import Text


class G(IntEnum):
    """The state of one guest cluster (or the dominant state of a map cell)."""

    UNKNOWN = 0  # not scanned yet
    UNALLOCATED = 1  # reads zeros (no backing layer has it either)
    DATA = 2
    ZERO_PLAIN = 3
    ZERO_ALLOC = 4
    RESERVED = 5  # extended L2: host cluster reserved, subclusters unallocated (read through)
    COMPRESSED = 6
    PARTIAL = 7  # extended L2: subclusters in different states
    INVALID = 8  # QEMU would fail the read (invalid bitmap, unaligned offset, ...)
    BACKING1 = 9  # unallocated here, allocated in backing layer 1
    BACKING2 = 10
    BACKING3 = 11
    BACKING4 = 12
    BACKING5 = 13  # layer 5 or deeper


NSTATES = 14
MAX_DEPTH_COLOURS = 5

GUEST_COLOURS: dict[int, str] = {
    G.UNKNOWN: "#3a3a3a",
    G.UNALLOCATED: "#6c6c6c",
    G.DATA: "#5fd75f",
    G.ZERO_PLAIN: "#87afff",
    G.ZERO_ALLOC: "#5f87d7",
    G.RESERVED: "#afaf87",
    G.COMPRESSED: "#d787ff",
    G.PARTIAL: "#ffd75f",
    G.INVALID: "#ff5f5f",
    G.BACKING1: "#ffaf5f",
    G.BACKING2: "#d78700",
    G.BACKING3: "#af8700",
    G.BACKING4: "#af5f00",
    G.BACKING5: "#875f00",
}

GUEST_NAMES: dict[int, str] = {
    G.UNKNOWN: "not scanned",
    G.UNALLOCATED: "unallocated",
    G.DATA: "data",
    G.ZERO_PLAIN: "zero",
    G.ZERO_ALLOC: "zero (allocated)",
    G.RESERVED: "reserved, reads through",
    G.COMPRESSED: "compressed",
    G.PARTIAL: "partial subclusters",
    G.INVALID: "invalid",
    G.BACKING1: "from backing 1",
    G.BACKING2: "from backing 2",
    G.BACKING3: "from backing 3",
    G.BACKING4: "from backing 4",
    G.BACKING5: "from backing 5+",
}

# Names users may type to find a state (`/` in the guest map).
GUEST_ALIASES: dict[str, tuple[int, ...]] = {
    "data": (G.DATA,),
    "zero": (G.ZERO_PLAIN, G.ZERO_ALLOC),
    "unallocated": (G.UNALLOCATED,),
    "free": (G.UNALLOCATED,),
    "reserved": (G.RESERVED,),
    "compressed": (G.COMPRESSED,),
    "partial": (G.PARTIAL,),
    "invalid": (G.INVALID,),
    "backing": (G.BACKING1, G.BACKING2, G.BACKING3, G.BACKING4, G.BACKING5),
}


def backing_state(depth: int) -> G:
    """The map state of a cluster that layer `depth` (1 = first backing file) provides."""
    return G(G.BACKING1 + min(depth, MAX_DEPTH_COLOURS) - 1)


# Structure kinds: host clusters by owner, tree nodes, hex fields, space bar parts.
KIND_COLOURS: dict[str, str] = {
    "header": "#ffffff",
    "extension": "#d0d0d0",
    "l1": "#00afff",
    "snapshot_l1": "#5f87af",
    "l2": "#5fd7ff",
    "snapshot_l2": "#5fafaf",
    "refcount_table": "#ff8700",
    "refcount_block": "#ffaf00",
    "data": GUEST_COLOURS[G.DATA],
    "zero": GUEST_COLOURS[G.ZERO_ALLOC],
    "zero_data": "#87af87",
    "backing_dup": "#afd7af",
    "snapshot_data": "#00af5f",
    "compressed": GUEST_COLOURS[G.COMPRESSED],
    "snapshot_table": "#af87ff",
    "bitmap_directory": "#ffff5f",
    "bitmap_table": "#d7d75f",
    "bitmap_data": "#afaf5f",
    "luks": "#ff87af",
    "vmstate": "#87d7d7",
    "preallocated": GUEST_COLOURS[G.RESERVED],
    "leaked": "#ff5f5f",
    "free": "#4e4e4e",
    "hole": "#4e4e4e",
    "tail": "#808080",
    "past_end": "#808080",
    "metadata": "#5fafd7",
    "unknown": "#3a3a3a",
    "corrupt": GUEST_COLOURS[G.INVALID],
    "shared": "#00af87",
    "filesystem": "#585858",
}

# Alternate names an analysis may use for a kind (Owner enum member names, space parts).
_KIND_ALIASES: dict[str, str] = {
    "extensions": "extension",
    "extension_area": "extension",
    "header_extensions": "extension",
    "backing_name": "extension",
    "l1_table": "l1",
    "active_l1": "l1",
    "snapshot_l1_table": "snapshot_l1",
    "l2_table": "l2",
    "active_l2": "l2",
    "inactive_l2": "snapshot_l2",
    "reftable": "refcount_table",
    "refblock": "refcount_block",
    "refcount_blocks": "refcount_block",
    "guest_data": "data",
    "compressed_data": "compressed",
    "zero_allocated": "zero",
    "zero_alloc": "zero",
    "preallocated_unused": "preallocated",
    "prealloc": "preallocated",
    "snapshot_exclusive": "snapshot_data",
    "snapshots": "snapshot_table",
    "bitmap_dir": "bitmap_directory",
    "bitmaps": "bitmap_data",
    "luks_header": "luks",
    "encryption": "luks",
    "free_hole": "free",
    "holes": "hole",
    "unused": "free",
    "past_eof": "past_end",
    "beyond_end": "past_end",
    "image_tail": "tail",
    # analysis.layout.Owner members
    "refcount_block": "refcount_block",
    "bitmap_data": "bitmap_data",
    "conflict": "corrupt",
    # analysis.space parts
    "l2_tables": "l2",
    "snapshot_l1_tables": "snapshot_l1",
    "snapshot_l2_tables": "snapshot_l2",
    "backing_duplicates": "backing_dup",
    "zero_data": "zero_data",
}


def kind_key(name: str) -> str:
    """Normalise an owner/part name ('L2_TABLE', 'refcount block', ...) to a palette key."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key in KIND_COLOURS:
        return key
    if key in _KIND_ALIASES:
        return _KIND_ALIASES[key]
    for suffix in ("s", "_table", "_clusters"):
        if key.endswith(suffix) and key[: -len(suffix)] in KIND_COLOURS:
            return key[: -len(suffix)]
    for k in KIND_COLOURS:
        if key.startswith(k):
            return k
    return "unknown"


def kind_colour(name: str) -> str:
    return KIND_COLOURS[kind_key(name)]


def swatch(colour: str, label: str, glyph: str = "█") -> Text:
    """A legend item: a coloured block and its label."""
    t = Text()
    t.append(glyph, Style(color=colour))
    t.append(" " + label)
    return t


# Field colours for the hex view of records without a natural kind (header fields, snapshot
# entries): a cycle of distinguishable colours.
FIELD_CYCLE = ("#ffd787", "#87d7ff", "#d7afff", "#afd787", "#ffaf87", "#87ffd7", "#ff87d7", "#d7d787")

FLAG_BYTE = "#ffffff"
CURSOR_STYLE = Style(reverse=True, bold=True)
DIM = "#808080"
WARN = "#ffd75f"
ERROR = "#ff5f5f"
OK = "#5fd75f"
SEVERITY_COLOURS = {"error": ERROR, "critical": ERROR, "warning": WARN, "info": "#87afff", "ok": OK}
