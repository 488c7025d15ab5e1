"""The palette can be read: any two entries of one legend differ by CIEDE2000 ΔE ≥ 20.

ΔE is computed here from first principles (sRGB → CIELAB D65, then Sharma's CIEDE2000) and
checked against a published test pair. The legends are the ones the views draw: the guest map's
states (with five backing layers), the host layout's owners, and the space bar's parts (the
overview merges parts that share a colour into one entry, so its entries are its distinct colours).
The colour-blind palette is measured under simulated protanopia and deuteranopia (Machado 2009,
full severity), where no 13 or 18 colours reach 20: it carries letters in every grid, and the test
holds it to the best distances the search for it found.
"""

from __future__ import annotations

import itertools
import math

import pytest

from qinspect.analysis.layout import Owner
from qinspect.analysis.space import PART_LABELS
from qinspect.tui import palette as P
from qinspect.tui.palette import G

PROTAN = ((0.152286, 1.052583, -0.204868), (0.114503, 0.786281, 0.099216), (-0.003882, -0.048116, 1.051998))
DEUTAN = ((0.367322, 0.860646, -0.227968), (0.280085, 0.672501, 0.047413), (-0.011820, 0.042940, 0.968881))


def _lin(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def _rgb(hexc: str) -> tuple[float, float, float]:
    h = hexc.lstrip("#")
    return (_lin(int(h[0:2], 16) / 255), _lin(int(h[2:4], 16) / 255), _lin(int(h[4:6], 16) / 255))


def lab(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    r, g, b = rgb
    x = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
    y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116

    fx, fy, fz = f(x), f(y), f(z)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def simulate(rgb: tuple[float, float, float], m: tuple[tuple[float, ...], ...]) -> tuple[float, float, float]:
    out = [min(1.0, max(0.0, sum(m[i][k] * rgb[k] for k in range(3)))) for i in range(3)]
    return out[0], out[1], out[2]


def ciede2000(p: tuple[float, float, float], q: tuple[float, float, float]) -> float:
    l1, a1, b1 = p
    l2, a2, b2 = q
    cb = (math.hypot(a1, b1) + math.hypot(a2, b2)) / 2
    g = 0.5 * (1 - math.sqrt(cb**7 / (cb**7 + 25**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = math.hypot(a1p, b1), math.hypot(a2p, b2)
    h1p = math.degrees(math.atan2(b1, a1p)) % 360 if c1p else 0.0
    h2p = math.degrees(math.atan2(b2, a2p)) % 360 if c2p else 0.0
    dlp, dcp = l2 - l1, c2p - c1p
    dhp = 0.0
    if c1p * c2p:
        dhp = h2p - h1p
        dhp = dhp - 360 if dhp > 180 else dhp + 360 if dhp < -180 else dhp
    dhh = 2 * math.sqrt(c1p * c2p) * math.sin(math.radians(dhp / 2))
    lbp, cbp = (l1 + l2) / 2, (c1p + c2p) / 2
    if c1p * c2p == 0:
        hbp = h1p + h2p
    elif abs(h1p - h2p) <= 180:
        hbp = (h1p + h2p) / 2
    else:
        hbp = (h1p + h2p + 360) / 2 if h1p + h2p < 360 else (h1p + h2p - 360) / 2
    t = (1 - 0.17 * math.cos(math.radians(hbp - 30)) + 0.24 * math.cos(math.radians(2 * hbp))
         + 0.32 * math.cos(math.radians(3 * hbp + 6)) - 0.20 * math.cos(math.radians(4 * hbp - 63)))
    dth = 30 * math.exp(-(((hbp - 275) / 25) ** 2))
    rc = 2 * math.sqrt(cbp**7 / (cbp**7 + 25**7))
    sl = 1 + 0.015 * (lbp - 50) ** 2 / math.sqrt(20 + (lbp - 50) ** 2)
    sc, sh = 1 + 0.045 * cbp, 1 + 0.015 * cbp * t
    rt = -math.sin(math.radians(2 * dth)) * rc
    return math.sqrt((dlp / sl) ** 2 + (dcp / sc) ** 2 + (dhh / sh) ** 2 + rt * (dcp / sc) * (dhh / sh))


def delta_e(a: str, b: str, vision: tuple[tuple[float, ...], ...] | None = None) -> float:
    ra, rb = _rgb(a), _rgb(b)
    if vision is not None:
        ra, rb = simulate(ra, vision), simulate(rb, vision)
    return ciede2000(lab(ra), lab(rb))


def min_pair(colours: dict[str, str], vision: tuple[tuple[float, ...], ...] | None = None) -> tuple[float, str, str]:
    return min((delta_e(colours[a], colours[b], vision), a, b) for a, b in itertools.combinations(colours, 2))


def test_ciede2000_matches_the_published_test_data() -> None:
    # Sharma, Wu, Dalal (2005), pairs 1 and 17.
    assert ciede2000((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485)) == pytest.approx(2.0425, abs=1e-4)
    assert ciede2000((50.0, 2.5, 0.0), (73.0, 25.0, -18.0)) == pytest.approx(27.1492, abs=1e-4)


def legends() -> dict[str, dict[str, str]]:
    """The colours of each legend, by entry, in the palette in use."""
    guest_states = [G.DATA, G.ZERO_PLAIN, G.ZERO_ALLOC, G.UNALLOCATED, G.COMPRESSED, G.PARTIAL, G.RESERVED,
                    G.INVALID, G.BACKING1, G.BACKING2, G.BACKING3, G.BACKING4, G.BACKING5]
    guest = {P.GUEST_NAMES[s]: P.GUEST_COLOURS[s] for s in guest_states}
    host = {o.label: P.kind_colour(o.name) for o in Owner}
    space = {}
    for part in PART_LABELS:
        space.setdefault(P.kind_colour(part), part)
    return {"guest": guest, "host": host, "space": {v: k for k, v in space.items()}}


@pytest.mark.parametrize("name", ["dark", "light"])
def test_every_two_legend_entries_differ_by_20(name: str) -> None:
    P.use_palette(name)
    try:
        for legend, colours in legends().items():
            d, a, b = min_pair(colours)
            assert d >= 20, f"{name} {legend}: '{a}' and '{b}' differ by ΔE {d:.1f}"
    finally:
        P.use_palette("dark")


def test_the_host_owners_all_have_their_own_colour() -> None:
    names = [P.kind_key(o.name) for o in Owner]
    assert len(set(names)) == len(Owner), names


def test_colour_blind_palette_is_distinct_under_simulated_colour_blindness() -> None:
    P.use_palette("colour-blind")
    try:
        assert P.PaletteState.letters
        got = legends()
        for vision in (PROTAN, DEUTAN):
            assert min_pair(got["guest"], vision)[0] >= 12
            assert min_pair(got["host"], vision)[0] >= 8
    finally:
        P.use_palette("dark")


def test_letters_tell_every_legend_entry_apart() -> None:
    letters = [P.GUEST_LETTERS[s] for s in G if s != G.UNKNOWN]
    assert len(set(letters)) == len(letters)


def test_backing_layers_are_named_by_file() -> None:
    names = ["top.qcow2", "mid.qcow2", "base.qcow2"]
    assert P.guest_name(G.BACKING1, names) == "from mid.qcow2"
    assert P.guest_name(G.BACKING2, names) == "from base.qcow2"


async def test_themes_in_textual_theme_picker_switch_the_palette(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil
    import subprocess

    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    from qinspect.tui.app import QInspectApp

    img = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    app = QInspectApp(str(img), scan=False)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            assert {P.THEME_LIGHT, P.THEME_COLOUR_BLIND} <= set(app.available_themes)
            app.theme = P.THEME_COLOUR_BLIND
            await pilot.pause()
            assert P.PaletteState.name == "colour-blind" and P.PaletteState.letters
            app.theme = P.THEME_LIGHT
            await pilot.pause()
            assert P.PaletteState.name == "light" and not P.PaletteState.letters
            assert P.GUEST_COLOURS[G.DATA] == "#44cc44"
            app.theme = "textual-dark"
            await pilot.pause()
            assert P.PaletteState.name == "dark"
    finally:
        P.use_palette("dark")
