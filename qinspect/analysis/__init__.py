"""Questions about an image, answered with dataclasses and numpy arrays (no UI imports).

Long computations take `progress(done, total)` and `cancelled()` callbacks so that the CLI and the
TUI's thread workers share the same code.
"""
