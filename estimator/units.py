"""Human units: bytes in IEC (KiB, MiB, GiB), counts and FLOPs in SI (k, M, G, T). JSON keeps exact ints."""

from __future__ import annotations

_IEC = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
_SI = ["", "k", "M", "G", "T", "P", "E"]


def human_bytes(n: int | float) -> str:
    """Three significant digits: ``1536 -> '1.50 KiB'``, ``570425344 -> '544 MiB'``; exact below 1 KiB."""
    value = float(n)
    for unit in _IEC:
        if abs(value) < 1000 or unit == _IEC[-1]:
            return f"{int(value)} B" if unit == "B" else f"{_three_digits(value)} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _three_digits(value: float) -> str:
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f}"


def human_count(n: int | float, suffix: str = "") -> str:
    """``124439808 -> '124.44 M'``; integers below 1000 stay exact."""
    value = float(n)
    for unit in _SI:
        if abs(value) < 1000 or unit == _SI[-1]:
            if unit == "":
                return f"{int(value)}{' ' + suffix if suffix else ''}"
            return f"{_three_digits(value)} {unit}{suffix}"
        value /= 1000
    raise AssertionError("unreachable")


def human_flops(n: int | float) -> str:
    """FLOPs in SI units: ``432 -> '432 FLOP'``, ``6.2e12 -> '6.20 TFLOP'``."""
    return human_count(n, "FLOP")
