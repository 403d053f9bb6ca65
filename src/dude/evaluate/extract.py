"""Final-answer extraction and numeric comparison for GSM8K-style math answers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["extract_answer", "normalize_number", "numbers_match"]

_HASHES = re.compile(r"####\s*(-?\$?\s*[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def normalize_number(text: str) -> str | None:
    """Canonical decimal string of a number written with optional ``$``, commas, trailing ``.``.

    ``"$1,200.50"`` -> ``"1200.5"``; ``"18.00"`` -> ``"18"``; not a number -> ``None``.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():  # integers as plain digits, any length ("1E+2" -> "100")
        return f"{value:f}".split(".")[0]
    return str(value.normalize())


def extract_answer(text: str) -> str | None:
    """The final number of a model's answer: after the last ``####``, else the last number."""
    hashes = _HASHES.findall(text)
    if hashes:
        return normalize_number(hashes[-1])
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def numbers_match(predicted: str | None, reference: str | None) -> bool:
    """Exact numeric match of two normalized answers (``None`` never matches)."""
    return predicted is not None and reference is not None and Decimal(predicted) == Decimal(reference)
