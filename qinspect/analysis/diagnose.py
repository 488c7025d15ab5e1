"""Findings: what makes this image big, slow or unsafe, with the evidence, the cost and the fix.

`diagnose` runs the layout walk once (plus, with `deep=True`, a read of every data cluster),
builds the space model (host extents from FIEMAP, so the numbers do not depend on the page cache)
and runs every registered rule (`qinspect.analysis.findings`: health, space, performance
modules). Each rule that fires yields a `Finding` with a stable id (the sample corpus is labelled
with them), a severity (error: data at risk or the image does not open; warning: a cost above
the rule's stated threshold; info: worth knowing), the numbers it is based on, and a `Fix`: an
argv rendered with `shellquote.command_line`, whether it works in place, and what it `predicts`
for the file (`file-size`, `disk-usage`). Conversions are merged into one per image and never
offered where they would not help; nothing is repaired in place while a VM holds the write lock.
Findings are sorted worst first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qinspect.analysis.cache import CacheModel, cache_model
from qinspect.analysis.deep import DeepScan, deep_scan
from qinspect.analysis.findings import REGISTRY
from qinspect.analysis.findings.fixes import apply_lock, convert_argv, plan_converts
from qinspect.analysis.findings.model import Category, Context, ConvertWish, Finding, Fix, Severity
from qinspect.analysis.layout import Layout, compute_layout
from qinspect.analysis.progress import CancelledFn, ProgressFn, never_cancelled, no_progress
from qinspect.analysis.space import Space, compute_space
from qinspect.qcow2.hostfile import InUse
from qinspect.qcow2.image import Image
from qinspect.units import format_size, size_option

SEVERITIES = tuple(Severity)
"""Every severity, worst first."""
RULES = tuple(r.id for r in REGISTRY)
DEEP_RULES = tuple(r.id for r in REGISTRY if r.deep)


def size_text(n: int) -> str:
    """The one human size format (qinspect.units.format_size)."""
    return format_size(n)


@dataclass
class Diagnosis:
    """All findings (worst first), the space breakdown and the cache model of one image."""

    path: str
    findings: list[Finding]
    space: Space
    cache: CacheModel
    layout: Layout
    deep: DeepScan | None = None
    rules_run: list[str] = field(default_factory=list)
    """The rule ids that were evaluated (deep-only rules are missing without `deep`)."""
    in_use: InUse = InUse.NO
    """Whether a running QEMU holds the image's locks."""

    def worst(self) -> Severity | None:
        """The most severe severity among the findings, or None."""
        return self.findings[0].severity if self.findings else None

    def fails(self, threshold: Severity) -> list[Finding]:
        """Findings at `threshold` severity or worse."""
        return [f for f in self.findings if f.severity.rank <= threshold.rank]

    def to_json(self) -> dict[str, object]:
        """`{"findings": [...], "space": {...}, "cache": {...}, "in-use": ...}`."""
        out: dict[str, object] = {
            "findings": [f.to_json() for f in self.findings],
            "space": self.space.to_json(),
            "cache": self.cache.to_json(),
            "in-use": self.in_use.to_json(),
        }
        if self.deep is not None:
            d = self.deep
            out["deep"] = {"data-clusters": d.data_clusters, "data-bytes": d.data_bytes,
                           "zero-clusters": d.zero_clusters, "zero-bytes": d.zero_bytes,
                           "duplicate-clusters": d.duplicate_clusters, "duplicate-bytes": d.duplicate_bytes,
                           "compressed-clusters": d.compressed_clusters, "convert-size": d.convert_size,
                           "convert-reclaim": d.convert_reclaim, "skipped": d.skipped}
        return out


def diagnose(img: Image, deep: bool = False, progress: ProgressFn = no_progress,
             cancelled: CancelledFn = never_cancelled, *, layout: Layout | None = None,
             linux: bool = True) -> Diagnosis:
    """Run every rule on `img` (reading each data cluster too when `deep`); findings worst first.

    `progress` reports the layout walk, then (deep) the data read; pass a `layout` already
    computed for this image to skip the walk.
    """
    lay = layout if layout is not None else compute_layout(img, progress, cancelled)
    scan = deep_scan(img, progress, cancelled) if deep else None
    space = compute_space(img, lay, scan)
    h = img.header
    cache = cache_model(h.size, h.cluster_size, h.extended_l2, h.refcount_bits, linux=linux)
    ctx = Context(img, lay, space, cache, scan)
    findings: list[Finding] = []
    ran: list[str] = []
    for r in REGISTRY:
        if r.deep and not deep:
            continue
        ran.append(r.id)
        f = r.fn(ctx)
        if f is not None:
            findings.append(f)
    findings = plan_converts(ctx, findings)
    apply_lock(ctx, findings)
    order = {r.id: i for i, r in enumerate(REGISTRY)}
    findings.sort(key=lambda f: (f.severity.rank, order.get(f.id, len(order))))
    return Diagnosis(img.path, findings, space, cache, lay, scan, ran, ctx.lock)


__all__ = ["DEEP_RULES", "RULES", "SEVERITIES", "Category", "ConvertWish", "Diagnosis", "Finding",
           "Fix", "Severity", "convert_argv", "diagnose", "size_option", "size_text"]
