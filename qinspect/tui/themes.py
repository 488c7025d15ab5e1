"""qinspect's themes in Textual's theme picker, and the palette that follows the theme chosen.

Kept apart from `palette` (which the headless state uses and which imports no Textual).
"""

from __future__ import annotations

from textual.theme import BUILTIN_THEMES, Theme

from qinspect.tui.palette import THEME_COLOUR_BLIND, THEME_LIGHT, palette_for_theme, use_palette


def use_palette_for_theme(theme: str) -> bool:
    """Follow a Textual theme: ours by name, the others by whether they are dark."""
    t = BUILTIN_THEMES.get(theme)
    dark = t.dark if t is not None else theme != THEME_LIGHT
    return use_palette(palette_for_theme(theme, dark))


def textual_themes() -> list[Theme]:
    """The two themes qinspect adds to Textual's theme picker (ctrl+p → theme)."""
    return [
        # Okabe–Ito primaries for the UI; the maps use the colour-blind palette and letters.
        Theme(name=THEME_COLOUR_BLIND, primary="#56B4E9", secondary="#E69F00", accent="#F0E442",
              warning="#E69F00", error="#D55E00", success="#009E73", foreground="#eeeeee",
              background="#1e1e1e", surface="#262626", panel="#303030", dark=True),
        Theme(name=THEME_LIGHT, primary="#0060c0", secondary="#8040a0", accent="#a06000",
              warning="#a06000", error="#c00000", success="#207020", foreground="#202020",
              background="#f4f4f4", surface="#ffffff", panel="#e4e4e4", dark=False),
    ]
