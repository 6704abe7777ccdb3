"""Small helpers the tools' Markdown reports share."""

from __future__ import annotations


def fmt(v, spec: str = ".1f", none: str = "–") -> str:
    """`v` formatted with `spec`, or a dash for a value that was not measured."""
    return none if v is None else format(v, spec)
