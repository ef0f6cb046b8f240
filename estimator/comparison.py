"""One figure, estimated and measured: the unit of every estimate-vs-measurement table. No torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One figure, estimated and measured."""

    key: str
    label: str
    estimated: int
    measured: int

    @property
    def ratio(self) -> float | None:
        return self.measured / self.estimated if self.estimated else None

    def within(self, tolerance: float) -> bool:
        if self.estimated == self.measured:
            return True
        if not self.estimated:
            return False
        return abs(self.measured - self.estimated) / self.estimated <= tolerance
