"""One statistics vocabulary for every stage: total, kept, dropped_<reason> (+ LLM token counts)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import polars as pl


@dataclass
class StageStats:
    total: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    extra: dict[str, int | float] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] += n

    def count_unread(self, reason: str, n: int) -> None:
        """Rows that never reached the stage (e.g. malformed input lines): part of total, dropped."""
        self.total += n
        self.drop(reason, n)

    def merge(self, other: StageStats) -> None:
        """Add another batch's counts (extra values are summed)."""
        self.total += other.total
        self.kept += other.kept
        self.dropped.update(other.dropped)
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0) + v

    def drop_counts(self, reasons: pl.Series) -> None:
        """Count a column of reasons (one per rejected row)."""
        for reason, n in Counter(reasons.to_list()).items():
            self.drop(str(reason), int(n))

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {"total": self.total, "kept": self.kept}
        out["dropped"] = self.dropped_total
        out.update({f"dropped_{r}": n for r, n in sorted(self.dropped.items())})
        out.update(self.extra)
        return out

    def check_balanced(self) -> None:
        """Every input row is either kept or dropped for a named reason: nothing vanishes."""
        if self.total != self.kept + self.dropped_total:
            raise AssertionError(
                f"row accounting broken: total={self.total} kept={self.kept} dropped={self.dropped_total}"
            )
