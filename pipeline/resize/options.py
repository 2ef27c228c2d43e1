"""What decides a resize's output: the rank rule and the output options (``LoraOutput``, as
extract's). Frozen, round-tripping through plain dicts for the report. Nothing here changes the
stored results: the refactoring is exact and keeps the whole spectrum, so every option is a
re-export."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..export.options import LoraOutput
from ..export.ranks import rank_rule


@dataclass(frozen=True, kw_only=True)
class ResizeOptions(LoraOutput):
    allow_nonfinite: bool = False

    def __post_init__(self):
        rule = self.rank_rule
        if rule is None:
            raise UsageError("resize needs a rank rule: its --rank is the largest rank kept")
        if isinstance(rule, dict):  # built once: check_output keeps a RankRule as it is
            rule = rank_rule(**rule)
            object.__setattr__(self, "rank_rule", rule)
        self.check_output(rule.rank, "rule's rank")
