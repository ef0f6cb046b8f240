"""Looking names up in a table, with a 'did you mean' for typos: one wording everywhere."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar

from estimator.errors import EstimatorError

T = TypeVar("T")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'adam'?"`` for the closest choice, or ``""`` when none is close.

    A choice that starts with the word wins (``a100`` -> ``a100-40gb``, not ``a10``).
    """
    choices = list(choices)
    close = [c for c in choices if c.startswith(word)] or difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown(what: str, name: str, choices: Iterable[str]) -> str:
    """``"unknown optimizer 'adm'; did you mean 'adam'? (known: sgd, adam)"``."""
    known = list(choices)
    return f"unknown {what} {name!r}{did_you_mean(name.strip().lower(), known)} (known: {', '.join(known)})"


def lookup(table: Mapping[str, T], name: str, field: str, what: str) -> T:
    """``table[name]`` case-insensitively, else EstimatorError ``"field: unknown what 'x'; did you mean ..."``."""
    key = name.strip().lower()
    if key in table:
        return table[key]
    raise EstimatorError(f"{field}: {unknown(what, name, table)}")
