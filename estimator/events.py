"""The common language of estimates, traces and measurements: tensors and when they live.

An analytic family, a meta-device trace and a real measurement all describe one training step
as an ordered list of :class:`Event` (a tensor allocated or freed, with its role and phase).
Everything else -- the seed's first-order table, the peak, the timeline chart, estimate versus
measurement -- is computed from such a list (see ``timeline.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["parameter", "input", "activation", "gradient", "optimizer_state", "temporary"]
Phase = Literal["setup", "forward", "loss", "backward", "optimizer_step", "zero_grad"]

ROLES: tuple[str, ...] = ("parameter", "input", "activation", "gradient", "optimizer_state", "temporary")
PHASES: tuple[str, ...] = ("setup", "forward", "loss", "backward", "optimizer_step", "zero_grad")


@dataclass(frozen=True, init=False)
class Event:
    """One allocation (``nbytes > 0``) or release (``nbytes < 0``) of a named tensor."""

    name: str
    role: str
    nbytes: int
    phase: str

    def __init__(self, name: str, role: str, nbytes: int, phase: str) -> None:
        # what the frozen dataclass's own __init__ does (one object.__setattr__ per field), in one dict
        # update: an estimate makes hundreds of thousands of events
        fields = self.__dict__
        fields["name"], fields["role"], fields["nbytes"], fields["phase"] = name, role, nbytes, phase

    @property
    def is_alloc(self) -> bool:
        return self.nbytes > 0


def alloc(name: str, role: str, nbytes: int, phase: str) -> Event:
    """An allocation event of ``nbytes`` bytes."""
    return Event(name, role, int(nbytes), phase)


def free(name: str, role: str, nbytes: int, phase: str) -> Event:
    """A release event; ``nbytes`` is given positive and stored negative."""
    return Event(name, role, -int(nbytes), phase)
