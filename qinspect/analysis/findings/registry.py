"""The rule registry: every finding comes from one registered rule function.

A rule module decorates its functions with `@rule("id", ...)`; importing the module registers
them, in import order (which breaks severity ties). `qinspect.analysis.findings` imports every rule
module listed in its `RULE_MODULES`; to add findings, add a module there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qinspect.analysis.findings.model import Context, Finding

RuleFn = Callable[[Context], Finding | None]


@dataclass(frozen=True)
class Rule:
    id: str
    fn: RuleFn
    deep: bool = False
    """Needs the deep scan (reading the data clusters)."""


REGISTRY: list[Rule] = []


def rule(rule_id: str, *, deep: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Register `fn` as the rule `rule_id` (ids are unique)."""

    def deco(fn: RuleFn) -> RuleFn:
        if any(r.id == rule_id for r in REGISTRY):
            raise ValueError(f"rule {rule_id} registered twice")
        REGISTRY.append(Rule(rule_id, fn, deep))
        return fn

    return deco
