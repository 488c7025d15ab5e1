"""Finding rules, one module per topic, registered in `registry.REGISTRY`.

`health` (the image opens, data is safe), `space` (why the file is big) and `performance` (why
it is slow). Another topic adds a module to `RULE_MODULES`; the diagnosis runs every registered
rule and plans the fixes (`qinspect.analysis.findings.fixes`).
"""

from __future__ import annotations

import importlib

from qinspect.analysis.findings.registry import REGISTRY, Rule, rule

RULE_MODULES = (
    "qinspect.analysis.findings.health",
    "qinspect.analysis.findings.space_rules",
    "qinspect.analysis.findings.performance",
    "qinspect.analysis.findings.guest_rules",
)

for _m in RULE_MODULES:
    importlib.import_module(_m)

__all__ = ["REGISTRY", "RULE_MODULES", "Rule", "rule"]
