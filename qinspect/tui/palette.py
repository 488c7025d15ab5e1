"""One colour per kind of thing, the same in every view.

Guest states (the guest map) and structure kinds (host layout, structures tree, hex view, space
bar) share this palette: guest data is the same green in the guest map, the host layout, the
hex view and the space bar; an L2 table is the same cyan in the host layout and the tree.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from rich.style import Style
from rich.text import Text

from qinspect.qcow2.errors import Severity


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

# The three palettes (one per theme family), chosen so that any two entries of one legend differ
# by CIEDE2000 ΔE ≥ 20 on their background (tests/tui/test_palette.py measures it); the
# colour-blind palette maximises the distance under simulated protanopia and deuteranopia instead
# and every grid draws letters there, so that no kind depends on colour alone.
_GUEST: dict[str, dict[int, str]] = {
    "dark": {G.UNKNOWN: "#3a3a3a", G.UNALLOCATED: "#666666", G.DATA: "#66ee66", G.ZERO_PLAIN: "#66aaff",
             G.ZERO_ALLOC: "#22eeee", G.RESERVED: "#aa8844", G.COMPRESSED: "#cc66ff", G.PARTIAL: "#ffee22",
             G.INVALID: "#ff2222", G.BACKING1: "#eeaaaa", G.BACKING2: "#aa4466", G.BACKING3: "#884400",
             G.BACKING4: "#448844", G.BACKING5: "#8800cc"},
    "light": {G.UNKNOWN: "#d0d0d0", G.UNALLOCATED: "#666666", G.DATA: "#44cc44", G.ZERO_PLAIN: "#66aaff",
              G.ZERO_ALLOC: "#22cccc", G.RESERVED: "#886600", G.COMPRESSED: "#cc66ff", G.PARTIAL: "#ccaa00",
              G.INVALID: "#ff2222", G.BACKING1: "#ccaaaa", G.BACKING2: "#aa4466", G.BACKING3: "#882200",
              G.BACKING4: "#228866", G.BACKING5: "#660088"},
    "colour-blind": {G.UNKNOWN: "#3a3a3a", G.UNALLOCATED: "#666666", G.DATA: "#66ee66", G.ZERO_PLAIN: "#66aaff",
                     G.ZERO_ALLOC: "#22eeee", G.RESERVED: "#aaaa88", G.COMPRESSED: "#aa44ff", G.PARTIAL: "#ffeecc",
                     G.INVALID: "#ff2222", G.BACKING1: "#aaaaaa", G.BACKING2: "#8888aa", G.BACKING3: "#aa0000",
                     G.BACKING4: "#668866", G.BACKING5: "#aa2288"},
}
# Host-layout owners (analysis.layout.Owner names, lower case).
_HOST = {
    "dark": {"data": "#66ee66", "compressed": "#cc66ff", "header": "#eeeeee", "l1": "#0088ff", "l2": "#66ccee",
             "refcount_table": "#ff8800", "refcount_block": "#ffcc44", "leaked": "#ff2222", "free": "#666666",
             "snapshot_l1": "#8844aa", "snapshot_table": "#eeaacc", "bitmap_directory": "#aaaa88",
             "bitmap_table": "#668800", "bitmap_data": "#226644", "luks": "#ff4488", "past_end": "#8888aa",
             "shared": "#00aa88", "conflict": "#aa0044"},
    "light": {"data": "#44cc44", "compressed": "#cc66ff", "header": "#ccaaaa", "l1": "#0088ff", "l2": "#22cccc",
              "refcount_table": "#ff8800", "refcount_block": "#ccaa22", "leaked": "#ff2222", "free": "#444444",
              "snapshot_l1": "#8844aa", "snapshot_table": "#ff4488", "bitmap_directory": "#668800",
              "bitmap_table": "#886600", "bitmap_data": "#224400", "luks": "#886666", "past_end": "#8888aa",
              "shared": "#228866", "conflict": "#aa0044"},
    "colour-blind": {"data": "#66ee66", "compressed": "#aa44ff", "header": "#eeeeee", "l1": "#6688aa",
                     "l2": "#66ccee", "refcount_table": "#ff8800", "refcount_block": "#ffeeaa", "leaked": "#ff2222",
                     "free": "#666666", "snapshot_l1": "#6666aa", "snapshot_table": "#ee66ff",
                     "bitmap_directory": "#aaaa66", "bitmap_table": "#888844", "bitmap_data": "#446644",
                     "luks": "#ee6688", "past_end": "#aaaaaa", "shared": "#00aa88", "conflict": "#cc0066"},
}
# Space-bar parts that are no host owner, set apart from the owners shown next to them.
_SPACE_EXTRA = {
    "dark": {"zero": "#22ffee", "preallocated": "#aa8822", "guest_freed": "#559900"},
    "light": {"zero": "#22cccc", "preallocated": "#886600", "guest_freed": "#882200"},
    "colour-blind": {"zero": "#22ffee", "preallocated": "#888844", "guest_freed": "#ffccff"},
}
PALETTES = tuple(_GUEST)

GUEST_COLOURS: dict[int, str] = dict(_GUEST["dark"])

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

# The second channel: one letter per state, drawn instead of blocks when letters are on (`L`; always
# in the colour-blind theme) and shown in the legend.
GUEST_LETTERS: dict[int, str] = {
    G.UNKNOWN: " ", G.UNALLOCATED: ".", G.DATA: "D", G.ZERO_PLAIN: "0", G.ZERO_ALLOC: "Z", G.RESERVED: "r",
    G.COMPRESSED: "C", G.PARTIAL: "P", G.INVALID: "!", G.BACKING1: "1", G.BACKING2: "2", G.BACKING3: "3",
    G.BACKING4: "4", G.BACKING5: "5",
}


def guest_name(state: int, layer_names: list[str] | None = None) -> str:
    """A state's legend name; backing layers by their file name when known."""
    if G.BACKING1 <= state <= G.BACKING5 and layer_names:
        depth = state - G.BACKING1 + 1
        if depth < len(layer_names):
            more = "+" if state == G.BACKING5 and len(layer_names) > MAX_DEPTH_COLOURS + 1 else ""
            return f"from {layer_names[depth]}{more}"
    return GUEST_NAMES[state]

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
class ColourKind(StrEnum):
    """What a colour of `KIND_COLOURS` stands for: the host owners (`Owner`'s names), the parts of
    the space bar and the nodes of the structure tree (the value is the key `kind_key` gives)."""

    DATA = "data"
    COMPRESSED = "compressed"
    HEADER = "header"
    L1 = "l1"
    L2 = "l2"
    REFCOUNT_TABLE = "refcount_table"
    REFCOUNT_BLOCK = "refcount_block"
    LEAKED = "leaked"
    FREE = "free"
    SNAPSHOT_L1 = "snapshot_l1"
    SNAPSHOT_TABLE = "snapshot_table"
    BITMAP_DIRECTORY = "bitmap_directory"
    BITMAP_TABLE = "bitmap_table"
    BITMAP_DATA = "bitmap_data"
    LUKS = "luks"
    PAST_END = "past_end"
    SHARED = "shared"
    CONFLICT = "conflict"
    EXTENSION = "extension"
    SNAPSHOT_L2 = "snapshot_l2"
    ZERO = "zero"
    ZERO_DATA = "zero_data"
    BACKING_DUP = "backing_dup"
    SNAPSHOT_DATA = "snapshot_data"
    PREALLOCATED = "preallocated"
    GUEST_FREED = "guest_freed"
    HOLE = "hole"
    TAIL = "tail"
    FILESYSTEM = "filesystem"
    METADATA = "metadata"
    UNKNOWN = "unknown"
    CORRUPT = "corrupt"
    VMSTATE = "vmstate"


def _kinds(name: str) -> dict[ColourKind, str]:
    """Structure kinds: the host owners plus the kinds of the space bar, tree and hex view."""
    host, guest = _HOST[name], _GUEST[name]
    named = {
        **host,
        "extension": host["header"],
        "snapshot_l2": host["snapshot_l1"],
        "zero": _SPACE_EXTRA[name]["zero"],
        "zero_data": _SPACE_EXTRA[name]["zero"],
        "backing_dup": host["shared"],
        "snapshot_data": host["snapshot_table"],
        "preallocated": _SPACE_EXTRA[name]["preallocated"],
        "guest_freed": _SPACE_EXTRA[name]["guest_freed"],
        "hole": host["free"],
        "tail": host["past_end"],
        "filesystem": host["past_end"],
        "metadata": host["l2"],
        "unknown": guest[G.UNKNOWN],
        "corrupt": host["conflict"],
        "vmstate": host["snapshot_table"],
    }
    return {ColourKind(k): v for k, v in named.items()}


KIND_COLOURS: dict[ColourKind, str] = _kinds("dark")

# Alternate names an analysis may use for a kind (Owner enum member names, space parts).
_KIND_ALIASES: dict[str, str] = {  # (values: ColourKind values)
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


def kind_key(name: str) -> ColourKind:
    """Normalise an owner/part name ('L2_TABLE', 'refcount block', ...) to a palette key."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key in _COLOUR_KINDS:
        return ColourKind(key)
    if key in _KIND_ALIASES:
        return ColourKind(_KIND_ALIASES[key])
    for suffix in ("s", "_table", "_clusters"):
        if key.endswith(suffix) and key[: -len(suffix)] in _COLOUR_KINDS:
            return ColourKind(key[: -len(suffix)])
    for k in ColourKind:
        if key.startswith(k.value):
            return k
    return ColourKind.UNKNOWN


_COLOUR_KINDS = frozenset(k.value for k in ColourKind)


def kind_colour(name: str) -> str:
    return KIND_COLOURS[kind_key(name)]


def swatch(colour: str, label: str, glyph: str = "█", letter: str = "") -> Text:
    """A legend item: a coloured block (and the letter the grid draws in letter mode), its label."""
    t = Text()
    t.append(glyph, Style(color=colour))
    if letter:
        t.append(letter, Style(color=colour, bold=True))
    t.append(" " + label)
    return t


# -- themes ----------------------------------------------------------------------------------------------
class PaletteState:
    """Which palette is in use, and whether the grids draw letters (the second channel)."""

    name = "dark"
    letters = False


def use_palette(name: str) -> bool:
    """Switch every colour table to palette `name` in place; True when it changed."""
    if name not in _GUEST:
        raise KeyError(name)
    changed = name != PaletteState.name
    GUEST_COLOURS.clear()
    GUEST_COLOURS.update(_GUEST[name])
    KIND_COLOURS.clear()
    KIND_COLOURS.update(_kinds(name))
    PaletteState.name = name
    PaletteState.letters = name == "colour-blind"
    return changed


THEME_COLOUR_BLIND = "qinspect-colour-blind"
THEME_LIGHT = "qinspect-light"


def palette_for_theme(theme: str, dark: bool = True) -> str:
    if theme == THEME_COLOUR_BLIND:
        return "colour-blind"
    return "dark" if dark and theme != THEME_LIGHT else "light"


# Field colours for the hex view of records without a natural kind (header fields, snapshot
# entries): a cycle of distinguishable colours.
FIELD_CYCLE = ("#ffd787", "#87d7ff", "#d7afff", "#afd787", "#ffaf87", "#87ffd7", "#ff87d7", "#d7d787")

FLAG_BYTE = "#ffffff"
CURSOR_STYLE = Style(reverse=True, bold=True)
DIM = "#808080"
WARN = "#ffd75f"
ERROR = "#ff5f5f"
OK = "#5fd75f"
SEVERITY_COLOURS: dict[Severity, str] = {Severity.ERROR: ERROR, Severity.WARNING: WARN, Severity.INFO: "#87afff"}


def severity_colour(sev: Severity | None) -> str:
    """The colour of a severity; None is a verdict of nothing found (OK)."""
    return OK if sev is None else SEVERITY_COLOURS[sev]


def severity_word(sev: Severity | None) -> str:
    """ERROR, WARNING, INFO, or OK when nothing was found (None)."""
    return "OK" if sev is None else sev.value.upper()


def severity_order(sev: Severity | None) -> int:
    """Sort key, worst first: error, warning, info, then OK (None)."""
    return len(Severity) if sev is None else sev.rank
