"""check and layout from one refcount walk: each distinct L2 table read once for both.

The TUI shows both the host layout and check's findings; running `check_image` and
`compute_layout` one after the other would read every L2 table twice. `check_and_layout` builds
one `RefWalk` and feeds its single pass of L2 batches to both consumers.
"""

from __future__ import annotations

from qinspect.analysis.check import CheckResult, check_consumer
from qinspect.analysis.layout import Layout, layout_consumer
from qinspect.analysis.progress import CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.analysis.refwalk import RefWalk
from qinspect.qcow2.image import Image


def check_and_layout(img: Image, progress: ProgressFn = no_progress, cancelled: CancelledFn = never_cancelled,
                     filename: str | None = None) -> tuple[CheckResult, Layout]:
    """`check_image(img)` and `compute_layout(img)`, from one walk (one read of each L2 table)."""
    walk = RefWalk(img)
    res, lay = walk.run([check_consumer(img, walk, filename), layout_consumer(img, walk)], progress, cancelled)
    assert isinstance(res, CheckResult) and isinstance(lay, Layout)
    return res, lay


__all__ = ["check_and_layout"]
